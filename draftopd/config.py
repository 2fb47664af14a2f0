"""Every default of the project, in one place, as frozen dataclasses.

The CLI builds its flags from these fields (see `cli.py`), so a default is never written twice; a field's `metadata`
holds its flag's help text (`help`) and, where the values are a fixed set, its `choices` (which `check_choice` checks).
Groups shared by several configs are nested, not copied (`EvalConfig.decode` and `OPDConfig.rollout` are `DecodeConfig`s).
Every value is checked when a config is built (`__post_init__`), before any work starts: a bad one raises
`ConfigError`, whose message names the CLI flag that sets it (`flag_prefix` + field name, e.g. `--draft-block-size`).
Layer ids everywhere are the Hugging Face "output" convention: id `i` is the output of decoder layer `i`
(0-based), i.e. `hidden_states[i + 1]` of a forward with `output_hidden_states=True`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .data.prompts import NAMED_SETS, SPLITS
from .models.registry import NAMES as FAMILY_NAMES

DEFAULT_TARGET = "smollm2-135m"
# trained drafters shipped with the package, by target name: `generate`'s default drafter and the demo's start. A
# drafter's config.json may hold "decode": the DecodeConfig fields its benchmark chose, per device class
# (`cli.default_drafter`; docs/results/decoding-speed.md).
BUNDLED_DRAFTERS = {DEFAULT_TARGET: Path(__file__).resolve().parent / "drafters" / "smollm2-135m-dflash"}
SFT_LOSSES = ("ce", "kl")
SFT_LABELS = ("text", "greedy")
AUTOCAST = ("auto", "float32", "bfloat16")  # a trainer's drafter forward: bf16 autocast, none, or bf16 where it is fast
MAX_SEED = 2**32 - 1  # seeds are offset and multiplied by the trainers; this keeps torch.manual_seed in range


class ConfigError(ValueError):
    """A config value out of range (one line naming the CLI flag that sets it)."""


def flag(cfg: Any, name: str) -> str:
    """The CLI flag of field `name` of config `cfg`: `--` + the class's `flag_prefix` + the name, dashed."""
    return "--" + (getattr(cfg, "flag_prefix", "") + name).replace("_", "-")


