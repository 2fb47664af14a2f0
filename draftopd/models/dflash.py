"""DFlash drafter `q`: a block-diffusion drafter conditioned on the target's hidden states.

Algorithmic choices (see shared/docs/drafters.md):
- Context: target hidden states of `target_layer_ids` (output-id convention), concatenated, then
  `fc: Linear(len(layers)*H -> H, no bias)` and RMSNorm `hidden_norm`. The context is not updated layer to
  layer: every layer projects it with its own k/v projections ("KV injection") and places those keys and
  values before the block's own.
- Block: `[anchor, MASK x (B-1)]` at logical positions `a .. a+B-1`; one non-causal forward fills all
  slots; slot k (1..B-1) predicts the token at position a+k. MASK is the target's embedding row
  `mask_token_id` (the reference DFlash format, exportable exactly) or, when that is None, a learned vector.
- Head: the target's own (frozen), or a reduced draft vocabulary as EAGLE-3 stores it: the `draft_vocab_size`
  most frequent target tokens of the training answers, `d2t` (draft id -> target id offset) and `t2d` (mask
  over the target vocabulary) saved with the weights, the head rows copied from the target's head at load
  time. `forward` returns draft-vocabulary logits (training); `draft_logits` spreads them over the target
  vocabulary with -inf elsewhere, so decoding, acceptance and replay work in target ids and stay lossless.
- Visibility: a block sees context slots whose logical position is strictly before its anchor, and its own
  block bidirectionally, never another block. Training (many blocks per sequence) and inference (one block
  per row) use the same `draft_logits` call, so they are the same computation by construction.
- Embedding and LM head are the target's own, frozen, and never stored in the drafter checkpoint: the drafter holds
  references to the target's two weight tensors (non-persistent buffers sharing their storage, no copy), not the
  `Target`, so trainers and the decoder take `(target, drafter)` and the drafter is a self-contained module.
- Layers are Qwen3-style: RMSNorm, attention with per-head q_norm/k_norm and RoPE, SwiGLU MLP.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import DrafterConfig, dflash_default_layers
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
    block_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float
    rms_norm_eps: float
    mask_token_id: int | None = None  # MASK = this target embedding row (reference format); None = a learned vector
    draft_vocab_size: int | None = None  # reduced head over this many target tokens (d2t/t2d); None = the full vocabulary

    @staticmethod
    def resolve(cfg: DrafterConfig, target: Target) -> "DrafterSpec":
        tcfg = target.model.config
        heads = cfg.num_heads or tcfg.num_attention_heads
        layer_ids = cfg.target_layer_ids or dflash_default_layers(target.num_layers, cfg.num_layers)
        mask_id, vocab = cfg.mask_token_id, cfg.vocab_size
        if mask_id is not None and not 0 <= mask_id < target.vocab_size:
            raise DrafterError(f"mask_token_id {mask_id} outside the target's vocabulary of {target.vocab_size}")
        if vocab is not None and not 1 <= vocab <= target.vocab_size:
            raise DrafterError(f"--draft-vocab-size {vocab} must be in [1, {target.vocab_size}] (the target's vocabulary)")
        if max(layer_ids) >= target.num_layers or min(layer_ids) < 0:
            raise DrafterError(f"target_layer_ids {layer_ids} outside the target's {target.num_layers} layers")
        return DrafterSpec(
            hidden_size=target.hidden_size, vocab_size=target.vocab_size, num_target_layers=target.num_layers,
            target_layer_ids=tuple(layer_ids), num_layers=cfg.num_layers, block_size=cfg.block_size, num_heads=heads,
            num_kv_heads=cfg.num_kv_heads or getattr(tcfg, "num_key_value_heads", heads),
            head_dim=cfg.head_dim or getattr(tcfg, "head_dim", None) or target.hidden_size // heads,
            intermediate_size=cfg.intermediate_size or tcfg.intermediate_size,
            rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, mask_token_id=mask_id, draft_vocab_size=vocab)


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
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return (x.float() * cos + torch.cat([-x2, x1], -1).float() * sin).to(x.dtype)


@dataclass
class DraftContext:
    """Projected target context, one (keys, values) per drafter layer: (b, kv_heads, slots, head_dim) each,
    RoPE already applied at the slots' logical `positions` (b, slots); `valid` (b, slots) marks real tokens."""

    keys: list[Tensor]
    values: list[Tensor]
    positions: Tensor
    valid: Tensor

    def extend(self, other: "DraftContext") -> "DraftContext":
        cat = lambda a, b: torch.cat([a, b], dim=-2)  # noqa: E731
        return DraftContext([cat(a, b) for a, b in zip(self.keys, other.keys)], [cat(a, b) for a, b in zip(self.values, other.values)],
                            torch.cat([self.positions, other.positions], 1), torch.cat([self.valid, other.valid], 1))

    def select(self, index: Tensor) -> "DraftContext":
        """Keep only the batch rows `index` (no-op when all rows stay)."""
        if len(index) == self.valid.shape[0]:
            return self
        return DraftContext([k[index] for k in self.keys], [v[index] for v in self.values], self.positions[index], self.valid[index])

    def sync(self, valid: Tensor) -> "DraftContext":
        """Follow the target cache after a commit: same slots, same holes."""
        n = valid.shape[1]
        return DraftContext([k[..., :n, :] for k in self.keys], [v[..., :n, :] for v in self.values], self.positions[:, :n], valid.clone())


