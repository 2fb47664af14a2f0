"""Data-parallel data commands (`train/distributed.py`): several CPU processes (gloo, torchrun's environment variables)
regenerate byte-identical output, build the identical feature cache, and report the same tau and counts as one
process, each resuming what an earlier run left; SFT from the cache reads only each rank's share of every batch.

One spawn of 2 processes runs everything (with a resume case for regenerate and features), one of 3 processes reruns
regenerate and features (shares that do not split evenly); the single-process references are computed first.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_ddp import WEIGHT_ATOL, free_port, make_target, max_diff

from draftopd.config import DecodeConfig, DrafterConfig, EvalConfig, OptimConfig, SFTConfig
from draftopd.data.features import FeatureCache, build_feature_cache, read_manifest
from draftopd.data.prompts import Prompt
from draftopd.data.regenerate import SFTExample, load_regenerated, regenerate
from draftopd.eval.evaluate import EvalReport, evaluate
from draftopd.models.drafter import load_drafter, new_drafter
from draftopd.train.sft import train_sft

REGEN = DecodeConfig(max_new_tokens=10, temperature=1.0, stop_at_eos=False)  # sampled: records seeded by id, not by batch
LAYERS = (1, 3)
SHARD_TOKENS = 16  # one or two sequences a shard: 8 shards
EVAL = EvalConfig(num_prompts=3, bootstrap_resamples=50, decode=DecodeConfig(max_new_tokens=12))
SFT = SFTConfig(steps=2, batch_size=4, grad_accum=2, anchors_per_seq=4, autocast="float32", optim=OptimConfig(lr=2e-3, min_warmup_steps=1))


def drafter(target):
    return new_drafter(target, DrafterConfig(block_size=8, target_layer_ids=LAYERS), seed=5)


def regen_prompts() -> tuple[list[Prompt], list[list[int]]]:
    rng = random.Random(1)
    prompts = [Prompt(f"p{i}", "unit", (("user", f"prompt {i}"),)) for i in range(11)]
    return prompts, [[rng.randrange(60) for _ in range(rng.randint(3, 9))] for _ in prompts]


def eval_sets() -> dict[str, list[list[int]]]:
    rng = random.Random(2)
    return {name: [[rng.randrange(60) for _ in range(rng.randint(3, 8))] for _ in range(n)] for name, n in (("a", 3), ("b", 2))}


def run_all(target, out: Path, examples: list, full: bool) -> None:
    """What each process does (one process: the references): regenerate and build features fresh and resumed
    (the `-resume` copies, seeded by the parent), and with `full` evaluate and train SFT from the cache."""
    prompts, ids = regen_prompts()
    for name in ("regen", "regen-resume"):
        regenerate(target, prompts, out / f"{name}.jsonl", REGEN, batch_size=3, prompt_ids=ids, progress=False)
    for name in ("features", "features-resume"):
        build_feature_cache(target, examples, out / name, LAYERS, keep_final=False, shard_tokens=SHARD_TOKENS, progress=False)
    if not full:
        return
    report = evaluate(target, drafter(target), EVAL, prompt_sets=eval_sets(), progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        report.save(out / "eval.json")
    reads = []
    original = FeatureCache.__getitem__
    FeatureCache.__getitem__ = lambda self, i: reads.append(i) or original(self, i)
    try:
        cache = FeatureCache.open(out / "features", target, LAYERS)
        train_sft(target, drafter(target), cache, SFT, out / "sft", progress=False)
    finally:
        FeatureCache.__getitem__ = original
    (out / f"reads{os.environ.get('RANK', '0')}.json").write_text(json.dumps(reads))


def worker(rank: int, world: int, port: int, out: Path, examples: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    run_all(make_target(), out, examples, full=world == 2)


def seed_resume(single: Path, out: Path) -> None:
    """What a killed multi-process run leaves: output records, a part file ending in a torn line, an unlisted shard."""
    lines = (single / "regen.jsonl").read_bytes().splitlines(keepends=True)
    (out / "regen-resume.jsonl").write_bytes(b"".join(lines[:2]))
    (out / "regen-resume.jsonl.part1").write_bytes(lines[8] + lines[9][:20])
    (out / "features-resume").mkdir()
    manifest = json.loads((single / "features" / "manifest.json").read_text())
    (out / "features-resume" / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][:1]}, indent=2))
    for shard in manifest["shards"][:1] + manifest["shards"][3:4]:  # shard 3 written, not listed yet
        shutil.copy(single / "features" / shard["file"], out / "features-resume" / shard["file"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world size: output folder}; world 1 is the single-process reference."""
    target = make_target()
    prompts, ids = regen_prompts()
    single = tmp_path_factory.mktemp("world1")
    regenerate(target, prompts, single / "regen.jsonl", REGEN, batch_size=3, prompt_ids=ids, progress=False)
    examples = [SFTExample(e.id, e.prompt_ids, e.response_ids) for e in load_regenerated(single / "regen.jsonl").examples]
    run_all(target, single, examples, full=True)  # regen.jsonl is complete: nothing redone
    folders = {1: single}
    for world in (2, 3):
        folders[world] = out = tmp_path_factory.mktemp(f"world{world}")
        seed_resume(single, out)
        with pytest.MonkeyPatch.context() as env:
            env.setenv("OMP_NUM_THREADS", "1")
            mp.spawn(worker, args=(world, free_port(), out, examples), nprocs=world, join=True)
    return folders


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["regen", "regen-resume"])
def test_regenerate_output_is_byte_identical_to_one_process(runs, world, name):
    assert (runs[world] / f"{name}.jsonl").read_bytes() == (runs[1] / "regen.jsonl").read_bytes()
    assert len((runs[1] / "regen.jsonl").read_bytes().splitlines()) == len(regen_prompts()[0])
    assert not list(runs[world].glob("*.part*"))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["features", "features-resume"])
