"""Every default of the project, in one place, as frozen dataclasses.

The CLI builds its flags from these fields (see `cli.py`), so a default is never written twice.
Every value is checked when a config is built (`__post_init__`), before any work starts: a bad one raises
`ConfigError`, whose message names the CLI flag that sets it (`flag_prefix` + field name, e.g. `--draft-block-size`).
Layer ids everywhere are the Hugging Face "output" convention: id `i` is the output of decoder layer `i`
(0-based), i.e. `hidden_states[i + 1]` of a forward with `output_hidden_states=True`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .data.prompts import NAMED_SETS, SPLITS
from .models.registry import NAMES as FAMILY_NAMES

DEFAULT_TARGET = "smollm2-135m"
# trained drafters shipped with the package, by target name: `generate`'s default drafter and the demo's start. A
# drafter's config.json may hold "decode": the DecodeConfig fields its benchmark chose (README, "Fewer drafts a round").
COMMITTED_DRAFTERS = {DEFAULT_TARGET: Path(__file__).resolve().parent / "drafters" / "smollm2-135m-dflash"}
SFT_LOSSES = ("ce", "kl")
SFT_LABELS = ("text", "greedy")
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
            require(cfg, name, _is_int(value) and value >= minimum, f"must be at least {minimum}" if _is_int(value) else "must be an integer")


def check_seed(cfg: Any, name: str = "seed") -> None:
    value = getattr(cfg, name)
    require(cfg, name, _is_int(value) and 0 <= value <= MAX_SEED, f"must be an integer in [0, {MAX_SEED}]")


def check_number(cfg: Any, name: str, low: float | None = None, high: float | None = None, *, above: bool = False,
                 optional: bool = False) -> None:
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


def check_choice(cfg: Any, name: str, options: tuple[str, ...]) -> None:
    require(cfg, name, getattr(cfg, name) in options, f"must be one of {', '.join(options)}")


@dataclass(frozen=True)
class DrafterConfig:
    """Shape of a drafter (DFlash or EAGLE-3). `None` fields are filled from the target at construction."""

    # a drafter family (models/registry.py); None = dflash for a new drafter, a checkpoint's own when loading one
    arch: str | None = field(default=None, metadata={"choices": FAMILY_NAMES})
    num_layers: int = 1
    block_size: int = 16
    target_layer_ids: tuple[int, ...] | None = None  # output-id convention; None = the family's rule (its default_layers)
    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    intermediate_size: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # DFlash MASK = this target embedding row (what the reference DFlash and speculators formats hold); None = the target's
    # default row (`models.drafter.default_mask_token`: a spare or unused special token; SmolLM2: 16 `<empty_output>`)
    mask_token_id: int | None = None
    learned_mask: bool = False  # DFlash: a learned MASK vector instead of a target row (not exportable to those formats)
    final_norm_init: float = 0.1  # initial weight of the drafter's final norm (see models/dflash.new_drafter)
    vocab_size: int | None = None  # reduced draft vocabulary (head over the most frequent label tokens); None = the target's whole vocabulary
    # DFlash: drafter layer i starts as a copy of target decoder layer copy_target_layers[i] (attention, MLP, norms;
    # q_norm/k_norm stay at 1, biases are not copied); None = random init (models/dflash.copy_target_layers)
    copy_target_layers: tuple[int, ...] | None = None

    flag_prefix: ClassVar[str] = "draft_"

    def __post_init__(self) -> None:
        require(self, "arch", self.arch is None or self.arch in FAMILY_NAMES, f"must be one of {', '.join(FAMILY_NAMES)}")
        check_ints(self, 1, "num_layers")
        check_ints(self, 2, "block_size")
        check_ints(self, 1, "num_heads", "num_kv_heads", "head_dim", "intermediate_size", "vocab_size", optional=True)
        check_ints(self, 0, "mask_token_id", optional=True)
        require(self, "learned_mask", isinstance(self.learned_mask, bool), "must be true or false")
        require(self, "learned_mask", not (self.learned_mask and self.mask_token_id is not None),
                f"and --draft-mask-token-id {self.mask_token_id} exclude each other (a learned vector or a target row)")
        require(self, "head_dim", self.head_dim is None or self.head_dim % 2 == 0, "must be even (RoPE rotates pairs of dimensions)")
        require(self, "num_kv_heads", None in (self.num_heads, self.num_kv_heads) or self.num_heads % self.num_kv_heads == 0,
                f"must divide --draft-num-heads {self.num_heads}")
        ids = self.target_layer_ids
        require(self, "target_layer_ids", ids is None or (isinstance(ids, tuple) and len(ids) > 0 and all(_is_int(i) and i >= 0 for i in ids)),
                "must be one or more layer ids >= 0")
        check_number(self, "rope_theta", 0, above=True)
        check_number(self, "rms_norm_eps", 0, above=True)
        check_number(self, "final_norm_init", 0, above=True)
        copies = self.copy_target_layers
        require(self, "copy_target_layers", copies is None or (isinstance(copies, tuple) and len(copies) == self.num_layers
                                                                and all(_is_int(i) and i >= 0 for i in copies)),
                f"must be one target layer id >= 0 per drafter layer ({self.num_layers})")


DEVICES = r"auto|cpu|mps|cuda(:\d+)?"  # what --device accepts (a regular expression)
DTYPES = ("auto", "float32", "bfloat16")  # what --dtype accepts (`resolve_dtype`)


def check_device(cfg: Any, name: str = "device") -> None:
    require(cfg, name, isinstance(getattr(cfg, name), str) and re.fullmatch(DEVICES, getattr(cfg, name)) is not None,
            "must be auto, cpu, cuda or cuda:N")


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
        raise ConfigError(f"--device {name} under torchrun ({world} processes): each process takes its own GPU "
                          "(cuda:LOCAL_RANK); pass --device cuda or auto")
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

    data: str = "answers"  # "answers" (ShareGPT answers, fixed text) or a data file: regenerated, token ids, conversations (DataConfig)
    limit: int = 1500  # ShareGPT train-split conversations to take answers from (answers only)
    max_response_tokens: int = 384
    keep_final: bool = False  # also keep the target's final hidden state (soft labels, `--loss kl`)
    # regenerated data only: cut each answer where a greedy loop starts (`decode.loops.loop_start`); from scratch
    # on SmolLM2-135M's answers this raised held-out tau 1.048 [1.039, 1.057] at equal response tokens (README)
    trim_loops: bool = False
    shard_tokens: int = 65536
    batch_tokens: int = 4096

    def __post_init__(self) -> None:
        require(self, "data", isinstance(self.data, str) and bool(self.data.strip()), "must be 'answers' or a data file path")
        require(self, "trim_loops", not (self.trim_loops and self.data == "answers"), "applies to regenerated data (--data FILE.jsonl) only")
        check_ints(self, 1, "limit", "max_response_tokens", "shard_tokens", "batch_tokens")


DATA_FORMATS = ("auto", "regenerated", "token-ids", "conversations")


@dataclass(frozen=True)
class DataConfig:
    """How `sft --data` and `features --data` read a training file (`data/training.py`)."""

    format: str = field(default="auto", metadata={"help": "auto (told per record) | regenerated (prompt_ids / response_ids) | "
                                                          "token-ids (those, or input_ids / loss_mask) | conversations (ShareGPT or "
                                                          "OpenAI messages, rendered with the target's chat template)"})
    max_tokens: int = field(default=2048, metadata={"help": "longer token-id or conversation sequences are cut after their last "
                                                           "assistant turn that fits, else skipped (regenerated records are never cut)"})

    flag_prefix: ClassVar[str] = "data_"

    def __post_init__(self) -> None:
        check_choice(self, "format", DATA_FORMATS)
        check_ints(self, 2, "max_tokens")


@dataclass(frozen=True)
class PromptConfig:
    """Which prompts a command reads, and how regeneration batches them."""

    prompts: str = "sharegpt"  # named set (sharegpt, mt-bench, gsm8k, humaneval) or a JSONL path
    split: str = field(default="auto", metadata={"help": "train | heldout | all (a seeded hash split of the prompts); auto = train for "
                                                        "a named set (its held-out tenth stays unseen), all for a file"})
    limit: int = field(default=200, metadata={"help": "prompts taken: a seeded sample of the split (a smaller limit is a "
                                                       "prefix of a larger one), not the file's first lines"})
    max_prompt_tokens: int = 512  # longer rendered prompts are skipped and counted
    batch_size: int = 8  # regeneration batch (a ragged batch through the decoder)

    def __post_init__(self) -> None:
        require(self, "prompts", isinstance(self.prompts, str) and bool(self.prompts.strip()), "must name a prompt set or a file")
        check_choice(self, "split", ("auto", *SPLITS))
        check_ints(self, 1, "limit", "max_prompt_tokens", "batch_size")

    def resolved_split(self) -> str:
        """The split `auto` stands for: a user's own file is used whole, a named set keeps its held-out tenth out."""
        if self.split != "auto":
            return self.split
        return "train" if self.prompts in NAMED_SETS else "all"


