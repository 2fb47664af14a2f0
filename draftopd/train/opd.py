"""Draft-OPD: on-policy distillation for the drafter.  prompt -> rollout -> anchors -> replay -> loss -> update.

One optimizer step (`train_opd`, the story function):
1. **rollout**: `rollouts_per_step` batches of prompts are decoded by the speculative decoder itself
   (`decode.speculative.generate`, the same code path as inference) with the *current* drafter. Each trace
   records anchors, drafted blocks, accepted counts and the target's log-probs of every drafted token given
   the draft prefix, read from the verify logits.
2. **anchors**: segments at the rollout's error positions (or, ablation, the accepted stream at random ones) ->
   `anchors.py`.
3. **replay**: per micro-batch of traces, one teacher-forced target forward over the final sequences gives
   the context features and `p` on the true prefix; the drafter re-fills every segment's block in one
   batched forward with gradients (`blocks.block_logits`, the function inference drafts with, so the replayed
   logits equal the rollout's for the same weights). An EAGLE-3 chain is teacher-forced on the rollout's own
   drafts, so slot k after a rejection sees the same wrong prefix the target's log-prob was taken on.
4. **loss**: accepted stream (slots 1..r+1, labels = final response tokens, `p` on the true prefix) and
   rejected stream (slots r+1..K, tokens = the drafter's own proposals, `p` given the draft prefix, decayed
   by gamma^(k-1); or only slot r+1; or only the proposals that differ from the final text), each KL direction
   and exact/estimate form a switch, and so is cross-entropy on the accepted stream's tokens (`losses.py`). The step's token counts are computed before the replay so
   accumulated micro-batches normalise by tokens.
   Defaults follow the authors' code: single-token estimators with their clamps, pooled aggregation, lr 3e-4
   cosine with 5% warm-up (at least `OptimConfig.min_warmup_steps`).
5. **update**: one AdamW step; the next rollout uses the new weights (always on-policy).

Under torchrun (`distributed.py`) each rank rolls out its share of every rollout batch and replays its own traces;
the traces (token ids and per-round drafts and log-probs, a few KB each) are gathered so that every rank computes
the anchors (drawing the random ablation's in the single process's order), the step's normalisers and the rollout
metrics over all of them, and gradients, losses and compute are summed over ranks: the update is the single
process's on the same prompts. At temperature > 0 each prompt samples from its own generator, seeded by its place
in the prompt stream, so its rollout does not depend on the batch or the rank it ran in.

Which target computation is reused: in "estimate" mode the rejected stream's `log p` comes straight from the
rollout's verify logits (no second forward); the accepted stream and the context features come from one
teacher-forced forward per sequence: T tokens in one batched pass, against the rollout's (T / tau) * B tokens
in T / tau sequential passes, and far less memory than keeping V-sized verify logits for every round
(`time/replay_teacher_s` against `time/rollout_s` in metrics.jsonl measures it). "exact" mode needs `p`'s full distribution on
the draft prefixes, which the rollout does not keep, so it re-verifies every segment in one forward
(`Target.score_blocks`).

Compute is counted by phase (`compute/flops_rollout`, `_teacher`, `_train` in metrics.jsonl): rollout = prompt
prefill + verify forwards of the target and the drafter's drafting forwards; teacher = the replay's target
forwards; train = the drafter's forward + backward at 6 * params per token. Continued SFT counts the same way.
The diagnostic `rollout/rej_late_match` is how often a rejected proposal after a block's first rejected slot
equals the token the target finally produced at that position (a DFlash slot does not see the drafts before
it, so such a proposal can be right even though its prefix was wrong; reverse KL on it pushes a right token
down).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import AUTOCAST, DecodeConfig, OptimConfig
from ..decode.speculative import generate
from ..decode.stats import rejected_late_match, summarize
from ..decode.trace import Generation, RolloutTrace, Timing
from ..models.drafter import Drafter
from ..models.target import Target
from . import distributed as ddp
from .anchors import Segments, make_segments
from .blocks import SequenceBatch, block_hidden, block_labels, draft_vocab_logits, gather_positions, pad_batch, score_batch
from .chunked import chunk_rows, chunked_sum
from .common import Compute, TrainerState, data_order, param_counts, train_autocast
from .losses import LossConfig, StreamSums, combine_streams, decay_weights, kl_estimate, kl_exact
from .sft import logit_width
from .tracking import RunInfo, memory_metrics


@dataclass(frozen=True)
class OPDConfig:
    steps: int = field(default=20, metadata={"help": "optimizer steps"})
    prompts_per_rollout: int = field(
        default=4, metadata={"help": "prompts a rollout batch (a ragged batch through the speculative decoder)"}
    )
    rollouts_per_step: int = field(default=2, metadata={"help": "rollout batches accumulated into one optimizer step"})
    replay_batch: int = field(default=4, metadata={"help": "traces a replay micro-batch"})
    anchors: str = field(
        default="error",
        metadata={
            "help": "error (the method) or random (ablation: the accepted stream at random positions)",
            "choices": ("error", "random"),
        },
    )
    save_every: int = field(default=10, metadata={"help": "steps between checkpoints"})
    max_flops: float | None = field(default=None, metadata={"help": "stop once this much compute is spent (compute-matched runs)"})
    autocast: str = field(
        default="auto",
        metadata={
            "help": "the replay's drafter forward (and backward) under bf16 autocast, as SFT's: auto = bfloat16 where it is fast (CUDA, "
            "AVX512-BF16 CPUs); weights, AdamW state and the losses stay float32",
            "choices": AUTOCAST,
        },
    )
    rollout: DecodeConfig = field(
        default_factory=lambda: DecodeConfig(max_new_tokens=96),
        metadata={
            "help": "the rollouts' decoding (the paper: greedy; temperature > 0 is lossless speculative sampling), every slot drafted; "
            "its seed is the run's (prompt order, anchors, sampling)"
        },
    )
    loss: LossConfig = field(default_factory=LossConfig, metadata={"help": "the two streams' losses"})
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4), metadata={"help": "optimizer and schedule"})

    def __post_init__(self) -> None:
        from ..config import ConfigError, check_choice, check_ints, check_number

        check_ints(self, 1, "steps", "prompts_per_rollout", "rollouts_per_step", "replay_batch", "save_every")
        check_choice(self, "anchors")
        check_choice(self, "autocast")
        check_number(self, "max_flops", 0, above=True, optional=True)
        r = self.rollout
        if (r.num_drafts, r.draft_confidence, r.lookup_ngram) != (None, 0.0, 0):
            raise ConfigError("Draft-OPD rollouts draft every slot: --num-drafts, --draft-confidence and --lookup-ngram stay unset")


@dataclass
class ReplayBatch:
    """Padded segments of a micro-batch of traces, on the target's device: anchors/accepted/acc_on/rej_on (b, M)
    (padding: both off); drafts/target_logp (b, M, K). On the host: the traces and their segments, so the replay
    sizes and counts everything (`stream_counts`) without reading the device."""

    seq: SequenceBatch
    anchors: torch.Tensor
    accepted: torch.Tensor
    acc_on: torch.Tensor
    rej_on: torch.Tensor
    drafts: torch.Tensor
    target_logp: torch.Tensor
    traces: list[RolloutTrace]
    segments: list[Segments]

    @property
    def valid(self) -> torch.Tensor:
        return self.acc_on | self.rej_on

    @property
    def lengths(self) -> list[int]:
        return [len(t.tokens) for t in self.traces]

    @property
    def rej_segments(self) -> list[list[int]]:
        """Per trace, the indices of its segments that feed the rejected stream."""
        return [s.rej_on.nonzero()[:, 0].tolist() for s in self.segments]

    @property
    def replayed(self) -> int:
        """Segments replayed (either stream)."""
        return sum(int((s.acc_on | s.rej_on).sum()) for s in self.segments)


@dataclass(frozen=True)
class StreamCounts:
    """A set of traces' stream sizes: accepted-stream tokens, rejected-stream tokens and their decay-weight sum."""

    acc_tokens: int
    rej_tokens: int
    rej_weight: float


