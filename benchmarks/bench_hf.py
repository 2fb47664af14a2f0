"""Hugging Face `generate` vs draftopd decoding on the embedded target, batch 1, interleaved per prompt.

    .venv/bin/python benchmarks/bench_hf.py [--prompts 10] [--max-new-tokens 96] [--dtype float32|bfloat16]
                                            [--drafter runs/full/sft/last] [--num-drafts 2] [--lookup-ngram 3]

For each of N MT-Bench prompts, the methods run back to back (their order rotated per prompt, so machine noise
and cache warmth hit all alike), greedy, stopping at the same EOS ids and the same max_new_tokens:

* `hf-greedy`: `model.generate(do_sample=False)`, HF's plain autoregressive decoding;
* `hf-pld`: `model.generate(prompt_lookup_num_tokens=8)`, HF's prompt-lookup speculative decoding (no drafter);
* `draftopd-ar`: `draftopd.decode.speculative.autoregressive_generate`, our plain decoding;
* `draftopd-spec`: `draftopd.decode.speculative.generate` with the `--drafter` checkpoint (default: an untrained
  drafter, which accepts almost nothing and shows the engine's overhead floor, not a speedup);
* `draftopd-lookup` (only with `--lookup-ngram n`): the same with prompt lookup (`DecodeConfig.lookup_ngram`): rounds
  whose last n tokens occurred earlier copy what followed, the others use the drafter;
* `draftopd-lookup-only` (with `--lookup-ngram n`): prompt lookup alone in our engine (`num_drafts` 0: the drafter
  never drafts, a round without a match is a plain step), the counterpart of `hf-pld`.

tokens/s = total new tokens / total wall seconds of the calls (prefill included); `vs best HF` = tokens/s / the
larger of hf-greedy's and hf-pld's tokens/s; `== hf-greedy` counts prompts whose new tokens equal hf-greedy's
exactly (in float32 all four should match; in bfloat16 a K-token verify pass may round differently).
`[95% CI]` is a paired percentile bootstrap over prompts of each method's tokens/s over the best HF baseline's
(the same resampled prompts for both).
One warm-up call per method (8 tokens) precedes the timed runs. Threads are pinned to 2.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from draftopd.config import DEFAULT_TARGET, DecodeConfig, DrafterConfig
from draftopd.data.prompts import load_prompts, render_prompt
from draftopd.decode.speculative import autoregressive_generate, generate
from draftopd.decode.stats import paired_ratio_ci
from draftopd.models.drafter import load_drafter, new_drafter
from draftopd.models.load import load_target

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
HF = ("hf-greedy", "hf-pld")
PLD_TOKENS = 8


@dataclass(frozen=True)
class Run:
    """One call: the new tokens, its wall seconds, and the verify rounds (speculative draftopd only, else 0)."""

    tokens: tuple[int, ...]
    seconds: float
    rounds: int = 0


def hf_run(target, ids: list[int], max_new_tokens: int, pld: bool) -> Run:
    """HF greedy generate (prompt lookup with `pld`), same EOS ids as draftopd; new tokens = output past the prompt."""
    x = torch.tensor([ids], device=target.device)
    extra = {"prompt_lookup_num_tokens": PLD_TOKENS} if pld else {}
    t0 = time.perf_counter()
    out = target.model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=sorted(target.eos_ids),
        pad_token_id=target.pad_id,
        **extra,
    )
    return Run(tuple(out[0, len(ids) :].tolist()), time.perf_counter() - t0)


def draftopd_run(fn: Callable, ids: list[int], cfg: DecodeConfig) -> Run:
    """One draftopd generation call at batch 1 (wall clock around the call, like the HF side)."""
    t0 = time.perf_counter()
    gen = fn([ids], cfg)
    seconds = time.perf_counter() - t0
    return Run(tuple(gen.traces[0].output), seconds, gen.traces[0].rounds)


def methods(
    target, drafter, max_new_tokens: int, num_drafts: int | None = None, lookup_ngram: int = 0
) -> dict[str, Callable[[list[int]], Run]]:
    cfg = DecodeConfig(max_new_tokens=max_new_tokens)
    spec_cfg = DecodeConfig(max_new_tokens=max_new_tokens, num_drafts=num_drafts)
    run = {
        "hf-greedy": lambda ids: hf_run(target, ids, max_new_tokens, pld=False),
        "hf-pld": lambda ids: hf_run(target, ids, max_new_tokens, pld=True),
        "draftopd-ar": lambda ids: draftopd_run(lambda p, c: autoregressive_generate(target, p, c), ids, cfg),
        "draftopd-spec": lambda ids: draftopd_run(lambda p, c: generate(target, drafter, p, c), ids, spec_cfg),
    }
    if lookup_ngram:
        lookup_cfg = DecodeConfig(max_new_tokens=max_new_tokens, num_drafts=num_drafts, lookup_ngram=lookup_ngram)
        run["draftopd-lookup"] = lambda ids: draftopd_run(lambda p, c: generate(target, drafter, p, c), ids, lookup_cfg)
        alone_cfg = DecodeConfig(max_new_tokens=max_new_tokens, num_drafts=0, lookup_ngram=lookup_ngram)
        run["draftopd-lookup-only"] = lambda ids: draftopd_run(lambda p, c: generate(target, drafter, p, c), ids, alone_cfg)
    return run


def measure(run: dict[str, Callable], prompts: list[list[int]]) -> dict[str, list[Run]]:
    """Every method on every prompt; per prompt i the method order is the methods' order rotated by i."""
    names = tuple(run)
    results: dict[str, list[Run]] = {m: [] for m in names}
    for i, ids in enumerate(prompts):
        for m in names[i % len(names) :] + names[: i % len(names)]:
            results[m].append(run[m](ids))
    return results


