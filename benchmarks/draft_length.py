"""How many drafts to verify a round: speed of plain decoding against speculative decoding at several draft lengths.

A drafter of block B proposes K = B - 1 drafts a round; `DecodeConfig.num_drafts` verifies only the first n. That
stays lossless, and it narrows the verify pass. On a 2-core CPU a verify of 8 tokens costs about 1.4 plain steps and one
of 2 tokens about 1.1 (docs/results/decoding-speed.md, "Cost of a round"), while the bundled drafter's (v1 at the time) slot 2..7 acceptances are 0.06,
0.01, ...: most of the wide verify buys nothing. Per prompt (30 per set, the `draftopd eval` prompts), plain
decoding and speculative decoding at each n run interleaved at batch 1, so machine noise hits every arm alike.
`--confidence c ...` adds arms that verify the whole block cut by `DecodeConfig.draft_confidence` c (each row
proposes the slots whose product of drafter top probabilities is at least c: a per-round draft length).
`--lookup n ...` adds prompt-lookup arms (`DecodeConfig.lookup_ngram` n, the drafter's `--lookup-num-drafts` drafts
in rounds without a match); `--lookup-only n ...` prompt lookup alone (`num_drafts` 0: a round without a match is a
plain step), the baseline that tells what the drafter adds to lookup. `--reference ARM` picks the arm of the paired
ratio column (default: the largest --num-drafts). Several `--drafter` folders compare drafters side by side: every
drafter arm runs once per drafter, labelled `K:ARM` with K the drafter's index (lookup-only arms once).
Reported per arm: tau, speedup over plain (total plain seconds / total speculative seconds, prefill included,
95% bootstrap over prompts), draft and verify ms a round, drafts verified a round, output equality with plain, and
the paired speedup ratio against the reference arm (default the full block; same prompts resampled together); with
several drafters, each one's tau and speed against drafter 0's on the same arm (paired). `--report JSON` prints the
tables again from an earlier run's `--json` file (`--reference` there picks another arm of that run for the ratio column).

    python benchmarks/draft_length.py --drafter draftopd/drafters/smollm2-135m-dflash --num-drafts 1 2 3 7 \
        --confidence 0.05 --dtype bfloat16 --json runs/draft-length.json   # ~5 min per arm on 2 cores, machine idle
    python benchmarks/draft_length.py --drafter OLD NEW --num-drafts 2 --lookup 2 --reference 0:l2   # two drafters
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftopd.config import DecodeConfig, EvalConfig  # noqa: E402
from draftopd.decode.speculative import autoregressive_generate, generate  # noqa: E402
from draftopd.decode.stats import bootstrap_ratio_ci, paired_ratio_ci, ratio_text  # noqa: E402
from draftopd.eval.evaluate import load_eval_sets  # noqa: E402
from draftopd.models.drafter import load_drafter  # noqa: E402
from draftopd.models.load import load_target  # noqa: E402


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--drafter",
        nargs="+",
        default=["draftopd/drafters/smollm2-135m-dflash"],
        help="one drafter, or several compared side by side (arms labelled K:ARM)",
    )
    parser.add_argument("--num-drafts", type=int, nargs="+", default=[1, 2, 3, 7])
    parser.add_argument("--confidence", type=float, nargs="*", default=[], help="draft_confidence arms (whole block, cut per round)")
    parser.add_argument(
        "--lookup",
        type=int,
        nargs="*",
        default=[],
        help="prompt-lookup arms: lookup_ngram n, the drafter's --lookup-num-drafts drafts where no n-gram matches",
    )
    parser.add_argument("--lookup-num-drafts", type=int, default=2)
    parser.add_argument("--lookup-only", type=int, nargs="*", default=[], help="arms of prompt lookup alone on n-grams (no drafter)")
    parser.add_argument(
        "--reference",
        default=None,
        help="arm label of the paired ratio column: a --num-drafts n, "
        "ln (lookup n), on (lookup only n), cC (confidence C), prefixed K: with several drafters; "
        "default the largest --num-drafts (of the first drafter)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--prompts-per-set", type=int, default=30)
    parser.add_argument(
        "--skip-prompts",
        type=int,
        default=0,
        help="skip each set's first N sampled prompts (those settings were chosen on): report on held-out prompts",
    )
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--report", default=None, help="print the tables again from a --json file of an earlier run (runs nothing)")
    args = parser.parse_args()
    if args.report:
        run_json = json.loads(Path(args.report).read_text())
        saved = argparse.Namespace(**run_json["args"])
        saved.reference = args.reference or saved.reference  # the ratio column against another arm of the same run
        if reference_arm(saved) not in arm_labels(saved)[1]:
            parser.error(f"--reference {saved.reference}: that run's arms are {', '.join(arm_labels(saved)[1])}")
        report(run_json["rows"], saved)
        return
    rows = run(args, parser)
    summary = report(rows, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "rows": rows}, indent=1))


def arm_labels(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The drafter arms' labels (`n`, `cC`, `ln`), and every arm's label in run order (`K:` prefixes with several drafters)."""
    labels = [str(n) for n in args.num_drafts] + [f"c{c:g}" for c in args.confidence] + [f"l{n}" for n in args.lookup]
    tags = [f"{k}:" if len(args.drafter) > 1 else "" for k in range(len(args.drafter))]
    return labels, [t + label for t in tags for label in labels] + [f"o{n}" for n in args.lookup_only]


