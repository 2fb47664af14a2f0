"""Peak device memory of each flow at real model sizes, measured on a CPU without weights.

Models are built on the `meta` device from their config (shapes, no storage), and the flows' own code runs on them
(`Target.prefill`/`verify`, the drafter, `train.sft.sft_micro_batch`, the Draft-OPD replay, the feature prefill, the
optimizer step) on synthetic inputs of the stated sizes: the parts that depend on token values (acceptance, anchor
sampling) run on the host as usual, or are replaced by their worst case (every verify at the longest context).
`LiveBytes` (a TorchDispatchMode) counts the bytes of every tensor storage an op creates and frees them when the
storage dies, and keeps the peak; weights that exist before a flow starts are its baseline.

Attention is measured as CUDA's memory-efficient kernel keeps it (its output and log-sum-exp, plus the float bias a
boolean mask becomes), not as the meta device's math fallback would (every score materialised): `device_ops`. Meta
tensors have no autocast, so with `autocast=True` `device_ops` does what CUDA's bf16 autocast does to memory: float32
inputs of matmuls, linear layers and attention are cast to bfloat16 copies, which autograd keeps for the
backward pass.
The measurement is of tensors the code asks for; allocator fragmentation, CUDA context and library workspaces (a few
GB on a real GPU) are not in it: `PlanReport` adds a margin for them, and `benchmarks/device_check.py` compares with a
real GPU's peak on a GPU machine.
"""

from __future__ import annotations

import contextlib
import json
import weakref
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from ..config import ConfigError, DrafterConfig
from ..models.drafter import Drafter, DrafterSpec, drafter_for
from ..models.target import Target

CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # published model configs, no weights


class LiveBytes(TorchDispatchMode):
    """Bytes of tensor storages created while active and still alive (`live`), their most at once (`peak`) and the
    largest single one (`largest`), on top of the storages of `existing` tensors (the weights), which count once in
    `live` and are never freed."""

    def __init__(self, existing: list[torch.Tensor] = ()):
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self.live = 0
        for t in existing:
            storage = t.untyped_storage()
            if storage not in self._seen:  # a view of a weight (a transpose in a linear layer) is not new memory
                self._seen[storage] = None
                self.live += storage.nbytes()
        self.peak, self.largest = self.live, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:
            return
        size = storage.nbytes()
        self._seen[storage] = weakref.ref(storage, lambda _ref, size=size: self._free(size))
        self.live += size
        self.peak, self.largest = max(self.peak, self.live), max(self.largest, size)

    def _free(self, size: int) -> None:
        self.live -= size


class _Attention(torch.autograd.Function):
    """What the memory-efficient CUDA kernel allocates: the output, the log-sum-exp it saves for backward, the float
    bias a boolean mask becomes (a float mask, which the project makes in attention's dtype, is used as it is);
    gradients of the inputs' sizes in backward. Values are not computed (meta)."""

    @staticmethod
    def forward(ctx, q, k, v, mask):
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        bias = q.new_empty(mask.shape) if mask is not None and mask.dtype == torch.bool else mask  # a float mask is used as it is
        ctx.save_for_backward(q, k, v, out, lse, *(() if bias is None else (bias,)))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None


@contextlib.contextmanager
def device_ops(autocast: bool = False):
    """What a CUDA device would allocate where the meta device differs: attention as the memory-efficient kernel
    (`_Attention`), bf16 autocast's casts of float32 inputs to linear layers, matmuls and attention (`autocast`), and
    copies to the host made nowhere (they leave the device). Done by patching those functions (not a mode), so that
    a backward pass's recomputation (activation checkpointing) sees them too."""
    low = lambda x: x.to(torch.bfloat16) if autocast and isinstance(x, torch.Tensor) and x.dtype == torch.float32 else x  # noqa: E731
    real = {"linear": F.linear, "matmul": torch.Tensor.__matmul__, "cpu": torch.Tensor.cpu}

    def attention(q, k, v, attn_mask=None, *args, **kwargs):
        return _Attention.apply(low(q), low(k), low(v), attn_mask)

    def linear(x, weight, bias=None):
        return real["linear"](low(x), low(weight), low(bias))

    def matmul(a, b):
        return real["matmul"](low(a), low(b))

    def cpu(t, *args, **kwargs):
        return t if t.is_meta else real["cpu"](t, *args, **kwargs)  # stays a (storage-free) meta tensor

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", attention))
        stack.enter_context(mock.patch.object(torch.Tensor, "cpu", cpu))
        if autocast:
            stack.enter_context(mock.patch.object(F, "linear", linear))
            stack.enter_context(mock.patch.object(torch.Tensor, "__matmul__", matmul))
        yield


@contextlib.contextmanager
def measure(*modules: torch.nn.Module, autocast: bool = False):
    """Count live bytes while the block runs, the `modules`' weights (which exist already) included, as CUDA would
    allocate them (`device_ops`; `autocast`: bf16 autocast of the drafter's training forward)."""
    existing = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    with device_ops(autocast), LiveBytes(existing) as live:
        yield live


def model_config(name_or_path: str | Path) -> dict:
    """A model's config.json as a dict: a name shipped in `draftopd/configs` (qwen3-8b, llama-3.1-8b, qwen3-0.6b), a
    config.json file or a model folder holding one. One ConfigError line when it cannot be read."""
    path = Path(name_or_path)
    shipped = CONFIGS / f"{name_or_path}.json"
    if shipped.is_file():
        path = shipped
    elif path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        names = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.json")))
        raise ConfigError(
            f"--target-config {name_or_path}: cannot read a model config there ({type(err).__name__}); give a "
            f"config.json, a model folder, or one of {names}"
        ) from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ConfigError(f"--target-config {name_or_path}: not a Hugging Face model config (no model_type)")
    return config


def meta_target(config: dict, dtype: torch.dtype = torch.bfloat16, name: str = "meta", device: str = "meta") -> Target:
    """A target of `config`'s shapes on the meta device (no weights), or randomly initialised on another `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype", "transformers_version")}
    try:
        cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    except Exception as err:  # an unknown model type or a config transformers refuses
        raise ConfigError(f"cannot build a model from this config: {type(err).__name__}: {' '.join(str(err).split())[:200]}") from None
    return Target(model, None, name)


def meta_drafter(target: Target, cfg: DrafterConfig) -> Drafter:
    """A drafter of `cfg`'s shape for `target`, on the target's device (meta: no weights; a reduced head takes the first
    rows)."""
    spec = DrafterSpec.resolve(cfg, target)
    with torch.device(target.device):
        drafter = drafter_for(spec, target)
    if spec.draft_vocab_size is not None:
        drafter.refresh_head()
    return drafter


def tensor_bytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's own parameters and buffers (a drafter's shared target embedding/head not counted)."""
    shared = {id(getattr(module, n)) for n in ("embed_weight", "lm_head_weight") if hasattr(module, n)}
    return sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()] if id(t) not in shared)