class DraftLayer(nn.Module):
    def __init__(self, s: DrafterSpec):
        super().__init__()
        self.s = s
        h, q_dim, kv_dim = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.input_layernorm = RMSNorm(h, s.rms_norm_eps)
        self.q_proj, self.k_proj = nn.Linear(h, q_dim, bias=False), nn.Linear(h, kv_dim, bias=False)
        self.v_proj, self.o_proj = nn.Linear(h, kv_dim, bias=False), nn.Linear(q_dim, h, bias=False)
        self.q_norm, self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps), RMSNorm(s.head_dim, s.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, s.rms_norm_eps)
        self.gate_proj = nn.Linear(h, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, h, bias=False)

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        return x.view(*x.shape[:2], heads, self.s.head_dim).transpose(1, 2)

    def keys_values(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        k = rope(self.k_norm(self._heads(self.k_proj(x), self.s.num_kv_heads)), positions, self.s.rope_theta)
        return k, self._heads(self.v_proj(x), self.s.num_kv_heads)

    def forward(self, h: Tensor, ctx_k: Tensor, ctx_v: Tensor, mask: Tensor, positions: Tensor) -> Tensor:
        x = self.input_layernorm(h)
        q = rope(self.q_norm(self._heads(self.q_proj(x), self.s.num_heads)), positions, self.s.rope_theta)
        k, v = self.keys_values(x, positions)
        k, v = torch.cat([ctx_k, k], dim=2), torch.cat([ctx_v, v], dim=2)
        groups = self.s.num_heads // self.s.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + self.o_proj(attn.transpose(1, 2).reshape(*h.shape[:2], -1))
        x = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDrafter(nn.Module):
    """The drafter. `embed_weight` (V_in, H) and `lm_head_weight` (V, H) are the target's frozen input embedding and
    output head weights, held as non-persistent buffers that share the target's storage: never saved, never trained.
    `.to(dtype)` gives the drafter converted copies and `.to(device)` moved ones; the target's own stay as they are.
    Use `new_drafter` / `load_drafter`, which take them from a `Target`."""

    def __init__(self, spec: DrafterSpec, embed_weight: Tensor, lm_head_weight: Tensor, target_name: str = "custom"):
        super().__init__()
        self.spec = spec
        self.target_name = target_name
        self.register_buffer("embed_weight", embed_weight.detach(), persistent=False)
        self.register_buffer("lm_head_weight", lm_head_weight.detach(), persistent=False)
        h = spec.hidden_size
        self.fc = nn.Linear(len(spec.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, spec.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(h, spec.rms_norm_eps)
        if spec.mask_token_id is None:
            self.mask_embedding = nn.Parameter(self.embed_weight.float().mean(0).clone())
        if spec.draft_vocab_size is not None:  # reduced head: draft id i is target id i + d2t[i]; t2d marks kept target ids
            self.register_buffer("d2t", torch.zeros(spec.draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.zeros(spec.vocab_size, dtype=torch.bool))
            self.register_buffer("head_weight", torch.empty(0), persistent=False)
            self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_head())
        self.to(device=lm_head_weight.device)

    def __deepcopy__(self, memo: dict) -> "DFlashDrafter":
        """A copy that shares the target's frozen weights instead of copying them."""
        memo.update({id(self.embed_weight): self.embed_weight, id(self.lm_head_weight): self.lm_head_weight})
        new = memo[id(self)] = self.__class__.__new__(self.__class__)
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    @property
    def block_size(self) -> int:
        return self.spec.block_size

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

    # ---- the forward ----------------------------------------------------------------------------------
    def project_context(self, features: Tensor, positions: Tensor, valid: Tensor) -> DraftContext:
        """Target features (b, n, len(layers)*H) at logical `positions` -> per-layer context keys/values."""
        x = self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))
        kvs = [layer.keys_values(x, positions) for layer in self.layers]
        return DraftContext([k for k, _ in kvs], [v for _, v in kvs], positions, valid)

    def forward(self, ctx: DraftContext, anchor_tokens: Tensor, anchor_positions: Tensor) -> Tensor:
        """Fill one block per anchor. anchor_tokens/positions: (b, n_blocks) -> logits (b, n_blocks, B-1, V_draft)
        over the draft vocabulary, where [..., k-1, :] is slot k's distribution over the token at anchor position + k."""
        b, n_blocks = anchor_tokens.shape
        size = self.spec.block_size
        slot = torch.arange(size, device=anchor_tokens.device)
        h = self.mask_vector().to(self.fc.weight.dtype).expand(b, n_blocks, size, -1).clone()
        h[:, :, 0] = F.embedding(anchor_tokens, self.embed_weight).to(h.dtype)
        positions = (anchor_positions[..., None] + slot).reshape(b, n_blocks * size)
        mask = self.block_mask(ctx, anchor_positions)
        h = h.reshape(b, n_blocks * size, -1)
        for layer, k, v in zip(self.layers, ctx.keys, ctx.values):
            h = layer(h, k, v, mask, positions)
        return self.head(self.norm(h).view(b, n_blocks, size, -1)[:, :, 1:])

    def head(self, hidden: Tensor) -> Tensor:
        """Float logits over the draft vocabulary of hidden states (the drafter's, or the target's own final ones)."""
        if self.spec.draft_vocab_size is None:
            return F.linear(hidden.to(self.lm_head_weight.dtype), self.lm_head_weight).float()
        return F.linear(hidden.to(self.head_weight.dtype), self.head_weight).float()

    def restrict(self, target_logits: Tensor) -> Tensor:
        """Target-vocabulary logits (..., V) -> the draft vocabulary's (..., V_draft) (a softmax renormalises)."""
        if self.spec.draft_vocab_size is None:
            return target_logits
        return target_logits[..., self.draft_to_target(torch.arange(self.spec.draft_vocab_size, device=target_logits.device))]

    def draft_logits(self, ctx: DraftContext, anchor_tokens: Tensor, anchor_positions: Tensor) -> Tensor:
        """`forward` over the target's whole vocabulary (b, n_blocks, B-1, V): tokens outside a reduced draft
        vocabulary get -inf, so sampling, acceptance and replay work in target ids whatever the head."""
        logits = self(ctx, anchor_tokens, anchor_positions)
        if self.spec.draft_vocab_size is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.spec.vocab_size), float("-inf"))
        return full.index_copy_(-1, self.draft_to_target(torch.arange(logits.shape[-1], device=logits.device)), logits)

    def mask_vector(self) -> Tensor:
        if self.spec.mask_token_id is None:
            return self.mask_embedding
        return F.embedding(torch.tensor(self.spec.mask_token_id, device=self.embed_weight.device), self.embed_weight)

    def block_mask(self, ctx: DraftContext, anchor_positions: Tensor) -> Tensor:
        """(b, 1, n_blocks*B, slots + n_blocks*B) bool: context strictly before the anchor; own block only."""
        b, n_blocks = anchor_positions.shape
        size = self.spec.block_size
        sees_ctx = ctx.valid[:, None, :] & (ctx.positions[:, None, :] < anchor_positions[..., None])  # (b, nb, slots)
        sees_ctx = sees_ctx.repeat_interleave(size, dim=1)
        block_id = torch.arange(n_blocks, device=anchor_positions.device).repeat_interleave(size)
        own = (block_id[:, None] == block_id[None, :]).expand(b, -1, -1)
        return torch.cat([sees_ctx, own], dim=2)[:, None]


