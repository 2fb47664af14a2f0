"""What every drafter `q` shares, whatever its family (DFlash: `dflash.py`, EAGLE-3: `eagle3.py`; `registry.py` finds them).

The seam between drafters and the rest of the package (decoder, trainers, replay) is four calls:
- `project_context(features, positions, valid, next_tokens)`: the target's features of committed positions ->
  a `DraftContext` (per-layer keys/values; EAGLE-3 also keeps the fused features). `next_tokens[s]` is the token
  at position s + 1 (EAGLE-3 pairs the feature of position s with the embedding of the token after it; DFlash
  ignores it);
- `forward(ctx, anchor_tokens, anchor_positions, block_tokens)`: draft-vocabulary logits (b, n, K, V_draft) of
  the K slots after each anchor, slot k predicting the token at anchor + k. `block_tokens` (b, n, K-1) are the
  tokens at slots 1..K-1, which a sequential drafter (EAGLE-3) is teacher-forced on; DFlash ignores them;
- `draft(ctx, anchor, anchor_pos, pick)`: one block per row for decoding, `pick` choosing each slot's token
  from its target-vocabulary logits (argmax or a sample);
- `draft_logits`: `forward` spread over the target's vocabulary (-inf outside a reduced draft vocabulary), so
  decoding, acceptance and replay work in target ids and stay lossless.

Shared here: the target's frozen embedding and head (non-persistent buffers sharing its storage: never saved,
never trained), the reduced draft vocabulary (`d2t`/`t2d`, as EAGLE-3 and speculators store it), the resolved
shape (`DrafterSpec`, saved as config.json with the family's architecture name), and save/load with target checks: a
checkpoint of one family asked for as another, or built for another target, is one clear error line. What differs
between families (the class, default target layers, a fixed depth, a MASK) is read from the family's registration.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DrafterConfig, flag
from .registry import DEFAULT, families, family, titles
from .target import Target


class DrafterError(ValueError):
    """A drafter checkpoint that cannot be used with this target (one clear line)."""


@dataclass(frozen=True)
class DrafterSpec:
    """A fully resolved drafter shape, including the target shape it was built for (saved as config.json)."""

    hidden_size: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: tuple[int, ...]  # output-id convention: hidden_states[i + 1]
    num_layers: int
    block_size: int  # anchor + K = block_size - 1 drafted slots
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    mask_token_id: int | None = None  # DFlash: MASK = this target embedding row (reference format); None = a learned vector
    draft_vocab_size: int | None = None  # reduced head over this many target tokens (d2t/t2d); None = the full vocabulary
    arch: str = DEFAULT  # the drafter family (`registry.py`): "dflash" | "eagle3"

    @staticmethod
    def resolve(cfg: DrafterConfig, target: Target) -> DrafterSpec:
        """The shape `cfg` asks for on `target` (None fields from the target or the architecture's rule), refused with one
        DrafterError line naming the flag to change when it cannot be built (layer ids past the target's depth, heads
        that do not divide the hidden size, kv heads that do not divide the heads, ...)."""
        tcfg = target.model.config
        fam = family(cfg.arch or DEFAULT)
        heads = cfg.num_heads or tcfg.num_attention_heads
        if fam.num_layers is not None and cfg.num_layers != fam.num_layers:
            raise DrafterError(f"{fam.named} drafter has {fam.depth}, not {cfg.num_layers} (--draft-num-layers {fam.num_layers})")
        layer_ids = cfg.target_layer_ids or fam.default_layers(target.num_layers, cfg.num_layers)
        if cfg.num_heads is not None and cfg.head_dim is None and target.hidden_size % heads:
            raise DrafterError(
                f"--draft-num-heads {heads} does not divide the target's hidden size {target.hidden_size}: "
                "choose a divisor or give --draft-head-dim"
            )
        spec = DrafterSpec(
            hidden_size=target.hidden_size,
            vocab_size=target.vocab_size,
            num_target_layers=target.num_layers,
            target_layer_ids=tuple(layer_ids),
            num_layers=cfg.num_layers,
            block_size=cfg.block_size,
            num_heads=heads,
            num_kv_heads=cfg.num_kv_heads or getattr(tcfg, "num_key_value_heads", heads),
            head_dim=cfg.head_dim or getattr(tcfg, "head_dim", None) or target.hidden_size // heads,
            intermediate_size=cfg.intermediate_size or tcfg.intermediate_size,
            rope_theta=cfg.rope_theta,
            rms_norm_eps=cfg.rms_norm_eps,
            mask_token_id=DrafterSpec._mask(cfg, fam.name, target),
            draft_vocab_size=cfg.vocab_size,
            arch=fam.name,
        )
        spec.check(lambda name: flag(cfg, {"draft_vocab_size": "vocab_size"}.get(name, name)))
        return spec

    @staticmethod
    def _mask(cfg: DrafterConfig, arch: str, target: Target) -> int | None:
        """The MASK row a new drafter gets: a family with a MASK (DFlash) takes `cfg.mask_token_id`, else the target's
        default row (a drafter that the reference format can hold), or None, a learned vector, with `cfg.learned_mask`;
        other families (EAGLE-3) have no MASK."""
        fam = family(arch)
        if not fam.has_mask:
            if cfg.learned_mask:
                raise DrafterError(
                    f"--draft-learned-mask applies to {titles(lambda f: f.has_mask)} drafters: {fam.named} drafter has no MASK"
                )
            return None
        if cfg.learned_mask:
            return None
        return cfg.mask_token_id if cfg.mask_token_id is not None else default_mask_token(target)

    def check(self, name: Callable[[str], str]) -> None:
        """Raise one DrafterError line unless every field holds a value a drafter can be built from: the same rules for a
        spec resolved from flags and one read from a checkpoint's config.json (`load_drafter`). `name(field)` is how
        the message names a field (its flag, or the file's key)."""

        def need(field: str, ok: bool, rule: str) -> None:
            if not ok:
                raise DrafterError(f"{name(field)} {rule}, got {getattr(self, field)!r}")

        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        need("arch", isinstance(self.arch, str) and self.arch in families(), f"must be one of {', '.join(families())}")
        for field, low in (
            ("hidden_size", 1),
            ("vocab_size", 1),
            ("num_target_layers", 1),
            ("num_layers", 1),
            ("block_size", 2),
            ("num_heads", 1),
            ("num_kv_heads", 1),
            ("head_dim", 2),
            ("intermediate_size", 1),
        ):
            need(field, is_int(getattr(self, field)) and getattr(self, field) >= low, f"must be an integer >= {low}")
        need("head_dim", self.head_dim % 2 == 0, "must be even (RoPE rotates pairs of dimensions)")
        need("num_kv_heads", self.num_heads % self.num_kv_heads == 0, f"must divide the {self.num_heads} attention heads")
        for field in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, field)
            need(
                field,
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
                "must be a finite number > 0",
            )
        ids, depth = self.target_layer_ids, self.num_target_layers
        need(
            "target_layer_ids",
            isinstance(ids, tuple) and len(ids) > 0 and all(is_int(i) and 0 <= i < depth for i in ids),
            f"must be layer ids 0..{depth - 1}, none outside the target's {depth} layers",
        )
        need(
            "mask_token_id",
            self.mask_token_id is None or (is_int(self.mask_token_id) and 0 <= self.mask_token_id < self.vocab_size),
            f"must be a token id of the target's vocabulary (0..{self.vocab_size - 1})",
        )
        need(
            "draft_vocab_size",
            self.draft_vocab_size is None or (is_int(self.draft_vocab_size) and 1 <= self.draft_vocab_size <= self.vocab_size),
            f"must be in [1, {self.vocab_size}] (the target's vocabulary)",
        )
        fam = family(self.arch)
        if fam.num_layers is not None:
            need("num_layers", self.num_layers == fam.num_layers, f"must be {fam.num_layers} ({fam.named} drafter has {fam.depth})")
        if not fam.has_mask:
            need("mask_token_id", self.mask_token_id is None, f"must be null ({fam.named} drafter has no MASK)")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding, HF rotate-half layout. x: (b, heads, n, d); positions: (b, n)."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    angles = positions.float()[:, None, :, None] * inv_freq  # (b, 1, n, d/2)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return (x.float() * cos + torch.cat([-x2, x1], -1).float() * sin).to(x.dtype)


@dataclass
class DraftContext:
    """Projected target context, one (keys, values) per drafter layer: (b, kv_heads, slots, head_dim) each,
    RoPE already applied at the slots' logical `positions` (b, slots); `valid` (b, slots) marks real tokens;
    `fused` (b, slots, H): the fused target features (EAGLE-3's first-step input; None for DFlash)."""

    keys: list[Tensor]
    values: list[Tensor]
    positions: Tensor
    valid: Tensor
    fused: Tensor | None = None

    def extend(self, other: DraftContext) -> DraftContext:
        """This context followed by `other`'s slots (a context built piece by piece)."""
        cat = lambda a, b: torch.cat([a, b], dim=-2)  # noqa: E731
        fused = None if self.fused is None else torch.cat([self.fused, other.fused], 1)
        return DraftContext(
            [cat(a, b) for a, b in zip(self.keys, other.keys)],
            [cat(a, b) for a, b in zip(self.values, other.values)],
            torch.cat([self.positions, other.positions], 1),
            torch.cat([self.valid, other.valid], 1),
            fused,
        )


@dataclass
class ContextCache:
    """The drafter's context while decoding, preallocated and ragged like the target's KV cache (`target.RaggedCache`):
    row b's context fills slots 0 .. lengths[b]-1 (slot = position), a verified block's context is written at the
    row's own length and a commit only advances `lengths`, so rejected positions leave no holes.
    keys/values (b, kv_heads, capacity, head_dim) per drafter layer; fused (b, capacity, H) or None;
    lengths (b,) on the device and `host_lengths` on the host (sizing a view never waits for the device)."""

    keys: list[Tensor]
    values: list[Tensor]
    fused: Tensor | None
    lengths: Tensor
    host_lengths: list[int]

    @staticmethod
    def start(ctx: DraftContext, lengths: Tensor, host_lengths: list[int], capacity: int) -> ContextCache:
        """A cache of `capacity` slots a row holding `ctx` (the prompt's context at slots 0 .. width-1) with row b's
        first `lengths[b]` slots committed."""
        width = ctx.valid.shape[1]
        grow = lambda x, dim: torch.cat([x, x.new_zeros((*x.shape[:dim], max(capacity, width) - width, *x.shape[dim + 1 :]))], dim)  # noqa: E731
        return ContextCache(
            [grow(k, 2) for k in ctx.keys],
            [grow(v, 2) for v in ctx.values],
            None if ctx.fused is None else grow(ctx.fused, 1),
            lengths,
            list(host_lengths),
        )

    @property
    def capacity(self) -> int:
        """Slots the buffers hold (a drafter without attention layers keeps only `fused`)."""
        return self.keys[0].shape[2] if self.keys else self.fused.shape[1]

    def view(self) -> DraftContext:
        """The committed context as a `DraftContext` over slots 0 .. max(lengths)-1."""
        width = max(self.host_lengths)
        slot = torch.arange(width, device=self.lengths.device)
        return DraftContext(
            [k[:, :, :width] for k in self.keys],
            [v[:, :, :width] for v in self.values],
            slot.expand(len(self.host_lengths), -1),
            slot[None, :] < self.lengths[:, None],
            None if self.fused is None else self.fused[:, :width],
        )

    def write(self, new: DraftContext, slots: Tensor) -> None:
        """Store `new` (b, n slots) at `slots` (b, n) of each row (growing the buffers if they are too short)."""
        need = max(self.host_lengths) + slots.shape[1]
        if need > self.capacity:
            self._grow(need)
        index = slots[:, None, :, None]
        for buf, part in zip(self.keys + self.values, new.keys + new.values):
            buf.scatter_(2, index.expand_as(part), part)
        if self.fused is not None:
            self.fused.scatter_(1, slots[..., None].expand_as(new.fused), new.fused)

    def commit(self, keep: Tensor, keep_host: list[int]) -> None:
        self.lengths = self.lengths + keep
        self.host_lengths = [n + k for n, k in zip(self.host_lengths, keep_host)]

    def select(self, index: Tensor, host_index: list[int]) -> ContextCache:
        """Keep only the batch rows `index` (their host list `host_index`)."""
        return ContextCache(
            [k[index] for k in self.keys],
            [v[index] for v in self.values],
            None if self.fused is None else self.fused[index],
            self.lengths[index],
            [self.host_lengths[i] for i in host_index],
        )

    def _grow(self, need: int) -> None:
        size = max(need, 2 * self.capacity)
        pad = lambda x, dim: torch.cat([x, x.new_zeros((*x.shape[:dim], size - x.shape[dim], *x.shape[dim + 1 :]))], dim)  # noqa: E731
        self.keys, self.values = [pad(k, 2) for k in self.keys], [pad(v, 2) for v in self.values]
        self.fused = None if self.fused is None else pad(self.fused, 1)


class Drafter(nn.Module):
    """Base of every drafter. `embed_weight` (V_in, H) and `lm_head_weight` (V, H) are the target's frozen input
    embedding and output head weights, held as non-persistent buffers that share the target's storage.
    `.to(dtype)` gives the drafter converted copies and `.to(device)` moved ones; the target's own stay as they are.
    Subclasses build their layers, then call `_finish()`. Use `new_drafter` / `load_drafter`."""

    def __init__(self, spec: DrafterSpec, embed_weight: Tensor, lm_head_weight: Tensor, target_name: str = "custom"):
        super().__init__()
        self.spec = spec
        self.target_name = target_name
        self.register_buffer("embed_weight", embed_weight.detach(), persistent=False)
        self.register_buffer("lm_head_weight", lm_head_weight.detach(), persistent=False)
        self.checkpoint_layers = False  # recompute each layer in backward (`OptimConfig.checkpoint_layers`; DFlash)

    def _finish(self) -> None:
        spec = self.spec
        if spec.draft_vocab_size is not None:  # reduced head: draft id i is target id i + d2t[i]; t2d marks kept target ids
            self.register_buffer("d2t", torch.zeros(spec.draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(spec.vocab_size, dtype=torch.bool))
            self.register_buffer("head_weight", torch.empty(0), persistent=False)
            self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_head())
        self.to(device=self.lm_head_weight.device)

    def __deepcopy__(self, memo: dict) -> Drafter:
        """A copy that shares the target's frozen weights instead of copying them."""
        memo.update({id(self.embed_weight): self.embed_weight, id(self.lm_head_weight): self.lm_head_weight})
        new = memo[id(self)] = self.__class__.__new__(self.__class__)
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    @property
    def block_size(self) -> int:
        return self.spec.block_size

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the drafter's own weights (what exports write)."""
        return next(self.parameters()).dtype

    def embed(self, tokens: Tensor) -> Tensor:
        return F.embedding(tokens, self.embed_weight)

    # ---- draft vocabulary -----------------------------------------------------------------------------
    def set_draft_vocab(self, target_ids: Tensor) -> None:
        """Keep `target_ids` (the most frequent response tokens) as the draft vocabulary, sorted by target id."""
        ids = torch.as_tensor(target_ids, dtype=torch.long, device=self.d2t.device).unique()  # sorted
        if len(ids) and not 0 <= int(ids[0]) <= int(ids[-1]) < self.spec.vocab_size:
            raise DrafterError(f"draft vocabulary has target ids outside [0, {self.spec.vocab_size})")
        if len(ids) != self.spec.draft_vocab_size:
            raise DrafterError(f"draft vocabulary needs {self.spec.draft_vocab_size} distinct target ids, got {len(ids)}")
        self.d2t.copy_(ids - torch.arange(len(ids), device=ids.device))
        self.t2d.zero_()[ids] = True
        self.refresh_head()

    def refresh_head(self) -> None:
        """The reduced head's rows, copied from the target's frozen head (not stored in the checkpoint)."""
        self.head_weight = self.lm_head_weight[self.draft_to_target(torch.arange(self.spec.draft_vocab_size, device=self.d2t.device))]

    def draft_to_target(self, draft_ids: Tensor) -> Tensor:
        return draft_ids if self.spec.draft_vocab_size is None else draft_ids + self.d2t[draft_ids]

    def target_to_draft(self, target_ids: Tensor) -> Tensor:
        """Draft id of each target id, -1 where the token is outside the draft vocabulary."""
        if self.spec.draft_vocab_size is None:
            return target_ids
        index = torch.cumsum(self.t2d.long(), 0) - 1
        return torch.where(self.t2d[target_ids], index[target_ids], -1)

    def head(self, hidden: Tensor) -> Tensor:
        """Float logits over the draft vocabulary of hidden states (the drafter's, or the target's own final ones).
        The rows are flattened first: `F.linear` on a sliced 3-d/4-d input (a block's slots 1..K) falls back to a
        batched matmul that copies the whole head weight on every call (8 ms of a 9 ms drafter round in bf16 here)."""
        weight = self.lm_head_weight if self.spec.draft_vocab_size is None else self.head_weight
        rows = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
        return F.linear(rows, weight).float().view(*hidden.shape[:-1], weight.shape[0])

    def restrict(self, target_logits: Tensor) -> Tensor:
        """Target-vocabulary logits (..., V) -> the draft vocabulary's (..., V_draft) (a softmax renormalises)."""
        if self.spec.draft_vocab_size is None:
            return target_logits
        return target_logits[..., self.draft_to_target(torch.arange(self.spec.draft_vocab_size, device=target_logits.device))]

    def to_target_vocab(self, logits: Tensor) -> Tensor:
        """Draft-vocabulary logits (..., V_draft) -> target-vocabulary ones (..., V), -inf outside the draft vocabulary."""
        if self.spec.draft_vocab_size is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.spec.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_to_target(torch.arange(logits.shape[-1], device=logits.device)), logits)

    def target_ids(self) -> Tensor | None:
        """Target id of every draft-vocabulary row (V_draft,), None for a full-vocabulary head."""
        if self.spec.draft_vocab_size is None:
            return None
        return self.draft_to_target(torch.arange(self.spec.draft_vocab_size, device=self.d2t.device))

    # ---- the seam -------------------------------------------------------------------------------------
    def project_context(self, features: Tensor, positions: Tensor, valid: Tensor, next_tokens: Tensor | None = None) -> DraftContext:
        raise NotImplementedError

    def hidden(self, ctx: DraftContext, anchor_tokens: Tensor, anchor_positions: Tensor, block_tokens: Tensor | None = None) -> Tensor:
        """The K slots' final hidden states (b, n, K, H) after each anchor (b, n), what the head reads: trainers apply the
        head chunk by chunk (`train/chunked.py`) instead of holding every slot's logits."""
        raise NotImplementedError

    def forward(self, ctx: DraftContext, anchor_tokens: Tensor, anchor_positions: Tensor, block_tokens: Tensor | None = None) -> Tensor:
        """Draft-vocabulary logits (b, n, K, V_draft) of the K slots after each anchor."""
        return self.head(self.hidden(ctx, anchor_tokens, anchor_positions, block_tokens))

    def draft_logits(
        self, ctx: DraftContext, anchor_tokens: Tensor, anchor_positions: Tensor, block_tokens: Tensor | None = None
    ) -> Tensor:
        """`forward` over the target's whole vocabulary (b, n_blocks, K, V)."""
        return self.to_target_vocab(self(ctx, anchor_tokens, anchor_positions, block_tokens))

    def draft(
        self,
        ctx: DraftContext,
        anchor: Tensor,
        anchor_pos: Tensor,
        pick: Callable[[Tensor], Tensor],
        num_drafts: int | None = None,
        confidence: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """One block per row: anchor/anchor_pos (b,) -> drafted tokens (b, n) and the target-vocabulary logits (b, n, V)
        each was picked from, n = `num_drafts` or K. A parallel drafter (DFlash) fills every slot in one forward (the
        whole block, as trained: its slots see each other) and keeps the first n. A sequential one (EAGLE-3) may stop
        early once no row would propose a further slot under `confidence` (`DecodeConfig.draft_confidence`)."""
        logits = self.draft_logits(ctx, anchor[:, None], anchor_pos[:, None])[:, 0, :num_drafts]
        return pick(logits), logits


def check_compatible(spec: DrafterSpec, target: Target) -> None:
    """Refuse a drafter built for another target (hidden size, vocabulary, layer count)."""
    want = {"hidden_size": target.hidden_size, "vocab_size": target.vocab_size, "num_target_layers": target.num_layers}
    got = {k: getattr(spec, k) for k in want}
    if got != want:
        diff = ", ".join(f"{k} {got[k]} vs target {want[k]}" for k in want if got[k] != want[k])
        raise DrafterError(f"drafter does not match target '{target.name}': {diff}")


def drafter_for(spec: DrafterSpec, target: Target) -> Drafter:
    """A drafter of `spec` on `target`'s frozen embedding and head (refused if built for another target)."""
    check_compatible(spec, target)
    return family(spec.arch).drafter(
        spec, target.model.get_input_embeddings().weight, target.model.get_output_embeddings().weight, target.name
    )


def widen_vocab(drafter: Drafter) -> Drafter:
    """The same drafter drafting over the target's whole vocabulary (a full-vocabulary drafter is returned as is).

    A reduced head's rows are the target's own frozen head rows (`refresh_head`: nothing of the head is trained or
    saved), so widening changes no weight: every slot keeps its logits at the kept tokens and gains the other tokens'
    logits from the same head. Its argmax changes only where a dropped token scores highest (on the committed
    drafter's 90 held-out greedy texts no accepted length changes: docs/interop.md). For formats that always apply the target's whole head
    (the reference DFlash, llama.cpp's DFlash); decoding with either drafter stays lossless."""
    if drafter.spec.draft_vocab_size is None:
        return drafter
    wide = type(drafter)(replace(drafter.spec, draft_vocab_size=None), drafter.embed_weight, drafter.lm_head_weight, drafter.target_name)
    wide.load_state_dict({k: v for k, v in drafter.state_dict().items() if k not in ("d2t", "t2d")})
    param = next(drafter.parameters())
    return wide.to(dtype=param.dtype).requires_grad_(param.requires_grad).train(drafter.training)


def default_mask_token(target: Target) -> int:
    """A target embedding row for DFlash's MASK, as the reference format wants: the first row past the tokenizer when
    the table has spare rows (Qwen3), else the last added special token that is not a stop, pad or BOS token
    (SmolLM2: 16 `<empty_output>`)."""
    tokenizer = target.tokenizer
    if tokenizer is None or len(tokenizer) < target.vocab_size:
        return len(tokenizer) if tokenizer is not None else target.vocab_size - 2  # tiny test targets: EOS is the last row
    taken = set(target.eos_ids) | {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    taken |= set(tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    special = sorted(i for i in tokenizer.added_tokens_decoder if i not in taken)
    if not special:
        raise DrafterError(f"target '{target.name}' has no spare token row for MASK: pass --draft-mask-token-id or --draft-learned-mask")
    return special[-1]


def new_drafter(target: Target, cfg: DrafterConfig = DrafterConfig(), seed: int = 0) -> Drafter:
    """A fresh drafter. Its final norm starts at `cfg.final_norm_init`: at 1.0 a block's MASK and anchor embeddings
    reach the target's (tied) head almost unchanged and come out as a very confident copy of themselves (SFT loss 35-44
    at step 1 on SmolLM2, for a uniform guess's 9); at 0.1 the first logits are near uniform and the loss falls faster
    (docs/results/strong-drafters.md). `cfg.copy_target_layers` starts the layers as copies of target layers (DFlash)."""
    torch.manual_seed(seed)
    drafter = drafter_for(DrafterSpec.resolve(cfg, target), target)
    with torch.no_grad():
        drafter.norm.weight.fill_(cfg.final_norm_init)
    if cfg.copy_target_layers is not None:
        copy_layers = family(drafter.spec.arch).copy_layers
        if copy_layers is None:
            raise DrafterError(
                f"copy_target_layers applies to {titles(lambda f: f.copy_layers is not None)} drafters, not {drafter.spec.arch}"
            )
        copy_layers(drafter, target.model.model.layers, cfg.copy_target_layers)
    return drafter


def save_drafter(drafter: Drafter, folder: str | Path, extra: dict | None = None) -> None:
    """config.json (spec + `extra`) and model.safetensors (drafter weights only, no target embedding/head)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "architecture": family(drafter.spec.arch).architecture,
        "draftopd_spec": asdict(drafter.spec),
        "target": drafter.target_name,
        **(extra or {}),
    }
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}, str(tmp))
    tmp.replace(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def load_drafter(folder: str | Path, target: Target, arch: str | None = None) -> Drafter:
    """The drafter saved at `folder`, on `target`. `arch` (a family name: "dflash" / "eagle3"), when given, must be what
    the checkpoint holds."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        raw = config["draftopd_spec"]
        spec = DrafterSpec(**{**raw, "target_layer_ids": tuple(raw["target_layer_ids"])})
        fam = families().get(spec.arch) if isinstance(spec.arch, str) else None
        if fam is None or config.get("architecture", fam.architecture) != fam.architecture:
            raise ValueError(f"architecture {config.get('architecture')!r} with arch {spec.arch!r}")
        weights = load_file(str(folder / "model.safetensors"))
    except FileNotFoundError as err:
        raise DrafterError(f"no drafter checkpoint at {folder}: missing {Path(err.filename or 'model.safetensors').name}") from None
    except Exception as err:  # json, key, type and safetensors header errors all mean a corrupt checkpoint
        raise DrafterError(f"corrupt drafter checkpoint at {folder}: {type(err).__name__}: {err}") from None
    spec.check(lambda name: f"drafter checkpoint at {folder}: config.json draftopd_spec.{name}")  # as strict as flags
    if arch is not None and arch != spec.arch:
        asked = families().get(arch)
        raise DrafterError(
            f"{folder} holds {family(spec.arch).named} drafter, not {asked.named if asked else arch} one "
            f"(drop --draft-arch or pass --draft-arch {spec.arch})"
        )
    drafter = drafter_for(spec, target)
    try:
        missing, unexpected = drafter.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise DrafterError(f"drafter checkpoint at {folder} has weights of the wrong shape: {str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise DrafterError(f"drafter checkpoint at {folder} has wrong weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return drafter
