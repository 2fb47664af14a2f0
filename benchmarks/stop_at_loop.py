"""Regeneration with `--stop-at-loop` against regeneration to the end: decode time, and the training text left.

The same ShareGPT training prompts regenerated greedily twice, batch by batch and side by side (each batch first to
the end, then stopping rows where they start looping; the order swaps every batch), into two JSONL files. Printed:
decode seconds and tokens of each arm, the time ratio stopped / full with a 95% bootstrap interval over batches, and
whether the two files cut at their loops (`load_regenerated(trim_loops=True)`, what `--trim-loops` trains on) hold
the same examples (they must: a stopped answer is a prefix of the full one).

    python benchmarks/stop_at_loop.py --limit 64 --batch-size 8 --max-new-tokens 256 --out runs/stop-at-loop   # the run in docs/results/strong-drafters.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftopd.config import DEFAULT_TARGET, DecodeConfig, resolve_dtype  # noqa: E402
from draftopd.data.prompts import load_prompts  # noqa: E402
from draftopd.data.regenerate import load_regenerated, regenerate  # noqa: E402
from draftopd.decode.stats import bootstrap_ratio_ci  # noqa: E402
from draftopd.models.load import load_target  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--limit", type=int, default=96, help="training prompts (ShareGPT train split)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--out", default="runs/stop-at-loop")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = load_target(args.target, dtype=resolve_dtype(args.dtype, "cpu"))
    prompts = load_prompts("sharegpt", split="train", limit=args.limit).prompts
    arms = {
        "full": DecodeConfig(max_new_tokens=args.max_new_tokens),
        "stopped": DecodeConfig(max_new_tokens=args.max_new_tokens, stop_at_loop=True),
    }
    files = {name: out / f"{name}.jsonl" for name in arms}
    for f in files.values():
        f.unlink(missing_ok=True)
    seconds = {name: [] for name in arms}
    tokens = {name: 0 for name in arms}
    looped = 0
    for i, start in enumerate(range(0, len(prompts), args.batch_size)):
        batch = prompts[start : start + args.batch_size]
        for name in ("full", "stopped") if i % 2 == 0 else ("stopped", "full"):
            s = regenerate(target, batch, files[name], arms[name], batch_size=args.batch_size, progress=False)
            seconds[name].append(s.seconds)
            tokens[name] += s.tokens
            looped += s.looped
        print(f"batch {i}: full {seconds['full'][-1]:.1f} s, stopped {seconds['stopped'][-1]:.1f} s", flush=True)
    cut = {name: load_regenerated(f, trim_loops=True) for name, f in files.items()}
    ratio = sum(seconds["stopped"]) / sum(seconds["full"])
    low, high = bootstrap_ratio_ci(seconds["stopped"], seconds["full"])
    result = {
        "prompts": len(prompts),
        "batches": len(seconds["full"]),
        "max_new_tokens": args.max_new_tokens,
        "dtype": str(target.dtype),
        "seconds": {k: sum(v) for k, v in seconds.items()},
        "tokens": tokens,
        "looped_answers": looped,
        "time_ratio_stopped_over_full": ratio,
        "time_ratio_ci95": [low, high],
        "trimmed_examples_equal": cut["full"].examples == cut["stopped"].examples,
        "trimmed_tokens": sum(len(e.response_ids) for e in cut["stopped"].examples),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
