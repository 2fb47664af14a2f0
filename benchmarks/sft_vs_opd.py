"""The headline experiment: SFT warm start, then equal compute of continued SFT vs Draft-OPD, plus ablations.

    .venv/bin/python benchmarks/sft_vs_opd.py --scale full [--out runs/headline] [--ablations no-rejected ...]

Same pipeline as `draftopd demo` (draftopd/experiment.py). `--scale demo` is the demo's size;
`--scale full` fits in about an hour on 2 CPU cores (240 regenerated ShareGPT answers of up to 96 tokens,
a 2-layer block-8 drafter, 400 SFT steps, 20 Draft-OPD steps against equal-compute continued SFT, 3 prompts
per evaluation set; ablation rows, if asked for, run 6 Draft-OPD steps each from the same SFT start). Prints the results
table and writes summary.json, eval_*.json, curves.json and tau_vs_compute.png under --out.
"""

from __future__ import annotations

import argparse
import json

from dataclasses import replace

from draftopd.config import DrafterConfig, EvalConfig, OptimConfig, SFTConfig
from draftopd.experiment import ABLATIONS, ExperimentConfig, format_results, run_experiment
from draftopd.train.losses import LossConfig
from draftopd.train.opd import OPDConfig

FULL = ExperimentConfig(
    train_prompts=240, regen_max_new_tokens=96, regen_batch=8, drafter=DrafterConfig(num_layers=2, block_size=8),
    sft=SFTConfig(steps=400, batch_size=4, anchors_per_seq=24, save_every=50, optim=OptimConfig(lr=1e-3)),
    opd=OPDConfig(steps=20, prompts_per_rollout=4, rollouts_per_step=1, max_new_tokens=96, save_every=5,
                  loss=LossConfig(mode="exact", aggregation="paper"), optim=OptimConfig(lr=5e-4, min_warmup_steps=1)),
    continued_sft_lr=5e-4, curve_prompts=8, curve_every=5, eval=EvalConfig(num_prompts=3, max_new_tokens=96), ablation_steps=6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=["demo", "full"], default="full")
    parser.add_argument("--out", default="runs/headline")
    parser.add_argument("--ablations", nargs="*", default=[], choices=sorted(ABLATIONS))
    args = parser.parse_args()
    base = FULL if args.scale == "full" else ExperimentConfig()
    summary = run_experiment(replace(base, out_dir=args.out, ablations=tuple(args.ablations)))
    print(format_results(summary))
    print(json.dumps(summary["results"], indent=2))


if __name__ == "__main__":
    main()
