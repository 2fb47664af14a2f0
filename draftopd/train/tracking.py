"""Run tracking: where a training run reports its metrics besides metrics.jsonl, and what it records beside its checkpoints.

`--report-to none|tensorboard|wandb` (`REPORT_TO`). A tracker's package is imported only when it is asked for, and
`check_installed` names the package to install before any model loads. TensorBoard writes event files to `OUT/tensorboard`
(a resumed run purges the steps it redoes); Weights & Biases writes `OUT/wandb`, offline unless the user set `WANDB_MODE`
(`wandb sync OUT/wandb/offline-run-*` uploads it later), and a resumed run continues the same W&B run. Only rank 0 reports
under torchrun (`MetricsWriter`). Metric names are namespaced as in metrics.jsonl (`train/`, `rollout/`, `eval/`,
`compute/`, `time/`, `memory/`), which both trackers show as sections.

Beside its checkpoints a run writes (`write_run_files`): `run.yaml`, its resolved configs (`draftopd CMD --config run.yaml`
runs it again, flags given on the command line override the file: `cli.read_run_config`), `command.txt` (the command line)
and `env.json` (package versions, device, dtype, host).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import resource
import secrets
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPORT_TO = ("none", "tensorboard", "wandb")
PACKAGES = ("torch", "transformers", "safetensors", "numpy", "tqdm", "pyyaml", "tensorboard", "wandb", "draftopd")


@dataclass(frozen=True)
class RunInfo:
    """What a command tells its training runs: its name, its resolved configs (run.yaml's sections: a config dataclass,
    or a dict of plain flags, each), its command line (the words after `draftopd`) and the tracker to report to."""

    command: str
    configs: dict[str, Any]
    argv: tuple[str, ...] = ()
    report_to: str = "none"

    def record(self) -> dict:
        """run.yaml's content: the command, then each section as plain YAML values (tuples as lists)."""
        plain = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else dict(v) for k, v in self.configs.items()}
        return {"command": self.command, **json.loads(json.dumps(plain))}


def check_installed(report_to: str) -> None:
    """Refuse an unknown tracker, or one whose package is missing (one line naming what to install)."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to != "none" and not _installed(report_to):
        raise ValueError(f"--report-to {report_to}: the {report_to} package is not installed (pip install {report_to})")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class Tracker:
    """No tracker (`--report-to none`): metrics.jsonl only."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    """Scalars into `folder` (TensorBoard's event files); a run resumed from `resume_step` drops the later steps it redoes."""

    def __init__(self, folder: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)

    def log(self, metrics: dict, step: int) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandB(Tracker):
    """One W&B run under `folder`/wandb, offline unless WANDB_MODE says otherwise; its id is kept in `folder`/wandb/run_id,
    so a resumed run continues it (W&B keeps the first values of the steps a resumed run redoes)."""

    def __init__(self, folder: Path, name: str, config: dict):
        os.environ.setdefault("WANDB_MODE", "offline")
        import wandb

        (folder / "wandb").mkdir(parents=True, exist_ok=True)
        id_file = folder / "wandb" / "run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        id_file.write_text(run_id)
        self.run = wandb.init(project="draftopd", name=name, id=run_id, resume="allow", dir=str(folder), config=config)

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(run: RunInfo | None, folder: Path, resume_step: int = 0) -> Tracker:
    """The tracker `run` asks for, writing under `folder` (the run's output folder); the no-op one without a run."""
    if run is None or run.report_to == "none":
        return Tracker()
    check_installed(run.report_to)
    if run.report_to == "tensorboard":
        return TensorBoard(folder / "tensorboard", resume_step)
    return WandB(folder, f"{folder.parent.name}/{folder.name}", run.record())


def memory_metrics(device: torch.device) -> dict[str, float]:
    """`memory/` metrics of a step: the process's peak resident memory, and on CUDA the device's peak allocated memory
    (both since the process started, in GiB)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB on Linux
    out = {"memory/max_rss_gb": rss / 2**30}
    if device.type == "cuda":
        out["memory/cuda_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def write_run_files(folder: Path, run: RunInfo, device: Any, dtype: Any) -> None:
    """run.yaml, command.txt and env.json into `folder` (each through a temp file and a rename)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    header = f"# draftopd {run.command}: the resolved configs; `draftopd {run.command} --config run.yaml` runs it again (flags override)\n"
    _write(folder / "run.yaml", header + yaml.safe_dump(run.record(), sort_keys=False))
    _write(folder / "command.txt", shlex.join(["draftopd", *run.argv]) + "\n")
    _write(folder / "env.json", json.dumps(environment(device, dtype), indent=2) + "\n")


def environment(device: Any, dtype: Any) -> dict:
    """Where a run ran: package versions (None: not installed), device (and its name on CUDA), dtype, host, time."""
    device = torch.device(device)
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "packages": versions,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "cuda": torch.version.cuda,
        "dtype": str(dtype).removeprefix("torch."),
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
