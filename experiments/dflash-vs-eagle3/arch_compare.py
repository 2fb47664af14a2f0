"""DFlash vs EAGLE-3 on the embedded target, side by side on a 2-core CPU: each SFT, then Draft-OPD from each.

    F=runs/e3/features ; O=runs/e3 ; R=runs/scale-gpu/regenerated-1920.jsonl.gz   # R: the H200 run's answers
    ./run features --dtype bfloat16 --limit 700 --max-response-tokens 384 --keep-final \
        --draft-target-layer-ids 1 10 14 19 26 27 --out $F          # one cache holds both drafters' layers
    ./run sft --features $F --draft-num-layers 2 --draft-target-layer-ids 1 10 19 27 --draft-mask-token-id 16 $SFT --out $O/sft-dflash
    ./run sft --features $F --draft-arch eagle3 --draft-target-layer-ids 1 14 26 $SFT --out $O/sft-eagle3   # at the same time
    #   SFT="--draft-block-size 8 --draft-vocab-size 8192 --labels greedy --loss kl --steps 240 --batch-size 8
    #        --anchors-per-seq 64 --save-every 40 --optim-lr 2e-3 --dtype float32"
    python experiments/opd-headline/opd_headline.py refs --out runs/headline-cpu   # the held-out references (once)
    A="--out $O --features $F --regenerated $R --refs runs/headline-cpu"
    python experiments/dflash-vs-eagle3/arch_compare.py opd dflash $A   # Draft-OPD from each SFT drafter, same budget
    python experiments/dflash-vs-eagle3/arch_compare.py opd eagle3 $A   # at the same time
    python experiments/dflash-vs-eagle3/arch_compare.py opd eagle3 --no-rejected $A   # the rejected stream measured, not assumed off
    python experiments/dflash-vs-eagle3/arch_compare.py report --out $O --refs runs/headline-cpu   # replay tau, paired ratios, drafter cost

Same data (the 620 ShareGPT answers of one feature cache, fixed text labelled by the target's distribution), same
steps and anchors, the same compute counter. The drafters differ as their architectures do: DFlash 2 layers fed
target layers 1, 10, 19, 27 (its rule), MASK = token 16; EAGLE-3 one layer fed the inputs of layers 2, 15, 27
(outputs 1, 14, 26), chain drafting. Both: block 8 (7 drafts a round), 8,192-token draft vocabulary.
Draft-OPD: the authors' recipe as `opd_headline.py` runs it (`draftopd.headline.OPD`: 16 rollouts of up to 128 tokens
an update, lr 3e-4), on prompts of `--regenerated` that are not in the SFT cache, to `--budget-tflops`.
Scoring: greedy replay (`eval/replay.py`, the tau greedy decoding would measure) over the target's greedy answers
to 120 held-out prompts (`opd_headline.py refs`: 30 each of MT-Bench, GSM8K, HumanEval, held-out ShareGPT), so
arms may share the 2 cores; drafter cost per round is timed separately (`draftopd.eval.round_cost.measure`, machine
idle).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from draftopd import headline as H  # noqa: E402
from draftopd.data.features import FeatureCache  # noqa: E402
from draftopd.data.regenerate import load_regenerated  # noqa: E402
from draftopd.decode.stats import ratio_text  # noqa: E402
from draftopd.eval.replay import score_texts  # noqa: E402
from draftopd.eval.round_cost import measure  # noqa: E402
from draftopd.models.drafter import load_drafter  # noqa: E402
from draftopd.models.load import load_target  # noqa: E402
from draftopd.train.common import Compute  # noqa: E402
from draftopd.train.opd import train_opd  # noqa: E402

ARCHS = ("dflash", "eagle3")


def opd_prompts(args, target, layer_ids) -> list[list[int]]:
    """The regeneration pool's prompts that are not SFT prompts of the cache (exact token match)."""
    cache = FeatureCache.open(args.features, target, layer_ids)
    seen = {tuple(cache[i].tokens[: cache[i].response_start].tolist()) for i in range(len(cache))}
    pool = [list(e.prompt_ids) for e in load_regenerated(args.regenerated).examples]
    return [p for p in pool if tuple(p) not in seen]


