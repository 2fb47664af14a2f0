"""A CPU tensor that says it is on CUDA: proves CUDA code paths on a machine without a GPU.

`FakeCuda()` is a context manager. Inside it, `FakeCudaTensor` wraps a CPU tensor and reports `cuda:0` to Python
(`.device`, `.is_cuda`), while the C++ side still sees a CPU tensor and computes on it. Every op runs through
`__torch_dispatch__`, which does what CUDA would refuse to do and records what CUDA would make the host wait for:

- **device mixes**: an op whose tensor arguments are both fake-CUDA and CPU tensors of one or more dimensions (a
  0-dim CPU tensor is a scalar CUDA kernels take by value, so it passes). CUDA raises; so does this (`DeviceMixError`),
  naming the op, or, with `strict=False`, records it in `mixes` and goes on (to find every site in one run).
  CPU index tensors in indexing (`x[idx]`, `x[idx] = v`) are what CUDA accepts and copies over: counted as h2d;
- **generators of the other device type**: a random op on fake-CUDA tensors with a CPU generator, or a CPU op with a
  generator made for CUDA (`torch.Generator(device="cuda")` gives a CPU generator that says it is CUDA's);
- **host syncs** (`syncs`, by kind): `.item()`, `int()`/`bool()`/`float()` of a tensor, `.tolist()`, `.cpu()`/`.to("cpu")`,
  ops whose output size depends on the data (`nonzero`, boolean-mask indexing, `masked_select`, `unique`,
  `repeat_interleave` without `output_size`), `torch.cuda.synchronize` and CUDA event waits;
- **host-to-device copies** (`h2d`): tensors made on the device from host data or moved there (`torch.tensor(...,
  device="cuda")`, `.to("cuda")`, CPU indices). A copy from pageable host memory also waits for the stream.

Factories asked for a CUDA device (`torch.arange(n, device=x.device)`, `torch.zeros(..., device="cuda")`) are made
on the CPU and wrapped. `torch.cuda.is_available()` is True inside, `torch.cuda.synchronize`, `Event`, the memory
statistics and `set_device` are stand-ins, so code that asks for CUDA takes its CUDA branch. `to_fake_cuda(module)`
moves a module's parameters and buffers onto the fake device (shared tensors stay shared).

What it does not prove: kernels, memory, speed, numerics of real CUDA kernels (bf16 matmuls, TF32), nccl. Those
need a GPU: `benchmarks/device_check.py` runs the same flows (`check/flows.py`) on one.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
_RealGenerator = torch.Generator
aten = torch.ops.aten

# ops whose output shape depends on tensor values: on CUDA the host waits for the device to learn the size
_DATA_DEPENDENT = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten._local_scalar_dense.default,
    aten.equal.default,
}
_INDEXING = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
_COPIES = {aten.copy_.default}


class DeviceMixError(RuntimeError):
    """An op CUDA would refuse: tensors on two devices, or a generator of the other device type."""


@dataclass
class Record:
    """What a `FakeCuda` context saw: device mixes (with strict=False), host syncs and host-to-device copies by kind,
    and (`FakeCuda(sites=True)`) by the project's line that caused them (`file:line function`)."""

    mixes: list[str] = field(default_factory=list)
    syncs: Counter = field(default_factory=Counter)
    h2d: Counter = field(default_factory=Counter)
    sync_sites: Counter = field(default_factory=Counter)
    h2d_sites: Counter = field(default_factory=Counter)

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    @property
    def total_h2d(self) -> int:
        return sum(self.h2d.values())

    def reset(self) -> None:
        self.mixes.clear(), self.syncs.clear(), self.h2d.clear(), self.sync_sites.clear(), self.h2d_sites.clear()


_ACTIVE: list[FakeCuda] = []


