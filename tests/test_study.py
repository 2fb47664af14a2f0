"""The arm study (`draftopd/study.py`) and the demo's synthetic-target part (`experiment.run_synthetic`): the hierarchical
bootstrap on cases whose answer is known, refusals, and both pipelines end to end on a tiny synthetic target."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from draftopd.config import ConfigError, OptimConfig, SFTConfig
from draftopd.models import synthetic
from draftopd.models.synthetic import SyntheticSpec
from draftopd.study import Scores, StudyConfig, check_same_target, compare, pooled_tau, run_study

TINY = SyntheticSpec(
    topics=2, words=12, max_word=4, branching=3, layers=1, hidden=16, heads=2, train_sequences=32, train_tokens=24, train_steps=3, batch=4
)


def scores(committed, rounds):
    return Scores(tuple(committed), tuple(rounds))


def test_compare_is_the_pooled_tau_ratio_and_its_interval_covers_seeds_and_prompts():
    a = [scores([4, 6, 8], [2, 2, 2])]
    b = [scores([8, 12, 16], [2, 2, 2])]
    same = compare("a", a, "b", b, resamples=500)
    assert same.ratio == pytest.approx(2.0) and same.ci == pytest.approx((2.0, 2.0)) and same.differs  # every prompt exactly 2x
    assert compare("a", a, "a2", a, resamples=500).text().endswith("(no difference)")
    # two seeds of b that disagree: the pooled ratio is their mean here, and the interval widens to hold both seeds' ratios
    b2 = [scores([6, 9, 12], [2, 2, 2]), scores([10, 15, 20], [2, 2, 2])]
    wide = compare("a", a, "b", b2, resamples=2000)
    assert wide.ratio == pytest.approx(pooled_tau(b2) / pooled_tau(a)) == pytest.approx(2.0)
    assert wide.ci[0] <= 1.5 + 1e-9 and wide.ci[1] >= 2.5 - 1e-9 and wide.ci[0] < 2.0 < wide.ci[1]
    with pytest.raises(ValueError, match="different prompt sets"):
        compare("a", a, "c", [scores([1, 2], [1, 1])])


def test_a_study_folder_of_another_target_is_refused(tmp_path):
    check_same_target(tmp_path, StudyConfig(target="synthetic"))
    check_same_target(tmp_path, StudyConfig(target="synthetic"))  # the same target: fine
    with pytest.raises(ConfigError, match="arms of different targets cannot be compared"):
        check_same_target(tmp_path, StudyConfig(target="smollm2-135m"))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"arms": ("opd", "nonsense")}, "unknown arm"),
        ({"seeds": ()}, "at least one seed"),
        ({"low_tau": (2.0, 1.5)}, "--low-tau"),
        ({"budgets": ("time",)}, "--budgets"),
    ],
)
def test_a_study_config_that_cannot_run_is_one_line(change, message):
    with pytest.raises(ConfigError, match=message):
        StudyConfig(**change)


def tiny_study(**changes) -> StudyConfig:
    base = StudyConfig(
        start_prompts=24,
        rollout_prompts=16,
        eval_prompts=6,
        tuning_prompts=4,
        new_tokens=12,
        opd_updates=2,
        seeds=(0,),
        arms=("sft-greedy-kl", "opd"),
        low_arms=("opd",),
        low_every=5,
        low_tau=(1.0, 100.0),
        resamples=100,
        start_sft=SFTConfig(steps=10, batch_size=4, anchors_per_seq=4, save_every=5, optim=OptimConfig(lr=2e-3)),
    )
    return replace(base, opd=replace(base.opd, prompts_per_rollout=4, replay_batch=4), **changes)


@pytest.fixture
def tiny_synthetic(monkeypatch, tmp_path):
    monkeypatch.setenv("DRAFTOPD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(synthetic, "DEFAULT_SPEC", TINY)


def test_run_study_end_to_end_on_a_tiny_synthetic_target(tiny_synthetic, tmp_path, one_thread):
    """Starts, arms and summary; the SFT arm at the flops budget spends Draft-OPD's compute (within one SFT step), and a
    second run reads everything from the cache."""
    cfg = tiny_study()
    summary = run_study(cfg, tmp_path / "study", progress=False, log=lambda line: None)
    assert set(summary) == {"plateau/flops", "plateau/updates", "low/flops", "low/updates"}
    flops = summary["plateau/flops"]["arms"]
    assert set(flops) == {"opd", "sft-greedy-kl"} and summary["plateau/flops"]["best_sft"] == "sft-greedy-kl"
    assert flops["sft-greedy-kl"]["tflops"] == pytest.approx(flops["opd"]["tflops"], rel=0.25)
    assert "opd / best sft" in summary["plateau/flops"]["comparisons"]
    stamp = (tmp_path / "study" / "summary.json").stat().st_mtime_ns
    again = run_study(cfg, tmp_path / "study", progress=False, log=lambda line: (_ for _ in ()).throw(AssertionError(line)))
    assert again == summary and (tmp_path / "study" / "summary.json").stat().st_mtime_ns >= stamp
    # cached_only summarizes what is scored and trains nothing: here everything, so the same summary
    partial = run_study(cfg, tmp_path / "study", progress=False, log=lambda line: None, cached_only=True)
    assert partial == summary and (tmp_path / "study" / "summary.partial.json").is_file()
    with pytest.raises(ConfigError, match="nothing to summarize"):
        run_study(cfg, tmp_path / "empty", progress=False, cached_only=True)


def test_demo_synthetic_part_on_a_tiny_synthetic_target(tiny_synthetic, tmp_path, one_thread):
    """`experiment.run_synthetic`: start, continued SFT and Draft-OPD at the same compute, curves from the start, a plot,
    and the table `format_results` prints; a second run resumes every stage at its end and gives the same table."""
    from draftopd.experiment import SyntheticDemoConfig, format_results, run_synthetic

    cfg = SyntheticDemoConfig(study=tiny_study(opd_updates=4), curve_every=2)
    out = tmp_path / "synthetic"
    summary = run_synthetic(cfg, out, progress=False)
    assert set(summary["tau"]) == {"start", "sft_continued", "draft_opd"} and all(t >= 1.0 for t in summary["tau"].values())
    for curve in summary["curves"].values():
        assert curve[0]["flops"] == 0.0 and curve[0]["tau"] == pytest.approx(summary["tau"]["start"]) and len(curve) >= 3
        assert curve[-1]["flops"] <= summary["tflops"] * 1e12 * 1.25
    assert (out / "tau_vs_compute.png").stat().st_size > 0
    assert summary["curves"]["opd"][-1]["tau"] == pytest.approx(summary["tau"]["draft_opd"])
    table = format_results({"results": {}, "ablations": {}, "plot": "p.png", "synthetic": summary})
    assert "Draft-OPD / continued SFT" in table and "| draft_opd |" in table
    metrics = [(out / name / "metrics.jsonl").read_text() for name in ("opd", "sft_continued")]
    assert run_synthetic(cfg, out, progress=False)["tau"] == summary["tau"]  # resumed at their last step: no update again
    assert [(out / name / "metrics.jsonl").read_text() for name in ("opd", "sft_continued")] == metrics
    assert json.loads((out / "summary.json").read_text())["tau"] == summary["tau"]
