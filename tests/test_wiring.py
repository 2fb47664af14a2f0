"""The trainers' wiring against a slow, obvious reference: which teacher distribution, at which position, meets which
drafter distribution, in which KL direction.

The reference rebuilds everything from scratch, one (segment or anchor, slot) at a time, with plain Hugging Face
forwards: the drafter's block at anchor `a` from the target's hidden states of the text strictly before `a`
(`output_hidden_states`), the target's next-token distribution from a fresh forward over the prefix it is conditioned
on, and the paper's formulas written out:
- Draft-OPD, accepted stream (slots k <= r+1 of a segment): p(. | text up to a+k-1) against q_k at the text's token
  a+k, forward KL; rejected stream (slots k > r): p(. | text up to a, d_1 .. d_{k-1}), the draft prefix, against q_k at
  the drafter's own proposal d_k, reverse KL, weighted gamma^(k-1); pooled or the paper's mean of means;
- SFT: slot k of the block at anchor a against the text's token a+k (text labels), the target's argmax after a+k-1
  (greedy labels) or its distribution there (soft labels), weighted exp(-(k-1)/decay).
Compared with the trainers' values and gradients in both loss modes and for both drafter families.

The tests are shown to catch the wiring mistakes they guard against (`test_a_miswired_*`): each mutation below,
patched into the trainer, makes the comparison fail:
- the rejected-stream teacher conditioned on the true text instead of the draft prefix;
- the accepted-stream teacher read one position late;
- the KL directions swapped;
- the SFT teacher (greedy labels, soft labels) read one position late.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from draftopd.config import DecodeConfig, DrafterConfig, SFTConfig
from draftopd.data.regenerate import SFTExample
from draftopd.decode.speculative import generate
from draftopd.models.drafter import new_drafter
from draftopd.models.load import tiny_target
from draftopd.train import blocks, opd
from draftopd.train.anchors import error_segments, random_segments
from draftopd.train.losses import LossConfig, combine_streams
from draftopd.train.opd import collate, replay, step_norms
from draftopd.train.sft import sft_micro_batch, slot_decay

BLOCK = 6


@pytest.fixture(scope="module")
def target(one_thread):
    return tiny_target(vocab_size=16, hidden_size=32, num_layers=4, seed=2, sharpness=20.0)


def drafter_for(target, arch: str, vocab: int | None = None, seed: int = 3):
    """A drafter with every weight perturbed (informative, wrong in many places), float32, gradients on."""
    drafter = new_drafter(target, DrafterConfig(arch=arch, block_size=BLOCK, final_norm_init=1.0, vocab_size=vocab), seed=seed)
    if vocab:
        drafter.set_draft_vocab(torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(seed))[:vocab])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return drafter.train()


def rollouts(target, drafter, n: int = 3):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, target.vocab_size - 1, (int(k),), generator=g).tolist() for k in (4, 7, 5)[:n]]
    with torch.no_grad():
        return [t for t in generate(target, drafter.eval(), prompts, DecodeConfig(max_new_tokens=14, stop_at_eos=False)).traces]


# ---- the reference ------------------------------------------------------------------------------------------------
_SEEN: dict[tuple, torch.Tensor] = {}


@torch.no_grad()
def next_logp(target, prefix: list[int]) -> torch.Tensor:
    """log p(. | prefix) over the target's vocabulary, float64, from one fresh forward (remembered per prefix)."""
    key = (id(target), tuple(prefix))
    if key not in _SEEN:
        _SEEN[key] = torch.log_softmax(target.model(torch.tensor([prefix])).logits[0, -1].double(), -1)
    return _SEEN[key]


def drafter_block(target, drafter, tokens: list[int], a: int, block_tokens: list[int]) -> torch.Tensor:
    """The drafter's logits (K, V_draft) at anchor a: its context is the target's hidden states of tokens[:a] (HF's
    `output_hidden_states`; id i is hidden_states[i + 1]), each paired with the token after it."""
    with torch.no_grad():
        states = target.model(torch.tensor([tokens[:a]]), output_hidden_states=True).hidden_states
    features = torch.cat([states[i + 1] for i in drafter.spec.target_layer_ids], -1)
    ctx = drafter.project_context(features, torch.arange(a)[None], torch.ones(1, a, dtype=torch.bool), torch.tensor([tokens[1 : a + 1]]))
    return drafter(ctx, torch.tensor([[tokens[a]]]), torch.tensor([[a]]), torch.tensor([[block_tokens]]))[0, 0]


