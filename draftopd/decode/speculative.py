"""The speculative decoder. It is also the Draft-OPD rollout engine: every call returns rollout traces.

One round is `draft -> verify -> accept -> commit` (`speculative_round`); `generate` is the loop around it.
The drafter drafts one block per row from the current anchor (DFlash in one forward, EAGLE-3 as a chain), the
target verifies `[anchor, d_1..d_K]` in one forward, the acceptance rule keeps `r` drafts plus one target token,
the drafter projects the verified positions' features (each paired with the token after it, which EAGLE-3 needs)
into its context cache, and the commit advances each row's length in both caches: the rejected positions' slots are
overwritten by the next block (`models/target.py`: the ragged preallocated cache, no holes).

Host and device: the round runs on the device without waiting for it; its results (accepted counts, next tokens,
drafts and log-probs) come to the host in one copy at its end (`HostRound`), from which the host appends text, finds
finished rows and keeps the lengths that size the next forward. That copy is the round's one host sync (a second
only with `draft_confidence`, whose cut sizes the verify). Phase times come from `trace.PhaseClock` (CUDA events on a
GPU, read once at the end).

Draft length: `num_drafts` n keeps the first n of the drafter's K slots every round. `draft_confidence` c further
cuts each row's block where the product of the drafter's top probabilities over slots 1..k falls below c, the
drafter's own estimate that slot k is accepted (at least one draft is kept; `confident_drafts`). A verified slot
costs about the same however likely it is, so c is best near that cost in plain decoding steps (a few hundredths
on a CPU: benchmarks/draft_length.py). The cut depends only on the drafter's logits, never on which token was drawn
at a slot, so every row is ordinary speculative decoding with a shorter block: lossless, greedy and sampling.
(Cutting on the drawn token's own probability would not be: it biases sampling towards confident draws; a test
shows it.) The verify pass is as wide as the batch's longest kept block. DFlash still drafts its whole block (one
forward either way); an EAGLE-3 chain stops once no row would propose a further slot.

Prompt lookup (`lookup_ngram` n > 0): a row whose last n tokens occurred earlier in its own text proposes the tokens
that followed (`lookup.py`, up to K of them, a point-mass draft) instead of the drafter's block; a round where every
row found one skips the drafter. The choice reads only committed text, so this too is lossless (`propose`).
`num_drafts` 0 with lookup is prompt lookup alone (the baseline the drafter has to beat): the drafter never drafts,
a round without a match verifies the anchor alone, a plain decoding step (its context is still projected each round).

`autoregressive_generate` is the baseline: the same Target path with blocks of one token.
Rows that hit EOS or max_new_tokens, or (`stop_at_loop`) start repeating themselves (`loops.py`), are finished;
the batch stops when every row is.

Randomness (temperature > 0): one generator seeded with `cfg.seed` for the batch, or, with `row_seeds`, one random
stream per row (`accept.RowRandom`, drawn for the whole batch in one kernel), which follows its row as finished rows
leave; a row's text then depends only on its prompt and its seed, not on the batch it ran in (regeneration uses this
to resume exactly).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import DecodeConfig
from ..models.drafter import ContextCache, DraftContext, Drafter
from ..models.target import Target, TargetState
from .accept import Acceptance, Gen, RowRandom, accept_greedy, accept_sampling, sample
from .lookup import lookup, point_mass
from .loops import LoopWatch
from .trace import Generation, PhaseClock, RolloutTrace


@dataclass
class Draft:
    """tokens (b, K) proposed; logits (b, K, V) they were drawn from."""

    tokens: Tensor
    logits: Tensor

    def first(self, n: int) -> Draft:
        return Draft(self.tokens[:, :n], self.logits[:, :n])


@dataclass
class Proposal:
    """A round's drafts before verification: `limit` (b,) how many each row proposes (None = all), `looked_up` the
    rows whose drafts are prompt lookup's (on the host: lookup reads committed text there)."""

    draft: Draft
    limit: Tensor | None
    looked_up: list[bool]
    width: int | None = None  # the longest row's proposal when the host knows it (not under `draft_confidence`)


@dataclass
class Round:
    draft: Draft  # the drafted block (b, K), or fewer slots where an EAGLE-3 chain stopped early (draft_confidence)
    acceptance: Acceptance
    target_logp: Tensor  # (b, K): log p(d_k | prefix, d_<k) from the verify logits; NaN at slots not proposed
    proposed: Tensor  # (b,): drafts the target checked (K unless `draft_confidence` cut the block)
    looked_up: list[bool]  # per row: the drafts came from prompt lookup, not the drafter


