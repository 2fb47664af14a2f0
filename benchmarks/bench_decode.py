"""AR vs speculative decoding at batch 1 on one target, interleaved so machine noise hits both alike.

    .venv/bin/python benchmarks/bench_decode.py [--drafter runs/full/sft/last] [--prompts 6] [--max-new-tokens 64]

A thin wrapper over `draftopd.eval.evaluate` on one prompt set: reports per-round milliseconds split into
draft / verify / other, AR milliseconds per token, the measured speedup (AR time / speculative time over the
same prompts), and the ideal speedup `tau * t_AR / (t_verify + t_draft)`: what the observed tau would give
with zero engine overhead. An untrained drafter gives tau 1 (and a speedup below 1): that is expected.
"""

from __future__ import annotations

import argparse
import json

from draftopd.config import DEFAULT_TARGET, DecodeConfig, DrafterConfig, EvalConfig
from draftopd.eval.evaluate import evaluate
from draftopd.models.drafter import load_drafter, new_drafter
from draftopd.models.load import load_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--drafter", help="checkpoint folder (default: an untrained drafter)")
    parser.add_argument("--prompt-set", default="mt-bench")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=DrafterConfig().block_size, help="untrained drafter only")
    args = parser.parse_args()
    target = load_target(args.target)
    drafter = load_drafter(args.drafter, target) if args.drafter else new_drafter(target, DrafterConfig(block_size=args.block_size))
    report = evaluate(
        target,
        drafter,
        EvalConfig(sets=(args.prompt_set,), num_prompts=args.prompts, decode=DecodeConfig(max_new_tokens=args.max_new_tokens)),
        progress=False,
    )
    row = report.row(args.prompt_set)
    print(
        json.dumps(
            {
                "target": args.target,
                "drafter": args.drafter or "untrained",
                "block_size": drafter.block_size,
                "prompts": row.prompts,
                "max_new_tokens": args.max_new_tokens,
                "tau": row.tau,
                "ar_ms_per_token": row.ar_ms_per_token,
                "spec_ms_per_round": row.spec_ms_per_round,
                "measured_speedup": row.speedup,
                "ideal_speedup": row.ideal_speedup,
                "ar_tokens_per_s": row.ar_tokens_per_s,
                "spec_tokens_per_s": row.spec_tokens_per_s,
                "mismatches": row.mismatches,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
