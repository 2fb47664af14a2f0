"""Draft-OPD: on-policy replay, stream masks, ablation switches, token-normalised accumulation, end-to-end."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import pytest
import torch

from draftopd.config import DecodeConfig, DrafterConfig, OptimConfig, SFTConfig
from draftopd.decode.speculative import autoregressive_generate, generate
from draftopd.decode.stats import summarize
from draftopd.models.dflash import new_drafter
from draftopd.models.load import tiny_target
from draftopd.train.anchors import error_segments, random_segments
from draftopd.train.blocks import block_logits, score_batch
from draftopd.train.losses import LossConfig, combine_streams
from draftopd.train.opd import OPDConfig, collate, replay, step_norms, stream_masks, train_opd
from draftopd.train.sft import train_sft


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny learnable target, its regenerated answers, and a briefly SFT-trained drafter (the warm start).
    sharpness=30 gives greedy tokens a mean probability near 0.6, like a trained LM (the default 4 gives 0.06)."""
    target = tiny_target(vocab_size=64, hidden_size=64, num_layers=4, seed=0, sharpness=30.0)
    rng = random.Random(0)
    prompts = [[rng.randrange(60) for _ in range(rng.randint(3, 10))] for _ in range(80)]
    gen = autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=40, stop_at_eos=False))
    examples = [Example(tuple(t.prompt), tuple(t.output)) for t in gen.traces]
    drafter = new_drafter(target, DrafterConfig(block_size=8, final_norm_init=1.0), seed=0)  # the init the pinned numbers below were measured with
    train_sft(target, drafter, examples[:64], SFTConfig(steps=30, batch_size=8, anchors_per_seq=16, optim=OptimConfig(lr=3e-3)), tmp_path_factory.mktemp("sft"), progress=False)
    return target, prompts[:64], prompts[64:], drafter


def rollout(target, drafter, prompts, **kw):
    return generate(target, drafter, prompts, DecodeConfig(max_new_tokens=24, stop_at_eos=False, **kw)).traces


def test_replay_equals_rollout_logits(setup):
    """On-policy guarantee: replaying the drafter at the rollout's anchors reproduces its logits (same weights)."""
    target, prompts, _, drafter = setup
    traces = rollout(target, drafter, prompts[:3], record_draft_logits=True)
    rb = collate(target, drafter, traces, [error_segments(t) for t in traces])
    with torch.no_grad():
        logits = block_logits(drafter, rb.seq, score_batch(target, drafter, rb.seq).features, rb.anchors)
    for b, trace in enumerate(traces):
        torch.testing.assert_close(logits[b, : trace.rounds], torch.stack(trace.draft_logits), atol=1e-5, rtol=1e-5)


def test_stream_masks_and_decay_on_hand_made_segments():
    slots = torch.arange(1, 8)  # K = 7
    accepted = torch.tensor([[2, 7]])
    valid = torch.tensor([[True, True]])
    label_mask = torch.ones(1, 2, 7, dtype=torch.bool)
    label_mask[0, 1, 6] = False  # the sequence ends before slot 7 of the second segment
    acc, rej, w = stream_masks(accepted, valid, label_mask, slots, LossConfig(gamma=0.5))
    assert acc[0, 0].tolist() == [True, True, True, False, False, False, False]  # slots 1..r+1
    assert rej[0, 0].tolist() == [False, False, True, True, True, True, True]  # slots r+1..K
    assert acc[0, 1].tolist() == [True] * 6 + [False] and not rej[0, 1].any()  # all accepted: no rejected stream
    assert w[0, 0, 2:].tolist() == pytest.approx([0.5 ** k for k in range(2, 7)])
    _, rej_off, _ = stream_masks(accepted, valid, label_mask, slots, LossConfig(use_rejected=False))
    assert not rej_off.any()