def draft_block(
    drafter: Drafter,
    ctx: DraftContext,
    anchor: Tensor,
    anchor_pos: Tensor,
    temperature: float,
    gen,
    num_drafts: int | None = None,
    confidence: float = 0.0,
) -> Draft:
    """DFlash fills the block in one forward; EAGLE-3 picks slot k before drafting slot k+1 (`Drafter.draft`).
    `num_drafts` (default K) drafts are proposed; an EAGLE-3 chain stops early once `confidence` rules out every row."""
    pick = lambda step_logits: sample(step_logits, temperature, gen)  # noqa: E731
    tokens, logits = drafter.draft(ctx, anchor, anchor_pos, pick, num_drafts, confidence)
    return Draft(tokens, logits)


def propose(
    drafter: Drafter, ctx: DraftContext, anchor: Tensor, anchor_pos: Tensor, cfg: DecodeConfig, gen, history: list[list[int]]
) -> Proposal:
    """The round's drafts: prompt lookup's where a row's text (`history`, ending at its anchor) repeats its last
    `lookup_ngram` tokens, else the drafter's block cut by `num_drafts` and `draft_confidence` (`num_drafts` 0: none,
    that row's round is a plain decoding step). Lookup runs on the host over committed text; its drafts reach the
    device in one copy."""
    found = [lookup(h, cfg.lookup_ngram, drafter.block_size - 1) for h in history] if cfg.lookup_ngram else []
    looked_up = [bool(f) for f in found] or [False] * len(anchor)
    if found and (all(found) or cfg.num_drafts == 0):  # the drafter does not run; lookup only: unmatched rows propose none
        copied, lengths = _lookup_draft(found, drafter.spec.vocab_size, anchor.device)
        return Proposal(copied, lengths, looked_up, max(map(len, found)))
    draft = draft_block(drafter, ctx, anchor, anchor_pos, cfg.temperature, gen, cfg.num_drafts, cfg.draft_confidence)
    limit = confident_drafts(draft.logits, cfg.draft_confidence)
    own = None if limit is not None else draft.tokens.shape[1]  # the confidence cut is known on the device only
    if not any(looked_up):
        return Proposal(draft, limit, looked_up, own)
    copied, lengths = _lookup_draft(found, drafter.spec.vocab_size, anchor.device)
    width = max(draft.tokens.shape[1], copied.tokens.shape[1])
    pick = (lengths > 0)[:, None]  # the rows that found a match
    tokens = torch.where(pick, pad_slots(copied.tokens, width, 0), pad_slots(draft.tokens, width, 0))
    logits = torch.where(pick[..., None], pad_slots(copied.logits.to(draft.logits.dtype), width, 0.0), pad_slots(draft.logits, width, 0.0))
    drafted = torch.full_like(anchor, draft.tokens.shape[1]) if limit is None else limit
    return Proposal(
        Draft(tokens, logits),
        torch.where(pick[:, 0], lengths, drafted),
        looked_up,
        None if own is None else max([own] + [len(f) for f in found]),
    )


def _lookup_draft(found: list[list[int]], vocab_size: int, device: torch.device) -> tuple[Draft, Tensor]:
    """Looked-up tokens as a point-mass draft, rows padded with token 0 (past each row's length: not proposed), and
    each row's length; one host-to-device copy."""
    width = max(map(len, found))  # 0 when no row matched (lookup only): the round verifies its anchors alone
    rows = torch.tensor([[len(f)] + f + [0] * (width - len(f)) for f in found], dtype=torch.long, device=device)
    tokens = rows[:, 1:]
    return Draft(tokens, point_mass(tokens, vocab_size)), rows[:, 0]


