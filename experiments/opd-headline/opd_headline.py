"""Draft-OPD vs compute-matched continued SFT from a plateaued drafter on the embedded target (2-core CPU sizes).

From the H200 drafter (`experiments/train-at-scale`, `docs/results/strong-drafters.md`): R and S are what
`train_at_scale.py run` wrote on the GPU (a working folder, not in git):

    R=runs/scale-gpu/regenerated-1920.jsonl.gz ; S=runs/scale-gpu/drafter ; O=runs/headline-cpu
    python experiments/opd-headline/opd_headline.py refs --out $O        # greedy references of the held-out sets, once
    python experiments/opd-headline/opd_headline.py arm opd --start $S --regenerated $R --out $O --seed 0
    python experiments/opd-headline/opd_headline.py arm sft-new --start $S --regenerated $R --out $O --seed 0   # at the same time
    python experiments/opd-headline/opd_headline.py report --out $O      # table, paired ratios, tau-vs-compute plot

From the bundled drafter v3 instead (`docs/results/draft-opd-embedded.md`, "From the bundled drafter v3"): R = the
target's answers to ShareGPT train prompts 12,100-12,867 (`draftopd regenerate --split all`), none of which v3 trained
on, so `--trained-on 0`; sft-old takes v3's last batch of answers:

    C="--start draftopd/drafters/smollm2-135m-dflash --regenerated runs/headline-v3/regen.jsonl --trained-on 0
       --old-regenerated runs/cpu-regen2/regen.jsonl --out runs/headline-v3"
    python experiments/opd-headline/opd_headline.py arm opd-wrong $C --seed 0 --curve-every 3   # and sft-new, opd, ... likewise

The start is a drafter whose held-out tau has stopped rising (the H200 drafter: 1.32-1.33 over the last 250 of its 665
steps on its 768 answers, the first 768 records of R). Arms, each from that start:
- `opd`: Draft-OPD with the authors' recipe (single-token estimators, pooled, lr 3e-4 cosine, warm-up) on the
  prompts of R's records after the first `--trained-on`, which the start never saw (a prompt pool disjoint from its
  SFT data); 16 rollouts of up to 128 tokens per update (2 batches of 8), sized for a 2-core CPU.
- `sft-new`: continued SFT on the target's answers to those same prompts (the data-matched control: the same
  prompts, the target's text instead of rollouts), soft labels; `sft-new-ce`: the same with hard labels (cross-entropy
  on the answers' tokens); `sft-old`: on the start's own answers (the plateau).
  Every arm stops at `--budget-tflops` of compute (the same counter: `train/common.Compute`).
- ablations (`draftopd.headline.ABLATIONS`) `opd-random` (accepted stream at random anchors, the real rejected stream
  kept), `opd-fwd` (forward KL on both streams), `opd-rev` (reverse on both), `opd-nodecay` (gamma 1), `opd-norej`
  (no rejected stream), `opd-first` (first rejected token only), `opd-t07` (rollouts at temperature 0.7), `opd-exact`
  (exact KL), `opd-lam01` (rejected stream weighted 0.1: about the fifth of the loss it has in the paper's regime,
  tau ~6), `opd-wrong` (the rejected stream without the late proposals that equal the final text; this project's
  switch). Ablations ran at a smaller budget (`--budget-tflops 60`); the report compares each with the full
  method's curve point nearest in compute.
Every arm replays its drafter over the target's greedy answers to the held-out prompts (30 each of MT-Bench,
GSM8K, HumanEval, and held-out ShareGPT; `eval/replay.py`: the tau greedy decoding would measure, no timing)
every `--curve-every` updates, so two arms can share the 2 cores (one thread each) without skewing anything.
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

from draftopd.config import DecodeConfig, EvalConfig  # noqa: E402
from draftopd.data.prompts import load_prompts, render_prompt  # noqa: E402
from draftopd.data.regenerate import load_regenerated  # noqa: E402
from draftopd.decode.speculative import autoregressive_generate  # noqa: E402
from draftopd.decode.stats import ratio_text  # noqa: E402
from draftopd.eval.replay import ReplayedTau, ReplayedText, score_texts  # noqa: E402
from draftopd.headline import ABLATIONS, OPD, OPD_FLOPS_PER_UPDATE, SETS, SFT, SFT_FLOPS_PER_STEP, opd_variant, paired, point, replay_all  # noqa: E402
from draftopd.models.drafter import load_drafter  # noqa: E402
from draftopd.models.load import load_target  # noqa: E402
from draftopd.train.opd import train_opd  # noqa: E402
from draftopd.train.sft import train_sft  # noqa: E402


def refs_cmd(args) -> None:
    target = load_target(args.target, dtype=torch.bfloat16)
    ev, out = EvalConfig(), {}
    for name in SETS:
        source, split = ("sharegpt", "heldout") if name == "sharegpt-heldout" else (name, "all")
        prompts = [
            render_prompt(p, target.tokenizer) for p in load_prompts(source, split=split, limit=ev.num_prompts, seed=ev.decode.seed).prompts
        ]
        gen = autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=ev.decode.max_new_tokens))
        out[name] = {"prompts": prompts, "outputs": [t.output for t in gen.traces]}
        print(f"{name}: {len(prompts)} greedy references", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "refs.json").write_text(json.dumps(out))


def arm_cmd(args) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    run = out / f"{args.arm}-s{args.seed}"
    target = load_target(args.target, dtype=torch.bfloat16)
    refs = json.loads((out / "refs.json").read_text())
    drafter = load_drafter(args.start, target)
    scored = {name: score_texts(target, drafter.spec.target_layer_ids, r["prompts"], r["outputs"]) for name, r in refs.items()}
    examples = load_regenerated(args.regenerated).examples
    old, new = examples[: args.trained_on], examples[args.trained_on :]
    if args.old_regenerated:
        old = load_regenerated(args.old_regenerated).examples
    curve_path = run / "curve.json"
    curve = json.loads(curve_path.read_text()) if curve_path.exists() else []
    t0 = time.time()
    if not curve:
        from draftopd.train.common import Compute

        curve.append(point(0, Compute(), replay_all(drafter, scored), t0))
    every = args.curve_every

    def on_step(step, d, compute, last_step):
        if ((every and step % every == 0) or step == last_step) and not any(c["step"] == step for c in curve):
            curve.append(point(step, compute, replay_all(d, scored), t0))
            curve_path.write_text(json.dumps(curve))
            print(f"{args.arm} s{args.seed} step {step}: {compute.flops / 1e12:.1f} TFLOPs, tau {curve[-1]['tau']['all']:.3f}", flush=True)

    run.mkdir(parents=True, exist_ok=True)
    budget = args.budget_tflops * 1e12
    if args.arm.startswith("opd"):
        steps = round(budget / OPD_FLOPS_PER_UPDATE)
        cfg = opd_variant(args.arm, steps=steps, seed=args.seed, max_flops=budget, optim=replace(OPD.optim, lr=args.lr))
        prompts = [list(e.prompt_ids) for e in new]
        print(f"{args.arm}: {len(prompts)} prompts, {steps} updates planned, stop at {args.budget_tflops} TFLOPs", flush=True)
        train_opd(
            target,
            drafter,
            prompts,
            cfg,
            run / "train",
            resume=True,
            on_step=lambda s, d, c: on_step(s, d, c, s if (s == steps or c.flops >= budget) else -1),
        )
    else:
        steps = round(budget / SFT_FLOPS_PER_STEP)  # the cosine schedule spans the steps the budget allows
        loss = "ce" if args.arm == "sft-new-ce" else SFT.loss
        cfg = replace(SFT, steps=steps, seed=args.seed, max_flops=budget, loss=loss, optim=replace(SFT.optim, lr=args.lr))
        data = old if args.arm == "sft-old" else new
        print(f"{args.arm}: {len(data)} answers, {steps} steps planned, stop at {args.budget_tflops} TFLOPs", flush=True)
        marks = [budget * k / args.sft_points for k in range(1, args.sft_points + 1)]  # curve points at equal compute steps

        def sft_step(s, d, c):
            if marks and c.flops >= marks[0]:
                while marks and c.flops >= marks[0]:
                    marks.pop(0)
                on_step(s, d, c, s)

        train_sft(target, drafter, data, cfg, run / "train", resume=True, on_step=sft_step)
    final = json.loads((run / "train" / "last" / "config.json").read_text())["step"]
    if curve[-1]["step"] != final:  # the planned steps ran out just short of the budget: the final point still counts
        on_step(final, drafter, _compute_of(run / "train" / "last"), final)
    print(f"{args.arm} s{args.seed}: done in {time.time() - t0:.0f} s", flush=True)


def _compute_of(checkpoint: Path):
    from draftopd.train.common import Compute, load_trainer_state

    return Compute(**load_trainer_state(checkpoint / "trainer.pt")["compute"])


def texts_of(pt: dict) -> list[ReplayedText]:
    return [ReplayedText(tuple(acc), committed) for name in SETS for committed, acc in pt["texts"][name]]


def report_cmd(args) -> None:
    out = Path(args.out)
    curves = {p.name: json.loads((p / "curve.json").read_text()) for p in sorted(out.glob("*-s*")) if (p / "curve.json").exists()}
    start = next(iter(curves.values()))[0]
    lines = ["| drafter | TFLOPs | " + " | ".join(SETS) + " | all [95% CI] | slot 1/2/3 |", "|---|---|" + "---|" * (len(SETS) + 2)]

    def row(name, pt):
        rep = ReplayedTau(tuple(texts_of(pt)), 8)
        lo, hi = rep.tau_ci()
        return (
            f"| {name} | {pt['flops'] / 1e12:.0f} | "
            + " | ".join(f"{pt['tau'][s]:.3f}" for s in SETS)
            + f" | {rep.tau:.3f} [{lo:.3f}, {hi:.3f}] | "
            + "/".join(f"{a:.2f}" for a in pt["slot_acceptance"][:3])
            + " |"
        )

    lines.append(row("start", start))
    for name, c in curves.items():
        lines.append(row(name, c[-1]))
    lines += ["", "| arm | held-out tau (all) at TFLOPs after the start |", "|---|---|"]
    lines += [f"| {n} | " + ", ".join(f"{p['tau']['all']:.3f} @ {p['flops'] / 1e12:.0f}" for p in c) + " |" for n, c in curves.items()]
    lines += ["", "| ratio (paired over the same prompts) | tau ratio [95% CI] |", "|---|---|"]
    summary = {"final": {n: c[-1]["tau"] for n, c in curves.items()}, "ratios": {}}
    pairs = [(n, "start") for n in curves]
    arm_seed = {n: tuple(n.rsplit("-s", 1)) for n in curves}  # "opd-fwd-s1" -> ("opd-fwd", "1")
    for n, (arm, seed) in arm_seed.items():
        if arm.startswith("opd"):
            pairs += [(n, f"{ref}-s{seed}") for ref in ("sft-new", "sft-new-ce", "sft-old") if f"{ref}-s{seed}" in curves]
            pairs += [(n, f"opd-s{seed}")] if arm != "opd" and f"opd-s{seed}" in curves else []
        if arm == "sft-new-ce" and f"sft-new-s{seed}" in curves:
            pairs.append((n, f"sft-new-s{seed}"))

    def nearest(ref: str, arm: str) -> dict:  # the reference's curve point nearest in compute to the arm's final point
        return min(curves[ref], key=lambda p: abs(p["flops"] - curves[arm][-1]["flops"]))  # (ablations ran at a smaller budget)

    for a, b in pairs:
        pa = curves[a][-1]
        pb = start if b == "start" else nearest(b, a)
        ta, tb = texts_of(pa), texts_of(pb)
        ratio, lo, hi = paired([t.committed for t in tb], [t.rounds for t in tb], [t.committed for t in ta], [t.rounds for t in ta])
        at = "" if b == "start" else f" at {pb['flops'] / 1e12:.0f} TFLOPs"
        lines.append(f"| {a} / {b}{at} | {ratio_text(ratio, lo, hi)} |")
        summary["ratios"][f"{a}/{b}"] = {"ratio": ratio, "ci": [lo, hi], "ref_flops": pb["flops"], "flops": pa["flops"]}

    def pooled(points: list[dict]) -> list[list[int]]:  # each prompt's committed tokens and rounds, summed over seeds
        per_prompt = list(zip(*(texts_of(p) for p in points)))
        return [[sum(t.committed for t in ts) for ts in per_prompt], [sum(t.rounds for t in ts) for ts in per_prompt]]

    for arm in sorted({a for a, _ in arm_seed.values() if a.startswith("opd") or a == "sft-new-ce"}):  # against sft-new (and opd), pooled
        refs_of = {"opd": ("sft-new", "sft-new-ce"), "sft-new-ce": ("sft-new",)}
        for ref in refs_of.get(arm, ("sft-new", "sft-new-ce", "opd")):
            seeds = sorted(x for a, x in arm_seed.values() if a == arm and f"{ref}-s{x}" in curves)
            if len(seeds) > 1:
                refs = [nearest(f"{ref}-s{x}", f"{arm}-s{x}") for x in seeds]
                ratio, lo, hi = paired(*pooled(refs), *pooled([curves[f"{arm}-s{x}"][-1] for x in seeds]))
                at = "/".join(f"{p['flops'] / 1e12:.0f}" for p in refs)
                lines.append(f"| {arm} / {ref}, seeds {', '.join(seeds)} pooled (at {at} TFLOPs) | {ratio_text(ratio, lo, hi)} |")
                summary["ratios"][f"{arm}/{ref} pooled"] = {"ratio": ratio, "ci": [lo, hi], "seeds": seeds}
    lines += [
        "",
        "| Draft-OPD arm | rollout tau first / last update | slot-1 acceptance first / last | rejected proposals after the "
        "first rejected slot that equal the final token, first / last update |",
        "|---|---|---|---|",
    ]
    for name in curves:
        metrics = out / name / "train" / "metrics.jsonl"
        if name.startswith("opd") and metrics.exists():
            rows = [json.loads(x) for x in metrics.read_text().splitlines()]
            f, la = rows[0], rows[-1]
            lines.append(
                f"| {name} | {f['rollout/tau']:.3f} / {la['rollout/tau']:.3f} | {f['rollout/slot_acc_1']:.3f} / {la['rollout/slot_acc_1']:.3f} | "
                f"{f['rollout/rej_late_match']:.3f} of {f['rollout/rej_late_n']} / {la['rollout/rej_late_match']:.3f} of {la['rollout/rej_late_n']} |"
            )
            summary.setdefault("rollouts", {})[name] = {
                k: [f[k], la[k]] for k in ("rollout/tau", "rollout/slot_acc_1", "rollout/rej_late_match")
            }
    print("\n".join(lines))
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(curves, start, out / "tau_vs_compute.png")


def plot(curves: dict, start: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8))
    tab20 = plt.get_cmap("tab20").colors  # one colour an arm, dark shades first; its seeds share it, one line style each
    colors = [tab20[k] for k in (*range(0, 20, 2), *range(1, 20, 2))]
    arms = list(dict.fromkeys(name.rsplit("-s", 1)[0] for name in curves))
    for name, c in curves.items():
        arm, seed = name.rsplit("-s", 1)
        main = arm in ("opd", "sft-new", "sft-new-ce", "sft-old")
        ax.plot(
            [p["flops"] / 1e12 for p in c],
            [p["tau"]["all"] for p in c],
            {"0": "-", "1": "--"}.get(seed, ":"),
            marker="o",
            markersize=3 if main else 2,
            linewidth=2 if main else 1,
            label=name,
            color=colors[arms.index(arm) % 20],
        )
    ax.set_xlabel("compute after the SFT start (TFLOPs, same counter for every arm)")
    ax.set_ylabel("held-out greedy tau (120 prompts, replay)")
    ax.set_title("Draft-OPD vs continued SFT on the embedded target (2-core CPU)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), ncol=1 + len(curves) // 16)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cmd", choices=("refs", "arm", "report"))
    parser.add_argument("arm", nargs="?", choices=(*ABLATIONS, "sft-new", "sft-new-ce", "sft-old"))
    parser.add_argument("--out", default="runs/headline-cpu")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument("--start", help="arm: the start drafter folder (the H200 drafter, the bundled drafter, ...)")
    parser.add_argument("--regenerated", help="arm: regenerated answers (JSONL[.gz]); the first --trained-on are the start's own")
    parser.add_argument(
        "--trained-on",
        type=int,
        default=768,
        help="the first N records of --regenerated are the start's "
        "own answers (sft-old trains on them); Draft-OPD's prompts and sft-new's answers are the rest",
    )
    parser.add_argument("--old-regenerated", help="the start's own answers for sft-old, when they are not in --regenerated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-tflops", type=float, default=100.0, help="every arm stops at this compute (same counter)")
    parser.add_argument("--curve-every", type=int, default=4, help="Draft-OPD: a curve point every N updates")
    parser.add_argument("--sft-points", type=int, default=5, help="SFT arms: curve points at N equal fractions of the matched compute")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--lr",
        type=float,
        default=3e-4,
        help="peak learning rate of every arm (the authors': 3e-4); "
        "give each value its own --out (with a copy of refs.json), so the report compares like with like",
    )
    args = parser.parse_args()
    if args.cmd == "arm" and args.arm is None:
        parser.error("arm needs its name")
    if args.cmd == "arm" and (args.start is None or args.regenerated is None):
        parser.error("arm needs --start and --regenerated")
    {"refs": refs_cmd, "arm": arm_cmd, "report": report_cmd}[args.cmd](args)


if __name__ == "__main__":
    main()
