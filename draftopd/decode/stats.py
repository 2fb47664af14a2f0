"""Acceptance statistics of a generation: tau, per-slot acceptance, accepted-length histogram, speed.

tau = tokens committed by verify rounds / number of verify rounds (accepted drafts + the target's token; the
first token, produced by the prefill, is not counted). Per-slot acceptance for slot k is the fraction of
rounds that accepted at least k drafts (unconditional, the number gpt-fast and the papers plot).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .trace import Generation


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
        sequences=len(traces), new_tokens=new_tokens, rounds=rounds,
        tau=(new_tokens - len(traces)) / max(rounds, 1), slot_acceptance=slot_acc, accepted_histogram=hist,
        tokens_per_s=new_tokens / max(gen.timing.total_s, 1e-9),
        ms_per_round={"draft": gen.timing.draft_s / per_round, "verify": gen.timing.verify_s / per_round,
                      "other": gen.timing.other_s / per_round, "prefill_total": gen.timing.prefill_s * 1000})
