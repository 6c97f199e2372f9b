"""``finemoe study NAME``: side-by-side comparisons as code.

A study (``studies/NAME.yaml``) names its arms: a preset with overrides, or the final
weights of an earlier arm converted to another FFN kind (``init: {from: ARM, convert:
dsmoe | moe | prune, ...}``). Every arm shares the study's ``common`` overrides (data,
steps, batch, optimizer) and seed, so all train on the same batches; ``repeat`` runs
chosen arms again with other seeds to measure run-to-run noise. Arms run in order;
an arm whose folder already holds ``summary.json`` is skipped, so an interrupted study
resumes where it stopped. Each arm's folder records the command, hardware, git commit
and wall time (``run.json``); the study writes ``table.md``/``table.json``, the loss
curves and the analyses it asks for.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
import numpy as np
import torch

from finemoe.config import ConfigError, check, from_dict, load_yaml, to_dict

__all__ = ["ArmSpec", "StudySpec", "load_study", "run_study", "write_table", "write_figures", "study_path", "list_studies"]

STUDIES_DIR = Path(__file__).resolve().parents[1] / "studies"


@dataclass
class InitSpec:
    """Start an arm from another arm's final weights, or from a pretrained model, converted."""

    source: str
    """An earlier arm (its final checkpoint), or a path to a pretrained model: a run folder
    (``finemoe import`` writes one), a checkpoint, a Hugging Face folder or a ``.gguf`` file."""
    convert: str = "none"
    """``none``, ``dsmoe`` (sigmoid gates + STE), ``moe`` (softmax top-k router, LLaMA-MoE),
    ``finedeep`` (the blocks as sub-layers of experts; ``num_sublayers``), ``prune``
    (channel pruning of every dense FFN) or ``sparsegpt`` (one-shot weight pruning,
    ``keep_fraction`` of the FFN weights kept; the zeros stay zero in training)."""
    num_experts: int = 8
    top_k: int = 5
    """moe: experts per token."""
    keep_fraction: float = 0.6
    """prune: share of FFN channels kept; sparsegpt: share of FFN weights kept."""
    criterion: str = "activation"
    """prune: channel importance (``finemoe.convert.channel_importance``): ``activation``
    on calibration windows of the source arm's training data, ``magnitude`` or ``random``."""
    calibration_tokens: int = 65536
    threshold: float = 0.5
    straight_through: bool = True
    sparsity_loss_coef: float = 1.0
    num_sublayers: int = 1
    """finedeep: M (1 is exactly the dense model at conversion)."""

    def __post_init__(self) -> None:
        from finemoe.convert import conversions

        known = conversions()  # read now: a kind registered after import joins
        check(self.convert in ("none", *known), "convert", f"must be none or one of {', '.join(known)}; got {self.convert!r}")


@dataclass
class ArmSpec:
    name: str
    preset: str | None = None
    overrides: list[str] = field(default_factory=list)
    init: InitSpec | None = None
    analyses: list[str] = field(default_factory=list)
    """Any of: robustness, nsar, dsmoe_sources, usage."""

    def __post_init__(self) -> None:
        check((self.preset is None) != (self.init is None), "preset", "give either a preset or an init (conversion)")
        check(all(c.isalnum() or c in "-_." for c in self.name), "name", f"{self.name!r}: letters, digits, - _ . only")


@dataclass
class RepeatSpec:
    arms: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


@dataclass
class ExpectSpec:
    """The paper's direction: perplexity of ``better`` below each of ``than``."""

    better: str
    than: list[str]


@dataclass
class StudySpec:
    name: str
    claim: str
    common: list[str] = field(default_factory=list)
    arms: list[ArmSpec] = field(default_factory=list)
    repeat: RepeatSpec = field(default_factory=RepeatSpec)
    expect: list[ExpectSpec] = field(default_factory=list)
    seed: int = 0
    flop_budget: float | None = None
    """isoFLOP studies: training FLOPs per arm; each arm's steps follow from its FLOPs/token."""

    def __post_init__(self) -> None:
        names = [a.name for a in self.arms]
        check(len(set(names)) == len(names), "arms", "arm names must be unique")
        for arm in self.arms:
            if arm.init is not None and not is_model_path(arm.init.source):
                check(arm.init.source in names[: names.index(arm.name)], "arms",
                      f"{arm.name}: init.source {arm.init.source!r} must name an earlier arm or a model path")
        for name in self.repeat.arms:
            check(name in names, "repeat.arms", f"{name!r} is not an arm")
        for e in self.expect:
            for name in [e.better, *e.than]:
                check(name in names, "expect", f"{name!r} is not an arm")