def require(cfg: Any, name: str, ok: bool, rule: str) -> None:
    """Raise `ConfigError("--flag <rule>, got <value>")` unless `ok`."""
    if not ok:
        raise ConfigError(f"{flag(cfg, name)} {rule}, got {getattr(cfg, name)!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_ints(cfg: Any, minimum: int, *names: str, optional: bool = False) -> None:
    """Each field an integer >= minimum (or None when `optional`)."""
    for name in names:
        value = getattr(cfg, name)
        if not (optional and value is None):
            require(
                cfg, name, _is_int(value) and value >= minimum, f"must be at least {minimum}" if _is_int(value) else "must be an integer"
            )


def check_seed(cfg: Any, name: str = "seed") -> None:
    value = getattr(cfg, name)
    require(cfg, name, _is_int(value) and 0 <= value <= MAX_SEED, f"must be an integer in [0, {MAX_SEED}]")


def check_number(
    cfg: Any, name: str, low: float | None = None, high: float | None = None, *, above: bool = False, optional: bool = False
) -> None:
    """A finite number >= low (> low with `above`) and <= high; None passes when `optional`. NaN and inf never pass."""
    value = getattr(cfg, name)
    if optional and value is None:
        return
    ok = _is_number(value) and (low is None or (value > low if above else value >= low)) and (high is None or value <= high)
    if low is not None and high is not None:
        rule = f"must be a number in {'(' if above else '['}{low}, {high}]"
    elif low is not None:
        rule = f"must be a finite number {'>' if above else '>='} {low}"
    else:
        rule = "must be a finite number"
    require(cfg, name, ok, rule)


def check_choice(cfg: Any, name: str, options: tuple[str, ...] | None = None) -> None:
    """The field one of `options`, by default the `choices` of its metadata (what its CLI flag offers)."""
    options = options if options is not None else field_choices(type(cfg), name)
    require(cfg, name, getattr(cfg, name) in options, f"must be one of {', '.join(map(str, options))}")


def field_help(cls: Any, name: str) -> str:
    """The `help` of field `name` of dataclass `cls` (its CLI flag's help text)."""
    return _field(cls, name).metadata.get("help", "")


def field_choices(cls: Any, name: str) -> tuple | None:
    """The `choices` of field `name` of dataclass `cls`: the values it takes (its CLI flag's choices), or None."""
    return _field(cls, name).metadata.get("choices")


def _field(cls: Any, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


@dataclass(frozen=True)
class DrafterConfig:
    """Shape of a drafter (DFlash or EAGLE-3). `None` fields are filled from the target at construction."""

    arch: str | None = field(
        default=None,
        metadata={
            "help": "a drafter family (models/registry.py); unset = dflash for a new drafter, a checkpoint's own when loading one",
            "choices": FAMILY_NAMES,
        },
    )
    num_layers: int = field(default=1, metadata={"help": "drafter decoder layers"})
    block_size: int = field(default=16, metadata={"help": "tokens a drafted block: the anchor and block size - 1 drafts"})
    target_layer_ids: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "target layers whose outputs feed the drafter (id i = output of decoder layer i); unset = the family's rule (its "
            "default_layers)"
        },
    )
    num_heads: int | None = field(default=None, metadata={"help": "attention heads; unset = the target's"})
    num_kv_heads: int | None = field(default=None, metadata={"help": "key/value heads; unset = the target's"})
    head_dim: int | None = field(default=None, metadata={"help": "attention head size (even); unset = the target's"})
    intermediate_size: int | None = field(default=None, metadata={"help": "MLP width; unset = the target's"})
    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base"})
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "RMSNorm epsilon"})
    mask_token_id: int | None = field(
        default=None,
        metadata={
            "help": "DFlash MASK = this target embedding row (what the reference DFlash and speculators formats hold); unset = the "
            "target's default row (models.drafter.default_mask_token: a spare or unused special token; SmolLM2: 16 <empty_output>)"
        },
    )
    learned_mask: bool = field(
        default=False, metadata={"help": "DFlash: a learned MASK vector instead of a target row (not exportable to those formats)"}
    )
    final_norm_init: float = field(default=0.1, metadata={"help": "initial weight of the drafter's final norm (models/dflash.new_drafter)"})
    vocab_size: int | None = field(
        default=None,
        metadata={"help": "reduced draft vocabulary (a head over the most frequent label tokens); unset = the target's whole vocabulary"},
    )
    copy_target_layers: tuple[int, ...] | None = field(
        default=None,
        metadata={
            "help": "DFlash: drafter layer i starts as a copy of target decoder layer i of this list (attention, MLP, norms; q_norm/k_norm "
            "stay at 1, biases are not copied); unset = random init (models/dflash.copy_target_layers)"
        },
    )

    flag_prefix: ClassVar[str] = "draft_"

    def __post_init__(self) -> None:
        require(self, "arch", self.arch is None or self.arch in FAMILY_NAMES, f"must be one of {', '.join(FAMILY_NAMES)}")
        check_ints(self, 1, "num_layers")
        check_ints(self, 2, "block_size")
        check_ints(self, 1, "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size", optional=True)
        check_ints(self, 0, "mask_token_id", optional=True)
        require(self, "learned_mask", isinstance(self.learned_mask, bool), "must be true or false")
        require(
            self,
            "learned_mask",
            not (self.learned_mask and self.mask_token_id is not None),
            f"and --draft-mask-token-id {self.mask_token_id} exclude each other (a learned vector or a target row)",
        )
        require(self, "head_dim", self.head_dim is None or self.head_dim % 2 == 0, "must be even (RoPE rotates pairs of dimensions)")
        require(
            self,
            "num_kv_heads",
            None in (self.num_heads, self.num_kv_heads) or self.num_heads % self.num_kv_heads == 0,
            f"must divide --draft-num-heads {self.num_heads}",
        )
        ids = self.target_layer_ids
        require(
            self,
            "target_layer_ids",
            ids is None or (isinstance(ids, tuple) and len(ids) > 0 and all(_is_int(i) and i >= 0 for i in ids)),
            "must be one or more layer ids >= 0",
        )
        check_number(self, "rope_theta", 0, above=True)
        check_number(self, "rms_norm_eps", 0, above=True)
        check_number(self, "final_norm_init", 0, above=True)
        copies = self.copy_target_layers
        require(
            self,
            "copy_target_layers",
            copies is None or (isinstance(copies, tuple) and len(copies) == self.num_layers and all(_is_int(i) and i >= 0 for i in copies)),
            f"must be one target layer id >= 0 per drafter layer ({self.num_layers})",
        )


DEVICES = r"auto|cpu|mps|cuda(:\d+)?"  # what --device accepts (a regular expression)
DTYPES = ("auto", "float32", "bfloat16")  # what --dtype accepts (`resolve_dtype`)


