"""The prepared check to run on a GPU machine (one H100 or H200, under 8 minutes): what the CPU cannot prove.

1. **flows**: every flow of `draftopd/check/flows.py` (decoding in each mode, regenerate, the feature cache, SFT online
   and cached, Draft-OPD in each loss mode, eval, replay, export/import) on a tiny target on the device, as
   `tests/test_device.py` runs them on the fake CUDA device: each must run, and greedy decoding must equal plain
   decoding (float32, TF32 off while decoding);
2. **plan against the device**: the steps `draftopd plan` measures on meta tensors (`plan.decode_step`, `sft_step`,
   `replay_step`, `features_step`) run for real on a randomly initialised target of `--config`'s shapes (bf16) and a
   drafter, with `torch.cuda.max_memory_allocated` beside the plan's peak for the same sizes;
3. **Draft-OPD, 20 updates** on that target (bf16 autocast, 16 rollouts x 128 tokens an update): seconds an update,
   peak memory;
4. **a decoding round, profiled** (`torch.profiler`, batch 16): the ops by device time, and the host syncs a round.

    PYTHONUNBUFFERED=1 python benchmarks/device_check.py --device cuda --out $OUT

Writes `device_check.json` and `profile.txt` in `--out`. With `--device cpu --quick` it runs end to end on a CPU at
toy sizes (no numbers worth reading: it checks the script).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftopd.check.flows import FLOWS, Bench  # noqa: E402
from draftopd.check.memory import meta_drafter, meta_target, model_config  # noqa: E402
from draftopd.config import DecodeConfig, DrafterConfig, OptimConfig  # noqa: E402
from draftopd.plan import PlanConfig, decode_step, features_step, plan, replay_step, sft_step  # noqa: E402

GB = 1e9


def check_flows(device: str, out: Path) -> dict:
    results = {}
    for name, flow in FLOWS.items():
        t0 = time.perf_counter()
        try:
            summary = flow(Bench(device, out / "flows" / name))
            ok = summary.get("outputs") == summary["plain"] if "plain" in summary else True
            results[name] = {"ok": ok, "seconds": round(time.perf_counter() - t0, 2)}
        except Exception as err:  # report every flow, not the first failure only
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-1500:]}
        print(f"flow {name:30s} {results[name]}", flush=True)
    return results


def peak_of(step, device: str) -> float:
    """GB the device allocated at most while `step` ran, beyond what was allocated before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / GB
    step()
    return float("nan")


def check_plan(cfg: PlanConfig, drafter_cfg: DrafterConfig, device: str) -> dict:
    """The plan's peaks (meta) beside the device's for the same steps and sizes, weights excluded on both sides."""
    report = plan(cfg, drafter_cfg)
    target = meta_target(model_config(cfg.target_config), torch.bfloat16, cfg.target_config, device=device)
    train = meta_drafter(target, drafter_cfg).float().train()
    decode = meta_drafter(target, drafter_cfg).to(target.dtype).eval()
    steps = {
        "regenerate": lambda: decode_step(target, None, cfg.regen_batch, cfg.prompt_tokens, cfg.new_tokens),
        "features": lambda: features_step(target, train.spec.target_layer_ids, cfg.features_batch_tokens, cfg.sequence_tokens),
        "sft-online": lambda: sft_step(target, train, cfg, cached=False),
        "sft-cache": lambda: sft_step(target, train, cfg, cached=True),
        "opd-rollout": lambda: decode_step(target, decode, cfg.opd_rollouts, cfg.prompt_tokens, cfg.opd_new_tokens),
        "opd-replay": lambda: replay_step(target, train, cfg, int(cfg.opd_new_tokens / cfg.opd_tau)),
    }
    out = {}
    for name, step in steps.items():
        flow = report.flow(name)
        planned = (flow.peak - flow.target - flow.drafter) / GB
        measured = peak_of(step, device)
        out[name] = {"planned_gb": round(planned, 3), "device_gb": round(measured, 3), "device_over_plan": round(measured / planned, 3)}
        print(f"plan {name:12s} {out[name]}", flush=True)
    return out


