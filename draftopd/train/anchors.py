"""Anchors: where Draft-OPD replays the drafter, taken from rollout traces.

A segment is one replayed block: its anchor position `a`, the number `r` of drafts the target accepted there,
the drafter's proposals `d_1 .. d_K` with the target's log-probs of them given the draft prefix, and which of the
two loss streams it feeds (`acc_on`: slots 1..r+1 against the final text; `rej_on`: the rejected proposals).
- "error" anchors (the method): exactly the rollout's rounds, each feeding both streams. Every anchor after the
  first sits where the previous block was rejected (the verification-exposed error positions).
- "random" anchors (ablation, the authors' semantics): the accepted stream moves to random response positions
  (same number of segments, the same accepted lengths `r` randomly re-assigned), while the rejected stream stays
  on the rollout's real rounds and real rejected proposals. So only *where the accepted stream is replayed*
  changes, and no block needs re-drafting or re-verifying.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..decode.trace import RolloutTrace


@dataclass
class Segments:
    """All replay segments of one trace: anchors/accepted/acc_on/rej_on (M,); drafts/target_logp (M, K)
    (zeros in segments that only feed the accepted stream)."""

    anchors: Tensor
    accepted: Tensor
    drafts: Tensor
    target_logp: Tensor
    acc_on: Tensor
    rej_on: Tensor


def error_segments(trace: RolloutTrace) -> Segments:
    s = trace.stacked()
    if any(trace.looked_up):
        raise ValueError("a rollout decoded with lookup_ngram holds prompt-lookup drafts: Draft-OPD needs the drafter's own")
    if (s["proposed"] < s["drafts"].shape[1]).any():
        raise ValueError("a rollout decoded with draft_confidence has unverified draft slots: Draft-OPD needs whole blocks")
    on = torch.ones(trace.rounds, dtype=torch.bool)
    return Segments(s["anchors"], s["accepted"], s["drafts"], s["target_logp"], on, on.clone())


def random_segments(trace: RolloutTrace, gen: torch.Generator) -> Segments:
    """Accepted stream at distinct random response positions (same count and accepted lengths as the rollout);
    rejected stream on the rollout's own rounds."""
    real = error_segments(trace)
    first, last = len(trace.prompt), len(trace.tokens) - 2  # an anchor needs at least one following token
    rounds = trace.rounds
    candidates = torch.arange(first, max(first, last) + 1)
    if len(candidates) < rounds:  # a response shorter than its round count: allow repeats
        candidates = candidates.repeat((rounds + len(candidates) - 1) // max(len(candidates), 1))
    anchors = candidates[torch.randperm(len(candidates), generator=gen)[:rounds]].sort().values
    accepted = real.accepted[torch.randperm(rounds, generator=gen)]
    on, off = torch.ones(rounds, dtype=torch.bool), torch.zeros(rounds, dtype=torch.bool)
    return Segments(
        torch.cat([anchors, real.anchors]),
        torch.cat([accepted, real.accepted]),
        torch.cat([torch.zeros_like(real.drafts), real.drafts]),
        torch.cat([torch.zeros_like(real.target_logp), real.target_logp]),
        torch.cat([on, off]),
        torch.cat([off, on]),
    )


def make_segments(trace: RolloutTrace, mode: str, gen: torch.Generator) -> Segments:
    if mode == "error":
        return error_segments(trace)
    if mode == "random":
        return random_segments(trace, gen)
    raise ValueError(f"anchor mode must be 'error' or 'random', not {mode!r}")