def list_studies() -> list[str]:
    return sorted(p.stem for p in STUDIES_DIR.glob("*.yaml"))


def study_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    candidate = STUDIES_DIR / f"{name_or_path}.yaml"
    if not candidate.is_file():
        raise ConfigError("study", f"no study {name_or_path!r}; studies: {', '.join(list_studies())}")
    return candidate


def is_model_path(source: str) -> bool:
    """An ``init.from`` that names a model on disk rather than an arm (arm names have no
    ``/`` and no ``.gguf`` suffix)."""
    return "/" in source or source.endswith(".gguf")


def load_study(name_or_path: str) -> StudySpec:
    data = load_yaml(study_path(name_or_path))
    for arm in data.get("arms", []):  # `init: {from: ...}` reads better in YAML
        if isinstance(arm, dict) and isinstance(arm.get("init"), dict) and "from" in arm["init"]:
            arm["init"]["source"] = arm["init"].pop("from")
    return from_dict(StudySpec, data, "study")


# -- running ----------------------------------------------------------------------------------------


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} × {torch.cuda.get_device_name()}"
    import platform

    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def _converted_init(arm: ArmSpec, parent_dir: Path, folder: Path, data_path: str | None = None):
    """Convert the parent arm's final weights (or a pretrained model's); return (run
    config, init checkpoint path). ``data_path``: the arm's data (calibration of the
    activation pruning criterion), default the source's."""
    from finemoe.checkpoint import CheckpointError, load_checkpoint, load_model
    from finemoe.convert import calibration_batches, convert_model, needs_calibration, train_settings_after
    from finemoe.data import TokenShards, embedded_shards
    from finemoe.model import Transformer
    from finemoe.run_config import RunConfig

    tokenizer_json = None
    if is_model_path(arm.init.source):  # a pretrained model: a run folder, checkpoint, HF folder or .gguf
        if not Path(arm.init.source).exists():
            raise ConfigError(f"arms.{arm.name}.init.from", f"{arm.init.source}: no such model (import one with "
                                                            "`finemoe import SOURCE -o RUN`)")
        model, run_config, tokenizer = load_model(arm.init.source)
        model_cfg, sd = run_config.model, model.state_dict()
        del model
        tokenizer_json = tokenizer.to_str() if tokenizer is not None else None
    else:
        try:
            state = load_checkpoint(parent_dir)
        except CheckpointError:
            raise ConfigError(
                f"arms.{arm.name}.init.from",
                f"arm {spec_source(arm)!r} finished but its checkpoint is gone (results keep no checkpoints); "
                f"delete {parent_dir / 'summary.json'} to train it again",
            ) from None
        run_config = from_dict(RunConfig, state["config"])
        model_cfg, sd = run_config.model, state["model"]
    spec = arm.init
    if spec.convert != "none":
        # on the GPU where there is one: calibration (activation pruning, SparseGPT) runs
        # forward passes and, for SparseGPT, a Cholesky factorisation per FFN matrix
        model = Transformer(model_cfg).to("cuda" if torch.cuda.is_available() else "cpu")
        model.load_state_dict(sd)
        batches = ()
        if needs_calibration(spec.convert, spec.criterion):
            shards = TokenShards(data_path or run_config.data.path or embedded_shards())
            batches = calibration_batches(shards, spec.calibration_tokens, min(512, run_config.model.max_seq_len))
        try:
            model_cfg, sd = convert_model(model, model_cfg, spec.convert, num_experts=spec.num_experts, top_k=spec.top_k,
                                          keep_fraction=spec.keep_fraction, threshold=spec.threshold,
                                          straight_through=spec.straight_through,
                                          sparsity_loss_coef=spec.sparsity_loss_coef, criterion=spec.criterion,
                                          calibration=batches, num_sublayers=spec.num_sublayers, seed=0)
        except ConfigError as err:
            raise err.under(f"arms.{arm.name}.init") from None
    sd = {k: v.detach().cpu() for k, v in sd.items()}
    run_config = dataclasses.replace(run_config, model=model_cfg,
                                     train=dataclasses.replace(run_config.train, **train_settings_after(spec.convert)))
    folder.mkdir(parents=True, exist_ok=True)
    init_path = folder / "init.pt"
    torch.save({"model": sd, "config": {"model": to_dict(model_cfg)}, "step": 0, "tokenizer_json": tokenizer_json},
               init_path)
    return run_config, init_path