def check_device(cfg: Any, name: str = "device") -> None:
    require(
        cfg,
        name,
        isinstance(getattr(cfg, name), str) and re.fullmatch(DEVICES, getattr(cfg, name)) is not None,
        "must be auto, cpu, cuda or cuda:N",
    )


def resolve_device(name: str = "auto") -> str:
    """`auto` = cuda when available, else cpu; anything else as given (cpu, cuda, cuda:N). Under torchrun
    (WORLD_SIZE > 1) `cuda` means this process's own GPU, `cuda:LOCAL_RANK`, and an explicit `cuda:N` is refused:
    every rank would compute on that one GPU."""
    import os

    import torch

    if not isinstance(name, str) or re.fullmatch(DEVICES, name) is None:
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if name.startswith("cuda:") and world > 1:
        raise ConfigError(
            f"--device {name} under torchrun ({world} processes): each process takes its own GPU "
            "(cuda:LOCAL_RANK); pass --device cuda or auto"
        )
    if name == "cuda" and world > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return name


def resolve_dtype(name: str, device: str):
    """`auto` = bfloat16 where it is the fast dtype (CUDA; CPUs with AVX512-BF16, where a bf16 forward of the
    embedded target is 1.5x faster than float32 and wide verifies are relatively cheaper), else float32."""
    import torch

    if name == "auto":
        fast_bf16 = device.startswith("cuda") or bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
        return torch.bfloat16 if fast_bf16 else torch.float32
    if name not in DTYPES[1:]:
        raise ConfigError(f"--dtype must be auto, float32 or bfloat16, got {name!r}")
    return getattr(torch, name)


@dataclass(frozen=True)
class FeatureConfig:
    """What `draftopd features` caches: which answers, and how the prefill batches and shards them."""

    data: str = field(
        default="answers",
        metadata={"help": "'answers' (ShareGPT answers, fixed text) or a data file: regenerated, token ids, conversations (--data-format)"},
    )
    limit: int = field(default=1500, metadata={"help": "ShareGPT train-split conversations to take answers from (answers only)"})
    max_response_tokens: int = field(default=384, metadata={"help": "answers: tokens kept of each answer"})
    keep_final: bool = field(default=False, metadata={"help": "also keep the target's final hidden state (soft labels, --loss kl)"})
    trim_loops: bool = field(
        default=False,
        metadata={
            "help": "regenerated data only: cut each answer where a greedy loop starts (decode/loops.py); from scratch on SmolLM2-135M's "
            "answers this raised held-out tau 1.048 [1.039, 1.057] at equal response tokens (docs/results/strong-drafters.md)"
        },
    )
    shard_tokens: int = field(default=65536, metadata={"help": "tokens a cache shard file"})
    batch_tokens: int = field(default=4096, metadata={"help": "padded tokens a prefill batch"})

    def __post_init__(self) -> None:
        require(self, "data", isinstance(self.data, str) and bool(self.data.strip()), "must be 'answers' or a data file path")
        require(
            self, "trim_loops", not (self.trim_loops and self.data == "answers"), "applies to regenerated data (--data FILE.jsonl) only"
        )
        check_ints(self, 1, "limit", "max_response_tokens", "shard_tokens", "batch_tokens")


DATA_FORMATS = ("auto", "regenerated", "token-ids", "conversations")


@dataclass(frozen=True)
class DataConfig:
    """How `sft --data` and `features --data` read a training file (`data/training.py`)."""

    format: str = field(
        default="auto",
        metadata={
            "help": "auto (told per record) | regenerated (prompt_ids / response_ids) | "
            "token-ids (those, or input_ids / loss_mask) | conversations (ShareGPT or "
            "OpenAI messages, rendered with the target's chat template)",
            "choices": DATA_FORMATS,
        },
    )
    max_tokens: int = field(
        default=2048,
        metadata={
            "help": "longer token-id or conversation sequences are cut after their last "
            "assistant turn that fits, else skipped (regenerated records are never cut)"
        },
    )

    flag_prefix: ClassVar[str] = "data_"

    def __post_init__(self) -> None:
        check_choice(self, "format")
        check_ints(self, 2, "max_tokens")