@dataclass
class ReplayResult:
    acc: StreamSums
    rej: StreamSums
    target_tokens: int
    draft_tokens: int
    teacher_s: float  # time in the target's replay forwards (teacher-forced score + re-verify)


def stream_masks(
    accepted: torch.Tensor,
    acc_on: torch.Tensor,
    rej_on: torch.Tensor,
    label_mask: torch.Tensor,
    slots: torch.Tensor,
    cfg: LossConfig,
    right: torch.Tensor | None = None,
):
    """Accepted stream: slots k <= r+1 whose label exists, in segments that feed it. Rejected: slots k > r (the
    drafter's rejected proposals; only k = r+1 with `rej_slots="first"`; with `"wrong"` not where `right`, the
    proposal equals the final text's token), weighted gamma^(k-1). Shapes (b, M, K)."""
    r = accepted[..., None]
    acc = label_mask & acc_on[..., None] & (slots <= r + 1)
    rej = rej_on[..., None] & ((slots == r + 1) if cfg.rej_slots == "first" else (slots > r)) & cfg.use_rejected
    if cfg.rej_slots == "wrong":
        if right is None:
            raise ValueError('rej_slots="wrong" needs `right`: where each proposal equals the final text')
        rej = rej & ~right
    return acc, rej, decay_weights(slots, cfg.gamma) * rej


