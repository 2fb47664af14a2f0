"""Tests for draftopd.eval.evaluate on a tiny random target with an untrained drafter, and for the pure
bootstrap / divergence helpers of draftopd.decode.stats."""

from __future__ import annotations

import json

import pytest
import torch

import draftopd.eval.evaluate as evaluate_mod
from draftopd.config import DecodeConfig, DrafterConfig, EvalConfig
from draftopd.decode.stats import bootstrap_ratio_ci, first_divergence, paired_ratio_ci, ratio_of_sums, resampled_sums
from draftopd.eval.evaluate import EvalReport, compare_tau, evaluate
from draftopd.models.drafter import new_drafter
from draftopd.models.load import tiny_target

CFG = EvalConfig(sets=(), num_prompts=3, decode=DecodeConfig(max_new_tokens=16))


# --------------------------------------------------------------------------- pure statistics


def test_bootstrap_identical_prompts_give_zero_width_interval():
    assert bootstrap_ratio_ci([3] * 5, [2] * 5) == (1.5, 1.5)
    assert bootstrap_ratio_ci([7], [2]) == (3.5, 3.5)  # one prompt: every resample is that prompt


def test_bootstrap_two_prompts_by_hand():
    # prompts (num, den) = (1, 1) and (3, 1): a resample of 2 gives ratio 1, 2 or 3 with probability 1/4, 1/2, 1/4,
    # so the 2.5% / 97.5% quantiles are 1 and 3 and the 30% / 70% quantiles are both 2
    assert bootstrap_ratio_ci([1, 3], [1, 1]) == (1.0, 3.0)
    assert bootstrap_ratio_ci([1, 3], [1, 1], level=0.4) == (2.0, 2.0)
    sums = resampled_sums([[1, 3], [1, 1]], resamples=4000, seed=1)
    assert sums.shape == (4000, 2) and (sums[:, 1] == 2).all()
    assert (sums[:, 0] == 4).double().mean().item() == pytest.approx(0.5, abs=0.03)


def test_bootstrap_is_a_ratio_of_sums_contains_the_estimate_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    rounds = torch.randint(5, 40, (30,), generator=g)
    committed = (rounds * (1 + 2 * torch.rand(30, generator=g))).round()
    num, den = committed.tolist(), rounds.tolist()
    point = ratio_of_sums(num, den)
    assert point == pytest.approx(sum(num) / sum(den))
    low, high = bootstrap_ratio_ci(num, den, seed=5)
    assert low < point < high
    assert bootstrap_ratio_ci(num, den, seed=5) == (low, high)
    assert bootstrap_ratio_ci(num, den, seed=6) != (low, high)
    narrow = bootstrap_ratio_ci(num, den, seed=5, level=0.5)
    assert low < narrow[0] < point < narrow[1] < high
    assert ratio_of_sums([10, 0], [10, 10]) == 0.5  # not the mean of per-prompt ratios (which would also be 0.5 ...
    assert ratio_of_sums([10, 0], [10, 30]) == 0.25  # ... but here it is 0.5, the estimator weights by rounds)


def test_bootstrap_rejects_empty_and_ragged_input():
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([], [])
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1, 2], [1])
    with pytest.raises(ValueError):
        bootstrap_ratio_ci([1], [1], level=1.0)


def test_paired_ratio_by_hand():
    num, den = [4, 9, 2, 7], [2, 3, 2, 5]
    assert paired_ratio_ci(num, den, num, den) == (1.0, 1.0)  # same drafter: ratio 1 in every resample
    assert paired_ratio_ci(num, den, [2 * x for x in num], den) == pytest.approx((2.0, 2.0))  # B commits twice as much
    # unpaired resampling would spread this interval; paired, only the per-prompt variation of B/A matters
    low, high = paired_ratio_ci(num, den, [x + 1 for x in num], den, seed=3)
    assert low < ratio_of_sums([x + 1 for x in num], den) / ratio_of_sums(num, den) < high
    assert paired_ratio_ci(num, den, [x + 1 for x in num], den, seed=3) == (low, high)


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([4], [5]) == 0
    assert first_divergence([1, 2], [1, 2, 3]) == 2  # one is a prefix of the other: the shorter length


# --------------------------------------------------------------------------- evaluate


@pytest.fixture(scope="module")
def pair():
    target = tiny_target()
    return target, new_drafter(target, DrafterConfig(block_size=8))