def table(results: dict[str, list[Run]]) -> str:
    """Markdown: tokens/s = sum new tokens / sum seconds; ratio vs the faster HF baseline; equality vs hf-greedy."""
    tps = {m: sum(len(r.tokens) for r in rs) / max(sum(r.seconds for r in rs), 1e-9) for m, rs in results.items()}
    best_hf = max(HF, key=tps.get)
    ref = results["hf-greedy"]
    lines = [
        "| method | new tokens | seconds | tokens/s | vs best HF (" + best_hf + ") [95% CI] | == hf-greedy | tau |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def columns(m: str) -> tuple[list[float], list[float]]:
        return [len(r.tokens) for r in results[m]], [r.seconds for r in results[m]]

    for m, rs in results.items():
        same = sum(r.tokens == h.tokens for r, h in zip(rs, ref))
        rounds = sum(r.rounds for r in rs)
        tau = f"{sum(len(r.tokens) - 1 for r in rs) / rounds:.2f}" if rounds and m != "draftopd-ar" else "-"
        low, high = paired_ratio_ci(*columns(best_hf), *columns(m))
        lines.append(
            f"| {m} | {sum(len(r.tokens) for r in rs)} | {sum(r.seconds for r in rs):.2f} | {tps[m]:.1f} | "
            f"{tps[m] / tps[best_hf]:.2f}x [{low:.2f}, {high:.2f}] | {same}/{len(rs)} | {tau} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--drafter", help="drafter checkpoint folder (default: an untrained drafter)")
    parser.add_argument("--prompts", type=int, default=10, help="MT-Bench prompts")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0, help="seed of the MT-Bench prompt sample")
    parser.add_argument("--skip-prompts", type=int, default=0, help="skip the sample's first N prompts (those settings were chosen on)")
    parser.add_argument("--num-drafts", type=int, default=None, help="drafts verified a round (default: the whole block)")
    parser.add_argument(
        "--lookup-ngram",
        type=int,
        default=0,
        help="add draftopd-lookup (the drafter plus prompt lookup on n-grams) and draftopd-lookup-only (0: off)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    target = load_target(args.target, dtype=DTYPES[args.dtype])
    drafter = load_drafter(args.drafter, target) if args.drafter else new_drafter(target, DrafterConfig())
    drafter = drafter.to(target.dtype).eval()  # decoding runs the drafter in the target's dtype, as `generate` does
    prompts = [
        render_prompt(p, target.tokenizer)
        for p in load_prompts("mt-bench", limit=args.skip_prompts + args.prompts, seed=args.seed).prompts[args.skip_prompts :]
    ]
    with torch.inference_mode():
        measure(methods(target, drafter, min(8, args.max_new_tokens), args.num_drafts, args.lookup_ngram), prompts[:1])  # warm-up
        results = measure(methods(target, drafter, args.max_new_tokens, args.num_drafts, args.lookup_ngram), prompts)
    print(
        f"target {args.target} ({args.dtype}), drafter {args.drafter or 'untrained'} (block {drafter.block_size}), "
        f"{args.num_drafts or drafter.block_size - 1} drafts a round, {len(prompts)} MT-Bench prompts x {args.max_new_tokens} new tokens, greedy, batch 1, "
        f"{torch.get_num_threads()} threads, hf-pld = prompt_lookup_num_tokens={PLD_TOKENS}\n"
    )
    print(table(results))


if __name__ == "__main__":
    main()
