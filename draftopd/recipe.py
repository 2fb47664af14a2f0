"""From nothing to a strong drafter on a CPU budget: answers -> features -> vocabulary -> SFT -> evaluation.

`draftopd recipe` runs the stages below, each cached under `out_dir` and resumable after a kill:

1. **answers**: fixed text by default (existing ShareGPT answers, `data.answers`): data costs one target
   prefill, not a decode, and the target labels it itself (its greedy token after every position);
   optionally a regenerated JSONL (`draftopd regenerate`) instead, labelled by its own text;
2. **features**: one batched target prefill (bf16 where the CPU runs it fast, else float32) into the offline feature cache;
3. **vocabulary**: the `draft_vocab_size` most frequent label tokens (EAGLE-3 style reduced head);
4. **SFT** from the cache for many epochs, without running the target's decoder layers;
5. **evaluation** on held-out MT-Bench, GSM8K and HumanEval prompts, plain and speculative decoding interleaved.

Timing of each stage and the total are written to `out_dir/recipe.json`. The defaults are the run measured in the
docs/results/strong-drafters.md (soft labels beat hard ones there, tau ratio 1.020 [1.012, 1.029]); every
one is a flag.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .config import (
    DEFAULT_TARGET,
    DTYPES,
    DrafterConfig,
    EvalConfig,
    FeatureConfig,
    OptimConfig,
    SFTConfig,
    check_choice,
    check_device,
    check_ints,
    resolve_device,
    resolve_dtype,
)
from .data.answers import training_examples
from .data.features import FeatureCache, build_feature_cache, frequent_tokens
from .data.regenerate import load_regenerated
from .eval.evaluate import evaluate
from .models.drafter import Drafter, DrafterSpec, load_drafter, new_drafter
from .models.load import load_target
from .train.sft import train_sft
from .train.tracking import RunInfo, write_run_files


@dataclass(frozen=True)
class RecipeConfig:
    target: str = field(default=DEFAULT_TARGET, metadata={"help": "embedded name, local HF folder or hub id"})
    out_dir: str = field(default="runs/recipe", metadata={"help": "folder of every stage's output (resumable)"})
    features: FeatureConfig = field(default_factory=lambda: FeatureConfig(keep_final=True), metadata={"help": "data and how it is cached"})
    feature_dtype: str = field(
        default="auto",
        metadata={
            "help": "the target's dtype while caching features; auto = bfloat16 where it is fast (CUDA, CPUs with AVX512-BF16), else float32 "
            "(an AVX2 CPU prefills 6x slower in bf16: docs/results/README.md)",
            "choices": DTYPES,
        },
    )
    feature_layers: int = field(
        default=4,
        metadata={
            "help": "target layers the drafter reads unless --draft-target-layer-ids names them: evenly spaced from layer 1 to layer N-3 of "
            "the target's N, rounded up (`spread_layers`; SmolLM2-135M, N = 30: 1, 10, 19, 27)"
        },
    )
    drafter: DrafterConfig = field(
        default_factory=lambda: DrafterConfig(num_layers=2, block_size=8, vocab_size=8192),
        metadata={"help": "the drafter's shape (target layers: feature_layers)"},
    )
    sft: SFTConfig = field(
        default_factory=lambda: SFTConfig(
            steps=420, batch_size=8, anchors_per_seq=64, labels="greedy", loss="kl", save_every=50, optim=OptimConfig(lr=2e-3)
        ),
        metadata={"help": "SFT from the cache"},
    )
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "the held-out evaluation"})
    eval_dtype: str = field(
        default="auto", metadata={"help": "the target's dtype while evaluating (as --feature-dtype)", "choices": DTYPES}
    )
    device: str = field(default="auto", metadata={"help": "every stage's: cpu, cuda, cuda:N; auto = cuda when available, else cpu"})

    flag_prefix = ""

    def __post_init__(self) -> None:
        check_choice(self, "feature_dtype")
        check_choice(self, "eval_dtype")
        check_ints(self, 1, "feature_layers")
        check_device(self)


def spread_layers(num_target_layers: int, count: int) -> tuple[int, ...]:
    """`count` target layers (output ids) evenly spaced from layer 1 to layer N-3 of the target's N, rounded up:
    `1 + ceil(i * (N - 4) / (count - 1))` for i in 0..count-1 (SmolLM2-135M, N = 30, 4 layers: 1, 10, 19, 27); one layer
    is the middle one; a shallow target gets fewer (repeats dropped, ids kept below N)."""
    n = num_target_layers
    if count == 1:
        return (n // 2,)
    span = max(n - 4, 0)
    return tuple(sorted({min(1 + -(-i * span // (count - 1)), n - 1) for i in range(count)}))


def recipe_drafter(cfg: RecipeConfig, num_target_layers: int) -> DrafterConfig:
    """The recipe's drafter shape on a target of `num_target_layers` layers: its target layers named, or spread."""
    if cfg.drafter.target_layer_ids is not None:
        return cfg.drafter
    return replace(cfg.drafter, target_layer_ids=spread_layers(num_target_layers, cfg.feature_layers))


