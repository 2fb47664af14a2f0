"""Train a drafter at scale on one GPU (or, with small settings, a CPU) inside a fixed time budget, and measure it.

Stages (each time-boxed, so the whole run ends inside --budget-s; every number lands in OUT/summary.json):
1. references: the target's greedy answers (--eval-new-tokens) to the evaluation prompts (30 per set, the prompts
   `draftopd eval` uses), and batch-1 plain decoding speed;
2. regenerate: the target answers ShareGPT train-split prompts in large batches, alternating the sampling
   temperatures of --regen-temperatures per chunk (tokens/s reported beside batch-1 plain decoding);
3. SFT from scratch on those answers (online target, soft labels: forward KL to the target's distribution over the
   reduced draft vocabulary), the step count fitted to the time left, with greedy-replay tau on the evaluation sets
   every few steps: tau against training compute, the SFT plateau curve (`eval/replay.py`: exact greedy tau
   without decoding); beside it the same tau on greedy ShareGPT answers held out of training and on as many that
   were trained on (the gap is memorisation: more data, not more steps, is then what the drafter needs);
4. final: greedy-replay tau per set with 95% bootstrap intervals, per-slot acceptance, the drafter folder
   (OUT/drafter, loadable with `--drafter`).

    python experiments/train-at-scale/train_at_scale.py pack --out pack.json.gz   # tokenized prompts (for a machine without the data packages)
    python experiments/train-at-scale/train_at_scale.py run --out runs/scale --device cuda --budget-s 470 [--pack pack.json.gz] \
        [--regenerated runs/scale-gpu/regenerated-1920.jsonl.gz]    # reuse answers an earlier run regenerated

Speedup on the CPU is measured afterwards with `draftopd eval --drafter OUT/drafter` (`docs/results/strong-drafters.md`,
"At scale on one H200").
"""

from __future__ import annotations

import argparse
import copy
import gzip
import hashlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from draftopd.config import DecodeConfig, DrafterConfig, EvalConfig, OptimConfig, SFTConfig, resolve_device, resolve_dtype  # noqa: E402
from draftopd.data.features import frequent_tokens  # noqa: E402
from draftopd.data.prompts import Prompt, load_prompts, render_prompt, stable_hash  # noqa: E402
from draftopd.data.regenerate import load_regenerated, regenerate  # noqa: E402
from draftopd.decode.speculative import autoregressive_generate, generate  # noqa: E402
from draftopd.eval.replay import ReplayedTau, replay_scored, score_texts  # noqa: E402
from draftopd.models.drafter import DrafterSpec, default_mask_token, new_drafter, save_drafter  # noqa: E402
from draftopd.models.load import load_target, tiny_target  # noqa: E402
from draftopd.train.sft import train_sft  # noqa: E402

T0 = time.time()


def log(message: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------- prompts


def make_pack(target, train_limit: int, max_prompt_tokens: int = 512) -> dict:
    """Tokenized prompts: ShareGPT train split (training) and the evaluation sets exactly as `draftopd eval` picks them."""
    ev = EvalConfig()
    train = []
    for p in load_prompts("sharegpt", split="train", limit=train_limit).prompts:
        ids = render_prompt(p, target.tokenizer)
        if len(ids) <= max_prompt_tokens:
            train.append([p.id, ids])
    evals = {
        name: [[p.id, render_prompt(p, target.tokenizer)] for p in load_prompts(name, limit=ev.num_prompts, seed=ev.decode.seed).prompts]
        for name in ev.sets
    }
    return {"target": target.name, "train": train, "eval": evals}


def tiny_pack(target, n_train: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, target.vocab_size - 1, (n,), generator=g).tolist()  # noqa: E731
    return {
        "target": target.name,
        "train": [[f"t{i}", rand(8 + i % 9)] for i in range(n_train)],
        "eval": {s: [[f"{s}{i}", rand(6 + i % 5)] for i in range(6)] for s in ("a", "b")},
    }


def weights_sha(target) -> str:
    """sha256 over the target's parameters (as loaded, in float32, sorted by name, tied ones once): the same number
    on every machine that converted the same GGUF to the same values."""
    digest = hashlib.sha256()
    for key, value in sorted(target.model.named_parameters()):
        digest.update(key.encode())
        digest.update(value.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- stages


def references(target, pack: dict, new_tokens: int) -> dict:
    """Greedy outputs of the evaluation prompts (one ragged batch per set): what greedy replay measures tau on."""
    refs = {}
    for name, items in pack["eval"].items():
        prompts = [ids for _, ids in items]
        gen = autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=new_tokens))
        refs[name] = (prompts, [t.output for t in gen.traces])
    return refs


