"""Compare drafters by held-out greedy tau without timing them: greedy replay on the evaluation prompts.

The target answers the evaluation prompts greedily once (30 per set, the prompts `draftopd eval` uses); each
drafter is then replayed over those answers (`eval/replay.py`), which gives the tau greedy speculative decoding
would measure, in minutes instead of a timed evaluation per drafter. Prints tau per set with 95% bootstrap
intervals and, for every drafter after the first, the paired tau ratio against the first and against the one
listed before it (same prompts resampled together). Speed still needs `draftopd eval`.

    python benchmarks/replay_compare.py runs/a/last runs/b/last [--dtype bfloat16] [--json out.json]

`--widen-vocab` adds, after each reduced-vocabulary drafter, the same drafter over the target's whole vocabulary
(`models.drafter.widen_vocab`, what `export --widen-vocab` writes; row label `DIR+wide`), so the paired ratio against
the row before it is what widening changes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftopd.config import EvalConfig  # noqa: E402
from draftopd.decode.stats import paired_ratio_ci, ratio_text  # noqa: E402
from draftopd.eval.replay import ReplayedTau, greedy_references, replay_scored, score_texts  # noqa: E402
from draftopd.models.drafter import load_drafter, widen_vocab  # noqa: E402
from draftopd.models.load import load_target  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("drafters", nargs="+")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--widen-vocab", action="store_true", help="also replay each reduced-vocabulary drafter widened")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ev = EvalConfig()
    target = load_target(args.target, dtype=getattr(torch, args.dtype))
    t = time.time()
    refs = greedy_references(target, ev)
    print(f"greedy references: {sum(len(p) for p, _ in refs.values())} prompts in {time.time() - t:.0f} s", file=sys.stderr)
    results: dict[str, dict[str, ReplayedTau]] = {}
    scored: dict = {}  # (set, target layers) -> the target's features of those texts, shared by drafters reading the same layers
    drafters = []  # (label, drafter)
    for path in args.drafters:
        drafter = load_drafter(path, target).to(target.dtype)
        drafters.append((path, drafter))
        if args.widen_vocab and drafter.spec.draft_vocab_size is not None:
            drafters.append((path + "+wide", widen_vocab(drafter)))
    for label, drafter in drafters:
        layers = tuple(drafter.spec.target_layer_ids)
        for name, (p, o) in refs.items():
            if (name, layers) not in scored:
                scored[name, layers] = score_texts(target, layers, p, o)
        per_set = {name: replay_scored(drafter, scored[name, layers]) for name in refs}
        per_set["all"] = ReplayedTau.pool(list(per_set.values()))
        results[label] = per_set
    names = [*ev.sets, "all"]
    print("| drafter | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for path, per_set in results.items():
        print(
            f"| {path} | "
            + " | ".join(f"{r.tau:.3f} [{r.tau_ci()[0]:.3f}, {r.tau_ci()[1]:.3f}]" for r in (per_set[n] for n in names))
            + " |"
        )
    out = {
        p: {
            n: {
                "tau": r.tau,
                "tau_ci": r.tau_ci(),
                "slot_acceptance": r.slot_acceptance(),
                "committed": [x.committed for x in r.texts],
                "rounds": [x.rounds for x in r.texts],
            }
            for n, r in s.items()
        }
        for p, s in results.items()
    }
    labels = list(results)
    pairs = [(labels[0], label) for label in labels[1:]] + list(zip(labels[1:], labels[2:]))
    for base, path in pairs:  # every drafter against the first, and each against the one before it
        cells = []
        for n in names:
            a, b = results[base][n].texts, results[path][n].texts
            ratio = results[path][n].tau / results[base][n].tau
            low, high = paired_ratio_ci([x.committed for x in a], [x.rounds for x in a], [x.committed for x in b], [x.rounds for x in b])
            cells.append(ratio_text(ratio, low, high))
            out[path].setdefault("ratio_to", {}).setdefault(base, {})[n] = {"ratio": ratio, "ci": [low, high]}
        print(f"| {path} / {base} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
