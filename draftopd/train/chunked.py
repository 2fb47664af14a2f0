"""Losses over the drafter's slots without holding every slot's logits at once.

A training step replays or trains hundreds of thousands of (anchor, slot) rows: at the paper's scale (16 rollouts of
2,048 tokens, block 16) their logits over a 152K-token vocabulary would take tens of GB in float32, and so would the
target's distribution over the same rows. So the drafter returns its slots' final hidden states (`Drafter.hidden`),
the target its final hidden states (`Target.score`), and `chunked_sum` applies both heads and the loss to a chunk of
rows at a time under activation checkpointing: the forward keeps only each chunk's scalar sums, the backward
recomputes one chunk's logits at a time. Peak memory holds one chunk's logits (`chunk_rows`), not all of them. The
sums equal the unchunked computation up to float summation order (tests check values and gradients).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

LOGIT_CHUNK_BYTES = 256 << 20  # float32 logits of one chunk; a loss makes a few tensors that size (softmax, its gradient)


def chunk_rows(vocab: int, budget_bytes: int = LOGIT_CHUNK_BYTES) -> int:
    """Rows of a chunk whose float32 logits over `vocab` tokens take about `budget_bytes`."""
    return max(1, budget_bytes // (4 * vocab))


def chunked_sum(fn: Callable[..., tuple[Tensor, ...]], rows: int, *tensors: Tensor) -> tuple[Tensor, ...]:
    """sum over chunks c of fn(*[t[c] for t in tensors]), the tensors cut into chunks of `rows` along their first
    dimension; `fn` returns a tuple of tensors of fixed shapes (sums over its rows). A chunk whose inputs need gradients
    runs under `torch.utils.checkpoint`, so its intermediate tensors (the logits) are freed and recomputed in backward."""
    total = tensors[0].shape[0]
    sums: tuple[Tensor, ...] | None = None
    for start in range(0, max(total, 1), rows):
        part = [t[start : start + rows] for t in tensors]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in part)
        out = checkpoint(fn, *part, use_reentrant=False) if grad else fn(*part)
        sums = out if sums is None else tuple(a + b for a, b in zip(sums, out))
    return sums