def check_opd(cfg: PlanConfig, drafter_cfg: DrafterConfig, device: str, updates: int, out: Path) -> dict:
    from draftopd.train.opd import OPDConfig, train_opd

    target = meta_target(model_config(cfg.target_config), torch.bfloat16, cfg.target_config, device=device)
    drafter = meta_drafter(target, drafter_cfg).float()
    prompts = [[(7 * i + j) % 1000 + 10 for j in range(64 + i)] for i in range(cfg.opd_rollouts * updates)]
    opd = OPDConfig(
        steps=updates,
        prompts_per_rollout=cfg.opd_rollouts,
        rollouts_per_step=1,
        replay_batch=cfg.replay_batch,
        rollout=DecodeConfig(max_new_tokens=min(128, cfg.opd_new_tokens)),
        save_every=10_000,
        autocast="auto",
        optim=OptimConfig(lr=3e-4),
    )
    peak = peak_of(lambda: train_opd(target, drafter, prompts, opd, out / "opd", progress=False), device)
    rows = [json.loads(line) for line in (out / "opd" / "metrics.jsonl").read_text().splitlines()]
    per_update = [r["time/rollout_s"] + r["time/replay_s"] + r["time/update_s"] for r in rows]
    return {
        "updates": len(rows),
        "seconds_per_update_median": sorted(per_update)[len(per_update) // 2],
        "peak_gb": round(peak, 3),
        "rollout_s": [round(r["time/rollout_s"], 3) for r in rows],
        "replay_s": [round(r["time/replay_s"], 3) for r in rows],
        "loss": [round(r["train/loss"], 4) for r in rows],
    }


def profile_round(cfg: PlanConfig, drafter_cfg: DrafterConfig, device: str, out: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from draftopd.decode.speculative import generate

    target = meta_target(model_config(cfg.target_config), torch.bfloat16, cfg.target_config, device=device)
    drafter = meta_drafter(target, drafter_cfg).to(target.dtype).eval()
    prompts = [[(11 * i + j) % 1000 + 10 for j in range(min(128, cfg.prompt_tokens))] for i in range(cfg.regen_batch)]
    decode = DecodeConfig(max_new_tokens=min(32, cfg.new_tokens), stop_at_eos=False)
    generate(target, drafter, prompts, decode)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        gen = generate(target, drafter, prompts, decode)
    sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    (out / "profile.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=40))
    syncs = sum(
        e.count
        for e in prof.key_averages()
        if e.key in ("aten::_local_scalar_dense", "aten::item", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync")
    )
    return {
        "rounds": gen.timing.rounds,
        "ms_per_round": round(1000 * (gen.timing.total_s - gen.timing.prefill_s) / max(gen.timing.rounds, 1), 3),
        "sync_like_calls": syncs,
        "timing": vars(gen.timing),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--config", default="qwen3-0.6b", help="target shapes for parts 2-4 (a shipped name or a config.json)")
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="toy sizes (to check the script on a CPU)")
    parser.add_argument("--out", default=None, help="folder for device_check.json and profile.txt (default: a temporary one)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device here")
        torch.backends.cuda.matmul.allow_tf32 = False  # decoding must stay exact in float32; training turns TF32 on itself
    drafter_cfg = DrafterConfig(num_layers=2, block_size=16, mask_token_id=151669)
    sizes = dict(
        regen_batch=16,
        prompt_tokens=256,
        new_tokens=512,
        sft_batch=2,
        sequence_tokens=2048,
        anchors_per_seq=256,
        opd_rollouts=16,
        opd_new_tokens=512,
        replay_batch=2,
        features_batch_tokens=8192,
    )
    if args.quick:
        sizes = dict(
            regen_batch=2,
            prompt_tokens=16,
            new_tokens=16,
            sft_batch=2,
            sequence_tokens=64,
            anchors_per_seq=8,
            opd_rollouts=2,
            opd_new_tokens=16,
            replay_batch=1,
            features_batch_tokens=128,
        )
    cfg = PlanConfig(target_config=args.config, **sizes)
    report: dict = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
        "torch": torch.__version__,
        "config": args.config,
    }
    t0 = time.perf_counter()
    parts = [
        ("flows", lambda: check_flows(args.device, out)),
        ("plan_vs_device", lambda: check_plan(cfg, drafter_cfg, args.device)),
        ("opd_updates", lambda: check_opd(cfg, drafter_cfg, args.device, 2 if args.quick else args.updates, out)),
        ("decode_round_profile", lambda: profile_round(cfg, drafter_cfg, args.device, out)),
    ]
    for name, part in parts:
        try:
            report[name] = part()
        except Exception as err:
            report[name] = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()[-2000:]}
        report[name + "_s"] = round(time.perf_counter() - t0, 1)
        (out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
        print(f"== {name} done at {report[name + '_s']} s", flush=True)
    print(json.dumps({k: v for k, v in report.items() if k != "flows"}, indent=2, default=str)[:6000])


if __name__ == "__main__":
    main()
