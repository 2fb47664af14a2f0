"""Tests for draftopd.eval.evaluate on a tiny random target with an untrained drafter."""

from __future__ import annotations

import json

import pytest
import torch

import draftopd.eval.evaluate as evaluate_mod
from draftopd.config import DrafterConfig, EvalConfig
from draftopd.eval.evaluate import EvalReport, evaluate
from draftopd.models.dflash import new_drafter
from draftopd.models.load import tiny_target

CFG = EvalConfig(sets=(), num_prompts=3, max_new_tokens=16)


@pytest.fixture(scope="module")
def pair():
    target = tiny_target()
    return target, new_drafter(target, DrafterConfig(block_size=8))


@pytest.fixture(scope="module")
def sets():
    g = torch.Generator().manual_seed(3)
    return {"alpha": [torch.randint(0, 63, (n,), generator=g).tolist() for n in (4, 9, 6)],
            "beta": [torch.randint(0, 63, (n,), generator=g).tolist() for n in (7, 3)]}


@pytest.fixture(scope="module")
def report(pair, sets) -> EvalReport:
    return evaluate(*pair, CFG, prompt_sets=sets, progress=False)


def test_rows_and_metrics(report):
    assert [r.name for r in report.rows] == ["alpha", "beta", "all"]
    for r in report.rows:
        assert r.tau >= 1.0
        assert r.mismatches == 0 and r.mismatched_ids == ()
        assert r.speedup > 0 and r.spec_tokens_per_s > 0 and r.ar_tokens_per_s > 0 and r.ar_ms_per_token > 0
        assert len(r.slot_acceptance) == 7 and len(r.accepted_histogram) == 8
        assert sum(r.accepted_histogram) == r.rounds > 0
        assert set(r.spec_ms_per_round) == {"draft", "verify", "other"}
        assert r.spec_new_tokens == r.ar_new_tokens  # greedy and lossless: same text
    assert report.config["sets"] == ["alpha", "beta"] and report.config["block_size"] == 8


def test_all_row_aggregates(report):
    alpha, beta, total = report.rows
    assert total.prompts == alpha.prompts + beta.prompts == 5
    assert total.rounds == alpha.rounds + beta.rounds
    assert total.accepted_histogram == tuple(a + b for a, b in zip(alpha.accepted_histogram, beta.accepted_histogram))
    assert total.spec_new_tokens == alpha.spec_new_tokens + beta.spec_new_tokens
    assert total.spec_seconds == pytest.approx(alpha.spec_seconds + beta.spec_seconds)
    assert total.speedup == pytest.approx((alpha.ar_seconds + beta.ar_seconds) / (alpha.spec_seconds + beta.spec_seconds))
    assert total.tau == pytest.approx((total.spec_new_tokens - total.prompts) / total.rounds)


def test_table_and_save(report, tmp_path):
    table = report.table()
    for name in ("alpha", "beta", "all", "tau", "speedup", "mismatches"):
        assert name in table
    path = tmp_path / "out" / "eval.json"
    report.save(path)
    data = json.loads(path.read_text())
    assert [r["name"] for r in data["rows"]] == ["alpha", "beta", "all"]
    assert data["config"]["max_new_tokens"] == 16 and data == report.to_dict() | {"rows": data["rows"]}


def test_mismatch_is_detected(pair, sets, monkeypatch, capsys):
    real = evaluate_mod.generate
    calls = {"n": 0}

    def corrupted(target, drafter, prompts, cfg):
        gen = real(target, drafter, prompts, cfg)
        calls["n"] += 1
        if calls["n"] == 3:  # warm-up is call 1; corrupt alpha's second prompt
            gen.traces[0].output[-1] = (gen.traces[0].output[-1] + 1) % 63
        return gen

    monkeypatch.setattr(evaluate_mod, "generate", corrupted)
    report = evaluate(*pair, CFG, prompt_sets=sets, progress=False)
    assert [r.mismatches for r in report.rows] == [1, 0, 1]
    assert report.rows[0].mismatched_ids == ("alpha/1",) and report.rows[2].mismatched_ids == ("alpha/1",)
    err = capsys.readouterr().err
    assert any(line.startswith("MISMATCH") and "alpha/1" in line for line in err.splitlines())


def test_sampling_does_not_count_mismatches(pair, sets):
    cfg = EvalConfig(sets=(), max_new_tokens=8, temperature=1.0)
    report = evaluate(*pair, cfg, prompt_sets={"beta": sets["beta"]}, progress=False)
    assert [r.mismatches for r in report.rows] == [None, None]
    assert report.rows[-1].tau >= 1.0 and "-" in report.table().splitlines()[-1]
