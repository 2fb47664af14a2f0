"""Data-parallel work across processes: `torchrun --nproc-per-node N -m draftopd.cli sft|opd|regenerate|features|eval ...`.

Choices:
- Data parallelism with a full drafter per rank (DDP), not FSDP2: a drafter has 5-15M parameters, so its weights and
  AdamW state fit on every device many times over, and the frozen target is replicated too. Sharding them (FSDP2's
  `fully_shard` on the drafter's layers, applied in `TrainerState.start` before the optimizer is built) would pay
  off only for far larger drafters; it is not built.
- Each rank takes a contiguous, equal share of every batch (`shard`): SFT the step's `batch_size` examples, Draft-OPD
  the step's prompts (each rank rolls out and replays its own). A world size that does not divide that count is a
  `ConfigError`, raised on every rank before any work.
- Gradients are summed by one all-reduce after the step's backward passes (`sum_grads`) instead of by wrapping
  the drafter in `DistributedDataParallel`: the trainers drive the drafter through several methods, not one
  `forward`, and a Draft-OPD rank runs as many replay micro-batches as it kept traces (possibly none), so the
  number of backward passes differs between ranks. Every rank normalises its loss by the step's *global* normaliser
  (an `all_sum`), so the summed gradient is the single process's on the same global batch (up to float summation
  order), with no 1/world-size rescale; a parameter no rank gave a gradient keeps none, as in one process.
- Every rank holds identical weights, optimizer state and RNGs (each draws the whole step's random anchors and keeps
  its own rows), so rank 0 alone writes checkpoints and metrics.jsonl while the others wait at a barrier, and a
  resume loads the same checkpoint on every rank. An `on_step` callback runs on every rank.
- Equal to one process up to float rounding: in float32 a two-process run's weights match a single process's to
  about 1e-6 (`tests/test_ddp.py`). With a bfloat16 target a rank's half batch is padded and rounded differently
  from the whole batch, so rollouts, and the runs, drift further apart (close, not equal).
- Data commands split the work, not a batch: `regenerate` and `eval` give each rank a contiguous `share` of the prompts
  (any world size; rank 0 merges the parts, or builds the report from every rank's per-prompt stats, in one process's
  order), `features` gives shard i of the deterministic plan to rank i % world size. Their outputs equal one
  process's: records are seeded per record, shards are computed alone.
- Backend nccl for a CUDA target (one GPU per rank: `config.resolve_device` maps `auto`/`cuda` to `cuda:LOCAL_RANK`
  under torchrun and refuses an explicit `cuda:N`, which would put every rank on one GPU), gloo on CPU. The group comes from torchrun's environment (WORLD_SIZE, RANK, MASTER_ADDR,
  MASTER_PORT) or is one the caller already initialised. With one process every helper here is a no-op.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..config import ConfigError, flag

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device, split: tuple[object, str] | None = None) -> None:
    """Join the process group when launched as several processes; first check that the world size divides the
    count `split = (config, field)` each step shares out (one error line on every rank)."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if split is not None and getattr(*split) % world:
        cfg, name = split
        raise ConfigError(
            f"{flag(cfg, name)} {getattr(cfg, name)} is not divisible by the {world} training processes "
            "(torchrun --nproc-per-node): each takes an equal share of every batch"
        )
    if world == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    atexit.register(dist.destroy_process_group)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard(n: int) -> slice:
    """This rank's rows of a batch of `n` (contiguous, n / world_size of them)."""
    size = n // world_size()
    return slice(rank() * size, (rank() + 1) * size)


def share(n: int) -> slice:
    """This rank's contiguous part of `n` items that need not split evenly (regeneration prompts, evaluation prompts):
    rank r takes items r*n//W .. (r+1)*n//W - 1, so the ranks' parts, in rank order, are the items in order."""
    return slice(rank() * n // world_size(), (rank() + 1) * n // world_size())


def all_gather(obj: T) -> list[T]:
    """Every rank's `obj` (any picklable value; keep tensors out of it or on the host), in rank order."""
    if world_size() == 1:
        return [obj]
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def all_sum(x: T) -> T:
    """The sum over ranks of a float or a tensor (a new tensor, on x's device)."""
    if world_size() == 1:
        return x
    if isinstance(x, Tensor):
        out = x.detach().to(_device(), copy=True)
        dist.all_reduce(out)
        return out.to(x.device)
    out = torch.tensor([float(x)], dtype=torch.float64, device=_device())
    dist.all_reduce(out)
    return out.item()


def sum_grads(module: nn.Module) -> None:
    """Replace each parameter's gradient by the sum over ranks (a rank that gave none adds zeros; a parameter that
    no rank gave a gradient keeps None, so AdamW skips it as in one process)."""
    if world_size() == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    has = all_sum(torch.tensor([p.grad is not None for p in params], dtype=torch.long))
    params = [p for p, h in zip(params, has.tolist()) if h]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params]).to(_device())
    dist.all_reduce(flat)
    for p, g in zip(params, flat.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def same_weights(module: nn.Module) -> None:
    """Copy rank 0's parameters to every rank (as DDP does when it wraps a model)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in module.parameters():
            data = p.data.to(_device())
            dist.broadcast(data, 0)
            p.data.copy_(data)


def gather_shards(shards: list[list]) -> tuple[list, list[int]]:
    """Every rank's items of each batch in the single process's order (batch by batch, ranks in order within a
    batch), and the indices of this rank's own among them. `shards[j]` is this rank's share of batch j."""
    if world_size() == 1:
        flat = [x for s in shards for x in s]
        return flat, list(range(len(flat)))
    everyone: list = [None] * world_size()
    dist.all_gather_object(everyone, shards)
    flat, own = [], []
    for j in range(len(shards)):
        for r, theirs in enumerate(everyone):
            if r == rank():
                own += range(len(flat), len(flat) + len(theirs[j]))
            flat += theirs[j]
    return flat, own


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0, then (after a barrier) on the others: for a step that may repair files the others then read.
    Rank 0 reaches the barrier even when `fn` raises, so the others run `fn` too and raise the same error."""
    if world_size() == 1:
        return fn()
    if is_main():
        try:
            return fn()
        finally:
            dist.barrier()
    dist.barrier()
    return fn()