def run_recipe(cfg: RecipeConfig, progress: bool = True, run: RunInfo | None = None) -> dict:
    """Run (or resume) every stage; returns the summary also written to `out_dir/recipe.json`. `run` (the command's record
    and tracker, `train/tracking.py`): run.yaml, command.txt and env.json into `out_dir` and beside the SFT checkpoints,
    with the target layers resolved."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = t0 = time.perf_counter()
    data = cfg.features
    regenerated = (
        None if data.data == "answers" else load_regenerated(data.data, trim_loops=data.trim_loops)
    )  # a bad path fails before any model loads
    device = resolve_device(cfg.device)
    target = load_target(cfg.target, device=device)  # float32: training reads only its embedding and head
    cfg = replace(cfg, drafter=recipe_drafter(cfg, target.num_layers))
    layers = DrafterSpec.resolve(cfg.drafter, target).target_layer_ids
    if run is not None:
        run = replace(run, configs={**run.configs, "recipe": cfg})
        write_run_files(out, run, device, resolve_dtype(cfg.feature_dtype, device))
    examples = training_examples(data, target.tokenizer, regenerated)
    times["answers_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = build_feature_cache(
        load_target(cfg.target, dtype=resolve_dtype(cfg.feature_dtype, device), device=device),
        examples,
        out / "features",
        layers,
        keep_final=data.keep_final,
        shard_tokens=data.shard_tokens,
        batch_tokens=data.batch_tokens,
        progress=progress,
    )
    times["features_s"] = time.perf_counter() - t0
    cache = FeatureCache.open(out / "features", target, layers, need_final=cfg.sft.loss == "kl")
    drafter = _drafter(target, cfg.drafter, cache, cfg.sft.labels)
    t0 = time.perf_counter()
    final = train_sft(target, drafter, cache, cfg.sft, out / "sft", resume=True, progress=progress, run=run)
    times["sft_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    target = load_target(cfg.target, dtype=resolve_dtype(cfg.eval_dtype, device), device=device)
    report = evaluate(target, load_drafter(final, target).to(target.dtype), cfg.eval, progress=progress)
    report.save(out / "eval.json")
    times["eval_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - start  # this call's; a resumed run counts only what it redid
    summary = {
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
        "checkpoint": str(final),
        "examples": len(examples),
        "feature_tokens": manifest.tokens,
        "feature_bytes_per_token": manifest.bytes_per_token,
        "times": times,
        "eval": report.to_dict(),
    }
    (out / "recipe.json").write_text(json.dumps(summary, indent=2))
    summary["table"] = report.table()
    return summary


def _drafter(target, cfg: DrafterConfig, cache: FeatureCache, labels: str) -> Drafter:
    """A new drafter whose reduced vocabulary is the cache's most frequent labels (deterministic, so a resumed
    run rebuilds the same one before its checkpoint loads)."""
    drafter = new_drafter(target, cfg)
    if cfg.vocab_size is not None:
        drafter.set_draft_vocab(frequent_tokens(cache, target.vocab_size, cfg.vocab_size, labels))
    return drafter
