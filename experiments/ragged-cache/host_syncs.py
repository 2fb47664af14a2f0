"""Device mixes and host syncs on the fake CUDA device, this checkout against an earlier commit (`--old`).

Copies the fake-CUDA harness and the flows as they were first written (`draftopd/check/` at commit de05d35, whose
calls the earlier code also takes, but for Draft-OPD's `autocast` field, dropped there) into a worktree of the earlier
commit, which has neither, and runs, in each tree:
every flow with device mixes recorded instead of raised (the unique project lines that mix devices), `generate` on
8 prompts x 24 tokens in each decoding mode (host syncs a round, copies to the device), and 3 SFT steps (host syncs a
step). Tiny models: a minute or two.

    python experiments/ragged-cache/host_syncs.py --old 5adf4d6
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HARNESS = "de05d35"  # the commit that added the harness and the flows

CHILD = r"""
import json, tempfile, torch
from collections import Counter
from dataclasses import replace
from draftopd.check.fake_cuda import FakeCuda
from draftopd.check.flows import FLOWS, SFT, Bench
from draftopd.config import DecodeConfig
from draftopd.decode import speculative as S
from draftopd.train.sft import train_sft
torch.set_num_threads(1)
sites = Counter()
for name, flow in FLOWS.items():
    with FakeCuda(strict=False, sites=True) as fc:
        flow(Bench("cuda", tempfile.mkdtemp()))
    sites.update(m.split(" (")[-1].rstrip(")") for m in fc.record.mixes)
rounds = {}
for mode in ({}, {"temperature": 1.0}, {"lookup_ngram": 2}, {"draft_confidence": 0.05}):
    for arch in ("dflash", "eagle3"):
        with FakeCuda() as fake:
            b = Bench("cuda", tempfile.mkdtemp()); d = b.drafter(arch=arch)
            with fake.count() as r:
                g = S.generate(b.target, d, b.prompts, DecodeConfig(max_new_tokens=24, stop_at_eos=False, **mode))
        rounds[f"{arch} {json.dumps(mode)}"] = {"syncs_per_round": round(r.total_syncs / g.timing.rounds, 2), "h2d": r.total_h2d}
with FakeCuda() as fake:
    b = Bench("cuda", tempfile.mkdtemp()); d = b.drafter(); ex = b.examples()
    with fake.count() as r:
        train_sft(b.target, d, ex, replace(SFT, steps=10), tempfile.mkdtemp(), progress=False, stop_after=3)
print(json.dumps({"mix_sites": dict(sites), "decode": rounds, "sft_syncs_per_step": r.total_syncs / 3}))
"""


def run(tree: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=tree, env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="5adf4d6")
    args = parser.parse_args()
    old = Path(tempfile.mkdtemp(prefix="draftopd-")) / args.old
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.old], check=True)
    try:
        check = old / "draftopd" / "check"
        if not check.exists():
            check.mkdir()
            (check / "__init__.py").touch()
            for name in ("fake_cuda.py", "flows.py"):
                text = subprocess.run(
                    ["git", "-C", str(ROOT), "show", f"{HARNESS}:draftopd/check/{name}"], capture_output=True, text=True, check=True
                ).stdout
                (check / name).write_text(text.replace(' autocast="float32",', ""))
        results = {"old": run(old), "new": run(ROOT)}
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    for name, r in results.items():
        print(
            f"{name}: {len(r['mix_sites'])} device-mix sites ({sum(r['mix_sites'].values())} mixed ops); SFT syncs a step "
            f"{r['sft_syncs_per_step']:.1f}"
        )
        for site, n in sorted(r["mix_sites"].items(), key=lambda kv: -kv[1]):
            print(f"    {n:4d}  {site}")
        for mode, row in r["decode"].items():
            print(f"    {mode:45s} syncs a round {row['syncs_per_round']:5.2f}   copies to the device {row['h2d']}")


if __name__ == "__main__":
    main()