@dataclass(frozen=True)
class DecodeConfig:
    """Speculative / autoregressive decoding settings."""

    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy; > 0 = lossless speculative sampling
    stop_at_eos: bool = True
    # stop a row where its text starts looping (`decode/loops.py`: 8 repeated 4-grams in a row), finish "loop": the text
    # is a prefix of the full one, so cutting it at the loop (`--trim-loops`) gives the same tokens for less decoding
    stop_at_loop: bool = False
    seed: int = 0
    record_draft_logits: bool = False  # keep every round's full drafter logits in the trace (tests, debugging)
    # drafts verified per round; None = the drafter's block size - 1. Fewer stays lossless and narrows the verify
    # pass, which pays where late slots are rarely accepted and a wider verify costs more (a CPU: benchmarks/draft_length.py).
    # 0 = prompt lookup only: the drafter never drafts, a round without a lookup match is a plain decoding step
    num_drafts: int | None = None
    # verify a row's drafts only while the product of the drafter's top probabilities up to the slot (its estimate
    # that the slot is accepted) is at least this, at least one draft a round; 0 = off. A function of the drafter's
    # logits only, so lossless (speculative.py: `confident_drafts`)
    draft_confidence: float = 0.0
    # prompt lookup: a row whose last `lookup_ngram` tokens occurred earlier in its prompt or output proposes the (up to
    # block size - 1) tokens that followed, instead of the drafter's drafts; 0 = off. Lossless (decode/lookup.py)
    lookup_ngram: int = 0

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

    lr: float = 6e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_fraction: float = 0.05
    min_warmup_steps: int = 3
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    # recompute each drafter layer in the backward pass instead of keeping its activations: a fraction of the memory
    # for about a third more drafter compute (DFlash; `draftopd plan` shows what a run needs either way)
    checkpoint_layers: bool = False

    flag_prefix: ClassVar[str] = "optim_"

    def __post_init__(self) -> None:
        check_number(self, "lr", 0, above=True)
        check_number(self, "weight_decay", 0)
        betas = self.betas
        require(self, "betas", isinstance(betas, tuple) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas),
                "must be two numbers in [0, 1)")
        check_number(self, "warmup_fraction", 0, 1)
        check_ints(self, 1, "min_warmup_steps")
        check_number(self, "min_lr_ratio", 0, 1)
        check_number(self, "grad_clip", 0, above=True)


