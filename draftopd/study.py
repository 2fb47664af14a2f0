"""Training arms from one start drafter, with seeds, at matched budgets: how Draft-OPD is compared with SFT.

An *arm* is a way to go on training a start checkpoint: continued SFT on the start's own data; SFT on the target's
greedy answers to the rollout prompts, hard (cross-entropy) or soft (KL to the target's distribution); Draft-OPD with
the authors' recipe (`draftopd opd`'s defaults), one of its ablations, or a switch of this project (`ARMS`). Every arm runs with each of
`seeds`, to one of two budgets (`StudyConfig.budget`):
- `flops`: the same compute for every arm, counted as the trainers count it (`train/common.Compute`: target
  forwards 2 x params a token, drafter training 6 x its params a token, Draft-OPD's rollouts included); the budget
  is what the Draft-OPD recipe spends in `opd_updates` updates, so SFT arms get many more, cheaper updates;
- `updates`: the same number of optimizer updates (`opd_updates`) for every arm.
Draft-OPD arms are the same runs under both budgets. Every trained drafter is scored by greedy replay
(`eval/replay.py`, exactly the tau speculative decoding would reach) on held-out prompts with per-prompt counts.

Comparisons (`compare`) are ratios of tau between two arms with a hierarchical percentile bootstrap: each resample
draws each arm's seeds with replacement, then the prompts with replacement (the same prompts for both arms), and
computes the ratio of the pooled taus; the interval so covers seed-to-seed and prompt-to-prompt variation together.

`run_study` caches every stage under `out` (data, start checkpoints, each arm's run and its scores), so a second run
only does what is missing; every file names the target it was made with, and a study folder of another target is
refused with one line.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from .config import ConfigError, DecodeConfig, DrafterConfig, OptimConfig, SFTConfig, check_ints
from .data.regenerate import SFTExample
from .decode.speculative import autoregressive_generate
from .eval.replay import ReplayedTau, replay_scored, score_texts
from .models.drafter import Drafter, load_drafter, new_drafter, save_drafter
from .models.target import Target
from .train.common import param_counts
from .train.opd import OPDConfig, train_opd
from .train.sft import train_sft


@dataclass(frozen=True)
class Arm:
    """A training method: `kind` sft (on the start's data, `data="start"`, or the target's greedy answers to the rollout
    prompts, `data="greedy"`, with `loss` ce or kl) or opd (`anchors` and `loss_changes` to the authors' recipe)."""

    kind: str
    data: str = "start"
    loss: str = "ce"
    anchors: str = "error"
    loss_changes: tuple[tuple[str, object], ...] = ()


ARMS: dict[str, Arm] = {
    "sft-continued": Arm("sft", "start", "ce"),
    "sft-greedy-ce": Arm("sft", "greedy", "ce"),
    "sft-greedy-kl": Arm("sft", "greedy", "kl"),
    "opd": Arm("opd"),
    "opd-no-rejected": Arm("opd", loss_changes=(("use_rejected", False),)),
    "opd-first-rejected": Arm("opd", loss_changes=(("rej_slots", "first"),)),
    "opd-random-anchors": Arm("opd", anchors="random"),
    "opd-forward-only": Arm("opd", loss_changes=(("rej_direction", "forward"),)),
    "opd-reverse-only": Arm("opd", loss_changes=(("acc_direction", "reverse"),)),
    "opd-no-decay": Arm("opd", loss_changes=(("gamma", 1.0),)),
    # switches of this project (not the paper's ablations): hard labels on the accepted stream, with and without the rejected one
    "opd-hard-accepted": Arm("opd", loss_changes=(("acc_loss", "ce"),)),
    "opd-hard-accepted-no-rejected": Arm("opd", loss_changes=(("acc_loss", "ce"), ("use_rejected", False))),
}


@dataclass(frozen=True)
class StudyConfig:
    """The study's data, start drafters, arms and budgets (sizes for the synthetic target; every field is a flag of
    `experiments/synthetic-opd/run.py`)."""

    target: str = "synthetic"
    prompt_set: str = "synthetic"
    start_prompts: int = 2000  # the start's SFT data: the target's temperature-1 answers to these training prompts
    rollout_prompts: int = 4000  # Draft-OPD's prompts (other training prompts); SFT-greedy trains on greedy answers to them
    eval_prompts: int = 300  # held-out prompts the results are reported on
    tuning_prompts: int = 300  # other held-out prompts: choices (the low-tau start) are made on these
    new_tokens: int = 128
    drafter: DrafterConfig = field(default_factory=lambda: DrafterConfig(num_layers=1, block_size=8))
    start_sft: SFTConfig = field(
        default_factory=lambda: SFTConfig(steps=4000, batch_size=16, anchors_per_seq=32, save_every=500, optim=OptimConfig(lr=2e-3))
    )
    low_tau: tuple[float, float] = (1.5, 2.0)  # the low start: the first checkpoint of the start run whose tuning tau is in this range
    low_every: int = 25  # steps between candidate low-tau checkpoints
    arm_sft: SFTConfig = field(
        default_factory=lambda: SFTConfig(batch_size=16, anchors_per_seq=32, optim=OptimConfig(lr=3e-4, min_warmup_steps=1))
    )
    opd: OPDConfig = field(
        default_factory=lambda: OPDConfig(
            prompts_per_rollout=64,
            rollouts_per_step=1,
            replay_batch=16,
            rollout=DecodeConfig(max_new_tokens=128),
            save_every=1000,
            autocast="float32",
        )
    )
    opd_updates: int = 50
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = tuple(ARMS)
    low_arms: tuple[str, ...] = ("sft-greedy-kl", "opd", "opd-no-rejected", "opd-random-anchors")
    budgets: tuple[str, ...] = ("flops", "updates")
    resamples: int = 2000

    def __post_init__(self) -> None:
        check_ints(
            self,
            1,
            "start_prompts",
            "rollout_prompts",
            "eval_prompts",
            "tuning_prompts",
            "new_tokens",
            "opd_updates",
            "low_every",
            "resamples",
        )
        unknown = [a for a in (*self.arms, *self.low_arms) if a not in ARMS]
        if unknown:
            raise ConfigError(f"--arms: unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
        if not set(self.budgets) <= {"flops", "updates"} or not self.budgets:
            raise ConfigError(f"--budgets must be flops and/or updates, got {list(self.budgets)}")
        if not self.seeds:
            raise ConfigError("--seeds: give at least one seed")
        low, high = self.low_tau
        if not 1 <= low < high:
            raise ConfigError(f"--low-tau must be two numbers 1 <= low < high, got {list(self.low_tau)}")


# ---- data and starts ------------------------------------------------------------------------------------------------
@dataclass
class StudyData:
    """Token-id prompts and answers of the study (made once, cached in `data.json`)."""

    start: list[SFTExample]  # temperature-1 answers to the start prompts
    rollout_prompts: list[list[int]]
    greedy: list[SFTExample]  # the target's greedy answers to the rollout prompts
    eval_prompts: list[list[int]]
    eval_outputs: list[list[int]]  # greedy answers: what replay scores drafters on
    tuning_prompts: list[list[int]]
    tuning_outputs: list[list[int]]

    @staticmethod
    def from_dict(raw: dict) -> StudyData:
        example = lambda e: SFTExample(e["id"], tuple(e["prompt_ids"]), tuple(e["response_ids"]))  # noqa: E731
        return StudyData(**{**raw, "start": [example(e) for e in raw["start"]], "greedy": [example(e) for e in raw["greedy"]]})


def make_data(target: Target, cfg: StudyConfig, progress: bool = True) -> StudyData:
    from .data.prompts import load_prompts, render_prompt

    render = lambda ps: [render_prompt(p, target.tokenizer) for p in ps]  # noqa: E731
    train = render(load_prompts(cfg.prompt_set, split="train", limit=cfg.start_prompts + cfg.rollout_prompts).prompts)
    held = render(load_prompts(cfg.prompt_set, split="heldout", limit=cfg.eval_prompts + cfg.tuning_prompts).prompts)
    start_prompts, rollout_prompts = train[: cfg.start_prompts], train[cfg.start_prompts :]
    sampled = _decode(target, start_prompts, DecodeConfig(max_new_tokens=cfg.new_tokens, temperature=1.0), row_seeds=True)
    greedy = _decode(target, rollout_prompts, DecodeConfig(max_new_tokens=cfg.new_tokens))
    refs = _decode(target, held, DecodeConfig(max_new_tokens=cfg.new_tokens, stop_at_eos=False))
    examples = lambda ps, outs: [SFTExample(str(i), tuple(p), tuple(o)) for i, (p, o) in enumerate(zip(ps, outs)) if o]  # noqa: E731
    return StudyData(
        examples(start_prompts, sampled),
        rollout_prompts,
        examples(rollout_prompts, greedy),
        held[: cfg.eval_prompts],
        refs[: cfg.eval_prompts],
        held[cfg.eval_prompts :],
        refs[cfg.eval_prompts :],
    )


def _decode(target: Target, prompts: list[list[int]], decode: DecodeConfig, row_seeds: bool = False, batch: int = 250) -> list[list[int]]:
    out = []
    for i in range(0, len(prompts), batch):
        part = prompts[i : i + batch]
        seeds = list(range(i, i + len(part))) if row_seeds else None
        out += [t.output for t in autoregressive_generate(target, part, decode, seeds).traces]
    return out


# ---- scoring --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    """Greedy replay of one drafter on a prompt set: per prompt, tokens committed by verify rounds and rounds."""

    committed: tuple[int, ...]
    rounds: tuple[int, ...]

    @property
    def tau(self) -> float:
        return sum(self.committed) / max(sum(self.rounds), 1)

    @staticmethod
    def of(replayed: ReplayedTau) -> Scores:
        return Scores(tuple(t.committed for t in replayed.texts), tuple(t.rounds for t in replayed.texts))


class Scorer:
    """Scores drafters on fixed greedy texts; the target's features of the texts are computed once."""

    def __init__(self, target: Target, prompts: list[list[int]], outputs: list[list[int]], layer_ids: tuple[int, ...]):
        self.scored = score_texts(target, layer_ids, prompts, outputs, batch_size=32)

    def __call__(self, drafter: Drafter) -> Scores:
        return Scores.of(replay_scored(drafter, self.scored))


# ---- arms -----------------------------------------------------------------------------------------------------------
def sft_step_flops(target: Target, drafter: Drafter, examples: list[SFTExample], cfg: SFTConfig) -> float:
    """The compute of one SFT step as the trainer counts it (per sequence: the target over the text, the drafter over a
    block at each anchor)."""
    target_params, draft_params = param_counts(target, drafter)
    n = max(len(examples), 1)
    text = sum(len(e.prompt_ids) + len(e.response_ids) for e in examples) / n
    anchors = sum(min(cfg.anchors_per_seq, max(len(e.response_ids) - 1, 0)) for e in examples) / n
    return cfg.batch_size * (2.0 * target_params * text + 6.0 * draft_params * anchors * drafter.block_size)


def run_arm(
    target: Target,
    start: Drafter,
    name: str,
    seed: int,
    budget: str,
    flops: float | None,
    data: StudyData,
    cfg: StudyConfig,
    out: Path,
    progress: bool = False,
) -> tuple[Drafter, float]:
    """Train a copy of `start` by arm `name` with `seed` to `budget` (flops: stop at `flops`; updates: cfg.opd_updates
    updates). Resumes a killed run from its checkpoint. Returns the drafter and the compute it spent."""
    arm, drafter = ARMS[name], copy.deepcopy(start).train()
    if arm.kind == "opd":
        loss = replace(cfg.opd.loss, **dict(arm.loss_changes))
        opd = replace(cfg.opd, steps=cfg.opd_updates, rollout=replace(cfg.opd.rollout, seed=seed), anchors=arm.anchors, loss=loss)
        train_opd(target, drafter, data.rollout_prompts, opd, out, resume=True, progress=progress)
    else:
        examples = data.start if arm.data == "start" else data.greedy
        sft = replace(cfg.arm_sft, loss=arm.loss, labels="text", seed=seed, autocast="float32")
        if budget == "flops":
            steps = max(1, math.ceil(1.05 * flops / sft_step_flops(target, start, examples, sft)))  # the cosine spans the budget
            sft = replace(sft, steps=steps, max_flops=flops, save_every=max(1, steps // 4))
        else:
            sft = replace(sft, steps=cfg.opd_updates, save_every=cfg.opd_updates)
        train_sft(target, drafter, examples, sft, out, resume=True, progress=progress)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    return drafter.eval(), json.loads(rows[-1])["compute/flops"]


# ---- comparisons ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    """tau_b / tau_a of two arms, each pooled over its seeds and the prompts, with the hierarchical 95% interval."""

    a: str
    b: str
    tau_a: float
    tau_b: float
    ratio: float
    ci: tuple[float, float]

    @property
    def differs(self) -> bool:
        return not self.ci[0] <= 1.0 <= self.ci[1]

    def text(self) -> str:
        return f"{self.ratio:.3f} [{self.ci[0]:.3f}, {self.ci[1]:.3f}]" + ("" if self.differs else " (no difference)")


def pooled_tau(runs: list[Scores]) -> float:
    return sum(sum(s.committed) for s in runs) / max(sum(sum(s.rounds) for s in runs), 1)


def compare(
    a: str, runs_a: list[Scores], b: str, runs_b: list[Scores], resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> Comparison:
    """Hierarchical bootstrap of tau_b / tau_a (module docstring): per resample, each arm's seeds drawn with replacement,
    then prompts drawn with replacement (shared); tau of an arm = its committed tokens / its rounds over the draws."""
    n = len(runs_a[0].committed)
    if any(len(s.committed) != n for s in runs_a + runs_b):
        raise ValueError(f"arms {a} and {b} were scored on different prompt sets")
    ca, ra = (torch.tensor([getattr(s, f) for s in runs_a], dtype=torch.float64) for f in ("committed", "rounds"))
    cb, rb = (torch.tensor([getattr(s, f) for s in runs_b], dtype=torch.float64) for f in ("committed", "rounds"))
    g = torch.Generator().manual_seed(seed)
    sa = torch.randint(0, len(runs_a), (resamples, len(runs_a)), generator=g)
    sb = torch.randint(0, len(runs_b), (resamples, len(runs_b)), generator=g)
    prompts = torch.randint(0, n, (resamples, n), generator=g)
    counts = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(
        1, prompts, torch.ones(resamples, n, dtype=torch.float64)
    )  # draws of each prompt

    def tau(c, r, seeds):  # (resamples,): pooled over the drawn seeds and prompts
        return (c[seeds] * counts[:, None]).sum((1, 2)) / (r[seeds] * counts[:, None]).sum((1, 2)).clamp_min(1e-12)

    ratios = tau(cb, rb, sb) / tau(ca, ra, sa)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(ratios, q).tolist()
    tau_a, tau_b = pooled_tau(runs_a), pooled_tau(runs_b)
    return Comparison(a, b, tau_a, tau_b, tau_b / tau_a, (low, high))


# ---- the study ------------------------------------------------------------------------------------------------------
def run_study(
    cfg: StudyConfig, out: str | Path, progress: bool = True, log: Callable[[str], None] = print, cached_only: bool = False
) -> dict:
    """Data, the start drafters, every arm x seed x budget, scores and comparisons (module docstring); cached under `out`.
    `cached_only`: train nothing, summarize the arms already scored (a study still running, or stopped early)."""
    from .models.load import load_target

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_same_target(out, cfg)
    target = load_target(cfg.target)
    data = cached_json(out / "data.json", lambda: make_data(target, cfg, progress), StudyData)
    layers = new_drafter(target, cfg.drafter).spec.target_layer_ids
    evaluate = {
        "eval": Scorer(target, data.eval_prompts, data.eval_outputs, layers),
        "tuning": Scorer(target, data.tuning_prompts, data.tuning_outputs, layers),
    }
    if cached_only and not all((out / "starts" / name / "config.json").exists() for name in ("plateau", "low")):
        raise ConfigError(f"{out}: no start drafters yet, nothing to summarize")
    train_starts(target, data, cfg, out / "starts", evaluate["tuning"], log)
    results: dict = {}
    for start_name, arms in (("plateau", cfg.arms), ("low", cfg.low_arms)):
        start = load_drafter(out / "starts" / start_name, target).float()
        results[start_name] = {"start": {"eval": asdict(evaluate["eval"](start)), "tuning": asdict(evaluate["tuning"](start))}, "runs": {}}
        for seed in cfg.seeds:
            for name in sorted(arms, key=lambda a: ARMS[a].kind != "opd"):  # Draft-OPD first: its compute is the flops budget
                for budget in ("both",) if ARMS[name].kind == "opd" else cfg.budgets:
                    key = f"{name}/{budget}/seed{seed}"
                    folder = out / start_name / name / budget / f"seed{seed}"
                    if cached_only and not (folder / "scores.json").exists():
                        continue
                    results[start_name]["runs"][key] = cached_json(
                        folder / "scores.json",
                        lambda: _score_arm(
                            target, start, name, seed, budget, _opd_flops(results[start_name], seed), data, cfg, folder, evaluate, log
                        ),
                        dict,
                    )
    summary = summarize_study(results, cfg)
    name = "summary.partial.json" if cached_only else "summary.json"
    _write(out / name, {"config": _jsonable(asdict(cfg)), "results": results, "summary": summary})
    return summary


def _opd_flops(start_results: dict, seed: int) -> float | None:
    run = start_results["runs"].get(f"opd/both/seed{seed}")
    return run["flops"] if run else None


def _score_arm(target, start, name, seed, budget, flops, data, cfg, folder, evaluate, log) -> dict:
    drafter, spent = run_arm(target, start, name, seed, budget, flops, data, cfg, folder / "run")
    scores = {k: asdict(s(drafter)) for k, s in evaluate.items()}
    log(
        f"{folder.parent.parent.parent.name} {name} {budget} seed {seed}: eval tau {Scores(**scores['eval']).tau:.3f} "
        f"({spent / 1e12:.2f} TFLOPs)"
    )
    return {"flops": spent, **scores}


def train_starts(target: Target, data: StudyData, cfg: StudyConfig, out: Path, tuning: Scorer, log) -> dict:
    """The plateau start (SFT from scratch on the start data for `start_sft.steps`) and the low start (the first
    checkpoint of that run, every `low_every` steps, whose tuning tau is in `low_tau`); their tuning-tau curve."""
    curve_path = out / "curve.json"
    if (out / "plateau" / "config.json").exists() and (out / "low" / "config.json").exists():
        return json.loads(curve_path.read_text())
    partial = out / "curve.partial.json"  # the curve so far: a killed start run resumes from its last checkpoint
    resume = (out / "run" / "last" / "trainer.pt").exists() and partial.exists()
    curve: dict = json.loads(partial.read_text()) if resume else {"steps": [], "tuning_tau": [], "low_step": None}
    drafter = new_drafter(target, cfg.drafter, seed=0)

    def on_step(step: int, d: Drafter, _compute) -> None:
        want_low = curve["low_step"] is None and step % cfg.low_every == 0
        if step % 250 == 0 or step == cfg.start_sft.steps or want_low:
            tau = tuning(d).tau
            curve["steps"].append(step), curve["tuning_tau"].append(tau)
            if want_low and cfg.low_tau[0] <= tau <= cfg.low_tau[1]:
                save_drafter(d, out / "low", {"step": step, "tuning_tau": tau})
                curve["low_step"] = step
            log(f"start SFT step {step}: tuning tau {tau:.3f}")
            _write(partial, curve)

    train_sft(target, drafter, data.start, cfg.start_sft, out / "run", resume=resume, progress=False, on_step=on_step)
    if curve["low_step"] is None:
        raise ConfigError(f"no start checkpoint had a tuning tau in {list(cfg.low_tau)} (every {cfg.low_every} steps): lower --low-every")
    save_drafter(drafter, out / "plateau", {"step": cfg.start_sft.steps, "tuning_tau": curve["tuning_tau"][-1]})
    _write(curve_path, curve)
    return curve


def summarize_study(results: dict, cfg: StudyConfig) -> dict:
    """Per start and budget: every arm's pooled eval tau; Draft-OPD against the best SFT arm of that budget (chosen on the
    tuning prompts, reported on the eval prompts) and every arm against Draft-OPD; hierarchical intervals."""
    out: dict = {}
    for start_name, res in results.items():
        arms = sorted({key.split("/")[0] for key in res["runs"]})
        for budget in cfg.budgets:
            runs = {a: [r for k, r in res["runs"].items() if k.split("/")[0] == a and k.split("/")[1] in (budget, "both")] for a in arms}
            runs = {a: r for a, r in runs.items() if r}
            evals = {a: [Scores(**r["eval"]) for r in rs] for a, rs in runs.items()}
            tunes = {a: pooled_tau([Scores(**r["tuning"]) for r in rs]) for a, rs in runs.items()}
            sft_arms = [a for a in runs if ARMS[a].kind == "sft"]
            best_sft = max(sft_arms, key=lambda a: tunes[a]) if sft_arms else None
            table = {
                a: {"tau": pooled_tau(evals[a]), "seeds": len(evals[a]), "tflops": sum(r["flops"] for r in runs[a]) / len(runs[a]) / 1e12}
                for a in runs
            }
            versus = {}
            if "opd" in evals:
                for a in runs:
                    if a != "opd":
                        versus[f"{a} / opd"] = asdict(compare("opd", evals["opd"], a, evals[a], cfg.resamples))
            if best_sft:  # every Draft-OPD arm (the recipe, each ablation, each switch) against the best SFT arm
                for a in runs:
                    if ARMS[a].kind == "opd":
                        versus[f"{a} / best sft"] = asdict(compare(best_sft, evals[best_sft], a, evals[a], cfg.resamples))
            out[f"{start_name}/{budget}"] = {
                "start_tau": Scores(**res["start"]["eval"]).tau,
                "best_sft": best_sft,
                "arms": table,
                "comparisons": versus,
            }
    return out


def format_summary(summary: dict) -> str:
    lines = []
    for key, part in summary.items():
        lines += [
            f"### {key} (start tau {part['start_tau']:.3f}; best SFT arm on the tuning prompts: {part['best_sft']})",
            "",
            f"| arm | seeds | TFLOPs | eval tau | vs opd | vs best SFT ({part['best_sft']}) |",
            "|---|---|---|---|---|---|",
        ]
        text = lambda c: "" if c is None else Comparison(**{**c, "ci": tuple(c["ci"])}).text()  # noqa: E731
        for arm, row in part["arms"].items():
            vs_opd, vs_sft = (text(part["comparisons"].get(f"{arm} / {other}")) for other in ("opd", "best sft"))
            lines.append(f"| {arm} | {row['seeds']} | {row['tflops']:.2f} | {row['tau']:.3f} | {vs_opd} | {vs_sft} |")
        c = part["comparisons"].get("opd / best sft")
        if c:
            lines += ["", f"Draft-OPD / best SFT ({part['best_sft']}): {Comparison(**{**c, 'ci': tuple(c['ci'])}).text()}", ""]
    return "\n".join(lines)


def check_same_target(out: Path, cfg: StudyConfig) -> None:
    """Refuse a study folder made with another target (its arms would be compared with this target's)."""
    path = out / "study.json"
    if path.exists():
        found = json.loads(path.read_text()).get("target")
        if found != cfg.target:
            raise ConfigError(
                f"{out} holds a study of target {found!r}, not {cfg.target!r}: arms of different targets cannot be "
                "compared; choose another --out"
            )
    else:
        _write(path, {"target": cfg.target})


def cached_json(path: Path, make, cls):
    """`make()` once, kept as JSON at `path` (`cls`: dict, or a dataclass with `from_dict`)."""
    if path.exists():
        raw = json.loads(path.read_text())
        return raw if cls is dict else cls.from_dict(raw)
    value = make()
    _write(path, value if cls is dict else asdict(value))
    return value


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj)))
    tmp.replace(path)


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))