def speculative_round(
    target: Target,
    drafter: Drafter,
    state: TargetState,
    ctx: ContextCache,
    anchor: Tensor,
    cfg: DecodeConfig,
    gen,
    clock: PhaseClock,
    history: list[list[int]] = (),
) -> Round:
    """One round for every row: draft, verify, accept, and the verified block's context written into `ctx`. The
    caller commits (`commit_round`) once it has the round on the host. `history`: each row's text up to its anchor
    (prompt lookup reads it). Time in the drafter (drafting and projecting the new context) counts as draft, the
    target forward as verify. No host sync, except one to size the verify with `draft_confidence`."""
    offer = propose(drafter, ctx.view(), anchor, state.lengths, cfg, gen, list(history))
    draft, limit = offer.draft, offer.limit
    width = offer.width if offer.width is not None else int(limit.max())  # the second sync: only under draft_confidence
    proposal = draft if width == draft.tokens.shape[1] else draft.first(width)
    clock.lap("draft")
    block = torch.cat([anchor[:, None], proposal.tokens], 1)
    slots_written = state.lengths[:, None] + torch.arange(block.shape[1], device=block.device)
    verified = target.verify(state, block, drafter.spec.target_layer_ids)
    clock.lap("verify")
    acceptance = accept(verified.logits, proposal, cfg.temperature, gen, limit)
    target_logp = token_logprobs(verified.logits[:, :-1], proposal.tokens)
    clock.lap("other")
    new = drafter.project_context(
        verified.features, slots_written, torch.ones_like(block, dtype=torch.bool), following_tokens(proposal, acceptance)
    )
    ctx.write(new, slots_written)
    clock.lap("draft")
    k = slots(cfg, drafter)
    limit = torch.full_like(acceptance.accepted, draft.tokens.shape[1]) if limit is None else limit
    target_logp = pad_slots(target_logp, k, float("nan")).masked_fill(torch.arange(k, device=block.device) >= limit[:, None], float("nan"))
    return Round(draft, acceptance, target_logp, limit, offer.looked_up)


def token_logprobs(logits: Tensor, tokens: Tensor, rows_per_chunk: int = 64) -> Tensor:
    """log softmax(logits)[token] at each (b, n) slot, in float32, computed `rows_per_chunk` rows of the batch at a time
    so no float32 copy of the whole (b, n, V) logits is made."""
    out = []
    for part, ids in zip(logits.split(rows_per_chunk), tokens.split(rows_per_chunk)):
        part = part.float()
        out.append(part.gather(-1, ids[..., None])[..., 0] - torch.logsumexp(part, -1))
    return torch.cat(out) if out else logits.new_zeros(tokens.shape, dtype=torch.float32)


def slots(cfg: DecodeConfig, drafter: Drafter) -> int:
    """Draft slots a round records: K, or `num_drafts` (prompt lookup may propose up to K whatever `num_drafts`)."""
    return drafter.block_size - 1 if cfg.lookup_ngram or cfg.num_drafts is None else cfg.num_drafts


def pad_slots(x: Tensor, k: int, value: float) -> Tensor:
    """(b, n, ...) -> (b, k, ...), slots n..k-1 filled with `value` (blocks cut short keep the trace rectangular)."""
    return torch.cat([x, x.new_full((x.shape[0], k - x.shape[1], *x.shape[2:]), value)], 1)


def confident_drafts(draft_logits: Tensor, confidence: float) -> Tensor | None:
    """Drafts each row proposes under `draft_confidence` (b,): the slots k whose product of drafter top probabilities
    (temperature 1) over slots 1..k is >= `confidence`, at least 1; None when the cut is off. Logits only: lossless."""
    if confidence <= 0:
        return None
    reach = torch.softmax(draft_logits.float(), -1).amax(-1).cumprod(1)  # non-increasing: the kept slots lead
    return (reach >= confidence).long().sum(1).clamp(min=1)


def following_tokens(draft: Draft, acceptance: Acceptance) -> Tensor:
    """The token after each verified position `[anchor, d_1 .. d_K]`: the drafts, except that the last accepted
    position is followed by the target's correction/bonus token (the positions past it are rejected and overwritten)."""
    nxt = torch.cat([draft.tokens, acceptance.next_token[:, None]], 1)
    return nxt.scatter(1, acceptance.accepted[:, None], acceptance.next_token[:, None])


def prompt_following_tokens(prompts: list[list[int]], first: Tensor, pad_id: int) -> Tensor:
    """The token after each prefill slot, right-padded as `Target.prefill` lays prompts out; each prompt's last token is
    followed by the first new token `first` (b,) (placed on the device: no host sync)."""
    width = max(len(p) for p in prompts)
    rows = torch.tensor(
        [[len(p) - 1] + list(p[1:]) + [pad_id] * (width - len(p) + 1) for p in prompts], dtype=torch.long, device=first.device
    )
    return rows[:, 1:].scatter(1, rows[:, :1], first[:, None])  # one copy to the device


def accept(target_logits: Tensor, draft: Draft, temperature: float, gen, limit: Tensor | None = None) -> Acceptance:
    if temperature <= 0:
        return accept_greedy(target_logits, draft.tokens, limit)
    return accept_sampling(target_logits, draft.logits, draft.tokens, temperature, gen, limit)