def _site() -> str:
    """The innermost frame of the project's own code (not torch's, not this file's) on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if "draftopd" in name and not name.endswith("fake_cuda.py"):
            return f"{name.split('draftopd/')[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def _problem(message: str) -> None:
    ctx = _ACTIVE[-1] if _ACTIVE else None
    if ctx is None or ctx.strict:
        raise DeviceMixError(message)
    ctx.record.mixes.append(f"{message} ({_site()})")


def _sync(kind: str) -> None:
    if _ACTIVE:
        _ACTIVE[-1].record.syncs[kind] += 1
        if _ACTIVE[-1].sites:
            _ACTIVE[-1].record.sync_sites[_site()] += 1


def _h2d(kind: str) -> None:
    if _ACTIVE:
        _ACTIVE[-1].record.h2d[kind] += 1
        if _ACTIVE[-1].sites:
            _ACTIVE[-1].record.h2d_sites[_site()] += 1


def _shape(t: torch.Tensor) -> str:
    return "x".join(map(str, t.shape)) or "scalar"


class FakeCudaTensor(torch.Tensor):
    """A CPU tensor (`inner`) that reports `cuda:0` (see the module docstring)."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        if isinstance(inner, FakeCudaTensor):
            return inner
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.size(),
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            device=inner.device,
            layout=inner.layout,
            requires_grad=inner.requires_grad,
        )
        out.inner = inner
        return out

    def __repr__(self) -> str:
        return f"FakeCudaTensor({self.inner!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return CUDA
        if func == torch.Tensor.is_cuda.__get__:
            return True
        if func == torch.Tensor.is_cpu.__get__:
            return False
        if func in (torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__):
            _sync(func.__name__)
            return func(args[0].inner, *args[1:], **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return _move(func, args, kwargs)
        if func is torch.Tensor.data_ptr:
            return args[0].inner.data_ptr()
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if not isinstance(t, FakeCudaTensor) and t.dim() > 0]
        if host:
            if func in _INDEXING:
                _h2d(f"{func} host index")
            elif func in _COPIES:
                if isinstance(args[0], FakeCudaTensor):
                    _h2d("copy_ from host")
                else:
                    _sync("copy_ to host")
            else:
                _problem(f"device mix in {func}: cuda tensors with cpu tensors of shape {', '.join(_shape(t) for t in host)}")
        if func in _DATA_DEPENDENT:
            _sync(str(func))
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            _sync(str(func))
        elif func is aten.index.Tensor and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            _sync("boolean-mask indexing")
        unwrap = lambda x: x.inner if isinstance(x, FakeCudaTensor) else x  # noqa: E731
        out = func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))
        wrapped = tree_map(lambda x: FakeCudaTensor(x) if isinstance(x, torch.Tensor) else x, out)
        return return_and_correct_aliasing(func, args, kwargs, wrapped)


def _to_args(args, kwargs) -> tuple[torch.device | None, torch.dtype | None, dict]:
    device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
    extra = {k: v for k, v in kwargs.items() if k == "copy"}
    if memory_format is not None:
        extra["memory_format"] = memory_format
    return device, dtype, extra


def _move(func, args, kwargs):
    """`.to` / `.cuda()` / `.cpu()`: onto the fake device (an h2d copy), back to the host (a sync), or a plain `.to`."""
    t = args[0]
    if func is torch.Tensor.cuda:
        device, dtype, extra = CUDA, None, {}
    elif func is torch.Tensor.cpu:
        device, dtype, extra = torch.device("cpu"), None, {}
    else:
        device, dtype, extra = _to_args(args[1:], kwargs)
    fake = isinstance(t, FakeCudaTensor)
    with torch._C.DisableTorchFunctionSubclass():
        cast = t if dtype is None else torch.Tensor.to(t, dtype, **extra)
        if device is None or (device.type == "cuda") == fake:
            return cast
        if fake:  # device -> host: the host waits for the device
            _sync("to cpu")
            inner = cast.inner
            return inner.clone() if inner is t.inner else inner
    _h2d("to cuda")
    moved = cast.detach().clone() if cast is t else cast.detach()
    return FakeCudaTensor(moved).requires_grad_(t.requires_grad)


def _is_cuda(device: Any) -> bool:
    return device is not None and not isinstance(device, int) and torch.device(device).type == "cuda"


def _wrap_outputs(out):
    return tree_map(lambda x: FakeCudaTensor(x) if isinstance(x, torch.Tensor) and not isinstance(x, FakeCudaTensor) else x, out)


