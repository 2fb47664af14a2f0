"""Batched block forwards shared by SFT and Draft-OPD replay.

A training batch is a set of whole sequences (prompt + response), right-padded. The frozen target scores
them once (teacher-forced) to get the context features, or the offline feature cache supplies what that
forward would have given (`Teacher`); the drafter then fills one block per anchor, all
anchors of all sequences in one `draft_logits` call: the same function inference uses, with each block
seeing only context strictly before its anchor and only its own block.
Labels: slot k of the block at anchor a is labelled with the sequence token at position a + k.
Loss mask: which tokens are trained (an answer's; a multi-turn conversation's assistant turns, not the user turns
between them). An anchor is a trained token whose next token is trained too (as at decoding, where a block starts at
the answer's last committed token), and a label counts only where the mask is True, so a block that runs past the end
of an assistant turn is not trained on the next user turn. Without a mask, the response (from its start on) is trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.drafter import Drafter
from ..models.target import ScoreOutput, Target
from .chunked import chunk_rows


@dataclass
class SequenceBatch:
    """tokens/valid: (b, T) right-padded; response_start/lengths: (b,) first response position, true length;
    loss_mask: (b, T) trained tokens, None when every sequence trains its whole response."""

    tokens: Tensor
    valid: Tensor
    response_start: Tensor
    lengths: Tensor
    loss_mask: Tensor | None = None


@dataclass
class BlockLabels:
    """labels (b, n, K) sequence tokens at anchor + k; mask (b, n, K) True where that position exists;
    slots (K,) 1-based slot index."""

    labels: Tensor
    mask: Tensor
    slots: Tensor


def pad_batch(
    sequences: list[list[int]], response_starts: list[int], pad_id: int, device="cpu", loss_masks: list[Tensor] | None = None
) -> SequenceBatch:
    width = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for b, s in enumerate(sequences):
        tokens[b, : len(s)] = torch.as_tensor(s)
    lengths = torch.tensor([len(s) for s in sequences])
    valid = torch.arange(width)[None, :] < lengths[:, None]
    mask = None
    if loss_masks is not None:
        mask = torch.zeros(len(sequences), width, dtype=torch.bool)
        for b, m in enumerate(loss_masks):
            mask[b, : len(m)] = m
        mask = mask.to(device)
    return SequenceBatch(tokens.to(device), valid.to(device), torch.tensor(response_starts, device=device), lengths.to(device), mask)


@dataclass
class Teacher:
    """What the frozen target says about a SequenceBatch: `features` (b, T, L*H) for the drafter's context and `final`
    (b, T, H), the hidden states its head reads (None from a feature cache built without them), from which logits are
    made only at the positions a loss trains (`logits_at`); `cached_greedy` (b, T) a feature cache's argmax labels."""

    features: Tensor
    final: Tensor | None
    cached_greedy: Tensor | None = None

    def greedy(self, target: Target) -> Tensor:
        """(b, T) the target's argmax next token after each position (over its whole vocabulary), computed a chunk of
        positions at a time when not cached."""
        if self.cached_greedy is not None:
            return self.cached_greedy
        flat = self.final.reshape(-1, self.final.shape[-1])
        rows = chunk_rows(target.vocab_size)
        return torch.cat([target.logits(part).argmax(-1) for part in flat.split(rows)]).view(self.final.shape[:-1])

    def final_at(self, pos: Tensor) -> Tensor:
        """The final hidden states at positions pos (b, M, K) -> (b, M, K, H): what the head turns into the target's
        next-token distribution there."""
        return gather_positions(self.final, pos)


def draft_vocab_logits(target: Target, drafter: Drafter, final: Tensor) -> Tensor:
    """The target's next-token logits of final hidden states (..., H), over the drafter's vocabulary (..., V_draft):
    its head rows of the kept tokens (the drafter's own head shares them) with the target's logit scaling (a softmax
    renormalises over the kept tokens)."""
    return target.scale(drafter.head(final))


def teach_online(target: Target, drafter: Drafter, batch: SequenceBatch) -> Teacher:
    scored = score_batch(target, drafter, batch)
    return Teacher(scored.features, scored.final)


def teach_cached(cached: list, batch: SequenceBatch, device) -> Teacher:
    """Teacher of a batch of `data.features.CachedSequence`s (padded like `batch`)."""
    b, width = batch.tokens.shape
    pad = lambda key, *shape: torch.stack(
        [
            torch.cat([getattr(c, key), getattr(c, key).new_zeros(width - len(c.tokens), *shape)])  # noqa: E731
            for c in cached
        ]
    ).to(device)
    final = pad("final", cached[0].final.shape[-1]) if cached[0].final is not None else None
    return Teacher(pad("features", cached[0].features.shape[-1]), final, cached_greedy=pad("greedy"))


def add_feature_noise(features: Tensor, scale: float, gen: torch.Generator, shape: tuple[int, int], rows: slice) -> Tensor:
    """features (b, T, D) + scale x each position's RMS x N(0, 1). The noise is drawn on the CPU for the whole
    micro-batch, `shape` (sequences, longest length), and cut to `rows` and T: every rank draws the same numbers and
    keeps its own, as it does with the anchors, so a torchrun step equals one process's. scale 0: features unchanged."""
    if scale <= 0:
        return features
    noise = torch.randn((*shape, features.shape[-1]), generator=gen)[rows, : features.shape[1]].to(features.device)
    rms = features.float().pow(2).mean(-1, keepdim=True).sqrt()
    return (features.float() + scale * rms * noise).to(features.dtype)


