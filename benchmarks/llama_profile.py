"""Where a speculative round's time goes in llama-server: drafting vs the rest, from llama.cpp's own counters.

    ./run export --format gguf --widen-vocab --drafter draftopd/drafters/smollm2-135m-dflash --out v3.gguf
    python benchmarks/llama_profile.py --drafter-gguf v3.gguf [--weights q4_1]

A plain llama-server and one with the drafter (`--spec-type draft-dflash` or `draft-eagle3`) decode the first
`--num-prompts` MT-Bench prompts (greedy, 96 new tokens, 2 threads, one request at a time) for each `--draft-n-max`.
The speculative server runs at trace verbosity (`-lv 4`), where llama.cpp logs its speculative statistics after each
request, including `dur(b,g,a)`: the total milliseconds spent beginning, generating (drafting) and accepting drafts
(`common/speculative.cpp`). Per round: drafting = g / draft calls; the rest = decode time / rounds - drafting, which
is the target's verify pass (with whatever the drafter reads from it) and the server's own work. Both are printed as
multiples of a plain decoding step (plain decode ms per token). A cost breakdown on a few prompts, not a comparison of
drafters: `llama_server.py` measures speed and tau on the full sets. Run it alone; it needs `./run llama-cpp`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from draftopd.config import EvalConfig  # noqa: E402
from draftopd.data.prompts import load_prompts, render_prompt  # noqa: E402
from draftopd.interop.llama_cpp import LlamaServer, ServerConfig, require_server, target_gguf  # noqa: E402
from draftopd.models.load import embedded_gguf, load_target  # noqa: E402

STATS = re.compile(r"#calls\(b,g,a\) =\s*(\d+)\s+(\d+)\s+(\d+).*dur\(b,g,a\) = ([\d.]+), ([\d.]+), ([\d.]+) ms")


def draft_totals(log: Path) -> tuple[int, float]:
    """(draft calls, drafting ms) over the server's life: its last statistics line (the counters accumulate)."""
    matches = [STATS.search(line) for line in log.read_text().splitlines()]
    last = [m for m in matches if m][-1]
    return int(last.group(2)), float(last.group(5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter-gguf", type=Path, required=True, help="a drafter GGUF (`draftopd export --format gguf`)")
    parser.add_argument("--spec-type", default="draft-dflash", choices=("draft-dflash", "draft-eagle3"))
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--weights", default="f32", choices=("f32", "q4_1"))
    parser.add_argument("--draft-n-max", type=int, nargs="+", default=[2, 7])
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--logs", type=Path, default=Path("runs/llama-profile"))
    args = parser.parse_args()

    require_server()
    args.logs.mkdir(parents=True, exist_ok=True)
    target = load_target(args.target, dtype=torch.float32)
    model = target_gguf(target, "f32") if args.weights == "f32" else embedded_gguf(args.target)
    prompts = [
        render_prompt(p, target.tokenizer) for p in load_prompts("mt-bench", limit=args.num_prompts, seed=EvalConfig().decode.seed).prompts
    ]
    with LlamaServer(model, log=args.logs / "plain.log") as plain:
        done = [plain.complete(p, args.max_new_tokens) for p in prompts]
    step = sum(c.predicted_ms for c in done) / sum(len(c.tokens) for c in done)
    print(f"plain ({args.weights}): {step:.1f} ms a token, {1000 / step:.1f} tokens/s")
    print(
        "| drafts a round | rounds | tau | round ms | drafting ms (plain steps) | rest ms (plain steps) | tokens/s |\n|---|---|---|---|---|---|---|"
    )
    for n in args.draft_n_max:
        log = args.logs / f"spec-n{n}.log"
        server = LlamaServer(model, args.drafter_gguf, args.spec_type, ServerConfig(draft_n_max=n), log=log)
        server.cmd += ["-lv", "4"]  # trace verbosity: llama.cpp's speculative statistics, with their timings
        with server:
            done = [server.complete(p, args.max_new_tokens) for p in prompts]
        calls, draft_ms = draft_totals(log)
        rounds, decode_ms = sum(c.rounds for c in done), sum(c.predicted_ms for c in done)
        per_draft, per_round = draft_ms / calls, decode_ms / rounds
        tau = sum(c.committed for c in done) / rounds
        print(
            f"| {n} | {rounds} | {tau:.3f} | {per_round:.1f} | {per_draft:.1f} ({per_draft / step:.2f}) | "
            f"{per_round - per_draft:.1f} ({(per_round - per_draft) / step:.2f}) | "
            f"{1000 * sum(len(c.tokens) for c in done) / decode_ms:.1f} |"
        )


if __name__ == "__main__":
    main()