class _Mode(TorchFunctionMode):
    """Factories asked for CUDA run on the CPU and come back wrapped; random factories check their generator."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.cpu):
            return _move(func, args, kwargs)
        if func is torch._C._nn._parse_to:  # parses `.to` arguments (nn.Module.to): no tensor is made
            return func(*args, **kwargs)
        device = kwargs.get("device")
        generator = kwargs.get("generator")
        on_device = _is_cuda(device) or any(isinstance(a, FakeCudaTensor) for a in tree_flatten((args, kwargs))[0])
        if generator is not None and getattr(generator, "fake_cuda", False) != on_device:
            _problem(
                f"{getattr(func, '__name__', func)}: a {'CUDA' if not on_device else 'CPU'} generator for "
                f"{'CPU' if not on_device else 'CUDA'} tensors"
            )
        if _is_cuda(device):
            if func in (torch.tensor, torch.as_tensor):
                _h2d(f"torch.{func.__name__}")
            return _wrap_outputs(func(*args, **{**kwargs, "device": "cpu"}))
        return func(*args, **kwargs)


class FakeCudaGenerator(_RealGenerator):
    """`torch.Generator(device="cuda")` inside `FakeCuda`: a CPU generator that says it belongs to CUDA."""

    fake_cuda = True

    def __new__(cls, device: Any = "cpu"):
        if not _is_cuda(device):
            return _RealGenerator(device)
        return super().__new__(cls, "cpu")

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA


class _Event:
    """`torch.cuda.Event` stand-in: records host time; waiting on it is a sync."""

    def __init__(self, enable_timing: bool = False, **_):
        self.t = None

    def record(self, stream=None) -> None:
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        _sync("event.synchronize")

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _Event) -> float:
        return (end.t - self.t) * 1000.0


_real_compatible = torch._has_compatible_shallow_copy_type
_real_group = torch._C._group_tensors_by_device_and_dtype


def _group(tensorlistlist, with_indices: bool = False):
    """torch's foreach grouping (optimizers, gradient clipping) keys groups by the C++ device, the CPU here: key the
    fake tensors' groups by CUDA, as on a GPU, so the code moves nothing to the host."""
    groups = _real_group(tensorlistlist, with_indices)
    out = {}
    for (device, dtype), value in groups.items():
        first = next((t for lst in value[0] for t in lst if t is not None), None)
        out[(CUDA if isinstance(first, FakeCudaTensor) else device, dtype)] = value
    return out


def _compatible(input: torch.Tensor, from_: torch.Tensor) -> bool:  # noqa: A002 (torch's own parameter names)
    return isinstance(input, FakeCudaTensor) == isinstance(from_, FakeCudaTensor) and _real_compatible(input, from_)


class FakeCuda(contextlib.AbstractContextManager):
    """Run code as if on one CUDA device (module docstring). `record` holds what it saw; `strict` raises on a mix."""

    def __init__(self, strict: bool = True, sites: bool = False):
        self.strict, self.sites = strict, sites
        self.record = Record()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> FakeCuda:
        patches = {
            "torch.Generator": FakeCudaGenerator,
            "torch.cuda.is_available": lambda: True,
            "torch.cuda.device_count": lambda: 1,
            "torch.cuda.current_device": lambda: 0,
            "torch.cuda.set_device": lambda device: None,
            "torch.cuda.synchronize": lambda device=None: _sync("cuda.synchronize"),
            "torch.cuda.Event": _Event,
            "torch.cuda.is_bf16_supported": lambda *a, **k: True,
            "torch.cuda.max_memory_allocated": lambda device=None: 0,
            "torch.cuda.memory_allocated": lambda device=None: 0,
            "torch.cuda.reset_peak_memory_stats": lambda device=None: None,
            "torch.cuda.get_device_name": lambda device=None: "fake-cuda",
            "torch.cuda.empty_cache": lambda: None,
            # nn.Module.to would set `param.data` to the fake tensor (which drops the wrapper): make it swap instead
            "torch._has_compatible_shallow_copy_type": _compatible,
            "torch._C._group_tensors_by_device_and_dtype": _group,
        }
        for target, value in patches.items():
            self._stack.enter_context(mock.patch(target, value))
        self._stack.enter_context(_Mode())
        _ACTIVE.append(self)
        self._stack.callback(_ACTIVE.pop)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    @contextlib.contextmanager
    def count(self):
        """Reset the counters, run the block, keep what it did (`with fake.count(): ...; fake.record.syncs`)."""
        self.record.reset()
        yield self.record


def to_fake_cuda(module: torch.nn.Module) -> torch.nn.Module:
    """Move `module`'s parameters and buffers onto the fake device in place (shared tensors stay shared)."""
    memo: dict[int, torch.Tensor] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and not isinstance(p, FakeCudaTensor):
                if id(p) not in memo:
                    memo[id(p)] = torch.nn.Parameter(FakeCudaTensor(p.data), p.requires_grad)
                mod._parameters[name] = memo[id(p)]
        for name, b in list(mod._buffers.items()):
            if b is not None and not isinstance(b, FakeCudaTensor):
                mod._buffers[name] = memo.setdefault(id(b), FakeCudaTensor(b))
    return module
