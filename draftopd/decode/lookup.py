"""Prompt lookup: drafts copied from a row's own text (its prompt and output so far), no model.

When the last `ngram` tokens of a row occurred earlier in its text, the (up to `k`) tokens that followed their
earliest occurrence are the row's drafts, as transformers' prompt-lookup decoding proposes them (one n-gram size
here). Rewrites, quotes, code edits and repeated names make such matches common on chat prompts.

A looked-up draft is a point mass, q(d) = 1: greedy acceptance compares it with the target's argmax as any draft,
and sampling keeps it with probability p(d) and otherwise samples from p without d (`accept.accept_sampling` with
`point_mass` logits). Which tokens are proposed depends only on text already committed, never on this round's
draws, so decoding stays lossless. `speculative.propose` gives these rows their lookup and the others the drafter's
block; a round in which every row found a match does not run the drafter at all.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lookup(tokens: list[int], ngram: int, k: int) -> list[int]:
    """The up to `k` tokens that followed the earliest earlier occurrence of `tokens[-ngram:]`, or [] if none."""
    if k < 1 or len(tokens) <= ngram:
        return []
    tail = tokens[-ngram:]
    for i in range(len(tokens) - ngram):  # the occurrence ending at the last token itself is not "earlier"
        if tokens[i] == tail[0] and tokens[i : i + ngram] == tail:
            return tokens[i + ngram : i + ngram + k]
    return []


def point_mass(tokens: Tensor, vocab_size: int) -> Tensor:
    """(b, n) token ids -> (b, n, V) logits with all probability on each token (0 there, -inf elsewhere)."""
    logits = torch.full((*tokens.shape, vocab_size), float("-inf"), device=tokens.device)
    return logits.scatter_(-1, tokens[..., None], 0.0)
