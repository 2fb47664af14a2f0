"""Tests for draftopd.train.losses."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from draftopd.train.losses import (
    LossConfig,
    StreamSums,
    combine_streams,
    decay_weights,
    kl_estimate,
    kl_exact,
    sft_slot_weights,
    sft_token_loss,
    stream_sums,
    token_kl,
)

SHAPES = [(7,), (3, 11), (2, 4, 33)]


def _logits(shape: tuple[int, ...], seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


# --------------------------------------------------------------------------- kl_exact


@pytest.mark.parametrize("shape", SHAPES)
def test_kl_exact_matches_kl_div(shape: tuple[int, ...]) -> None:
    t, d = _logits(shape, 0), _logits(shape, 1)
    logp, logq = F.log_softmax(t, -1), F.log_softmax(d, -1)
    # kl_div(input, target) = KL(target || input): arguments reversed w.r.t. the math.
    fwd_ref = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
    rev_ref = F.kl_div(logp, logq, reduction="none", log_target=True).sum(-1)
    fwd, rev = kl_exact(t, d, "forward"), kl_exact(t, d, "reverse")
    assert fwd.shape == shape[:-1] and rev.shape == shape[:-1]
    torch.testing.assert_close(fwd, fwd_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rev, rev_ref, rtol=1e-5, atol=1e-6)
    assert (fwd >= -1e-6).all() and (rev >= -1e-6).all()
    assert not torch.allclose(fwd, rev)  # the two directions really differ


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_exact_zero_when_equal(direction: str) -> None:
    t = _logits((5, 13), 2)
    torch.testing.assert_close(kl_exact(t, t.clone(), direction), torch.zeros(5), atol=1e-6, rtol=0)
    # shift invariance of logits
    torch.testing.assert_close(kl_exact(t, t + 3.0, direction), torch.zeros(5), atol=1e-5, rtol=0)


def test_kl_exact_masked_vocab_is_finite() -> None:
    t, d = _logits((4, 9), 3), _logits((4, 9), 4).requires_grad_()
    t[:, :3] = -math.inf  # target assigns zero probability to part of the vocab
    fwd = kl_exact(t, d, "forward")
    assert torch.isfinite(fwd).all()
    fwd.sum().backward()
    assert torch.isfinite(d.grad).all()


def test_kl_exact_bf16_input_gives_float32() -> None:
    t, d = _logits((3, 8), 5).bfloat16(), _logits((3, 8), 6).bfloat16()
    out = kl_exact(t, d, "forward")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, kl_exact(t.float(), d.float(), "forward"))


def test_kl_exact_bad_args() -> None:
    with pytest.raises(ValueError):
        kl_exact(torch.zeros(3, 4), torch.zeros(3, 4), "sideways")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        kl_exact(torch.zeros(3, 4), torch.zeros(3, 5), "forward")


# --------------------------------------------------------------------------- kl_estimate


def test_kl_estimate_hand_computed() -> None:
    lp, lq = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    # forward: 0.5*(ln .5 - ln .25) + 0.5*(ln .5 - ln .75) = 0.5*ln 2 + 0.5*ln(2/3) = 0.5*ln(4/3)
    fwd = kl_estimate(lp, lq, "forward")
    torch.testing.assert_close(fwd, torch.tensor([0.1438410362]), rtol=1e-5, atol=1e-6)
    # reverse k3: D = ln .5 - ln .25 = ln 2;  e^D - D - 1 = 2 - ln 2 - 1 = 1 - ln 2
    rev = kl_estimate(lp, lq, "reverse")
    torch.testing.assert_close(rev, torch.tensor([0.3068528194]), rtol=1e-5, atol=1e-6)


def test_kl_estimate_zero_when_equal() -> None:
    lp = torch.log(torch.tensor([0.01, 0.3, 0.9, 0.999]))
    for direction in ("forward", "reverse"):
        torch.testing.assert_close(kl_estimate(lp, lp.clone(), direction), torch.zeros(4), atol=1e-6, rtol=0)


def test_kl_estimate_clamp_engages() -> None:
    # reverse: p_t = 1, q_t = 1e-6 -> D = ln 1e6 ~ 13.8, k3 ~ 1e6 -> clamped
    # reverse: p_t = 1e-20, q_t = 1 -> D ~ -46, k3 ~ 45 -> clamped
    # forward: p_t ~ 1, q_t = 1e-10 -> ~ 23 -> clamped
    lp = torch.tensor([0.0, math.log(1e-20), -1e-9])
    lq = torch.tensor([math.log(1e-6), 0.0, math.log(1e-10)], requires_grad=True)
    rev = kl_estimate(lp[:2], lq[:2], "reverse")
    torch.testing.assert_close(rev, torch.tensor([10.0, 10.0]))
    torch.testing.assert_close(kl_estimate(lp[:2], lq[:2], "reverse", clamp=3.0), torch.tensor([3.0, 3.0]))
    fwd = kl_estimate(lp[2:], lq[2:], "forward")
    torch.testing.assert_close(fwd, torch.tensor([10.0]))
    # an unclamped value passes through unchanged
    big = kl_estimate(lp[:1], lq[:1], "reverse", clamp=1e9)
    torch.testing.assert_close(big, torch.tensor([1e6 - math.log(1e6) - 1.0]), rtol=1e-4, atol=0)
    (rev.sum() + fwd.sum()).backward()
    assert torch.isfinite(lq.grad).all()


def test_kl_estimate_forward_floors_log_probs_at_minus_10() -> None:
    """The authors' code floors both log-probs at -10 inside the Bernoulli term: below it the loss is that of
    -10 and the drafter gets no gradient; reverse (k3) is not floored."""
    lp = torch.tensor([math.log(0.6), math.log(0.6), -30.0])
    lq = torch.tensor([-20.0, -10.0, math.log(0.5)], requires_grad=True)
    fwd = kl_estimate(lp, lq, "forward", clamp=1e9)
    assert fwd[0].item() == pytest.approx(fwd[1].item())
    p0, q0 = math.exp(-10.0), 0.5  # p floored at e^-10
    assert fwd[2].item() == pytest.approx(p0 * math.log(p0 / q0) + (1 - p0) * math.log((1 - p0) / (1 - q0)), rel=1e-5)
    fwd.sum().backward()
    assert lq.grad[0] == 0 and lq.grad[1] != 0
    torch.testing.assert_close(
        kl_estimate(lp[:2], lq[:2].detach(), "forward", floor=-30.0, clamp=1e9)[0],
        torch.tensor(0.6 * math.log(0.6) + 20 * 0.6 + 0.4 * math.log(0.4)),
        rtol=1e-4,
        atol=1e-4,
    )
    rev = kl_estimate(torch.tensor([0.0]), torch.tensor([-20.0]), "reverse", clamp=1e9)
    assert rev.item() > 1e8  # e^20: no floor in k3


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize(
    "lp_val, lq_val",
    [
        (0.0, math.log(0.5)),
        (-1e-9, math.log(0.3)),
        (math.log(0.5), 0.0),
        (math.log(0.5), -1e-9),
        (0.0, 0.0),
        (-1e-12, -1e-10),
        (math.log(1e-30), -1e-12),
    ],
)
def test_kl_estimate_finite_grads_near_one(direction: str, lp_val: float, lq_val: float) -> None:
    lp = torch.tensor([lp_val], requires_grad=True)
    lq = torch.tensor([lq_val], requires_grad=True)
    out = kl_estimate(lp, lq, direction)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(lq.grad).all()
    assert lp.grad is None  # target side is detached


def test_kl_estimate_forward_matches_binary_kl_and_bounds_exact() -> None:
    # The two-outcome KL coarsens {token, not token}; by data processing it is <= exact KL(p||q).
    t, d = _logits((64, 10), 7), _logits((64, 10), 8)
    tok = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(9))
    est = token_kl(t, d, tok, "forward", "estimate", clamp=1e9)
    ex = kl_exact(t, d, "forward")
    assert (est <= ex + 1e-5).all()
    p_t = F.softmax(t, -1).gather(-1, tok[:, None]).squeeze(-1).double()
    q_t = F.softmax(d, -1).gather(-1, tok[:, None]).squeeze(-1).double()
    ref = p_t * torch.log(p_t / q_t) + (1 - p_t) * torch.log((1 - p_t) / (1 - q_t))
    torch.testing.assert_close(est.double(), ref, rtol=1e-4, atol=1e-6)


def test_kl_estimate_reverse_k3_unbiased() -> None:
    g = torch.Generator().manual_seed(0)
    t, d = torch.randn(6, generator=g), torch.randn(6, generator=g)
    logp, logq = F.log_softmax(t, -1), F.log_softmax(d, -1)
    tok = torch.multinomial(logq.exp(), 200_000, replacement=True, generator=g)
    est = kl_estimate(logp[tok], logq[tok], "reverse").mean()
    exact = kl_exact(t, d, "reverse")
    assert exact > 0.1
    assert abs(est.item() - exact.item()) < 0.02 * max(1.0, exact.item()) + 0.01


# --------------------------------------------------------------------------- token_kl / grads


@pytest.mark.parametrize("mode", ["exact", "estimate"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_grad_flows_into_draft_only(mode: str, direction: str) -> None:
    t = _logits((2, 5, 17), 10).requires_grad_()
    d = _logits((2, 5, 17), 11).requires_grad_()
    tok = torch.randint(0, 17, (2, 5), generator=torch.Generator().manual_seed(12))
    loss = token_kl(t, d, tok, direction, mode).sum()
    loss.backward()
    assert t.grad is None
    assert d.grad is not None and torch.isfinite(d.grad).all() and d.grad.abs().sum() > 0


def test_token_kl_dispatch() -> None:
    t, d = _logits((3, 4, 9), 13), _logits((3, 4, 9), 14)
    tok = torch.randint(0, 9, (3, 4), generator=torch.Generator().manual_seed(15))
    torch.testing.assert_close(token_kl(t, d, tok, "reverse", "exact"), kl_exact(t, d, "reverse"))
    lp = F.log_softmax(t, -1).gather(-1, tok[..., None]).squeeze(-1)
    lq = F.log_softmax(d, -1).gather(-1, tok[..., None]).squeeze(-1)
    torch.testing.assert_close(token_kl(t, d, tok, "forward", "estimate"), kl_estimate(lp, lq, "forward"))
    with pytest.raises(ValueError):
        token_kl(t, d, tok, "forward", "approx")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- weights


def test_decay_weights() -> None:
    slots = torch.tensor([[1, 2, 3], [4, 1, 2]])
    w = decay_weights(slots, 0.8)
    assert w.dtype == torch.float32 and w.shape == slots.shape
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.8, 0.64], [0.512, 1.0, 0.8]]))
    torch.testing.assert_close(decay_weights(slots, 1.0), torch.ones(2, 3))


def test_sft_slot_weights() -> None:
    w = sft_slot_weights(torch.tensor([1, 2, 16]), 7.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(-1 / 7), math.exp(-15 / 7)]))
    torch.testing.assert_close(sft_slot_weights(torch.tensor([1, 5]), 4), torch.tensor([1.0, math.exp(-1.0)]))


# --------------------------------------------------------------------------- stream sums / combine


def test_stream_sums() -> None:
    s = stream_sums(torch.tensor([1.0, 2.0, 3.0]))
    assert s.tokens == 3 and s.weight_sum == 3.0 and s.loss_sum.item() == 6.0
    s = stream_sums(torch.tensor([4.0, 6.0]), torch.tensor([1.0, 0.5]))
    assert s.tokens == 2 and s.weight_sum == 1.5 and s.loss_sum.item() == 7.0
    e = stream_sums(torch.empty(0))
    assert e.tokens == 0 and e.weight_sum == 0.0 and e.loss_sum.item() == 0.0
    with pytest.raises(ValueError):
        stream_sums(torch.ones(3), torch.ones(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tokens = 5  # type: ignore[misc]


def _hand_streams() -> tuple[StreamSums, StreamSums]:
    acc = stream_sums(torch.tensor([1.0, 2.0, 3.0]))  # sum 6, n 3, L_acc = 2
    w = decay_weights(torch.tensor([1, 2]), 0.5)  # [1, .5]
    rej = stream_sums(torch.tensor([4.0, 6.0]), w)  # sum w*l = 7, sum w = 1.5, L_rej = 14/3
    return acc, rej


def test_combine_paper_and_pooled_hand_made() -> None:
    acc, rej = _hand_streams()
    cfg = LossConfig(lam_acc=1.0, lam_rej=3.0, aggregation="paper")
    # paper: (1*2 + 3*14/3) / (1 + 3) = 16/4 = 4
    out = combine_streams(acc, rej, acc.weight_sum, rej.weight_sum, cfg)
    assert out.dim() == 0
    torch.testing.assert_close(out, torch.tensor(4.0))
    # pooled: (1*6 + 3*7) / (1*3 + 3*1.5) = 27/7.5 = 3.6
    pooled = dataclasses.replace(cfg, aggregation="pooled")
    torch.testing.assert_close(combine_streams(acc, rej, 3.0, 1.5, pooled), torch.tensor(3.6))


@pytest.mark.parametrize("aggregation", ["paper", "pooled"])
def test_combine_rejected_off_is_l_acc(aggregation: str) -> None:
    acc, rej = _hand_streams()
    cfg = LossConfig(use_rejected=False, lam_acc=0.7, lam_rej=5.0, aggregation=aggregation)  # type: ignore[arg-type]
    assert combine_streams(acc, rej, 3.0, 1.5, cfg).item() == 2.0


@pytest.mark.parametrize("aggregation", ["paper", "pooled"])
def test_combine_empty_streams(aggregation: str) -> None:
    acc, rej = _hand_streams()
    cfg = LossConfig(lam_acc=1.0, lam_rej=3.0, aggregation=aggregation)  # type: ignore[arg-type]
    empty = stream_sums(torch.empty(0))
    torch.testing.assert_close(combine_streams(acc, empty, 3.0, 0.0, cfg), torch.tensor(2.0))
    torch.testing.assert_close(combine_streams(empty, rej, 0.0, 1.5, cfg), torch.tensor(14 / 3))
    x = torch.empty(0, requires_grad=True)
    none = combine_streams(stream_sums(x), stream_sums(x), 0.0, 0.0, cfg)
    assert none.dim() == 0 and none.item() == 0.0
    none.backward()  # grad-safe even with nothing present
    assert torch.isfinite(none)


def test_combine_zero_lambda_drops_stream() -> None:
    acc, rej = _hand_streams()
    torch.testing.assert_close(combine_streams(acc, rej, 3.0, 1.5, LossConfig(lam_rej=0.0)), torch.tensor(2.0))


@pytest.mark.parametrize("aggregation", ["paper", "pooled"])
def test_gradient_accumulation_equivalence(aggregation: str) -> None:
    g = torch.Generator().manual_seed(21)
    acc_l = (torch.rand(20, generator=g) * 3).requires_grad_()
    rej_l = (torch.rand(9, generator=g) * 5).requires_grad_()
    rej_w = decay_weights(torch.randint(1, 9, (9,), generator=g), 0.8)
    cfg = LossConfig(lam_acc=1.0, lam_rej=2.0, aggregation=aggregation)  # type: ignore[arg-type]

    full = combine_streams(stream_sums(acc_l), stream_sums(rej_l, rej_w), 20.0, float(rej_w.sum()), cfg)
    full_grads = torch.autograd.grad(full, (acc_l, rej_l))

    # uneven micro-batches: acc 3 + 17 tokens, rej 0 + 9 tokens
    acc_parts, rej_parts, w_parts = acc_l.split([3, 17]), rej_l.split([0, 9]), rej_w.split([0, 9])
    mbs = [(stream_sums(a), stream_sums(r, w)) for a, r, w in zip(acc_parts, rej_parts, w_parts)]
    acc_norm = sum(a.weight_sum for a, _ in mbs)
    rej_norm = sum(r.weight_sum for _, r in mbs)
    accumulated = sum(combine_streams(a, r, acc_norm, rej_norm, cfg) for a, r in mbs)
    torch.testing.assert_close(accumulated, full)
    for got, want in zip(torch.autograd.grad(accumulated, (acc_l, rej_l)), full_grads):
        torch.testing.assert_close(got, want)

    # batch normalisation (mean of per-micro-batch means) gives a different loss
    naive = sum(combine_streams(a, r, a.weight_sum, r.weight_sum, cfg) for a, r in mbs) / len(mbs)
    assert abs(naive.item() - full.item()) > 1e-2


def test_loss_config_defaults_and_validation() -> None:
    cfg = LossConfig()
    assert (cfg.acc_direction, cfg.rej_direction, cfg.mode) == ("forward", "reverse", "estimate")
    assert (cfg.gamma, cfg.lam_acc, cfg.lam_rej, cfg.clamp) == (0.8, 1.0, 1.0, 10.0)
    assert cfg.use_rejected and cfg.aggregation == "pooled" and cfg.rej_slots == "all" and cfg.floor == -10.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gamma = 0.5  # type: ignore[misc]
    for bad in (
        {"gamma": 0.0},
        {"gamma": 1.5},
        {"lam_acc": -1.0},
        {"clamp": 0.0},
        {"mode": "approx"},
        {"aggregation": "mean"},
        {"rej_direction": "both"},
        {"rej_slots": "second"},
        {"floor": 1.0},
    ):
        with pytest.raises(ValueError):
            LossConfig(**bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- SFT


def test_sft_ce_matches_cross_entropy() -> None:
    d = _logits((2, 6, 11), 30).requires_grad_()
    labels = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(31))
    labels[0, -1] = -100
    out = sft_token_loss(d, labels)
    ref = F.cross_entropy(d.reshape(-1, 11), labels.reshape(-1), reduction="none").reshape(2, 6)
    assert out.shape == (2, 6)
    torch.testing.assert_close(out, ref)
    assert out[0, -1].item() == 0.0
    out.sum().backward()
    assert torch.isfinite(d.grad).all()


def test_sft_kl_matches_kl_div() -> None:
    t = _logits((2, 6, 11), 32).requires_grad_()
    d = _logits((2, 6, 11), 33)
    labels = torch.zeros(2, 6, dtype=torch.long)
    out = sft_token_loss(d, labels, target_logits=t, kind="kl")
    ref = F.kl_div(F.log_softmax(d, -1), F.log_softmax(t, -1), reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        sft_token_loss(d, labels, kind="kl")
    with pytest.raises(ValueError):
        sft_token_loss(d, labels, kind="mse")  # type: ignore[arg-type]
