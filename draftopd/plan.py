"""`draftopd plan`: what a run will need, per rank, before it starts: parameters, peak device memory (target, KV cache,
drafter and its optimizer, activations), FLOPs per step, feature-cache bytes.

Memory is measured, not estimated by formula: each flow's own code runs once at the stated sizes on a target and a
drafter built on the `meta` device from their configs (no weights, seconds on a CPU; `check/memory.py`), the parts
that depend on token values replaced by their worst case (every verify at the longest context; `opd_tau` sets how
many segments a rollout leaves to replay). Flows:

- `regenerate`: `regen_batch` prompts of `prompt_tokens` answered with `new_tokens` each, by plain decoding (the
  target's KV cache for the whole generation, preallocated) and, with a drafter, by speculative decoding;
- `features`: the feature cache's prefill of `features_batch_tokens` tokens of `sequence_tokens`-token sequences;
- `sft-online` / `sft-cache`: one SFT micro-batch of `sft_batch` sequences of `sequence_tokens` (prompt included)
  with `anchors_per_seq` blocks each, forward, backward and AdamW step (online: the target scores them first);
- `opd-rollout` / `opd-replay`: Draft-OPD's rollout of `opd_rollouts` prompts x `opd_new_tokens`, and the replay of
  `replay_batch` of those traces with backward and AdamW step.
Batch sizes are per rank: under torchrun each rank holds a full target and drafter and its share of every batch.
`PlanReport.margin_gb` is added for what the measurement does not see (CUDA context, allocator blocks, library
workspaces). FLOPs follow the trainers' counter (`train/common.Compute`): 2 x params a token for a forward, 6 x the
drafter's (with the head it computes through) for its training.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from .check.memory import LiveBytes, measure, meta_drafter, meta_target, model_config, module_bytes, tensor_bytes
from .config import SFT_LOSSES, ConfigError, DecodeConfig, DrafterConfig, SFTConfig, check_choice, check_ints, check_number
from .data.features import CachedSequence, FeatureManifest, prefill_features
from .data.regenerate import SFTExample
from .decode.speculative import speculative_round
from .decode.trace import PhaseClock, RolloutTrace
from .models.drafter import ContextCache, Drafter
from .models.target import Target
from .train.anchors import make_segments
from .train.losses import LossConfig, combine_streams
from .train.opd import collate, replay, step_norms
from .train.sft import sft_micro_batch

GB = 1e9


@dataclass(frozen=True)
class PlanConfig:
    """What to plan for. Sizes are per rank (each of `world_size` processes holds its own target and drafter)."""

    target_config: str = field(
        default="qwen3-8b",
        metadata={
            "help": "a shipped config (qwen3-8b, llama-3.1-8b, qwen3-0.6b), a config.json or a model folder: only its shapes are read"
        },
    )
    dtype: str = field(default="bfloat16", metadata={"help": "the target's dtype on the device", "choices": ("bfloat16", "float32")})
    world_size: int = field(default=1, metadata={"help": "torchrun processes (the dataset and the FLOPs a step are shared among them)"})
    device_gb: float = field(default=80.0, metadata={"help": "memory of one device, to say what fits"})
    regen_batch: int = field(default=64, metadata={"help": "regeneration: prompts decoded together"})
    prompt_tokens: int = field(default=512, metadata={"help": "prompt length (regeneration and rollouts)"})
    new_tokens: int = field(default=1024, metadata={"help": "regeneration: tokens generated a prompt"})
    sequence_tokens: int = field(default=4096, metadata={"help": "SFT and the feature prefill: tokens a training sequence"})
    sft_batch: int = field(default=2, metadata={"help": "SFT: sequences a micro-batch"})
    anchors_per_seq: int = field(default=512, metadata={"help": "SFT: blocks trained a sequence"})
    sft_loss: str = field(
        default="kl", metadata={"help": "SFT loss: ce (hard labels) or kl (soft, the target's distribution)", "choices": SFT_LOSSES}
    )
    opd_rollouts: int = field(default=16, metadata={"help": "Draft-OPD: prompts a rollout batch"})
    opd_new_tokens: int = field(default=2048, metadata={"help": "Draft-OPD: tokens a rollout"})
    opd_tau: float = field(
        default=3.0,
        metadata={
            "help": "Draft-OPD: acceptance length assumed, which sets the segments a "
            "rollout leaves (new tokens / tau); lower tau, more segments"
        },
    )
    replay_batch: int = field(default=4, metadata={"help": "Draft-OPD: traces a replay micro-batch"})
    loss_mode: str = field(
        default="estimate",
        metadata={
            "help": "Draft-OPD loss: estimate (single-token) or exact (re-verifies every rejected block)",
            "choices": ("estimate", "exact"),
        },
    )
    features_batch_tokens: int = field(default=16384, metadata={"help": "feature cache: padded tokens a prefill batch"})
    dataset_tokens: float = field(default=1e9, metadata={"help": "tokens of the training set (feature-cache size)"})
    autocast: bool = field(default=True, metadata={"help": "the drafter trains under bf16 autocast (the CUDA default)"})
    checkpoint_layers: bool = field(
        default=False, metadata={"help": "training recomputes each drafter layer in backward (--optim-checkpoint-layers)"}
    )

    def __post_init__(self) -> None:
        check_choice(self, "dtype")
        check_choice(self, "sft_loss")
        check_choice(self, "loss_mode")
        check_ints(
            self,
            1,
            "world_size",
            "regen_batch",
            "prompt_tokens",
            "new_tokens",
            "sequence_tokens",
            "sft_batch",
            "anchors_per_seq",
            "opd_rollouts",
            "opd_new_tokens",
            "replay_batch",
            "features_batch_tokens",
        )
        check_number(self, "opd_tau", 1)
        check_number(self, "device_gb", 0, above=True)
        check_number(self, "dataset_tokens", 0, above=True)
        if self.prompt_tokens >= self.sequence_tokens:
            raise ConfigError(f"--prompt-tokens {self.prompt_tokens} must be below --sequence-tokens {self.sequence_tokens}")


@dataclass(frozen=True)
class FlowPlan:
    """One flow's needs on one rank, in bytes (peak = target + drafter + optimizer + kv_cache + activations)."""

    flow: str
    peak: int
    target: int
    drafter: int
    optimizer: int
    kv_cache: int
    flops: float
    largest: int  # the largest single tensor the flow makes
    seconds: float  # how long the measurement took on this host

    @property
    def activations(self) -> int:
        return self.peak - self.target - self.drafter - self.optimizer - self.kv_cache


