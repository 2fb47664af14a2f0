"""Where each Draft-OPD stream's gradient points: first-order geometry of the first update, per ablation.

The headline runs (`opd_headline.py`, same folder) found that, from a drafter at tau ~1.4, every variant that weakens the rejected
stream trains better than the full method. This script measures why, at the start drafter, without training: it
rolls out the first update's prompts exactly as `opd_headline.py arm` does (same config, same prompts, same
seed), replays them under each variant's loss, and splits the step's gradient into its accepted-stream part
`g_acc` and rejected-stream part `g_rej` (pooled aggregation: `g = g_acc + g_rej`, each already divided by the
step's shared normaliser). It compares them with `g_H`, the gradient of continued SFT's own loss (soft forward KL,
slot-weighted, `draftopd.headline.SFT`) on the target's greedy answers to held-out prompts (the first
`--heldout-per-set` of each of the report's four sets): descending a loss whose gradient has a positive cosine
with `g_H` lowers the held-out loss to first order. Reported per variant:
- `n_acc`, `w_rej`: the step's accepted tokens and decayed rejected weight (the pooled weights of the streams);
- `|g_acc|`, `|g_rej|` and `cos(g_acc, g_rej)`;
- `cos(., g_H)` for `g_acc`, `g_rej` and `g`, and for `sign(g)`, the direction of AdamW's first step from a fresh
  optimizer state (`m / sqrt(v) = g / |g|` per coordinate; every headline arm starts its optimizer fresh);
and two references: `g_S`, continued SFT's gradient on the first `--sft-examples` of the new answers (the data
`sft-new` steps along), and the cosine of `g_H` between two halves of the held-out prompts (how well one held-out gradient
predicts another: the noise floor of every cosine here). One rollout batch, one seed: these are diagnostics of
direction at the start, not of where a run ends (AdamW's later steps weigh coordinates by their history).

    python experiments/opd-headline/stream_gradients.py --out runs/headline-v3 --regenerated runs/headline-v3/regen.jsonl \
        [--seed 1]   # the bundled drafter v3 as the start, the v3 headline's prompt pool (opd_headline.py's docstring)
    # 10-20 min on one thread (--threads 1) next to a training arm; the token counts it prints equal the arm's first
    # metrics.jsonl row (checked for opd-s0, opd-s1, opd-t07-s0)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from draftopd.data.regenerate import SFTExample, load_regenerated  # noqa: E402
from draftopd.decode.speculative import generate  # noqa: E402
from draftopd.headline import ABLATIONS, SFT, opd_variant  # noqa: E402
from draftopd.models.drafter import load_drafter  # noqa: E402
from draftopd.models.load import load_target  # noqa: E402
from draftopd.train.anchors import make_segments  # noqa: E402
from draftopd.train.opd import collate, replay, rollout_batch, step_norms  # noqa: E402
from draftopd.train.sft import sft_micro_batch  # noqa: E402

VARIANTS = ("opd", "opd-fwd", "opd-rev", "opd-nodecay", "opd-random", "opd-first", "opd-wrong", "opd-lam01", "opd-t07")


def flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double() for g, p in zip(grads, params)])


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp(min=1e-30))


def sft_gradient(target, drafter, examples: list, params: list[torch.Tensor], seed: int) -> torch.Tensor:
    """Gradient of continued SFT's loss (`draftopd.headline.SFT`) over `examples`, normalised as one step."""
    gen, sums, weight = torch.Generator().manual_seed(seed), 0.0, 0.0
    for i in range(0, len(examples), SFT.batch_size):
        res = sft_micro_batch(target, drafter, examples[i : i + SFT.batch_size], SFT, gen)
        sums, weight = sums + flat_grad(res.loss_sum, params), weight + res.weight_sum
    return sums / max(weight, 1e-9)


def rollouts(target, drafter, prompts: list[list[int]], cfg) -> list:
    """The rollouts of the arm's first update (`train_opd`'s rollout loop, at data position 0)."""
    traces, pos = [], 0
    for _ in range(cfg.rollouts_per_step):
        batch, row_seeds = rollout_batch(prompts, cfg, pos)
        pos += cfg.prompts_per_rollout
        decode = replace(cfg.rollout, seed=cfg.rollout.seed + pos)
        traces += [t for t in generate(target, drafter, batch, decode, row_seeds).traces if t.rounds > 0]
    return traces