def opd_cmd(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    run = out / f"opd-{args.arch}{'-norej' if args.no_rejected else ''}"
    target = load_target(args.target, dtype=torch.bfloat16)
    drafter = load_drafter(out / f"sft-{args.arch}" / "last", target, args.arch)
    refs = json.loads((Path(args.refs) / "refs.json").read_text())
    scored = {name: score_texts(target, drafter.spec.target_layer_ids, r["prompts"], r["outputs"]) for name, r in refs.items()}
    prompts = opd_prompts(args, target, drafter.spec.target_layer_ids)
    budget = args.budget_tflops * 1e12
    steps = max(1, round(budget / H.OPD_FLOPS_PER_UPDATE))
    cfg = replace(
        H.OPD,
        steps=steps,
        rollout=replace(H.OPD.rollout, seed=args.seed),
        max_flops=budget,
        save_every=2,
        loss=replace(H.OPD.loss, use_rejected=not args.no_rejected),
    )
    print(f"{run.name}: {len(prompts)} prompts, {steps} updates planned, stop at {args.budget_tflops} TFLOPs", flush=True)
    t0, curve = time.time(), [H.point(0, Compute(), H.replay_all(drafter, scored), time.time())]

    def on_step(step, d, compute):
        if step % args.curve_every == 0 or step == steps or compute.flops >= budget:
            curve.append(H.point(step, compute, H.replay_all(d, scored), t0))
            (run / "curve.json").write_text(json.dumps(curve))
            print(f"opd {args.arch} step {step}: {compute.flops / 1e12:.1f} TFLOPs, tau {curve[-1]['tau']['all']:.3f}", flush=True)

    run.mkdir(parents=True, exist_ok=True)
    train_opd(target, drafter, prompts, cfg, run / "train", on_step=on_step)
    print(f"opd {args.arch}: done in {time.time() - t0:.0f} s", flush=True)


def drafters(out: Path) -> dict[str, Path]:
    found = {f"sft-{arch}": out / f"sft-{arch}" / "last" for arch in ARCHS}
    found |= {p.name: p / "train" / "last" for p in sorted(out.glob("opd-*"))}
    return {k: v for k, v in found.items() if (v / "config.json").exists()}


def report_cmd(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    target = load_target(args.target, dtype=torch.bfloat16)
    refs = json.loads((Path(args.refs) / "refs.json").read_text())
    found, reps, cost, scored = drafters(out), {}, {}, {}
    for name, path in found.items():
        drafter = load_drafter(path, target).to(target.dtype).eval()
        layers = drafter.spec.target_layer_ids
        if layers not in scored:
            scored[layers] = {s: score_texts(target, layers, r["prompts"], r["outputs"]) for s, r in refs.items()}
        reps[name] = H.replay_all(drafter, scored[layers])
        if args.timing:
            timed = measure(target, drafter, 300, [1, drafter.block_size], args.repeats)
            cost[name] = {
                "draft_ms": timed["draft_ms"],
                "step_ms": timed["verify_ms"][1],
                "verify_ms": timed["verify_ms"][drafter.block_size],
            }
        print(f"{name}: tau {reps[name]['all'].tau:.3f}", flush=True)
    lines = [
        "| drafter | "
        + " | ".join(H.SETS)
        + " | all [95% CI] | slot 1 / 2 / 3 / 4 acceptance | draft per round (x plain step) | ideal speedup |",
        "|---|" + "---|" * (len(H.SETS) + 4),
    ]
    for name, rep in reps.items():
        lo, hi = rep["all"].tau_ci()
        slots = " / ".join(f"{a:.3f}" for a in rep["all"].slot_acceptance()[:4])
        c = cost.get(name)
        timing = (
            (
                f"{c['draft_ms']:.1f} ms ({c['draft_ms'] / c['step_ms']:.2f}) | "
                f"{rep['all'].tau * c['step_ms'] / (c['verify_ms'] + c['draft_ms']):.2f}x"
            )
            if c
            else "- | -"
        )
        lines.append(
            f"| {name} | "
            + " | ".join(f"{rep[s].tau:.3f}" for s in H.SETS)
            + f" | {rep['all'].tau:.3f} [{lo:.3f}, {hi:.3f}] | {slots} | {timing} |"
        )
    lines += ["", "| ratio (paired over the same 120 prompts) | tau ratio [95% CI] |", "|---|---|"]
    pairs = [
        ("sft-eagle3", "sft-dflash"),
        ("opd-eagle3", "opd-dflash"),
        ("opd-dflash", "sft-dflash"),
        ("opd-eagle3", "sft-eagle3"),
        ("opd-dflash-norej", "sft-dflash"),
        ("opd-eagle3-norej", "sft-eagle3"),
        ("opd-dflash", "opd-dflash-norej"),
        ("opd-eagle3", "opd-eagle3-norej"),
    ]
    summary = {"tau": {n: {s: r.tau for s, r in rep.items()} for n, rep in reps.items()}, "cost": cost, "ratios": {}}
    for a, b in pairs:
        if a in reps and b in reps:
            ta, tb = reps[a]["all"].texts, reps[b]["all"].texts
            ratio, lo, hi = H.paired([t.committed for t in tb], [t.rounds for t in tb], [t.committed for t in ta], [t.rounds for t in ta])
            lines.append(f"| {a} / {b} | {ratio_text(ratio, lo, hi)} |")
            summary["ratios"][f"{a}/{b}"] = {"ratio": ratio, "ci": [lo, hi]}
    lines += [
        "",
        "| Draft-OPD arm | TFLOPs | rollout tau first / last update | slot-1 acceptance first / last | rejected-stream weight share, first update | late-match rate first / last |",
        "|---|---|---|---|---|---|",
    ]
    for run in sorted(out.glob("opd-*")):
        metrics = run / "train" / "metrics.jsonl"
        if metrics.exists():
            rows = [json.loads(x) for x in metrics.read_text().splitlines()]
            f, la = rows[0], rows[-1]
            share = f["rollout/rej_weight"] / (f["rollout/rej_weight"] + f["rollout/acc_tokens"])
            lines.append(
                f"| {run.name} | {la['compute/flops'] / 1e12:.0f} | {f['rollout/tau']:.3f} / {la['rollout/tau']:.3f} | "
                f"{f['rollout/slot_acc_1']:.3f} / {la['rollout/slot_acc_1']:.3f} | {share:.2f} | "
                f"{f['rollout/rej_late_match']:.3f} / {la['rollout/rej_late_match']:.3f} |"
            )
    lines.append("")
    for name, path in found.items():
        metrics = path.parent / "metrics.jsonl"
        if metrics.exists():
            last = json.loads(metrics.read_text().splitlines()[-1])
            lines.append(f"- {name}: {last['step']} steps, {last['compute/flops'] / 1e12:.0f} TFLOPs")
    print("\n".join(lines))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cmd", choices=("opd", "report"))
    parser.add_argument("arch", nargs="?", choices=ARCHS)
    parser.add_argument(
        "--out",
        required=True,
        help="folder holding the SFT drafters sft-dflash/ and sft-eagle3/ (written by the "
        "`./run sft` commands above); the Draft-OPD runs and the report go there too",
    )
    parser.add_argument("--refs", required=True, help="folder of `opd_headline.py refs`'s refs.json")
    parser.add_argument("--features", help="opd: the SFT feature cache (its prompts are left out of Draft-OPD's)")
    parser.add_argument("--regenerated", help="opd: regenerated answers whose prompts Draft-OPD rolls out on")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-tflops", type=float, default=45.0)
    parser.add_argument("--curve-every", type=int, default=2)
    parser.add_argument("--no-rejected", action="store_true", help="opd: ablation without the rejected stream (run folder opd-ARCH-norej)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing", action=argparse.BooleanOptionalAction, default=True, help="report: time each drafter's round")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    if args.cmd == "opd" and args.arch is None:
        parser.error("opd needs the architecture")
    if args.cmd == "opd" and (args.features is None or args.regenerated is None):
        parser.error("opd needs --features and --regenerated")
    {"opd": opd_cmd, "report": report_cmd}[args.cmd](args)


if __name__ == "__main__":
    main()
