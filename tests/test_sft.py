"""SFT trainer: loss against a plain reference, train/inference alignment, exact resume, tiny end-to-end."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from draftopd.config import DecodeConfig, DrafterConfig, OptimConfig, SFTConfig
from draftopd.decode.speculative import autoregressive_generate, generate
from draftopd.decode.stats import summarize
from draftopd.models.drafter import load_drafter, new_drafter
from draftopd.models.load import tiny_target
from draftopd.train.blocks import block_logits, pad_batch, score_batch
from draftopd.train.sft import sft_micro_batch, train_sft


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


@pytest.fixture(scope="module")
def learnable():
    """A tiny target whose greedy text is learnable, and its regenerated answers to random prompts."""
    target = tiny_target(vocab_size=64, hidden_size=64, num_layers=4, seed=0)
    rng = random.Random(0)
    prompts = [[rng.randrange(60) for _ in range(rng.randint(3, 10))] for _ in range(72)]
    gen = autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=40, stop_at_eos=False))
    examples = [Example(tuple(t.prompt), tuple(t.output)) for t in gen.traces]
    return target, examples[:64], [list(e.prompt_ids) for e in examples[64:]]


def reference_sft_loss(target, drafter, examples, anchors_per_example, decay):
    """Plain loops: one block per anchor through the inference path, weighted CE over existing labels."""
    num, den = 0.0, 0.0
    for ex, anchors in zip(examples, anchors_per_example):
        seq = list(ex.prompt_ids) + list(ex.response_ids)
        batch = pad_batch([seq], [len(ex.prompt_ids)], target.pad_id)
        feats = score_batch(target, drafter, batch).features
        for a in anchors:
            logits = block_logits(drafter, batch, feats, torch.tensor([[a]]))[0, 0]
            for k in range(1, drafter.block_size):
                if a + k < len(seq):
                    w = math.exp(-(k - 1) / decay)
                    num += w * F.cross_entropy(logits[k - 1][None], torch.tensor([seq[a + k]])).item()
                    den += w
    return num / den


def test_sft_loss_matches_reference(learnable):
    target, examples, _ = learnable
    drafter = new_drafter(target, DrafterConfig(block_size=8))
    cfg = SFTConfig(anchors_per_seq=5, slot_decay=4.0, autocast="float32")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        result = sft_micro_batch(target, drafter, examples[:3], cfg, gen)
    # replay the same anchor draw for the reference
    from draftopd.train.blocks import draw_anchors

    seqs = [list(e.prompt_ids) + list(e.response_ids) for e in examples[:3]]
    anchors, valid = draw_anchors([len(e.prompt_ids) for e in examples[:3]], [len(s) for s in seqs], 5, torch.Generator().manual_seed(3))
    ref = reference_sft_loss(target, drafter, examples[:3], [a[v].tolist() for a, v in zip(anchors, valid)], 4.0)
    assert float(result.loss_sum) / result.weight_sum == pytest.approx(ref, rel=1e-5)


def test_feature_noise_perturbs_the_context_reproducibly(learnable):
    """`feature_noise`: the same anchors and labels, another loss; the same generator seed gives the same loss."""
    target, examples, _ = learnable
    drafter = new_drafter(target, DrafterConfig(block_size=8))
    clean = SFTConfig(anchors_per_seq=5)
    run = lambda cfg: sft_micro_batch(target, drafter, examples[:3], cfg, torch.Generator().manual_seed(3))  # noqa: E731
    with torch.no_grad():
        a, b, c = run(replace(clean, feature_noise=0.5)), run(replace(clean, feature_noise=0.5)), run(clean)
    assert torch.equal(a.loss_sum, b.loss_sum) and not torch.allclose(a.loss_sum, c.loss_sum)
    assert a.weight_sum == c.weight_sum and torch.equal(a.slot_count, c.slot_count)


def test_training_forward_equals_inference_forward(learnable):
    """Blocks replayed on the final sequence give the logits the drafter produced while decoding it."""
    target, _, heldout = learnable
    drafter = new_drafter(target, DrafterConfig(block_size=8), seed=1)
    gen = generate(target, drafter, heldout[:2], DecodeConfig(max_new_tokens=24, stop_at_eos=False, record_draft_logits=True))
    for trace in gen.traces:
        batch = pad_batch([trace.tokens], [len(trace.prompt)], target.pad_id)
        with torch.no_grad():
            logits = block_logits(drafter, batch, score_batch(target, drafter, batch).features, torch.tensor([trace.anchors]))[0]
        torch.testing.assert_close(logits, torch.stack(trace.draft_logits), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,noise", [("dflash", 0.0), ("eagle3", 0.0), ("dflash", 0.3)])
def test_resume_is_exact(learnable, tmp_path, arch, noise):
    target, examples, _ = learnable
    cfg = SFTConfig(steps=6, batch_size=4, anchors_per_seq=6, save_every=3, feature_noise=noise, optim=OptimConfig(lr=2e-3))
    shape = DrafterConfig(arch=arch, block_size=8)
    straight = new_drafter(target, shape, seed=5)
    train_sft(target, straight, examples, cfg, tmp_path / "a", progress=False)
    killed = new_drafter(target, shape, seed=5)
    train_sft(target, killed, examples, cfg, tmp_path / "b", progress=False, stop_after=3)
    resumed = new_drafter(target, shape, seed=99)  # different init: weights must come from the checkpoint
    final = train_sft(target, resumed, examples, cfg, tmp_path / "b", resume=True, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name  # bit-identical (more kill points and folder states: test_resume.py)
    reloaded = load_drafter(final, target)
    assert torch.equal(reloaded.fc.weight, straight.fc.weight)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 7)) and '"compute/flops"' in lines[-1]


@pytest.mark.parametrize("arch", ["dflash", "eagle3"])
def test_sft_raises_tau(learnable, tmp_path, arch):
    """For EAGLE-3 this is SFT with training-time test: each anchor's chain unrolled on its own hidden states."""
    target, examples, heldout = learnable
    drafter = new_drafter(target, DrafterConfig(arch=arch, block_size=8), seed=0)
    cfg = DecodeConfig(max_new_tokens=32, stop_at_eos=False)
    before = summarize(generate(target, drafter, heldout, cfg), 8).tau
    train_sft(
        target,
        drafter,
        examples,
        SFTConfig(steps=60, batch_size=8, anchors_per_seq=16, optim=OptimConfig(lr=3e-3)),
        tmp_path,
        progress=False,
    )
    after = summarize(generate(target, drafter, heldout, cfg), 8).tau
    assert before < 1.1
    assert after > before + 0.25, (before, after)


