"""The whole pipeline, shared by `draftopd demo` and the headline benchmark (10 min 30 s on 2 cores for the embedded part,
measured 2026-12-01 on an AMD EPYC; the synthetic part is not timed yet at its full size: its start SFT is 800 steps of
the synthetic study's 4,000, and its target is built once, about 6 minutes, on first use).

start drafter (the bundled SFT drafter for the embedded target, or an SFT warm start built here on the demo's
own regenerated answers) -> from that start, equal compute of (a) continued SFT on the target's answers to fresh
prompts and (b) Draft-OPD rolling out on the same prompts -> evaluate the rows side by side (tau and speedup) ->
plot held-out tau against compute -> optional ablation rows (Draft-OPD variants from the same start, same steps).
Then the same side by side on the synthetic target (`run_synthetic`, `--no-synthetic` to skip it), where a drafter
gets strong (tau 4-5) in minutes, so Draft-OPD can be seen where its premise holds.

Choices: Draft-OPD runs with the `draftopd opd` defaults, i.e. the authors' recipe (single-token estimators with
their clamps, pooled aggregation, lr 3e-4 cosine), at demo size; its prompts lie past the first 12,000 ShareGPT
train prompts, so neither the bundled drafter (trained on answers to the first 1,920) nor its data has seen
them. The tau-vs-compute curve is greedy replay (`eval/replay.py`) on 30 held-out ShareGPT prompts: exact greedy
tau, cheap enough to measure at every curve point.

Every training stage caches its output under `out_dir`, so a second run only redoes what is missing; the
evaluations are measured again on every run, since speed ratios must come from one run on one machine. A
killed run resumes each stage exactly from its last checkpoint; curves.json is written after every curve point
(points past the checkpoint are not measured twice, resumed training reproduces the same weights).
Compute matching: Draft-OPD runs first; continued SFT then stops at the same `compute/flops` (counted the
same way for both: target forwards at 2*params per token, drafter training at 6*params per token).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .config import (
    BUNDLED_DRAFTERS,
    DEFAULT_TARGET,
    DTYPES,
    DecodeConfig,
    DrafterConfig,
    EvalConfig,
    OptimConfig,
    SFTConfig,
    check_choice,
    check_device,
    resolve_device,
    resolve_dtype,
)
from .data.prompts import load_prompts, render_prompt
from .data.regenerate import load_regenerated, regenerate
from .decode.speculative import autoregressive_generate
from .eval.evaluate import evaluate
from .eval.replay import replay_scored, score_texts
from .models.drafter import Drafter, load_drafter, new_drafter, save_drafter
from .models.load import load_target
from .study import Scorer, StudyConfig, StudyData, cached_json, compare, make_data
from .train.common import param_counts
from .train.opd import OPDConfig, train_opd
from .train.sft import train_sft
from .train.tracking import RunInfo, write_run_files

ABLATIONS = {
    "full": {},
    "no-decay": {"gamma": 1.0},
    "reverse-both": {"acc_direction": "reverse"},
    "forward-both": {"rej_direction": "forward"},
    "random-anchors": {"anchors": "random"},
    "no-rejected": {"use_rejected": False},
    "estimate-kl": {"mode": "estimate"},
    "first-rejected": {"rej_slots": "first"},
    "wrong-rejected": {"rej_slots": "wrong"},
}


@dataclass(frozen=True)
class ExperimentConfig:
    target: str = field(default=DEFAULT_TARGET, metadata={"help": "embedded name, local HF folder or hub id"})
    out_dir: str = field(
        default="runs/demo", metadata={"help": "folder of every stage's output (a second run redoes only what is missing)"}
    )
    start: str | None = field(
        default="bundled",
        metadata={"help": "start drafter: 'bundled' (the one shipped for the target; others build one), a drafter folder, or none (build)"},
    )
    train_prompts: int = 64
    prompt_offset: int = 12000  # skip the ShareGPT train prompts the bundled drafter's data came from
    regen_max_new_tokens: int = 96
    regen_batch: int = 8
    drafter: DrafterConfig = field(default_factory=lambda: DrafterConfig(num_layers=1, block_size=8))  # built starts only
    sft: SFTConfig = field(
        default_factory=lambda: SFTConfig(steps=60, batch_size=4, anchors_per_seq=16, save_every=20, optim=OptimConfig(lr=1e-3))
    )
    # the authors' recipe (the `draftopd opd` defaults: estimator losses, pooled, lr 3e-4 cosine) at demo size
    opd: OPDConfig = field(
        default_factory=lambda: OPDConfig(
            steps=6,
            prompts_per_rollout=8,
            rollouts_per_step=1,
            replay_batch=8,
            rollout=DecodeConfig(max_new_tokens=96),
            save_every=2,
            optim=OptimConfig(lr=3e-4, min_warmup_steps=1),
        )
    )
    # the data-matched control: soft labels on the target's answers to the rollout prompts; steps planned from compute
    continued_sft: SFTConfig = field(
        default_factory=lambda: SFTConfig(
            batch_size=8, anchors_per_seq=64, loss="kl", labels="text", optim=OptimConfig(lr=3e-4, min_warmup_steps=1)
        )
    )
    curve_prompts: int = 30  # held-out ShareGPT prompts for the tau-vs-compute curve (greedy replay)
    curve_every: int = 2
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(num_prompts=4, decode=DecodeConfig(max_new_tokens=48)))
    ablations: tuple[str, ...] = field(default=(), metadata={"help": f"Draft-OPD variants to add as rows: {', '.join(ABLATIONS)}"})
    ablation_steps: int | None = None  # Draft-OPD steps of each ablation row (None = opd.steps)
    device: str = field(
        default="auto",
        metadata={
            "help": "where every stage runs: cpu, cuda, cuda:N; auto = cuda when available (not part of what makes a run the same run)"
        },
    )
    dtype: str = field(
        default="float32", metadata={"help": "the target's dtype in every stage (the demo's numbers are float32)", "choices": DTYPES}
    )
    synthetic: bool = field(
        default=True,
        metadata={
            "help": "also run the side by side on the synthetic target, where a drafter gets strong in minutes (SyntheticDemoConfig; "
            "its target is built once, about 6 min on 2 cores, and cached)"
        },
    )

    def __post_init__(self) -> None:
        check_device(self)
        check_choice(self, "dtype")


def run_experiment(cfg: ExperimentConfig, progress: bool = True, run: RunInfo | None = None) -> dict:
    """Every stage (module docstring); `run` (the command's record and tracker, `train/tracking.py`) writes run.yaml,
    command.txt and env.json into `out_dir` and beside each training stage's checkpoints, which report to its tracker."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_same_config(out, cfg)
    device = resolve_device(cfg.device)
    if run is not None:
        write_run_files(out, run, device, cfg.dtype)
    target = load_target(cfg.target, dtype=resolve_dtype(cfg.dtype, device), device=device)
    # 1. data: the target answers fresh training prompts
    pool = load_prompts("sharegpt", split="train", limit=cfg.prompt_offset + cfg.train_prompts, seed=cfg.sft.seed).prompts
    regenerate(
        target,
        pool[cfg.prompt_offset :],
        out / "regenerated.jsonl",
        DecodeConfig(max_new_tokens=cfg.regen_max_new_tokens),
        batch_size=cfg.regen_batch,
        progress=progress,
    )
    examples = load_regenerated(out / "regenerated.jsonl").examples
    rollout_prompts = [list(e.prompt_ids) for e in examples]
    # 2. the start: a bundled drafter, or an SFT warm start on these answers
    rows, start = start_drafter(target, cfg, examples, out, progress, run)
    curve_tau = replay_curve(target, start, cfg)
    # 3. equal compute: Draft-OPD first, continued SFT stops at the same FLOPs
    curves = _load(out / "curves.json") or {"opd": [], "sft_continued": []}
    save_curves = lambda: _save_json(out / "curves.json", curves)  # noqa: E731
    opd, opd_flops = _run_opd(
        target, start, rollout_prompts, cfg.opd, out / "opd", curves["opd"], curve_tau, cfg.curve_every, progress, save_curves, run
    )
    sft_cont = _run_continued_sft(
        target, start, examples, cfg, opd_flops, out, curves["sft_continued"], curve_tau, progress, save_curves, run
    )
    first = {"flops": 0.0, "tau": curve_tau(start)}  # compute is counted from the start drafter
    curves = {
        "opd": [first] + [c for c in curves["opd"] if c["flops"] > 0],
        "sft_continued": [first] + [c for c in curves["sft_continued"] if c["flops"] > 0],
    }
    _save_json(out / "curves.json", curves)
    # 4. evaluate the drafters side by side
    results = {}
    for name, drafter in (*rows, ("sft_continued", sft_cont), ("draft_opd", opd)):
        report = evaluate(target, drafter, cfg.eval, progress=progress)
        report.save(out / f"eval_{name}.json")
        results[name] = {
            "tau": report.row("all").tau,
            "speedup": report.row("all").speedup,
            "per_set": {r.name: {"tau": r.tau, "speedup": r.speedup} for r in report.rows},
        }
    # 5. ablations: Draft-OPD variants from the same start, same steps
    ablations = {}
    for name in (("full",) + tuple(a for a in cfg.ablations if a != "full")) if cfg.ablations else ():
        variant = replace(_ablation_config(cfg.opd, name), steps=cfg.ablation_steps or cfg.opd.steps)
        drafter, _ = _run_opd(target, start, rollout_prompts, variant, out / f"ablation_{name}", [], None, 0, progress, run=run)
        ablations[name] = {"curve_tau": curve_tau(drafter)}
    summary = {
        "config": _jsonable(asdict(cfg)),
        "results": results,
        "curves": curves,
        "ablations": ablations,
        "plot": str(plot_curves(curves, out / "tau_vs_compute.png")),
    }
    if cfg.synthetic:
        summary["synthetic"] = run_synthetic(SyntheticDemoConfig(), out / "synthetic", progress, run)
    _save_json(out / "summary.json", summary)
    return summary


def check_same_config(out: Path, cfg: ExperimentConfig) -> None:
    """Cached stages are only reused by the configuration that wrote them: record it, refuse another one (for
    example a folder written by an earlier version of the demo) before anything runs. Fields added since a folder's
    record was written count at their defaults; the device is not recorded (a run may continue on another one)."""
    want, path = _jsonable(asdict(cfg)), out / "experiment.json"
    del want["device"]
    have = _load(path)
    if have is None:
        if any(out.iterdir()):
            raise ValueError(f"--out {out} holds files of another run (no experiment.json): give a new folder")
        _save_json(path, want)
        return
    have = {**{k: v for k, v in _jsonable(asdict(ExperimentConfig())).items() if k != "device"}, **have}
    if have != want:
        changed = sorted(k for k in want if have.get(k) != want[k])
        raise ValueError(f"--out {out} holds a run of another configuration (differs in {', '.join(changed)}): give a new folder")


def start_drafter(
    target, cfg: ExperimentConfig, examples, out: Path, progress: bool, run: RunInfo | None = None
) -> tuple[list[tuple[str, Drafter]], Drafter]:
    """(rows to evaluate before the two arms, the start drafter). A bundled or given drafter is the "start" row;
    a built one adds the untrained drafter and its SFT warm start ("sft") on the demo's answers."""
    folder = BUNDLED_DRAFTERS.get(cfg.target) if cfg.start == "bundled" else cfg.start
    if folder is not None:
        return [("start", (d := load_drafter(folder, target)))], d
    untrained = new_drafter(target, cfg.drafter, seed=cfg.sft.seed)
    sft = copy.deepcopy(untrained)
    train_sft(target, sft, examples, cfg.sft, out / "sft", resume=True, progress=progress, run=run)
    return [("untrained", untrained), ("sft", sft)], sft


def replay_curve(target, drafter: Drafter, cfg: ExperimentConfig):
    """Held-out greedy tau by replay on `curve_prompts` held-out ShareGPT prompts (their greedy text computed once)."""
    prompts = [render_prompt(p, target.tokenizer) for p in load_prompts("sharegpt", split="heldout", limit=cfg.curve_prompts).prompts]
    outputs = [t.output for t in autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=cfg.regen_max_new_tokens)).traces]
    scored = score_texts(target, drafter.spec.target_layer_ids, prompts, outputs)
    return lambda d: replay_scored(d, scored).tau


