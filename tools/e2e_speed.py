"""End-to-end training speed of the s120m presets side by side (one GPU, one process
after another, same data and settings): tokens/s and MFU from `finemoe train`'s own
metrics, compile time excluded (the first two logging windows are dropped).

    python tools/e2e_speed.py --data .data/prose --out results/e2e_s120m_h100 \
        --presets s120m,s120m-moe,s120m-moe-fine,s120m-cartesian,s120m-finedeep,s120m-dsmoe

Runs with train.compile=true, seq 1024, batch 32, and without periodic or final
evaluation (a copy of the data's manifest without its validation split), so the
numbers are training steps only. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_only_copy(data: Path, dest: Path) -> Path:
    """The same shards (linked, not copied), with an empty validation split."""
    dest.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((data / "manifest.json").read_text())
    for f in manifest["splits"]["train"]["files"] + [{"name": manifest["tokenizer"]["file"]}]:
        link = dest / f["name"]
        if not link.exists():
            link.symlink_to((data / f["name"]).resolve())
    manifest["splits"]["val"] = {"files": [], "documents": 0, "tokens": 0}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--presets", default="s120m,s120m-moe,s120m-moe-fine,s120m-cartesian,s120m-finedeep,s120m-dsmoe")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default=None)
    parser.add_argument("--work", default="/tmp/finemoe-e2e")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    data = train_only_copy(Path(args.data), work / "data")
    rows = []
    for preset in args.presets.split(","):
        run = work / preset
        cmd = [sys.executable, "-m", "finemoe.cli", "train", "-c", preset, "--data", str(data), "--out", str(run),
               "model.max_seq_len=1024", "train.seq_len=1024", "train.batch_size=32", "train.compile=true",
               f"train.steps={args.steps}", "train.warmup_steps=5", "train.log_every=10", "train.eval_batches=0",
               f"train.checkpoint_every={args.steps + 1}", "train.tensorboard=false", *args.overrides]
        started = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - started
        if proc.returncode != 0:
            print(f"{preset}: failed\n{proc.stderr[-2000:]}", flush=True)
            rows.append({"preset": preset, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            continue
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        windows = [r for r in records if "tokens_per_s" in r][2:]
        env = json.loads((run / "environment.json").read_text())
        row = {"preset": preset, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in windows),
               "mfu": statistics.median(r["mfu"] for r in windows) if "mfu" in windows[0] else None,
               "first_window_s": None, "wall_s": round(wall, 1), "steps": args.steps,
               "final_loss": records[-1].get("lm_loss") or windows[-1]["lm_loss"], "gpu": env.get("gpu"),
               "git_commit": env.get("git_commit")}
        rows.append(row)
        print(f"{preset:18s} {row['tokens_per_s']:>10,.0f} tok/s  MFU {row['mfu'] or 0:.1%}  ({wall:.0f} s with compile)",
              flush=True)
    dense = next((r for r in rows if r["preset"] == "s120m" and "error" not in r), None)
    lines = ["| preset | tokens/s | MFU | MFU / dense MFU | wall (s, with compile) |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | failed: {r['error']} | | | |")
            continue
        rel = r["mfu"] / dense["mfu"] if dense and r["mfu"] and dense["mfu"] else float("nan")
        r["mfu_vs_dense"] = rel
        lines.append(f"| {r['preset']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.1%} | {rel:.2f} | {r['wall_s']:.0f} |")
    header = (f"s120m presets, seq 1024, batch 32, bf16, train.compile=true, {args.steps} steps each, median of the "
              f"logging windows after the first two; {rows[0].get('gpu')}, commit {rows[0].get('git_commit')}.\n\n"
              f"Command: `python tools/e2e_speed.py {' '.join(sys.argv[1:])}`\n\n")
    table = header + "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
        Path(args.out).with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