def in_draft_vocab(drafter, logp_target: torch.Tensor) -> torch.Tensor:
    """Target log-probs restricted to the drafter's vocabulary and renormalised there."""
    ids = drafter.target_ids()
    sub = logp_target if ids is None else logp_target[ids]
    return sub - torch.logsumexp(sub, -1)


def kl(direction: str, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """forward KL(p || q) = sum p (log p - log q); reverse KL(q || p) = sum q (log q - log p)."""
    a, b = (logp, logq) if direction == "forward" else (logq, logp)
    return (a.exp() * (a - b)).sum()


def estimate(direction: str, lp: float, lq: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The authors' single-token estimators: the two-outcome forward KL with log-probs floored at `floor`, or k3."""
    if direction == "forward":
        lp, lq = max(lp, cfg.floor), lq.clamp(min=cfg.floor)
        p, q = math.exp(lp), lq.exp()
        out = p * (lp - lq) + (1 - p) * (math.log1p(-min(p, 1 - 1e-6)) - torch.log1p(-q.clamp(max=1 - 1e-6)))
    else:
        d = lp - lq
        out = d.exp() - d - 1
    return out.clamp(-cfg.clamp, cfg.clamp)


def reference_opd_loss(target, drafter, traces, segments, cfg: LossConfig) -> torch.Tensor:
    acc_sum, acc_n, rej_sum, rej_w = 0.0, 0, 0.0, 0.0
    for trace, seg in zip(traces, segments):
        tokens = trace.tokens
        for m in range(len(seg.anchors)):
            a, r = int(seg.anchors[m]), int(seg.accepted[m])
            drafts = seg.drafts[m].tolist()
            chain = drafts if seg.rej_on[m] else [tokens[min(a + k, len(tokens) - 1)] for k in range(1, BLOCK)]
            logq_draft = torch.log_softmax(drafter_block(target, drafter, tokens, a, chain[:-1]).double(), -1)
            logq_target = (
                logq_draft
                if drafter.target_ids() is None
                else torch.full((BLOCK - 1, target.vocab_size), -math.inf, dtype=torch.float64).index_copy(
                    1, drafter.target_ids(), logq_draft
                )
            )
            for k in range(1, BLOCK):
                if seg.acc_on[m] and k <= r + 1 and a + k < len(tokens):
                    logp = next_logp(target, tokens[: a + k])  # the true prefix
                    if cfg.acc_loss == "ce":  # hard label: the final text's token
                        term = -logq_target[k - 1][tokens[a + k]]
                    elif cfg.mode == "exact":
                        term = kl(cfg.acc_direction, in_draft_vocab(drafter, logp), logq_draft[k - 1])
                    else:
                        term = estimate(cfg.acc_direction, float(logp[tokens[a + k]]), logq_target[k - 1][tokens[a + k]], cfg)
                    acc_sum, acc_n = acc_sum + term, acc_n + 1
                if seg.rej_on[m] and cfg.use_rejected and (k == r + 1 if cfg.rej_slots == "first" else k > r):
                    logp = next_logp(target, tokens[: a + 1] + drafts[: k - 1])  # the draft prefix
                    w = cfg.gamma ** (k - 1)
                    if cfg.mode == "exact":
                        term = kl(cfg.rej_direction, in_draft_vocab(drafter, logp), logq_draft[k - 1])
                    else:
                        term = estimate(cfg.rej_direction, float(logp[drafts[k - 1]]), logq_target[k - 1][drafts[k - 1]], cfg)
                    rej_sum, rej_w = rej_sum + w * term, rej_w + w
    if cfg.aggregation == "pooled":
        return (cfg.lam_acc * acc_sum + cfg.lam_rej * rej_sum) / (cfg.lam_acc * acc_n + cfg.lam_rej * rej_w)
    return (cfg.lam_acc * acc_sum / acc_n + cfg.lam_rej * rej_sum / rej_w) / (cfg.lam_acc + cfg.lam_rej)


def trainer_opd_loss(target, drafter, traces, segments, cfg: LossConfig) -> torch.Tensor:
    res = replay(target, drafter, collate(target, drafter, traces, segments), cfg)
    return combine_streams(res.acc, res.rej, *step_norms(traces, segments, drafter.block_size, cfg), cfg)


def compare(reference_fn, trainer_fn, drafter) -> tuple[float, float]:
    """Relative differences of the two losses' values and of their gradients (all drafter weights together)."""
    params = [p for p in drafter.parameters() if p.requires_grad]
    values, grads = [], []
    for fn in (reference_fn, trainer_fn):
        drafter.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        values.append(float(loss.detach()))
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double() for p in params]))
    value = abs(values[0] - values[1]) / max(abs(values[0]), 1e-12)
    grad = float((grads[0] - grads[1]).norm() / grads[0].norm().clamp_min(1e-12))
    return value, grad


