"""Every flow on a device that says it is CUDA (`draftopd/check/fake_cuda.py`): no op mixes devices or uses a generator
of the other device type, the results equal the CPU's (same arithmetic underneath), and the host waits for the device
at most once a decoding round (twice with `draft_confidence`, whose cut sizes the verify) and once a training step.

Controls show the harness catches what it claims to: a planted device mix (the Draft-OPD replay batch left on the
host, as it once was), a CPU generator for CUDA tensors, and a planted sync in the decoding round."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from draftopd.check.fake_cuda import DeviceMixError, FakeCuda, FakeCudaTensor
from draftopd.check.flows import FLOWS, SFT, Bench
from draftopd.config import DecodeConfig
from draftopd.decode import speculative as S
from draftopd.decode.accept import sample


@pytest.mark.parametrize("flow", list(FLOWS))
def test_flow_runs_on_cuda_as_on_the_cpu(flow, tmp_path, one_thread):
    cpu = FLOWS[flow](Bench("cpu", tmp_path / "cpu"))
    with FakeCuda():  # strict: any device mix raises
        bench = Bench("cuda", tmp_path / "cuda")
        assert isinstance(bench.target.model.lm_head.weight, FakeCudaTensor) and bench.target.device.type == "cuda"
        fake = FLOWS[flow](bench)
    assert fake == cpu
    if "plain" in cpu:  # greedy decoding is lossless on the device too
        assert cpu["outputs"] == cpu["plain"]


def _count_generate(tmp_path, arch: str = "dflash", **cfg):
    """Host syncs and host-to-device copies of one `generate` call on the fake device, and its rounds."""
    with FakeCuda() as fake:
        bench = Bench("cuda", tmp_path)
        drafter = bench.drafter(arch=arch)
        decode = DecodeConfig(max_new_tokens=24, stop_at_eos=False, **cfg)
        with fake.count() as record:
            rounds = S.generate(bench.target, drafter, bench.prompts, decode).timing.rounds
    return record, rounds


@pytest.mark.parametrize("arch", ["dflash", "eagle3"])
@pytest.mark.parametrize(
    "mode,per_round",
    [({}, 1), ({"temperature": 1.0}, 1), ({"lookup_ngram": 2}, 1), ({"num_drafts": 2}, 1), ({"draft_confidence": 0.05}, 2)],
)
def test_a_decoding_round_waits_for_the_device_once(tmp_path, arch, mode, per_round, one_thread):
    """One sync a round (the round's results come to the host in one copy), two with `draft_confidence`, plus two a
    generation (the first token, the phase clock's last event). Copies to the device: the prompts (two), the lookup's
    drafts when lookup runs (one a round), and the surviving rows' index each time finished rows leave the batch (at
    most once a prompt)."""
    if arch == "eagle3" and "draft_confidence" in mode:
        per_round = None  # an EAGLE-3 chain asks the device whether to draft another slot: one sync a chain step
    record, rounds = _count_generate(tmp_path, arch, **mode)
    assert rounds > 5
    if per_round is not None:
        assert record.total_syncs <= per_round * rounds + 2, dict(record.syncs)
    else:
        assert record.total_syncs <= 8 * rounds + 2, dict(record.syncs)
    assert record.total_h2d <= (rounds if "lookup_ngram" in mode else 0) + 2 + len(Bench.PROMPT_LENGTHS), dict(record.h2d)


def test_a_training_step_waits_for_the_device_once(tmp_path, one_thread):
    from draftopd.train.sft import train_sft

    with FakeCuda() as fake:
        bench = Bench("cuda", tmp_path)
        drafter, examples = bench.drafter(), bench.examples()
        with fake.count() as record:
            train_sft(bench.target, drafter, examples, replace(SFT, steps=10), tmp_path / "sft", progress=False, stop_after=3)
    assert record.total_syncs == 3, dict(record.syncs)  # the metrics of each step, in one copy


def test_a_draft_opd_update_waits_once_beyond_its_rollout(tmp_path, one_thread):
    from draftopd.config import OptimConfig
    from draftopd.train.opd import OPDConfig, train_opd

    cfg = OPDConfig(
        steps=10,
        prompts_per_rollout=4,
        rollouts_per_step=1,
        replay_batch=2,
        rollout=DecodeConfig(max_new_tokens=16),
        autocast="float32",
        optim=OptimConfig(min_warmup_steps=1),
    )
    with FakeCuda() as fake:
        bench = Bench("cuda", tmp_path)
        drafter = bench.drafter()
        rounds = []
        real = S.generate

        def counted(*args, **kwargs):
            out = real(*args, **kwargs)
            rounds.append(out.timing.rounds)
            return out

        with pytest.MonkeyPatch.context() as patch, fake.count() as record:
            patch.setattr("draftopd.train.opd.generate", counted)
            train_opd(bench.target, drafter, bench.prompts, cfg, tmp_path / "opd", progress=False, stop_after=2)
    rollout_syncs = sum(r + 2 for r in rounds)  # as a decoding round, above
    assert len(rounds) == 2 and record.total_syncs <= rollout_syncs + 2, dict(record.syncs)


# ---- controls: the harness catches what it claims to -----------------------------------------------------------
def test_control_a_replay_batch_left_on_the_host_is_a_device_mix(tmp_path, monkeypatch, one_thread):
    """Draft-OPD's replay batch once moved only the token ids to the device; the rest stayed on the host."""
    from draftopd.train import opd

    real = opd.collate

    def host_collate(target, drafter, traces, segments):
        rb = real(target, drafter, traces, segments)
        return replace(rb, anchors=rb.anchors.cpu(), accepted=rb.accepted.cpu())

    monkeypatch.setattr(opd, "collate", host_collate)
    with FakeCuda(), pytest.raises(DeviceMixError, match="device mix"):
        FLOWS["opd-estimate"](Bench("cuda", tmp_path))


def test_control_a_cpu_generator_for_cuda_tensors_is_refused(tmp_path):
    with FakeCuda():
        logits = torch.randn(3, 8, device="cuda")
        with pytest.raises(DeviceMixError, match="generator"):
            sample(logits, 1.0, torch.Generator().manual_seed(0))
        assert sample(logits, 1.0, torch.Generator(device="cuda").manual_seed(0)).device.type == "cuda"
        with pytest.raises(DeviceMixError, match="generator"):
            torch.randperm(4, generator=torch.Generator(device="cuda"))


def test_control_a_planted_sync_in_the_round_breaks_the_bound(tmp_path, monkeypatch, one_thread):
    real = S.accept

    def reads_the_device(*args, **kwargs):
        out = real(*args, **kwargs)
        int(out.accepted.sum())  # what a stray .item() does: the host waits
        return out

    monkeypatch.setattr(S, "accept", reads_the_device)
    record, rounds = _count_generate(tmp_path)
    assert record.total_syncs > rounds + 2


def test_control_the_harness_records_every_mix_when_not_strict():
    with FakeCuda(strict=False) as fake:
        x = torch.ones(3, device="cuda")
        y = x + torch.ones(3)  # CUDA would raise here
        z = x + torch.tensor(2.0)  # a 0-dim host tensor is a scalar: allowed
    assert len(fake.record.mixes) == 1 and "aten.add" in fake.record.mixes[0]
    assert isinstance(y, FakeCudaTensor) and float(z.sum()) == 9.0
