"""Would Draft-OPD beat SFT if its rollouts cost nothing? Hard-label SFT on the greedy answers with each Draft-OPD seed's
teacher + training compute (its rollouts left out), from the same plateau start, scored like every arm of the study.

Needs a study folder where the plateau Draft-OPD arm has run (`run.py`):
    python experiments/synthetic-opd/free_rollouts.py --study runs/synthetic-opd --out runs/synthetic-opd-free --seeds 0 1 2
prints each seed's tau and Draft-OPD / this arm with the study's hierarchical interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", required=True, help="a study folder with plateau/opd/both/seed*/run (run.py's --out)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import torch

    from draftopd.models.drafter import load_drafter, new_drafter
    from draftopd.models.load import load_target
    from draftopd.study import Scorer, Scores, StudyConfig, StudyData, compare, run_arm

    torch.set_num_threads(args.threads)
    study, out, cfg = Path(args.study), Path(args.out), StudyConfig()
    target = load_target(cfg.target)
    data = StudyData.from_dict(json.loads((study / "data.json").read_text()))
    score = Scorer(target, data.eval_prompts, data.eval_outputs, new_drafter(target, cfg.drafter).spec.target_layer_ids)
    start = load_drafter(study / "starts" / "plateau", target).float()
    free, opd = [], []
    for seed in args.seeds:
        opd_dir = study / "plateau" / "opd" / "both" / f"seed{seed}"
        last = json.loads((opd_dir / "run" / "metrics.jsonl").read_text().splitlines()[-1])
        budget = last["compute/flops_teacher"] + last["compute/flops_train"]
        folder = out / "sft-greedy-ce" / f"seed{seed}"
        drafter, spent = run_arm(target, start, "sft-greedy-ce", seed, "flops", budget, data, cfg, folder / "run")
        free.append(score(drafter))
        (folder / "scores.json").write_text(json.dumps({"flops": spent, "eval": asdict(free[-1])}))
        opd.append(Scores(**json.loads((opd_dir / "scores.json").read_text())["eval"]))
        print(f"seed {seed}: budget {budget / 1e12:.2f} TFLOPs, spent {spent / 1e12:.2f}, eval tau {free[-1].tau:.3f}", flush=True)
    print(f"Draft-OPD / SFT with free rollouts: {compare('sft-free', free, 'opd', opd).text()}")


if __name__ == "__main__":
    main()
