"""What one speculative round costs on this machine: the target's verify of n tokens and one drafter block.

`measure` times, on a `context`-token KV cache, the target's forward over n new tokens for each n (the cache is rolled
back after every call, so each call is the same forward), one drafter round (`Drafter.draft` of one block plus the
context projection of the new rows, as the decoder calls them) and a prefill of 2 x 384 tokens (as `draftopd features`
caches them). Medians of `repeats` calls after one warm-up; wall-clock numbers, so run it on an otherwise idle machine.
Used by `benchmarks/bench_verify.py` (the round-cost tables) and `experiments/dflash-vs-eagle3/arch_compare.py` (the
drafter cost per round).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of `repeats` calls of `fn`, after one warm-up call (allocation, kernel selection)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def measure(target, drafter, context: int, sizes: list[int], repeats: int) -> dict:
    """{"verify_ms": {n: ms}, "draft_ms": ms, "prefill_tok_s": tokens/s} for `target` and `drafter` as they are
    (their dtype and device). The target's KV cache holds `context` random tokens before and after every call."""
    prompt = torch.randint(100, 10000, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    prompt = [t % target.vocab_size for t in prompt]
    state, out = target.prefill([prompt], drafter.spec.target_layer_ids)
    ctx = drafter.project_context(out.features, state.positions, state.valid.clone(), torch.tensor([prompt[1:] + prompt[:1]]))

    def verify(n: int):
        target.verify(state, torch.randint(100, 10000, (1, n)) % target.vocab_size, drafter.spec.target_layer_ids)
        target.commit(state, torch.zeros(1, dtype=torch.long))  # roll back: every call sees the same cache

    verify_ms = {n: median_ms(lambda n=n: verify(n), repeats) for n in sizes}
    anchor, pos = torch.tensor([prompt[-1]]), state.lengths.clone()
    feats, following = out.features[:, -drafter.block_size :], torch.tensor([prompt[-drafter.block_size :]])

    def draft():  # EAGLE-3 drafts slot by slot, DFlash in one forward: `Drafter.draft`, as the decoder calls it
        drafter.draft(ctx, anchor, pos, lambda logits: logits.argmax(-1))
        drafter.project_context(feats, state.positions[:, -feats.shape[1] :], state.valid[:, -feats.shape[1] :], following)

    rows = torch.randint(100, 10000, (2, 384), generator=torch.Generator().manual_seed(1)) % target.vocab_size  # a feature-cache batch
    prefill_ms = median_ms(lambda: target.score(rows, torch.ones_like(rows, dtype=torch.bool), drafter.spec.target_layer_ids), 1)
    return {"verify_ms": verify_ms, "draft_ms": median_ms(draft, repeats), "prefill_tok_s": rows.numel() / prefill_ms * 1e3}
