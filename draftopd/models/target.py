"""The frozen target model `p`: any Hugging Face causal LM behind four calls.

- `prefill(prompts)`: left-padded batch of prompts into a fresh KV cache.
- `verify(state, block)`: append a block of tokens to every row's cache in one forward; returns the logits of
  every block position and the context features (hidden states of the chosen layers, concatenated).
- `commit(state, keep)`: keep the first `keep[b]` block tokens of row `b`; the rest become holes.
- `embed` / `lm_head`: the frozen input embedding and output head, shared with the drafter.

Ragged batches: rows of a batch accept different numbers of draft tokens. Instead of per-row caches the
cache keeps one physical length for all rows and a boolean `valid` map (batch, slots); rejected slots stay
in the cache as masked holes and are cropped when no row needs them. Every forward gets an explicit 4-D
attention mask built from `valid` and explicit per-row logical position ids, so the model computes
exactly what it would for each row alone.

Context features follow the output-id convention: id `i` is the output of decoder layer `i`, captured with
forward hooks on the decoder layers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache


class TargetError(ValueError):
    """A target that cannot be loaded or an input it cannot take (one clear line)."""


@dataclass
class TargetState:
    """A batch of sequences held in the target's KV cache.

    cache: the HF cache, `slots` physical positions per row.
    valid: (batch, slots) bool, True where the slot holds a committed token of that row.
    positions: (batch, slots) logical position (RoPE position) of each slot in its row.
    lengths: (batch,) logical length (number of valid slots) of each row.
    """

    cache: DynamicCache | None
    valid: Tensor
    positions: Tensor
    lengths: Tensor
    last_block: int = 0  # width of the last forward's input, what `commit` trims

    @property
    def slots(self) -> int:
        return self.valid.shape[1]


@dataclass
class TargetOutput:
    """logits: (batch, n, V) next-token logits at each input position; features: (batch, n, len(layers)*H)."""

    logits: Tensor
    features: Tensor | None


class Target:
    """Wraps a frozen HF causal LM. `name` is how it was loaded (for checkpoints and error messages)."""

    def __init__(self, model, tokenizer=None, name: str = "custom"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        cfg = model.config
        self.hidden_size: int = cfg.hidden_size
        self.vocab_size: int = model.get_output_embeddings().weight.shape[0]
        self.num_layers: int = cfg.num_hidden_layers
        self.max_positions: int = getattr(cfg, "max_position_embeddings", 1 << 30)
        self.eos_ids: set[int] = _eos_ids(model, tokenizer)
        self.pad_id: int = next(iter(self.eos_ids), 0)
        self.cache_kwarg: str = cache_kwarg(model)

    # ---- shared frozen pieces -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.get_output_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_output_embeddings().weight.dtype

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def lm_head(self, hidden: Tensor) -> Tensor:
        return self.model.get_output_embeddings()(hidden)

    # ---- the four calls ---------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], layers: tuple[int, ...] = ()) -> tuple[TargetState, TargetOutput]:
        """Left-pad `prompts` into a new cache. Output row b position j is prompt slot j (pads included)."""
        self.check_prompts(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long, device=self.device)
        valid = torch.zeros(len(prompts), width, dtype=torch.bool, device=self.device)
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(p, device=self.device)
            valid[b, width - len(p):] = True
        state = _empty_state(DynamicCache(config=self.model.config), valid)
        out = self._forward(state, ids, valid, layers)
        return state, out

    @torch.no_grad()
    def verify(self, state: TargetState, block: Tensor, layers: tuple[int, ...] = ()) -> TargetOutput:
        """Append `block` (batch, n) to every row; all n slots start valid (callers `commit` afterwards)."""
        return self._forward(state, block, torch.ones_like(block, dtype=torch.bool), layers)

    def commit(self, state: TargetState, keep: Tensor) -> None:
        """Keep the first keep[b] tokens of the last verified block in row b; crop slots no row keeps."""
        n = state.last_block
        start = state.slots - n
        slot = torch.arange(n, device=keep.device)
        state.valid[:, start:] &= slot[None, :] < keep[:, None]
        state.lengths -= n - keep
        drop = n - int(keep.max())
        if drop > 0:
            state.cache.crop(-drop)
            state.valid = state.valid[:, : state.slots - drop]
            state.positions = state.positions[:, : state.slots]

    def select_rows(self, state: TargetState, index: Tensor) -> TargetState:
        """Keep only the rows `index` of the batch (finished rows leave); a no-op when all rows stay."""
        if len(index) == state.valid.shape[0]:
            return state
        index = index.to(state.valid.device)
        if state.cache is not None and len(index) > 0:
            state.cache.batch_select_indices(index)
        return TargetState(state.cache, state.valid[index], state.positions[index], state.lengths[index], state.last_block)

    @torch.no_grad()
    def score(self, sequences: Tensor, valid: Tensor, layers: tuple[int, ...] = ()) -> TargetOutput:
        """Teacher-forced forward over whole (left-padded) sequences, no cache kept (training features)."""
        return self._forward(_empty_state(None, valid), sequences, valid, layers)

    @torch.no_grad()
    def score_blocks(self, tokens: Tensor, anchors: Tensor, blocks: Tensor) -> Tensor:
        """Re-verify drafted blocks of one sequence in a single forward, no cache.

        tokens (T,) the committed sequence; blocks (M, n) the inputs `[anchor token, d_1 .. d_{n-1}]` that round m
        verified at positions anchors[m] .. anchors[m]+n-1. Each block sees the sequence strictly before its
        anchor and itself causally. Returns logits (M, n, V): [m, j] = p(. | prefix, block[m, :j+1]).
        """
        length, (rounds, n) = tokens.shape[0], blocks.shape
        ids = torch.cat([tokens, blocks.flatten()])[None]
        positions = torch.cat([torch.arange(length, device=tokens.device), (anchors[:, None] + torch.arange(n, device=tokens.device)).flatten()])
        block_id = torch.cat([torch.full((length,), -1, device=tokens.device), torch.arange(rounds, device=tokens.device).repeat_interleave(n)])
        q, kv = torch.arange(ids.shape[1], device=tokens.device)[:, None], torch.arange(ids.shape[1], device=tokens.device)[None, :]
        in_seq, same_block = block_id[None, :] == -1, block_id[:, None] == block_id[None, :]
        limit = torch.cat([torch.arange(1, length + 1, device=tokens.device), anchors.repeat_interleave(n)])  # query sees seq < limit
        sees_prefix = in_seq & (positions[None, :] < limit[:, None])
        mask = (sees_prefix | (same_block & (kv <= q)))[None, None]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions[None], use_cache=False, logits_to_keep=rounds * n)
        return out.logits[0].float().view(rounds, n, -1)

    # ---- internals ------------------------------------------------------------------------------------
    def _forward(self, state: TargetState, ids: Tensor, new_valid: Tensor, layers: tuple[int, ...]) -> TargetOutput:
        valid = torch.cat([state.valid, new_valid], dim=1)
        positions = (state.lengths[:, None] + new_valid.long().cumsum(1) - 1).clamp(min=0)
        n_past = state.slots
        causal = torch.arange(valid.shape[1], device=ids.device)[None, :] <= (n_past + torch.arange(ids.shape[1], device=ids.device))[:, None]
        mask = (causal[None] & valid[:, None, :])[:, None]  # (batch, 1, q, kv), True = attend
        captured: dict[int, Tensor] = {}
        hooks = [self.model.model.layers[i].register_forward_hook(_capture(captured, i)) for i in layers]
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=state.cache is not None,
                             **{self.cache_kwarg: state.cache})
        finally:
            for h in hooks:
                h.remove()
        state.valid = valid
        state.positions = torch.cat([state.positions, positions], dim=1)
        state.lengths = state.lengths + new_valid.sum(1)
        state.last_block = ids.shape[1]
        features = torch.cat([captured[i] for i in layers], dim=-1) if layers else None
        return TargetOutput(out.logits.float(), features)

    def check_prompts(self, prompts: list[list[int]], max_new_tokens: int = 0) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise TargetError("empty prompt: every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_positions:
            raise TargetError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the target's context of {self.max_positions}")
        if any(t < 0 or t >= self.vocab_size for p in prompts for t in p):
            raise TargetError(f"prompt token id outside the target vocabulary of {self.vocab_size}")


def cache_kwarg(model) -> str:
    """The name under which the model's forward takes its KV cache: `cache` (transformers >= 5.2x) or
    `past_key_values` (earlier 5.x, e.g. 5.17 on the CUDA machine). Passing the wrong one is silently swallowed by
    `**kwargs` and the model runs without its cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _empty_state(cache: DynamicCache | None, like: Tensor) -> TargetState:
    zeros = torch.zeros(like.shape[0], dtype=torch.long, device=like.device)
    return TargetState(cache, like[:, :0], zeros[:, None][:, :0], zeros)


def _capture(store: dict[int, Tensor], layer: int):
    def hook(_module, _inputs, output):
        store[layer] = output[0] if isinstance(output, tuple) else output
    return hook


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = ids if ids is not None else model.config.eos_token_id
    found = set(ids if isinstance(ids, (list, tuple)) else [ids]) - {None}
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        found.add(tokenizer.eos_token_id)
    return found
