"""Run folders: kills at any point resume to the uninterrupted run's weights, optimizer and metrics bit for bit;
planted pickles are refused unrun; a folder holding a run is never overwritten or resumed by the wrong trainer
or drafter shape; a run resumes on another device (a fake CUDA one here) to the same weights."""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from draftopd.check.fake_cuda import FakeCuda, to_fake_cuda
from draftopd.config import DecodeConfig, DrafterConfig, OptimConfig, SFTConfig
from draftopd.decode.speculative import autoregressive_generate
from draftopd.models.drafter import new_drafter
from draftopd.models.load import tiny_target
from draftopd.train.common import RunDirError
from draftopd.train.opd import OPDConfig, train_opd
from draftopd.train.sft import train_sft

SFT = SFTConfig(steps=6, batch_size=4, anchors_per_seq=4, save_every=2, optim=OptimConfig(lr=2e-3))
OPD = OPDConfig(
    steps=4,
    prompts_per_rollout=2,
    rollouts_per_step=1,
    replay_batch=2,
    rollout=DecodeConfig(max_new_tokens=12),
    save_every=2,
    optim=OptimConfig(lr=2e-3),
)


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


@pytest.fixture(scope="module")
def setup(one_thread):
    target = tiny_target(vocab_size=64, hidden_size=32, num_layers=4, seed=0, sharpness=30.0)
    rng = random.Random(0)
    prompts = [[rng.randrange(60) for _ in range(rng.randint(3, 8))] for _ in range(16)]
    gen = autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=16, stop_at_eos=False))
    return target, [Example(tuple(t.prompt), tuple(t.output)) for t in gen.traces], prompts


def sft(setup, out: Path, cfg=SFT, drafter_cfg=DrafterConfig(block_size=8), **kw):
    """One `draftopd sft` invocation: a fresh process builds the same seeded drafter, then trains (or resumes)."""
    drafter = new_drafter(setup[0], drafter_cfg, seed=5)
    train_sft(setup[0], drafter, setup[1], cfg, out, progress=False, **kw)
    return drafter


def opd(setup, out: Path, drafter_cfg=DrafterConfig(block_size=8), **kw):
    drafter = new_drafter(setup[0], drafter_cfg, seed=5)
    train_opd(setup[0], drafter, setup[2], OPD, out, progress=False, **kw)
    return drafter


