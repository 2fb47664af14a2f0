"""Every default of the project, in one place, as frozen dataclasses.

The CLI builds its flags from these fields (see `cli.py`), so a default is never written twice.
Layer ids everywhere are the Hugging Face "output" convention: id `i` is the output of decoder layer `i`
(0-based), i.e. `hidden_states[i + 1]` of a forward with `output_hidden_states=True`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_TARGET = "smollm2-135m"


def dflash_default_layers(num_target_layers: int, num_draft_layers: int) -> tuple[int, ...]:
    """DFlash rule for which target layers feed the drafter (output-id convention).

    One drafter layer -> the middle target layer; else `round(1 + i*(N-4)/(L-1))` for i in 0..L-1
    (N=36, L=5 gives 1, 9, 17, 25, 33).
    """
    n, layers = num_target_layers, num_draft_layers
    if layers == 1:
        return (n // 2,)
    return tuple(int(round(1 + i * (n - 4) / (layers - 1))) for i in range(layers))


@dataclass(frozen=True)
class DrafterConfig:
    """Shape of a DFlash drafter. `None` fields are filled from the target at construction."""

    num_layers: int = 1
    block_size: int = 16
    target_layer_ids: tuple[int, ...] | None = None  # output-id convention; None = DFlash rule
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6


@dataclass(frozen=True)
class PromptConfig:
    """Which prompts a command reads, and how regeneration batches them."""

    prompts: str = "sharegpt"  # named set (sharegpt, mt-bench, gsm8k, humaneval) or a JSONL path
    split: str = "train"  # train | heldout | all (seeded hash split)
    limit: int = 200
    max_prompt_tokens: int = 512  # longer rendered prompts are skipped and counted
    batch_size: int = 8  # regeneration batch (a ragged batch through the decoder)


@dataclass(frozen=True)
class DecodeConfig:
    """Speculative / autoregressive decoding settings."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy; > 0 = lossless speculative sampling
    stop_at_eos: bool = True
    seed: int = 0
    record_draft_logits: bool = False  # keep every round's full drafter logits in the trace (tests, debugging)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + cosine schedule with linear warm-up, shared by SFT and Draft-OPD."""

    lr: float = 6e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class SFTConfig:
    """DFlash SFT: many anchors per sequence, one block-diagonal forward, decayed slot weights."""

    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    anchors_per_seq: int = 32
    loss: str = "ce"  # "ce" (hard labels) or "kl" (soft, to the target distribution)
    slot_decay: float | None = None  # exp(-(k-1)/decay); None = 7 for block 16, 4 for block 8
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    max_flops: float | None = None  # stop once this much compute is spent (compute-matched runs)
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation of tau and speedup."""

    sets: tuple[str, ...] = ("mt-bench", "gsm8k", "humaneval")
    num_prompts: int = 8
    max_new_tokens: int = 96
    temperature: float = 0.0
    seed: int = 0
