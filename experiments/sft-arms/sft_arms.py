"""One arm of the small SFT comparisons on a 2-core CPU, and the continuation stages that made v2 and v3.

Results: `docs/results/strong-drafters.md` ("Small CPU comparisons scored by greedy replay", "Regenerated on a 2-core
CPU: v2 and v3"). `runs/...` below are working folders (not in git); R is the H200 run's regenerated answers
(`experiments/train-at-scale/train_at_scale.py run` on a GPU) and runs/scale-gpu/drafter its drafter.

    R=runs/scale-gpu/regenerated-1920.jsonl.gz
    python experiments/sft-arms/sft_arms.py fixed --out runs/regen-vs-fixed/fixed   # from scratch, 1,000 ShareGPT answers
    python experiments/sft-arms/sft_arms.py regen --regenerated $R --out runs/regen-vs-fixed/regen   # from scratch, the last 1,000 regenerated
    python experiments/sft-arms/sft_arms.py old --regenerated $R --out runs/continue/old --drafter runs/scale-gpu/drafter  # its own 768 answers
    python experiments/sft-arms/sft_arms.py new --regenerated $R --out runs/continue/new --drafter runs/scale-gpu/drafter  # 1,152 unseen ones
    python experiments/sft-arms/sft_arms.py fixed --copy-target-layers 0 1 --out runs/init/first   # fixed, layers start as target layers 0, 1
    python experiments/sft-arms/sft_arms.py fixed --num-layers 1 --threads 2 --out runs/grid/layers1   # also --num-layers 3,
        # --slot-decay 2, --target-layer-ids 1 27, --anchors-per-seq 384 --steps 30, --feature-noise 0.2 (the switches of the choice grid;
        # everything else as `fixed`)
    python experiments/sft-arms/sft_arms.py more --drafter draftopd/drafters/smollm2-135m-dflash --threads 2 --out runs/more  # 150 steps on
        # 1,200 ShareGPT answers to prompts past the first 2,000 of the train sample (none of its regenerated prompts)
    python experiments/sft-arms/sft_arms.py continue --drafter draftopd/drafters/smollm2-135m-dflash --regenerated runs/cpu-regen/regen.jsonl \
        --steps 440 --threads 2 --out runs/cpu-regen/sft   # every record of a CPU regeneration (`draftopd regenerate`), lr 3e-4

Each arm trains with the target online (bf16), one thread by default (two arms can share a 2-core machine), and
writes a checkpoint to OUT/last; `benchmarks/replay_compare.py` then scores the arms on the same held-out prompts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from draftopd.config import DrafterConfig, OptimConfig, SFTConfig  # noqa: E402
from draftopd.data.answers import load_answers  # noqa: E402
from draftopd.data.features import frequent_tokens  # noqa: E402
from draftopd.data.regenerate import load_regenerated  # noqa: E402
from draftopd.models.drafter import load_drafter, new_drafter  # noqa: E402
from draftopd.models.load import load_target  # noqa: E402
from draftopd.train.sft import train_sft  # noqa: E402

TRAINED_ON = 768  # the H200 drafter trained on the first 768 records of its regenerated file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("arm", choices=("fixed", "regen", "old", "new", "more", "continue"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--drafter", default=None, help="start drafter of the old/new/more/continue arms")
    parser.add_argument(
        "--regenerated", default=None, help="regenerated answers: the H200 run's (train_at_scale.py) or a `draftopd regenerate` file"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="fixed/regen arms: drafter init and anchor sampling seed")
    parser.add_argument("--block-size", type=int, default=8, help="fixed/regen arms: the drafter's block size")
    parser.add_argument("--num-layers", type=int, default=2, help="fixed/regen arms: drafter layers")
    parser.add_argument("--target-layer-ids", type=int, nargs="+", default=[1, 10, 19, 27], help="fixed/regen arms: target layers fed")
    parser.add_argument("--slot-decay", type=float, default=None, help="fixed/regen arms: SFTConfig.slot_decay (default: 4 at block 8)")
    parser.add_argument("--anchors-per-seq", type=int, default=64, help="fixed/regen arms: anchors a sequence (384: every position)")
    parser.add_argument("--feature-noise", type=float, default=0.0, help="fixed/regen arms: SFTConfig.feature_noise")
    parser.add_argument("--steps", type=int, default=120, help="fixed/regen/continue arms: SFT steps")
    parser.add_argument(
        "--copy-target-layers",
        type=int,
        nargs="+",
        default=None,
        help="fixed/regen arms: the drafter layers start as copies of these target layers, one per layer (default: random)",
    )
    args = parser.parse_args()
    if args.arm in ("old", "new", "more", "continue") and args.drafter is None:
        parser.error(f"the {args.arm} arm continues a drafter: pass --drafter")
    if args.arm in ("regen", "old", "new", "continue") and args.regenerated is None:
        parser.error(f"the {args.arm} arm trains on regenerated answers: pass --regenerated")
    torch.set_num_threads(args.threads)
    target = load_target("smollm2-135m", dtype=torch.bfloat16)
    regenerated = load_regenerated(args.regenerated).examples if args.regenerated else []
    if args.arm in ("fixed", "regen"):
        examples = (
            regenerated[-1000:] if args.arm == "regen" else load_answers(target.tokenizer, limit=1300, max_response_tokens=384)[:1000]
        )
        drafter = new_drafter(
            target,
            DrafterConfig(
                num_layers=args.num_layers,
                block_size=args.block_size,
                target_layer_ids=tuple(args.target_layer_ids),
                mask_token_id=16,
                vocab_size=8192,
                copy_target_layers=tuple(args.copy_target_layers) if args.copy_target_layers else None,
            ),
            seed=args.seed,
        )
        drafter.set_draft_vocab(frequent_tokens(examples, target.vocab_size, 8192, labels="text"))
        cfg = SFTConfig(
            steps=args.steps,
            batch_size=8,
            anchors_per_seq=args.anchors_per_seq,
            loss="kl",
            labels="text" if args.arm == "regen" else "greedy",
            save_every=args.steps,
            seed=args.seed,
            slot_decay=args.slot_decay,
            feature_noise=args.feature_noise,
            optim=OptimConfig(lr=2e-3),
        )
    elif args.arm == "more":
        examples = load_answers(target.tokenizer, limit=3500, max_response_tokens=384)[-1200:]
        drafter = load_drafter(args.drafter, target)
        cfg = SFTConfig(steps=150, batch_size=8, anchors_per_seq=64, loss="kl", labels="greedy", save_every=50, optim=OptimConfig(lr=3e-4))
    else:  # old / new / continue: the drafter goes on with regenerated answers (all of them for continue)
        examples = {"old": regenerated[:TRAINED_ON], "new": regenerated[TRAINED_ON:]}.get(args.arm, regenerated)
        drafter = load_drafter(args.drafter, target)
        steps = args.steps if args.arm == "continue" else 100
        cfg = SFTConfig(
            steps=steps,
            batch_size=8,
            anchors_per_seq=64,
            loss="kl",
            labels="text",
            save_every=50 if args.arm == "continue" else 100,
            optim=OptimConfig(lr=3e-4),
        )
    print(f"{args.arm}: {len(examples)} answers, {sum(len(e.response_ids) for e in examples)} response tokens", flush=True)
    t = time.time()
    train_sft(target, drafter, examples, cfg, args.out, progress=True)
    print(f"{args.arm}: done in {time.time() - t:.0f} s -> {args.out}/last", flush=True)


if __name__ == "__main__":
    main()
