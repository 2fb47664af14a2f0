"""SFT vs Draft-OPD on SmolLM2-135M at the largest scale a 2-core CPU ran in about an hour (first measured 2026-11-28).

    .venv/bin/python experiments/sft-vs-opd/sft_vs_opd.py --scale full --out runs/full \
        --ablations no-rejected random-anchors estimate-kl no-decay

Same pipeline as `draftopd demo` (draftopd/experiment.py) with an SFT start built here: 240 regenerated ShareGPT
answers of up to 96 tokens (the first 240 train-split prompts), a 2-layer block-8 drafter, 400 SFT steps, then 20
Draft-OPD steps (exact KL, the paper's aggregation) against continued SFT at equal compute (the start's SFT settings
at lr 5e-4), 3 prompts per evaluation set; ablation rows, if asked for, run 6 Draft-OPD steps each from the same SFT
start. `--scale demo` is `./run demo`'s configuration. Prints the results table and writes summary.json, eval_*.json,
curves.json and tau_vs_compute.png under --out.

The recorded numbers (`docs/results/draft-opd-embedded.md`) came from the 2026-11-28 code. Since then the Draft-OPD
trainer's defaults and compute counter changed, the continued-SFT arm is configured by
`ExperimentConfig.continued_sft` (it had a learning rate of its own, `continued_sft_lr`), and the demo pipeline skips
the first 12,000 ShareGPT train prompts by default; this script sets the 2026-11-28 choices explicitly
(`start=None`, `prompt_offset=0`, continued SFT = the start's SFT settings at lr 5e-4), but a re-run is not expected to
repeat the recorded figures exactly.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from draftopd.config import DecodeConfig, DrafterConfig, EvalConfig, OptimConfig, SFTConfig
from draftopd.experiment import ABLATIONS, ExperimentConfig, format_results, run_experiment
from draftopd.train.losses import LossConfig
from draftopd.train.opd import OPDConfig

FULL_SFT = SFTConfig(steps=400, batch_size=4, anchors_per_seq=24, save_every=50, optim=OptimConfig(lr=1e-3))
FULL = ExperimentConfig(
    start=None,
    prompt_offset=0,
    train_prompts=240,
    regen_max_new_tokens=96,
    regen_batch=8,
    drafter=DrafterConfig(num_layers=2, block_size=8),
    sft=FULL_SFT,
    opd=OPDConfig(
        steps=20,
        prompts_per_rollout=4,
        rollouts_per_step=1,
        rollout=DecodeConfig(max_new_tokens=96),
        save_every=5,
        loss=LossConfig(mode="exact", aggregation="paper"),
        optim=OptimConfig(lr=5e-4, min_warmup_steps=1),
    ),
    continued_sft=replace(FULL_SFT, optim=replace(FULL_SFT.optim, lr=5e-4)),
    curve_prompts=8,
    curve_every=5,
    eval=EvalConfig(num_prompts=3, decode=DecodeConfig(max_new_tokens=96)),
    ablation_steps=6,
    synthetic=False,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["demo", "full"], default="full")
    parser.add_argument("--out", default="runs/full")
    parser.add_argument("--ablations", nargs="*", default=[], choices=sorted(ABLATIONS))
    args = parser.parse_args()
    base = FULL if args.scale == "full" else ExperimentConfig()
    summary = run_experiment(replace(base, out_dir=args.out, ablations=tuple(args.ablations), synthetic=False))  # the embedded target only
    print(format_results(summary))
    print(json.dumps(summary["results"], indent=2))


if __name__ == "__main__":
    main()
