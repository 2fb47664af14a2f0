"""Pieces shared by the SFT and Draft-OPD trainers: optimizer and schedule, compute counter, metrics file,
atomic checkpoints that resume exactly (weights, optimizer, scheduler, RNG, data position).

Compute is counted in FLOPs with the usual 2*params per token for a forward and 6*params per token for a
forward+backward; the drafter's count includes the target's (frozen) LM head it runs through, since on a
large vocabulary that head dominates the drafter's cost. SFT and Draft-OPD runs are matched on this number.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..config import OptimConfig
from ..models.dflash import DFlashDrafter, load_drafter, save_drafter


def build_optimizer(drafter: DFlashDrafter, cfg: OptimConfig, total_steps: int):
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    warmup = max(1, int(cfg.warmup_fraction * total_steps))

    def factor(step: int) -> float:  # linear warm-up, then cosine down to min_lr_ratio
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class Compute:
    """Running compute of a training run (target forwards + drafter forwards/backwards)."""

    target_tokens: int = 0
    draft_forward_tokens: int = 0
    draft_train_tokens: int = 0
    flops: float = 0.0

    def add_target(self, tokens: int, target_params: int) -> None:
        self.target_tokens += tokens
        self.flops += 2.0 * target_params * tokens

    def add_draft_forward(self, tokens: int, draft_params: int) -> None:
        self.draft_forward_tokens += tokens
        self.flops += 2.0 * draft_params * tokens

    def add_draft_train(self, tokens: int, draft_params: int) -> None:
        self.draft_train_tokens += tokens
        self.flops += 6.0 * draft_params * tokens

    def metrics(self) -> dict[str, float]:
        return {f"compute/{k}": v for k, v in asdict(self).items()}


def param_counts(drafter: DFlashDrafter) -> tuple[int, int]:
    """(target params, drafter params incl. the shared LM head it computes through)."""
    target = sum(p.numel() for p in drafter.target.model.parameters())
    head = drafter.target.model.get_output_embeddings().weight.numel()
    return target, sum(p.numel() for p in drafter.parameters()) + head


class MetricsWriter:
    """Append-only `metrics.jsonl`: one JSON object per step with namespaced keys (`train/loss`, ...)."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, step: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(folder: Path, drafter: DFlashDrafter, trainer_state: dict, extra: dict | None = None) -> None:
    """Write `folder` atomically: a temp folder renamed into place, so a kill never leaves half a checkpoint."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_drafter(drafter, tmp, extra)
    torch.save(trainer_state, tmp / "trainer.pt")
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


@dataclass
class TrainerState:
    """Everything beside the weights that a resumed run needs: optimizer, schedule, the trainer's RNG
    (anchor sampling), the global RNG, compute spent, optimizer steps taken and data items consumed."""

    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    compute: Compute
    step: int = 0
    data_pos: int = 0

    @staticmethod
    def start(drafter: DFlashDrafter, optim: OptimConfig, steps: int, seed: int, out_dir: Path, resume: bool) -> "TrainerState":
        """Fresh state, or the state of `out_dir/last` (weights loaded into `drafter`) when resuming."""
        opt, sched = build_optimizer(drafter, optim, steps)
        torch.manual_seed(seed)
        state = TrainerState(opt, sched, torch.Generator().manual_seed(seed), Compute())
        last = out_dir / "last"
        if resume and (last / "trainer.pt").exists():
            drafter.load_state_dict(load_drafter(last, drafter.target).state_dict())
            saved = torch.load(last / "trainer.pt", weights_only=False)
            opt.load_state_dict(saved["optimizer"]), sched.load_state_dict(saved["scheduler"])
            state.gen.set_state(saved["anchor_rng"]), set_rng_state(saved["rng"])
            state.compute, state.step, state.data_pos = Compute(**saved["compute"]), saved["step"], saved["data_pos"]
        return state

    def save(self, out_dir: Path, drafter: DFlashDrafter, trainer: str) -> None:
        saved = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "anchor_rng": self.gen.get_state(),
                 "rng": rng_state(), "compute": asdict(self.compute), "step": self.step, "data_pos": self.data_pos}
        save_checkpoint(out_dir / "last", drafter, saved, {"trainer": trainer, "step": self.step, "flops": self.compute.flops})


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
