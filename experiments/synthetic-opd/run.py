"""Draft-OPD against SFT on the synthetic target, from a plateaued and a low-tau start, 3 seeds, matched budgets.

The protocol (fixed before running; README.md beside this file) is `draftopd.study.StudyConfig`'s defaults:
    python experiments/synthetic-opd/run.py --out runs/synthetic-opd
prints one table per start and budget and writes `summary.json` in `--out`. Cached and resumable: a second run only
does what is missing. `--quick` runs the same protocol at toy sizes (minutes; not a result).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from draftopd.config import OptimConfig, SFTConfig  # noqa: E402
from draftopd.study import ARMS, StudyConfig, format_summary, run_study  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/synthetic-opd")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(StudyConfig.seeds))
    parser.add_argument("--arms", nargs="+", default=list(StudyConfig.arms), choices=list(ARMS))
    parser.add_argument("--low-arms", nargs="+", default=list(StudyConfig.low_arms), choices=list(ARMS))
    parser.add_argument("--opd-updates", type=int, default=StudyConfig.opd_updates)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="toy sizes, to check the pipeline (minutes)")
    parser.add_argument(
        "--cached-only", action="store_true", help="train nothing: summarize the arms already scored (summary.partial.md / .json)"
    )
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    cfg = StudyConfig(seeds=tuple(args.seeds), arms=tuple(args.arms), low_arms=tuple(args.low_arms), opd_updates=args.opd_updates)
    if args.quick:
        cfg = replace(
            cfg,
            start_prompts=200,
            rollout_prompts=128,
            eval_prompts=40,
            tuning_prompts=40,
            new_tokens=64,
            opd_updates=2,
            start_sft=SFTConfig(steps=300, batch_size=16, anchors_per_seq=32, save_every=100, optim=OptimConfig(lr=2e-3)),
            low_every=10,
            low_tau=(1.3, 2.5),
            resamples=200,
        )
    t0 = time.time()
    log = lambda line: print(f"[{time.time() - t0:7.0f} s] {line}", flush=True)  # noqa: E731
    summary = run_study(cfg, args.out, log=log, cached_only=args.cached_only)
    print(format_summary(summary))
    (Path(args.out) / ("summary.partial.md" if args.cached_only else "summary.md")).write_text(format_summary(summary) + "\n")
    print(json.dumps({"seconds": round(time.time() - t0)}))


if __name__ == "__main__":
    main()
