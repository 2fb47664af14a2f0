"""Settings and helpers shared by the Draft-OPD-vs-continued-SFT studies on the embedded target.

`experiments/opd-headline/opd_headline.py` (Draft-OPD from the H200 drafter and from the bundled drafter, with the
paper's ablations), `experiments/opd-headline/stream_gradients.py` (each stream's gradient at the start) and
`experiments/dflash-vs-eagle3/arch_compare.py` (Draft-OPD from a DFlash and an EAGLE-3 SFT drafter) train and score
arms the same way:
- `OPD`: Draft-OPD with the authors' recipe (the `draftopd opd` loss defaults, lr 3e-4 cosine) sized for a 2-core CPU:
  16 rollouts of up to 128 new tokens an update (2 batches of 8); `SFT`: continued SFT, 8 sequences x 64 anchors a
  step, soft labels, lr 3e-4 cosine; `ABLATIONS`: each Draft-OPD variant as its changes to `OPDConfig` / `LossConfig`
  (`opd_variant` applies them);
- `OPD_FLOPS_PER_UPDATE`, `SFT_FLOPS_PER_STEP`: planning constants measured on the embedded target with the H200
  drafter (first short runs), so each arm's cosine schedule spans the updates its FLOPs budget allows; every arm stops
  at the same `compute/flops` whatever the plan;
- held-out scoring by greedy replay (`eval/replay.py`) on `SETS` (30 prompts each of the evaluation sets and held-out
  ShareGPT): `replay_all` per set plus the pooled "all" row, `point` one curve point, `paired` a paired tau ratio.
"""

from __future__ import annotations

import time
from dataclasses import replace

from .config import DecodeConfig, EvalConfig, OptimConfig, SFTConfig
from .decode.stats import paired_ratio_ci
from .eval.replay import ReplayedTau, replay_scored
from .train.losses import LossConfig
from .train.opd import OPDConfig

SETS = (*EvalConfig().sets, "sharegpt-heldout")
OPD = OPDConfig(
    steps=20,
    prompts_per_rollout=8,
    rollouts_per_step=2,
    replay_batch=8,
    rollout=DecodeConfig(max_new_tokens=128),
    save_every=4,
    optim=OptimConfig(lr=3e-4),
)
ABLATIONS = {
    "opd": {},
    "opd-random": {"anchors": "random"},
    "opd-fwd": {"rej_direction": "forward"},
    "opd-rev": {"acc_direction": "reverse"},
    "opd-nodecay": {"gamma": 1.0},
    "opd-norej": {"use_rejected": False},
    "opd-first": {"rej_slots": "first"},
    "opd-t07": {"temperature": 0.7},
    "opd-exact": {"mode": "exact"},
    "opd-lam01": {"lam_rej": 0.1},
    "opd-wrong": {"rej_slots": "wrong"},
}
OPD_FLOPS_PER_UPDATE = 7.4e12
SFT_FLOPS_PER_STEP = 1.66e12
SFT = SFTConfig(steps=1000, batch_size=8, anchors_per_seq=64, loss="kl", labels="text", save_every=1000, optim=OptimConfig(lr=3e-4))
_OPD_FIELDS = ("anchors",)  # ablation keys that are OPDConfig fields; "temperature" is the rollout's, the others LossConfig fields


def opd_variant(name: str, **changes) -> OPDConfig:
    """`OPD` with the ablation `name` applied (its OPDConfig, rollout and LossConfig fields) and then `changes`."""
    loss_changes = dict(ABLATIONS[name])
    top = {k: loss_changes.pop(k) for k in _OPD_FIELDS if k in loss_changes}
    rollout = {k: loss_changes.pop(k) for k in ("temperature",) if k in loss_changes}
    rollout |= {k: changes.pop(k) for k in ("seed",) if k in changes}  # the run's seed is the rollout's
    return replace(OPD, loss=replace(LossConfig(), **loss_changes), rollout=replace(OPD.rollout, **rollout), **top, **changes)


def replay_all(drafter, scored: dict) -> dict[str, ReplayedTau]:
    """Replay tau of `drafter` on each set's scored texts (`eval.replay.score_texts`), plus "all": every set pooled."""
    rep = {name: replay_scored(drafter, s) for name, s in scored.items()}
    rep["all"] = ReplayedTau.pool(list(rep.values()))
    return rep


def point(step: int, compute, rep: dict[str, ReplayedTau], t0: float) -> dict:
    """One curve point: step, FLOPs so far (total and by phase), seconds since `t0`, tau per set, slot acceptance and
    every text's (committed, accepted per round), so paired ratios can be computed later from the JSON alone."""
    return {
        "step": step,
        "flops": compute.flops,
        "phase_flops": dict(compute.phase_flops),
        "elapsed_s": time.time() - t0,
        "tau": {k: v.tau for k, v in rep.items()},
        "slot_acceptance": rep["all"].slot_acceptance(),
        "texts": {k: [[t.committed, list(t.accepted)] for t in v.texts] for k, v in rep.items() if k != "all"},
    }


def paired(num_b, den_b, num_a, den_a) -> tuple[float, float, float]:
    """tau_a / tau_b over the same prompts (committed tokens `num`, rounds `den` per prompt) and its paired bootstrap
    interval."""
    return ((sum(num_a) / sum(den_a)) / (sum(num_b) / sum(den_b)), *paired_ratio_ci(num_b, den_b, num_a, den_a))