def test_random_anchors_keep_segment_count_and_lengths(setup):
    target, prompts, _, drafter = setup
    for trace in rollout(target, drafter, prompts[:4]):
        seg, rnd = error_segments(trace), random_segments(trace, torch.Generator().manual_seed(0))
        assert len(rnd.anchors) == len(seg.anchors)
        assert sorted(rnd.accepted.tolist()) == sorted(seg.accepted.tolist())
        assert rnd.anchors.min() >= len(trace.prompt) and rnd.anchors.max() <= len(trace.tokens) - 2
        assert rnd.drafts is None  # proposals must be re-drafted and re-verified


def test_rejected_stream_off_gives_exactly_the_accepted_loss(setup):
    target, prompts, _, drafter = setup
    traces = rollout(target, drafter, prompts[:3])
    segs = [error_segments(t) for t in traces]
    cfg = LossConfig(use_rejected=False)
    res = replay(target, drafter, collate(target, drafter, traces, segs), cfg)
    acc_norm, rej_norm = step_norms(traces, segs, drafter.block_size, cfg)
    assert rej_norm == 0 and acc_norm == res.acc.weight_sum
    loss = combine_streams(res.acc, res.rej, acc_norm, rej_norm, cfg)
    assert float(loss.detach()) == pytest.approx(float(res.acc.loss_sum.detach()) / res.acc.weight_sum, rel=1e-6)


@pytest.mark.parametrize("mode", ["estimate", "exact"])
def test_accumulation_normalises_by_tokens(setup, mode):
    """Micro-batches of 1 + 3 traces, each normalised by the step's token counts, equal one batch of 4."""
    target, prompts, _, drafter = setup
    traces = rollout(target, drafter, prompts[:4])
    segs = [error_segments(t) for t in traces]
    cfg = LossConfig(mode=mode)
    acc_norm, rej_norm = step_norms(traces, segs, drafter.block_size, cfg)

    def grads(groups):
        drafter.zero_grad()
        total = 0.0
        for g in groups:
            res = replay(target, drafter, collate(target, drafter, [traces[i] for i in g], [segs[i] for i in g]), cfg)
            loss = combine_streams(res.acc, res.rej, acc_norm, rej_norm, cfg)
            loss.backward()
            total += float(loss.detach())
        return total, drafter.fc.weight.grad.clone()

    full, g_full = grads([[0, 1, 2, 3]])
    split, g_split = grads([[0], [1, 2, 3]])
    assert split == pytest.approx(full, rel=1e-5)
    torch.testing.assert_close(g_split, g_full, atol=1e-6, rtol=1e-4)
    naive = []  # per-micro-batch means averaged: what batch normalisation would compute
    for g in ([0], [1, 2, 3]):
        sub_t, sub_s = [traces[i] for i in g], [segs[i] for i in g]
        res = replay(target, drafter, collate(target, drafter, sub_t, sub_s), cfg)
        naive.append(float(combine_streams(res.acc, res.rej, *step_norms(sub_t, sub_s, drafter.block_size, cfg), cfg).detach()))
    assert sum(naive) / 2 != pytest.approx(full, rel=1e-3)


def test_draft_opd_raises_heldout_tau(setup, tmp_path):
    """From this seeded SFT start, 12 exact-KL Draft-OPD steps raise held-out tau (1.71 -> 1.84 when written).
    Pinned to one seed on purpose: across seeds and against compute-matched continued SFT, Draft-OPD does not
    robustly raise tau on tiny targets (benchmarks/tiny_ablation.py; README findings)."""
    target, prompts, heldout, start = setup
    drafter = copy.deepcopy(start)
    cfg = DecodeConfig(max_new_tokens=32, stop_at_eos=False)
    before = summarize(generate(target, drafter, heldout, cfg), 8).tau
    train_opd(target, drafter, prompts, OPDConfig(steps=12, prompts_per_rollout=8, rollouts_per_step=1, max_new_tokens=32,
                                          loss=LossConfig(mode="exact"), optim=OptimConfig(lr=2e-3)), tmp_path, progress=False)
    after = summarize(generate(target, drafter, heldout, cfg), 8).tau
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12 and '"rollout/tau"' in lines[0] and '"time/replay_s"' in lines[0]
    assert after > before + 0.1, (before, after)