def _run_opd(
    target,
    start: Drafter,
    prompts,
    cfg: OPDConfig,
    out: Path,
    curve: list,
    curve_tau,
    every: int,
    progress: bool,
    save_curve=None,
    run: RunInfo | None = None,
):
    drafter = copy.deepcopy(start)
    flops = {"v": 0.0}

    def on_step(step, d, compute):
        flops["v"] = compute.flops
        if curve_tau is not None and (step % every == 0 or step == cfg.steps) and not any(c["step"] == step for c in curve):
            curve.append({"step": step, "flops": compute.flops, "tau": curve_tau(d)})
            save_curve()

    train_opd(target, drafter, prompts, cfg, out, resume=True, progress=progress, on_step=on_step, run=run)
    return drafter, flops["v"] or _last_flops(out)


def _run_continued_sft(
    target,
    start: Drafter,
    examples,
    cfg: ExperimentConfig,
    max_flops: float,
    out: Path,
    curve: list,
    curve_tau,
    progress: bool,
    save_curve,
    run: RunInfo | None = None,
):
    sft_cfg = replace(cfg.continued_sft, seed=cfg.continued_sft.seed + 1)
    return matched_sft(
        target,
        start,
        examples,
        sft_cfg,
        max_flops,
        out / "sft_continued",
        curve,
        curve_tau,
        cfg.opd.steps // cfg.curve_every,
        progress,
        save_curve,
        run,
    )