@dataclass(frozen=True)
class PlanReport:
    config: dict
    target_params: int
    drafter_params: int
    drafter_spec: dict
    feature_bytes_per_token: int
    flows: tuple[FlowPlan, ...]
    margin_gb: float = 4.0

    def flow(self, name: str) -> FlowPlan:
        return next(f for f in self.flows if f.flow == name)

    def fits(self, name: str, device_gb: float | None = None) -> bool:
        return self.flow(name).peak / GB + self.margin_gb <= (device_gb or self.config["device_gb"])

    def table(self) -> str:
        c = self.config
        lines = [
            f"target {c['target_config']} ({self.target_params / 1e9:.2f}B params, {c['dtype']}); drafter "
            f"{self.drafter_spec['arch']} {self.drafter_spec['num_layers']} layer(s), block {self.drafter_spec['block_size']} "
            f"({self.drafter_params / 1e6:.0f}M params + the target's head); world size {c['world_size']}",
            f"feature cache: {self.feature_bytes_per_token:,} bytes a token, "
            f"{self.feature_bytes_per_token * c['dataset_tokens'] / c['world_size'] / 1e12:.2f} TB a rank for "
            f"{c['dataset_tokens']:.3g} tokens",
            f"peak per rank in GB (+{self.margin_gb:.0f} GB margin for CUDA context and allocator; device {c['device_gb']:.0f} GB):",
            f"{'flow':<13} {'peak':>7} {'target':>7} {'drafter':>8} {'optim':>7} {'kv':>7} {'activ':>7} {'TFLOP/step':>11} {'fits':>5}",
        ]
        for f in self.flows:
            lines.append(
                f"{f.flow:<13} {f.peak / GB:>7.1f} {f.target / GB:>7.1f} {f.drafter / GB:>8.1f} {f.optimizer / GB:>7.1f} "
                f"{f.kv_cache / GB:>7.1f} {f.activations / GB:>7.1f} {f.flops / 1e12:>11.1f} {'yes' if self.fits(f.flow) else 'NO':>5}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {**asdict(self), "flows": [{**asdict(f), "activations": f.activations} for f in self.flows]}


def plan(cfg: PlanConfig, drafter_cfg: DrafterConfig = DrafterConfig()) -> PlanReport:
    """Measure every flow for `cfg` (see the module docstring)."""
    target = meta_target(model_config(cfg.target_config), getattr(torch, cfg.dtype), cfg.target_config)
    train_drafter = meta_drafter(target, drafter_cfg).train()  # float32 weights, as trained
    train_drafter.checkpoint_layers = cfg.checkpoint_layers
    decode_drafter = meta_drafter(target, drafter_cfg).to(target.dtype)
    target_bytes, target_params = module_bytes(target.model), sum(p.numel() for p in target.model.parameters())
    head = target.model.get_output_embeddings().weight.numel()
    draft_params = sum(p.numel() for p in train_drafter.parameters())
    optim = 3 * 4 * draft_params  # float32 gradients and AdamW's two moments
    spec = train_drafter.spec
    flows = []

    def run(name: str, fn, drafter: Drafter | None, optimizer: int, flops: float) -> None:
        t0 = time.perf_counter()
        live, kv = fn()
        flows.append(
            FlowPlan(
                name,
                live.peak,
                target_bytes,
                module_bytes(drafter) if drafter is not None else 0,
                optimizer,
                kv,
                flops,
                live.largest,
                time.perf_counter() - t0,
            )
        )

    t, d, forward = target_params, draft_params + head, lambda params, tokens: 2.0 * params * tokens  # noqa: E731
    run(
        "regenerate",
        lambda: measured(lambda: decode_step(target, None, cfg.regen_batch, cfg.prompt_tokens, cfg.new_tokens), target.model),
        None,
        0,
        forward(t, cfg.regen_batch * (cfg.prompt_tokens + cfg.new_tokens)),
    )
    run(
        "features",
        lambda: measured(
            lambda: features_step(target, spec.target_layer_ids, cfg.features_batch_tokens, cfg.sequence_tokens), target.model
        ),
        None,
        0,
        forward(t, cfg.features_batch_tokens),
    )
    blocks = cfg.sft_batch * cfg.anchors_per_seq
    sft_tokens = cfg.sft_batch * cfg.sequence_tokens
    for cached in (False, True):
        run(
            "sft-cache" if cached else "sft-online",
            lambda cached=cached: measured(
                lambda: sft_step(target, train_drafter, cfg, cached), target.model, train_drafter, autocast=cfg.autocast
            ),
            train_drafter,
            optim,
            (0 if cached else forward(t, sft_tokens)) + 6.0 * d * blocks * spec.block_size,
        )
    rollout_tokens = cfg.opd_rollouts * (cfg.prompt_tokens + cfg.opd_new_tokens * spec.block_size / cfg.opd_tau)
    run(
        "opd-rollout",
        lambda: measured(
            lambda: decode_step(target, decode_drafter, cfg.opd_rollouts, cfg.prompt_tokens, cfg.opd_new_tokens),
            target.model,
            decode_drafter,
        ),
        decode_drafter,
        0,
        forward(t, rollout_tokens) + forward(d, cfg.opd_rollouts * cfg.opd_new_tokens * spec.block_size / cfg.opd_tau),
    )
    segments = int(cfg.opd_new_tokens / cfg.opd_tau)
    replay_tokens = cfg.opd_rollouts * (cfg.prompt_tokens + cfg.opd_new_tokens)
    run(
        "opd-replay",
        lambda: measured(lambda: replay_step(target, train_drafter, cfg, segments), target.model, train_drafter, autocast=cfg.autocast),
        train_drafter,
        optim,
        forward(t, replay_tokens) + 6.0 * d * cfg.opd_rollouts * segments * spec.block_size,
    )
    manifest = FeatureManifest("", "", None, spec.target_layer_ids, target.hidden_size, keep_final=True)
    return PlanReport(asdict(cfg), target_params, draft_params, asdict(spec), manifest.bytes_per_token, tuple(flows))


# ---- the flows: one step each, on a target and drafter of any device (meta here, CUDA in benchmarks/device_check.py)
def measured(step, *modules: torch.nn.Module, autocast: bool = False) -> tuple[LiveBytes, int]:
    """Run `step()` (which returns KV-cache bytes) while counting live bytes on meta tensors (`check.memory.measure`)."""
    with measure(*modules, autocast=autocast) as live:
        kv = step()
    return live, kv


def _autocast(cfg: PlanConfig, target: Target) -> str:
    """The trainers' autocast setting: bf16 where asked, except on meta tensors, whose autocast `measure` emulates."""
    return "bfloat16" if cfg.autocast and target.device.type != "meta" else "float32"


@torch.no_grad()
def decode_step(target: Target, drafter: Drafter | None, batch: int, prompt_tokens: int, new_tokens: int) -> int:
    """A prefill of `batch` prompts into a cache sized for the whole generation, then a round at the longest context:
    the drafter's block, the verify and acceptance (plain decoding: a one-token step). Returns the KV caches' bytes."""
    prompts = [[1] * prompt_tokens] * batch
    block = drafter.block_size if drafter is not None else 1
    capacity = prompt_tokens + new_tokens + block
    longest = [prompt_tokens + new_tokens - 1] * batch
    layers = drafter.spec.target_layer_ids if drafter is not None else ()
    state, out = target.prefill(prompts, layers, capacity)
    device = out.last_logits.device
    state.lengths, state.host_lengths = torch.full((batch,), longest[0], dtype=torch.long, device=device), longest
    anchor = out.last_logits.argmax(-1)
    if drafter is None:
        del out
        target.verify(state, anchor[:, None])
        return tensor_bytes(*state.cache.keys, *state.cache.values)
    following = torch.ones(batch, out.features.shape[1], dtype=torch.long, device=device)
    prompt_ctx = drafter.project_context(
        out.features, state.positions[:, :prompt_tokens], torch.ones_like(following, dtype=torch.bool), following
    )
    ctx = ContextCache.start(prompt_ctx, state.lengths, longest, capacity)
    del out, prompt_ctx
    speculative_round(target, drafter, state, ctx, anchor, DecodeConfig(), None, PhaseClock("cpu"))
    return tensor_bytes(*state.cache.keys, *state.cache.values, *ctx.keys, *ctx.values, ctx.fused)


def features_step(target: Target, layers: tuple[int, ...], batch_tokens: int, sequence_tokens: int) -> int:
    """One prefill batch of the feature cache (`data.features.prefill_features`)."""
    rows = max(1, batch_tokens // sequence_tokens)
    prefill_features(target, [[1] * sequence_tokens] * rows, layers, keep_final=True, batch_tokens=batch_tokens)
    return 0


def _train_step(drafter: Drafter, loss: torch.Tensor) -> None:
    opt = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], foreach=True)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sft_step(target: Target, drafter: Drafter, cfg: PlanConfig, cached: bool) -> int:
    """One SFT micro-batch (`train.sft.sft_micro_batch`): online, the target scores the batch first; from the cache, its
    features come from the cache's tensors. Forward, backward, AdamW step."""
    sft = SFTConfig(
        batch_size=cfg.sft_batch,
        anchors_per_seq=cfg.anchors_per_seq,
        loss=cfg.sft_loss,
        labels="greedy" if cached else "text",
        autocast=_autocast(cfg, target),
    )
    n, prompt = cfg.sequence_tokens, cfg.prompt_tokens
    if cached:
        width = len(drafter.spec.target_layer_ids) * target.hidden_size
        empty = lambda *shape, dtype=torch.bfloat16: torch.zeros(shape, dtype=dtype, device=target.device)  # noqa: E731
        items = [
            CachedSequence(
                torch.ones(n, dtype=torch.long), prompt, empty(n, width), empty(n, dtype=torch.long), empty(n, target.hidden_size)
            )
            for _ in range(cfg.sft_batch)
        ]
    else:
        items = [SFTExample("plan", (1,) * prompt, (1,) * (n - prompt))] * cfg.sft_batch
    result = sft_micro_batch(target, drafter, items, sft, torch.Generator().manual_seed(0))
    _train_step(drafter, result.loss_sum / result.weight_sum.clamp_min(1e-9))
    return 0


