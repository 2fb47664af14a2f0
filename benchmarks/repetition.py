"""How repetitive is training text? Distinct and self-repeating n-grams of answers, per source.

Sources: a feature cache folder (its answers' response tokens), a regenerated JSONL (`draftopd regenerate`), or
`eval` (the target's greedy answers to the evaluation prompts, 30 per set x 96 tokens, as `replay_compare.py`
makes them). For each: answers, response tokens, distinct n-grams / all n-grams over the whole source, and the
share of n-grams that repeat one seen earlier in the same answer (a greedy loop repeats almost all of its own).

    python benchmarks/repetition.py stats runs/recipe-e2e/features runs/recipe-regen/features runs/cpu-regen/regen.jsonl eval
    python benchmarks/repetition.py stats runs/cpu-regen2/regen.jsonl --bucket 64     # the same share by position

`trim` writes regenerated answers cut where a greedy loop starts (`decode.loops.loop_start`: the first position
from which `run` n-grams in a row each repeat one earlier in the answer; the text before it, first pass of the loop
included, stays; `--trim-loops` on `features`, `recipe` and `sft --data` does the same cut when reading), taking whole
files in order until the kept response tokens reach `--response-tokens`:

    python benchmarks/repetition.py trim runs/cpu-regen/regen.jsonl runs/cpu-regen2/regen.jsonl --response-tokens 327405 \
        --out runs/recipe-trim/regen-trimmed.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftopd.decode.loops import loop_start  # noqa: E402


@dataclass(frozen=True)
class Repetition:
    answers: int
    tokens: int
    distinct: float  # distinct n-grams / n-grams, over all answers
    self_repeat: float  # n-grams equal to an earlier one of the same answer / n-grams


def repetition(responses: Sequence[Sequence[int]], n: int = 4) -> Repetition:
    seen_all, total, repeats = set(), 0, 0
    for r in responses:
        own = set()
        for j in range(len(r) - n + 1):
            gram = tuple(r[j : j + n])
            total += 1
            repeats += gram in own
            own.add(gram)
            seen_all.add(gram)
    return Repetition(len(responses), sum(map(len, responses)), len(seen_all) / max(total, 1), repeats / max(total, 1))


def self_repeat_by_position(responses: Sequence[Sequence[int]], n: int = 4, bucket: int = 64) -> dict[int, float]:
    """The share of n-grams repeating one earlier in the same answer, by the n-gram's start position, per `bucket`
    positions (key: the bucket's first position)."""
    totals, repeats = {}, {}
    for r in responses:
        own = set()
        for j in range(len(r) - n + 1):
            gram, b = tuple(r[j : j + n]), j // bucket * bucket
            totals[b], repeats[b] = totals.get(b, 0) + 1, repeats.get(b, 0) + (gram in own)
            own.add(gram)
    return {b: repeats[b] / totals[b] for b in sorted(totals)}


def trim(sources: Sequence[str], response_tokens: int, out: Path, n: int = 4, run: int = 8) -> Repetition:
    """Write the sources' records, each response cut at `loop_start`, until `response_tokens` are kept."""
    kept, lines, tokens = [], [], 0
    records = (json.loads(line) for source in sources for line in Path(source).read_text().splitlines() if line.strip())
    for record in records:
        if tokens >= response_tokens:
            break
        cut = record["response_ids"][: loop_start(record["response_ids"], n, run)]
        if len(cut) >= 2:  # a one-token answer has no anchor to train
            kept.append(cut)
            tokens += len(cut)
            lines.append(json.dumps({**record, "response_ids": cut, "trimmed_from": len(record["response_ids"])}, separators=(",", ":")))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return repetition(kept, n)


def responses_of(source: str) -> list[list[int]]:
    path = Path(source)
    if path.is_dir():  # a feature cache: its shards hold tokens, offsets and each sequence's response start
        from safetensors.torch import load_file

        from draftopd.data.features import read_manifest

        out = []
        for shard in read_manifest(path).shards:
            s = load_file(str(path / shard["file"]))
            tokens, offsets, starts = s["tokens"].tolist(), s["offsets"].tolist(), s["response_start"].tolist()
            out += [tokens[offsets[i] + starts[i] : offsets[i + 1]] for i in range(len(starts))]
        return out
    if source == "eval":
        import torch

        from draftopd.eval.replay import greedy_references
        from draftopd.models.load import load_target

        return [o for _, outputs in greedy_references(load_target("smollm2-135m", dtype=torch.bfloat16)).values() for o in outputs]
    from draftopd.data.regenerate import load_regenerated

    return [list(e.response_ids) for e in load_regenerated(path).examples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("stats", "trim"))
    parser.add_argument("sources", nargs="+", help="feature cache folders, regenerated JSONL files, or 'eval' (trim: JSONL files)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--bucket", type=int, default=0, help="stats: also the self-repeating share by position, per this many positions")
    parser.add_argument("--run", type=int, default=8, help="trim: n-grams in a row that repeat earlier ones where a loop starts")
    parser.add_argument("--response-tokens", type=int, default=None, help="trim: stop once this many response tokens are kept")
    parser.add_argument("--out", type=Path, default=None, help="trim: the JSONL to write")
    args = parser.parse_args()
    if args.mode == "trim":
        if args.out is None or args.response_tokens is None:
            parser.error("trim needs --out and --response-tokens")
        r = trim(args.sources, args.response_tokens, args.out, args.n, args.run)
        before = sum(json.loads(line)["trimmed_from"] for line in args.out.read_text().splitlines())
        print(
            f"kept {r.answers:,} answers, {r.tokens:,} response tokens of their {before:,} ({1 - r.tokens / before:.1%} cut); "
            f"distinct {args.n}-grams {r.distinct:.3f}, repeating one of the same answer {r.self_repeat:.3f} -> {args.out}"
        )
        return
    print(
        f"| source | answers | response tokens | distinct {args.n}-grams | {args.n}-grams repeating one of the same answer |\n|---|---|---|---|---|"
    )
    by_position = {}
    for source in args.sources:
        responses = responses_of(source)
        r = repetition(responses, args.n)
        print(f"| {source} | {r.answers:,} | {r.tokens:,} | {r.distinct:.3f} | {r.self_repeat:.3f} |")
        if args.bucket:
            by_position[source] = self_repeat_by_position(responses, args.n, args.bucket)
    for source, shares in by_position.items():
        print(
            f"{source}: {args.n}-grams repeating one of the same answer, by position: "
            + ", ".join(f"{b}-{b + args.bucket - 1} {v:.3f}" for b, v in shares.items())
        )


if __name__ == "__main__":
    main()