@torch.no_grad()
def generate(
    target: Target, drafter: Drafter, prompts: list[list[int]], cfg: DecodeConfig = DecodeConfig(), row_seeds: list[int] | None = None
) -> Generation:
    """Speculative generation for a batch of prompts; lossless at every temperature. One host sync a round (two with
    `draft_confidence`): the round's results come to the host in one copy (`HostRound`)."""
    target.check_prompts(prompts, cfg.max_new_tokens + drafter.block_size)
    if cfg.num_drafts is not None and cfg.num_drafts > drafter.block_size - 1:
        raise ValueError(
            f"num_drafts {cfg.num_drafts}: this drafter drafts at most {drafter.block_size - 1} tokens a round (block size {drafter.block_size})"
        )
    gen = generators(cfg.seed, row_seeds, len(prompts), target.device)
    clock, traces = PhaseClock(target.device), [RolloutTrace(list(p)) for p in prompts]
    capacity = max(len(p) for p in prompts) + cfg.max_new_tokens + drafter.block_size
    state, out = target.prefill(prompts, drafter.spec.target_layer_ids, capacity)
    anchor = sample(out.last_logits, cfg.temperature, gen)
    prompt_ctx = drafter.project_context(
        out.features, state.positions, state.valid, prompt_following_tokens(prompts, anchor, target.pad_id)
    )
    ctx = ContextCache.start(prompt_ctx, state.lengths, state.host_lengths, capacity)
    _append(traces, [[t] for t in anchor.tolist()], target.eos_ids, cfg)
    clock.lap("prefill")
    rows, rounds = _active(traces, list(range(len(traces)))), 0  # batch row -> trace index, finished rows dropped
    state, ctx, anchor, gen = _keep(target, rows, state, ctx, anchor, gen)
    while rows.traces:
        history = [traces[i].tokens for i in rows.traces] if cfg.lookup_ngram else []
        rnd = speculative_round(target, drafter, state, ctx, anchor, cfg, gen, clock, history)
        host = HostRound.of(rnd, cfg.record_draft_logits)  # the round's one device -> host copy
        keep, keep_host = rnd.acceptance.accepted + 1, [r + 1 for r in host.accepted]
        target.commit(state, keep, keep_host)
        ctx.commit(keep, keep_host)
        live = [traces[i] for i in rows.traces]
        _record(live, host)
        _append(live, host.committed(), target.eos_ids, cfg)
        rows = _active(traces, rows.traces)
        state, ctx, anchor, gen = _keep(target, rows, state, ctx, rnd.acceptance.next_token, gen)
        rounds += 1
        clock.lap("other")
    return Generation(traces, clock.timing(rounds))


@dataclass
class HostRound:
    """A round's results on the host, copied in one transfer: accepted/next_token/proposed/looked_up per row, drafts
    (b, k) (-1 where an EAGLE-3 chain stopped early), target_logp/draft_logp (b, k) (NaN where not proposed / drafted),
    and with `record_draft_logits` the drafter's logits (b, k, V)."""

    accepted: list[int]
    next_token: list[int]
    proposed: list[int]
    looked_up: list[bool]
    drafts: Tensor
    target_logp: Tensor
    draft_logp: Tensor
    draft_logits: Tensor | None = None

    @staticmethod
    def of(rnd: Round, keep_logits: bool = False) -> HostRound:
        k = rnd.target_logp.shape[1]  # an EAGLE-3 chain stopped by draft_confidence drafted fewer: -1 / NaN past its end
        draft_logp = pad_slots(token_logprobs(rnd.draft.logits, rnd.draft.tokens), k, float("nan"))
        columns = [
            rnd.acceptance.accepted[:, None],
            rnd.acceptance.next_token[:, None],
            rnd.proposed[:, None],
            pad_slots(rnd.draft.tokens, k, -1),
            rnd.target_logp,
            draft_logp,
        ]
        host = torch.cat([c.double() for c in columns], 1).cpu()  # token ids and float32 values are exact in float64
        ints = host[:, : 3 + k].long()
        logits = pad_slots(rnd.draft.logits, k, float("nan")).cpu() if keep_logits else None
        return HostRound(
            ints[:, 0].tolist(),
            ints[:, 1].tolist(),
            ints[:, 2].tolist(),
            list(rnd.looked_up),
            ints[:, 3:],
            host[:, 3 + k : 3 + 2 * k].float(),
            host[:, 3 + 2 * k :].float(),
            logits,
        )

    def committed(self) -> list[list[int]]:
        """Each row's committed tokens: its accepted drafts and the target's own token."""
        return [row[:r] + [n] for row, r, n in zip(self.drafts.tolist(), self.accepted, self.next_token)]