def score_batch(target: Target, drafter: Drafter, batch: SequenceBatch) -> ScoreOutput:
    """One teacher-forced target forward: the drafter's context features and the final hidden states at every position."""
    return target.score(batch.tokens, batch.valid, drafter.spec.target_layer_ids)


def block_hidden(drafter: Drafter, batch: SequenceBatch, features: Tensor, anchors: Tensor, block_tokens: Tensor | None = None) -> Tensor:
    """The drafter's slot hidden states (b, n, K, H) for the blocks at `anchors` (b, n), from the scored context (the
    head, applied by the caller, gives their logits). A sequential drafter (EAGLE-3) is teacher-forced on
    `block_tokens` (b, n, K-1), by default the text's own."""
    ctx, block_tokens = _context(drafter, batch, features, anchors, block_tokens)
    return drafter.hidden(ctx, batch.tokens.gather(1, anchors), anchors, block_tokens)


def block_logits(
    drafter: Drafter, batch: SequenceBatch, features: Tensor, anchors: Tensor, draft_vocab: bool = False, block_tokens: Tensor | None = None
) -> Tensor:
    """Drafter logits (b, n, K, V) for the blocks at `anchors` (b, n), from the scored context; over the draft
    vocabulary (`drafter.forward`) with `draft_vocab`, else over the target's (`draft_logits`, what decoding uses)."""
    ctx, block_tokens = _context(drafter, batch, features, anchors, block_tokens)
    fill = drafter if draft_vocab else drafter.draft_logits
    return fill(ctx, batch.tokens.gather(1, anchors), anchors, block_tokens)


def _context(drafter: Drafter, batch: SequenceBatch, features: Tensor, anchors: Tensor, block_tokens: Tensor | None):
    positions = torch.arange(batch.tokens.shape[1], device=anchors.device).expand_as(batch.tokens)
    following = torch.cat([batch.tokens[:, 1:], batch.tokens[:, -1:]], 1)  # the token after each position (pad at the end)
    ctx = drafter.project_context(features, positions, batch.valid, following)
    if block_tokens is None:
        block_tokens = text_at(batch, anchors, torch.arange(1, drafter.block_size - 1, device=anchors.device))
    return ctx, block_tokens


def text_at(batch: SequenceBatch, anchors: Tensor, slots: Tensor) -> Tensor:
    """The sequence's tokens at anchors + slots (b, n, len(slots)), clamped to its last column."""
    pos = anchors[..., None] + slots
    return batch.tokens.gather(1, pos.clamp(max=batch.tokens.shape[1] - 1).flatten(1)).view_as(pos)


def block_labels(batch: SequenceBatch, anchors: Tensor, anchor_valid: Tensor, block_size: int) -> BlockLabels:
    """Labels of the blocks at `anchors`; a label counts where its position exists and (with a loss mask) is trained."""
    slots = torch.arange(1, block_size, device=anchors.device)
    mask = anchor_valid[..., None] & (anchors[..., None] + slots < batch.lengths[:, None, None])
    if batch.loss_mask is not None:
        pos = (anchors[..., None] + slots).clamp(max=batch.tokens.shape[1] - 1)
        mask = mask & batch.loss_mask.gather(1, pos.flatten(1)).view_as(pos)
    return BlockLabels(text_at(batch, anchors, slots), mask, slots)


def anchor_candidates(start: int, length: int, loss_mask: Tensor | None = None) -> Tensor:
    """Positions a block may start at: trained tokens whose next token is trained, i.e. with a response mask the
    response positions [start, length-2] (each has at least one label)."""
    if loss_mask is None:
        return torch.arange(start, max(start, length - 1))
    return torch.nonzero(loss_mask[:-1] & loss_mask[1:]).flatten()


def draw_anchors(
    starts: list[int], lengths: list[int], per_seq: int, gen: torch.Generator, loss_masks: list[Tensor | None] | None = None
) -> tuple[Tensor, Tensor]:
    """Up to `per_seq` distinct anchors per sequence among its `anchor_candidates` (by default its response positions),
    drawn on the CPU one sequence after another from the sequences' response starts, lengths and loss masks alone (so
    every rank can draw a whole micro-batch's). Returns anchors (b, n) and anchor_valid (b, n); padding anchors are 0."""
    rows, valid_rows = [], []
    for b, (start, length) in enumerate(zip(starts, lengths)):
        candidates = anchor_candidates(start, length, loss_masks[b] if loss_masks is not None else None)
        pick = candidates[torch.randperm(len(candidates), generator=gen)[:per_seq]].sort().values
        rows.append(torch.cat([pick, torch.zeros(per_seq - len(pick), dtype=torch.long)]))
        valid_rows.append(torch.arange(per_seq) < len(pick))
    return torch.stack(rows), torch.stack(valid_rows)


def gather_positions(x: Tensor, pos: Tensor) -> Tensor:
    """Rows of x (b, T, V) at positions pos (b, M, K) -> (b, M, K, V)."""
    idx = pos.flatten(1)[..., None].expand(-1, -1, x.shape[-1])
    return x.gather(1, idx).view(*pos.shape, x.shape[-1])
