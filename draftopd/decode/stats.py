"""Acceptance statistics of a generation: tau, per-slot acceptance, accepted-length histogram, speed.

tau = tokens committed by verify rounds / number of verify rounds (accepted drafts + the target's token; the
first token, produced by the prefill, is not counted). Per-slot acceptance for slot k is the fraction of
rounds that accepted at least k drafts (unconditional, the number gpt-fast and the papers plot).

Uncertainty over prompts (pure functions, seeded): a percentile bootstrap resamples the n prompts with replacement
`resamples` times and takes the (1 - level)/2 and (1 + level)/2 quantiles of the statistic over the resamples.
Every statistic here is a ratio of sums over prompts (tau = sum committed / sum rounds, speedup = sum AR seconds /
sum speculative seconds), so resampling prompts keeps each prompt's numerator and denominator together.
`paired_ratio_ci` draws one index set for two measurements of the same prompts (drafter B vs drafter A).
`first_divergence` locates where two token sequences first differ. `rejected_late_match` is the Draft-OPD
diagnostic: how often a rejected proposal after a block's first rejected slot was the right token anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from .trace import Generation

_TINY = 1e-12  # floor of a denominator sum, so a resample of zero-round prompts gives 0, not nan


@dataclass(frozen=True)
class DecodeStats:
    sequences: int
    new_tokens: int
    rounds: int
    tau: float
    slot_acceptance: list[float]  # index k-1 -> P(accepted >= k)
    accepted_histogram: list[int]  # index r -> rounds that accepted exactly r drafts
    tokens_per_s: float
    ms_per_round: dict[str, float]  # draft / verify / other, per round of the batch
    looked_up: float = 0.0  # fraction of the rows' rounds whose drafts came from prompt lookup

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(gen: Generation, block_size: int | None = None) -> DecodeStats:
    traces = gen.traces
    new_tokens = sum(len(t.output) for t in traces)
    rounds = sum(t.rounds for t in traces) or sum(len(t.output) - 1 for t in traces)
    slots = (block_size - 1) if block_size else 0
    accepted = [r for t in traces for r in t.accepted]
    hist = [sum(1 for r in accepted if r == k) for k in range(slots + 1)] if slots else []
    slot_acc = [sum(1 for r in accepted if r >= k) / max(len(accepted), 1) for k in range(1, slots + 1)]
    per_round = max(gen.timing.rounds, 1) / 1000.0
    return DecodeStats(
        sequences=len(traces),
        new_tokens=new_tokens,
        rounds=rounds,
        tau=(new_tokens - len(traces)) / max(rounds, 1),
        slot_acceptance=slot_acc,
        accepted_histogram=hist,
        tokens_per_s=new_tokens / max(gen.timing.total_s, 1e-9),
        ms_per_round={
            "draft": gen.timing.draft_s / per_round,
            "verify": gen.timing.verify_s / per_round,
            "other": gen.timing.other_s / per_round,
            "prefill_total": gen.timing.prefill_s * 1000,
        },
        looked_up=sum(x for t in traces for x in t.looked_up) / max(len(accepted), 1),
    )


@dataclass(frozen=True)
class LateMatch:
    matches: int
    count: int

    @property
    def rate(self) -> float:
        return self.matches / max(self.count, 1)


def rejected_late_match(traces: Sequence) -> LateMatch:
    """Over every round that rejected at slot r+1 < K: of its proposals d_k at slots r+1 < k <= proposed whose position exists
    in the final text, how many equal the token the target finally produced there (`tokens[anchor + k]`)."""
    matches = count = 0
    for t in traces:
        if not t.rounds:
            continue
        tokens = torch.tensor(t.tokens)
        anchors, accepted, drafts = torch.tensor(t.anchors), torch.tensor(t.accepted), torch.stack(t.drafts)
        slots = torch.arange(1, drafts.shape[1] + 1)
        pos = anchors[:, None] + slots  # (M, K) position of slot k's token
        proposed = torch.tensor(t.proposed) if t.proposed else torch.full_like(accepted, drafts.shape[1])
        late = (slots > accepted[:, None] + 1) & (slots <= proposed[:, None]) & (pos < len(tokens))
        matches += int(((drafts == tokens[pos.clamp(max=len(tokens) - 1)]) & late).sum())
        count += int(late.sum())
    return LateMatch(matches, count)


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where `a` and `b` differ; the shorter length when one is a strict prefix of
    the other; None when they are equal."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def resampled_sums(columns: Sequence[Sequence[float]], resamples: int = 2000, seed: int = 0) -> Tensor:
    """(resamples, C) float64: entry [b, c] = sum_i columns[c][I_b,i] over n indices I_b,1..I_b,n drawn uniformly
    with replacement from the n items. One index set per resample is shared by all columns (paired)."""
    data = torch.tensor([list(map(float, c)) for c in columns], dtype=torch.float64)  # (C, n)
    n = data.shape[1]
    if n == 0 or resamples < 1:
        raise ValueError(f"bootstrap needs at least one item and one resample, got {n} items, {resamples} resamples")
    index = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    return data[:, index].sum(-1).T


def percentile_interval(values: Tensor, level: float = 0.95) -> tuple[float, float]:
    """Percentile method: the (1 - level)/2 and (1 + level)/2 quantiles of the bootstrap replicates `values`
    (linear interpolation between order statistics)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(values.to(torch.float64), q).tolist()
    return low, high


def ratio_of_sums(num: Sequence[float], den: Sequence[float]) -> float:
    """The ratio estimator R = sum_i num_i / sum_i den_i (denominator floored at 1e-12)."""
    return float(sum(num)) / max(float(sum(den)), _TINY)


def bootstrap_ratio_ci(
    num: Sequence[float], den: Sequence[float], *, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of R = sum num_i / sum den_i, items i (prompts) resampled with replacement:
    R*_b = sum num_{I_b,i} / sum den_{I_b,i}, interval = quantiles (1 -/+ level)/2 of R*_1..R*_B."""
    if len(num) != len(den):
        raise ValueError(f"num and den differ in length: {len(num)} vs {len(den)}")
    sums = resampled_sums([num, den], resamples, seed)
    return percentile_interval(sums[:, 0] / sums[:, 1].clamp_min(_TINY), level)


def ratio_text(ratio: float, low: float, high: float) -> str:
    """A ratio with its interval as the result tables print it, marked "no difference" when the interval holds 1."""
    return f"{ratio:.3f} [{low:.3f}, {high:.3f}]" + (" (no difference)" if low <= 1 <= high else "")


def paired_ratio_ci(
    num_a: Sequence[float],
    den_a: Sequence[float],
    num_b: Sequence[float],
    den_b: Sequence[float],
    *,
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Paired percentile bootstrap interval of R_b / R_a, R_x = sum num_x,i / sum den_x,i, where item i is the same
    prompt under measurement a and b: each resample draws one index set I_b and uses it for both,
    (sum num_b[I_b] / sum den_b[I_b]) / (sum num_a[I_b] / sum den_a[I_b])."""
    if not len(num_a) == len(den_a) == len(num_b) == len(den_b):
        raise ValueError("paired columns differ in length")
    s = resampled_sums([num_a, den_a, num_b, den_b], resamples, seed)
    ratio_a, ratio_b = s[:, 0] / s[:, 1].clamp_min(_TINY), s[:, 2] / s[:, 3].clamp_min(_TINY)
    return percentile_interval(ratio_b / ratio_a.clamp_min(_TINY), level)
