"""The frozen target model `p`: any Hugging Face causal LM behind a few calls.

- `prefill(prompts)`: a batch of prompts into a fresh KV cache; the next-token logits of each prompt's last token.
- `verify(state, block)`: append a block of tokens to every row in one forward; the logits of every block position
  and the context features (hidden states of the chosen layers, concatenated).
- `commit(state, keep)`: keep the first `keep[b]` block tokens of row `b`.
- `score(sequences)`: a teacher-forced forward over whole sequences (training): features and the final hidden states.
- `logits(hidden)`: the frozen output head (with the model's own logit scaling), applied only where logits are needed.

The KV cache (`RaggedCache`) is preallocated for the whole generation and ragged: row b's committed tokens fill
slots 0 .. lengths[b]-1 (prompts are right-padded), and a forward writes its n new tokens at slots lengths[b] ..
lengths[b]+n-1 of each row. A commit only advances `lengths`, so rejected drafts leave no holes: the next block
overwrites them. A slot's RoPE position is its index, so each forward gets an explicit 4-D mask (slot j visible to
the i-th new token of row b iff j <= lengths[b] + i) and explicit position ids, and the model computes exactly what it
would for each row alone. Attention covers slots 0 .. max(lengths) + n - 1; the host keeps the lengths too
(`TargetState.host_lengths`), so sizing a forward never waits for the device.

Logits are computed from the base model's final hidden states only where they are used: the last prompt token at
prefill, the block at verify, the trained positions in training (`logits`), in the model's dtype. A full-vocabulary
float32 copy is never made here.

Context features follow the output-id convention: id `i` is the output of decoder layer `i`, captured with forward
hooks on the decoder layers.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import Cache


class TargetError(ValueError):
    """A target that cannot be loaded or an input it cannot take (one clear line)."""


class RaggedCache(Cache):
    """Preallocated keys/values per layer, (batch, kv_heads, capacity, head_dim), written at per-row slots.

    Before each forward the target sets `write_index` (b, n): the slots of the n new tokens of each row, and `width`:
    how many leading slots the forward attends over. `update` scatters the new keys/values there and returns the
    first `width` slots. The capacity doubles if a forward would run past it."""

    def __init__(self, capacity: int):
        super().__init__(layers=[])
        self.capacity = capacity
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.write_index: Tensor | None = None
        self.width = 0

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if layer_idx == len(self.keys):
            shape = (*key_states.shape[:2], max(self.capacity, self.width), key_states.shape[-1])
            self.keys.append(key_states.new_zeros(shape))
            self.values.append(value_states.new_zeros(shape[:-1] + value_states.shape[-1:]))
        elif self.width > self.keys[layer_idx].shape[2]:
            self.keys[layer_idx], self.values[layer_idx] = (
                _grown(self.keys[layer_idx], self.width),
                _grown(self.values[layer_idx], self.width),
            )
        index = self.write_index[:, None, :, None]
        self.keys[layer_idx].scatter_(2, index.expand_as(key_states), key_states)
        self.values[layer_idx].scatter_(2, index.expand_as(value_states), value_states)
        return self.keys[layer_idx][:, :, : self.width], self.values[layer_idx][:, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.width, 0

    def select(self, index: Tensor) -> None:
        """Keep only the batch rows `index`."""
        self.keys = [k[index] for k in self.keys]
        self.values = [v[index] for v in self.values]


def _grown(buffer: Tensor, width: int) -> Tensor:
    new = buffer.new_zeros((*buffer.shape[:2], max(width, 2 * buffer.shape[2]), buffer.shape[3]))
    new[:, :, : buffer.shape[2]] = buffer
    return new


@dataclass
class TargetState:
    """A batch of sequences held in the target's KV cache.

    cache: the ragged cache; row b's tokens fill slots 0 .. lengths[b]-1 (a slot's RoPE position is its index).
    lengths: (batch,) tokens of each row in the cache, on the device; `host_lengths` the same on the host.
    last_block: width of the last forward's input, what `commit` keeps part of.
    """

    cache: RaggedCache | None
    lengths: Tensor
    host_lengths: list[int]
    last_block: int = 0

    @property
    def slots(self) -> int:
        """Slots that hold committed tokens in some row (the cache's used width)."""
        return max(self.host_lengths, default=0)

    @property
    def valid(self) -> Tensor:
        """(batch, slots) True where the slot holds a committed token of that row."""
        return torch.arange(self.slots, device=self.lengths.device)[None, :] < self.lengths[:, None]

    @property
    def positions(self) -> Tensor:
        """(batch, slots) the RoPE position of each slot: its index."""
        return torch.arange(self.slots, device=self.lengths.device).expand(len(self.host_lengths), -1)


@dataclass
class TargetOutput:
    """logits: (batch, n, V) next-token logits at each input position, in the model's dtype; features: (batch, n,
    len(layers)*H) the chosen layers' hidden states."""

    logits: Tensor
    features: Tensor | None


@dataclass
class PrefillOutput:
    """last_logits: (batch, V) the next-token logits after each prompt's last token; features: (batch, width,
    len(layers)*H) at every prompt slot (slots past a row's prompt hold padding)."""

    last_logits: Tensor
    features: Tensor | None


@dataclass
class ScoreOutput:
    """A teacher-forced forward: features (batch, T, len(layers)*H) and final (batch, T, H), the hidden states the
    output head reads (`Target.logits(final)` gives next-token logits wherever they are needed)."""

    features: Tensor | None
    final: Tensor


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
        self.cache_kwarg: str = cache_kwarg(model.base_model)
        self.softcap: float | None = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
        self.logits_scaling: float | None = getattr(cfg, "logits_scaling", None)  # Granite divides by it

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

    def logits(self, hidden: Tensor) -> Tensor:
        """Next-token logits of final hidden states (..., H) -> (..., V), as the model's own forward computes them."""
        return self.scale(self.lm_head(hidden))

    def scale(self, logits: Tensor) -> Tensor:
        """What the model's forward does to its head's output (Granite's logit scaling, Gemma's soft cap); elementwise,
        so it applies to any subset of the vocabulary's logits."""
        if self.logits_scaling:
            logits = logits / self.logits_scaling
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    # ---- the calls ------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self, prompts: list[list[int]], layers: tuple[int, ...] = (), capacity: int | None = None
    ) -> tuple[TargetState, PrefillOutput]:
        """Right-pad `prompts` into a new cache of `capacity` slots a row (default: the longest prompt; it grows when
        needed). Features row b slot j is prompt token j (slots past the prompt: padding)."""
        self.check_prompts(prompts)
        width = max(len(p) for p in prompts)
        rows = torch.tensor([[len(p)] + list(p) + [self.pad_id] * (width - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        lengths, ids = rows[:, 0], rows[:, 1:]  # one copy to the device
        state = TargetState(RaggedCache(max(capacity or 0, width)), torch.zeros_like(lengths), [0] * len(prompts))
        slot = torch.arange(width, device=self.device)
        mask = (slot[None, None, :] <= slot[None, :, None]) & (slot[None, None, :] < lengths[:, None, None])
        hidden, features = self._forward(state, ids, slot.expand(len(prompts), -1), mask[:, None], layers)
        state.lengths, state.host_lengths = lengths, [len(p) for p in prompts]
        last = hidden.gather(1, (lengths - 1)[:, None, None].expand(-1, 1, hidden.shape[-1]))[:, 0]
        return state, PrefillOutput(self.logits(last), features)

    @torch.no_grad()
    def verify(self, state: TargetState, block: Tensor, layers: tuple[int, ...] = ()) -> TargetOutput:
        """Append `block` (batch, n) to every row at its own length; `commit` then keeps a prefix of it."""
        write = state.lengths[:, None] + torch.arange(block.shape[1], device=block.device)  # (b, n) slot = position
        width = state.slots + block.shape[1]
        mask = torch.arange(width, device=block.device)[None, None, :] <= write[:, :, None]
        hidden, features = self._forward(state, block, write, mask[:, None], layers)
        return TargetOutput(self.logits(hidden), features)

    def commit(self, state: TargetState, keep: Tensor, keep_host: list[int] | None = None) -> None:
        """Keep the first keep[b] tokens of the last verified block in row b (`keep_host`: the same counts on the
        host, which the caller usually has; else they are read from the device)."""
        state.lengths = state.lengths + keep
        keep_host = keep.tolist() if keep_host is None else keep_host
        state.host_lengths = [n + k for n, k in zip(state.host_lengths, keep_host)]

    def select_rows(self, state: TargetState, index: list[int], rows: Tensor | None = None) -> TargetState:
        """Keep only the rows `index` of the batch (finished rows leave; `rows`: the same on the device, if the caller
        has it); a no-op when all rows stay."""
        if len(index) == len(state.host_lengths):
            return state
        rows = torch.tensor(index, dtype=torch.long, device=state.lengths.device) if rows is None else rows
        if state.cache is not None and index:
            state.cache.select(rows)
        return TargetState(state.cache, state.lengths[rows], [state.host_lengths[i] for i in index], state.last_block)

    @torch.no_grad()
    def score(self, sequences: Tensor, valid: Tensor, layers: tuple[int, ...] = ()) -> ScoreOutput:
        """Teacher-forced forward over whole right-padded sequences (valid (b, T)), no cache kept: features and the
        final hidden states (logits come from `logits` at the positions a caller needs)."""
        width = sequences.shape[1]
        slot = torch.arange(width, device=sequences.device)
        mask = (slot[None, None, :] <= slot[None, :, None]) & valid[:, None, :]
        hidden, features = self._forward(None, sequences, slot.expand(len(sequences), -1), mask[:, None], layers)
        return ScoreOutput(features, hidden)

    @torch.no_grad()
    def score_blocks(self, tokens: Tensor, anchors: Tensor, blocks: Tensor) -> Tensor:
        """Re-verify drafted blocks of one sequence in a single forward, no cache.

        tokens (T,) the committed sequence; blocks (M, n) the inputs `[anchor token, d_1 .. d_{n-1}]` that round m
        verified at positions anchors[m] .. anchors[m]+n-1. Each block sees the sequence strictly before its
        anchor and itself causally. Returns final hidden states (M, n, H): [m, j] gives p(. | prefix, block[m, :j+1])
        through `logits`.
        """
        length, (rounds, n) = tokens.shape[0], blocks.shape
        device = tokens.device
        ids = torch.cat([tokens, blocks.flatten()])[None]
        positions = torch.cat([torch.arange(length, device=device), (anchors[:, None] + torch.arange(n, device=device)).flatten()])
        block_id = torch.cat(
            [torch.full((length,), -1, device=device), torch.arange(rounds, device=device).repeat_interleave(n, output_size=rounds * n)]
        )
        q, kv = torch.arange(ids.shape[1], device=device)[:, None], torch.arange(ids.shape[1], device=device)[None, :]
        in_seq, same_block = block_id[None, :] == -1, block_id[:, None] == block_id[None, :]
        limit = torch.cat(
            [torch.arange(1, length + 1, device=device), anchors.repeat_interleave(n, output_size=rounds * n)]
        )  # query sees seq < limit
        sees_prefix = in_seq & (positions[None, :] < limit[:, None])
        mask = (sees_prefix | (same_block & (kv <= q)))[None, None]
        out = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions[None], use_cache=False)
        return out.last_hidden_state[0, length:].view(rounds, n, -1)

    # ---- internals ------------------------------------------------------------------------------------
    def _forward(
        self, state: TargetState | None, ids: Tensor, positions: Tensor, mask: Tensor, layers: tuple[int, ...]
    ) -> tuple[Tensor, Tensor | None]:
        """One base-model forward of `ids` (b, n) at `positions` (b, n) (also their cache slots) under `mask`
        (b, 1, n, kv): the final hidden states (b, n, H) and the chosen layers' features."""
        cache = state.cache if state is not None else None
        if cache is not None:
            cache.write_index, cache.width = positions, mask.shape[-1]
        captured: dict[int, Tensor] = {}
        decoder = self.model.base_model.layers
        hooks = [decoder[i].register_forward_hook(_capture(captured, i)) for i in layers]
        try:
            out = self.model.base_model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=cache is not None, **{self.cache_kwarg: cache}
            )
        finally:
            for h in hooks:
                h.remove()
        if state is not None:
            state.last_block = ids.shape[1]
        features = torch.cat([captured[i] for i in layers], dim=-1) if layers else None
        return out.last_hidden_state, features

    def check_prompts(self, prompts: list[list[int]], max_new_tokens: int = 0) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise TargetError("empty prompt: every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest + max_new_tokens > self.max_positions:
            raise TargetError(
                f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the target's context of {self.max_positions}"
            )
        if any(t < 0 or t >= self.vocab_size for p in prompts for t in p):
            raise TargetError(f"prompt token id outside the target vocabulary of {self.vocab_size}")


def cache_kwarg(model) -> str:
    """The name under which the model's forward takes its KV cache: `cache` (transformers >= 5.2x) or
    `past_key_values` (earlier 5.x, e.g. 5.17 on the CUDA machine). Passing the wrong one is silently swallowed by
    `**kwargs` and the model runs without its cache."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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
