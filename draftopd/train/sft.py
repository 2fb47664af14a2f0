"""DFlash SFT: the baseline Draft-OPD is measured against.

Per step: take the next `batch_size` sequences (a seeded permutation per epoch), get the frozen target's view of
them (one online forward, or the offline feature cache: `data/features.py`), sample `anchors_per_seq` anchors
among trained positions (the response; every assistant turn of a multi-turn conversation: its loss mask, `blocks.py`),
fill every block in one drafter forward, and minimise the slot-weighted loss
`sum_k w_k * l(slot k) / sum_k w_k` with `w_k = exp(-(k-1)/decay)` over labels that exist, where `l` is
hard-label cross-entropy or the soft forward KL to the target distribution. Labels: the sequence's own next token
(`labels="text"`, regenerated answers) or the target's greedy token there (`"greedy"`, fixed text). With a reduced
draft vocabulary, logits and soft targets live over the kept tokens (the target's distribution renormalised there)
and labels outside it are skipped. `feature_noise` s > 0 adds N(0, (s x RMS)^2) noise to the target features the
drafter's context reads (the labels stay the clean target's). `autocast` bfloat16 runs the drafter's forward (and
so its backward) with bf16 matmuls while weights, AdamW state and the loss stay float32: on an AVX512-BF16 CPU the
recipe's SFT ran 1.5x faster with the same training curve and held-out tau (docs/results/strong-drafters.md).
Gradient accumulation sums micro-batch numerators and divides by the step's total weight, so it equals the
full-batch loss. Under torchrun (`distributed.py`) each rank trains its share of every micro-batch, and the
step's total weight, the gradients and the metrics are summed over ranks, so the update is the single process's
on the same batch; every rank draws the anchors of the whole micro-batch and keeps its own rows, so each trains
exactly the anchors one process would have. From the feature cache a rank reads only its own rows' sequences, and of
the others only their lengths, response starts and loss masks (`batch_items`).
A checkpoint (`last/`) holds weights, optimizer, scheduler, RNG and data position; a killed run resumed with
`resume=True` continues exactly where it stopped (weights and metrics.jsonl equal an uninterrupted run's; folder
rules in `common.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import SFTConfig
from ..data.features import CachedSequence, FeatureCache, SequenceShape, loss_mask
from ..models.drafter import Drafter
from ..models.target import Target
from . import distributed as ddp
from .blocks import add_feature_noise, block_hidden, block_labels, draft_vocab_logits, draw_anchors, pad_batch, teach_cached, teach_online
from .chunked import chunk_rows, chunked_sum
from .common import Compute, TrainerState, data_order, param_counts, train_autocast
from .losses import sft_slot_weights, sft_token_loss
from .tracking import RunInfo, memory_metrics


@dataclass
class StepResult:
    """One micro-batch, on the device (read on the host once per step): the weighted loss numerator (with grad), its
    weight sum, correct argmaxes and labels per slot (K,); and the token counts of the compute counter (host ints)."""

    loss_sum: torch.Tensor
    weight_sum: torch.Tensor
    slot_correct: torch.Tensor
    slot_count: torch.Tensor
    target_tokens: int
    draft_tokens: int


def sft_micro_batch(
    target: Target, drafter: Drafter, items: list, cfg: SFTConfig, gen: torch.Generator, rows: slice = slice(None)
) -> StepResult:
    """Forward one micro-batch -> loss numerator and stats. `items` are examples (prompt_ids, response_ids, optional
    loss_mask), scored online by the target, or `CachedSequence`s of the feature cache. Logits, labels and soft targets live in the
    draft vocabulary; labels outside a reduced vocabulary are skipped. Anchors are drawn for all of `items`, then
    only `rows` of them (this rank's share) are trained. The head and the loss run a chunk of slots at a time
    (`chunked.py`): no tensor holds every slot's logits."""
    cached = isinstance(items[0], (CachedSequence, SequenceShape))
    masks = [loss_mask(item) for item in items]
    lengths = [len(m) for m in masks]
    starts = [c.response_start for c in items] if cached else [len(e.prompt_ids) for e in items]
    anchors, anchor_valid = draw_anchors(starts, lengths, cfg.anchors_per_seq, gen, masks)
    trained = int(anchor_valid[rows].sum())  # counted on the host, before the device has the anchors
    anchors, anchor_valid = anchors[rows].to(target.device), anchor_valid[rows].to(target.device)
    items = items[rows]
    multi_turn = any(getattr(item, "loss_mask", None) is not None for item in items)  # else the response is trained
    seqs = [c.tokens for c in items] if cached else [list(e.prompt_ids) + list(e.response_ids) for e in items]
    batch = pad_batch(seqs, starts[rows], target.pad_id, target.device, masks[rows] if multi_turn else None)
    teacher = teach_cached(items, batch, target.device) if cached else teach_online(target, drafter, batch)
    features = add_feature_noise(teacher.features, cfg.feature_noise, gen, (len(lengths), max(lengths)), rows)
    lab = block_labels(batch, anchors, anchor_valid, drafter.block_size)
    pos = (anchors[..., None] + lab.slots - 1).clamp(max=batch.tokens.shape[1] - 1)  # the target predicts token a+k at a+k-1
    text = lab.labels if cfg.labels == "text" else teacher.greedy(target).gather(1, pos.flatten(1)).view_as(pos)
    labels = drafter.target_to_draft(text)
    mask = lab.mask & (labels >= 0)
    weights = sft_slot_weights(lab.slots, slot_decay(cfg, drafter.block_size)) * mask
    final = teacher.final_at(pos) if cfg.loss == "kl" else pos.new_zeros(pos.shape + (0,)).float()
    slot = (lab.slots - 1).expand_as(labels)
    k = drafter.block_size - 1

    def chunk_loss(hidden: torch.Tensor, label: torch.Tensor, weight: torch.Tensor, slot_id: torch.Tensor, teacher_final: torch.Tensor):
        logits = drafter.head(hidden)
        target_logits = draft_vocab_logits(target, drafter, teacher_final) if cfg.loss == "kl" else None
        per_token = sft_token_loss(logits, label.clamp(min=0), target_logits, kind=cfg.loss)
        right = ((logits.argmax(-1) == label) & (weight > 0)).float()
        return (per_token * weight).sum(), torch.zeros(k, device=right.device).index_add_(0, slot_id, right)

    with train_autocast(cfg.autocast, target.device):  # the loss upcasts to float32
        hidden = block_hidden(drafter, batch, features, anchors)
        flat = lambda x: x.flatten(0, 2)  # noqa: E731  (b, n, K, ...) -> (b*n*K, ...)
        loss_sum, correct = chunked_sum(
            chunk_loss, chunk_rows(logit_width(drafter)), flat(hidden), flat(labels), flat(weights), flat(slot), flat(final)
        )
    return StepResult(
        loss_sum, weights.sum(), correct, mask.sum((0, 1)), 0 if cached else sum(map(len, seqs)), trained * drafter.block_size
    )


def batch_items(examples, order: list[int], rows: slice) -> list:
    """The items `order` of `examples`. From the feature cache only this rank's `rows` are read whole; the other ranks'
    rows are `SequenceShape`s (length, response start and loss mask: all that drawing the batch's anchors needs)."""
    if not isinstance(examples, FeatureCache):
        return [examples[i] for i in order]
    own = range(len(order))[rows]
    return [examples[i] if j in own else examples.shape(i) for j, i in enumerate(order)]


def logit_width(drafter: Drafter) -> int:
    """Columns of the drafter's logits: its draft vocabulary or the target's."""
    return drafter.spec.draft_vocab_size or drafter.spec.vocab_size


def slot_decay(cfg: SFTConfig, block_size: int) -> float:
    return cfg.slot_decay if cfg.slot_decay is not None else (7.0 if block_size >= 16 else 4.0)


def train_sft(
    target: Target,
    drafter: Drafter,
    examples: list,
    cfg: SFTConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    on_step: Callable[[int, Drafter, Compute], None] | None = None,
    run: RunInfo | None = None,
) -> Path:
    """Train `drafter` in place against `target` (online features, or the cache's); returns the final checkpoint folder.
    `stop_after` ends early (a simulated kill); `cfg.max_flops` ends the run once that much compute is spent
    (compute-matched comparisons). Without `resume` an `out_dir` that holds a run is refused (`common.RunDirError`).
    `run`: the command's configs and tracker (`tracking.py`: run.yaml and the others beside the checkpoints)."""
    out_dir = Path(out_dir)
    st = TrainerState.start("sft", target, drafter, cfg.optim, cfg.steps, cfg.seed, out_dir, resume, split=(cfg, "batch_size"), run=run)
    compute = st.compute
    target_params, draft_params = param_counts(target, drafter)
    drafter.train()
    drafter.checkpoint_layers = cfg.optim.checkpoint_layers
    bar = tqdm(total=cfg.steps, initial=st.step, desc="sft", disable=not progress or not ddp.is_main(), dynamic_ncols=True)
    while st.running(cfg.steps, stop_after, cfg.max_flops):
        t0, spent = time.perf_counter(), compute.copy()
        results = []
        for _ in range(cfg.grad_accum):
            micro = batch_items(examples, data_order(len(examples), cfg.seed, st.data_pos, cfg.batch_size), ddp.shard(cfg.batch_size))
            st.data_pos += cfg.batch_size
            results.append(sft_micro_batch(target, drafter, micro, cfg, st.gen, ddp.shard(cfg.batch_size)))
        total_weight = ddp.all_sum(sum(r.weight_sum for r in results))  # every rank's labels: the single process's normaliser
        loss = sum(r.loss_sum for r in results) / total_weight.clamp_min(1e-9)
        st.opt.zero_grad(set_to_none=True)
        loss.backward()
        ddp.sum_grads(drafter)
        grad_norm = torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.optim.grad_clip)
        st.opt.step(), st.sched.step()
        st.step += 1
        step = st.step
        for r in results:
            compute.add_target(r.target_tokens, target_params)
            compute.add_draft_train(r.draft_tokens, draft_params)
        compute.add_ranks(spent)
        correct, count = ddp.all_sum(sum(r.slot_correct for r in results)), ddp.all_sum(sum(r.slot_count for r in results))
        k = len(correct)
        host = torch.cat(
            [ddp.all_sum(loss.detach())[None], grad_norm.float()[None], correct.float(), count.float()]
        ).tolist()  # the step's one host sync
        row = {
            "train/loss": host[0],
            "train/grad_norm": host[1],
            "train/lr": st.sched.get_last_lr()[0],
            **{f"train/acc_slot_{i + 1}": c / max(n, 1) for i, (c, n) in enumerate(zip(host[2 : 2 + k], host[2 + k :]))},
            **compute.metrics(),
            "time/step_s": time.perf_counter() - t0,
            **memory_metrics(target.device),
        }
        if step % cfg.log_every == 0 or step == cfg.steps or cfg.max_flops is not None:
            st.metrics.write(step, row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['train/loss']:.3f}", acc1=f"{row['train/acc_slot_1']:.2f}")
        done = step == cfg.steps or (cfg.max_flops is not None and compute.flops >= cfg.max_flops)
        if step % cfg.save_every == 0 or done:
            st.save(drafter)
        if on_step is not None:
            on_step(step, drafter, compute)
    bar.close()
    st.metrics.close()
    drafter.eval()
    return out_dir / "last"
