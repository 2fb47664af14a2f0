"""The speculative decoder. It is also the Draft-OPD rollout engine: every call returns rollout traces.

One round is `draft -> verify -> accept -> commit` (`speculative_round`); `generate` is the loop around it.
The drafter drafts one block per row from the current anchor (DFlash in one forward, EAGLE-3 as a chain), the
target verifies `[anchor, d_1..d_K]` in one forward, the acceptance rule keeps `r` drafts plus one target token,
the drafter projects the verified positions' features (each paired with the token after it, which EAGLE-3 needs),
and the commit trims the target cache (rejected slots become holes) and the drafter's context follows the same slots.

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

Randomness (temperature > 0): one generator seeded with `cfg.seed` for the batch, or, with `row_seeds`, one
generator per row, which follows its row as finished rows leave; a row's text then depends only on its prompt and
its seed, not on the batch it ran in (regeneration uses this to resume exactly).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import DecodeConfig
from ..models.drafter import DraftContext, Drafter
from ..models.target import Target, TargetState
from .accept import Acceptance, Gen, accept_greedy, accept_sampling, sample
from .lookup import lookup, point_mass
from .loops import LoopWatch
from .trace import Generation, RolloutTrace, Timing


@dataclass
class Draft:
    """tokens (b, K) proposed; logits (b, K, V) they were drawn from."""

    tokens: Tensor
    logits: Tensor

    def first(self, n: int) -> "Draft":
        return Draft(self.tokens[:, :n], self.logits[:, :n])


@dataclass
class Proposal:
    """A round's drafts before verification: `limit` (b,) how many each row proposes (None = all), `looked_up` (b,)
    bool, the rows whose drafts are prompt lookup's."""

    draft: Draft
    limit: Tensor | None
    looked_up: Tensor


@dataclass
class Round:
    draft: Draft  # the drafted block (b, K), or fewer slots where an EAGLE-3 chain stopped early (draft_confidence)
    acceptance: Acceptance
    target_logp: Tensor  # (b, K): log p(d_k | prefix, d_<k) from the verify logits; NaN at slots not proposed
    proposed: Tensor  # (b,): drafts the target checked (K unless `draft_confidence` cut the block)
    looked_up: Tensor  # (b,) bool: the drafts came from prompt lookup, not the drafter


def draft_block(drafter: Drafter, ctx: DraftContext, anchor: Tensor, anchor_pos: Tensor, temperature: float, gen,
                num_drafts: int | None = None, confidence: float = 0.0) -> Draft:
    """DFlash fills the block in one forward; EAGLE-3 picks slot k before drafting slot k+1 (`Drafter.draft`).
    `num_drafts` (default K) drafts are proposed; an EAGLE-3 chain stops early once `confidence` rules out every row."""
    pick = lambda step_logits: sample(step_logits, temperature, gen)  # noqa: E731
    tokens, logits = drafter.draft(ctx, anchor, anchor_pos, pick, num_drafts, confidence)
    return Draft(tokens, logits)


def propose(drafter: Drafter, ctx: DraftContext, anchor: Tensor, anchor_pos: Tensor, cfg: DecodeConfig, gen,
            history: list[list[int]]) -> Proposal:
    """The round's drafts: prompt lookup's where a row's text (`history`, ending at its anchor) repeats its last
    `lookup_ngram` tokens, else the drafter's block cut by `num_drafts` and `draft_confidence` (`num_drafts` 0: none,
    that row's round is a plain decoding step)."""
    found = [lookup(h, cfg.lookup_ngram, drafter.block_size - 1) for h in history] if cfg.lookup_ngram else []
    looked_up = torch.tensor([bool(f) for f in found] or [False] * len(anchor), device=anchor.device)
    if found and (all(found) or cfg.num_drafts == 0):  # the drafter does not run; lookup only: unmatched rows propose none
        return Proposal(_lookup_draft(found, drafter.spec.vocab_size, anchor.device), _lengths(found, anchor.device), looked_up)
    draft = draft_block(drafter, ctx, anchor, anchor_pos, cfg.temperature, gen, cfg.num_drafts, cfg.draft_confidence)
    limit = confident_drafts(draft.logits, cfg.draft_confidence)
    if not looked_up.any():
        return Proposal(draft, limit, looked_up)
    copied = _lookup_draft(found, drafter.spec.vocab_size, anchor.device)
    width = max(draft.tokens.shape[1], copied.tokens.shape[1])
    pick = looked_up[:, None]
    tokens = torch.where(pick, pad_slots(copied.tokens, width, 0), pad_slots(draft.tokens, width, 0))
    logits = torch.where(pick[..., None], pad_slots(copied.logits.to(draft.logits.dtype), width, 0.0), pad_slots(draft.logits, width, 0.0))
    own = torch.full_like(anchor, draft.tokens.shape[1]) if limit is None else limit
    return Proposal(Draft(tokens, logits), torch.where(looked_up, _lengths(found, anchor.device), own), looked_up)


