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
- Embedding and LM head are the target's own, frozen, and never stored in the drafter checkpoint (`drafter.py`).
- Layers are Qwen3-style: RMSNorm, attention with per-head q_norm/k_norm and RoPE, SwiGLU MLP. They start random,
  or (`DrafterConfig.copy_target_layers`) as copies of chosen target decoder layers: `copy_target_layers` below.
- The family (`FAMILY`, `registry.py`): default target layers `default_layers`, a MASK, any depth; exported exactly
  to z-lab's reference format, speculators' (a Qwen3 layer config, `block_size`, `mask_token_id`) and, through
  the reference format, llama.cpp's GGUF (whose DFlash converter reads no reduced vocabulary).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .drafter import DraftContext, Drafter, DrafterError, DrafterSpec, RMSNorm, rope
from .registry import GGUF, Family, Speculators


def default_layers(num_target_layers: int, num_draft_layers: int) -> tuple[int, ...]:
    """DFlash rule for which target layers feed the drafter (output-id convention).

    One drafter layer -> the middle target layer; else `round(1 + i*(N-4)/(L-1))` for i in 0..L-1
    (N=36, L=5 gives 1, 9, 17, 25, 33).
    """
    n, layers = num_target_layers, num_draft_layers
    if layers == 1:
        return (n // 2,)
    return tuple(int(round(1 + i * (n - 4) / (layers - 1))) for i in range(layers))


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
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.s.num_heads != self.s.num_kv_heads)
        h = h + self.o_proj(attn.transpose(1, 2).reshape(*h.shape[:2], -1))
        x = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DFlashDrafter(Drafter):
    """The DFlash drafter (frozen target pieces, draft vocabulary and save/load: `drafter.Drafter`)."""

    def __init__(self, spec: DrafterSpec, embed_weight: Tensor, lm_head_weight: Tensor, target_name: str = "custom"):
        super().__init__(spec, embed_weight, lm_head_weight, target_name)
        h = spec.hidden_size
        self.fc = nn.Linear(len(spec.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, spec.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(h, spec.rms_norm_eps)
        if spec.mask_token_id is None:
            self.mask_embedding = nn.Parameter(self.embed_weight.float().mean(0).clone())
        self._finish()

    # ---- the forward ----------------------------------------------------------------------------------
    def project_context(self, features: Tensor, positions: Tensor, valid: Tensor, next_tokens: Tensor | None = None) -> DraftContext:
        """Target features (b, n, len(layers)*H) at logical `positions` -> per-layer context keys/values (`next_tokens` unused)."""
        x = self.hidden_norm(self.fc(features.to(self.fc.weight.dtype)))
        kvs = [layer.keys_values(x, positions) for layer in self.layers]
        return DraftContext([k for k, _ in kvs], [v for _, v in kvs], positions, valid)

    def hidden(self, ctx: DraftContext, anchor_tokens: Tensor, anchor_positions: Tensor, block_tokens: Tensor | None = None) -> Tensor:
        """Fill one block per anchor. anchor_tokens/positions: (b, n_blocks) -> final hidden states (b, n_blocks, B-1, H),
        where [..., k-1, :] is slot k's (the head gives its distribution over the token at anchor position + k).
        Every slot sees only MASK before it, so `block_tokens` are not used."""
        b, n_blocks = anchor_tokens.shape
        size = self.spec.block_size
        slot = torch.arange(size, device=anchor_tokens.device)
        h = self.mask_vector().to(self.fc.weight.dtype).expand(b, n_blocks, size, -1).clone()
        h[:, :, 0] = self.embed(anchor_tokens).to(h.dtype)
        positions = (anchor_positions[..., None] + slot).reshape(b, n_blocks * size)
        mask = attention_bias(self.block_mask(ctx, anchor_positions), h)
        h = h.reshape(b, n_blocks * size, -1)
        for layer, k, v in zip(self.layers, ctx.keys, ctx.values):
            if self.checkpoint_layers and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, k, v, mask, positions, use_reentrant=False)
            else:
                h = layer(h, k, v, mask, positions)
        return self.norm(h).view(b, n_blocks, size, -1)[:, :, 1:]

    def mask_vector(self) -> Tensor:
        if self.spec.mask_token_id is None:
            return self.mask_embedding
        return self.embed_weight[self.spec.mask_token_id]

    def block_mask(self, ctx: DraftContext, anchor_positions: Tensor) -> Tensor:
        """(b, 1, n_blocks*B, slots + n_blocks*B) bool: context strictly before the anchor; own block only."""
        b, n_blocks = anchor_positions.shape
        size = self.spec.block_size
        sees_ctx = ctx.valid[:, None, :] & (ctx.positions[:, None, :] < anchor_positions[..., None])  # (b, nb, slots)
        sees_ctx = sees_ctx.repeat_interleave(size, dim=1)
        block_id = torch.arange(n_blocks, device=anchor_positions.device).repeat_interleave(size)
        own = (block_id[:, None] == block_id[None, :]).expand(b, -1, -1)
        return torch.cat([sees_ctx, own], dim=2)[:, None]


def attention_bias(mask: Tensor, like: Tensor) -> Tensor:
    """A boolean attention mask (True = attend) as the additive bias attention adds to its scores (0 or -inf), made
    once for every layer (each would otherwise convert the mask itself), in the dtype attention runs in: autocast's
    where it is on, else `like`'s."""
    device = like.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else like.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


# the target decoder layer's parameter (HF Llama / Qwen / Mistral naming) behind each drafter layer parameter
_TARGET_PARAMETER = {
    "input_layernorm": "input_layernorm",
    "post_attention_layernorm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}


def copy_target_layers(drafter: DFlashDrafter, decoder_layers: nn.ModuleList, layer_ids: tuple[int, ...]) -> None:
    """Start drafter layer i as a copy of target decoder layer `layer_ids[i]`: norms, q/k/v/o and the SwiGLU MLP.
    The drafter's q_norm/k_norm (which the target may lack) stay at 1 and target biases are not copied, so a copied
    layer is a starting point, not the target's function; the context projection (`fc`) stays random."""
    if len(layer_ids) != len(drafter.layers):
        raise DrafterError(f"copy_target_layers names {len(layer_ids)} target layers for {len(drafter.layers)} drafter layers")
    with torch.no_grad():
        for layer, i in zip(drafter.layers, layer_ids):
            if not 0 <= i < len(decoder_layers):
                raise DrafterError(f"copy_target_layers: target layer {i} outside the target's {len(decoder_layers)} layers")
            source = dict(decoder_layers[i].named_parameters())
            for mine, theirs in _TARGET_PARAMETER.items():
                param, weight = getattr(layer, mine).weight, source.get(theirs + ".weight")
                if weight is None or weight.shape != param.shape:
                    found = "missing" if weight is None else f"shaped {tuple(weight.shape)}"
                    raise DrafterError(
                        f"copy_target_layers: target layer {i} has no {theirs}.weight of shape {tuple(param.shape)} ({found})"
                    )
                param.copy_(weight.to(param.dtype))


# ---- the family ---------------------------------------------------------------------------------------------------
SPECULATORS_SWITCHES = ("sample_from_anchor", "sliding_window_non_causal")  # speculators' default: false
SPECULATORS_BLOCK_SIZE = 8  # DFlashSpeculatorConfig's default block_size


def _speculators_options(config: dict, layer: dict) -> dict:
    sliding = sorted({t for t in layer.get("layer_types") or [] if t != "full_attention"}) or None
    return {
        "use_sliding_window": (layer.get("use_sliding_window", False), False),
        "layer_types": (sliding, None),
        **{k: (config.get(k, False), False) for k in SPECULATORS_SWITCHES},
    }


SPECULATORS = Speculators(
    model_type="dflash",
    config_class="DFlashSpeculator",
    model_class="DFlashDraftModel",
    layer_type="qwen3",
    layer_keys=lambda spec: {"use_sliding_window": False, "sliding_window": None, "layer_types": ["full_attention"] * spec.num_layers},
    config_keys=lambda spec, captures: {
        "block_size": spec.block_size,
        "aux_hidden_state_layer_ids": captures,
        "mask_token_id": spec.mask_token_id,
        "sample_from_anchor": False,
        "sliding_window_non_causal": False,
    },
    layer_ids_key="aux_hidden_state_layer_ids",
    options=_speculators_options,
    check_anchors=lambda length, block: length - block,
    block_size=lambda config: int(config.get("block_size", SPECULATORS_BLOCK_SIZE)),
)

FAMILY = Family(
    name="dflash",
    title="DFlash",
    article="a",
    drafter=DFlashDrafter,
    architecture="DFlashDrafter",
    default_layers=default_layers,
    has_mask=True,
    copy_layers=copy_target_layers,
    speculators=SPECULATORS,
    reference_dflash=True,
    gguf=GGUF(spec_type="draft-dflash", via="dflash", reads_d2t=False),
)