@dataclass
class Rows:
    """The rows still decoding: `traces` their trace indices, `index` their rows in the previous batch."""

    traces: list[int]
    index: list[int]


def _active(traces: list[RolloutTrace], current: list[int]) -> Rows:
    keep = [b for b, i in enumerate(current) if not traces[i].finish]
    return Rows([current[b] for b in keep], keep)


def _keep(target: Target, rows: Rows, state: TargetState, ctx: ContextCache, anchor: Tensor, gen):
    """State, context, anchors and random streams of the rows still decoding (unchanged when none finished)."""
    if len(rows.index) == len(state.host_lengths):
        return state, ctx, anchor, gen
    index = torch.tensor(rows.index, dtype=torch.long, device=anchor.device)
    return target.select_rows(state, rows.index, index), ctx.select(index, rows.index), anchor[index], _select(gen, index)


def generators(seed: int, row_seeds: list[int] | None, rows: int, device: torch.device) -> Gen:
    """One generator seeded with `seed`, or one random stream per row seeded with `row_seeds` (see the module docstring)."""
    if row_seeds is None:
        return torch.Generator(device=device).manual_seed(seed)
    if len(row_seeds) != rows:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {rows} prompts")
    return RowRandom.seeded(row_seeds, device)


def _select(gen: Gen, index: Tensor) -> Gen:
    """The random streams of the rows still decoding (a batch-wide generator is shared by all rows)."""
    return gen.select(index) if isinstance(gen, RowRandom) else gen


@torch.no_grad()
def autoregressive_generate(
    target: Target, prompts: list[list[int]], cfg: DecodeConfig = DecodeConfig(), row_seeds: list[int] | None = None
) -> Generation:
    """Baseline: one target forward per token through the same prefill/verify/commit path (one host sync a token)."""
    target.check_prompts(prompts, cfg.max_new_tokens)
    gen = generators(cfg.seed, row_seeds, len(prompts), target.device)
    clock, traces = PhaseClock(target.device), [RolloutTrace(list(p)) for p in prompts]
    state, out = target.prefill(prompts, capacity=max(len(p) for p in prompts) + cfg.max_new_tokens)
    token = sample(out.last_logits, cfg.temperature, gen)
    _append(traces, [[t] for t in token.tolist()], target.eos_ids, cfg)
    clock.lap("prefill")
    rows, steps = _active(traces, list(range(len(traces)))), 0
    while rows.traces:
        if len(rows.index) < len(state.host_lengths):
            index = torch.tensor(rows.index, dtype=torch.long, device=token.device)
            state, token, gen = target.select_rows(state, rows.index, index), token[index], _select(gen, index)
        out = target.verify(state, token[:, None])
        clock.lap("verify")
        ones = torch.ones_like(token)
        target.commit(state, ones, [1] * len(rows.traces))
        token = sample(out.logits[:, -1], cfg.temperature, gen)
        _append([traces[i] for i in rows.traces], [[t] for t in token.tolist()], target.eos_ids, cfg)
        rows = _active(traces, rows.traces)
        steps += 1
        clock.lap("other")
    return Generation(traces, clock.timing(steps))


def _record(traces: list[RolloutTrace], host: HostRound) -> None:
    """Append the round to each live row's trace (views of the round's host copy)."""
    for b, trace in enumerate(traces):
        if trace.finish:
            continue
        trace.anchors.append(len(trace.tokens) - 1)
        trace.drafts.append(host.drafts[b])
        trace.accepted.append(host.accepted[b])
        trace.proposed.append(host.proposed[b])
        trace.looked_up.append(host.looked_up[b])
        trace.target_logp.append(host.target_logp[b])
        trace.draft_logp.append(host.draft_logp[b])
        if host.draft_logits is not None:
            trace.draft_logits.append(host.draft_logits[b])


def _append(traces: list[RolloutTrace], committed: list[list[int]], eos_ids: set[int], cfg: DecodeConfig) -> None:
    """Append each row's committed tokens, cutting at EOS, where the row starts looping (`stop_at_loop`) and at
    max_new_tokens."""
    for trace, tokens in zip(traces, committed):
        if trace.finish:
            continue
        if cfg.stop_at_loop and trace.loop_watch is None:
            trace.loop_watch = LoopWatch()
        for token in tokens:
            trace.output.append(token)
            if cfg.stop_at_eos and token in eos_ids:
                trace.finish = "eos"
                break
            if trace.loop_watch is not None and trace.loop_watch.push(token):
                trace.finish = "loop"
                break
            if len(trace.output) >= cfg.max_new_tokens:
                trace.finish = "length"
                break