OPD_CASES = {
    "estimate": LossConfig(),
    "exact": LossConfig(mode="exact"),
    "paper-exact": LossConfig(mode="exact", aggregation="paper"),
    "first-rejected": LossConfig(rej_slots="first", gamma=0.5),
    "hard-accepted": LossConfig(acc_loss="ce"),
    "hard-accepted-exact": LossConfig(acc_loss="ce", mode="exact"),
}


@pytest.mark.parametrize("arch", ["dflash", "eagle3"])
@pytest.mark.parametrize("case", list(OPD_CASES))
def test_draft_opd_step_equals_the_reference(target, arch, case):
    drafter = drafter_for(target, arch)
    traces = rollouts(target, drafter)
    assert any(r > 0 for t in traces for r in t.accepted) and any(r < BLOCK - 1 for t in traces for r in t.accepted)
    segments = [error_segments(t) for t in traces]
    cfg = OPD_CASES[case]
    value, grad = compare(
        lambda: reference_opd_loss(target, drafter, traces, segments, cfg),
        lambda: trainer_opd_loss(target, drafter, traces, segments, cfg),
        drafter,
    )
    assert value < 1e-4 and grad < 1e-3, (value, grad)


def test_random_anchors_and_a_reduced_vocabulary_equal_the_reference(target):
    drafter = drafter_for(target, "dflash", vocab=10)
    traces = rollouts(target, drafter)
    segments = [random_segments(t, torch.Generator().manual_seed(m)) for m, t in enumerate(traces)]
    for cfg in (LossConfig(mode="exact"), LossConfig()):
        value, grad = compare(
            lambda: reference_opd_loss(target, drafter, traces, segments, cfg),
            lambda: trainer_opd_loss(target, drafter, traces, segments, cfg),
            drafter,
        )
        assert value < 1e-4 and grad < 1e-3, (cfg.mode, value, grad)


# ---- SFT ----------------------------------------------------------------------------------------------------------
def sft_items(target):
    traces = rollouts(target, drafter_for(target, "dflash"))
    return [SFTExample(str(i), tuple(t.prompt), tuple(t.output)) for i, t in enumerate(traces)]


def reference_sft_loss(target, drafter, items, cfg: SFTConfig, seed: int) -> torch.Tensor:
    starts, seqs = [len(e.prompt_ids) for e in items], [list(e.prompt_ids) + list(e.response_ids) for e in items]
    anchors, valid = blocks.draw_anchors(starts, [len(s) for s in seqs], cfg.anchors_per_seq, torch.Generator().manual_seed(seed))
    total, weight = 0.0, 0.0
    decay = slot_decay(cfg, BLOCK)
    for tokens, row, ok in zip(seqs, anchors.tolist(), valid.tolist()):
        for a, on in zip(row, ok):
            if not on:
                continue
            text = [tokens[min(a + k, len(tokens) - 1)] for k in range(1, BLOCK)]
            logq = torch.log_softmax(drafter_block(target, drafter, tokens, a, text[:-1]).double(), -1)
            for k in range(1, BLOCK):
                if a + k >= len(tokens):
                    continue
                logp = next_logp(target, tokens[: a + k])  # the target after position a+k-1
                label = tokens[a + k] if cfg.labels == "text" else int(logp.argmax())
                draft_label = int(drafter.target_to_draft(torch.tensor(label)))
                if draft_label < 0:
                    continue
                w = math.exp(-(k - 1) / decay)
                term = -logq[k - 1][draft_label] if cfg.loss == "ce" else kl("forward", in_draft_vocab(drafter, logp), logq[k - 1])
                total, weight = total + w * term, weight + w
    return total / weight


def trainer_sft_loss(target, drafter, items, cfg: SFTConfig, seed: int) -> torch.Tensor:
    result = sft_micro_batch(target, drafter, items, cfg, torch.Generator().manual_seed(seed))
    return result.loss_sum / result.weight_sum


SFT_CASES = {
    "text-ce": SFTConfig(labels="text", loss="ce"),
    "greedy-ce": SFTConfig(labels="greedy", loss="ce"),
    "greedy-kl": SFTConfig(labels="greedy", loss="kl"),
}


