"""Greedy tau without decoding: replay the drafter over the target's own greedy text.

At temperature 0 speculative decoding commits exactly the target's greedy text, and the block drafted at anchor `a`
sees the target's features of the committed text before `a` and the token at `a`. So once that text is known (one
`autoregressive_generate`), a single teacher-forced target forward plus one drafter forward over every response
position give how many drafts verification would accept at each anchor; walking the rounds
(anchor -> anchor + accepted + 1, the last round cut at the text's end) gives the rounds and tau the decoder would
report, without running the decoder. It is cheap enough to track tau along training (the SFT plateau curve) and
equals the decoder's tau up to floating point (tests check it against real decoding in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..decode.stats import bootstrap_ratio_ci
from ..models.dflash import DFlashDrafter
from ..models.target import Target
from ..train.blocks import pad_batch


@dataclass(frozen=True)
class ReplayedText:
    """What the decoder would have done on one greedy text: `accepted` drafts per round, tokens `committed` by
    the rounds (the new tokens minus the first, which the prefill produces)."""

    accepted: tuple[int, ...]
    committed: int

    @property
    def rounds(self) -> int:
        return len(self.accepted)


@dataclass(frozen=True)
class ReplayedTau:
    texts: tuple[ReplayedText, ...]
    block_size: int

    @property
    def tau(self) -> float:
        return sum(t.committed for t in self.texts) / max(sum(t.rounds for t in self.texts), 1)

    def tau_ci(self, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
        """95% percentile bootstrap over texts (prompts), as `evaluate` reports."""
        return bootstrap_ratio_ci([t.committed for t in self.texts], [t.rounds for t in self.texts], resamples=resamples, seed=seed)

    def slot_acceptance(self) -> list[float]:
        """Slot k -> fraction of rounds that accepted at least k drafts (as `decode.stats.summarize`)."""
        rounds = [r for t in self.texts for r in t.accepted]
        return [sum(r >= k for r in rounds) / max(len(rounds), 1) for k in range(1, self.block_size)]


@torch.no_grad()
def accepted_at_anchors(target: Target, drafter: DFlashDrafter, prompt: Sequence[Sequence[int]], output: Sequence[Sequence[int]]) -> list[list[int]]:
    """For each text, the drafts verification would accept at every anchor position P .. P+L-2 (P = prompt length,
    L = output length): leading drafter argmaxes equal to the text's next tokens."""
    seqs = [list(p) + list(o) for p, o in zip(prompt, output)]
    starts = [len(p) for p in prompt]
    batch = pad_batch(seqs, starts, target.pad_id, target.device)
    features = target.score(batch.tokens, batch.valid, drafter.spec.target_layer_ids).features
    n = max(max(len(o) - 1, 1) for o in output)
    offsets = torch.arange(n, device=target.device)
    anchors = (batch.response_start[:, None] + offsets).clamp(max=batch.tokens.shape[1] - 1)  # (b, n)
    positions = torch.arange(batch.tokens.shape[1], device=target.device).expand_as(batch.tokens)
    ctx = drafter.project_context(features, positions, batch.valid)
    guess = drafter.draft_to_target(drafter(ctx, batch.tokens.gather(1, anchors), anchors).argmax(-1))  # (b, n, K-1)
    slots = anchors[..., None] + torch.arange(1, drafter.block_size, device=target.device)
    truth = batch.tokens.gather(1, slots.clamp(max=batch.tokens.shape[1] - 1).flatten(1)).view_as(slots)
    hit = (guess == truth) & (slots < batch.lengths[:, None, None])
    accepted = hit.long().cumprod(-1).sum(-1).tolist()
    return [row[: max(len(o) - 1, 0)] for row, o in zip(accepted, output)]


def walk_rounds(accepted: Sequence[int], length: int) -> ReplayedText:
    """The rounds of a greedy decode of `length` new tokens, given the drafts accepted at each anchor offset."""
    done, rounds = 1, []
    while done < length:
        r = accepted[done - 1]
        rounds.append(r)
        done += min(r + 1, length - done)
    return ReplayedText(tuple(rounds), max(length - 1, 0))


def replay_tau(target: Target, drafter: DFlashDrafter, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
               batch_size: int = 8) -> ReplayedTau:
    """tau of greedy speculative decoding on `prompts`, whose greedy outputs (from `autoregressive_generate`, with
    the same target) are `outputs`: what `evaluate` would measure, without decoding."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    was_training = drafter.training
    drafter.eval()
    texts = []
    for i in range(0, len(prompts), batch_size):
        ps, os_ = prompts[i:i + batch_size], outputs[i:i + batch_size]
        for acc, out in zip(accepted_at_anchors(target, drafter, ps, os_), os_):
            texts.append(walk_rounds(acc, len(out)))
    drafter.train(was_training)
    return ReplayedTau(tuple(texts), drafter.block_size)
