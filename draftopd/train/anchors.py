"""Anchors: where Draft-OPD replays the drafter, taken from rollout traces.

A segment is one replayed block: its anchor position `a`, the number `r` of drafts the target accepted there,
and the drafter's proposals `d_1 .. d_K` with the target's log-probs of them given the draft prefix.
- "error" anchors (the method): exactly the rollout's rounds. Every anchor after the first sits where the
  previous block was rejected (the verification-exposed error positions).
- "random" anchors (ablation): the same number of segments with the same accepted lengths `r` (randomly
  re-assigned), at random response positions. No drafted block exists there, so the proposals and the
  target's log-probs are filled by the trainer (the drafter's argmax, re-verified by the target).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..decode.trace import RolloutTrace


@dataclass
class Segments:
    """All replay segments of one trace. anchors/accepted (M,); drafts/target_logp (M, K); target_logp is None
    when the proposals are not from the rollout (random anchors) and must be re-verified."""

    anchors: Tensor
    accepted: Tensor
    drafts: Tensor | None
    target_logp: Tensor | None


def error_segments(trace: RolloutTrace) -> Segments:
    s = trace.stacked()
    return Segments(s["anchors"], s["accepted"], s["drafts"], s["target_logp"])


def random_segments(trace: RolloutTrace, gen: torch.Generator) -> Segments:
    """Same count and accepted lengths as the rollout, at distinct random positions of the response."""
    first, last = len(trace.prompt), len(trace.tokens) - 2  # an anchor needs at least one following token
    rounds = trace.rounds
    candidates = torch.arange(first, max(first, last) + 1)
    if len(candidates) < rounds:  # a response shorter than its round count: allow repeats
        candidates = candidates.repeat((rounds + len(candidates) - 1) // max(len(candidates), 1))
    anchors = candidates[torch.randperm(len(candidates), generator=gen)[:rounds]].sort().values
    accepted = torch.tensor(trace.accepted, dtype=torch.long)[torch.randperm(rounds, generator=gen)]
    return Segments(anchors, accepted, None, None)


def make_segments(trace: RolloutTrace, mode: str, gen: torch.Generator) -> Segments:
    if mode == "error":
        return error_segments(trace)
    if mode == "random":
        return random_segments(trace, gen)
    raise ValueError(f"anchor mode must be 'error' or 'random', not {mode!r}")
