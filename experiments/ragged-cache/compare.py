"""The ragged preallocated KV cache and one-sync rounds against the cache with holes they replaced, side by side.

Runs two checkouts of the project in turn on the same machine: this one and an earlier commit (`--old`, default
5adf4d6, the last with the growing cache). For each it measures, with the bundled drafter on the embedded target:
1. the share of the attended cache slots that hold committed tokens, averaged over verify passes, at batch 16
   (greedy, `--new-tokens` a prompt, ShareGPT training prompts): holes left by rejected drafts lower it;
2. decoding speed (tokens/s) at batch 16 and at batch 1;
3. the seconds of one Draft-OPD update at the demo's settings (8 rollouts x 96 tokens, one replay micro-batch),
   from `metrics.jsonl` (rollout + replay + update), over `--updates` updates.
Each measurement runs in a fresh process per checkout, the checkouts alternating `--repeats` times so machine noise
falls on both. Output: one JSON line per run and a table of medians.

    python experiments/ragged-cache/compare.py --out runs/ragged-cache
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys, tempfile, time, torch
torch.set_num_threads(int(sys.argv[2]))
import draftopd
from pathlib import Path
from draftopd.config import DecodeConfig, OptimConfig, DEFAULT_TARGET
BUNDLED = Path(draftopd.__file__).parent / "drafters" / "smollm2-135m-dflash"  # in both checkouts
from draftopd.data.prompts import load_prompts, render_prompt
from draftopd.decode import speculative
from draftopd.models.drafter import load_drafter
from draftopd.models.load import load_target
from draftopd.models.target import Target
what, new_tokens, updates = sys.argv[1], int(sys.argv[3]), int(sys.argv[4])
target = load_target(DEFAULT_TARGET)
drafter = load_drafter(BUNDLED, target).eval()
prompts = [render_prompt(p, target.tokenizer) for p in load_prompts("sharegpt", split="train", limit=40, seed=7).prompts]
prompts = [p for p in prompts if len(p) <= 256][:16]
if what == "decode":
    shares, real = [], Target.verify
    def verify(self, state, block, layers=()):
        shares.append(float(state.valid.float().mean()))
        return real(self, state, block, layers)
    Target.verify = verify
    cfg = DecodeConfig(max_new_tokens=new_tokens, stop_at_eos=False, num_drafts=2)
    speculative.generate(target, drafter, prompts[:2], DecodeConfig(max_new_tokens=8))  # warm-up
    shares.clear()
    t0 = time.perf_counter(); gen = speculative.generate(target, drafter, prompts, cfg); t16 = time.perf_counter() - t0
    share = sum(shares) / len(shares)
    t0 = time.perf_counter(); one = [speculative.generate(target, drafter, [p], cfg) for p in prompts[:4]]; t1 = time.perf_counter() - t0
    print(json.dumps({"valid_share_b16": share, "tok_s_b16": sum(len(t.output) for t in gen.traces) / t16,
                      "tok_s_b1": sum(len(g.traces[0].output) for g in one) / t1}))
else:
    from draftopd.train.opd import OPDConfig, train_opd
    out = tempfile.mkdtemp()
    common = dict(steps=updates, prompts_per_rollout=8, rollouts_per_step=1, replay_batch=8, save_every=1000,
                  optim=OptimConfig(lr=3e-4, min_warmup_steps=1))
    try:  # the rollout's decoding is a nested DecodeConfig now, flat fields before
        cfg = OPDConfig(rollout=DecodeConfig(max_new_tokens=96), **common)
    except TypeError:
        cfg = OPDConfig(max_new_tokens=96, **common)
    train_opd(target, load_drafter(BUNDLED, target), prompts[:8] * 4, cfg, out, progress=False)
    rows = [json.loads(l) for l in open(out + "/metrics.jsonl")]
    print(json.dumps({"update_s": [r["time/rollout_s"] + r["time/replay_s"] + r["time/update_s"] for r in rows],
                      "rollout_tau": [r["rollout/tau"] for r in rows]}))
"""


def checkout(commit: str) -> Path:
    """A worktree of `commit` in a temporary folder (the project's own history; nothing is fetched)."""
    folder = Path(tempfile.mkdtemp(prefix="draftopd-")) / commit
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(folder), commit], check=True)
    return folder


def run(tree: Path, what: str, args) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(args.threads), str(args.new_tokens), str(args.updates)],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise SystemExit(f"{tree.name} {what} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="5adf4d6", help="the earlier commit to compare with")
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/ragged-cache")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trees = {"old": checkout(args.old), "new": ROOT}
    results: dict[str, list[dict]] = {"old": [], "new": []}
    try:
        for r in range(args.repeats):
            for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                row = {"run": r, "tree": name, **run(trees[name], "decode", args), **run(trees[name], "update", args)}
                results[name].append(row)
                print(json.dumps(row), flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees["old"])], check=False)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    med = lambda name, key: statistics.median(v for row in results[name] for v in (row[key] if isinstance(row[key], list) else [row[key]]))  # noqa: E731
    print(f"{'':22} {'old':>8} {'new':>8} {'new/old':>8}")
    for key in ("valid_share_b16", "tok_s_b16", "tok_s_b1", "update_s"):
        old, new = med("old", key), med("new", key)
        print(f"{key:22} {old:>8.3f} {new:>8.3f} {new / old:>8.3f}")


if __name__ == "__main__":
    main()
