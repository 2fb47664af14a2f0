"""What one speculative round costs on this machine: target verify of n tokens and one drafter block, per dtype.

    python benchmarks/bench_verify.py [--drafter runs/recipe/sft/last] [--context 300] [--repeats 7] [--linear]

For each dtype: the target's forward over n = 1..16 new tokens on a `--context`-token KV cache (the cache is
rolled back after every call, so each is the same forward), median of `--repeats`, as milliseconds and as a
multiple of the one-token step (plain decoding's cost per token); then the drafter's cost per round (draft one
block + project the new context) as a fraction of that step, and the ideal speedup `tau * t_1 / (t_verify(B) +
t_draft)` it would give at tau = 2, 3, 4; last, a prefill of 2 x 384 tokens (as `features` caches them) in tokens/s. Run it on an otherwise idle machine: timings are medians, not asserts.
"""

from __future__ import annotations

import argparse

import torch

from draftopd.config import DrafterConfig
from draftopd.eval.round_cost import measure, median_ms
from draftopd.models.drafter import load_drafter, new_drafter
from draftopd.models.load import load_target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--drafter", help="drafter checkpoint (default: a new 2-layer block-8 drafter, 8192-token head)")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 3, 4, 6, 8, 10, 12, 16], help="tokens a verify (1 first)")
    parser.add_argument(
        "--linear",
        action="store_true",
        help="also time the target's largest linear layer alone at each size (where a multi-token verify's cost comes from)",
    )
    args = parser.parse_args()
    if args.sizes[0] != 1:
        parser.error("--sizes must start with 1 (the one-token step every size is compared with)")
    torch.set_num_threads(args.threads)
    target = load_target(args.target)
    if args.drafter:
        drafter = load_drafter(args.drafter, target)
    else:
        drafter = new_drafter(target, DrafterConfig(num_layers=2, block_size=8, vocab_size=8192))
        drafter.set_draft_vocab(torch.arange(8192))
    sizes = args.sizes
    print(
        f"target {args.target}, {args.context}-token cache, drafter {args.drafter or 'new'} (block {drafter.block_size}), "
        f"{args.threads} threads, median of {args.repeats}\n"
    )
    print(
        "| dtype | one token (ms) | "
        + " | ".join(f"verify {n}" for n in sizes[1:])
        + " | draft/round (x one token) | ideal speedup at tau 2 / 3 / 4 | prefill tok/s |"
    )
    print("|---|---|" + "---|" * (len(sizes) - 1) + "---|---|---|")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        target.model.to(dtype)
        r = measure(target, drafter.to(dtype), args.context, sizes, args.repeats)
        one, block = r["verify_ms"][1], r["verify_ms"].get(drafter.block_size) or r["verify_ms"][max(sizes)]
        ideal = [tau * one / (block + r["draft_ms"]) for tau in (2, 3, 4)]
        print(
            f"| {name} | {one:.1f} | "
            + " | ".join(f"{r['verify_ms'][n] / one:.2f}x" for n in sizes[1:])
            + f" | {r['draft_ms'] / one:.2f} | "
            + " / ".join(f"{x:.2f}x" for x in ideal)
            + f" | {r['prefill_tok_s']:.0f} |"
        )
    if args.linear:
        linear_table(target, args.dtypes, sizes, args.repeats)


def linear_table(target, dtypes: list[str], sizes: list[int], repeats: int) -> None:
    """The largest linear layer of the target's decoder (by weight size) timed alone on n rows, as a multiple of one
    row: a matrix-vector product streams the weights once, a multi-row product may take a slower kernel."""
    layer = max((m for m in target.model.base_model.modules() if isinstance(m, torch.nn.Linear)), key=lambda m: m.weight.numel())
    print(f"\nlargest decoder linear {tuple(layer.weight.shape)}, median of {repeats * 5} calls\n")
    print("| dtype | one row (ms) | " + " | ".join(f"{n} rows" for n in sizes[1:]) + " |")
    print("|---|---|" + "---|" * (len(sizes) - 1))
    for name in dtypes:
        weight = layer.weight.detach().to(getattr(torch, name))
        rows = {n: torch.randn(1, n, weight.shape[1], dtype=weight.dtype) for n in sizes}
        ms = {n: median_ms(lambda n=n: torch.nn.functional.linear(rows[n], weight), repeats * 5) for n in sizes}
        print(f"| {name} | {ms[1]:.3f} | " + " | ".join(f"{ms[n] / ms[1]:.2f}x" for n in sizes[1:]) + " |")


if __name__ == "__main__":
    main()