@pytest.mark.parametrize("arch,vocab", [("dflash", None), ("eagle3", None), ("dflash", 10)])
@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_step_equals_the_reference(target, arch, vocab, case):
    drafter = drafter_for(target, arch, vocab)
    items = sft_items(target)
    cfg = replace(SFT_CASES[case], anchors_per_seq=5, autocast="float32")
    value, grad = compare(
        lambda: reference_sft_loss(target, drafter, items, cfg, 7), lambda: trainer_sft_loss(target, drafter, items, cfg, 7), drafter
    )
    assert value < 1e-4 and grad < 1e-3, (value, grad)


# ---- controls: each mistake the tests guard against makes them fail ----------------------------------------------
def _late(fn):
    """`fn` reading one position later (the last position keeps its own value)."""

    def late(*args, **kwargs):
        out = fn(*args, **kwargs)
        return torch.cat([out[:, 1:], out[:, -1:]], 1)

    return late


def _true_text_rejected_teacher(target, rb):
    """The rejected stream's teacher conditioned on the committed text instead of the draft prefix: the final hidden
    states at a+k-1 of the true sequence."""
    final = target.score(rb.seq.tokens, rb.seq.valid, ()).final
    pos = (rb.anchors[..., None] + torch.arange(1, BLOCK) - 1).clamp(max=rb.seq.tokens.shape[1] - 1)
    return blocks.gather_positions(final, pos)


def _true_text_target_logp(target, traces):
    """The rollout's rejected log-probs replaced by the drafts' log-probs given the committed text."""
    out = []
    for t in traces:
        t = replace(t)
        logp = torch.log_softmax(target.model(torch.tensor([t.tokens])).logits[0].double(), -1)
        t.target_logp = [
            torch.tensor([float(logp[min(a + k - 1, len(t.tokens) - 1), d]) for k, d in enumerate(drafts.tolist(), 1)])
            for a, drafts in zip(t.anchors, t.drafts)
        ]
        out.append(t)
    return out


@pytest.mark.parametrize("mutation", ["rejected-teacher-on-true-text", "accepted-teacher-one-late", "kl-directions-swapped"])
@pytest.mark.parametrize("mode", ["estimate", "exact"])
def test_a_miswired_draft_opd_step_fails_the_reference(target, monkeypatch, mutation, mode):
    drafter = drafter_for(target, "dflash")
    traces = rollouts(target, drafter)
    cfg = LossConfig(mode=mode)
    trainer_traces = traces
    if mutation == "rejected-teacher-on-true-text":
        if mode == "exact":
            monkeypatch.setattr(opd, "reverify", _true_text_rejected_teacher)
        else:
            trainer_traces = _true_text_target_logp(target, traces)
    elif mutation == "accepted-teacher-one-late":
        if mode == "exact":
            monkeypatch.setattr(opd, "gather_positions", lambda x, pos: blocks.gather_positions(x, (pos + 1).clamp(max=x.shape[1] - 1)))
        else:
            monkeypatch.setattr(opd, "next_token_logprobs", _late(opd.next_token_logprobs))
    else:
        swap = {"forward": "reverse", "reverse": "forward"}
        for name in ("kl_exact", "kl_estimate"):
            real = getattr(opd, name)
            monkeypatch.setattr(opd, name, lambda p, q, direction, *a, real=real, **k: real(p, q, swap[direction], *a, **k))
    ref_segments, trainer_segments = [error_segments(t) for t in traces], [error_segments(t) for t in trainer_traces]
    value, grad = compare(
        lambda: reference_opd_loss(target, drafter, traces, ref_segments, cfg),
        lambda: trainer_opd_loss(target, drafter, trainer_traces, trainer_segments, cfg),
        drafter,
    )
    assert value > 1e-3 or grad > 1e-2, (value, grad)


@pytest.mark.parametrize("case", ["greedy-ce", "greedy-kl"])
def test_a_miswired_sft_teacher_fails_the_reference(target, monkeypatch, case):
    drafter = drafter_for(target, "dflash")
    items = sft_items(target)
    cfg = replace(SFT_CASES[case], anchors_per_seq=5, autocast="float32")
    if cfg.loss == "kl":
        monkeypatch.setattr(
            blocks.Teacher, "final_at", lambda self, pos: blocks.gather_positions(self.final, (pos + 1).clamp(max=self.final.shape[1] - 1))
        )
    else:
        monkeypatch.setattr(blocks.Teacher, "greedy", _late(blocks.Teacher.greedy))
    value, grad = compare(
        lambda: reference_sft_loss(target, drafter, items, cfg, 7), lambda: trainer_sft_loss(target, drafter, items, cfg, 7), drafter
    )
    assert value > 1e-3 or grad > 1e-2, (value, grad)