def _lookup_draft(found: list[list[int]], vocab_size: int, device: torch.device) -> Draft:
    """Looked-up tokens as a point-mass draft, rows padded with token 0 (past each row's length: not proposed)."""
    width = max(map(len, found))  # 0 when no row matched (lookup only): the round verifies its anchors alone
    tokens = torch.tensor([f + [0] * (width - len(f)) for f in found], dtype=torch.long, device=device)
    return Draft(tokens, point_mass(tokens, vocab_size))


def _lengths(found: list[list[int]], device: torch.device) -> Tensor:
    return torch.tensor([len(f) for f in found], dtype=torch.long, device=device)


def speculative_round(target: Target, drafter: Drafter, state: TargetState, ctx: DraftContext, anchor: Tensor,
                      cfg: DecodeConfig, gen, timing: Timing, history: list[list[int]] = ()) -> tuple[Round, DraftContext]:
    """One round for every row: draft, verify, accept, commit. Returns the round and the synced context. `history`:
    each row's text up to its anchor (prompt lookup reads it). Time in the drafter (drafting and projecting the new
    context) counts as draft, the target forward as verify."""
    t0 = time.perf_counter()
    offer = propose(drafter, ctx, anchor, state.lengths.clone(), cfg, gen, list(history))
    draft, limit, looked_up = offer.draft, offer.limit, offer.looked_up
    proposal = draft if limit is None else draft.first(int(limit.max()))
    t1 = time.perf_counter()
    verified = target.verify(state, torch.cat([anchor[:, None], proposal.tokens], 1), drafter.spec.target_layer_ids)
    t2 = time.perf_counter()
    acceptance = accept(verified.logits, proposal, cfg.temperature, gen, limit)
    t3 = time.perf_counter()
    width = verified.features.shape[1]
    new_ctx = drafter.project_context(verified.features, state.positions[:, -width:], state.valid[:, -width:], following_tokens(proposal, acceptance))
    t4 = time.perf_counter()
    target.commit(state, acceptance.accepted + 1)
    ctx = ctx.extend(new_ctx).sync(state.valid)
    logp = torch.log_softmax(verified.logits[:, :-1], -1).gather(2, proposal.tokens[..., None])[..., 0]
    k = slots(cfg, drafter)
    limit = torch.full_like(acceptance.accepted, draft.tokens.shape[1]) if limit is None else limit
    logp = pad_slots(logp, k, float("nan")).masked_fill(torch.arange(k, device=logp.device) >= limit[:, None], float("nan"))
    timing.draft_s += (t1 - t0) + (t4 - t3)
    timing.verify_s += t2 - t1
    timing.other_s += (t3 - t2) + (time.perf_counter() - t4)
    return Round(draft, acceptance, logp, limit, looked_up), ctx


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
    position is followed by the target's correction/bonus token (rows past it are rejected and become holes)."""
    nxt = torch.cat([draft.tokens, acceptance.next_token[:, None]], 1)
    return nxt.scatter(1, acceptance.accepted[:, None], acceptance.next_token[:, None])


def prompt_following_tokens(prompts: list[list[int]], first: Tensor, pad_id: int) -> Tensor:
    """The token after each prefill slot, left-padded as `Target.prefill` lays prompts out; the last slot is followed
    by the first new token."""
    width = max(len(p) for p in prompts)
    rows = [([pad_id] * (width - len(p)) + list(p))[1:] + [t] for p, t in zip(prompts, first.tolist())]
    return torch.tensor(rows, dtype=torch.long, device=first.device)


def accept(target_logits: Tensor, draft: Draft, temperature: float, gen, limit: Tensor | None = None) -> Acceptance:
    if temperature <= 0:
        return accept_greedy(target_logits, draft.tokens, limit)
    return accept_sampling(target_logits, draft.logits, draft.tokens, temperature, gen, limit)


@torch.no_grad()
def generate(target: Target, drafter: Drafter, prompts: list[list[int]], cfg: DecodeConfig = DecodeConfig(),
             row_seeds: list[int] | None = None) -> Generation:
    """Speculative generation for a batch of prompts; lossless at every temperature."""
    target.check_prompts(prompts, cfg.max_new_tokens + drafter.block_size)
    if cfg.num_drafts is not None and cfg.num_drafts > drafter.block_size - 1:
        raise ValueError(f"num_drafts {cfg.num_drafts}: this drafter drafts at most {drafter.block_size - 1} tokens a round (block size {drafter.block_size})")
    gen = generators(cfg.seed, row_seeds, len(prompts), target.device)
    timing, traces = Timing(), [RolloutTrace(list(p)) for p in prompts]
    t0 = time.perf_counter()
    state, out = target.prefill(prompts, drafter.spec.target_layer_ids)
    anchor = sample(out.logits[:, -1], cfg.temperature, gen)
    ctx = drafter.project_context(out.features, state.positions, state.valid.clone(), prompt_following_tokens(prompts, anchor, target.pad_id))
    _append(traces, [[t] for t in anchor.tolist()], target.eos_ids, cfg)
    timing.prefill_s = time.perf_counter() - t0
    rows = _active(traces, list(range(len(traces))))  # batch row -> trace index, finished rows dropped
    state, ctx, anchor, gen = target.select_rows(state, rows.index), ctx.select(rows.index), anchor[rows.index], _select(gen, rows.index)
    while rows.traces:
        history = [traces[i].tokens for i in rows.traces] if cfg.lookup_ngram else []
        rnd, ctx = speculative_round(target, drafter, state, ctx, anchor, cfg, gen, timing, history)
        t1 = time.perf_counter()
        live = [traces[i] for i in rows.traces]
        _record(live, rnd, cfg.record_draft_logits)
        committed = [d[:r] + [n] for d, r, n in zip(rnd.draft.tokens.tolist(), rnd.acceptance.accepted.tolist(), rnd.acceptance.next_token.tolist())]
        _append(live, committed, target.eos_ids, cfg)
        rows = _active(traces, rows.traces)
        state, ctx, anchor = target.select_rows(state, rows.index), ctx.select(rows.index), rnd.acceptance.next_token[rows.index]
        gen = _select(gen, rows.index)
        timing.rounds += 1
        timing.other_s += time.perf_counter() - t1
    return Generation(traces, timing)


