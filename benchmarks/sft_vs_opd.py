"""The headline experiment: SFT warm start, then equal compute of continued SFT vs Draft-OPD, plus ablations.

    .venv/bin/python benchmarks/sft_vs_opd.py [--out runs/headline] [--ablations no-rejected random-anchors ...]

Same pipeline as `draftopd demo` (draftopd/experiment.py), with the ablation rows switched on. Prints the
results table and writes summary.json, eval_*.json, curves.json and tau_vs_compute.png under --out.
"""

from __future__ import annotations

import argparse
import json

from draftopd.experiment import ABLATIONS, ExperimentConfig, format_results, run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/headline")
    parser.add_argument("--ablations", nargs="*", default=sorted(ABLATIONS), choices=sorted(ABLATIONS))
    args = parser.parse_args()
    summary = run_experiment(ExperimentConfig(out_dir=args.out, ablations=tuple(args.ablations)))
    print(format_results(summary))
    print(json.dumps(summary["results"], indent=2))


if __name__ == "__main__":
    main()