def check_compatible(spec: DrafterSpec, target: Target) -> None:
    """Refuse a drafter built for another target (hidden size, vocabulary, layer count)."""
    want = {"hidden_size": target.hidden_size, "vocab_size": target.vocab_size, "num_target_layers": target.num_layers}
    got = {k: getattr(spec, k) for k in want}
    if got != want:
        diff = ", ".join(f"{k} {got[k]} vs target {want[k]}" for k in want if got[k] != want[k])
        raise DrafterError(f"drafter does not match target '{target.name}': {diff}")


def drafter_for(spec: DrafterSpec, target: Target) -> DFlashDrafter:
    """A drafter of `spec` on `target`'s frozen embedding and head (refused if built for another target)."""
    check_compatible(spec, target)
    return DFlashDrafter(spec, target.model.get_input_embeddings().weight, target.model.get_output_embeddings().weight, target.name)


def default_mask_token(target: Target) -> int:
    """A target embedding row for MASK, as the reference format wants: the first row past the tokenizer when the
    table has spare rows (Qwen3), else the last added special token that is not a stop, pad or BOS token
    (SmolLM2: 16 `<empty_output>`)."""
    tokenizer = target.tokenizer
    if tokenizer is None or len(tokenizer) < target.vocab_size:
        return len(tokenizer) if tokenizer is not None else target.vocab_size - 2  # tiny test targets: EOS is the last row
    taken = set(target.eos_ids) | {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    taken |= set(tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]))
    special = sorted(i for i in tokenizer.added_tokens_decoder if i not in taken)
    if not special:
        raise DrafterError(f"target '{target.name}' has no spare token row for MASK: pass --draft-mask-token-id")
    return special[-1]


