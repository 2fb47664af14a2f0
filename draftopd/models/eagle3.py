"""EAGLE-3 drafter `q`: one decoder layer over the token embedding and fused target features, drafting a chain.

Algorithmic choices (EAGLE-3 and its public implementations; names follow the speculators layout):
- Fused features: the target hidden states of three layers (default: the inputs of layers 2, L/2 and L-3, i.e.
  the outputs of layers 1, L/2-1, L-4), concatenated, then `fc: Linear(3H -> H, no bias)`.
- A row at position s has the input `[input_layernorm(embed(x_{s+1})), hidden_norm(h_s)]` (2H), where h_s is the
  fused target feature of position s (a context row) or the drafter's own output of the previous chain step (a
  draft row). q/k/v project the 2H input, the residual stream is h_s, then a SwiGLU MLP; the output g_s goes
  through `norm` and the head and predicts x_{s+2}. Llama-style attention (no q/k norm), RoPE at position s.
- Context: every committed position whose next token is known is a row with target features; its keys/values
  are the drafter's KV cache (`DraftContext`, which also keeps the fused features). After a round the rows of
  the verified block get the drafts as next tokens, except the last accepted one, which gets the target's
  correction/bonus token (the decoder passes both).
- Drafting at anchor a (the last committed token, at position a): step 1 is the context row a-1 itself (feature
  of a-1, token x_a) and predicts slot 1 (position a+1); step k >= 2 is a new row at position a+k-2 whose inputs
  are the token of slot k-1 and the output g of step k-1, and predicts slot k. A chain of K = block_size - 1
  steps, no tree: a tree needs tree attention in the target's verify, while a chain keeps verification, the
  rollout traces and the acceptance rules identical to DFlash's, so the two architectures meet in one decoder.
- Visibility: a chain row sees the context rows at positions < a and its own chain's earlier rows, never another
  anchor's chain. Training-time test (TTT) runs every sampled anchor's K-step chain in one batched pass,
  teacher-forced on given tokens (the text in SFT, the rollout's own drafts in Draft-OPD replay) while each
  step's hidden input is the drafter's own output: for drafts equal to those tokens this is exactly the
  computation decoding does (tests check it), and slot k's loss weight decays with k as in DFlash SFT
  (exp(-(k-1)/4) at block 8, about EAGLE-3's 0.8^(k-1)).
- Head: the target's own, or a reduced draft vocabulary (d2t/t2d) with rows copied from it (`drafter.py`).
- The family (`FAMILY`, `registry.py`): default target layers `default_layers`, one decoder layer, no MASK; exported
  exactly to speculators' format (a Llama layer config, three target layers as vLLM's fc takes, the embedding and
  the head rows written out) and, through it, llama.cpp's GGUF; z-lab's reference format is DFlash's alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .drafter import DraftContext, Drafter, DrafterError, DrafterSpec, RMSNorm, rope
from .registry import GGUF, Family, Speculators

NEG = torch.finfo(torch.float32).min  # masked score: a row that sees nothing averages instead of giving NaN


def default_layers(num_target_layers: int, num_draft_layers: int = 1) -> tuple[int, ...]:
    """EAGLE-3 rule: the inputs of decoder layers 2, L/2 and L-3 (low, middle, high), i.e. in the output-id
    convention the outputs of layers 1, L/2 - 1 and L - 4 (SmolLM2, L = 30: 1, 14, 26), clipped to the target's
    layers (tiny test targets). One drafter layer, whatever `num_draft_layers`."""
    n = num_target_layers
    return tuple(min(max(i, 0), n - 1) for i in (1, n // 2 - 1, n - 4))


class Eagle3Layer(nn.Module):
    def __init__(self, s: DrafterSpec):
        super().__init__()
        self.s = s
        h, q_dim, kv_dim = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.input_layernorm, self.hidden_norm = RMSNorm(h, s.rms_norm_eps), RMSNorm(h, s.rms_norm_eps)
        self.q_proj, self.k_proj = nn.Linear(2 * h, q_dim, bias=False), nn.Linear(2 * h, kv_dim, bias=False)
        self.v_proj, self.o_proj = nn.Linear(2 * h, kv_dim, bias=False), nn.Linear(q_dim, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, s.rms_norm_eps)
        self.gate_proj = nn.Linear(h, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, h, bias=False)

    def inputs(self, embeds: Tensor, hidden: Tensor) -> Tensor:
        """A row's 2H input from its token embedding and its hidden input (both (..., H))."""
        return torch.cat([self.input_layernorm(embeds.to(hidden.dtype)), self.hidden_norm(hidden)], -1)

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        return x.view(*x.shape[:2], heads, self.s.head_dim).transpose(1, 2)  # (b, n, heads*d) -> (b, heads, n, d)

    def keys_values(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return rope(self._heads(self.k_proj(x), self.s.num_kv_heads), positions, self.s.rope_theta), self._heads(
            self.v_proj(x), self.s.num_kv_heads
        )

    def forward(
        self, x: Tensor, hidden: Tensor, positions: Tensor, ctx_k: Tensor, ctx_v: Tensor, sees: Tensor, chain: list[tuple[Tensor, Tensor]]
    ) -> Tensor:
        """Rows x (b, n, 2H) at positions (b, n) with residual `hidden` (b, n, H). Each row sees the context keys/values
        (b, kv_heads, S, d) where `sees` (b, n, S), and its own chain's rows `chain` [(k, v) (b, kv_heads, n, d)]."""
        groups, scale = self.s.num_heads // self.s.num_kv_heads, self.s.head_dim**-0.5
        q = rope(self._heads(self.q_proj(x), self.s.num_heads), positions, self.s.rope_theta)  # (b, h, n, d)
        rep = lambda t: t.repeat_interleave(groups, dim=1)  # noqa: E731
        scores = [(q @ rep(ctx_k).transpose(-1, -2)).float().mul(scale).masked_fill(~sees[:, None], NEG)]  # (b, h, n, S)
        scores += [(q * rep(k)).sum(-1, keepdim=True).float().mul(scale) for k, _ in chain]  # (b, h, n, 1) each
        weights = torch.softmax(torch.cat(scores, -1), -1).to(q.dtype)
        size = ctx_k.shape[2]
        attn = weights[..., :size] @ rep(ctx_v)
        for i, (_, v) in enumerate(chain):
            attn = attn + weights[..., size + i, None] * rep(v)
        h = hidden + self.o_proj(attn.transpose(1, 2).reshape(*hidden.shape[:2], -1))
        x = self.post_attention_layernorm(h)
        return h + self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3Drafter(Drafter):
    """The EAGLE-3 drafter (frozen target pieces, draft vocabulary and save/load: `drafter.Drafter`)."""

    def __init__(self, spec: DrafterSpec, embed_weight: Tensor, lm_head_weight: Tensor, target_name: str = "custom"):
        super().__init__(spec, embed_weight, lm_head_weight, target_name)
        if spec.num_layers != 1:
            raise DrafterError(f"an EAGLE-3 drafter has one decoder layer, not {spec.num_layers}")
        h = spec.hidden_size
        self.fc = nn.Linear(len(spec.target_layer_ids) * h, h, bias=False)
        self.layers = nn.ModuleList([Eagle3Layer(spec)])
        self.norm = RMSNorm(h, spec.rms_norm_eps)
        self._finish()

    def project_context(self, features: Tensor, positions: Tensor, valid: Tensor, next_tokens: Tensor | None = None) -> DraftContext:
        """Context rows: target features (b, n, 3H) at `positions`, each paired with `next_tokens` (b, n), the token after it."""
        if next_tokens is None:
            raise ValueError("an EAGLE-3 context row needs the token after its position (next_tokens)")
        fused = self.fc(features.to(self.fc.weight.dtype))
        layer = self.layers[0]
        k, v = layer.keys_values(layer.inputs(self.embed(next_tokens), fused), positions)
        return DraftContext([k], [v], positions, valid, fused)

    def chain(
        self,
        ctx: DraftContext,
        anchor_tokens: Tensor,
        anchor_positions: Tensor,
        next_token: Callable[[int, Tensor], Tensor | None],
        steps: int | None = None,
    ) -> list[Tensor]:
        """`steps` (default K) chain steps from each anchor (b, n); `next_token(k, logits_k)` gives the target-id token
        of slot k (b, n) that feeds step k+1, from the step's final hidden states (b, n, H). Returns those hidden
        states, one per step (the head gives each step's draft-vocabulary logits)."""
        layer, steps = self.layers[0], steps or self.block_size - 1
        base = anchor_positions - 1  # the context row (feature of a-1, token a) is step 1
        sees = ctx.valid[:, None, :] & (ctx.positions[:, None, :] < anchor_positions[..., None])  # (b, n, S)
        row = (sees & (ctx.positions[:, None, :] == base[..., None])).int().argmax(-1)  # (b, n) its slot
        hidden = ctx.fused.gather(1, row[..., None].expand(-1, -1, ctx.fused.shape[-1]))
        tokens, chain, out = anchor_tokens, [], []
        for k in range(1, steps + 1):
            positions = base + (k - 1)
            x = layer.inputs(self.embed(tokens), hidden)
            if k > 1:  # step 1's keys/values are already in the context
                chain.append(layer.keys_values(x, positions))
            hidden = layer(x, hidden, positions, ctx.keys[0], ctx.values[0], sees, chain)
            out.append(self.norm(hidden))
            tokens = next_token(k, out[-1])
            if tokens is None:  # the last step, or the caller stops the chain
                break
        return out

    def hidden(self, ctx: DraftContext, anchor_tokens: Tensor, anchor_positions: Tensor, block_tokens: Tensor | None = None) -> Tensor:
        """Final hidden states (b, n, K, H) of the chain at each anchor (b, n), teacher-forced on `block_tokens`
        (b, n, K-1) (target ids of slots 1..K-1), or on its own argmax when None."""
        steps = self.block_size - 1

        def next_token(k: int, hidden: Tensor) -> Tensor | None:
            if k == steps:
                return None
            return block_tokens[..., k - 1] if block_tokens is not None else self.draft_to_target(self.head(hidden).argmax(-1))

        return torch.stack(self.chain(ctx, anchor_tokens, anchor_positions, next_token), 2)

    def draft(
        self,
        ctx: DraftContext,
        anchor: Tensor,
        anchor_pos: Tensor,
        pick: Callable[[Tensor], Tensor],
        num_drafts: int | None = None,
        confidence: float = 0.0,
    ) -> tuple[Tensor, Tensor]:
        """Sequential drafting: slot k's token is picked from its logits before step k+1 runs (one row step each);
        `num_drafts` steps (default K), so fewer drafts also cost fewer drafter steps. With `confidence` > 0 the chain
        stops after the first step at which every row's product of top probabilities is below it: no row proposes
        that slot or any later one (`speculative.confident_drafts`), so they are not drafted."""
        tokens, logits = [], []
        reach = torch.ones(anchor.shape[0], device=anchor.device)

        def next_token(_k: int, hidden: Tensor) -> Tensor | None:
            nonlocal reach
            step_logits = self.head(hidden)
            full = self.to_target_vocab(step_logits[:, 0])
            tokens.append(pick(full))
            logits.append(full)
            reach = reach * torch.softmax(step_logits[:, 0].float(), -1).amax(-1)
            if confidence > 0 and bool((reach < confidence).all()):
                return None
            return tokens[-1][:, None]

        self.chain(ctx, anchor[:, None], anchor_pos[:, None], next_token, num_drafts)
        return torch.stack(tokens, 1), torch.stack(logits, 1)


# ---- the family ---------------------------------------------------------------------------------------------------
SPECULATORS_SWITCHES = ("norm_before_fc", "fc_norm", "norm_output")  # speculators' default: false
VLLM_LAYERS = 3  # vLLM's Eagle3 fc is Linear(3H -> H)


def _speculators_options(config: dict, layer: dict) -> dict:
    """A missing norm_before_residual reads as true, as vLLM reads it (speculators' own default is false: the folder is
    ambiguous). The layer must be a Llama one (speculators' default, Qwen3, adds q/k norms ours lacks)."""
    return {
        "model_type": (layer.get("model_type"), "llama"),
        "mlp_bias": (layer.get("mlp_bias", False), False),
        "norm_before_residual": (config.get("norm_before_residual", "missing"), False),
        **{k: (config.get(k, False), False) for k in SPECULATORS_SWITCHES},
    }


SPECULATORS = Speculators(
    model_type="eagle3",
    config_class="Eagle3Speculator",
    model_class="Eagle3DraftModel",
    layer_type="llama",
    layer_keys=lambda spec: {"mlp_bias": False},
    config_keys=lambda spec, captures: {
        "eagle_aux_hidden_state_layer_ids": captures,
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
    },
    layer_ids_key="eagle_aux_hidden_state_layer_ids",
    options=_speculators_options,
    check_anchors=lambda length, block: length - block + 3,  # teacher-forced chains of K = block - 1 steps from 1 .. T-K+1
    default_captures=lambda n: [2, n // 2, n - 3],
    num_features=VLLM_LAYERS,
    saves_embedding=True,
    saves_full_head=True,
)

FAMILY = Family(
    name="eagle3",
    title="EAGLE-3",
    article="an",
    drafter=Eagle3Drafter,
    architecture="Eagle3Drafter",
    default_layers=default_layers,
    num_layers=1,
    speculators=SPECULATORS,
    gguf=GGUF(spec_type="draft-eagle3", via="speculators", reads_d2t=True),
)