def reference_arm(args: argparse.Namespace) -> str:
    return args.reference or f"{'0:' if len(args.drafter) > 1 else ''}{max(args.num_drafts)}"


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[dict]:
    """Per prompt: plain decoding, then every arm, interleaved; returns one row per prompt."""
    torch.set_num_threads(args.threads)
    target = load_target("smollm2-135m", dtype=getattr(torch, args.dtype))
    drafters = [load_drafter(path, target).to(target.dtype) for path in args.drafter]
    sets = load_eval_sets(target, EvalConfig(num_prompts=args.prompts_per_set, skip_prompts=args.skip_prompts))
    prompts = [(name, ids) for name, items in sets.items() for _, ids in items]
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens)
    drafter_arms = {str(n): DecodeConfig(max_new_tokens=args.max_new_tokens, num_drafts=n) for n in args.num_drafts}
    drafter_arms |= {f"c{c:g}": DecodeConfig(max_new_tokens=args.max_new_tokens, draft_confidence=c) for c in args.confidence}
    drafter_arms |= {
        f"l{n}": DecodeConfig(max_new_tokens=args.max_new_tokens, num_drafts=args.lookup_num_drafts, lookup_ngram=n) for n in args.lookup
    }
    configs = [(drafter, arm_cfg) for drafter in drafters for arm_cfg in drafter_arms.values()]
    configs += [(drafters[0], DecodeConfig(max_new_tokens=args.max_new_tokens, num_drafts=0, lookup_ngram=n)) for n in args.lookup_only]
    arms = dict(zip(arm_labels(args)[1], configs))
    if reference_arm(args) not in arms:
        parser.error(f"--reference {reference_arm(args)}: no such arm (arms: {', '.join(arms)})")
    autoregressive_generate(target, [prompts[0][1]], DecodeConfig(max_new_tokens=8))
    for drafter, arm_cfg in arms.values():
        generate(target, drafter, [prompts[0][1]], replace(arm_cfg, max_new_tokens=8))
    rows = []  # per prompt: plain seconds, and per arm (committed, rounds, seconds, draft s, verify s, equal)
    for name, prompt in tqdm(prompts, desc="prompts", dynamic_ncols=True):
        plain, plain_s = timed(lambda: autoregressive_generate(target, [prompt], cfg))
        row = {"set": name, "plain_s": plain_s, "new": len(plain.traces[0].output), "arms": {}}
        for label, (drafter, arm_cfg) in arms.items():
            spec, spec_s = timed(lambda: generate(target, drafter, [prompt], arm_cfg))
            tr = spec.traces[0]
            row["arms"][label] = {
                "committed": len(tr.output) - 1,
                "rounds": tr.rounds,
                "s": spec_s,
                "draft_s": spec.timing.draft_s,
                "verify_s": spec.timing.verify_s,
                "equal": tr.output == plain.traces[0].output,
                "accepted": list(tr.accepted),
                "proposed": list(tr.proposed),
                "looked_up": sum(tr.looked_up),
            }
        rows.append(row)
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> dict:
    """Print the per-arm table (and, with several drafters, each drafter against the first on the same arm); return
    the per-arm summary."""
    arms, reference = arm_labels(args)[1], reference_arm(args)
    plain_s = [r["plain_s"] for r in rows]
    print(
        f"{len(rows)} prompts x {args.max_new_tokens} new tokens, {args.dtype}, {args.threads} threads; plain "
        f"{sum(r['new'] for r in rows) / sum(plain_s):.1f} tokens/s"
    )
    if len(args.drafter) > 1:
        print("; ".join(f"drafter {k} = {path}" for k, path in enumerate(args.drafter)))
    print(
        f"| drafts a round | tau [95% CI] | speedup vs plain [95% CI] | draft / verify ms a round | drafts verified a round | slot 1 / 2 acceptance | output equal to plain | speedup / arm {reference}'s (paired) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary = {}
    reference_secs = [r["arms"][reference]["s"] for r in rows]
    for n in arms:
        arm = [r["arms"][n] for r in rows]
        committed, rounds, secs = [a["committed"] for a in arm], [a["rounds"] for a in arm], [a["s"] for a in arm]
        tau, tau_ci = sum(committed) / sum(rounds), bootstrap_ratio_ci(committed, rounds)
        speed, speed_ci = sum(plain_s) / sum(secs), bootstrap_ratio_ci(plain_s, secs)
        rounds_total = sum(rounds)
        draft_ms, verify_ms = 1e3 * sum(a["draft_s"] for a in arm) / rounds_total, 1e3 * sum(a["verify_s"] for a in arm) / rounds_total
        acc = [x for a in arm for x in a["accepted"]]
        slots = [sum(x >= k for x in acc) / len(acc) for k in (1, 2)]
        low, high = paired_ratio_ci(plain_s, reference_secs, plain_s, secs)
        ratio = (sum(plain_s) / sum(secs)) / (sum(plain_s) / sum(reference_secs))
        equal = sum(a["equal"] for a in arm)
        verified = sum(x for a in arm for x in a["proposed"]) / rounds_total
        prefix, _, kind = n.rpartition(":")
        label = f"draft_confidence {kind[1:]}" if kind.startswith("c") else kind
        if kind[0] in "lo":
            share = f"{sum(a['looked_up'] for a in arm) / rounds_total:.0%} of rounds looked up"
            label = (
                f"{args.lookup_num_drafts} + lookup_ngram {kind[1:]} ({share})"
                if kind[0] == "l"
                else f"lookup_ngram {kind[1:]} alone ({share})"
            )
        label = f"drafter {prefix}: {label}" if prefix else label
        print(
            f"| {label} | {tau:.3f} [{tau_ci[0]:.3f}, {tau_ci[1]:.3f}] | {speed:.2f}x [{speed_ci[0]:.2f}, {speed_ci[1]:.2f}] | "
            f"{draft_ms:.1f} / {verify_ms:.1f} | {verified:.2f} | {slots[0]:.2f} / {slots[1]:.2f} | {equal}/{len(rows)} | "
            + ("-" if n == reference else ratio_text(ratio, low, high))
            + " |"
        )
        summary[n] = {
            "tau": tau,
            "tau_ci": tau_ci,
            "speedup": speed,
            "speedup_ci": speed_ci,
            "draft_ms": draft_ms,
            "verify_ms": verify_ms,
            "verified": verified,
            "slot_acceptance": slots,
            "equal": equal,
            "vs_full": [ratio, low, high],
        }
    if len(args.drafter) > 1:
        print_drafter_ratios(rows, args)
    return summary


def print_drafter_ratios(rows: list[dict], args: argparse.Namespace) -> None:
    """Each drafter against drafter 0 on the same arm: tau and speed ratios, paired over prompts."""
    print("\n| arm | drafter | tau / drafter 0's (paired) | speed / drafter 0's (paired) |\n|---|---|---|---|")
    plain_s = [r["plain_s"] for r in rows]

    def get(arm: list[dict], key: str) -> list[float]:
        return [x[key] for x in arm]

    for label in arm_labels(args)[0]:
        base = [r["arms"][f"0:{label}"] for r in rows]
        for k in range(1, len(args.drafter)):
            arm = [r["arms"][f"{k}:{label}"] for r in rows]
            tau = (sum(get(arm, "committed")) / sum(get(arm, "rounds"))) / (sum(get(base, "committed")) / sum(get(base, "rounds")))
            speed = sum(get(base, "s")) / sum(get(arm, "s"))
            print(
                f"| {label} | {k} | {ratio_text(tau, *paired_ratio_ci(get(base, 'committed'), get(base, 'rounds'), get(arm, 'committed'), get(arm, 'rounds')))} | "
                f"{ratio_text(speed, *paired_ratio_ci(plain_s, get(base, 's'), plain_s, get(arm, 's')))} |"
            )


if __name__ == "__main__":
    main()
