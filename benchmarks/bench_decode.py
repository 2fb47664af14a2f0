"""AR vs speculative decoding at batch 1 on one target, interleaved so machine noise hits both alike.

    .venv/bin/python benchmarks/bench_decode.py [--drafter runs/demo/sft] [--prompts 6] [--max-new-tokens 64]

Reports per-round milliseconds split into draft / verify / other, AR milliseconds per token, the measured
speedup (AR time / speculative time over the same prompts), and the ideal speedup
`tau * t_AR / (t_verify + t_draft)`: what the observed tau would give with zero engine overhead.
An untrained drafter gives tau near 1 (and a speedup below 1): that is expected.
"""

from __future__ import annotations

import argparse
import json

from draftopd.config import DEFAULT_TARGET, DecodeConfig, DrafterConfig
from draftopd.data.prompts import load_prompts, render_prompt
from draftopd.decode.speculative import autoregressive_generate, generate
from draftopd.decode.trace import Timing
from draftopd.models.dflash import load_drafter, new_drafter
from draftopd.models.load import load_target


def run(target_name: str, drafter_path: str | None, prompt_set: str, n: int, max_new: int, block_size: int) -> dict:
    target = load_target(target_name)
    drafter = load_drafter(drafter_path, target) if drafter_path else new_drafter(target, DrafterConfig(block_size=block_size))
    prompts = [render_prompt(p, target.tokenizer) for p in load_prompts(prompt_set, limit=n, split="heldout").prompts]
    cfg = DecodeConfig(max_new_tokens=max_new)
    generate(target, drafter, prompts[:1], DecodeConfig(max_new_tokens=8))  # warm-up
    ar, sd, ar_tokens, sd_tokens, sd_committed = Timing(), Timing(), 0, 0, 0
    for ids in prompts:  # interleaved: AR then speculative on the same prompt
        a = autoregressive_generate(target, [ids], cfg)
        s = generate(target, drafter, [ids], cfg)
        assert a.traces[0].output == s.traces[0].output, "greedy speculative output differs from AR"
        for acc, new in ((ar, a.timing), (sd, s.timing)):
            for f in ("draft_s", "verify_s", "other_s", "prefill_s", "rounds"):
                setattr(acc, f, getattr(acc, f) + getattr(new, f))
        ar_tokens += len(a.traces[0].output)
        sd_tokens += len(s.traces[0].output)
        sd_committed += len(s.traces[0].output) - 1
    tau = sd_committed / sd.rounds
    t_ar = (ar.verify_s + ar.other_s) / ar.rounds
    t_draft, t_verify, t_other = sd.draft_s / sd.rounds, sd.verify_s / sd.rounds, sd.other_s / sd.rounds
    return {
        "target": target_name, "drafter": drafter_path or "untrained", "prompts": len(prompts), "max_new_tokens": max_new,
        "block_size": drafter.block_size, "tau": tau, "ar_ms_per_token": 1000 * t_ar,
        "spec_ms_per_round": {"draft": 1000 * t_draft, "verify": 1000 * t_verify, "other": 1000 * t_other},
        "measured_speedup": ar.total_s / sd.total_s, "ideal_speedup": tau * t_ar / (t_verify + t_draft),
        "ar_tokens_per_s": ar_tokens / ar.total_s, "spec_tokens_per_s": sd_tokens / sd.total_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--drafter")
    parser.add_argument("--prompt-set", default="mt-bench")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=DrafterConfig().block_size)
    args = parser.parse_args()
    print(json.dumps(run(args.target, args.drafter, args.prompt_set, args.prompts, args.max_new_tokens, args.block_size), indent=2))


if __name__ == "__main__":
    main()
