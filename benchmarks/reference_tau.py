"""tau of a DFlash drafter under z-lab's reference decoder (`dflash==0.1.0`) next to ours, on the real target.

The drafter is exported with `export_dflash` to a temporary folder and loaded with the reference's own loader
(`load_reference`: every tensor used). Then, for each evaluation set (`EvalConfig().sets`, the first
`--prompts-per-set` prompts `draftopd eval` picks: `load_prompts(set, limit, seed)` is prefix-stable, rendered with
the chat template) and each prompt, one at a time (batch 1, as the reference decodes), in float32, greedy, stopping
at the target's EOS ids and at `--max-new-tokens`:
- plain greedy decoding (`autoregressive_generate`), the text both speculative decoders must reproduce;
- our `generate`;
- the reference's `spec_generate` loop (`dflash_generate` with `return_stats=True`, which adds only timers and the
  per-round committed lengths; `reference_run`).

tau, the same for both: tokens a decoder committed in verify rounds / its verify rounds, i.e. (new tokens - 1) /
rounds. The first new token comes from the prefill in both decoders and is in neither count; tokens past EOS or
max_new_tokens are not counted (ours drafts a whole block in its last round and cuts the commit; the reference
shrinks its last blocks to fit max_new_tokens, and those smaller blocks count as rounds). Per set and overall:
tau with a 95% percentile bootstrap over prompts (`bootstrap_ratio_ci`), the ratio reference/ours with a paired
bootstrap (`paired_ratio_ci`, the same prompts resampled together), the prompts whose output equals plain decoding
for each decoder, and the prompts whose per-round accepted lengths are identical over the reference's leading
whole-block, uncut rounds (`whole_block_rounds`, as tests/test_interop_dflash.py compares them).

    OMP_NUM_THREADS=1 .venv/bin/draftopd sft --features runs/recipe/features --draft-num-layers 1 --draft-block-size 8 \\
        --draft-target-layer-ids 1 10 19 27 --draft-mask-token-id 16 --labels greedy --loss kl --steps 60 \\
        --batch-size 8 --anchors-per-seq 32 --optim-lr 2e-3 --dtype float32 --out runs/refdflash/sft
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference_tau.py --drafter runs/refdflash/sft/last \\
        --prompts-per-set 10 --json runs/refdflash/reference_tau.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftopd.config import DecodeConfig, EvalConfig  # noqa: E402
from draftopd.decode.speculative import autoregressive_generate, generate  # noqa: E402
from draftopd.decode.stats import bootstrap_ratio_ci, first_divergence, paired_ratio_ci  # noqa: E402
from draftopd.eval.evaluate import load_eval_sets  # noqa: E402
from draftopd.interop.dflash_ref import export_dflash, load_reference, reference_run, whole_block_rounds  # noqa: E402
from draftopd.models.drafter import load_drafter, widen_vocab  # noqa: E402
from draftopd.models.load import load_target  # noqa: E402


@dataclass(frozen=True)
class PromptResult:
    """One prompt under both decoders. committed = new tokens - 1 (the prefill's token is in no round)."""

    set: str
    id: str
    new_tokens: int  # plain decoding's
    ours_committed: int
    ours_rounds: int
    ref_committed: int
    ref_rounds: int
    ours_equal: bool  # output == plain decoding's
    ref_equal: bool
    rounds_compared: int  # the reference's leading whole-block, uncut rounds
    first_differing_round: int | None  # among those, the first whose accepted length differs from ours; None = all equal
    seconds: dict[str, float]  # plain / ours / reference wall time


@dataclass(frozen=True)
class Summary:
    prompts: int
    ours_tau: float
    ours_tau_ci: tuple[float, float]
    ref_tau: float
    ref_tau_ci: tuple[float, float]
    ratio: float  # reference tau / our tau
    ratio_ci: tuple[float, float]
    ours_equal: int
    ref_equal: int
    same_accepted: int
    rounds_compared: int


def run_prompt(target, drafter, reference, name: str, pid: str, prompt: list[int], cfg: DecodeConfig) -> PromptResult:
    stop_ids = sorted(target.eos_ids) if cfg.stop_at_eos else None
    t0 = time.perf_counter()
    plain = autoregressive_generate(target, [prompt], cfg).traces[0].output
    t1 = time.perf_counter()
    ours = generate(target, drafter, [prompt], cfg).traces[0]
    t2 = time.perf_counter()
    ref = reference_run(reference, target, prompt, cfg.max_new_tokens, stop_ids)
    t3 = time.perf_counter()
    ref_out, lengths = ref.output_ids[0, len(prompt) :].tolist(), list(ref.acceptance_lengths)
    n = whole_block_rounds(lengths, cfg.max_new_tokens, drafter.block_size)
    return PromptResult(
        set=name,
        id=pid,
        new_tokens=len(plain),
        ours_committed=len(ours.output) - 1,
        ours_rounds=ours.rounds,
        ref_committed=len(ref_out) - 1,
        ref_rounds=len(lengths),
        ours_equal=ours.output == plain,
        ref_equal=ref_out == plain,
        rounds_compared=n,
        first_differing_round=first_divergence(lengths[:n], [r + 1 for r in ours.accepted[:n]]),
        seconds={"plain": t1 - t0, "ours": t2 - t1, "reference": t3 - t2},
    )


def summarize(results: list[PromptResult], ev: EvalConfig) -> Summary:
    kw = dict(resamples=ev.bootstrap_resamples, seed=ev.decode.seed)
    oc, orr = [r.ours_committed for r in results], [r.ours_rounds for r in results]
    rc, rr = [r.ref_committed for r in results], [r.ref_rounds for r in results]
    ours_tau, ref_tau = sum(oc) / max(sum(orr), 1), sum(rc) / max(sum(rr), 1)
    return Summary(
        prompts=len(results),
        ours_tau=ours_tau,
        ours_tau_ci=bootstrap_ratio_ci(oc, orr, **kw),
        ref_tau=ref_tau,
        ref_tau_ci=bootstrap_ratio_ci(rc, rr, **kw),
        ratio=ref_tau / max(ours_tau, 1e-12),
        ratio_ci=paired_ratio_ci(oc, orr, rc, rr, **kw),
        ours_equal=sum(r.ours_equal for r in results),
        ref_equal=sum(r.ref_equal for r in results),
        same_accepted=sum(r.first_differing_round is None for r in results),
        rounds_compared=sum(r.rounds_compared for r in results),
    )


def table(summaries: dict[str, Summary]) -> str:
    ci = lambda v, c: f"{v:.3f} [{c[0]:.3f}, {c[1]:.3f}]"  # noqa: E731
    rows = [
        "| set | prompts | tau ours | tau reference | reference / ours | ours = plain | reference = plain "
        "| same accepted lengths (rounds compared) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summaries.items():
        rows.append(
            f"| {name} | {s.prompts} | {ci(s.ours_tau, s.ours_tau_ci)} | {ci(s.ref_tau, s.ref_tau_ci)} | {ci(s.ratio, s.ratio_ci)} | "
            f"{s.ours_equal}/{s.prompts} | {s.ref_equal}/{s.prompts} | {s.same_accepted}/{s.prompts} ({s.rounds_compared}) |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--drafter", required=True, help="an exportable DFlash checkpoint (full vocabulary, MASK a target token)")
    parser.add_argument("--target", default="smollm2-135m")
    parser.add_argument(
        "--widen-vocab",
        action="store_true",
        help="a reduced-vocabulary drafter (the committed one) drafts over the whole vocabulary, as the "
        "reference format needs (models.drafter.widen_vocab); ours decodes with the widened one too",
    )
    parser.add_argument("--prompts-per-set", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    ev, cfg = EvalConfig(), DecodeConfig(max_new_tokens=args.max_new_tokens)
    target = load_target(args.target, dtype=torch.float32)
    drafter = load_drafter(args.drafter, target).to(torch.float32).eval()
    drafter = widen_vocab(drafter) if args.widen_vocab else drafter
    with tempfile.TemporaryDirectory() as folder:
        export_dflash(drafter, folder, target)
        reference = load_reference(folder, torch.float32)
    results: list[PromptResult] = []
    for name, items in load_eval_sets(target, replace(ev, num_prompts=args.prompts_per_set)).items():
        for pid, ids in items:
            results.append(run_prompt(target, drafter, reference, name, pid, ids, cfg))
            r = results[-1]
            print(
                f"{name} {pid}: {r.new_tokens} tokens, rounds ours {r.ours_rounds} reference {r.ref_rounds}, "
                f"equal {r.ours_equal}/{r.ref_equal}, first differing round {r.first_differing_round}, "
                + ", ".join(f"{k} {v:.1f} s" for k, v in r.seconds.items()),
                file=sys.stderr,
                flush=True,
            )
    summaries = {name: summarize([r for r in results if r.set == name], ev) for name in ev.sets}
    summaries["all"] = summarize(results, ev)
    print(table(summaries))
    if args.json:
        out = {
            "drafter": args.drafter,
            "target": args.target,
            "max_new_tokens": args.max_new_tokens,
            "block_size": drafter.block_size,
            "summary": {k: asdict(s) for k, s in summaries.items()},
            "prompts": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