@dataclass(frozen=True)
class PromptConfig:
    """Which prompts a command reads, and how regeneration batches them."""

    prompts: str = field(default="sharegpt", metadata={"help": f"a named set ({', '.join(NAMED_SETS)}) or a JSONL path"})
    split: str = field(
        default="auto",
        metadata={
            "help": "train | heldout | all (a seeded hash split of the prompts); auto = train for "
            "a named set (its held-out tenth stays unseen), all for a file",
            "choices": ("auto", *SPLITS),
        },
    )
    limit: int = field(
        default=200,
        metadata={
            "help": "prompts taken: a seeded sample of the split (a smaller limit is a prefix of a larger one), not the file's first lines"
        },
    )
    max_prompt_tokens: int = field(default=512, metadata={"help": "longer rendered prompts are skipped and counted"})
    batch_size: int = field(default=8, metadata={"help": "regeneration batch (a ragged batch through the decoder)"})

    def __post_init__(self) -> None:
        require(self, "prompts", isinstance(self.prompts, str) and bool(self.prompts.strip()), "must name a prompt set or a file")
        check_choice(self, "split")
        check_ints(self, 1, "limit", "max_prompt_tokens", "batch_size")

    def resolved_split(self) -> str:
        """The split `auto` stands for: a user's own file is used whole, a named set keeps its held-out tenth out."""
        if self.split != "auto":
            return self.split
        return "train" if self.prompts in NAMED_SETS else "all"


