"""Draft-OPD and DFlash-SFT losses for speculative-decoding drafters.

A frozen target ``p`` verifies blocks proposed by a drafter ``q``. Each replayed
block gives two token streams:

* accepted stream (labels = final response tokens): default forward KL
  ``KL(p || q) = sum_v p(v) (log p(v) - log q(v))``;
* rejected stream (the drafter's own rejected proposals, ``p`` conditioned on the
  draft prefix): default reverse KL ``KL(q || p) = sum_v q(v) (log q(v) - log p(v))``,
  weighted by the position decay ``w_k = gamma ** (k - 1)``, ``k = 1..K`` the
  token's 1-based slot inside its drafted block.

Per-token KL is either ``exact`` (full vocabulary, from logits) or a
single-token ``estimate`` from the observed token's log-probs
(``p_t = p(token)``, ``q_t = q(token)``, ``D = log p_t - log q_t``):

* forward: two-outcome KL ``p_t (log p_t - log q_t) + (1 - p_t)(log(1 - p_t) - log(1 - q_t))``;
* reverse: k3 estimator ``exp(D) - D - 1``;

both clamped to ``[-clamp, clamp]``; inside the forward (Bernoulli) term both log-probs are floored at
``floor`` (-10), as in the authors' code.

Which rejected tokens count: ``rej_slots="all"`` (slots r+1..K, the method), ``"first"`` (only slot r+1,
the first rejected token of each block; a switch of the authors' code) or ``"wrong"`` (slots r+1..K, but not a
proposal that equals the token the final text has at that position: a DFlash slot does not see the drafts
before it, so a late slot can propose the right token after a wrong earlier slot, and reverse KL on it would
push a right token down; this project's switch, not the paper's).

The accepted stream's loss itself is a switch too: ``acc_loss="kl"`` (the method: the KL above) or ``"ce"``,
cross-entropy ``-log q(token)`` on the final text's token, SFT's hard labels (under greedy verification that token is
the target's greedy token; greedy acceptance needs ``q``'s argmax there, not ``q = p``). This project's switch.

Aggregation over a training step (``L_acc`` = mean over accepted tokens,
``L_rej = sum_rej w l / sum_rej w``):

* paper:  ``L = (lam_acc L_acc + lam_rej L_rej) / (lam_acc + lam_rej)``, where a
  stream that is disabled or empty drops out of numerator and denominator;
* pooled (the default, the authors' code): ``L = (lam_acc sum_acc l + lam_rej sum_rej w l) / (lam_acc n_acc + lam_rej sum_rej w)``.

Gradient accumulation normalises by tokens, not batches: each micro-batch yields
:class:`StreamSums` (un-normalised sums) and :func:`combine_streams` divides by the
*whole step's* token count / weight sum, so summing micro-batch losses equals the
full-batch loss exactly.

Gradients flow only into the drafter; the target side is detached everywhere.

Note on ``torch.nn.functional.kl_div(input, target)``: its arguments are in the
reverse order of the math. ``kl_div(log q, log p, log_target=True)`` computes
``KL(p || q)`` (``input`` is the model's log-probs, ``target`` the reference).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError, check_choice, check_number

KLDirection = Literal["forward", "reverse"]
KL_DIRECTIONS = ("forward", "reverse")
KLMode = Literal["exact", "estimate"]

# Upper bound on log-probs fed to log(1 - exp(x)): keeps log(1 - p) finite (and its
# gradient bounded) when a probability rounds to 1.
_LOG1M_EPS = 1e-6


def _check_direction(direction: str) -> None:
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")


def kl_exact(target_logits: Tensor, draft_logits: Tensor, direction: KLDirection) -> Tensor:
    """Exact per-token KL over the vocabulary: ``[..., V] x [..., V] -> [...]`` (float32).

    forward: ``KL(p || q) = sum_v p(v) (log p(v) - log q(v))``
    reverse: ``KL(q || p) = sum_v q(v) (log q(v) - log p(v))``
    with ``p = softmax(target_logits)`` (detached), ``q = softmax(draft_logits)``.
    Equivalent to ``F.kl_div(log q, log p, log_target=True).sum(-1)`` for forward
    (kl_div takes its arguments in the reverse order of the math).
    """
    _check_direction(direction)
    if target_logits.shape != draft_logits.shape:
        raise ValueError(f"shape mismatch {tuple(target_logits.shape)} vs {tuple(draft_logits.shape)}")
    logp = F.log_softmax(target_logits.detach().float(), dim=-1)
    logq = F.log_softmax(draft_logits.float(), dim=-1)
    if direction == "forward":
        return _plogratio(logp, logq).sum(-1)
    return _plogratio(logq, logp).sum(-1)


def _plogratio(loga: Tensor, logb: Tensor) -> Tensor:
    """``a (log a - log b)`` with the convention ``0 * log 0 = 0`` (e.g. masked vocab)."""
    # mask the difference (not the product) so a -inf in loga gives neither NaN values nor NaN grads
    diff = torch.where(loga > -math.inf, loga - logb, torch.zeros_like(loga))
    return loga.exp() * diff


def _log1mexp(logx: Tensor) -> Tensor:
    """``log(1 - exp(logx))`` for ``logx <= 0``, stable; input capped at ``-_LOG1M_EPS``."""
    x = logx.clamp(max=-_LOG1M_EPS)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def kl_estimate(
    target_logprob: Tensor,
    draft_logprob: Tensor,
    direction: KLDirection,
    clamp: float = 10.0,
    floor: float = -10.0,
) -> Tensor:
    """Single-token KL estimate from the observed token's log-probs: ``[...] -> [...]`` (float32).

    forward (two-outcome KL), ``p_t = exp(target_logprob)``, ``q_t = exp(draft_logprob)``:
        ``p_t (log p_t - log q_t) + (1 - p_t)(log(1 - p_t) - log(1 - q_t))``
    reverse (k3), ``D = log p_t - log q_t``:
        ``exp(D) - D - 1``
    Result clamped to ``[-clamp, clamp]``; in the forward form both log-probs are first floored at ``floor``
    (no gradient below it, as in the authors' code). ``log(1 - x)`` terms use a stable
    ``log1mexp`` with probabilities capped just below 1, so values and gradients stay
    finite as ``p_t`` or ``q_t -> 1``.
    """
    _check_direction(direction)
    lp = target_logprob.detach().float()
    lq = draft_logprob.float()
    if direction == "forward":
        lp, lq = lp.clamp(min=floor), lq.clamp(min=floor)
        l1mp = _log1mexp(lp)
        per_tok = _plogratio(lp.clamp(max=0.0), lq) + l1mp.exp() * (l1mp - _log1mexp(lq))
    else:
        # Cap D below exp overflow; wherever the cap bites, k3 is far beyond any sane clamp.
        d = (lp - lq).clamp(max=math.log(torch.finfo(lq.dtype).max) - 1.0)
        per_tok = torch.exp(d) - d - 1.0
    return per_tok.clamp(min=-clamp, max=clamp)


def token_kl(
    target_logits: Tensor,
    draft_logits: Tensor,
    tokens: Tensor,
    direction: KLDirection,
    mode: KLMode,
    clamp: float = 10.0,
    floor: float = -10.0,
) -> Tensor:
    """Per-token KL ``[..., V] x [..., V] x [...] -> [...]`` using ``mode``.

    ``exact`` -> :func:`kl_exact` (``tokens`` unused); ``estimate`` -> :func:`kl_estimate`
    on the log-probs of ``tokens`` under target and draft.
    """
    if mode == "exact":
        return kl_exact(target_logits, draft_logits, direction)
    if mode != "estimate":
        raise ValueError(f"mode must be 'exact' or 'estimate', got {mode!r}")
    idx = tokens.long().unsqueeze(-1)
    lp = F.log_softmax(target_logits.detach().float(), dim=-1).gather(-1, idx).squeeze(-1)
    lq = F.log_softmax(draft_logits.float(), dim=-1).gather(-1, idx).squeeze(-1)
    return kl_estimate(lp, lq, direction, clamp, floor)


def decay_weights(slots: Tensor, gamma: float) -> Tensor:
    """Position decay ``w_k = gamma ** (k - 1)`` for 1-based slots ``k`` (float32)."""
    return torch.pow(float(gamma), (slots - 1).float())


@dataclass(frozen=True)
class StreamSums:
    """Un-normalised sums of one stream of one micro-batch."""

    loss_sum: Tensor  # scalar: sum of weight * per-token loss (carries grad)
    weight_sum: float  # sum of weights (== tokens when unweighted)
    tokens: int


def stream_sums(per_token_loss: Tensor, weights: Tensor | None = None) -> StreamSums:
    """``loss_sum = sum w * l``, ``weight_sum = sum w`` (``w = 1`` if ``weights`` is None)."""
    loss = per_token_loss.float()
    if weights is None:
        return StreamSums(loss.sum(), float(loss.numel()), loss.numel())
    if weights.shape != loss.shape:
        raise ValueError(f"weights shape {tuple(weights.shape)} != loss shape {tuple(loss.shape)}")
    w = weights.detach().float()
    return StreamSums((w * loss).sum(), float(w.sum()), loss.numel())


@dataclass(frozen=True)
class LossConfig:
    """The single home of the Draft-OPD loss defaults."""

    acc_direction: KLDirection = field(
        default="forward", metadata={"help": "accepted stream's KL: forward KL(p || q) or reverse KL(q || p)", "choices": KL_DIRECTIONS}
    )
    rej_direction: KLDirection = field(
        default="reverse", metadata={"help": "rejected stream's KL (as --loss-acc-direction)", "choices": KL_DIRECTIONS}
    )
    mode: KLMode = field(
        default="estimate",
        metadata={
            "help": "exact (full vocabulary; re-verifies rejected blocks) or estimate "
            "(single-token estimators from the observed tokens' log-probs)",
            "choices": ("exact", "estimate"),
        },
    )
    gamma: float = field(default=0.8, metadata={"help": "rejected-stream decay: slot k weighs gamma^(k-1)"})
    lam_acc: float = field(default=1.0, metadata={"help": "accepted stream's weight"})
    lam_rej: float = field(default=1.0, metadata={"help": "rejected stream's weight"})
    acc_loss: Literal["kl", "ce"] = field(
        default="kl",
        metadata={
            "help": "accepted stream's loss: kl (the method: --loss-acc-direction, --loss-mode) or ce (cross-entropy on the final "
            "text's token, SFT's hard labels; with greedy rollouts the target's greedy token)",
            "choices": ("kl", "ce"),
        },
    )
    use_rejected: bool = field(default=True, metadata={"help": "train the rejected stream"})
    rej_slots: Literal["all", "first", "wrong"] = field(
        default="all",
        metadata={
            "help": "rejected proposals trained: all (slots "
            "r+1..K), first (slot r+1 only) or wrong (all but those equal to the final text)",
            "choices": ("all", "first", "wrong"),
        },
    )
    aggregation: Literal["paper", "pooled"] = field(
        default="pooled",
        metadata={
            "help": "paper (the mean of each stream's mean) or pooled (one sum over both streams' tokens: the authors' code)",
            "choices": ("paper", "pooled"),
        },
    )
    clamp: float = field(default=10.0, metadata={"help": "estimators clamped to [-clamp, clamp]"})
    floor: float = field(default=-10.0, metadata={"help": "log-prob floor inside the forward estimator"})

    flag_prefix: ClassVar[str] = "loss_"

    def __post_init__(self) -> None:
        """Raises `ConfigError` naming the `--loss-*` flag; both weights 0 would leave no loss to train on."""
        for name in ("acc_direction", "rej_direction", "mode", "aggregation", "rej_slots", "acc_loss"):
            check_choice(self, name)
        check_number(self, "gamma", 0, 1, above=True)
        check_number(self, "lam_acc", 0)
        check_number(self, "lam_rej", 0)
        if self.lam_acc + self.lam_rej <= 0:
            raise ConfigError("--loss-lam-acc and --loss-lam-rej cannot both be 0")
        check_number(self, "clamp", 0, above=True)
        check_number(self, "floor", high=0)


def combine_streams(
    acc: StreamSums,
    rej: StreamSums,
    acc_norm: float,
    rej_norm: float,
    cfg: LossConfig,
) -> Tensor:
    """Combine one micro-batch's stream sums into its share of the step loss (0-dim).

    ``acc_norm`` / ``rej_norm`` are the whole optimizer step's accepted token count and
    rejected weight sum (for a single micro-batch: ``acc.weight_sum``, ``rej.weight_sum``),
    so summing over micro-batches equals the loss of the concatenated data.
    A stream is present iff its norm > 0 (and ``cfg.use_rejected`` for rejected).

    paper:  ``(lam_acc acc.loss_sum / acc_norm + lam_rej rej.loss_sum / rej_norm) / sum(lam present)``
    pooled: ``(lam_acc acc.loss_sum + lam_rej rej.loss_sum) / (lam_acc acc_norm + lam_rej rej_norm)``
    Absent streams drop out of both numerator and denominator; if none is present the
    result is a zero that still backpropagates (zero gradient).
    """
    parts = [(cfg.lam_acc, acc.loss_sum, float(acc_norm))]
    if cfg.use_rejected:
        parts.append((cfg.lam_rej, rej.loss_sum, float(rej_norm)))
    parts = [(lam, s, n) for lam, s, n in parts if n > 0]
    if cfg.aggregation == "paper":
        denom = sum(lam for lam, _, _ in parts)
        num = sum(lam * s / n for lam, s, n in parts)
    else:
        denom = sum(lam * n for lam, _, n in parts)
        num = sum(lam * s for lam, s, _ in parts)
    if not parts or denom <= 0:
        return acc.loss_sum.float() * 0.0
    return num / denom


def sft_slot_weights(slots: Tensor, decay: float) -> Tensor:
    """DFlash SFT slot weights ``exp(-(k - 1) / decay)`` for 1-based slots ``k`` (float32).

    Typical ``decay``: 7 for block size 16, 4 for block size 8.
    """
    return torch.exp(-(slots - 1).float() / float(decay))


def sft_token_loss(
    draft_logits: Tensor,
    labels: Tensor,
    target_logits: Tensor | None = None,
    kind: Literal["ce", "kl"] = "ce",
) -> Tensor:
    """Per-token SFT loss ``[..., V] x [...] -> [...]`` (float32).

    ce: hard-label cross-entropy ``-log q(label)`` (labels == -100 give 0).
    kl: soft forward ``KL(p || q)`` to ``p = softmax(target_logits)`` (labels unused).
    """
    if kind == "kl":
        if target_logits is None:
            raise ValueError("kind='kl' needs target_logits")
        return kl_exact(target_logits, draft_logits, "forward")
    if kind != "ce":
        raise ValueError(f"kind must be 'ce' or 'kl', got {kind!r}")
    flat = draft_logits.float().reshape(-1, draft_logits.shape[-1])
    ce = F.cross_entropy(flat, labels.reshape(-1).long(), reduction="none")
    return ce.reshape(labels.shape)