def replay_step(target: Target, drafter: Drafter, cfg: PlanConfig, segments: int) -> int:
    """One Draft-OPD replay micro-batch (`train.opd.replay`) of `replay_batch` traces, each `segments` rounds long
    with one accepted draft a round: forward, backward, AdamW step."""
    k = drafter.block_size - 1
    traces = []
    for _ in range(cfg.replay_batch):
        trace = RolloutTrace([1] * cfg.prompt_tokens, [1] * cfg.opd_new_tokens)
        step = max(1, cfg.opd_new_tokens // segments)
        trace.anchors = [cfg.prompt_tokens + i * step for i in range(segments)]
        trace.drafts, trace.accepted = [torch.ones(k, dtype=torch.long)] * segments, [min(1, k)] * segments
        trace.proposed, trace.looked_up = [k] * segments, [False] * segments
        trace.target_logp = trace.draft_logp = [torch.zeros(k)] * segments
        traces.append(trace)
    loss_cfg = LossConfig(mode=cfg.loss_mode)
    segs = [make_segments(t, "error", torch.Generator()) for t in traces]
    norms = step_norms(traces, segs, drafter.block_size, loss_cfg)
    result = replay(target, drafter, collate(target, drafter, traces, segs), loss_cfg, _autocast(cfg, target))
    _train_step(drafter, combine_streams(result.acc, result.rej, *norms, loss_cfg))
    return 0
