"""Greedy loops: where a generated text starts repeating itself.

Small targets' greedy answers loop: SmolLM2-135M's repeat 52-86% of their own 4-grams past token 64 (docs/LOG.md), and
trained on, those loops make a weaker drafter than fixed text. A loop starts at the first index j from which the
`run` n-grams at j .. j+run-1 all repeat an n-gram seen earlier in the text, so the loop's first pass stays before j.

`LoopWatch` finds it one token at a time (constant work a token), which is what lets the decoder stop a row as soon
as it loops (`DecodeConfig.stop_at_loop`); `loop_start` runs the same watch over a finished text, so cutting a text
that stopped at its loop and cutting the whole text give the same tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class LoopWatch:
    """Push tokens in order; `start` is the loop's start index once one is seen (None until then)."""

    n: int = 4
    run: int = 8
    start: int | None = None
    pushed: int = 0
    streak: int = 0  # how many of the latest n-grams in a row repeat an earlier one
    seen: set[tuple[int, ...]] = field(default_factory=set)
    tail: deque[int] = field(default_factory=deque)

    def push(self, token: int) -> bool:
        """Add the next token; True once the text has looped."""
        self.pushed += 1
        self.tail.append(token)
        if len(self.tail) > self.n:
            self.tail.popleft()
        if self.start is None and len(self.tail) == self.n:
            gram = tuple(self.tail)
            self.streak = self.streak + 1 if gram in self.seen else 0
            self.seen.add(gram)
            if self.streak >= self.run:
                self.start = self.pushed - self.n - self.run + 1  # the first of the `run` repeating n-grams
        return self.start is not None


def loop_start(response: Sequence[int], n: int = 4, run: int = 8) -> int:
    """Index where a greedy loop starts in `response`; len(response) if there is none."""
    watch = LoopWatch(n, run)
    for token in response:
        if watch.push(token):
            return watch.start
    return len(response)
