"""Held-out evaluation: acceptance length tau and measured speedup over autoregressive decoding.

Per named prompt set, every prompt runs at batch 1 twice, interleaved so machine noise hits both alike:
first plain autoregressive decoding, then speculative decoding with the drafter, with the same DecodeConfig
(max_new_tokens, temperature, seed). Per set (and over all sets, the "all" row):

* tau, per-slot acceptance and the accepted-length histogram (`decode.stats.summarize` of the speculative runs);
* tokens/s of both, and speedup = total AR seconds / total speculative seconds over the same prompts
  (prefill included on both sides); the ideal speedup `tau * t_AR / (t_draft + t_verify)` is what the observed
  tau would give with no engine overhead;
* draft / verify / other milliseconds per speculative round and AR milliseconds per token (prefill excluded);
* 95% percentile-bootstrap intervals over prompts (`cfg.bootstrap_resamples` resamples, seeded by `cfg.decode.seed`):
  `tau_ci` resamples prompts and recomputes tau = sum committed tokens / sum rounds, `speedup_ci` recomputes
  sum AR seconds / sum speculative seconds (`decode.stats.bootstrap_ratio_ci`). The "all" row resamples the pooled
  prompts of every set;
* at temperature 0, output equality: `match_rate` (fraction of prompts whose speculative output equals AR output),
  `mean_first_divergence` (mean new-token index of the first difference, over mismatched prompts) and the
  mismatched prompt ids. In float32 (and float64) greedy speculative decoding is lossless, so every prompt must
  match: each mismatch prints a line starting with "MISMATCH" to stderr. With a lower-precision target (bf16, fp16;
  `report.config["target_dtype"]`) a K-token verify pass legitimately rounds differently from a 1-token AR step,
  so mismatches are reported as numbers only. At temperature > 0 outputs legitimately differ (different random
  streams) and these fields are None.

Under torchrun (`train/distributed.py`) each rank decodes a contiguous share of the prompts (all sets in a row);
their runs' counts and timings are gathered, so every rank builds the report one process would (tau, counts and
histograms equal; times are each prompt's own rank's), and `draftopd eval` saves it from rank 0.

Per-prompt counts are kept (`SetResult.per_prompt`) so two drafters evaluated on the same prompts can be compared
with a paired bootstrap (`compare_tau`: interval of tau_B / tau_A; an interval containing 1 is no evidence of a
difference). `EvalReport.load` reads a saved report back.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import EvalConfig
from ..data.prompts import DataError, load_prompts, render_prompt
from ..decode.speculative import autoregressive_generate, generate
from ..decode.stats import bootstrap_ratio_ci, first_divergence, paired_ratio_ci, ratio_of_sums, summarize
from ..decode.trace import Generation, RolloutTrace, Timing
from ..models.target import TargetError
from ..train import distributed as ddp

__all__ = ["EvalReport", "PromptStats", "SetResult", "TauComparison", "compare_tau", "evaluate"]

_TIMING_FIELDS = ("draft_s", "verify_s", "other_s", "prefill_s", "rounds")
_LOSSLESS_DTYPES = (torch.float32, torch.float64)  # greedy outputs must match exactly at these target dtypes
LEVEL = 0.95


@dataclass(frozen=True)
class PromptStats:
    """One prompt's numbers: committed = new tokens - 1 (the prefill's token is not a round's), rounds of the
    speculative run, wall seconds of each run, and the first divergence from AR (None: equal or not checked)."""

    set: str
    id: str
    committed: int
    rounds: int
    ar_seconds: float
    spec_seconds: float
    first_divergence: int | None = None


@dataclass(frozen=True)
class SetResult:
    name: str
    prompts: int
    tau: float
    slot_acceptance: tuple[float, ...]  # index k-1 -> P(accepted >= k)
    accepted_histogram: tuple[int, ...]  # index r -> rounds that accepted exactly r drafts
    spec_tokens_per_s: float
    ar_tokens_per_s: float
    speedup: float  # AR seconds / speculative seconds, same prompts
    ideal_speedup: float
    spec_ms_per_round: dict[str, float]  # draft / verify / other
    ar_ms_per_token: float
    spec_seconds: float
    ar_seconds: float
    spec_new_tokens: int
    ar_new_tokens: int
    rounds: int
    tau_ci: tuple[float, float]  # 95% percentile bootstrap over prompts
    speedup_ci: tuple[float, float]
    match_rate: float | None  # temperature 0 only: fraction of prompts with speculative output == AR output
    mean_first_divergence: float | None  # mean first differing new-token index over mismatched prompts
    mismatches: int | None  # temperature 0 only; must be 0 in float32
    mismatched_ids: tuple[str, ...] = ()
    per_prompt: tuple[PromptStats, ...] = ()


@dataclass
class EvalReport:
    rows: list[SetResult]
    config: dict = field(default_factory=dict)

    def row(self, name: str) -> SetResult:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        return {"config": self.config, "rows": [dataclasses.asdict(r) for r in self.rows]}

    def table(self) -> str:
        """One line per row; intervals are the 95% bootstrap over prompts, e.g. `2.31 [2.10, 2.52]`."""
        header = (
            f"{'set':<14} {'prompts':>7} {'tau [95% CI]':>20} {'speedup [95% CI]':>23} {'spec tok/s':>11} "
            f"{'AR tok/s':>9} {'match':>7} {'1st div':>7} {'mismatches':>10}"
        )
        lines = [header, "-" * len(header)]
        for r in self.rows:
            tau = f"{r.tau:.2f} [{r.tau_ci[0]:.2f}, {r.tau_ci[1]:.2f}]"
            speed = f"{r.speedup:.2f}x [{r.speedup_ci[0]:.2f}, {r.speedup_ci[1]:.2f}]"
            match = "-" if r.match_rate is None else f"{100 * r.match_rate:.0f}%"
            div = "-" if r.mean_first_divergence is None else f"{r.mean_first_divergence:.1f}"
            mism = "-" if r.mismatches is None else str(r.mismatches)
            lines.append(
                f"{r.name[:14]:<14} {r.prompts:>7} {tau:>20} {speed:>23} {r.spec_tokens_per_s:>11.1f} "
                f"{r.ar_tokens_per_s:>9.1f} {match:>7} {div:>7} {mism:>10}"
            )
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, data: dict) -> EvalReport:
        """Inverse of `to_dict` (JSON lists back to tuples, per-prompt dicts back to PromptStats)."""
        return cls([_set_result_from_dict(r) for r in data["rows"]], dict(data.get("config", {})))

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _set_result_from_dict(row: dict) -> SetResult:
    row = {k: tuple(v) if isinstance(v, list) else v for k, v in row.items()}
    return SetResult(**{**row, "per_prompt": tuple(PromptStats(**p) for p in row.get("per_prompt", ()))})


@dataclass(frozen=True)
class TauComparison:
    """Drafter B vs drafter A on the same prompts: ratio = tau_B / tau_A and its paired 95% bootstrap interval."""

    set: str
    prompts: int
    tau_a: float
    tau_b: float
    ratio: float
    ci: tuple[float, float]

    @property
    def differs(self) -> bool:
        """False when the interval contains 1 (no evidence that the drafters differ in tau)."""
        return not self.ci[0] <= 1.0 <= self.ci[1]


def compare_tau(a: EvalReport, b: EvalReport, set_name: str = "all", *, resamples: int = 2000, seed: int = 0) -> TauComparison:
    """Paired bootstrap of tau_B / tau_A on row `set_name` of two reports over the same prompts (matched by set and
    id): each resample draws one prompt index set I and computes (sum committed_B / sum rounds_B) /
    (sum committed_A / sum rounds_A) over I. Raises ValueError when the reports hold different prompts."""
    pa, pb = ({(p.set, p.id): p for p in r.row(set_name).per_prompt} for r in (a, b))
    if not pa or pa.keys() != pb.keys():
        raise ValueError(f"row '{set_name}': the reports do not hold the same prompts (or hold no per-prompt counts)")
    keys = sorted(pa)
    ca, ra = [pa[k].committed for k in keys], [pa[k].rounds for k in keys]
    cb, rb = [pb[k].committed for k in keys], [pb[k].rounds for k in keys]
    tau_a, tau_b = ratio_of_sums(ca, ra), ratio_of_sums(cb, rb)
    ci = paired_ratio_ci(ca, ra, cb, rb, resamples=resamples, level=LEVEL, seed=seed)
    return TauComparison(set_name, len(keys), tau_a, tau_b, tau_b / max(tau_a, 1e-12), ci)


def _merge(gens: list[Generation]) -> Generation:
    """One Generation holding every trace, timings summed (batch-1 runs, so rounds add up)."""
    timing = Timing()
    for g in gens:
        for f in _TIMING_FIELDS:
            setattr(timing, f, getattr(timing, f) + getattr(g.timing, f))
    return Generation([t for g in gens for t in g.traces], timing)


def _counts_only(gen: Generation) -> Generation:
    """`gen` with each trace reduced to the host lists `summarize` reads (no tensors): cheap to gather across ranks."""
    traces = [
        RolloutTrace(t.prompt, t.output, t.anchors, accepted=t.accepted, proposed=t.proposed, looked_up=t.looked_up, finish=t.finish)
        for t in gen.traces
    ]
    return Generation(traces, gen.timing)


def _prompt_stats(set_name: str, prompt_id: str, ar: Generation, sd: Generation, greedy: bool) -> PromptStats:
    a, s = ar.traces[0], sd.traces[0]
    return PromptStats(
        set_name,
        prompt_id,
        max(len(s.output) - 1, 0),
        s.rounds,
        ar.timing.total_s,
        sd.timing.total_s,
        first_divergence(a.output, s.output) if greedy else None,
    )


def _equality(stats: list[PromptStats], greedy: bool) -> dict:
    """match_rate = matched prompts / prompts; mean_first_divergence over mismatched prompts (None if none)."""
    if not greedy:
        return {"match_rate": None, "mean_first_divergence": None, "mismatches": None, "mismatched_ids": ()}
    diverged = [p for p in stats if p.first_divergence is not None]
    mean_div = sum(p.first_divergence for p in diverged) / len(diverged) if diverged else None
    return {
        "match_rate": 1 - len(diverged) / len(stats),
        "mean_first_divergence": mean_div,
        "mismatches": len(diverged),
        "mismatched_ids": tuple(p.id for p in diverged),
    }


def _intervals(stats: list[PromptStats], resamples: int, seed: int) -> dict:
    """Bootstrap over prompts: tau = sum committed / sum rounds, speedup = sum AR s / sum speculative s."""
    kw = dict(resamples=resamples, level=LEVEL, seed=seed)
    return {
        "tau_ci": bootstrap_ratio_ci([p.committed for p in stats], [p.rounds for p in stats], **kw),
        "speedup_ci": bootstrap_ratio_ci([p.ar_seconds for p in stats], [p.spec_seconds for p in stats], **kw),
    }


def _set_result(
    name: str,
    ar_gens: list[Generation],
    sd_gens: list[Generation],
    block_size: int,
    stats: list[PromptStats],
    greedy: bool,
    cfg: EvalConfig,
) -> SetResult:
    ar, sd = _merge(ar_gens), _merge(sd_gens)
    a, s = summarize(ar), summarize(sd, block_size)
    ar_ms_tok = a.ms_per_round["verify"] + a.ms_per_round["other"]
    spec_ms = {k: s.ms_per_round[k] for k in ("draft", "verify", "other")}
    denom = spec_ms["draft"] + spec_ms["verify"]
    return SetResult(
        name=name,
        prompts=len(sd.traces),
        tau=s.tau,
        slot_acceptance=tuple(s.slot_acceptance),
        accepted_histogram=tuple(s.accepted_histogram),
        spec_tokens_per_s=s.tokens_per_s,
        ar_tokens_per_s=a.tokens_per_s,
        speedup=ar.timing.total_s / max(sd.timing.total_s, 1e-9),
        ideal_speedup=s.tau * ar_ms_tok / max(denom, 1e-9),
        spec_ms_per_round=spec_ms,
        ar_ms_per_token=ar_ms_tok,
        spec_seconds=sd.timing.total_s,
        ar_seconds=ar.timing.total_s,
        spec_new_tokens=s.new_tokens,
        ar_new_tokens=a.new_tokens,
        rounds=s.rounds,
        **_intervals(stats, cfg.bootstrap_resamples, cfg.decode.seed),
        **_equality(stats, greedy),
        per_prompt=tuple(stats),
    )


def load_eval_sets(target, cfg: EvalConfig) -> dict[str, list[tuple[str, list[int]]]]:
    """Per set, (prompt id, chat-rendered token ids) of the `cfg.num_prompts` prompts every evaluation uses: the seeded
    sample's prompts `cfg.skip_prompts` onwards (a sample is prefix-stable, so skipped prompts are never evaluated)."""
    if target.tokenizer is None:
        raise TargetError(f"target '{target.name}' has no tokenizer: pass pre-tokenized prompt_sets")
    sets = {}
    for name in cfg.sets:
        prompts = load_prompts(name, limit=cfg.skip_prompts + cfg.num_prompts, seed=cfg.decode.seed).prompts[cfg.skip_prompts :]
        if not prompts:
            raise DataError(f"{name}: no prompts left after --skip-prompts {cfg.skip_prompts}")
        sets[name] = [(p.id, render_prompt(p, target.tokenizer)) for p in prompts]
    return sets