def replay_all(drafter, scored: dict) -> dict:
    """Greedy-replay tau per reference set (`scored`: set -> `score_texts` of its texts, computed once: the target is
    frozen); "all" pools the evaluation sets, not the ShareGPT control sets."""
    out = {name: replay_scored(drafter, batches) for name, batches in scored.items()}
    out["all"] = ReplayedTau.pool([rep for name, rep in out.items() if name not in CONTROL_SETS])
    return out


CONTROL_SETS = ("sharegpt-heldout", "sharegpt-trained")


def split_controls(records: list[dict], examples: list, n: int, new_tokens: int) -> tuple[list, dict]:
    """Hold `n` greedy (temperature 0) regenerated answers out of training: their text is the target's greedy text,
    so replay on them is exact held-out tau on the training distribution ("sharegpt-heldout"); `n` greedy answers
    that stay in training give the same number on seen text ("sharegpt-trained"). The gap between the two curves
    is memorisation: the sign that more data, not more steps, is what the drafter needs."""
    greedy = sorted((stable_hash("heldout", r["id"]), r["id"]) for r in records if r["settings"].get("temperature") == 0.0)
    held = {rid for _, rid in greedy[:n]}
    seen = [rid for _, rid in greedy[n : 2 * n]]
    by_id = {e.id: e for e in examples}
    ref = lambda ids: ([list(by_id[i].prompt_ids) for i in ids], [list(by_id[i].response_ids)[:new_tokens] for i in ids])  # noqa: E731
    controls = {"sharegpt-heldout": ref(sorted(held)), "sharegpt-trained": ref(seen)} if n and len(greedy) >= 2 * n else {}
    return [e for e in examples if e.id not in held], controls


def plain_speed(target, prompt: list[int], new_tokens: int = 64) -> float:
    autoregressive_generate(target, [prompt], DecodeConfig(max_new_tokens=8, stop_at_eos=False))  # warm-up
    sync(target)
    t = time.perf_counter()
    autoregressive_generate(target, [prompt], DecodeConfig(max_new_tokens=new_tokens, stop_at_eos=False))
    sync(target)
    return new_tokens / (time.perf_counter() - t)


def sync(target) -> None:
    if target.device.type == "cuda":
        torch.cuda.synchronize()