def stream_grads(target, drafter, traces: list, cfg, params: list[torch.Tensor]) -> dict:
    """g_acc and g_rej of one update under `cfg` (pooled: both divided by the step's shared normaliser, so their sum
    is the update's gradient)."""
    if cfg.loss.aggregation != "pooled":
        raise ValueError("the split g = g_acc + g_rej holds for pooled aggregation only")
    gen = torch.Generator().manual_seed(cfg.rollout.seed)  # as TrainerState's generator at step 0 draws random anchors
    segments = [make_segments(t, cfg.anchors, gen) for t in traces]
    n_acc, w_rej = step_norms(traces, segments, drafter.block_size, cfg.loss)
    lc = cfg.loss
    denom = lc.lam_acc * n_acc + (lc.lam_rej * w_rej if lc.use_rejected else 0.0)
    g_acc = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    g_rej = torch.zeros_like(g_acc)
    for i in range(0, len(traces), cfg.replay_batch):
        rb = collate(target, drafter, traces[i : i + cfg.replay_batch], segments[i : i + cfg.replay_batch])
        res = replay(target, drafter, rb, lc)
        g_acc += flat_grad(lc.lam_acc * res.acc.loss_sum / denom, params)
        if lc.use_rejected and res.rej.tokens:
            g_rej += flat_grad(lc.lam_rej * res.rej.loss_sum / denom, params)
    return {"n_acc": n_acc, "w_rej": w_rej, "g_acc": g_acc, "g_rej": g_rej}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out",
        required=True,
        help="an opd_headline.py folder: its refs.json (`opd_headline.py refs --out`); stream_gradients-sSEED.json is written there",
    )
    ap.add_argument("--start", default="draftopd/drafters/smollm2-135m-dflash")
    ap.add_argument("--regenerated", required=True, help="the headline's prompt pool and continued SFT's answers (its --regenerated)")
    ap.add_argument("--trained-on", type=int, default=0)
    ap.add_argument("--target", default="smollm2-135m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heldout-per-set", type=int, default=30)
    ap.add_argument("--sft-examples", type=int, default=32, help="g_S: continued SFT's gradient on the first N new answers")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(ABLATIONS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    target = load_target(args.target, dtype=torch.bfloat16)
    drafter = load_drafter(args.start, target)
    drafter.eval()  # no dropout: every gradient here is of the same function
    params = [p for p in drafter.parameters() if p.requires_grad]
    refs = json.loads((out / "refs.json").read_text())
    heldout = [
        SFTExample(f"{name}-{i}", tuple(r["prompts"][i]), tuple(r["outputs"][i]))
        for name, r in refs.items()
        for i in range(min(args.heldout_per_set, len(r["prompts"])))
    ]
    g_h = sft_gradient(target, drafter, heldout, params, args.seed)
    halves = [sft_gradient(target, drafter, heldout[j::2], params, args.seed) for j in (0, 1)]
    new = load_regenerated(args.regenerated).examples[args.trained_on :]
    g_s = sft_gradient(target, drafter, new[: args.sft_examples], params, args.seed)
    print(
        f"held-out gradient over {len(heldout)} answers; cos between its halves {cos(*halves):.3f}; "
        f"continued SFT's gradient: cos with it {cos(g_s, g_h):.3f}, sign step {cos(g_s.sign(), g_h):.3f}",
        flush=True,
    )
    prompts = [list(e.prompt_ids) for e in new]
    traces_by_temp: dict[float, list] = {}
    rows = []
    for name in args.variants:
        cfg = opd_variant(name, seed=args.seed)
        if cfg.rollout.temperature not in traces_by_temp:
            traces_by_temp[cfg.rollout.temperature] = rollouts(target, drafter, prompts, cfg)
        s = stream_grads(target, drafter, traces_by_temp[cfg.rollout.temperature], cfg, params)
        g = s["g_acc"] + s["g_rej"]
        row = {
            "variant": name,
            "n_acc": s["n_acc"],
            "w_rej": s["w_rej"],
            "norm_acc": float(s["g_acc"].norm()),
            "norm_rej": float(s["g_rej"].norm()),
            "cos_acc_rej": cos(s["g_acc"], s["g_rej"]),
            "cos_acc_H": cos(s["g_acc"], g_h),
            "cos_rej_H": cos(s["g_rej"], g_h),
            "cos_H": cos(g, g_h),
            "cos_sign_H": cos(g.sign(), g_h),
            "cos_S": cos(g, g_s),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "heldout_answers": len(heldout),
        "cos_heldout_halves": cos(*halves),
        "sft": {"cos_H": cos(g_s, g_h), "cos_sign_H": cos(g_s.sign(), g_h), "norm": float(g_s.norm())},
        "variants": rows,
    }
    (out / f"stream_gradients-s{args.seed}.json").write_text(json.dumps(summary, indent=1))
    print(
        "\n| variant | n_acc | w_rej | |g_acc| | |g_rej| | cos(g_acc, g_rej) | cos(g_acc, g_H) | cos(g_rej, g_H) | cos(g, g_H) "
        "| cos(sign g, g_H) | cos(g, g_S) |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['variant']} | {r['n_acc']:.0f} | {r['w_rej']:.0f} | {r['norm_acc']:.3f} | {r['norm_rej']:.3f} | "
            f"{r['cos_acc_rej']:+.3f} | {r['cos_acc_H']:+.3f} | {r['cos_rej_H']:+.3f} | {r['cos_H']:+.3f} | "
            f"{r['cos_sign_H']:+.3f} | {r['cos_S']:+.3f} |"
        )
    print(
        f"| continued SFT (g_S) | | | {summary['sft']['norm']:.3f} | | | | | {summary['sft']['cos_H']:+.3f} | "
        f"{summary['sft']['cos_sign_H']:+.3f} | 1 |"
    )
    print(f"\ncos(g_H of one half of the held-out answers, of the other half) = {summary['cos_heldout_halves']:.3f}")


if __name__ == "__main__":
    main()
