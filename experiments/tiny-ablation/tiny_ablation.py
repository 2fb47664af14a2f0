"""Draft-OPD ablations on a tiny random target, in a few minutes on one CPU core.

    .venv/bin/python experiments/tiny-ablation/tiny_ablation.py [--seeds 0 1 2] [--sft-steps 30] [--opd-steps 12]

A tiny Llama target (vocab 64, sharpened head so greedy tokens have probability ~0.6) answers random
prompts; a drafter is SFT-trained briefly (the warm start); then every Draft-OPD variant of
`draftopd.experiment.ABLATIONS` (exact KL for the full method, as in the demo) and compute-matched continued
SFT run from that same start. Prints held-out tau per variant and seed, and the mean. Held-out prompts are
never trained on. Numbers are only comparable within one run.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from draftopd.config import DecodeConfig, DrafterConfig, OptimConfig, SFTConfig
from draftopd.decode.speculative import autoregressive_generate, generate
from draftopd.decode.stats import summarize
from draftopd.experiment import ABLATIONS, _ablation_config
from draftopd.models.drafter import new_drafter
from draftopd.models.load import tiny_target
from draftopd.train.losses import LossConfig
from draftopd.train.opd import OPDConfig, train_opd
from draftopd.train.sft import train_sft


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


def run_seed(seed: int, sft_steps: int, opd_steps: int, sharpness: float, work: Path) -> dict[str, float]:
    target = tiny_target(vocab_size=64, hidden_size=64, num_layers=4, sharpness=sharpness, seed=seed)
    rng = random.Random(seed)
    prompts = [[rng.randrange(60) for _ in range(rng.randint(3, 10))] for _ in range(96)]
    answers = autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=40, stop_at_eos=False)).traces
    train, heldout = [Example(tuple(t.prompt), tuple(t.output)) for t in answers[:64]], prompts[64:]

    def tau(drafter) -> float:
        return summarize(generate(target, drafter, heldout, DecodeConfig(max_new_tokens=32, stop_at_eos=False)), 8).tau

    start = new_drafter(target, DrafterConfig(block_size=8), seed=seed)
    train_sft(
        target,
        start,
        train,
        SFTConfig(steps=sft_steps, batch_size=8, anchors_per_seq=16, seed=seed, optim=OptimConfig(lr=3e-3)),
        work / f"sft{seed}",
        progress=False,
    )
    seq = torch.tensor([list(train[0].prompt_ids + train[0].response_ids)])
    with torch.no_grad():
        p_top = torch.softmax(target.model(seq).logits[0, len(train[0].prompt_ids) - 1 : -1], -1).max(-1).values.mean()
    print(f"seed {seed}: mean target probability of its greedy tokens {float(p_top):.2f}", flush=True)
    result = {"sft start": tau(start)}
    base = OPDConfig(
        steps=opd_steps,
        prompts_per_rollout=8,
        rollouts_per_step=1,
        rollout=DecodeConfig(max_new_tokens=32, seed=seed),
        loss=LossConfig(mode="exact", aggregation="paper"),
        optim=OptimConfig(lr=2e-3, min_warmup_steps=1),
    )
    for name in ABLATIONS:
        drafter = copy.deepcopy(start)
        train_opd(target, drafter, prompts[:64], _ablation_config(base, name), work / f"{name}{seed}", progress=False)
        result[f"draft-opd {name}"] = tau(drafter)
    flops = json.loads((work / f"full{seed}" / "metrics.jsonl").read_text().splitlines()[-1])["compute/flops"]
    drafter = copy.deepcopy(start)
    train_sft(
        target,
        drafter,
        train,
        SFTConfig(steps=10 * opd_steps, batch_size=8, anchors_per_seq=16, seed=seed + 1, max_flops=flops, optim=OptimConfig(lr=2e-3)),
        work / f"cont{seed}",
        progress=False,
    )
    result["continued sft (equal FLOPs)"] = tau(drafter)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sft-steps", type=int, default=30)
    parser.add_argument("--opd-steps", type=int, default=12)
    parser.add_argument("--sharpness", type=float, default=30.0, help="target head scale: 30 gives greedy p ~0.6, 100 ~0.9")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as work:
        results = [run_seed(s, args.sft_steps, args.opd_steps, args.sharpness, Path(work)) for s in args.seeds]
    print(f"| variant | {' | '.join(f'seed {s}' for s in args.seeds)} | mean |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for name in results[0]:
        values = [r[name] for r in results]
        print(f"| {name} | {' | '.join(f'{v:.3f}' for v in values)} | {sum(values) / len(values):.3f} |")


if __name__ == "__main__":
    main()