def test_planned_step_compute_is_what_the_trainer_counts(learnable, tmp_path):
    """The demo sizes continued SFT to Draft-OPD's compute with `sft_step_flops`; on equal-length examples with more
    response tokens than anchors it must equal the trainer's own count for a step, and a batch of short answers
    (fewer positions than anchors) must not be over-counted."""
    from draftopd.experiment import sft_step_flops

    target, examples, _ = learnable
    cfg = SFTConfig(steps=1, batch_size=4, anchors_per_seq=6, save_every=1, optim=OptimConfig(lr=1e-3))
    drafter = new_drafter(target, DrafterConfig(block_size=8), seed=0)
    same = [e for e in examples if len(e.prompt_ids) + len(e.response_ids) == len(examples[0].prompt_ids) + len(examples[0].response_ids)]
    assert len(same) >= cfg.batch_size and len(same[0].response_ids) > 2 * cfg.anchors_per_seq
    train_sft(target, drafter, same, cfg, tmp_path / "run", progress=False)
    counted = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["compute/flops"]
    assert sft_step_flops(target, drafter, same, cfg) == pytest.approx(counted, rel=1e-6)
    short = [Example(e.prompt_ids, e.response_ids[:3]) for e in same]
    assert sft_step_flops(target, drafter, short, cfg) < sft_step_flops(target, drafter, same, cfg) / 2


def test_bf16_autocast_is_close_to_float32_and_keeps_float32_state(learnable, tmp_path, monkeypatch):
    """`SFTConfig.autocast`: bfloat16 runs the drafter's matmuls in bf16 (the loss differs from float32's, so it really
    ran), close to float32's loss and gradient; weights, AdamW state and the checkpoint stay float32; "auto" is float32
    on a CPU without fast bf16."""
    from draftopd.train.common import train_autocast

    target, examples, _ = learnable
    base = new_drafter(target, DrafterConfig(block_size=8, final_norm_init=1.0), seed=1)  # logits far from uniform
    out = {}
    for name in ("float32", "bfloat16"):
        drafter = new_drafter(target, DrafterConfig(block_size=8, final_norm_init=1.0), seed=1)
        drafter.load_state_dict(base.state_dict())
        r = sft_micro_batch(target, drafter, examples[:4], SFTConfig(anchors_per_seq=8, autocast=name), torch.Generator().manual_seed(0))
        loss = r.loss_sum / r.weight_sum
        loss.backward()
        out[name] = float(loss.detach()), torch.cat([p.grad.flatten() for p in drafter.parameters() if p.grad is not None])
    (l32, g32), (l16, g16) = out["float32"], out["bfloat16"]
    assert l16 != l32 and l16 == pytest.approx(l32, rel=2e-2)
    assert F.cosine_similarity(g16, g32, dim=0) > 0.98
    drafter = new_drafter(target, DrafterConfig(block_size=8), seed=1)
    final = train_sft(
        target, drafter, examples, SFTConfig(steps=2, batch_size=4, anchors_per_seq=4, autocast="bfloat16"), tmp_path, progress=False
    )
    assert {p.dtype for p in load_drafter(final, target).parameters()} == {torch.float32}
    state = torch.load(final / "trainer.pt", weights_only=True)["optimizer"]["state"]
    assert state and all(v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    for name, on in (("auto", False), ("float32", False), ("bfloat16", True)):
        with train_autocast(name, "cpu"):
            assert torch.is_autocast_enabled("cpu") == on
