"""Has a drafter memorised its training answers? Greedy-replay tau on greedy answers it trained on vs unseen ones.

Both sets come from one regenerated file (same prompt pool, same regeneration); only greedy (temperature 0) records
are used, so their text is the target's greedy text and replay gives the tau decoding would (`eval/replay.py`).
A large gap means the drafter is data-limited: more answers, not more steps, is what it needs.

    python experiments/train-at-scale/memorisation.py --drafter runs/scale-gpu/drafter \
        --regenerated runs/scale-gpu/regenerated-1920.jsonl.gz --trained-first 768   # the H200 run's drafter and answers
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from draftopd.eval.replay import replay_tau  # noqa: E402
from draftopd.models.drafter import load_drafter  # noqa: E402
from draftopd.models.load import load_target  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--drafter", required=True)
    parser.add_argument("--regenerated", required=True, help="regenerated JSONL(.gz); its first --trained-first records were trained on")
    parser.add_argument("--trained-first", type=int, required=True)
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--texts", type=int, default=48, help="greedy answers per set")
    parser.add_argument("--tokens", type=int, default=160, help="response tokens replayed per answer")
    args = parser.parse_args()
    opener = gzip.open if args.regenerated.endswith(".gz") else open
    with opener(args.regenerated, "rt") as f:
        records = [json.loads(line) for line in f if line.strip()]
    greedy = [(i, r) for i, r in enumerate(records) if r["settings"]["temperature"] == 0.0]
    sets = {
        "trained-on": [r for i, r in greedy if i < args.trained_first][: args.texts],
        "unseen": [r for i, r in greedy if i >= args.trained_first][: args.texts],
    }
    target = load_target(args.target, dtype=getattr(torch, args.dtype))
    drafter = load_drafter(args.drafter, target).to(target.dtype)
    print("| answers | texts | tau [95% CI] | slot 1 / 2 / 3 acceptance |\n|---|---|---|---|")
    for name, rs in sets.items():
        t = time.time()
        rep = replay_tau(target, drafter, [r["prompt_ids"] for r in rs], [r["response_ids"][: args.tokens] for r in rs])
        low, high = rep.tau_ci()
        slots = " / ".join(f"{x:.2f}" for x in rep.slot_acceptance()[:3])
        print(f"| {name} | {len(rs)} | {rep.tau:.2f} [{low:.2f}, {high:.2f}] | {slots} |   ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