def matched_sft(
    target,
    start: Drafter,
    examples,
    sft_cfg: SFTConfig,
    max_flops: float,
    out: Path,
    curve: list,
    curve_tau,
    points: int,
    progress: bool,
    save_curve,
    run: RunInfo | None = None,
):
    """SFT of a copy of `start` that stops at `max_flops` (its steps planned from the compute of a step, the cosine
    spanning the budget), with about `points` curve points."""
    steps = max(1, math.ceil(1.05 * max_flops / sft_step_flops(target, start, examples, sft_cfg)))  # the cosine spans the budget
    sft_cfg = replace(sft_cfg, steps=steps, max_flops=max_flops, save_every=max(1, steps // 3))
    drafter = copy.deepcopy(start)
    every = max(1, steps // max(1, points))

    def on_step(step, d, compute):
        done = compute.flops >= max_flops or step == steps
        if (step % every == 0 or done) and not any(c["step"] == step for c in curve):
            curve.append({"step": step, "flops": compute.flops, "tau": curve_tau(d)})
            save_curve()

    train_sft(target, drafter, examples, sft_cfg, out, resume=True, progress=progress, on_step=on_step, run=run)
    return drafter


def sft_step_flops(target, drafter: Drafter, examples, cfg: SFTConfig) -> float:
    """Expected compute of one SFT step as the trainer counts it: per sequence of the batch, the target over the
    whole text and the drafter over a block at each anchor (at most one per response token). A planning figure:
    the run plans 5% more steps and stops at max_flops."""
    target_params, draft_params = param_counts(target, drafter)
    n = max(len(examples), 1)
    text = sum(len(e.prompt_ids) + len(e.response_ids) for e in examples) / n
    anchors = sum(min(cfg.anchors_per_seq, len(e.response_ids)) for e in examples) / n
    per_seq = 2.0 * target_params * text + 6.0 * draft_params * anchors * drafter.block_size
    return cfg.batch_size * cfg.grad_accum * per_seq


@dataclass(frozen=True)
class SyntheticDemoConfig:
    """The demo's synthetic-target part: the study's data and drafter at demo size (`study.StudyConfig` fields), a start
    drafter trained by SFT from scratch for `study.start_sft.steps`, then from it Draft-OPD with the authors' recipe for
    `study.opd_updates` updates of 64 rollouts and, at the same compute, continued SFT with soft labels on the target's
    greedy answers to the same rollout prompts (the study's sft-greedy-kl arm); scored by greedy replay on the study's
    held-out eval prompts (one seed: the interval covers prompts only; experiments/synthetic-opd has the seeds)."""

    study: StudyConfig = field(
        default_factory=lambda: StudyConfig(
            start_prompts=1000,
            rollout_prompts=1280,
            eval_prompts=150,
            tuning_prompts=1,
            opd_updates=20,
            start_sft=SFTConfig(steps=800, batch_size=16, anchors_per_seq=32, save_every=200, optim=OptimConfig(lr=2e-3)),
        )
    )
    curve_every: int = 5  # Draft-OPD updates between curve points


def run_synthetic(cfg: SyntheticDemoConfig, out: Path, progress: bool = True, run: RunInfo | None = None) -> dict:
    """The side by side on the synthetic target (`SyntheticDemoConfig`); cached under `out` like the rest of the demo."""
    out.mkdir(parents=True, exist_ok=True)
    sc = cfg.study
    target = load_target(sc.target)
    data = cached_json(out / "data.json", lambda: make_data(target, sc, progress), StudyData)
    layers = new_drafter(target, sc.drafter).spec.target_layer_ids
    score = Scorer(target, data.eval_prompts, data.eval_outputs, layers)
    if not (out / "start" / "config.json").exists():
        drafter = new_drafter(target, sc.drafter, seed=0)
        train_sft(target, drafter, data.start, sc.start_sft, out / "start_run", resume=True, progress=progress, run=run)
        save_drafter(drafter, out / "start", {"step": sc.start_sft.steps})
    start = load_drafter(out / "start", target).float()
    curves = _load(out / "curves.json") or {"opd": [], "sft_continued": []}
    save_curves = lambda: _save_json(out / "curves.json", curves)  # noqa: E731
    curve_tau = lambda d: score(d).tau  # noqa: E731
    opd_cfg = replace(sc.opd, steps=sc.opd_updates, save_every=cfg.curve_every)
    opd, opd_flops = _run_opd(
        target, start, data.rollout_prompts, opd_cfg, out / "opd", curves["opd"], curve_tau, cfg.curve_every, progress, save_curves, run
    )
    sft_cfg = replace(sc.arm_sft, loss="kl", labels="text", autocast="float32")
    sft = matched_sft(
        target,
        start,
        data.greedy,
        sft_cfg,
        opd_flops,
        out / "sft_continued",
        curves["sft_continued"],
        curve_tau,
        sc.opd_updates // cfg.curve_every,
        progress,
        save_curves,
        run,
    )
    scores = {name: score(d) for name, d in (("start", start), ("sft_continued", sft), ("draft_opd", opd))}
    first = {"flops": 0.0, "tau": scores["start"].tau}
    curves = {k: [first] + [c for c in v if c["flops"] > 0] for k, v in curves.items()}
    ratio = compare("sft_continued", [scores["sft_continued"]], "draft_opd", [scores["draft_opd"]], sc.resamples)
    summary = {
        "tau": {k: v.tau for k, v in scores.items()},
        "opd_over_sft": {"ratio": ratio.ratio, "ci": list(ratio.ci)},
        "tflops": opd_flops / 1e12,
        "eval_prompts": len(data.eval_prompts),
        "curves": curves,
        "plot": str(plot_curves(curves, out / "tau_vs_compute.png", "synthetic target")),
    }
    _save_json(out / "summary.json", summary)
    return summary


def _ablation_config(opd: OPDConfig, name: str) -> OPDConfig:
    change = dict(ABLATIONS[name])
    anchors = change.pop("anchors", opd.anchors)
    return replace(opd, anchors=anchors, loss=replace(opd.loss, **change))


def _last_flops(run_dir: Path) -> float:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return json.loads(lines[-1])["compute/flops"] if lines else 0.0


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _save_json(path: Path, obj) -> None:
    """Through a temp file and a rename: a kill never leaves half a JSON file for the next run to choke on."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def plot_curves(curves: dict, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, label in (("sft_continued", "continued SFT"), ("opd", "Draft-OPD")):
        pts = sorted(curves[name], key=lambda c: c["flops"])
        ax.plot([c["flops"] / 1e12 for c in pts], [c["tau"] for c in pts], marker="o", label=label)
    ax.set_xlabel("compute after the start drafter (TFLOPs)")
    ax.set_ylabel("held-out greedy tau (replay)")
    ax.set_title("Held-out acceptance vs compute" + (f": {title}" if title else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_results(summary: dict) -> str:
    rows = ["| drafter | tau | speedup |", "|---|---|---|"]
    for name, r in summary["results"].items():
        rows.append(f"| {name} | {r['tau']:.2f} | {r['speedup']:.2f}x |")
    if summary["ablations"]:
        rows += ["", "| Draft-OPD variant | held-out tau (curve set) |", "|---|---|"]
        rows += [f"| {k} | {v['curve_tau']:.2f} |" for k, v in summary["ablations"].items()]
    rows.append(f"\nplot: {summary['plot']}")
    if "synthetic" in summary:
        syn = summary["synthetic"]
        lo, hi = syn["opd_over_sft"]["ci"]
        rows += [
            "",
            f"Synthetic target (greedy replay on {syn['eval_prompts']} held-out prompts, {syn['tflops']:.2f} TFLOPs a drafter):",
            "| drafter | tau |",
            "|---|---|",
        ]
        rows += [f"| {name} | {tau:.2f} |" for name, tau in syn["tau"].items()]
        rows += [
            f"Draft-OPD / continued SFT: {syn['opd_over_sft']['ratio']:.3f} [{lo:.3f}, {hi:.3f}] (one seed; interval over prompts)",
            f"plot: {syn['plot']}",
        ]
    return "\n".join(rows)