def evaluate(
    target, drafter, cfg: EvalConfig = EvalConfig(), *, prompt_sets: dict[str, list[list[int]]] | None = None, progress: bool = True
) -> EvalReport:
    """tau and speedup of `drafter` on `target`, per prompt set of `cfg.sets` plus an "all" row.

    `prompt_sets` (name -> token-id prompts) replaces loading and rendering `cfg.sets` (tests, custom sets).
    """
    from tqdm import tqdm

    ddp.init(target.device)
    if prompt_sets is not None:
        sets = {name: [(f"{name}/{i}", [int(t) for t in ids]) for i, ids in enumerate(prompts)] for name, prompts in prompt_sets.items()}
    else:
        sets = load_eval_sets(target, cfg)
    sets = {name: items for name, items in sets.items() if items}
    if not sets:
        raise ValueError("no prompts to evaluate")
    for name, items in sets.items():  # fail before any decoding, with the set named
        try:
            target.check_prompts([ids for _, ids in items], cfg.decode.max_new_tokens + drafter.block_size)
        except TargetError as err:
            raise TargetError(f"prompt set '{name}': {err}") from None

    dcfg = cfg.decode
    greedy = dcfg.temperature <= 0
    first = next(iter(sets.values()))[0][1]
    warm = dataclasses.replace(dcfg, max_new_tokens=min(8, dcfg.max_new_tokens))
    autoregressive_generate(target, [first], warm)  # warm-up: first calls pay allocation / kernel selection
    generate(target, drafter, [first], warm)

    strict = target.dtype in _LOSSLESS_DTYPES
    prompts = [(name, prompt_id, ids) for name, items in sets.items() for prompt_id, ids in items]
    mine = prompts[ddp.share(len(prompts))]
    runs = []  # (AR run, speculative run, PromptStats) of each of this rank's prompts
    bar = tqdm(total=len(mine), desc="eval", unit="prompt", disable=not progress or not ddp.is_main())
    try:
        for name, prompt_id, ids in mine:
            bar.set_postfix(set=name)
            a, s = autoregressive_generate(target, [ids], dcfg), generate(target, drafter, [ids], dcfg)
            runs.append((_counts_only(a), _counts_only(s), _prompt_stats(name, prompt_id, a, s, greedy)))
            if strict and runs[-1][2].first_divergence is not None:
                bar.write(
                    f"MISMATCH: set '{name}' prompt '{prompt_id}': greedy speculative output differs from "
                    f"autoregressive at new token {runs[-1][2].first_divergence} in {_dtype_name(target.dtype)} "
                    f"(lossless decoding is broken)",
                    file=sys.stderr,
                )
            bar.update(1)
    finally:
        bar.close()
    runs = [run for part in ddp.all_gather(runs) for run in part]  # every rank's prompts, in one process's order
    rows = []
    for name in [*sets, "all"]:
        kept = [run for run in runs if name in (run[2].set, "all")]
        rows.append(_set_result(name, [r[0] for r in kept], [r[1] for r in kept], drafter.block_size, [r[2] for r in kept], greedy, cfg))
    config = {
        **dataclasses.asdict(cfg),
        "sets": list(sets),
        "target": target.name,
        "block_size": drafter.block_size,
        "pretokenized": prompt_sets is not None,
        "target_dtype": _dtype_name(target.dtype),
        "lossless_required": strict and greedy,
        "ci_level": LEVEL,
    }
    return EvalReport(rows, config)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
