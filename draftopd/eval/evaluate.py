"""Held-out evaluation: acceptance length tau and measured speedup over autoregressive decoding.

Per named prompt set, every prompt runs at batch 1 twice, interleaved so machine noise hits both alike:
first plain autoregressive decoding, then speculative decoding with the drafter, with the same DecodeConfig
(max_new_tokens, temperature, seed). Per set (and over all sets, the "all" row):

* tau, per-slot acceptance and the accepted-length histogram (`decode.stats.summarize` of the speculative runs);
* tokens/s of both, and speedup = total AR seconds / total speculative seconds over the same prompts
  (prefill included on both sides); the ideal speedup `tau * t_AR / (t_draft + t_verify)` is what the observed
  tau would give with no engine overhead;
* draft / verify / other milliseconds per speculative round and AR milliseconds per token (prefill excluded);
* at temperature 0, the prompts whose speculative output differs from AR. Greedy speculative decoding is
  lossless, so this must be 0: each mismatch prints a line starting with "MISMATCH" to stderr and is recorded.
  At temperature > 0 outputs legitimately differ (different random streams) and `mismatches` is None.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..config import DecodeConfig, EvalConfig
from ..data.prompts import load_prompts, render_prompt
from ..decode.speculative import autoregressive_generate, generate
from ..decode.stats import summarize
from ..decode.trace import Generation, Timing
from ..models.target import TargetError

__all__ = ["EvalReport", "SetResult", "evaluate"]

_TIMING_FIELDS = ("draft_s", "verify_s", "other_s", "prefill_s", "rounds")


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
    mismatches: int | None  # temperature 0 only; must be 0
    mismatched_ids: tuple[str, ...] = ()


@dataclass
class EvalReport:
    rows: list[SetResult]
    config: dict = field(default_factory=dict)

    def row(self, name: str) -> SetResult:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        return {"config": self.config, "rows": [dataclasses.asdict(r) for r in self.rows]}

    def table(self) -> str:
        header = f"{'set':<14} {'prompts':>7} {'tau':>6} {'speedup':>8} {'spec tok/s':>11} {'AR tok/s':>9} {'mismatches':>10}"
        lines = [header, "-" * len(header)]
        for r in self.rows:
            mism = "-" if r.mismatches is None else str(r.mismatches)
            lines.append(f"{r.name[:14]:<14} {r.prompts:>7} {r.tau:>6.2f} {r.speedup:>7.2f}x {r.spec_tokens_per_s:>11.1f} "
                         f"{r.ar_tokens_per_s:>9.1f} {mism:>10}")
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _merge(gens: list[Generation]) -> Generation:
    """One Generation holding every trace, timings summed (batch-1 runs, so rounds add up)."""
    timing = Timing()
    for g in gens:
        for f in _TIMING_FIELDS:
            setattr(timing, f, getattr(timing, f) + getattr(g.timing, f))
    return Generation([t for g in gens for t in g.traces], timing)


def _set_result(name: str, ar_gens: list[Generation], sd_gens: list[Generation], block_size: int,
                mismatched: list[str] | None) -> SetResult:
    ar, sd = _merge(ar_gens), _merge(sd_gens)
    a, s = summarize(ar), summarize(sd, block_size)
    ar_ms_tok = a.ms_per_round["verify"] + a.ms_per_round["other"]
    spec_ms = {k: s.ms_per_round[k] for k in ("draft", "verify", "other")}
    denom = spec_ms["draft"] + spec_ms["verify"]
    return SetResult(
        name=name, prompts=len(sd.traces), tau=s.tau, slot_acceptance=tuple(s.slot_acceptance),
        accepted_histogram=tuple(s.accepted_histogram), spec_tokens_per_s=s.tokens_per_s, ar_tokens_per_s=a.tokens_per_s,
        speedup=ar.timing.total_s / max(sd.timing.total_s, 1e-9), ideal_speedup=s.tau * ar_ms_tok / max(denom, 1e-9),
        spec_ms_per_round=spec_ms, ar_ms_per_token=ar_ms_tok, spec_seconds=sd.timing.total_s, ar_seconds=ar.timing.total_s,
        spec_new_tokens=s.new_tokens, ar_new_tokens=a.new_tokens, rounds=s.rounds,
        mismatches=None if mismatched is None else len(mismatched), mismatched_ids=tuple(mismatched or ()))


def _load_sets(target, cfg: EvalConfig) -> dict[str, list[tuple[str, list[int]]]]:
    if target.tokenizer is None:
        raise TargetError(f"target '{target.name}' has no tokenizer: pass pre-tokenized prompt_sets")
    sets = {}
    for name in cfg.sets:
        prompts = load_prompts(name, limit=cfg.num_prompts, seed=cfg.seed).prompts
        sets[name] = [(p.id, render_prompt(p, target.tokenizer)) for p in prompts]
    return sets


def evaluate(target, drafter, cfg: EvalConfig = EvalConfig(), *, prompt_sets: dict[str, list[list[int]]] | None = None,
             progress: bool = True) -> EvalReport:
    """tau and speedup of `drafter` on `target`, per prompt set of `cfg.sets` plus an "all" row.

    `prompt_sets` (name -> token-id prompts) replaces loading and rendering `cfg.sets` (tests, custom sets).
    """
    from tqdm import tqdm

    if prompt_sets is not None:
        sets = {name: [(f"{name}/{i}", [int(t) for t in ids]) for i, ids in enumerate(prompts)]
                for name, prompts in prompt_sets.items()}
    else:
        sets = _load_sets(target, cfg)
    sets = {name: items for name, items in sets.items() if items}
    if not sets:
        raise ValueError("no prompts to evaluate")
    for name, items in sets.items():  # fail before any decoding, with the set named
        try:
            target.check_prompts([ids for _, ids in items], cfg.max_new_tokens + drafter.block_size)
        except TargetError as err:
            raise TargetError(f"prompt set '{name}': {err}") from None

    dcfg = DecodeConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed)
    greedy = cfg.temperature <= 0
    first = next(iter(sets.values()))[0][1]
    warm = dataclasses.replace(dcfg, max_new_tokens=min(8, cfg.max_new_tokens))
    autoregressive_generate(target, [first], warm)  # warm-up: first calls pay allocation / kernel selection
    generate(target, drafter, [first], warm)

    rows, all_ar, all_sd, all_mismatched = [], [], [], []
    bar = tqdm(total=sum(len(v) for v in sets.values()), desc="eval", unit="prompt", disable=not progress)
    try:
        for name, items in sets.items():
            bar.set_postfix(set=name)
            ar_gens, sd_gens, mismatched = [], [], []
            for prompt_id, ids in items:
                a = autoregressive_generate(target, [ids], dcfg)
                s = generate(target, drafter, [ids], dcfg)
                ar_gens.append(a)
                sd_gens.append(s)
                if greedy and a.traces[0].output != s.traces[0].output:
                    mismatched.append(prompt_id)
                    at = next((i for i, (x, y) in enumerate(zip(a.traces[0].output, s.traces[0].output)) if x != y),
                              min(len(a.traces[0].output), len(s.traces[0].output)))
                    bar.write(f"MISMATCH: set '{name}' prompt '{prompt_id}': greedy speculative output differs from "
                              f"autoregressive at new token {at} (lossless decoding is broken)", file=sys.stderr)
                bar.update(1)
            rows.append(_set_result(name, ar_gens, sd_gens, drafter.block_size, mismatched if greedy else None))
            all_ar += ar_gens
            all_sd += sd_gens
            all_mismatched += mismatched
    finally:
        bar.close()
    rows.append(_set_result("all", all_ar, all_sd, drafter.block_size, all_mismatched if greedy else None))
    config = {**dataclasses.asdict(cfg), "sets": list(sets), "target": target.name, "block_size": drafter.block_size,
              "pretokenized": prompt_sets is not None}
    return EvalReport(rows, config)
