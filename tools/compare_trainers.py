"""Is a trainer change loss-neutral? Trains one preset with the current finemoe (two
seeds: the noise) and with another copy of finemoe (an older commit unpacked in a
folder: the change), on the same data and settings, and compares the loss curves at the
logging steps.

    git archive OLD finemoe | tar -x -C .cache/old_trainer
    python tools/compare_trainers.py --old .cache/old_trainer --data .data/prose --out results/experiments/loss_curves \
        -- -c s120m train.steps=200 train.seq_len=1024 model.max_seq_len=1024 train.compile=true

Runs without evaluation (a copy of the data's manifest without its validation split).
Writes OUT.json (every curve) and OUT.md (max and mean |Δ| of the change and of the noise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_speed import train_only_copy  # noqa: E402


def train(package_root: Path, data: Path, out: Path, seed: int, args: list[str]) -> dict[int, float]:
    cmd = [sys.executable, "-m", "finemoe.cli", "train", "--data", str(data.resolve()), "--out", str(out.resolve()), *args,
           f"seed={seed}", "train.eval_batches=0", "train.tensorboard=false", "train.log_every=10",
           "train.checkpoint_every=100000"]
    result = subprocess.run(cmd, cwd=package_root, capture_output=True, text=True, env=dict(os.environ))
    if result.returncode != 0:
        raise SystemExit(f"{package_root} seed {seed} failed:\n{result.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lm_loss"] for r in rows if "lm_loss" in r and "tokens_per_s" in r}


def gaps(a: dict[int, float], b: dict[int, float]) -> tuple[float, float]:
    diffs = [abs(a[s] - b[s]) for s in a if s in b]
    return max(diffs), sum(diffs) / len(diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", required=True, help="A folder holding another finemoe package (finemoe/).")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    train_args = [a for a in args.train_args if a != "--"]
    work = Path(tempfile.mkdtemp(prefix="finemoe-curves-"))
    data = train_only_copy(Path(args.data), work / "data")
    here = Path(__file__).resolve().parents[1]
    curves = {"new, seed 0": train(here, data, work / "new0", 0, train_args),
              "new, seed 1": train(here, data, work / "new1", 1, train_args),
              "old, seed 0": train(Path(args.old), data, work / "old0", 0, train_args)}
    change, noise = gaps(curves["new, seed 0"], curves["old, seed 0"]), gaps(curves["new, seed 0"], curves["new, seed 1"])
    steps = sorted(curves["new, seed 0"])
    lines = [f"Loss curves of `finemoe train {' '.join(train_args)}` (no evaluation), lm loss at each logging step.", "",
             f"- change (new vs old, same seed): max |Δ| {change[0]:.4f}, mean |Δ| {change[1]:.4f}",
             f"- noise (new, seed 0 vs seed 1): max |Δ| {noise[0]:.4f}, mean |Δ| {noise[1]:.4f}", "",
             "| step | " + " | ".join(curves) + " |", "|---:|" + "---:|" * len(curves)]
    lines += [f"| {s} | " + " | ".join(f"{c.get(s, float('nan')):.4f}" for c in curves.values()) + " |" for s in steps]
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": train_args, "curves": {k: {str(s): v for s, v in c.items()}
                                                                                     for k, c in curves.items()},
                                                    "change": change, "noise": noise}, indent=1))
    out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
