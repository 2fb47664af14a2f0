"""Data-parallel training (`train/distributed.py`): two CPU processes (gloo, torchrun's environment variables) train
the weights one process trains on the same global batches, write one run folder, resume exactly (SFT and Draft-OPD),
continue a run written by another number of processes (2 -> 1 and 1 -> 2, with a note), and refuse a world size that
does not divide the batch.

Tolerance: summing gradients over ranks changes only the float summation order (and each rank pads its half batch
to its own width), so the first step's gradient, taken at equal weights, matches the single process's to `GRAD_ATOL`
(float32, gradients of order 0.1-1). AdamW's first updates are about lr * g / (|g| + eps), which turns a 1e-7 change in a
near-zero gradient entry into a visible change of that weight, so after a few steps the weights agree to `WEIGHT_ATOL`
(2.5% of one step's lr), not bit for bit. Between ranks, and between a DDP run and its own resume, they are equal.
"""

from __future__ import annotations

import json
import os
import random
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from draftopd.config import ConfigError, DecodeConfig, DrafterConfig, OptimConfig, SFTConfig
from draftopd.decode.speculative import autoregressive_generate
from draftopd.models.drafter import load_drafter, new_drafter
from draftopd.models.load import tiny_target
from draftopd.train.opd import OPDConfig, train_opd
from draftopd.train.sft import train_sft

WORLD = 2
GRAD_ATOL = 1e-6
WEIGHT_ATOL = 5e-5
SFT = SFTConfig(
    steps=4,
    batch_size=4,
    grad_accum=2,
    anchors_per_seq=4,
    save_every=2,
    feature_noise=0.1,  # noise drawn alike on every rank
    autocast="float32",
    optim=OptimConfig(lr=2e-3, min_warmup_steps=1),
)  # bf16 rounds differently per shard
OPD = OPDConfig(
    steps=2,
    prompts_per_rollout=4,
    rollouts_per_step=1,
    replay_batch=1,
    rollout=DecodeConfig(max_new_tokens=12),
    optim=OptimConfig(lr=2e-3, min_warmup_steps=1),
)
OPD_RUNS = {
    "opd": OPD,
    "opd-sampled": replace(OPD, rollout=replace(OPD.rollout, temperature=1.0), anchors="random"),
}  # per-prompt seeds; anchors drawn in order
SHAPE = DrafterConfig(block_size=8)


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


def make_target():
    return tiny_target(vocab_size=64, hidden_size=32, num_layers=4, seed=0, sharpness=30.0)


def drafter(target, seed: int = 5):
    return new_drafter(target, SHAPE, seed=seed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, examples: list, prompts: list, out: Path) -> None:
    """One torchrun-launched process: the same environment variables, the trainers' own initialisation."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    target = make_target()
    errors = []
    for train, data, cfg in ((train_sft, examples, replace(SFT, batch_size=3)), (train_opd, prompts, replace(OPD, prompts_per_rollout=3))):
        try:  # refused before the process group is joined: no rank waits for the others
            train(target, drafter(target), data, cfg, out / "odd", progress=False)
        except ConfigError as err:
            errors.append(str(err))
    (out / f"errors{rank}.json").write_text(json.dumps(errors))
    grads = {}
    train_sft(target, drafter(target), examples, SFT, out / "sft", progress=False, on_step=keep_first_grad(grads, "sft"))
    train_sft(target, drafter(target), examples, SFT, out / "sft-killed", progress=False, stop_after=2)
    resumed = drafter(target, seed=99)  # another init: the weights must come from the checkpoint, on every rank
    train_sft(target, resumed, examples, SFT, out / "sft-killed", resume=True, progress=False)
    torch.save(resumed.state_dict(), out / f"resumed{rank}.pt")
    train_sft(target, drafter(target), examples, SFT, out / "sft-2to1", progress=False, stop_after=2)  # the parent resumes it alone
    train_sft(target, drafter(target, seed=99), examples, SFT, out / "sft-1to2", resume=True, progress=False)  # the parent wrote it alone
    weights = {}
    for name, cfg in OPD_RUNS.items():
        train_opd(
            target,
            weights.setdefault(name, drafter(target)),
            prompts,
            cfg,
            out / name,
            progress=False,
            on_step=keep_first_grad(grads, name),
        )
    saving = replace(OPD, save_every=1)
    train_opd(target, drafter(target), prompts, saving, out / "opd-killed", progress=False, stop_after=1)
    train_opd(
        target,
        weights.setdefault("opd-resumed", drafter(target, seed=99)),
        prompts,
        saving,
        out / "opd-killed",
        resume=True,
        progress=False,
    )
    torch.save({"weights": {k: d.state_dict() for k, d in weights.items()}, "grads": grads}, out / f"rank{rank}.pt")


def keep_first_grad(into: dict, name: str):
    """An `on_step` callback keeping the first update's gradient (summed over ranks, clipped) under `name`."""

    def keep(step, drafter, _compute):
        if step == 1:
            into[name] = {n: p.grad.clone() for n, p in drafter.named_parameters()}

    return keep


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """The two-process runs and the single-process references on the same data."""
    target = make_target()
    rng = random.Random(0)
    prompts = [[rng.randrange(60) for _ in range(rng.randint(3, 8))] for _ in range(16)]
    gen = autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=16, stop_at_eos=False))
    examples = [Example(tuple(t.prompt), tuple(t.output)) for t in gen.traces]
    out = tmp_path_factory.mktemp("ddp")
    train_sft(target, drafter(target), examples, SFT, out / "sft-1to2", progress=False, stop_after=2)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # the children's
        mp.spawn(worker, args=(free_port(), examples, prompts, out), nprocs=WORLD, join=True)
    single, ref, grads = out / "single", {}, {}
    train_sft(
        target, ref.setdefault("sft", drafter(target)), examples, SFT, single / "sft", progress=False, on_step=keep_first_grad(grads, "sft")
    )
    for name, cfg in OPD_RUNS.items():
        train_opd(
            target, ref.setdefault(name, drafter(target)), prompts, cfg, single / name, progress=False, on_step=keep_first_grad(grads, name)
        )
    return target, out, single, {**ref, "grads": grads, "examples": examples}