def spec_source(arm: ArmSpec) -> str:
    return arm.init.source if arm.init else ""


def _arm_config(study: StudySpec, arm: ArmSpec, folder: Path, seed: int, study_dir: Path, extra: list[str]):
    from finemoe.config import apply_overrides
    from finemoe.run_config import RunConfig, load_preset_data

    common = list(study.common) + list(extra)
    if arm.init is None:
        data = load_preset_data(arm.preset)
    else:
        parent = Path(arm.init.source) if is_model_path(arm.init.source) else study_dir / arm.init.source
        data_path = next((o.split("=", 1)[1] for o in reversed(common + list(arm.overrides))
                          if o.startswith("data.path=")), None)
        run_config, init_path = _converted_init(arm, parent, folder, data_path)
        data = to_dict(run_config)
        data["train"]["init_from"] = str(init_path)
        # the continuation draws batches of its own, not the source arm's first steps
        seed += 1000
    apply_overrides(data, common + list(arm.overrides) + [f"train.out_dir={folder}", f"seed={seed}"])
    cfg = from_dict(RunConfig, data)
    if study.flop_budget:
        # isoFLOP: every arm spends the same training FLOPs (3 × forward), so cheaper
        # models see more tokens
        seq = cfg.train.seq_len or cfg.model.max_seq_len
        tokens_per_step = cfg.train.batch_size * seq * cfg.train.grad_accum
        steps = max(1, round(study.flop_budget / (3 * cfg.model.flops_per_token(seq) * tokens_per_step)))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps - 1)))
    return cfg


def run_study(name: str, out_dir: str | Path, *, extra: list[str] | None = None, only: list[str] | None = None,
              evals_dir: str | None = None, progress: bool = True) -> dict:
    """Run (or resume) a study; returns the table."""
    from finemoe.environment import git_commit
    from finemoe.train import Trainer

    study = load_study(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(arm, study.seed, arm.name) for arm in study.arms]
    by_name = {a.name: a for a in study.arms}
    for seed in study.repeat.seeds:
        runs += [(by_name[n], seed, f"{n}.seed{seed}") for n in study.repeat.arms]
    for arm, seed, run_name in runs:
        if only and arm.name not in only:
            continue
        folder = out / run_name
        if (folder / "summary.json").is_file():
            print(f"[study {study.name}] {run_name}: done, skipped", file=sys.stderr)
            continue
        print(f"[study {study.name}] {run_name}: training", file=sys.stderr)
        cfg = _arm_config(study, arm, folder, seed, out, extra or [])
        started = time.time()
        # an arm stopped part-way (a time limit) continues from its last checkpoint
        trainer = Trainer(cfg, resume=True, progress=progress)
        resumed_at = trainer.step
        summary = trainer.fit()
        trainer.close()
        record = {
            "arm": arm.name, "seed": seed,
            "command": f"finemoe study {name} --out {out_dir}" + (" " + " ".join(extra) if extra else ""),
            "hardware": _hardware(), "git_commit": git_commit(), "wall_seconds": round(time.time() - started, 1),
            "tokens": summary["step"] * cfg.train.batch_size * (cfg.train.seq_len or cfg.model.max_seq_len)
            * cfg.train.grad_accum,
            "data": {k: v for k, v in trainer.data.describe().items() if k != "sources"},
        }
        if resumed_at:
            record["resumed_at_step"] = resumed_at  # wall_seconds covers the steps after it only
        (folder / "run.json").write_text(json.dumps(record, indent=2))
        _run_analyses(arm, folder, evals_dir, progress)
    table = write_table(study, out)
    write_figures(study, out, table)
    return table


