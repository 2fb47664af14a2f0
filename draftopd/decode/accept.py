"""Acceptance rules of speculative decoding, as pure functions over one verified block per row.

Indexing: the verified block is `[anchor, d_1 .. d_K]` (K = B-1). `target_logits[:, j]` is the target's
next-token distribution after block position j, so draft slot k is checked against `target_logits[:, k-1]`,
and `target_logits[:, K]` gives the bonus token when the whole block is accepted.

- Greedy (temperature 0): accept the longest prefix with `d_k == argmax p(. | prefix)`; the next token is the
  target's argmax at the first mismatch (the correction) or after the last slot (the bonus).
- Sampling (temperature T > 0, lossless): accept `d_k` with probability `min(1, p_k(d_k) / q_k(d_k))`; at the
  first rejection sample from `normalise(max(p_k - q_k, 0))`; if all K are accepted sample the bonus from p.
  `p` and `q` are the temperature-T softmaxes. The output is distributed exactly as sampling from the target.
- `limit` (b,), optional: row b proposed only its first `limit[b]` drafts (the rest of the block was drafted but not
  proposed, `speculative.confident_drafts`). Slots past it are never accepted, and a row that accepts all its
  `limit[b]` drafts takes the target's token at slot `limit[b]` as its bonus (argmax, or a sample from p: no q
  there). Lossless as long as `limit` does not depend on the drafted tokens' own values beyond the drafter's logits.

Randomness (`gen`): one `torch.Generator` for the whole batch, or a `RowRandom` with one random stream per row. With
`RowRandom`, row b's draws depend only on its own seed and how many numbers it drew before, so a row's samples do not
depend on which other rows share its batch (exact resume of regeneration); every draw is still one batched kernel
(per-row `torch.Generator`s would launch one per row). The caller keeps it aligned with the rows as finished rows leave.

Probabilities are computed in float32 from logits of any dtype; the greedy rule compares argmaxes in the logits' own
dtype (exact: a float32 copy has the same argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class RowRandom:
    """Per-row random streams, drawn for the whole batch at once. Row b's i-th number is a hash of (seed_b, i)
    (counter-based: murmur3's 32-bit finaliser, chained, in int64 arithmetic that never overflows), so it depends on the
    row's seed and draw count alone. seeds/draws: (b,) int64 on the device."""

    def __init__(self, seeds: Tensor, draws: Tensor | None = None):
        self.seeds = seeds
        self.draws = torch.zeros_like(seeds) if draws is None else draws

    @staticmethod
    def seeded(seeds: list[int], device) -> RowRandom:
        return RowRandom(torch.tensor(seeds, dtype=torch.long, device=device))

    def uniform(self, shape: tuple[int, ...]) -> Tensor:
        """(b, *shape) float32 uniforms in [0, 1) (24 bits), the next prod(shape) numbers of each row's stream."""
        n = 1
        for size in shape:
            n *= size
        counter = self.draws[:, None] + torch.arange(n, device=self.seeds.device)
        self.draws = self.draws + n
        seed = self.seeds[:, None]
        h = _fmix32((counter & _M32) ^ _fmix32(seed & _M32))
        h = _fmix32(h ^ _fmix32(((seed >> 32) & _M32) ^ 0x9E3779B9) ^ (counter >> 32))
        return ((h >> 8).float() * 2.0**-24).view(-1, *shape)

    def select(self, index: Tensor) -> RowRandom:
        return RowRandom(self.seeds[index], self.draws[index])


_M32 = 0xFFFFFFFF


def _mul32(h: Tensor, c: int) -> Tensor:
    """h * c mod 2^32 for 0 <= h < 2^32, with every partial product below 2^63."""
    return (h * (c & 0xFFFF) + ((h * (c >> 16)) & 0xFFFF) * 65536) & _M32


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


Gen = torch.Generator | RowRandom | None


@dataclass
class Acceptance:
    """accepted: (b,) number r of draft tokens kept; next_token: (b,) the target's correction/bonus token."""

    accepted: Tensor
    next_token: Tensor


def accept_greedy(target_logits: Tensor, draft: Tensor, limit: Tensor | None = None) -> Acceptance:
    """target_logits (b, K+1, V), draft (b, K), limit (b,) or None."""
    choice = target_logits.argmax(-1)
    accepted = (proposed(choice[:, :-1] == draft, limit)).long().cumprod(1).sum(1)
    return Acceptance(accepted, choice.gather(1, accepted[:, None])[:, 0])


def accept_sampling(
    target_logits: Tensor, draft_logits: Tensor, draft: Tensor, temperature: float, gen: Gen, limit: Tensor | None = None
) -> Acceptance:
    """target_logits (b, K+1, V), draft_logits (b, K, V) the drafter's logits the drafts were sampled from."""
    p = torch.softmax(target_logits.float() / temperature, -1)
    q = torch.softmax(draft_logits.float() / temperature, -1)
    p_d = p[:, :-1].gather(2, draft[..., None])[..., 0]
    q_d = q.gather(2, draft[..., None])[..., 0]
    u = uniform(p_d.shape, gen, p_d.device)
    accepted = proposed(u * q_d < p_d, limit).long().cumprod(1).sum(1)  # u < p/q, written without dividing by q
    rows = torch.arange(draft.shape[0], device=draft.device)
    p_next = p[rows, accepted]
    q = q * proposed(torch.ones_like(q_d, dtype=torch.bool), limit)[..., None]  # an unproposed slot has no q: residual = p
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], 1)  # slot K+1 (bonus) has no q: residual = p
    residual = (p_next - q_pad[rows, accepted]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_next)
    return Acceptance(accepted, multinomial(residual, gen))


def proposed(ok: Tensor, limit: Tensor | None) -> Tensor:
    """ok (b, K) with the slots past each row's `limit` set False."""
    if limit is None:
        return ok
    return ok & (torch.arange(ok.shape[1], device=ok.device) < limit[:, None])


def sample(logits: Tensor, temperature: float, gen: Gen) -> Tensor:
    """argmax at temperature 0, else one sample per row of softmax(logits / T). logits (..., V) -> (...)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return multinomial(torch.softmax(logits.float() / temperature, -1), gen)


def multinomial(probs: Tensor, gen: Gen) -> Tensor:
    """One draw from each distribution of probs (b, ..., V) -> (b, ...). With `RowRandom`, by the inverse of each
    distribution's CDF at one uniform per distribution (a zero-probability token is never drawn)."""
    if isinstance(gen, RowRandom):
        cdf = probs.float().cumsum(-1)
        point = gen.uniform(tuple(probs.shape[1:-1]))[..., None] * cdf[..., -1:]
        return torch.searchsorted(cdf, point, right=True)[..., 0].clamp(max=probs.shape[-1] - 1)
    return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).view(probs.shape[:-1])


def uniform(shape: torch.Size, gen: Gen, device: torch.device) -> Tensor:
    """U(0, 1) draws of `shape` (b, ...)."""
    if isinstance(gen, RowRandom):
        return gen.uniform(tuple(shape[1:]))
    return torch.rand(shape, generator=gen, device=device)
