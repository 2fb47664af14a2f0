"""The scripts of benchmarks/ and experiments/ and the package code they share.

Every script answers `--help` (exit 0): it imports, its imports resolve from where it lives, and its parser builds.
The shared code (`draftopd.headline`, `draftopd.eval.round_cost`) is checked on tiny models.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_drafter

from draftopd.decode.stats import paired_ratio_ci
from draftopd.eval.replay import ReplayedTau, ReplayedText, replay_scored, score_texts

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("benchmarks/*.py"), *ROOT.glob("experiments/*/*.py")])


def test_every_script_is_found():
    """The glob sees both folders (a moved folder would otherwise leave the --help test silently empty)."""
    assert any(p.parent.name == "benchmarks" for p in SCRIPTS) and any(p.parent.parent.name == "experiments" for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=[str(p.relative_to(ROOT)) for p in SCRIPTS])
def test_script_help(script):
    """`python SCRIPT --help` exits 0 from the repository root (the package on the path as a user's checkout has it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "usage" in run.stdout.lower()


def test_opd_variant_applies_an_ablation_and_the_overrides():
    """`headline.opd_variant`: OPDConfig fields (anchors, temperature) and LossConfig fields of each ablation land where
    they belong; the other fields stay the authors' recipe (`headline.OPD`); overrides apply last."""
    from draftopd.headline import ABLATIONS, OPD, opd_variant

    assert opd_variant("opd") == OPD
    assert opd_variant("opd-random").anchors == "random" and opd_variant("opd-random").loss == OPD.loss
    assert opd_variant("opd-t07").rollout.temperature == 0.7 and opd_variant("opd-t07").loss == OPD.loss
    assert opd_variant("opd-lam01").loss.lam_rej == 0.1 and opd_variant("opd-norej").loss.use_rejected is False
    cfg = opd_variant("opd-fwd", seed=3, steps=5, max_flops=1e12)
    assert (cfg.rollout.seed, cfg.steps, cfg.max_flops, cfg.loss.rej_direction) == (3, 5, 1e12, "forward")
    for name in ABLATIONS:  # every ablation builds a valid config
        opd_variant(name)


def test_replay_all_pools_the_sets_and_paired_is_the_tau_ratio(small_vocab_target, one_thread):
    """`headline.replay_all` gives each set's replay tau and "all" = the texts of every set pooled; `headline.paired` is
    tau_a / tau_b with `paired_ratio_ci`'s interval; `headline.point` keeps every text's counts."""
    from draftopd.headline import paired, point, replay_all
    from draftopd.train.common import Compute

    target = small_vocab_target
    drafter = make_drafter(target, block_size=4, seed=1)
    g = torch.Generator().manual_seed(0)
    texts = {
        name: (
            [torch.randint(0, 7, (6,), generator=g).tolist() for _ in range(3)],
            [torch.randint(0, 7, (12,), generator=g).tolist() for _ in range(3)],
        )
        for name in ("a", "b")
    }
    scored = {name: score_texts(target, drafter.spec.target_layer_ids, p, o) for name, (p, o) in texts.items()}
    rep = replay_all(drafter, scored)
    assert set(rep) == {"a", "b", "all"}
    assert rep["a"].tau == replay_scored(drafter, scored["a"]).tau
    assert rep["all"].texts == ReplayedTau.pool([rep["a"], rep["b"]]).texts
    pt = point(0, Compute(), rep, 0.0)
    assert pt["tau"]["all"] == rep["all"].tau and len(pt["texts"]["a"]) == 3
    a = [ReplayedText((1, 0, 2), 5), ReplayedText((0, 0), 2), ReplayedText((3,), 4)]
    b = [ReplayedText((0, 0, 1), 4), ReplayedText((0, 0), 2), ReplayedText((1, 1), 4)]
    cols = ([t.committed for t in b], [t.rounds for t in b], [t.committed for t in a], [t.rounds for t in a])
    ratio, lo, hi = paired(*cols)
    assert ratio == pytest.approx((11 / 6) / (10 / 7)) and (lo, hi) == paired_ratio_ci(*cols)


def test_round_cost_measures_every_size_and_leaves_the_cache(llama_target, one_thread):
    """`eval.round_cost.measure` times a verify of each size on the same cache (rolled back after each call), a drafter
    round and a prefill; positive numbers for a DFlash and an EAGLE-3 drafter."""
    from draftopd.eval.round_cost import measure

    for cfg in ({}, {"arch": "eagle3"}):
        drafter = make_drafter(llama_target, block_size=4, **cfg)
        r = measure(llama_target, drafter, context=24, sizes=[1, 2, 4], repeats=1)
        assert set(r["verify_ms"]) == {1, 2, 4} and all(v > 0 for v in r["verify_ms"].values())
        assert r["draft_ms"] > 0 and r["prefill_tok_s"] > 0