def metric_rows(out: Path) -> list[dict]:
    """metrics.jsonl without the fields of the machine, not the run: wall clock (`time`, `time/*`) and memory (`memory/*`)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(("time/", "memory/"))} for r in rows]


def assert_same_run(drafter, out: Path, ref_drafter, ref: Path) -> None:
    """Bit-identical weights, trainer state (optimizer, scheduler, RNGs, compute, data position) and metrics;
    nothing left over from an interrupted save."""
    for (name, a), b in zip(ref_drafter.state_dict().items(), drafter.state_dict().values()):
        assert torch.equal(a, b), name
    load = lambda p: torch.load(p / "last" / "trainer.pt", weights_only=True)  # noqa: E731
    assert_equal_nested(load(out), load(ref))
    assert metric_rows(out) == metric_rows(ref)
    assert sorted(p.name for p in out.iterdir()) == ["last", "metrics.jsonl"]


def assert_equal_nested(a, b, path="trainer.pt") -> None:
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_equal_nested(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def trained(target, drafter, out: Path, steps: int):
    """An uninterrupted reference run that really moved the weights and logged every step."""
    assert not torch.equal(drafter.fc.weight, new_drafter(target, DrafterConfig(block_size=8), seed=5).fc.weight)
    assert [r["step"] for r in metric_rows(out)] == list(range(1, steps + 1))
    return drafter, out


@pytest.fixture(scope="module")
def straight_sft(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-straight")
    return trained(setup[0], sft(setup, out), out, SFT.steps)


@pytest.fixture(scope="module")
def straight_opd(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("opd-straight")
    return trained(setup[0], opd(setup, out), out, OPD.steps)


@pytest.mark.parametrize("kills", [[1], [3], [4], [2, 5]], ids=str)
def test_sft_killed_and_resumed_equals_straight_run(setup, straight_sft, tmp_path, kills):
    """Kills before the first checkpoint, between checkpoints, right at one, and twice in one run."""
    for i, k in enumerate(kills):
        sft(setup, tmp_path, resume=i > 0, stop_after=k)
    assert_same_run(sft(setup, tmp_path, resume=True), tmp_path, *straight_sft)


@pytest.mark.parametrize("kills", [[1], [3], [2, 3]], ids=str)
def test_opd_killed_and_resumed_equals_straight_run(setup, straight_opd, tmp_path, kills):
    for i, k in enumerate(kills):
        opd(setup, tmp_path, resume=i > 0, stop_after=k)
    assert_same_run(opd(setup, tmp_path, resume=True), tmp_path, *straight_opd)


def kill_mid_save(out: Path, state: str, step2: Path) -> None:
    """Rebuild the folder a kill leaves during the save of step 4 (`last` holds step 4, `step2` a copy of step 2)."""
    last, tmp, old = out / "last", out / "last.tmp", out / "last.old"
    if state == "before-renames":  # tmp complete, last still the previous checkpoint
        last.rename(tmp), shutil.copytree(step2, last)
    elif state == "between-renames":  # last -> last.old done, last.tmp -> last not yet
        last.rename(tmp), shutil.copytree(step2, old)
    elif state == "tmp-half-written":  # the next save was writing last.tmp: trainer.pt torn
        shutil.copytree(last, tmp), (tmp / "trainer.pt").unlink(), (tmp / "trainer.pt.tmp").write_bytes(b"PK\x03torn")
    elif state == "only-old":  # last.old complete, nothing else
        last.rename(old)


@pytest.mark.parametrize("state", ["before-renames", "between-renames", "tmp-half-written", "only-old"])
def test_kill_during_a_save_resumes_from_the_newest_complete_checkpoint(setup, straight_sft, tmp_path, capsys, state):
    out = tmp_path / "run"
    sft(setup, out, stop_after=2)
    shutil.copytree(out / "last", tmp_path / "step2")
    sft(setup, out, resume=True, stop_after=4 if "renames" in state else 5)
    kill_mid_save(out, state, tmp_path / "step2")
    capsys.readouterr()
    drafter = sft(setup, out, resume=True)
    assert f"[draftopd] resuming from {out / 'last'} (step 4" in capsys.readouterr().err
    assert_same_run(drafter, out, *straight_sft)


def test_resume_with_nothing_there_says_so(setup, tmp_path, capsys):
    sft(setup, tmp_path, cfg=SFTConfig(steps=1, batch_size=2, anchors_per_seq=2), resume=True)
    assert f"nothing to resume in {tmp_path}: starting from step 0" in capsys.readouterr().err


def test_resume_refuses_a_last_folder_that_is_not_a_checkpoint(setup, tmp_path):
    """A `last/` without trainer.pt (say, an exported drafter) is never a save's leftover: starting over would delete it."""
    sft(setup, tmp_path, cfg=SFTConfig(steps=1, batch_size=2, anchors_per_seq=2))
    (tmp_path / "last" / "trainer.pt").unlink()
    with pytest.raises(RunDirError, match="not a training checkpoint"):
        sft(setup, tmp_path, resume=True)
    assert (tmp_path / "last" / "model.safetensors").exists()