def rows(path: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k != "time" and not k.startswith(("time/", "memory/"))}
        for line in path.read_text().splitlines()
    ]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("trainer", ["sft", *OPD_RUNS])
def test_two_processes_train_the_single_process_weights(ddp_runs, trainer):
    target, out, single, ref = ddp_runs
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    for r in ranks:
        assert max_diff(r["grads"][trainer], ref["grads"][trainer]) <= GRAD_ATOL
    written = load_drafter(out / trainer / "last", target).state_dict()
    assert max_diff(written, ref[trainer].state_dict()) <= WEIGHT_ATOL
    if trainer != "sft":  # every rank ends with the weights rank 0 wrote
        assert all(max_diff(r["weights"][trainer], written) == 0 for r in ranks)
    assert not torch.equal(written["fc.weight"], drafter(target).state_dict()["fc.weight"])  # it did train
    ddp_rows, single_rows = rows(out / trainer / "metrics.jsonl"), rows(single / trainer / "metrics.jsonl")
    assert [r["step"] for r in ddp_rows] == list(range(1, (SFT if trainer == "sft" else OPD).steps + 1)) and len(single_rows) == len(
        ddp_rows
    )
    for a, b in zip(ddp_rows, single_rows):  # metrics are the whole batch's, not rank 0's half
        assert a.keys() == b.keys()
        assert all(a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6) for k in a), (a, b)
    assert sorted(p.name for p in (out / trainer).iterdir()) == ["last", "metrics.jsonl"]


def test_resume_under_ddp_continues_exactly(ddp_runs):
    target, out, _, _ = ddp_runs
    straight = load_drafter(out / "sft" / "last", target).state_dict()
    for r in range(WORLD):
        resumed = torch.load(out / f"resumed{r}.pt")
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert rows(out / "sft-killed" / "metrics.jsonl") == rows(out / "sft" / "metrics.jsonl")
    straight = load_drafter(out / "opd" / "last", target).state_dict()  # Draft-OPD: killed after its first step
    for r in range(WORLD):
        resumed = torch.load(out / f"rank{r}.pt")["weights"]["opd-resumed"]
        assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert rows(out / "opd-killed" / "metrics.jsonl") == rows(out / "opd" / "metrics.jsonl")


def test_a_two_process_run_resumes_in_one_process_and_the_other_way_round(ddp_runs, capsys):
    """Every rank holds the whole state and each step's global batch is split by rank, so another world size continues
    the same run: weights close to the uninterrupted single process's (as two processes are), and a note says so."""
    target, out, _, ref = ddp_runs
    capsys.readouterr()
    resumed = drafter(target, seed=99)
    train_sft(target, resumed, ref["examples"], SFT, out / "sft-2to1", resume=True, progress=False)
    assert (
        "resuming a run written on cpu by 2 processes on cpu with 1 process: every step still trains the same global batch"
        in capsys.readouterr().err
    )
    assert max_diff(resumed.state_dict(), ref["sft"].state_dict()) <= WEIGHT_ATOL
    assert max_diff(load_drafter(out / "sft-1to2" / "last", target).state_dict(), ref["sft"].state_dict()) <= WEIGHT_ATOL
    assert json.loads((out / "sft-1to2" / "last" / "config.json").read_text())["world_size"] == WORLD
    assert [r["step"] for r in rows(out / "sft-2to1" / "metrics.jsonl")] == list(range(1, SFT.steps + 1))


def test_world_size_that_does_not_divide_the_batch_is_one_line_on_every_rank(ddp_runs):
    _, out, _, _ = ddp_runs
    for r in range(WORLD):
        sft_error, opd_error = json.loads((out / f"errors{r}.json").read_text())
        assert (
            sft_error
            == "--batch-size 3 is not divisible by the 2 training processes (torchrun --nproc-per-node): each takes an equal share of every batch"
        )
        assert opd_error.startswith("--prompts-per-rollout 3 is not divisible by the 2 training processes")
    assert not (out / "odd").exists()