def test_feature_cache_is_identical_to_one_process(runs, world, name):
    mine, ref = runs[world] / name, runs[1] / "features"
    assert (mine / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()
    shards = [s["file"] for s in read_manifest(ref).shards]
    assert len(shards) >= 2 * world and sorted(p.name for p in mine.iterdir()) == sorted(["manifest.json", *shards])
    for file in shards:
        a, b = load_file(mine / file), load_file(ref / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_complete_shard_is_not_computed_again(runs):
    """The resumed cache's shard 3 was on disk, unlisted: kept as it was (same file), not rewritten."""
    for world in (2, 3):
        assert (runs[world] / "features-resume" / "shard-00003.safetensors").stat().st_mtime_ns < (
            runs[world] / "features-resume" / "shard-00002.safetensors"
        ).stat().st_mtime_ns


def test_eval_report_has_the_tau_and_counts_of_one_process(runs):
    mine, ref = EvalReport.load(runs[2] / "eval.json"), EvalReport.load(runs[1] / "eval.json")
    assert [r.name for r in mine.rows] == [r.name for r in ref.rows] == ["a", "b", "all"]
    for a, b in zip(mine.rows, ref.rows):
        assert (
            a.prompts,
            a.tau,
            a.slot_acceptance,
            a.accepted_histogram,
            a.rounds,
            a.spec_new_tokens,
            a.ar_new_tokens,
            a.tau_ci,
            a.mismatches,
        ) == (
            b.prompts,
            b.tau,
            b.slot_acceptance,
            b.accepted_histogram,
            b.rounds,
            b.spec_new_tokens,
            b.ar_new_tokens,
            b.tau_ci,
            b.mismatches,
        )
        assert [(p.set, p.id, p.committed, p.rounds) for p in a.per_prompt] == [(p.set, p.id, p.committed, p.rounds) for p in b.per_prompt]
    assert ref.row("all").rounds > 0 and ref.row("all").mismatches == 0


def test_sft_from_the_cache_reads_only_each_ranks_share(runs):
    target, per_step = make_target(), SFT.batch_size * SFT.grad_accum
    single = json.loads((runs[1] / "reads0.json").read_text())
    assert len(single) == SFT.steps * per_step
    ranks = [json.loads((runs[2] / f"reads{r}.json").read_text()) for r in range(2)]
    assert [len(r) for r in ranks] == [SFT.steps * per_step // 2] * 2
    for j in range(SFT.steps * SFT.grad_accum):  # rank 0 the first half of each micro-batch, rank 1 the second
        half = SFT.batch_size // 2
        assert (
            single[j * SFT.batch_size : (j + 1) * SFT.batch_size]
            == ranks[0][j * half : (j + 1) * half] + ranks[1][j * half : (j + 1) * half]
        )
    weights = [load_drafter(runs[w] / "sft" / "last", target).state_dict() for w in (1, 2)]
    assert max_diff(*weights) <= WEIGHT_ATOL
    assert not torch.equal(weights[0]["fc.weight"], drafter(target).state_dict()["fc.weight"])


def test_each_rank_takes_its_local_gpu_and_an_explicit_one_is_one_line(monkeypatch, capfd, tmp_path):
    from draftopd.check.fake_cuda import FakeCuda
    from draftopd.cli import main
    from draftopd.config import ConfigError, resolve_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with FakeCuda():
        assert resolve_device("auto") == resolve_device("cuda") == "cuda:1" and resolve_device("cpu") == "cpu"
        with pytest.raises(ConfigError, match=r"--device cuda:0 under torchrun \(2 processes\)"):
            resolve_device("cuda:0")
        capfd.readouterr()
        assert main(["features", "--out", str(tmp_path / "features"), "--device", "cuda:1"]) == 2
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("draftopd: error: --device cuda:1 under torchrun")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with FakeCuda():
        assert resolve_device("cuda:0") == "cuda:0" and resolve_device("cuda") == "cuda"