class Planted:
    """A pickle that creates a file when unpickled (any code would run the same way)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_planted_trainer_pickle_is_refused_and_not_run(setup, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    sft(setup, out, stop_after=2)
    saved = torch.load(out / "last" / "trainer.pt", weights_only=True)
    torch.save({**saved, "optimizer": Planted(marker)}, out / "last" / "trainer.pt")
    with pytest.raises(RunDirError) as err:
        sft(setup, out, resume=True)
    assert not marker.exists()
    assert "\n" not in str(err.value) and "trainer.pt" in str(err.value) and "nothing in it was run" in str(err.value)


@pytest.mark.parametrize("held", ["last", "last.tmp", "last.old", "metrics.jsonl"])
def test_fresh_run_refuses_a_folder_holding_a_run(setup, tmp_path, held):
    if held == "metrics.jsonl":
        (tmp_path / held).write_text('{"step": 1}\n')
    else:
        (tmp_path / held).mkdir()
        (tmp_path / held / "config.json").write_text("{}")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for train in (sft, opd):
        with pytest.raises(RunDirError, match=r"already holds a run .*pass --resume .*choose another --out"):
            train(setup, tmp_path)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_fresh_run_accepts_an_empty_folder_and_empty_metrics(setup, tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    sft(setup, tmp_path, cfg=SFTConfig(steps=1, batch_size=2, anchors_per_seq=2))
    assert len(metric_rows(tmp_path)) == 1


def test_resume_refuses_the_other_trainers_run(setup, straight_sft, straight_opd, tmp_path):
    sft_dir, opd_dir = shutil.copytree(straight_sft[1], tmp_path / "sft"), shutil.copytree(straight_opd[1], tmp_path / "opd")
    with pytest.raises(RunDirError, match="'sft' checkpoint, not 'draft-opd'"):
        opd(setup, sft_dir, resume=True)
    with pytest.raises(RunDirError, match="'draft-opd' checkpoint, not 'sft'"):
        sft(setup, opd_dir, resume=True)


@pytest.mark.parametrize("shape", [{"block_size": 4}, {"target_layer_ids": (1,)}, {"num_layers": 2}], ids=str)
def test_resume_refuses_another_drafter_shape(setup, straight_sft, tmp_path, shape):
    name, out = next(iter(shape)), shutil.copytree(straight_sft[1], tmp_path / "run")
    with pytest.raises(RunDirError, match=f"another shape: .*{name}"):
        sft(setup, out, drafter_cfg=DrafterConfig(**{"block_size": 8, **shape}), resume=True)


# ---- another device: trainer.pt is host tensors loaded onto the CPU; config.json records where the run was written
ON_DEVICE = SFTConfig(
    steps=4, batch_size=4, anchors_per_seq=4, save_every=2, autocast="float32", optim=OptimConfig(lr=2e-3)
)  # no "auto": bf16 on one side only


def sft_on(device: str, setup, out: Path, **kw):
    """`sft` on the CPU, or inside `FakeCuda` on a copy of the target moved to the fake cuda:0 (a host without the GPU
    that wrote the run resumes it on its CPU, and the other way round). Returns the checkpoint's weights."""
    from safetensors.torch import load_file

    if device == "cpu":
        sft(setup, out, cfg=ON_DEVICE, **kw)
    else:
        with FakeCuda():
            target = tiny_target(vocab_size=64, hidden_size=32, num_layers=4, seed=0, sharpness=30.0)
            assert to_fake_cuda(target.model) is target.model and target.device.type == "cuda"
            sft((target, *setup[1:]), out, cfg=ON_DEVICE, **kw)
    return load_file(out / "last" / "model.safetensors")


@pytest.mark.parametrize("first, then", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_run_resumes_on_another_device(setup, tmp_path, capsys, first, then):
    straight = sft_on("cpu", setup, tmp_path / "straight")
    sft_on(first, setup, tmp_path / "moved", stop_after=2)
    assert json.loads((tmp_path / "moved" / "last" / "config.json").read_text())["device"] == first
    capsys.readouterr()
    resumed = sft_on(then, setup, tmp_path / "moved", resume=True)
    assert (
        f"[draftopd] resuming a run written on {first} by 1 process on {then} with 1 process: the same steps follow"
        in capsys.readouterr().err
    )
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert metric_rows(tmp_path / "moved") == metric_rows(tmp_path / "straight")


def test_a_trainer_state_written_on_a_gpu_loads_on_a_cpu_host(setup, tmp_path, monkeypatch):
    """A trainer.pt whose tensors are tagged cuda:0 (as torch.save tags a GPU's) is read onto the CPU, not refused."""
    import torch.serialization as ser

    sft(setup, tmp_path, cfg=ON_DEVICE, stop_after=2)
    path = tmp_path / "last" / "trainer.pt"
    state = torch.load(path, weights_only=True)
    tag = (-1, lambda storage: "cuda:0", lambda storage, location: None)  # (priority, tagger, deserializer): every storage says cuda:0
    monkeypatch.setattr(ser, "_package_registry", [tag, *ser._package_registry])
    torch.save(state, path)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does on this host
        torch.load(path, weights_only=True)
    straight = sft(setup, tmp_path / "straight", cfg=ON_DEVICE)
    resumed = sft(setup, tmp_path, cfg=ON_DEVICE, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), straight.state_dict().values()))
