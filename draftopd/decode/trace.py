"""Rollout traces: what one speculative generation leaves behind, for metrics and for Draft-OPD training.

Positions are logical indices into `prompt + output`. Round m drafted from the anchor at position
`anchors[m]` (the token there is the previous round's correction/bonus token, or the first token the target
produced after the prompt), proposed `drafts[m] = d_1 .. d_K`, and the target accepted `accepted[m]` of them.
The committed text after round m is `d_1 .. d_r` followed by the target's own token at position
`anchors[m] + r + 1`, which is the next round's anchor.

`target_logp[m, k-1] = log p(d_k | x, y_<=a_m, d_<k)` at temperature 1, read from the verify logits of that
round (no second forward). For k <= r these are accepted tokens, for k > r the rejected stream.
`draft_logp[m, k-1] = log q_k(d_k)`, what the drafter gave its own proposal at drafting time.
`proposed[m]` is how many of the K drafts the target checked: K, unless `draft_confidence` cut the block; slots
past it were drafted but never verified (`target_logp` NaN there) and are not a rejected stream; an EAGLE-3 chain
that the cut stopped early did not draft its last slots at all (`drafts` -1, `draft_logp` NaN there).
`looked_up[m]`: round m proposed prompt lookup's copy of earlier text (`draft_logp` 0: a point mass), not the drafter's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .loops import LoopWatch


@dataclass
class RolloutTrace:
    prompt: list[int]
    output: list[int] = field(default_factory=list)
    anchors: list[int] = field(default_factory=list)
    drafts: list[Tensor] = field(default_factory=list)  # each (K,) long
    accepted: list[int] = field(default_factory=list)
    proposed: list[int] = field(default_factory=list)  # drafts the target checked (<= K)
    looked_up: list[bool] = field(default_factory=list)  # the round's drafts came from prompt lookup (DecodeConfig.lookup_ngram)
    target_logp: list[Tensor] = field(default_factory=list)  # each (K,) float
    draft_logp: list[Tensor] = field(default_factory=list)  # each (K,) float
    draft_logits: list[Tensor] = field(default_factory=list)  # each (K, V), only with record_draft_logits
    finish: str = ""  # "eos" | "length" | "loop" (DecodeConfig.stop_at_loop)
    loop_watch: LoopWatch | None = field(default=None, repr=False, compare=False)  # only with stop_at_loop

    @property
    def rounds(self) -> int:
        return len(self.anchors)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def stacked(self) -> dict[str, Tensor]:
        """Round fields as tensors: anchors (M,), drafts (M, K), accepted (M,), proposed (M,), target_logp / draft_logp (M, K)."""
        return {
            "anchors": torch.tensor(self.anchors, dtype=torch.long),
            "drafts": torch.stack(self.drafts),
            "accepted": torch.tensor(self.accepted, dtype=torch.long),
            "proposed": torch.tensor(self.proposed or [len(d) for d in self.drafts], dtype=torch.long),
            "target_logp": torch.stack(self.target_logp),
            "draft_logp": torch.stack(self.draft_logp),
        }


@dataclass
class Timing:
    """Seconds of a generation call, split by phase (for the whole batch; `PhaseClock` measures them)."""

    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0
    prefill_s: float = 0.0
    rounds: int = 0

    @property
    def total_s(self) -> float:
        return self.draft_s + self.verify_s + self.other_s + self.prefill_s


class PhaseClock:
    """Times the phases of a generation without making the host wait for the device.

    `lap(phase)` ends the interval since the previous lap and files it under `phase`. On CUDA each lap records an event
    in the stream (asynchronous); `timing()` waits once for the last one and sums the intervals between events, which
    is device time, host gaps included, as the phases follow each other. Elsewhere laps read `time.perf_counter`."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.laps: list[tuple[str, object]] = []
        self.start = self._now()

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, phase: str) -> None:
        self.laps.append((phase, self._now()))

    def timing(self, rounds: int) -> Timing:
        """The phases' totals (draft, verify, other, prefill) and the round count."""
        seconds = {"draft": 0.0, "verify": 0.0, "other": 0.0, "prefill": 0.0}
        if self.laps and self.cuda:
            self.laps[-1][1].synchronize()
        previous = self.start
        for phase, mark in self.laps:
            seconds[phase] += previous.elapsed_time(mark) / 1000.0 if self.cuda else mark - previous
            previous = mark
        return Timing(seconds["draft"], seconds["verify"], seconds["other"], seconds["prefill"], rounds)


@dataclass
class Generation:
    traces: list[RolloutTrace]
    timing: Timing