def _run_analyses(arm: ArmSpec, folder: Path, evals_dir: str | None, progress: bool) -> None:
    if not arm.analyses:
        return
    from finemoe.analysis import DSMOE_SOURCES, analyze_checkpoint

    result = analyze_checkpoint(folder, batches=20, sources=DSMOE_SOURCES if "dsmoe_sources" in arm.analyses else (),
                                evals_dir=evals_dir, limit=300,
                                device="cuda" if torch.cuda.is_available() else "cpu", progress=progress)
    (folder / "analysis.json").write_text(json.dumps(result, indent=1))


def write_table(study: StudySpec, out: Path) -> dict:
    """``table.md`` and ``table.json`` of every finished run, and the study's verdicts."""
    from finemoe.config import from_dict as _from_dict
    from finemoe.run_config import RunConfig

    rows = []
    for folder in sorted(p for p in out.iterdir() if (p / "summary.json").is_file()):
        summary = json.loads((folder / "summary.json").read_text())
        record = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
        import yaml

        cfg = _from_dict(RunConfig, yaml.safe_load((folder / "config.yaml").read_text()))
        analysis = json.loads((folder / "analysis.json").read_text()) if (folder / "analysis.json").is_file() else {}
        active = analysis.get("compute", {}).get("active_params_per_token", cfg.model.num_active_params())
        active -= summary.get("weights_kept_zero", 0)  # pruned weights held at zero (SparseGPT) are not active
        row = {
            "run": folder.name, "arm": record.get("arm", folder.name), "seed": record.get("seed"),
            "params": cfg.model.num_params(), "active_params": active,
            "flops_per_token": analysis.get("compute", {}).get("forward_flops_per_token", cfg.model.flops_per_token()),
            "tokens": record.get("tokens"), "val_perplexity": summary["final_val"]["perplexity"],
            "val_loss": summary["final_val"]["loss"], "wall_seconds": record.get("wall_seconds"),
            "git_commit": record.get("git_commit"), "hardware": record.get("hardware"),
            "data_fingerprint": record.get("data", {}).get("fingerprint"),
        }
        rob = analysis.get("robustness", {})
        if rob.get("routed_layers"):
            row["perplexity_top1_disabled"] = rob["perplexity_top1_disabled"]
        rows.append(row)
    verdicts = _verdicts(study, rows)
    table = {"study": study.name, "claim": study.claim, "rows": rows, "verdicts": verdicts}
    (out / "table.json").write_text(json.dumps(table, indent=2))
    lines = [f"# Study `{study.name}`", "", study.claim, "",
             "| run | params | active params | fwd FLOPs/token | tokens | val ppl | ppl, top-1 disabled | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        top1 = f"{r['perplexity_top1_disabled']:.2f}" if "perplexity_top1_disabled" in r else ""
        lines.append(f"| {r['run']} | {r['params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | "
                     f"{r['flops_per_token'] / 1e6:.1f}M | {(r['tokens'] or 0) / 1e6:.1f}M | {r['val_perplexity']:.2f} | "
                     f"{top1} | {r['wall_seconds']} |")
    lines += ["", *[f"- {v}" for v in verdicts]]
    hardware = {r["hardware"] for r in rows if r.get("hardware")}
    commits = {r["git_commit"] for r in rows if r.get("git_commit")}
    corpora = {r["data_fingerprint"][:16] for r in rows if r.get("data_fingerprint")}
    lines += ["", f"Hardware: {', '.join(sorted(hardware)) or 'unknown'}. Commits: {', '.join(sorted(commits)) or 'unknown'}."
              + (f" Data fingerprint{'s' if len(corpora) > 1 else ''}: {', '.join(sorted(corpora))}." if corpora else "")]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return table


def _perplexities_by_arm(rows: list[dict]) -> dict[str, list[float]]:
    by_arm: dict[str, list[float]] = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append(r["val_perplexity"])
    return by_arm


def write_figures(study: StudySpec, out: Path, table: dict) -> list[Path]:
    """The study's figures, from its finished runs alone (so they can be redrawn at any
    time with ``finemoe study NAME --report``): loss curves and perplexity per arm
    always; perplexity against activated parameters when arms differ in it; and the
    analyses the arms asked for (robustness, NSAR, PEER/PKM usage, DSMoE heat maps)."""
    from finemoe.analysis import figures
    from finemoe.plots import plot_loss_curves

    rows = list(table["rows"])
    if not rows:
        return []
    arm_order = [a.name for a in study.arms]
    rows.sort(key=lambda r: (arm_order.index(r["arm"]) if r["arm"] in arm_order else len(arm_order), r["run"]))
    first_seed = [r for r in rows if r["seed"] in (None, study.seed)]
    analyses = {r["run"]: json.loads((out / r["run"] / "analysis.json").read_text())
                for r in rows if (out / r["run"] / "analysis.json").is_file()}
    asked = {a.name: set(a.analyses) for a in study.arms}

    def wanted(rows_: list[dict], analysis: str) -> dict[str, dict]:
        """The analyses of these runs whose arm asked for ``analysis``, by run name."""
        return {r["run"]: analyses[r["run"]] for r in rows_ if r["run"] in analyses and analysis in asked.get(r["arm"], ())}

    written = [plot_loss_curves([out / r["run"] for r in first_seed], out / "loss_curves.png",
                                labels=[r["arm"] for r in first_seed], title=f"study {study.name}: loss (seed {study.seed})")]
    written.append(figures.plot_perplexity_by_arm(rows, out / "perplexity.png", title=f"study {study.name}"))
    actives = [r["active_params"] for r in rows]
    if max(actives) > 1.05 * min(actives):
        written.append(figures.plot_perplexity_vs_active(rows, out / "ppl_vs_active.png"))
    written.append(figures.plot_robustness(wanted(rows, "robustness"), out / "robustness.png"))
    written.append(figures.plot_product_key_usage(wanted(first_seed, "usage"), out / "product_key_usage.png"))
    nsar = {r["arm"]: analyses[r["run"]] for r in first_seed if r["run"] in wanted(first_seed, "nsar")}
    if nsar:
        written.append(figures.plot_nsar(nsar, out / "nsar.png", per_layer=len(nsar) <= 2))
        # the references of the study's claims against the best of the other arms, layer by layer
        references = [a for e in study.expect for a in e.than if a in nsar]
        mean_ppl = {arm: float(np.mean(v)) for arm, v in _perplexities_by_arm(rows).items()}
        others = [a for a in nsar if a not in references]
        if references and others and len(nsar) > 2:
            best = min(others, key=mean_ppl.get)
            pair = {f"{a} (ppl {mean_ppl[a]:.2f})": nsar[a] for a in (references[0], best)}
            written.append(figures.plot_nsar(pair, out / "nsar_reference_vs_best.png"))
    for r in first_seed:
        if analyses.get(r["run"], {}).get("active_share_by_source"):
            written.append(figures.plot_dsmoe_sources(analyses[r["run"]], out / f"dsmoe_sources_{r['run']}.png",
                                                      f"{r['run']}: share of active experts per layer and source"))
    return [p for p in written if p]


def _verdicts(study: StudySpec, rows: list[dict]) -> list[str]:
    """One sentence per expected ordering, on each arm's perplexity averaged over its
    seeds, with the largest seed-to-seed spread of a repeated arm as the noise."""
    by_arm = _perplexities_by_arm(rows)
    ppl = {arm: sum(v) / len(v) for arm, v in by_arm.items()}
    noise = [max(v) - min(v) for arm, v in by_arm.items() if len(v) > 1]
    spread = max(noise) if noise else None
    out = []
    for e in study.expect:
        if e.better not in ppl or any(t not in ppl for t in e.than):
            continue
        for other in e.than:
            gap = ppl[other] - ppl[e.better]
            held = gap > 0
            seeds = f" (means over {len(by_arm[e.better])} and {len(by_arm[other])} seeds)"
            size = f"{abs(gap):.2f} perplexity ({abs(gap) / ppl[other]:.1%}){seeds}"
            noise_txt = f"; seed-to-seed spread {spread:.2f}" if spread is not None else "; noise not yet measured"
            beyond = "" if spread is None else (" — beyond the noise" if abs(gap) > spread else " — within the noise")
            out.append(f"{e.better} vs {other}: the paper's direction {'held' if held else 'did not hold'} by {size}"
                       f"{noise_txt}{beyond}.")
    return out