@dataclass(frozen=True)
class DecodeConfig:
    """Speculative / autoregressive decoding settings."""

    max_new_tokens: int = field(default=128, metadata={"help": "tokens generated a prompt, at most"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; > 0 = lossless speculative sampling"})
    stop_at_eos: bool = field(default=True, metadata={"help": "end a row at the target's end-of-sequence token"})
    stop_at_loop: bool = field(
        default=False,
        metadata={
            "help": "stop a row where its text starts looping (decode/loops.py: 8 repeated 4-grams in a row), finish 'loop': the text is a "
            "prefix of the full one, so cutting it at the loop (--trim-loops) gives the same tokens for less decoding"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the sampling (and of the owner's prompt sample, data order, bootstrap)"})
    record_draft_logits: bool = field(
        default=False, metadata={"help": "keep every round's full drafter logits in the trace (tests, debugging)"}
    )
    num_drafts: int | None = field(
        default=None,
        metadata={
            "help": "drafts verified per round; none given = the drafter's block size - 1. Fewer stays lossless and narrows the verify pass, "
            "which pays where late slots are rarely accepted and a wider verify costs more (a CPU: benchmarks/draft_length.py). "
            "0 = prompt lookup only: the drafter never drafts, a round without a lookup match is a plain decoding step"
        },
    )
    draft_confidence: float = field(
        default=0.0,
        metadata={
            "help": "verify a row's drafts only while the product of the drafter's top probabilities up to the slot (its estimate that the "
            "slot is accepted) is at least this, at least one draft a round; 0 = off. A function of the drafter's logits only, so "
            "lossless (speculative.py: confident_drafts)"
        },
    )
    lookup_ngram: int = field(
        default=0,
        metadata={
            "help": "prompt lookup: a row whose last n tokens occurred earlier in its prompt or output proposes the (up to block size - 1) "
            "tokens that followed, instead of the drafter's drafts; 0 = off. Lossless (decode/lookup.py)"
        },
    )

    def __post_init__(self) -> None:
        check_ints(self, 1, "max_new_tokens")
        check_ints(self, 0, "num_drafts", optional=True)
        check_ints(self, 0, "lookup_ngram")
        require(self, "num_drafts", self.num_drafts != 0 or self.lookup_ngram > 0, "0 (prompt lookup only) needs --lookup-ngram n")
        check_number(self, "draft_confidence", 0, 1)
        check_number(self, "temperature", 0)
        check_seed(self)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + cosine schedule with linear warm-up, shared by SFT and Draft-OPD. Warm-up lasts
    `warmup_fraction` of the steps but at least `min_warmup_steps` (never more than the run): a 20-update
    Draft-OPD run warms up over 3 updates, not 1."""

    lr: float = field(default=6e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"help": "AdamW betas (two numbers in [0, 1))"})
    warmup_fraction: float = field(default=0.05, metadata={"help": "linear warm-up over this fraction of the steps"})
    min_warmup_steps: int = field(default=3, metadata={"help": "warm-up steps at least (never more than the run)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "the cosine ends at this fraction of the peak learning rate"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    checkpoint_layers: bool = field(
        default=False,
        metadata={
            "help": "recompute each drafter layer in the backward pass instead of keeping its activations: a fraction of the memory for "
            "about a third more drafter compute (DFlash; `draftopd plan` shows what a run needs either way)"
        },
    )

    flag_prefix: ClassVar[str] = "optim_"

    def __post_init__(self) -> None:
        check_number(self, "lr", 0, above=True)
        check_number(self, "weight_decay", 0)
        betas = self.betas
        require(
            self,
            "betas",
            isinstance(betas, tuple) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
            "must be two numbers in [0, 1)",
        )
        check_number(self, "warmup_fraction", 0, 1)
        check_ints(self, 1, "min_warmup_steps")
        check_number(self, "min_lr_ratio", 0, 1)
        check_number(self, "grad_clip", 0, above=True)


@dataclass(frozen=True)
class SFTConfig:
    """DFlash SFT: many anchors per sequence, one block-diagonal forward, decayed slot weights."""

    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4, metadata={"help": "sequences a micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches an optimizer step"})
    anchors_per_seq: int = field(default=32, metadata={"help": "blocks trained a sequence (sampled among trained positions)"})
    loss: str = field(default="ce", metadata={"help": "ce (hard labels) or kl (soft, to the target distribution)", "choices": SFT_LOSSES})
    labels: str = field(
        default="text",
        metadata={
            "help": "text (the sequence's next token: regenerated answers) or greedy (the target's argmax there: fixed text)",
            "choices": SFT_LABELS,
        },
    )
    slot_decay: float | None = field(
        default=None, metadata={"help": "slot weights exp(-(k-1)/decay); none given = 7 for block 16, 4 for block 8"}
    )
    feature_noise: float = field(
        default=0.0,
        metadata={
            "help": "Gaussian noise on the target features the drafter's context reads, std = this x each position's feature RMS "
            "(robustness to features it will see at decoding time, as EAGLE trains with uniform noise); 0 = off"
        },
    )
    autocast: str = field(
        default="auto",
        metadata={
            "help": "bfloat16: the drafter's forward (hence its backward) runs under torch.autocast: bf16 matmuls, float32 weights, optimizer "
            "state and loss; float32: off; auto: bfloat16 where it is fast (CUDA, AVX512-BF16 CPUs), where the recipe's SFT ran 1.5x "
            "faster at the same held-out tau (docs/results/strong-drafters.md)",
            "choices": AUTOCAST,
        },
    )
    save_every: int = field(default=50, metadata={"help": "steps between checkpoints"})
    log_every: int = field(default=1, metadata={"help": "steps between metrics rows"})
    seed: int = field(default=0, metadata={"help": "seed of the data order, anchors and initialisation"})
    max_flops: float | None = field(default=None, metadata={"help": "stop once this much compute is spent (compute-matched runs)"})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "optimizer and schedule"})

    def __post_init__(self) -> None:
        check_ints(self, 1, "steps", "batch_size", "grad_accum", "anchors_per_seq", "save_every", "log_every")
        check_choice(self, "loss")
        check_choice(self, "labels")
        check_number(self, "slot_decay", 0, above=True, optional=True)
        check_number(self, "feature_noise", 0)
        check_choice(self, "autocast")
        check_number(self, "max_flops", 0, above=True, optional=True)
        check_seed(self)


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation of tau and speedup."""

    sets: tuple[str, ...] = field(default=("mt-bench", "gsm8k", "humaneval"), metadata={"help": "named prompt sets or JSONL files"})
    num_prompts: int = field(default=30, metadata={"help": "prompts a set (a seeded sample of its held-out split)"})
    skip_prompts: int = field(
        default=0,
        metadata={
            "help": "leave out the first this many prompts of each set's seeded sample and evaluate the next --num-prompts: choose "
            "settings on --skip-prompts 0, report them on prompts never used to choose (--skip-prompts N with N >= the "
            "prompts the choice used)"
        },
    )
    bootstrap_resamples: int = field(default=2000, metadata={"help": "95% percentile-bootstrap intervals over prompts (tau, speedup)"})
    decode: DecodeConfig = field(
        default_factory=lambda: DecodeConfig(max_new_tokens=96),
        metadata={"help": "decoding, the same for plain and speculative runs; its seed also samples the prompts and the bootstrap"},
    )

    def __post_init__(self) -> None:
        require(
            self,
            "sets",
            isinstance(self.sets, tuple) and all(isinstance(s, str) and s.strip() for s in self.sets),
            "must be prompt set names or files",
        )
        check_ints(self, 1, "num_prompts", "bootstrap_resamples")
        check_ints(self, 0, "skip_prompts")
        require(self, "decode", isinstance(self.decode, DecodeConfig), "must be a DecodeConfig")
