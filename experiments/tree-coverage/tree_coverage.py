"""Would a tree of drafts pay? Top-k coverage of a DFlash drafter's slots, and the tau of top-k trees, by replay.

A DFlash drafter proposes every slot of a block from one forward, so each slot has its own distribution and a
Medusa-style tree comes for free on the drafting side: keep the top `k_j` tokens at slot j and verify every path of
the Cartesian product in one target pass (tree attention). Greedy verification of such a tree is lossless (the
committed path is the longest one that equals the target's argmaxes), and it accepts slot j exactly when the
target's token at every slot up to j is among that slot's top k. This script measures that without building the
tree: it replays the drafter over the target's greedy answers to the evaluation prompts (`eval/replay.py`, the tau
the decoder would report), takes the rank of the target's token at each slot of every anchor, and walks the rounds
for each tree shape. Reported: per-slot top-k coverage (over anchors), and per shape its tau with a 95% bootstrap
interval over prompts and its width (nodes: sum over depths of the product of the k's, plus the anchor).

What a tree costs is the verify of its width (`benchmarks/bench_verify.py` gives a chain's cost per width on a
machine; a tree's custom attention mask costs at least as much): ideal speedup = tau / (verify(width) + draft).

    python experiments/tree-coverage/tree_coverage.py [--drafter draftopd/drafters/smollm2-135m-dflash] [--json runs/tree.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from draftopd.config import EvalConfig  # noqa: E402
from draftopd.decode.stats import bootstrap_ratio_ci  # noqa: E402
from draftopd.eval.replay import anchor_logits, greedy_references, score_texts, walk_rounds  # noqa: E402
from draftopd.models.drafter import load_drafter  # noqa: E402
from draftopd.models.load import load_target  # noqa: E402

SHAPES = [
    (1,),
    (1, 1),
    (1,) * 7,
    (2,),
    (3,),
    (4,),
    (2, 1),
    (3, 1),
    (4, 1),
    (2, 2),
    (3, 2),
    (4, 2),
    (4, 1, 1),
    (8, 1),
    (4, 2, 1),
    (8, 2),
    (16, 1),
]
NEVER = 1 << 30  # rank of a token the drafter cannot propose (outside its draft vocabulary, or past the text's end)


def target_ranks(drafter, scored) -> list[torch.Tensor]:
    """Per text, (anchors, K-1): the rank of the text's next token at each slot among the drafter's logits."""
    ranks = []
    for s in scored:
        logits, truth, inside = anchor_logits(drafter, s)
        truth = drafter.target_to_draft(truth)
        rank = (logits.float() > logits.float().gather(-1, truth.clamp(min=0)[..., None])).sum(-1)
        rank[(truth < 0) | ~inside] = NEVER
        ranks += [rank[i, : max(length - 1, 0)] for i, length in enumerate(s.lengths)]
    return ranks


def tree_rounds(ranks: torch.Tensor, shape: tuple[int, ...], length: int):
    """The rounds greedy decoding with a top-k tree of `shape` takes over a text of `length` new tokens."""
    inside = torch.ones(ranks.shape[0], dtype=torch.bool)
    accepted = torch.zeros(ranks.shape[0], dtype=torch.long)
    for j, k in enumerate(shape):
        inside &= ranks[:, j] < k
        accepted += inside.long()
    return walk_rounds(accepted.tolist(), length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--drafter", default="draftopd/drafters/smollm2-135m-dflash")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ev = EvalConfig()
    target = load_target(args.target, dtype=getattr(torch, args.dtype))
    drafter = load_drafter(args.drafter, target).to(target.dtype).eval()
    if drafter.spec.arch != "dflash":
        raise SystemExit("a top-k tree per slot needs a parallel drafter (DFlash)")
    ranks = []
    for prompts, outputs in greedy_references(target, ev).values():
        ranks += target_ranks(drafter, score_texts(target, drafter.spec.target_layer_ids, prompts, outputs))
    pooled = torch.cat(ranks)
    coverage = {f"slot {j + 1}": {k: float((pooled[:, j] < k).float().mean()) for k in (1, 2, 3, 4, 8, 16)} for j in range(3)}
    print("| slot | " + " | ".join(f"top-{k}" for k in (1, 2, 3, 4, 8, 16)) + " |\n|---|" + "---|" * 6)
    for slot, row in coverage.items():
        print(f"| {slot} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    print("\n| tree (top-k per slot) | width (nodes + anchor) | tau [95% CI] |\n|---|---|---|")
    shapes = {}
    for shape in SHAPES:
        texts = [tree_rounds(r, shape, r.shape[0] + 1) for r in ranks]
        committed, rounds = [t.committed for t in texts], [t.rounds for t in texts]
        tau, ci = sum(committed) / sum(rounds), bootstrap_ratio_ci(committed, rounds)
        width = 1 + sum(math.prod(shape[: d + 1]) for d in range(len(shape)))
        shapes["x".join(map(str, shape))] = {"width": width, "tau": tau, "tau_ci": ci}
        print(f"| {'x'.join(map(str, shape))} | {width} | {tau:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] |")
    if args.json:
        Path(args.json).write_text(json.dumps({"drafter": args.drafter, "coverage": coverage, "shapes": shapes}, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
