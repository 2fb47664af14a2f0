"""Pieces shared by the SFT and Draft-OPD trainers: optimizer and schedule, compute counter, metrics file,
atomic checkpoints that resume exactly (weights, optimizer, scheduler, RNG, data position).

An output folder holds one run: `last/` (the checkpoint; `last.tmp`/`last.old` only while a save swaps them)
and `metrics.jsonl`. Training from scratch into a folder that holds a run is refused (RunDirError), resuming
refuses another trainer's run or another drafter shape, and a resume rewinds metrics.jsonl to the checkpoint,
so any kill followed by a resume gives the files and weights of an uninterrupted run. trainer.pt is loaded
with `weights_only=True`: only tensors, numbers, strings and containers, so a planted pickle runs nothing.

Compute is counted in FLOPs with the usual 2*params per token for a forward and 6*params per token for a
forward+backward; the drafter's count includes the target's (frozen) LM head it runs through, since on a
large vocabulary that head dominates the drafter's cost. SFT and Draft-OPD runs are matched on this number.

Under torchrun (`distributed.py`) every rank keeps the same state: `start` joins the process group, rank 0 alone
repairs, writes and rewinds the folder's files (the others wait at a barrier), and a step's `Compute` is summed
over ranks (`add_ranks`), so checkpoints and metrics read as one process's.

A checkpoint belongs to no device and no world size: trainer.pt holds host tensors and is loaded onto the CPU (the
optimizer moves its state to the parameters' device), and config.json records the device type and world size that
wrote it, so a resume elsewhere (GPU -> CPU, 2 processes -> 1) says in one line what changed and continues.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import OptimConfig, resolve_dtype
from ..models.drafter import Drafter, load_drafter, save_drafter
from ..models.target import Target
from . import distributed as ddp
from .tracking import RunInfo, Tracker, open_tracker, write_run_files


def build_optimizer(drafter: Drafter, cfg: OptimConfig, total_steps: int):
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    warmup = min(max(total_steps, 1), max(cfg.min_warmup_steps, int(cfg.warmup_fraction * total_steps)))

    def factor(step: int) -> float:  # linear warm-up, then cosine down to min_lr_ratio
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@contextlib.contextmanager
def train_autocast(name: str, device):
    """The context a drafter's training forward runs in: bf16 autocast when `name` (SFTConfig.autocast) resolves to
    bfloat16 on `device`, else none (float32 throughout); on CUDA, float32 matmuls may use TF32 inside it (training
    only: decoding keeps exact float32, which lossless greedy decoding in float32 needs)."""
    dtype = resolve_dtype(name, str(device)) if name == "auto" else getattr(torch, name)
    kind = torch.device(device).type
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        if kind == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        with torch.autocast(kind, dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


PHASES = ("rollout", "teacher", "train")


@dataclass
class Compute:
    """Running compute of a training run (target forwards at 2*params per token, drafter forwards at 2*params,
    drafter training at 6*params), in total and by phase: "rollout" (Draft-OPD's prefill + verify + drafting),
    "teacher" (target forwards that label or re-verify training data), "train" (drafter forward + backward)."""

    target_tokens: int = 0
    draft_forward_tokens: int = 0
    draft_train_tokens: int = 0
    flops: float = 0.0
    phase_flops: dict[str, float] = field(default_factory=dict)

    def _add(self, flops: float, phase: str) -> None:
        self.flops += flops
        self.phase_flops[phase] = self.phase_flops.get(phase, 0.0) + flops

    def add_target(self, tokens: int, target_params: int, phase: str = "teacher") -> None:
        self.target_tokens += tokens
        self._add(2.0 * target_params * tokens, phase)

    def add_draft_forward(self, tokens: int, draft_params: int, phase: str = "rollout") -> None:
        self.draft_forward_tokens += tokens
        self._add(2.0 * draft_params * tokens, phase)

    def add_draft_train(self, tokens: int, draft_params: int) -> None:
        self.draft_train_tokens += tokens
        self._add(6.0 * draft_params * tokens, "train")

    def copy(self) -> Compute:
        return Compute(**{**asdict(self), "phase_flops": dict(self.phase_flops)})

    def add_ranks(self, start: Compute) -> None:
        """Count every rank's spending since `start` (this rank's count at the step's start), not only this rank's.
        Token counts and FLOPs are whole numbers, so the sum is exact."""
        if ddp.world_size() == 1:
            return
        names = ("target_tokens", "draft_forward_tokens", "draft_train_tokens", "flops")
        local = [getattr(self, n) - getattr(start, n) for n in names] + [
            self.phase_flops.get(p, 0.0) - start.phase_flops.get(p, 0.0) for p in PHASES
        ]
        total = ddp.all_sum(torch.tensor(local + [float(p in self.phase_flops) for p in PHASES], dtype=torch.float64)).tolist()
        for n, spent in zip(names, total):
            setattr(self, n, type(getattr(start, n))(getattr(start, n) + spent))
        for p, spent, seen in zip(PHASES, total[len(names) :], total[len(names) + len(PHASES) :]):
            if seen:
                self.phase_flops[p] = start.phase_flops.get(p, 0.0) + spent

    def metrics(self) -> dict[str, float]:
        out = {f"compute/{k}": v for k, v in asdict(self).items() if k != "phase_flops"}
        return out | {f"compute/flops_{k}": v for k, v in sorted(self.phase_flops.items())}


def param_counts(target: Target, drafter: Drafter) -> tuple[int, int]:
    """(target params, drafter params incl. the shared LM head it computes through)."""
    head = target.model.get_output_embeddings().weight.numel()
    return sum(p.numel() for p in target.model.parameters()), sum(p.numel() for p in drafter.parameters()) + head


class RunDirError(ValueError):
    """An output folder that cannot be used as asked (a run already there, another trainer's or another drafter
    shape's checkpoint, an unreadable checkpoint): one clear line."""


CHECKPOINT_NAMES = ("last", "last.tmp", "last.old")  # the checkpoint and the two names a save passes through
CHECKPOINT_FILES = ("config.json", "model.safetensors", "trainer.pt")  # trainer.pt is written last


def log(message: str) -> None:
    """A line on stderr (from rank 0 only under torchrun)."""
    if ddp.is_main():
        print(f"[draftopd] {message}", file=sys.stderr, flush=True)


class MetricsWriter:
    """Append-only `metrics.jsonl`: one JSON object per step with namespaced keys (`train/loss`, `rollout/tau`, `compute/`,
    `time/`, `memory/`...), each row also sent to the run's tracker (`tracking.py`; none by default). Rank 0 only."""

    def __init__(self, path: Path, tracker: Tracker | None = None):
        self.path, self.tracker = path, tracker or Tracker()
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, metrics: dict) -> None:
        if not ddp.is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        self.tracker.log(metrics, step)

    def close(self) -> None:
        self.tracker.close()

    def rewind(self, step: int) -> None:
        """Keep the rows of steps <= `step` (the checkpoint a run resumes from; rows after it are redone) and
        drop a line torn by a kill; rewritten through a temp file and a rename, so a kill here loses nothing."""
        if not ddp.is_main() or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and row.get("step", 0) <= step:
                keep.append(line + "\n")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(keep))
        tmp.replace(self.path)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def on_host(state):
    """`state` (nested dicts, lists, tuples) with every tensor copied to the CPU: trainer.pt names no device."""
    if isinstance(state, torch.Tensor):
        return state.detach().cpu()
    if isinstance(state, dict):
        return {k: on_host(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(on_host(v) for v in state)
    return state


def save_checkpoint(folder: Path, drafter: Drafter, trainer_state: dict, extra: dict | None = None) -> None:
    """Write `folder` atomically: a complete `folder.tmp` (trainer.pt last, itself renamed into place, so a folder
    holding trainer.pt is complete) is swapped in. A kill at any point leaves a complete checkpoint among
    `folder`, `folder.tmp` and `folder.old`; `recover_checkpoint` finds the newest and finishes the swap."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_drafter(drafter, tmp, extra)
    torch.save(on_host(trainer_state), tmp / "trainer.pt.tmp")
    (tmp / "trainer.pt.tmp").replace(tmp / "trainer.pt")
    swap_in(folder)


def swap_in(folder: Path) -> None:
    """`folder` -> `folder.old`, `folder.tmp` -> `folder`, drop `folder.old`."""
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_step(folder: Path) -> int | None:
    """The step of a complete checkpoint folder (all of CHECKPOINT_FILES), None if it is absent or half written.
    A complete folder whose config.json cannot be read is an error, not skipped: falling back past it would
    silently throw its steps away."""
    if not all((folder / name).is_file() for name in CHECKPOINT_FILES):
        return None
    try:
        return int(json.loads((folder / "config.json").read_text())["step"])
    except (ValueError, KeyError, TypeError) as err:
        raise RunDirError(
            f"corrupt checkpoint {folder}: config.json ({type(err).__name__}); delete that folder or choose another --out"
        ) from None


def recover_checkpoint(out_dir: Path) -> tuple[Path, str] | None:
    """The newest complete checkpoint among `last`, `last.tmp`, `last.old` (highest step, `last` on a tie) and
    the name it was found under; moved to `last` when a kill interrupted a save's swap, so the next save cannot
    delete it. None if there is none."""
    steps = {name: checkpoint_step(out_dir / name) for name in CHECKPOINT_NAMES}
    if steps["last"] is None and (out_dir / "last").exists():  # saves only ever rename a complete folder to `last`
        raise RunDirError(f"{out_dir / 'last'} is not a training checkpoint (needs {', '.join(CHECKPOINT_FILES)}): choose another --out")
    found = [(step, -i, name) for i, (name, step) in enumerate(steps.items()) if step is not None]
    if not found:
        return None
    name = max(found)[2]
    last = out_dir / "last"
    if name == "last.tmp":
        swap_in(last)
    elif name == "last.old" and not last.exists():
        (out_dir / name).rename(last)
    else:
        return out_dir / name, name
    return last, name


def check_fresh(out_dir: Path) -> None:
    """Refuse to start a run from scratch where one exists: its first save would replace the checkpoint and its
    metrics would append to the old run's."""
    metrics = out_dir / "metrics.jsonl"
    held = [n for n in CHECKPOINT_NAMES if (out_dir / n).exists()] + (
        ["metrics.jsonl"] if metrics.exists() and metrics.stat().st_size else []
    )
    if held:
        raise RunDirError(f"{out_dir} already holds a run ({', '.join(held)}): pass --resume to continue it or choose another --out")


def check_resumable(folder: Path, drafter: Drafter, trainer: str) -> None:
    """Refuse a checkpoint written by the other trainer (an SFT run has more steps than a Draft-OPD run asks for,
    so "resuming" it would silently do nothing) or for another drafter shape (a silent load would train another
    model than the flags ask for)."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("trainer") != trainer:
        raise RunDirError(
            f"{folder} is a {config.get('trainer')!r} checkpoint, not {trainer!r}: resume it with its own command or choose another --out"
        )
    want, got = json.loads(json.dumps(asdict(drafter.spec))), config.get("draftopd_spec") or {}
    diff = [f"{k} {got.get(k)} (now {v})" for k, v in want.items() if got.get(k) != v]
    if diff:
        raise RunDirError(
            f"{folder} holds a drafter of another shape: {', '.join(diff)}; resume with the same drafter flags or choose another --out"
        )


def load_trainer_state(path: Path) -> dict:
    """trainer.pt with `weights_only=True` (tensors, numbers, strings, containers: what `TrainerState.save` writes),
    so a planted pickle is refused instead of run. Loaded onto the CPU (`map_location`), wherever it was written:
    the optimizer's `load_state_dict` moves each state tensor to its parameter's device, and the RNG states are host
    tensors, so a run written on a GPU resumes on a CPU host and the other way round."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # an unpickling error (foreign objects), a torn or corrupt file
        raise RunDirError(
            f"refusing trainer state {path}: not a checkpoint of plain tensors and numbers ({type(err).__name__}; "
            "nothing in it was run); delete that folder or choose another --out"
        ) from None


@dataclass
class TrainerState:
    """Everything beside the weights that a resumed run needs: optimizer, schedule, the trainer's RNG
    (anchor sampling), the global RNG, compute spent, optimizer steps taken and data items consumed; plus the
    run's folder, trainer name (checked on resume) and metrics file."""

    trainer: str  # "sft" or "draft-opd", written into config.json
    out_dir: Path
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    compute: Compute
    metrics: MetricsWriter
    step: int = 0
    data_pos: int = 0
    device_type: str = "cpu"  # where this run computes ("cpu", "cuda"), recorded in each checkpoint's config.json

    @staticmethod
    def start(
        trainer: str,
        target: Target,
        drafter: Drafter,
        optim: OptimConfig,
        steps: int,
        seed: int,
        out_dir: Path,
        resume: bool,
        split: tuple[object, str] | None = None,
        run: RunInfo | None = None,
    ) -> TrainerState:
        """Fresh state (refused where a run exists, see `check_fresh`), or with `resume` the state of the newest
        complete checkpoint, weights loaded into `drafter`. metrics.jsonl is rewound to the step started from.
        Under torchrun, first joins the process group; `split = (config, field)` names the count each step shares
        out across ranks, which the world size must divide (`distributed.init`). With `run` (the command's configs
        and tracker), rank 0 then writes run.yaml, command.txt and env.json into `out_dir` and opens the tracker."""
        ddp.init(target.device, split)
        opt, sched = build_optimizer(drafter, optim, steps)
        torch.manual_seed(seed)
        state = TrainerState(
            trainer,
            out_dir,
            opt,
            sched,
            torch.Generator().manual_seed(seed),
            Compute(),
            MetricsWriter(out_dir / "metrics.jsonl"),
            device_type=target.device.type,
        )
        if not resume:
            check_fresh(out_dir)
        elif (found := ddp.main_first(lambda: recover_checkpoint(out_dir))) is None:
            log(f"nothing to resume in {out_dir}: starting from step 0")
        else:
            folder, name = found
            state.restore(folder, target, drafter)
            note = f"; recovered from {name}, a save cut short" if name != folder.name else ""
            log(f"resuming from {folder} (step {state.step}{note})")
            if (moved := placement_note(json.loads((folder / "config.json").read_text()), state.device_type, ddp.world_size())) is not None:
                log(moved)
        state.metrics.rewind(state.step)
        if run is not None and ddp.is_main():
            write_run_files(out_dir, run, target.device, target.dtype)
            state.metrics.tracker = open_tracker(run, out_dir, state.step)
        ddp.same_weights(drafter)
        return state

    def restore(self, folder: Path, target: Target, drafter: Drafter) -> None:
        check_resumable(folder, drafter, self.trainer)
        saved = load_trainer_state(folder / "trainer.pt")
        weights = load_drafter(folder, target).state_dict()
        try:
            self.opt.load_state_dict(saved["optimizer"]), self.sched.load_state_dict(saved["scheduler"])
            self.gen.set_state(saved["anchor_rng"]), set_rng_state(saved["rng"])
            self.compute, self.step, self.data_pos = Compute(**saved["compute"]), saved["step"], saved["data_pos"]
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            first = (str(err).strip().splitlines() or [""])[0]
            raise RunDirError(
                f"trainer state {folder / 'trainer.pt'} does not fit this run ({type(err).__name__}: {first}); "
                "delete that folder or choose another --out"
            ) from None
        drafter.load_state_dict(weights)

    def running(self, steps: int, stop_after: int | None, max_flops: float | None = None) -> bool:
        """Another step? Not past `steps`, nor `stop_after` (a simulated kill), nor `max_flops` of compute."""
        return (
            self.step < steps and (stop_after is None or self.step < stop_after) and (max_flops is None or self.compute.flops < max_flops)
        )

    def save(self, drafter: Drafter) -> None:
        """Rank 0 writes the checkpoint; the others (holding the same state) wait for it."""
        saved = {
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "anchor_rng": self.gen.get_state(),
            "rng": rng_state(),
            "compute": asdict(self.compute),
            "step": self.step,
            "data_pos": self.data_pos,
        }
        if ddp.is_main():
            save_checkpoint(
                self.out_dir / "last",
                drafter,
                saved,
                {
                    "trainer": self.trainer,
                    "step": self.step,
                    "flops": self.compute.flops,
                    "device": self.device_type,
                    "world_size": ddp.world_size(),
                },
            )
        ddp.barrier()


def placement_note(config: dict, device_type: str, world: int) -> str | None:
    """The line a resume prints when its checkpoint (`config`, its config.json) was written on another device type or by
    another number of processes; None when nothing changes or the checkpoint predates the record. Nothing else is
    needed: every rank holds the same state and each step's global batch is split by rank, so any world size that
    divides the batch (`distributed.init`) continues the same run."""
    was_device, was_world = config.get("device"), config.get("world_size")
    if was_device is None or was_world is None or (was_device, was_world) == (device_type, world):
        return None
    procs = lambda n: f"{n} process{'es' if n != 1 else ''}"  # noqa: E731
    same = (
        (
            "every step still trains the same global batch, split across the processes, so the updates are the same up to "
            "float summation order"
        )
        if was_world != world
        else "the same steps follow, equal up to the devices' float rounding"
    )
    return f"resuming a run written on {was_device} by {procs(was_world)} on {device_type} with {procs(world)}: {same}"


def data_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items start..start+count of an endless stream of per-epoch seeded permutations of range(n)."""
    perms: dict[int, list[int]] = {}
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
        out.append(perms[epoch][i])
    return out