@pytest.fixture(scope="module")
def sets():
    g = torch.Generator().manual_seed(3)
    return {
        "alpha": [torch.randint(0, 63, (n,), generator=g).tolist() for n in (4, 9, 6)],
        "beta": [torch.randint(0, 63, (n,), generator=g).tolist() for n in (7, 3)],
    }


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
        assert r.tau_ci[0] <= r.tau <= r.tau_ci[1] and r.speedup_ci[0] <= r.speedup <= r.speedup_ci[1]
        assert r.match_rate == 1.0 and r.mean_first_divergence is None
        assert len(r.per_prompt) == r.prompts and all(p.first_divergence is None for p in r.per_prompt)
        assert sum(p.committed for p in r.per_prompt) == r.spec_new_tokens - r.prompts
        assert sum(p.rounds for p in r.per_prompt) == r.rounds
        assert sum(p.ar_seconds for p in r.per_prompt) == pytest.approx(r.ar_seconds)
        assert sum(p.spec_seconds for p in r.per_prompt) == pytest.approx(r.spec_seconds)
    assert report.config["sets"] == ["alpha", "beta"] and report.config["block_size"] == 8
    assert report.config["target_dtype"] == "float32" and report.config["lossless_required"] is True
    assert report.config["bootstrap_resamples"] == 2000 and report.config["ci_level"] == 0.95


def test_default_eval_config_is_trustworthy():
    cfg = EvalConfig()
    assert cfg.num_prompts >= 30 and set(cfg.sets) == {"mt-bench", "gsm8k", "humaneval"} and cfg.bootstrap_resamples >= 1000


def test_intervals_are_the_bootstrap_of_the_per_prompt_counts(report):
    for r in report.rows:
        p = r.per_prompt
        assert r.tau_ci == bootstrap_ratio_ci([x.committed for x in p], [x.rounds for x in p], seed=CFG.decode.seed)
        assert r.speedup_ci == bootstrap_ratio_ci([x.ar_seconds for x in p], [x.spec_seconds for x in p], seed=CFG.decode.seed)


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
    for name in ("alpha", "beta", "all", "tau", "speedup", "mismatches", "match", "1st div", "95% CI"):
        assert name in table
    alpha = report.rows[0]
    assert f"{alpha.tau:.2f} [{alpha.tau_ci[0]:.2f}, {alpha.tau_ci[1]:.2f}]" in table.splitlines()[2]
    assert "100%" in table.splitlines()[2]
    path = tmp_path / "out" / "eval.json"
    report.save(path)
    data = json.loads(path.read_text())
    assert [r["name"] for r in data["rows"]] == ["alpha", "beta", "all"]
    assert data["config"]["decode"]["max_new_tokens"] == 16 and data == report.to_dict() | {"rows": data["rows"]}
    assert EvalReport.load(path) == report  # tuples, intervals and per-prompt counts survive JSON


def _with_counts(report: EvalReport, scale: float) -> EvalReport:
    """The report with every prompt's committed tokens scaled (rounds kept): a drafter with `scale` x the tau."""
    import dataclasses

    rows = [
        dataclasses.replace(r, per_prompt=tuple(dataclasses.replace(p, committed=round(p.committed * scale)) for p in r.per_prompt))
        for r in report.rows
    ]
    return EvalReport(rows, report.config)


def test_compare_tau_paired(report):
    same = compare_tau(report, report)
    assert same.ratio == 1.0 and same.ci == (1.0, 1.0) and not same.differs and same.prompts == 5
    better = compare_tau(report, _with_counts(report, 3.0), "alpha")
    assert better.set == "alpha" and better.prompts == 3 and better.tau_a == pytest.approx(report.row("alpha").tau)
    assert better.ratio == pytest.approx(better.tau_b / better.tau_a)
    assert better.ci[0] <= better.ratio <= better.ci[1] and better.ci[0] > 1 and better.differs
    worse = compare_tau(_with_counts(report, 3.0), report)
    assert worse.ci[1] < 1 and worse.differs


def test_compare_tau_refuses_different_prompts(report):
    import dataclasses

    fewer = EvalReport([dataclasses.replace(r, per_prompt=r.per_prompt[1:]) for r in report.rows], report.config)
    with pytest.raises(ValueError, match="same prompts"):
        compare_tau(report, fewer)
    renamed = EvalReport(
        [dataclasses.replace(r, per_prompt=tuple(dataclasses.replace(p, id=p.id + "x") for p in r.per_prompt)) for r in report.rows],
        report.config,
    )
    with pytest.raises(ValueError, match="same prompts"):
        compare_tau(report, renamed)