def new_drafter(target: Target, cfg: DrafterConfig = DrafterConfig(), seed: int = 0) -> DFlashDrafter:
    """A fresh drafter. Its final norm starts at `cfg.final_norm_init`: at 1.0 a block's MASK and anchor embeddings
    reach the target's (tied) head almost unchanged and come out as a very confident copy of themselves (SFT loss 35-44
    at step 1 on SmolLM2, for a uniform guess's 9); at 0.1 the first logits are near uniform and the loss falls faster
    (README, "Strong drafters")."""
    torch.manual_seed(seed)
    drafter = drafter_for(DrafterSpec.resolve(cfg, target), target)
    with torch.no_grad():
        drafter.norm.weight.fill_(cfg.final_norm_init)
    return drafter


def save_drafter(drafter: DFlashDrafter, folder: str | Path, extra: dict | None = None) -> None:
    """config.json (spec + `extra`) and model.safetensors (drafter weights only, no target embedding/head)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architecture": "DFlashDrafter", "draftopd_spec": asdict(drafter.spec), "target": drafter.target_name, **(extra or {})}
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous().cpu() for k, v in drafter.state_dict().items()}, str(tmp))
    tmp.replace(folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def load_drafter(folder: str | Path, target: Target) -> DFlashDrafter:
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        spec = DrafterSpec(**{**config["draftopd_spec"], "target_layer_ids": tuple(config["draftopd_spec"]["target_layer_ids"])})
        weights = load_file(str(folder / "model.safetensors"))
    except FileNotFoundError as err:
        raise DrafterError(f"no drafter checkpoint at {folder}: missing {Path(err.filename or 'model.safetensors').name}") from None
    except Exception as err:  # json, key, type and safetensors header errors all mean a corrupt checkpoint
        raise DrafterError(f"corrupt drafter checkpoint at {folder}: {type(err).__name__}: {err}") from None
    drafter = drafter_for(spec, target)
    try:
        missing, unexpected = drafter.load_state_dict(weights, strict=False)
    except RuntimeError as err:
        raise DrafterError(f"drafter checkpoint at {folder} has weights of the wrong shape: {str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise DrafterError(f"drafter checkpoint at {folder} has wrong weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return drafter
