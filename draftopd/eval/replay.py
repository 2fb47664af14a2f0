"""Greedy tau without decoding: replay the drafter over the target's own greedy text.

At temperature 0 speculative decoding commits exactly the target's greedy text, and the block drafted at anchor `a`
sees the target's features of the committed text before `a` and the token at `a`. So once that text is known (one
`autoregressive_generate`), a single teacher-forced target forward plus one drafter forward over every response
position give how many drafts verification would accept at each anchor; walking the rounds
(anchor -> anchor + accepted + 1, the last round cut at the text's end) gives the rounds and tau the decoder would
report, without running the decoder. A sequential drafter (EAGLE-3) is teacher-forced on the text, which is its own
greedy chain for as long as its drafts match it, the only part acceptance counts. It is cheap enough to track tau along training (the SFT plateau curve) and
equals the decoder's tau up to floating point (tests check it against real decoding in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import DecodeConfig, EvalConfig
from ..data.prompts import load_prompts, render_prompt
from ..decode.speculative import autoregressive_generate
from ..decode.stats import bootstrap_ratio_ci
from ..models.drafter import Drafter
from ..models.target import Target
from ..train.blocks import SequenceBatch, block_logits, pad_batch, text_at


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

    @staticmethod
    def pool(reps: Sequence[ReplayedTau]) -> ReplayedTau:
        """Several sets' texts as one set (the "all" row)."""
        return ReplayedTau(tuple(t for r in reps for t in r.texts), reps[0].block_size)

    def slot_acceptance(self) -> list[float]:
        """Slot k -> fraction of rounds that accepted at least k drafts (as `decode.stats.summarize`)."""
        rounds = [r for t in self.texts for r in t.accepted]
        return [sum(r >= k for r in rounds) / max(len(rounds), 1) for k in range(1, self.block_size)]


@dataclass(frozen=True)
class ScoredTexts:
    """A batch of greedy texts with the target's context features (what every drafter's replay needs; the target is
    frozen, so drafters fed the same layers can share them). `lengths` are the output lengths."""

    batch: SequenceBatch
    features: torch.Tensor
    layer_ids: tuple[int, ...]
    lengths: tuple[int, ...]


@torch.no_grad()
def score_texts(
    target: Target, layer_ids: tuple[int, ...], prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], batch_size: int = 8
) -> list[ScoredTexts]:
    """One teacher-forced target forward per batch of `prompt + output` texts."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    scored = []
    for i in range(0, len(prompts), batch_size):
        ps, os_ = prompts[i : i + batch_size], outputs[i : i + batch_size]
        batch = pad_batch([list(p) + list(o) for p, o in zip(ps, os_)], [len(p) for p in ps], target.pad_id, target.device)
        features = target.score(batch.tokens, batch.valid, tuple(layer_ids)).features
        scored.append(ScoredTexts(batch, features, tuple(layer_ids), tuple(len(o) for o in os_)))
    return scored


@torch.no_grad()
def anchor_logits(drafter: Drafter, scored: ScoredTexts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The drafter's block at every anchor position P .. P+L-2 of each text (P = prompt length, L = output length):
    draft-vocabulary logits (b, n, K-1, V_draft), the text's tokens at slots 1..K-1 (b, n, K-1, target ids), and
    which of those slots lie inside the text (b, n, K-1)."""
    if tuple(drafter.spec.target_layer_ids) != scored.layer_ids:
        raise ValueError(f"texts were scored for target layers {scored.layer_ids}, the drafter reads {drafter.spec.target_layer_ids}")
    batch, device = scored.batch, scored.batch.tokens.device
    n = max(max(length - 1, 1) for length in scored.lengths)
    anchors = (batch.response_start[:, None] + torch.arange(n, device=device)).clamp(max=batch.tokens.shape[1] - 1)  # (b, n)
    slots = torch.arange(1, drafter.block_size, device=device)
    logits = block_logits(drafter, batch, scored.features, anchors, draft_vocab=True)
    return logits, text_at(batch, anchors, slots), anchors[..., None] + slots < batch.lengths[:, None, None]


@torch.no_grad()
def accepted_at_anchors(drafter: Drafter, scored: ScoredTexts) -> list[list[int]]:
    """For each text, the drafts verification would accept at every anchor position (`anchor_logits`): leading
    drafter argmaxes equal to the text's next tokens."""
    logits, truth, inside = anchor_logits(drafter, scored)
    hit = (drafter.draft_to_target(logits.argmax(-1)) == truth) & inside
    accepted = hit.long().cumprod(-1).sum(-1).tolist()
    return [row[: max(length - 1, 0)] for row, length in zip(accepted, scored.lengths)]


def walk_rounds(accepted: Sequence[int], length: int) -> ReplayedText:
    """The rounds of a greedy decode of `length` new tokens, given the drafts accepted at each anchor offset."""
    done, rounds = 1, []
    while done < length:
        r = accepted[done - 1]
        rounds.append(r)
        done += min(r + 1, length - done)
    return ReplayedText(tuple(rounds), max(length - 1, 0))


def replay_scored(drafter: Drafter, scored: Sequence[ScoredTexts]) -> ReplayedTau:
    """tau of greedy speculative decoding over texts already scored by the target (`score_texts`)."""
    was_training = drafter.training
    drafter.eval()
    texts = [walk_rounds(acc, length) for s in scored for acc, length in zip(accepted_at_anchors(drafter, s), s.lengths)]
    drafter.train(was_training)
    return ReplayedTau(tuple(texts), drafter.block_size)


def replay_tau(
    target: Target, drafter: Drafter, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]], batch_size: int = 8
) -> ReplayedTau:
    """tau of greedy speculative decoding on `prompts`, whose greedy outputs (from `autoregressive_generate`, with
    the same target) are `outputs`: what `evaluate` would measure, without decoding."""
    return replay_scored(drafter, score_texts(target, drafter.spec.target_layer_ids, prompts, outputs, batch_size))


def greedy_references(target: Target, cfg: EvalConfig = EvalConfig()) -> dict[str, tuple[list[list[int]], list[list[int]]]]:
    """Per evaluation set, the rendered prompts `draftopd eval` uses and the target's greedy answers to them
    (`cfg.decode.max_new_tokens`): the texts replay scores drafters on."""
    refs = {}
    for name in cfg.sets:
        prompts = [render_prompt(p, target.tokenizer) for p in load_prompts(name, limit=cfg.num_prompts, seed=cfg.decode.seed).prompts]
        outputs = [
            list(t.output) for t in autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=cfg.decode.max_new_tokens)).traces
        ]
        refs[name] = (prompts, outputs)
    return refs