def proposal_right(drafts: torch.Tensor, labels: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Where a drafted token equals the token the final text has at its position (never past the text's end)."""
    return label_mask & (drafts == labels)


def stream_counts(traces: list[RolloutTrace], segments: list[Segments], block_size: int, cfg: LossConfig) -> StreamCounts:
    """The traces' stream sizes, from their host-side segments (no device work)."""
    acc_n, rej_n, rej_w = 0, 0, 0.0
    slots = torch.arange(1, block_size)
    for trace, seg in zip(traces, segments):
        pos = seg.anchors[:, None] + slots
        exists = pos < len(trace.tokens)
        text = torch.as_tensor(trace.tokens)[pos.clamp(max=len(trace.tokens) - 1)]
        acc, rej, w = stream_masks(seg.accepted, seg.acc_on, seg.rej_on, exists, slots, cfg, proposal_right(seg.drafts, text, exists))
        acc_n, rej_n, rej_w = acc_n + int(acc.sum()), rej_n + int(rej.sum()), rej_w + float(w.sum())
    return StreamCounts(acc_n, rej_n, rej_w)


def step_norms(traces: list[RolloutTrace], segments: list[Segments], block_size: int, cfg: LossConfig) -> tuple[float, float]:
    """The whole step's accepted-token count and rejected weight sum (token-normalised accumulation)."""
    counts = stream_counts(traces, segments, block_size, cfg)
    return float(counts.acc_tokens), counts.rej_weight


def collate(target: Target, drafter: Drafter, traces: list[RolloutTrace], segments: list[Segments]) -> ReplayBatch:
    """The traces' segments padded into one batch on the target's device (built on the host, one copy a tensor)."""
    device = target.device
    seq = pad_batch([t.tokens for t in traces], [len(t.prompt) for t in traces], target.pad_id, device)
    width, k = max(len(s.anchors) for s in segments), drafter.block_size - 1
    pad = lambda xs, shape, fill: torch.stack([torch.cat([x, torch.full((width - len(x), *shape), fill, dtype=x.dtype)]) for x in xs]).to(
        device
    )  # noqa: E731
    return ReplayBatch(
        seq,
        pad([s.anchors for s in segments], (), 0),
        pad([s.accepted for s in segments], (), 0),
        pad([s.acc_on for s in segments], (), False),
        pad([s.rej_on for s in segments], (), False),
        pad([s.drafts for s in segments], (k,), 0),
        pad([s.target_logp for s in segments], (k,), 0.0),
        traces,
        segments,
    )


def reverify(target: Target, rb: ReplayBatch) -> torch.Tensor:
    """The target's final hidden states at every drafted slot given its draft prefix: (b, M, K, H), one forward per
    sequence, only for the segments that feed the rejected stream (zeros elsewhere: random anchors' accepted-only
    segments); `Target.logits` of a slot's state is p(. | prefix, d_<k)."""
    out = []
    for b, idx in enumerate(rb.rej_segments):
        index = torch.tensor(idx, dtype=torch.long, device=rb.anchors.device)
        anchors = rb.anchors[b, index]
        blocks = torch.cat([rb.seq.tokens[b, anchors][:, None], rb.drafts[b, index, :-1]], 1)
        hidden = target.score_blocks(rb.seq.tokens[b, : rb.lengths[b]], anchors, blocks)
        full = hidden.new_zeros(rb.anchors.shape[1], *hidden.shape[1:])
        out.append(full.index_copy(0, index, hidden))
    return torch.stack(out)


def replay(target: Target, drafter: Drafter, rb: ReplayBatch, cfg: LossConfig, autocast: str = "float32") -> ReplayResult:
    """Replay the drafter at every segment with gradients and return the two streams' loss sums. The drafter's head
    and both KL terms run a chunk of slots at a time (`chunked.py`), so no tensor holds every slot's logits; the
    target's log-probs come from its final hidden states, through its head, only where a stream needs them."""
    t0 = time.perf_counter()
    scored = score_batch(target, drafter, rb.seq)
    teacher_s = time.perf_counter() - t0
    lab = block_labels(rb.seq, rb.anchors, rb.valid, drafter.block_size)
    # a sequential drafter (EAGLE-3) replays its own drafts where the rejected stream is trained, the text elsewhere
    chain = torch.where(rb.rej_on[..., None], rb.drafts, lab.labels)[..., :-1]
    acc_mask, rej_mask, rej_w = stream_masks(
        rb.accepted, rb.acc_on, rb.rej_on, lab.mask, lab.slots, cfg, proposal_right(rb.drafts, lab.labels, lab.mask)
    )
    pos = (rb.anchors[..., None] + lab.slots - 1).clamp(max=rb.seq.tokens.shape[1] - 1)  # p of token a+k sits at a+k-1
    exact = cfg.mode == "exact"
    t0 = time.perf_counter()
    if exact:  # p's distributions: on the true prefix (accepted stream) and on the draft prefix (rejected stream)
        p_acc, p_rej = gather_positions(scored.final, pos), reverify(target, rb)
    else:  # log-probs of the observed tokens: the text's next token, and the rollout's own verify log-probs
        p_acc, p_rej = gather_positions(next_token_logprobs(target, scored.final, rb.seq.tokens)[..., None], pos)[..., 0], rb.target_logp
    teacher_s += time.perf_counter() - t0
    labels, drafts = drafter.target_to_draft(lab.labels), drafter.target_to_draft(rb.drafts)

    def chunk_loss(hidden, label, draft, acc_w, rej_weight, p_acc_part, p_rej_part):
        q_logits = drafter.head(hidden)
        q_logp = None if exact and cfg.acc_loss == "kl" else torch.log_softmax(q_logits.float(), -1)
        at = lambda ids: torch.where(ids >= 0, q_logp.gather(-1, ids.clamp(min=0)[:, None])[:, 0], float("-inf"))  # noqa: E731
        # exact: over the draft vocabulary, p renormalised there (a reduced head's q is 0 elsewhere, as SFT's soft labels);
        # estimate: a token outside a reduced vocabulary has q = 0 (log q = -inf), as over the target's vocabulary
        if cfg.acc_loss == "ce":  # hard labels; a token outside a reduced vocabulary cannot be learnt and adds nothing
            acc_tok = torch.where(label >= 0, -at(label), 0.0)
        elif exact:
            acc_tok = kl_exact(draft_vocab_logits(target, drafter, p_acc_part), q_logits, cfg.acc_direction)
        else:
            acc_tok = kl_estimate(p_acc_part, at(label), cfg.acc_direction, cfg.clamp, cfg.floor)
        if exact:
            rej_tok = kl_exact(draft_vocab_logits(target, drafter, p_rej_part), q_logits, cfg.rej_direction)
        else:
            rej_tok = kl_estimate(p_rej_part, at(draft), cfg.rej_direction, cfg.clamp, cfg.floor)
        zero = acc_tok.new_zeros(())
        return torch.where(acc_w > 0, acc_tok * acc_w, zero).sum(), torch.where(rej_weight > 0, rej_tok * rej_weight, zero).sum()

    flat = lambda x: x.flatten(0, 2)  # noqa: E731  (b, M, K, ...) -> (b*M*K, ...)
    with train_autocast(autocast, target.device):
        hidden = block_hidden(drafter, rb.seq, scored.features, rb.anchors, block_tokens=chain)
        acc_sum, rej_sum = chunked_sum(
            chunk_loss,
            chunk_rows(logit_width(drafter)),
            flat(hidden),
            flat(labels),
            flat(drafts),
            flat(acc_mask.float()),
            flat(rej_w),
            flat(p_acc),
            flat(p_rej),
        )
    c = stream_counts(rb.traces, rb.segments, drafter.block_size, cfg)
    return ReplayResult(
        StreamSums(acc_sum, float(c.acc_tokens), c.acc_tokens),
        StreamSums(rej_sum, c.rej_weight, c.rej_tokens),
        sum(rb.lengths) + (sum(map(len, rb.rej_segments)) * (drafter.block_size - 1) if exact else 0),
        rb.replayed * drafter.block_size,
        teacher_s,
    )


def next_token_logprobs(target: Target, final: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """(b, T): log p(tokens[:, t+1] | tokens[:, :t+1]) at each position t from the final hidden states (b, T, H) (the last
    position scores the pad after it), through the target's head a chunk of positions at a time, in float32."""
    following = torch.cat([tokens[:, 1:], tokens[:, -1:]], 1).flatten()
    rows = chunk_rows(target.vocab_size)
    out = []
    for hidden, ids in zip(final.flatten(0, 1).split(rows), following.split(rows)):
        logits = target.logits(hidden).float()
        out.append(logits.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(logits, -1))
    return torch.cat(out).view(tokens.shape)


def rollout_batch(prompts: list[list[int]], cfg: OPDConfig, start: int) -> tuple[list[list[int]], list[int] | None]:
    """This rank's share of the rollout batch at prompt-stream position `start`, and its rows' sampling seeds
    (temperature > 0; one per prompt, from its stream position)."""
    rows, n = ddp.shard(cfg.prompts_per_rollout), cfg.prompts_per_rollout
    seed = cfg.rollout.seed
    batch = [prompts[i] for i in data_order(len(prompts), seed, start, n)][rows]
    seeds = [seed * 1_000_003 + pos for pos in range(start, start + n)][rows]
    return batch, seeds if cfg.rollout.temperature > 0 else None


def train_opd(
    target: Target,
    drafter: Drafter,
    prompts: list[list[int]],
    cfg: OPDConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[int, Drafter, Compute], None] | None = None,
    run: RunInfo | None = None,
) -> Path:
    """Draft-OPD on `prompts` (token ids) against `target`; trains `drafter` in place, returns the final checkpoint folder.
    `stop_after` ends early (a simulated kill); resume, folder rules and `run` as `train_sft`."""
    out_dir = Path(out_dir)
    st = TrainerState.start(
        "draft-opd", target, drafter, cfg.optim, cfg.steps, cfg.rollout.seed, out_dir, resume, split=(cfg, "prompts_per_rollout"), run=run
    )
    compute = st.compute
    target_params, draft_params = param_counts(target, drafter)
    drafter.checkpoint_layers = cfg.optim.checkpoint_layers
    bar = tqdm(total=cfg.steps, initial=st.step, desc="draft-opd", disable=not progress or not ddp.is_main(), dynamic_ncols=True)
    while st.running(cfg.steps, stop_after, cfg.max_flops):
        # 1. rollout with the current drafter through the speculative decoder (this rank's share of the prompts)
        t0, spent, shards = time.perf_counter(), compute.copy(), []
        drafter.eval()
        for _ in range(cfg.rollouts_per_step):
            batch, row_seeds = rollout_batch(prompts, cfg, st.data_pos)
            st.data_pos += cfg.prompts_per_rollout
            rollout = generate(target, drafter, batch, replace(cfg.rollout, seed=cfg.rollout.seed + st.data_pos), row_seeds)
            shards.append([t for t in rollout.traces if t.rounds > 0])
            verified = sum(t.rounds for t in rollout.traces) * drafter.block_size  # finished rows leave the batch
            compute.add_target(sum(len(p) for p in batch) + verified, target_params, "rollout")
            compute.add_draft_forward(verified, draft_params, "rollout")
        traces, own = ddp.gather_shards(shards)  # every rank's traces, in the single process's order; `own`: this rank's
        t1 = time.perf_counter()
        # 2. anchors, and the step's normalisers (over every rank's traces)
        segments = [make_segments(t, cfg.anchors, st.gen) for t in traces]
        acc_norm, rej_norm = step_norms(traces, segments, drafter.block_size, cfg.loss)
        # 3-4. replay and loss, accumulated over micro-batches
        drafter.train()
        st.opt.zero_grad(set_to_none=True)
        losses, teacher_s = torch.zeros(3, device=target.device), 0.0  # total, acc, rej: summed on the device
        for i in range(0, len(own), cfg.replay_batch):
            mine = own[i : i + cfg.replay_batch]
            rb = collate(target, drafter, [traces[j] for j in mine], [segments[j] for j in mine])
            res = replay(target, drafter, rb, cfg.loss, cfg.autocast)
            loss = combine_streams(res.acc, res.rej, acc_norm, rej_norm, cfg.loss)
            loss.backward()
            losses += torch.stack(
                [loss.detach(), res.acc.loss_sum.detach() / max(acc_norm, 1e-9), res.rej.loss_sum.detach() / max(rej_norm, 1e-9)]
            )
            teacher_s += res.teacher_s
            compute.add_target(res.target_tokens, target_params)
            compute.add_draft_train(res.draft_tokens, draft_params)
        ddp.sum_grads(drafter)
        compute.add_ranks(spent)
        t2 = time.perf_counter()
        # 5. update
        grad_norm = torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.optim.grad_clip)
        st.opt.step(), st.sched.step()
        st.step += 1
        step = st.step
        total, acc_loss, rej_loss, grad = torch.cat([ddp.all_sum(losses), grad_norm.float()[None]]).tolist()  # the update's one host sync
        t3 = time.perf_counter()
        stats = summarize(Generation(traces, Timing()), drafter.block_size)
        late = rejected_late_match(traces)
        row = {
            "rollout/tau": stats.tau,
            **{f"rollout/slot_acc_{k + 1}": a for k, a in enumerate(stats.slot_acceptance)},
            "rollout/rej_late_match": late.rate,
            "rollout/rej_late_n": late.count,
            "rollout/sequences": len(traces),
            "rollout/acc_tokens": acc_norm,
            "rollout/rej_weight": rej_norm,
            "train/loss": total,
            "train/loss_acc": acc_loss,
            "train/loss_rej": rej_loss,
            "train/grad_norm": grad,
            "train/lr": st.sched.get_last_lr()[0],
            "time/rollout_s": t1 - t0,
            "time/replay_s": t2 - t1,
            "time/replay_teacher_s": teacher_s,
            "time/update_s": t3 - t2,
            **compute.metrics(),
            **memory_metrics(target.device),
        }
        st.metrics.write(step, row)
        bar.update(1)
        bar.set_postfix(tau=f"{stats.tau:.2f}", loss=f"{total:.3f}")
        if step % cfg.save_every == 0 or step == cfg.steps or (cfg.max_flops is not None and compute.flops >= cfg.max_flops):
            st.save(drafter)
        if on_step is not None:
            on_step(step, drafter, compute)
    bar.close()
    st.metrics.close()
    drafter.eval()
    return out_dir / "last"
