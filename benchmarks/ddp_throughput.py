"""One process vs `torchrun --nproc-per-node 2` SFT on this CPU: throughput and whether the weights agree.

    .venv/bin/python benchmarks/ddp_throughput.py --features runs/e3/features --steps 10 --out runs/ddp

Both runs train a new drafter (same seed, same global batch of `--batch-size` sequences x `--anchors` anchors) from the
same feature cache for `--steps` steps, one after the other on an otherwise idle machine: the single process with all
`--threads` threads, each of the two ranks with half of them (gloo). Reported: steps/s and trained draft tokens/s
(skipping the first `--skip` steps, which pay allocation), their ratio 2-process / 1-process, and the largest weight
difference after the last step (summing gradients over ranks changes only the float summation order; tests/test_ddp.py
bounds it on tiny targets).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv" / "bin"


def train(out: Path, procs: int, threads: int, args: argparse.Namespace) -> list[dict]:
    common = [
        "sft",
        "--features",
        str(args.features),
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--anchors-per-seq",
        str(args.anchors),
        "--save-every",
        str(args.steps),
        "--log-every",
        "1",
        "--seed",
        "0",
        "--draft-arch",
        args.arch,
        "--draft-block-size",
        str(args.block_size),
        "--draft-vocab-size",
        str(args.vocab),
        "--draft-num-layers",
        str(args.num_layers),
        "--draft-target-layer-ids",
        *map(str, args.layer_ids),
        "--dtype",
        "float32",
        "--out",
        str(out),
        "--json",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if procs == 1:
        cmd = [str(VENV / "draftopd"), *common]
    else:
        cmd = [str(VENV / "torchrun"), "--standalone", f"--nproc-per-node={procs}", "-m", "draftopd.cli", *common]
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def rate(metrics: list[dict], skip: int) -> dict:
    rows = metrics[skip:]
    seconds = sum(r["time/step_s"] for r in rows)
    tokens = sum(r["compute/draft_train_tokens"] for r in rows)
    return {"steps_per_s": len(rows) / seconds, "draft_tokens_per_s": tokens / seconds, "step_s": seconds / len(rows)}


def max_weight_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "last" / "model.safetensors")), load_file(str(b / "last" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa if wa[k].is_floating_point())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--anchors", type=int, default=64)
    parser.add_argument("--arch", default="dflash")
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--layer-ids", type=int, nargs="+", default=[1, 10, 19, 27], help="target layers the cache holds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/ddp"))
    args = parser.parse_args()
    for name in ("one", "two"):
        if (args.out / name).exists():
            raise SystemExit(f"{args.out / name} exists: give a new --out")
    one = rate(train(args.out / "one", 1, args.threads, args), args.skip)
    two = rate(train(args.out / "two", 2, max(args.threads // 2, 1), args), args.skip)
    result = {
        "one_process": one,
        "two_processes": two,
        "two_over_one": two["draft_tokens_per_s"] / one["draft_tokens_per_s"],
        "max_weight_diff": max_weight_diff(args.out / "one", args.out / "two"),
        "config": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "report.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