@dataclass(frozen=True)
class SFTConfig:
    """DFlash SFT: many anchors per sequence, one block-diagonal forward, decayed slot weights."""

    steps: int = 200
    batch_size: int = 4
    grad_accum: int = 1
    anchors_per_seq: int = 32
    loss: str = "ce"  # one of SFT_LOSSES: "ce" (hard labels) or "kl" (soft, to the target distribution)
    labels: str = "text"  # one of SFT_LABELS: "text" (the sequence's next token: regenerated answers) or "greedy" (the target's argmax there: fixed text)
    slot_decay: float | None = None  # exp(-(k-1)/decay); None = 7 for block 16, 4 for block 8
    # Gaussian noise on the target features the drafter's context reads, std = this x each position's feature RMS
    # (robustness to features it will see at decoding time, as EAGLE trains with uniform noise); 0 = off
    feature_noise: float = 0.0
    # "bfloat16": the drafter's forward (hence its backward) runs under torch.autocast: bf16 matmuls, float32 weights,
    # optimizer state and loss; "float32": off; "auto": bfloat16 where it is fast (`resolve_dtype`). On this
    # AVX512-BF16 CPU the recipe's SFT ran 1.5x faster at the same held-out tau (README, "Strong drafters")
    autocast: str = "auto"
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    max_flops: float | None = None  # stop once this much compute is spent (compute-matched runs)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        check_ints(self, 1, "steps", "batch_size", "grad_accum", "anchors_per_seq", "save_every", "log_every")
        check_choice(self, "loss", SFT_LOSSES)
        check_choice(self, "labels", SFT_LABELS)
        check_number(self, "slot_decay", 0, above=True, optional=True)
        check_number(self, "feature_noise", 0)
        check_choice(self, "autocast", ("auto", "float32", "bfloat16"))
        check_number(self, "max_flops", 0, above=True, optional=True)
        check_seed(self)


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation of tau and speedup."""

    sets: tuple[str, ...] = ("mt-bench", "gsm8k", "humaneval")
    num_prompts: int = 30
    max_new_tokens: int = 96
    temperature: float = 0.0
    seed: int = 0
    num_drafts: int | None = None  # drafts verified per round (DecodeConfig.num_drafts); None = block size - 1; 0 = lookup only
    draft_confidence: float = 0.0  # DecodeConfig.draft_confidence: verify drafts while the drafter's acceptance estimate is this high; 0 = off
    lookup_ngram: int = 0  # DecodeConfig.lookup_ngram: prompt-lookup drafts where the row's last n tokens occurred before; 0 = off
    bootstrap_resamples: int = 2000  # 95% percentile-bootstrap intervals over prompts (tau, speedup)

    def __post_init__(self) -> None:
        require(self, "sets", isinstance(self.sets, tuple) and all(isinstance(s, str) and s.strip() for s in self.sets),
                "must be prompt set names or files")
        check_ints(self, 1, "num_prompts", "max_new_tokens", "bootstrap_resamples")
        check_ints(self, 0, "num_drafts", optional=True)
        check_ints(self, 0, "lookup_ngram")
        require(self, "num_drafts", self.num_drafts != 0 or self.lookup_ngram > 0, "0 (prompt lookup only) needs --lookup-ngram n")
        check_number(self, "draft_confidence", 0, 1)
        check_number(self, "temperature", 0)
        check_seed(self)