def _corrupt_second_alpha_prompt(monkeypatch):
    """Speculative call 3 (warm-up is call 1) is alpha's second prompt: change its last new token."""
    real = evaluate_mod.generate
    calls = {"n": 0}

    def corrupted(target, drafter, prompts, cfg):
        gen = real(target, drafter, prompts, cfg)
        calls["n"] += 1
        if calls["n"] == 3:
            gen.traces[0].output[-1] = (gen.traces[0].output[-1] + 1) % 63
        return gen

    monkeypatch.setattr(evaluate_mod, "generate", corrupted)


def _check_counted(report: EvalReport) -> None:
    alpha, beta, total = report.rows
    assert [r.mismatches for r in report.rows] == [1, 0, 1]
    assert alpha.mismatched_ids == ("alpha/1",) and total.mismatched_ids == ("alpha/1",)
    diverged = [p for p in alpha.per_prompt if p.first_divergence is not None]
    assert [p.id for p in diverged] == ["alpha/1"]
    last = alpha.per_prompt[1].committed  # the corrupted token is the last new token: index = new tokens - 1
    assert alpha.mean_first_divergence == total.mean_first_divergence == last
    assert alpha.match_rate == pytest.approx(2 / 3) and total.match_rate == pytest.approx(4 / 5)
    assert beta.match_rate == 1.0 and beta.mean_first_divergence is None


def test_mismatch_is_detected_and_loud_in_float32(pair, sets, monkeypatch, capsys):
    _corrupt_second_alpha_prompt(monkeypatch)
    report = evaluate(*pair, CFG, prompt_sets=sets, progress=False)
    _check_counted(report)
    err = capsys.readouterr().err
    assert any(line.startswith("MISMATCH") and "alpha/1" in line and "float32" in line for line in err.splitlines())
    assert "67%" in report.table().splitlines()[2]


def test_mismatch_in_bfloat16_is_a_number_only(sets, monkeypatch, capsys):
    target = tiny_target()
    target.model.to(torch.bfloat16)
    drafter = new_drafter(target, DrafterConfig(block_size=8))
    _corrupt_second_alpha_prompt(monkeypatch)
    report = evaluate(target, drafter, CFG, prompt_sets=sets, progress=False)
    assert report.config["target_dtype"] == "bfloat16" and report.config["lossless_required"] is False
    alpha = report.rows[0]
    assert alpha.per_prompt[1].first_divergence is not None and alpha.mismatches >= 1  # bf16 may add its own
    assert "MISMATCH" not in capsys.readouterr().err


def test_sampling_does_not_count_mismatches(pair, sets):
    cfg = EvalConfig(sets=(), decode=DecodeConfig(max_new_tokens=8, temperature=1.0))
    report = evaluate(*pair, cfg, prompt_sets={"beta": sets["beta"]}, progress=False)
    assert [r.mismatches for r in report.rows] == [None, None]
    assert all(r.match_rate is None and r.mean_first_divergence is None for r in report.rows)
    assert all(p.first_divergence is None for p in report.rows[0].per_prompt)
    assert report.rows[-1].tau >= 1.0 and "-" in report.table().splitlines()[-1]


def test_skip_prompts_evaluates_the_sample_past_the_tuning_prompts(tmp_path):
    """`EvalConfig.skip_prompts`: the evaluated prompts are the seeded sample's prompts from `skip_prompts` on, never
    one a smaller skip chose settings on; skipping the whole set is one DataError."""
    import json
    from types import SimpleNamespace

    from draftopd.config import EvalConfig
    from draftopd.data.prompts import DataError
    from draftopd.eval.evaluate import load_eval_sets

    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(12)))
    target = SimpleNamespace(name="t", tokenizer=lambda text: SimpleNamespace(input_ids=[len(text), int(text.split()[-1])]))
    ids = lambda cfg: [pid for pid, _ in load_eval_sets(target, cfg)[str(path)]]  # noqa: E731
    first = ids(EvalConfig(sets=(str(path),), num_prompts=10))
    tuned, held = ids(EvalConfig(sets=(str(path),), num_prompts=4)), ids(EvalConfig(sets=(str(path),), num_prompts=6, skip_prompts=4))
    assert tuned + held == first and not set(tuned) & set(held)
    assert ids(EvalConfig(sets=(str(path),), num_prompts=30, skip_prompts=10)) == ids(EvalConfig(sets=(str(path),), num_prompts=12))[10:]
    with pytest.raises(DataError, match="no prompts left after --skip-prompts 12"):
        ids(EvalConfig(sets=(str(path),), num_prompts=5, skip_prompts=12))