def regenerate_stage(target, pack: dict, out: Path, args, summary: dict) -> None:
    path = out / "regenerated.jsonl"
    temps = [float(t) for t in args.regen_temperatures.split(",")]
    train = pack["train"]
    stats = {"chunks": 0, "records": 0, "tokens": 0, "looped": 0, "seconds": 0.0, "temperatures": temps}
    stop = T0 + args.regen_s
    for i, start in enumerate(range(0, len(train), args.regen_batch)):
        if time.time() > stop:
            break
        chunk = train[start : start + args.regen_batch]
        prompts = [Prompt(pid, "sharegpt", (("user", ""),)) for pid, _ in chunk]
        cfg = DecodeConfig(
            max_new_tokens=args.regen_new_tokens, temperature=temps[i % len(temps)], seed=args.seed, stop_at_loop=args.trim_loops
        )  # what trimming would cut is never decoded
        s = regenerate(
            target,
            prompts,
            path,
            cfg,
            batch_size=args.regen_batch,
            prompt_ids=[ids for _, ids in chunk],
            progress=False,
            max_prompt_tokens=args.max_prompt_tokens,
        )
        stats["chunks"] += 1
        stats["records"] += s.written
        stats["tokens"] += s.tokens
        stats["seconds"] += s.seconds
        stats["looped"] += s.looped
        log(
            f"regenerate chunk {i} T={cfg.temperature}: {s.written} answers, {s.tokens} tokens, {s.tokens / max(s.seconds, 1e-9):.0f} tok/s"
        )
    stats["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
    summary["regenerate"] = stats


def drafter_config(args, target) -> DrafterConfig:
    layers = tuple(int(x) for x in args.target_layers.split(",")) if args.target_layers else None
    if layers and max(layers) >= target.num_layers:
        layers = None  # tiny targets: DFlash's rule
    return DrafterConfig(
        num_layers=args.layers,
        block_size=args.block_size,
        target_layer_ids=layers,
        vocab_size=args.draft_vocab,
        mask_token_id=default_mask_token(target),
    )


class OutOfTime(Exception):
    pass


def train_stage(target, examples: list, out: Path, args, summary: dict, scored: dict):
    drafter = new_drafter(target, drafter_config(args, target), seed=args.seed)
    if args.draft_vocab is not None:
        drafter.set_draft_vocab(frequent_tokens(examples, target.vocab_size, args.draft_vocab, labels="text"))
    base = SFTConfig(
        steps=10_000,
        batch_size=args.batch_size,
        anchors_per_seq=args.anchors,
        loss="kl",
        labels="text",
        save_every=10_000,
        log_every=10,
        seed=args.seed,
        optim=OptimConfig(lr=args.lr),
    )
    # calibrate: a few steps on a copy (the first pays for kernel selection), one replay of every reference
    stamps: list[float] = []

    def stamp(*_):
        sync(target)
        stamps.append(time.perf_counter())

    train_sft(
        target, copy.deepcopy(drafter), examples, base, out / "calibrate", progress=False, stop_after=args.calibrate_steps, on_step=stamp
    )
    skip = (
        1 if len(stamps) > 2 else 0
    )  # after the first two steps: on the H200 a 6-step mean with them said 323 ms, the run then averaged 147
    step_s = (stamps[-1] - stamps[skip]) / max(len(stamps) - 1 - skip, 1)  # (--calibrate-steps 2 used to give 0 here)
    t = time.perf_counter()
    start = replay_all(drafter, scored)
    replay_s = time.perf_counter() - t
    train_until = T0 + args.budget_s - args.final_reserve_s
    left = train_until - time.time()
    steps = max(10, int((left - args.curve_points * replay_s) / step_s))
    every = max(1, steps // args.curve_points)
    log(f"calibrated: {step_s * 1000:.0f} ms/step, replay {replay_s:.1f} s; {left:.0f} s left -> {steps} steps, curve every {every}")
    summary["train"] = {"step_s_calibrated": step_s, "replay_s": replay_s, "steps_planned": steps}
    curve = summary["curve"] = [{"step": 0, "flops": 0.0, **{k: v.tau for k, v in start.items()}}]
    cfg = SFTConfig(**{**base.__dict__, "steps": steps, "save_every": max(steps // 2, 1)})

    def on_step(step, d, compute):
        if step % every == 0 or step == steps:
            rep = replay_all(d, scored)
            curve.append({"step": step, "flops": compute.flops, "elapsed_s": time.time() - T0, **{k: v.tau for k, v in rep.items()}})
            log(f"step {step}/{steps}: replay tau " + " ".join(f"{k} {v.tau:.2f}" for k, v in rep.items()))
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if time.time() > train_until + args.final_reserve_s / 2:
            summary["train"]["stopped_early_at"] = step
            raise OutOfTime

    t = time.perf_counter()
    try:
        train_sft(target, drafter, examples, cfg, out / "sft", progress=False, on_step=on_step)
    except OutOfTime:
        log("out of time: training stopped early")
    summary["train"]["seconds"] = time.perf_counter() - t
    summary["train"]["config"] = json.loads(json.dumps(cfg.__dict__, default=lambda o: o.__dict__))
    return drafter.eval()


def spec_speed(target, drafter, refs: dict, n: int, new_tokens: int) -> dict:
    """Batch-1 greedy speculative vs plain decoding on the first `n` evaluation prompts, interleaved."""
    prompts = [p for prompts, _ in refs.values() for p in prompts[: max(1, n // len(refs))]]
    cfg = DecodeConfig(max_new_tokens=new_tokens)
    generate(target, drafter, [prompts[0]], DecodeConfig(max_new_tokens=8))
    ar = sd = 0.0
    same = 0
    for p in prompts:
        sync(target)
        t = time.perf_counter()
        a = autoregressive_generate(target, [p], cfg)
        sync(target)
        ar += time.perf_counter() - t
        t = time.perf_counter()
        s = generate(target, drafter, [p], cfg)
        sync(target)
        sd += time.perf_counter() - t
        same += a.traces[0].output == s.traces[0].output
    return {"prompts": len(prompts), "speedup": ar / max(sd, 1e-9), "outputs_equal": same}


# --------------------------------------------------------------------------- main


def run(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    summary: dict = {
        "args": vars(args),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
    }
    try:
        import transformers

        summary["transformers"] = transformers.__version__
    except ImportError:
        pass

    def save():
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    if args.target == "tiny":
        target = tiny_target("llama", vocab_size=256, hidden_size=64, num_layers=6)
        target.model.to(device)
        pack = tiny_pack(target)
    else:
        target = load_target(args.target, dtype=resolve_dtype(args.dtype, device), device=device)
        if args.pack:
            with gzip.open(args.pack, "rt") as f:
                pack = json.load(f)
        else:
            pack = make_pack(target, args.train_prompts)
    summary["target"] = {"name": target.name, "dtype": str(target.dtype), "weights_sha256": weights_sha(target)}
    log(
        f"target {target.name} on {device} ({target.dtype}); weights sha256 {summary['target']['weights_sha256'][:16]}; "
        f"{len(pack['train'])} train prompts, eval {', '.join(f'{k} {len(v)}' for k, v in pack['eval'].items())}"
    )
    save()

    refs = references(target, pack, args.eval_new_tokens)
    first = next(iter(refs.values()))[0][0]
    summary["plain_batch1_tokens_per_s"] = plain_speed(target, first)
    log(f"references done; plain batch-1 decoding {summary['plain_batch1_tokens_per_s']:.1f} tok/s")
    save()

    regen_path = out / "regenerated.jsonl"
    if args.regenerated:  # answers regenerated earlier (same target) come first; regeneration then adds new prompts
        with (
            gzip.open(args.regenerated, "rt") if args.regenerated.endswith(".gz") else open(args.regenerated) as src,
            open(regen_path, "a") as dst,
        ):
            dst.write(src.read())
    regenerate_stage(target, pack, out, args, summary)
    records = [json.loads(line) for line in regen_path.read_text().splitlines() if line.strip()]
    data = load_regenerated(regen_path, trim_loops=args.trim_loops)
    examples, controls = split_controls(records, data.examples, args.control_answers, args.eval_new_tokens)
    summary["regenerate"]["loop_tokens_cut"] = data.loop_tokens_cut
    refs.update(controls)
    summary["regenerate"]["examples"] = len(examples)
    summary["regenerate"]["response_tokens"] = sum(len(e.response_ids) for e in examples)
    save()

    layers = DrafterSpec.resolve(drafter_config(args, target), target).target_layer_ids
    scored = {name: score_texts(target, layers, p, o, args.replay_batch) for name, (p, o) in refs.items()}
    drafter = train_stage(target, examples, out, args, summary, scored)
    save_drafter(drafter, out / "drafter", extra={"made_by": "experiments/train-at-scale/train_at_scale.py", "args": vars(args)})
    final = replay_all(drafter, scored)
    summary["final"] = {
        k: {"tau": v.tau, "tau_ci": v.tau_ci(), "slot_acceptance": v.slot_acceptance(), "texts": len(v.texts)} for k, v in final.items()
    }
    log("final replay tau: " + " ".join(f"{k} {v.tau:.2f} [{v.tau_ci()[0]:.2f}, {v.tau_ci()[1]:.2f}]" for k, v in final.items()))
    save()
    if time.time() < T0 + args.budget_s - 5:
        try:
            summary["spec_speed"] = spec_speed(target, drafter, refs, args.speed_prompts, args.eval_new_tokens)
            log(f"speculative vs plain, batch 1 on {device}: {summary['spec_speed']}")
        except Exception:  # a measurement only: keep what the run produced
            summary["spec_speed_error"] = traceback.format_exc()
    summary["elapsed_s"] = time.time() - T0
    save()
    log(f"done in {summary['elapsed_s']:.0f} s -> {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", required=True)
    p.add_argument("--target", default="smollm2-135m")
    p.add_argument("--train-prompts", type=int, default=12000)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--target", default="smollm2-135m", help="embedded name, model folder, or 'tiny' (smoke test)")
    r.add_argument("--pack", default=None)
    r.add_argument("--train-prompts", type=int, default=12000)
    r.add_argument("--device", default="auto")
    r.add_argument("--dtype", default="auto")
    r.add_argument("--budget-s", type=float, default=470)
    r.add_argument("--regen-s", type=float, default=150, help="regeneration stops starting chunks after this many seconds of the run")
    r.add_argument("--regen-batch", type=int, default=256)
    r.add_argument("--regen-new-tokens", type=int, default=384)
    r.add_argument("--regen-temperatures", default="0.0,0.7")
    r.add_argument("--regenerated", default=None, help="regenerated JSONL(.gz) of this target to train on too (regeneration adds to it)")
    r.add_argument(
        "--trim-loops",
        action="store_true",
        help="stop regenerating an answer where it starts looping and train on it cut there (decode/loops.py)",
    )
    r.add_argument(
        "--control-answers", type=int, default=32, help="greedy answers held out of training (and as many seen ones) for the curve"
    )
    r.add_argument("--max-prompt-tokens", type=int, default=512)
    r.add_argument("--eval-new-tokens", type=int, default=96)
    r.add_argument("--layers", type=int, default=2)
    r.add_argument("--block-size", type=int, default=8)
    r.add_argument("--target-layers", default="1,10,19,27")
    r.add_argument("--draft-vocab", type=int, default=8192)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--anchors", type=int, default=128)
    r.add_argument("--lr", type=float, default=1.5e-3)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--calibrate-steps", type=int, default=8)
    r.add_argument("--curve-points", type=int, default=8)
    r.add_argument("--replay-batch", type=int, default=16)
    r.add_argument("--final-reserve-s", type=float, default=40)
    r.add_argument("--speed-prompts", type=int, default=9)
    args = parser.parse_args()
    if args.cmd == "pack":
        target = load_target(args.target)
        pack = make_pack(target, args.train_prompts)
        with gzip.open(args.out, "wt") as f:
            json.dump(pack, f)
        print(f"{args.out}: {len(pack['train'])} train prompts, eval {', '.join(f'{k} {len(v)}' for k, v in pack['eval'].items())}")
    else:
        if args.draft_vocab is not None and args.draft_vocab <= 0:
            args.draft_vocab = None
        run(args)


if __name__ == "__main__":
    main()