@dataclass
class Rows:
    """The rows still decoding: `traces` their trace indices, `index` their rows in the previous batch."""

    traces: list[int]
    index: Tensor


def _active(traces: list[RolloutTrace], current: list[int]) -> Rows:
    keep = [b for b, i in enumerate(current) if not traces[i].finish]
    return Rows([current[b] for b in keep], torch.tensor(keep, dtype=torch.long))


def generators(seed: int, row_seeds: list[int] | None, rows: int, device: torch.device) -> Gen:
    """One generator seeded with `seed`, or one per row seeded with `row_seeds` (see the module docstring)."""
    if row_seeds is None:
        return torch.Generator(device=device).manual_seed(seed)
    if len(row_seeds) != rows:
        raise ValueError(f"row_seeds has {len(row_seeds)} seeds for {rows} prompts")
    return [torch.Generator(device=device).manual_seed(s) for s in row_seeds]


def _select(gen: Gen, index: Tensor) -> Gen:
    """The generators of the rows still decoding (a batch-wide generator is shared by all rows)."""
    return [gen[i] for i in index.tolist()] if isinstance(gen, list) else gen


@torch.no_grad()
def autoregressive_generate(target: Target, prompts: list[list[int]], cfg: DecodeConfig = DecodeConfig(),
                            row_seeds: list[int] | None = None) -> Generation:
    """Baseline: one target forward per token through the same prefill/verify/commit path."""
    target.check_prompts(prompts, cfg.max_new_tokens)
    gen = generators(cfg.seed, row_seeds, len(prompts), target.device)
    timing, traces = Timing(), [RolloutTrace(list(p)) for p in prompts]
    t0 = time.perf_counter()
    state, out = target.prefill(prompts)
    token = sample(out.logits[:, -1], cfg.temperature, gen)
    _append(traces, [[t] for t in token.tolist()], target.eos_ids, cfg)
    timing.prefill_s = time.perf_counter() - t0
    rows = _active(traces, list(range(len(traces))))
    state, token, gen = target.select_rows(state, rows.index), token[rows.index], _select(gen, rows.index)
    while rows.traces:
        t1 = time.perf_counter()
        out = target.verify(state, token[:, None])
        t2 = time.perf_counter()
        token = sample(out.logits[:, -1], cfg.temperature, gen)
        _append([traces[i] for i in rows.traces], [[t] for t in token.tolist()], target.eos_ids, cfg)
        rows = _active(traces, rows.traces)
        state, token, gen = target.select_rows(state, rows.index), token[rows.index], _select(gen, rows.index)
        timing.verify_s += t2 - t1
        timing.other_s += time.perf_counter() - t2
        timing.rounds += 1
    return Generation(traces, timing)


def _record(traces: list[RolloutTrace], rnd: Round, keep_logits: bool) -> None:
    """Append the round to each live row's trace. Everything moves to the host once per round, not once per row:
    on a GPU each per-row copy is a synchronisation."""
    k = rnd.target_logp.shape[1]  # an EAGLE-3 chain stopped by draft_confidence drafted fewer: -1 / NaN past its end
    draft_logp = pad_slots(torch.log_softmax(rnd.draft.logits, -1).gather(2, rnd.draft.tokens[..., None])[..., 0], k, float("nan")).cpu()
    drafts, target_logp, accepted, proposed = pad_slots(rnd.draft.tokens, k, -1).cpu(), rnd.target_logp.cpu(), rnd.acceptance.accepted.tolist(), rnd.proposed.tolist()
    looked_up = rnd.looked_up.tolist()
    logits = pad_slots(rnd.draft.logits, k, float("nan")).cpu() if keep_logits else None
    for b, trace in enumerate(traces):
        if trace.finish:
            continue
        trace.anchors.append(len(trace.tokens) - 1)
        trace.drafts.append(drafts[b])
        trace.accepted.append(accepted[b])
        trace.proposed.append(proposed[b])
        trace.looked_up.append(looked_up[b])
        trace.target_logp.append(target_logp[b])
        trace.draft_logp.append(draft_logp[b])
        if keep_logits:
            trace.draft_logits.append(logits[b])


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
