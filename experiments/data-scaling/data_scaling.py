"""Held-out tau against supervised tokens: the recipe's SFT on the first K shards of its feature cache (2-core CPU).

Every arm trains the CPU recipe's drafter from scratch with the recipe's soft-label settings
(`docs/results/strong-drafters.md`, "The recipe stage by stage": 2 layers, block 8, target layers 1, 10, 19, 27, MASK = token 16, 8,192-token head
chosen from the arm's own labels, 420 steps x 8 sequences x 64 anchors, lr 2e-3) on the first K shards of the
recipe's feature cache (fixed ShareGPT text labelled by the target; a shard is about 65K tokens), so arms differ
only in how much text they see: same steps, same compute. The full cache is the recipe's own `sft-kl` run.
A subset cache is a manifest listing the first K shards, the shard files hard-linked, nothing copied.

    python experiments/data-scaling/data_scaling.py subset --cache runs/recipe/features --shards 1 2 4 --out runs/scaling
    python experiments/data-scaling/data_scaling.py arm runs/scaling/cache-1 --out runs/scaling/sft-1   # ~55 min, one thread, two arms at a time
    python experiments/data-scaling/data_scaling.py arm runs/scaling/cache-2 --out runs/scaling/sft-2 --threads 2   # ~27 min alone
    python experiments/data-scaling/data_scaling.py arm runs/scaling/cache-4 --out runs/scaling/sft-4
    python benchmarks/replay_compare.py runs/scaling/sft-1/last runs/scaling/sft-2/last runs/scaling/sft-4/last \
        runs/recipe/sft-kl/last --json runs/scaling/replay4.json
    python experiments/data-scaling/data_scaling.py report --replay runs/scaling/replay4.json --full-cache runs/recipe/features \
        --plot docs/data_scaling.png

`runs/recipe/features` is the recipe's feature cache (`./run features ... --out runs/recipe/features`, or what
`./run recipe` writes under its default `--out-dir runs/recipe`); `runs/recipe/sft-kl` its soft-label SFT run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RECIPE_SFT = [
    "--draft-num-layers",
    "2",
    "--draft-block-size",
    "8",
    "--draft-target-layer-ids",
    "1",
    "10",
    "19",
    "27",
    "--draft-mask-token-id",
    "16",
    "--draft-vocab-size",
    "8192",
    "--labels",
    "greedy",
    "--loss",
    "kl",
    "--steps",
    "420",
    "--batch-size",
    "8",
    "--anchors-per-seq",
    "64",
    "--save-every",
    "50",
    "--optim-lr",
    "2e-3",
    "--dtype",
    "float32",
]


def subset(cache: Path, shards: list[int], out: Path) -> None:
    manifest = json.loads((cache / "manifest.json").read_text())
    for k in shards:
        if not 0 < k <= len(manifest["shards"]):
            raise SystemExit(f"{cache} has {len(manifest['shards'])} shards, asked for {k}")
        folder = out / f"cache-{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for shard in manifest["shards"][:k]:
            if not (folder / shard["file"]).exists():
                os.link(cache / shard["file"], folder / shard["file"])
        (folder / "manifest.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][:k]}, indent=2))
        tokens = sum(s["tokens"] for s in manifest["shards"][:k])
        print(f"{folder}: {k} shards, {sum(s['sequences'] for s in manifest['shards'][:k])} sequences, {tokens} tokens")


def arm(cache: Path, out: Path, threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "draftopd.cli", "sft", "--features", str(cache), *RECIPE_SFT, "--out", str(out)]
    if (out / "last").exists():
        cmd.append("--resume")
    print(" ".join(cmd), flush=True)
    raise SystemExit(subprocess.call(cmd, env=env))


def cache_tokens(drafter: Path, full_cache: Path) -> tuple[int, int]:
    """(sequences, tokens) of the cache a scaling arm trained on, from the arm's folder name."""
    name = drafter.parent.name  # sft-K, or the recipe's sft-kl (the full cache)
    cache = drafter.parent.parent / f"cache-{name.split('-')[1]}" if name[4:].isdigit() else full_cache
    shards = json.loads((cache / "manifest.json").read_text())["shards"]
    return sum(s["sequences"] for s in shards), sum(s["tokens"] for s in shards)


def report(replay: Path, full_cache: Path, plot: Path | None) -> None:
    results = json.loads(replay.read_text())
    rows = sorted(((cache_tokens(Path(path), full_cache), path, r) for path, r in results.items()), key=lambda x: x[0][1])
    sets = [n for n in next(iter(results.values())) if n not in ("ratio_to",)]
    print("| training text | " + " | ".join(sets) + " | slot 1 / 2 acceptance |\n|---|" + "---|" * (len(sets) + 1))
    for (seqs, tokens), path, r in rows:
        cells = [f"{r[n]['tau']:.3f} [{r[n]['tau_ci'][0]:.3f}, {r[n]['tau_ci'][1]:.3f}]" for n in sets]
        slots = r["all"]["slot_acceptance"]
        print(f"| {seqs:,} answers, {tokens:,} tokens (`{path}`) | " + " | ".join(cells) + f" | {slots[0]:.2f} / {slots[1]:.2f} |")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        x = [t for (_, t), _, _ in rows]
        for n in sets:
            y = [r[n]["tau"] for _, _, r in rows]
            if n == "all":
                lo = [r[n]["tau"] - r[n]["tau_ci"][0] for _, _, r in rows]
                hi = [r[n]["tau_ci"][1] - r[n]["tau"] for _, _, r in rows]
                ax.errorbar(x, y, yerr=[lo, hi], marker="o", color="black", label="all (95% CI)", capsize=3)
            else:
                ax.plot(x, y, marker=".", alpha=0.6, label=n)
        ax.set_xscale("log")
        ax.set_xlabel("supervised tokens (fixed ShareGPT text, target-labelled)")
        ax.set_ylabel("held-out greedy tau (block 8)")
        ax.set_title("Same drafter, same 420 steps, more text")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"plot: {plot}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("subset")
    s.add_argument("--cache", type=Path, required=True)
    s.add_argument("--shards", type=int, nargs="+", required=True)
    s.add_argument("--out", type=Path, required=True)
    a = sub.add_parser("arm")
    a.add_argument("cache", type=Path)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--threads", type=int, default=1)
    r = sub.add_parser("report")
    r.add_argument("--replay", type=Path, required=True)
    r.add_argument(
        "--full-cache",
        type=Path,
        default=Path("runs/recipe/features"),
        help="the whole cache, for a drafter that is not an arm's sft-K (default: what `./run recipe` writes)",
    )
    r.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()
    if args.cmd == "subset":
        subset(args.cache, args.shards, args.out)
    elif args.cmd == "arm":
        arm(args.cache, args.out, args.threads)
    else:
        report(args.replay, args.full_cache, args.plot)


if __name__ == "__main__":
    sys.exit(main())
