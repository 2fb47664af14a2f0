"""`draftopd` command line. Flags are generated from the frozen config dataclasses, so defaults live only there.

Every user-facing failure (unknown target, drafter/target mismatch, corrupt checkpoint, empty or too-long
prompt, empty dataset) ends as one `draftopd: error: ...` line and exit status 2, not a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from .config import DEFAULT_TARGET, DecodeConfig, DrafterConfig


class UserError(ValueError):
    """Bad input detected by the CLI itself."""


def add_config_args(parser: argparse.ArgumentParser, defaults: Any, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """One `--prefix-field-name` flag per dataclass field; defaults come from `defaults` (a dataclass or an instance)."""
    instance = defaults if not isinstance(defaults, type) else None
    for f in dataclasses.fields(defaults):
        if f.name in skip:
            continue
        default = getattr(instance, f.name) if instance is not None else (f.default if f.default is not dataclasses.MISSING else f.default_factory())  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=prefix + f.name, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple) or (default is None and "tuple" in str(f.type)):
            parser.add_argument(flag, dest=prefix + f.name, nargs="+", type=_scalar_type(default, f.type), default=default)
        else:
            parser.add_argument(flag, dest=prefix + f.name, type=_scalar_type(default, f.type), default=default, help=f"default {default}")


def _scalar_type(default: Any, annotation: Any):
    if isinstance(default, tuple) and default:
        return type(default[0])
    text = str(annotation)
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if name in text:
            return typ
    return type(default) if default is not None else str


def build_config(defaults: Any, args: argparse.Namespace, prefix: str = "", **overrides):
    """The dataclass `defaults` (class or instance) with every field that has a flag taken from `args`."""
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(defaults) if hasattr(args, prefix + f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    base = defaults() if isinstance(defaults, type) else defaults
    return dataclasses.replace(base, **{**values, **overrides})


# ---- generate -------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> dict:
    from .data.prompts import Prompt, load_prompts, render_prompt
    from .decode.speculative import autoregressive_generate, generate
    from .decode.stats import summarize

    target, drafter = load_pair(args.target, args.drafter, build_config(DrafterConfig, args, "draft_"))
    if args.prompt_file:
        prompts = load_prompts(args.prompt_file).prompts
    elif args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("empty prompt")
        prompts = [Prompt(id="cli", source="cli", messages=(("user", args.prompt),))]
    else:
        raise UserError("give --prompt TEXT or --prompt-file FILE.jsonl")
    ids = [render_prompt(p, target.tokenizer, chat_template=not args.raw) for p in prompts]
    cfg = build_config(DecodeConfig, args)
    gen = autoregressive_generate(target, ids, cfg) if args.autoregressive else generate(target, drafter, ids, cfg)
    stats = summarize(gen, None if args.autoregressive else drafter.block_size)
    texts = [target.tokenizer.decode(t.output, skip_special_tokens=True) for t in gen.traces]
    return {"texts": texts, "stats": stats.to_dict()}


def print_generate(result: dict) -> None:
    for text in result["texts"]:
        print(text)
        print("-" * 40)
    s = result["stats"]
    print(f"tokens: {s['new_tokens']}  rounds: {s['rounds']}  tau: {s['tau']:.2f}  tokens/s: {s['tokens_per_s']:.1f}")
    if s["slot_acceptance"]:
        print("per-slot acceptance: " + " ".join(f"{a:.2f}" for a in s["slot_acceptance"]))
    print("ms per round: " + "  ".join(f"{k} {v:.1f}" for k, v in s["ms_per_round"].items()))


def load_pair(target_name: str, drafter_path: str | None, drafter_cfg: DrafterConfig):
    from .models.dflash import load_drafter, new_drafter
    from .models.load import load_target

    target = load_target(target_name)
    drafter = load_drafter(drafter_path, target) if drafter_path else new_drafter(target, drafter_cfg)
    return target, drafter


# ---- regenerate / sft / eval / opd / demo ---------------------------------------------------------------
def cmd_regenerate(args: argparse.Namespace) -> dict:
    from .data.prompts import load_prompts
    from .data.regenerate import regenerate

    target, drafter = load_pair(args.target, args.drafter, build_config(DrafterConfig, args, "draft_")) if args.drafter else (_target(args.target), None)
    prompts = load_prompts(args.prompts, split=args.split, limit=args.limit, seed=args.seed).prompts
    summary = regenerate(target, prompts, args.out, build_config(DecodeConfig, args), drafter=drafter, batch_size=_positive(args.batch_size, "--batch-size"),
                         chat_template=not args.raw, max_prompt_tokens=args.max_prompt_tokens)
    return {"out": args.out, **summary.to_dict()}


def cmd_sft(args: argparse.Namespace) -> dict:
    from .config import OptimConfig, SFTConfig
    from .data.regenerate import load_regenerated
    from .train.sft import train_sft

    target, drafter = load_pair(args.target, args.drafter, build_config(DrafterConfig, args, "draft_"))
    data = load_regenerated(args.data)
    cfg = build_config(SFTConfig, args, optim=build_config(OptimConfig, args, "optim_"))
    final = train_sft(drafter, data.examples, cfg, args.out, resume=args.resume)
    return {"checkpoint": str(final), "examples": len(data.examples), "skipped": data.skipped}


def cmd_eval(args: argparse.Namespace) -> dict:
    from .config import EvalConfig
    from .eval.evaluate import evaluate

    target, drafter = load_pair(args.target, args.drafter, build_config(DrafterConfig, args, "draft_"))
    report = evaluate(target, drafter, build_config(EvalConfig, args))
    report.config["drafter"] = args.drafter or "untrained"
    if args.out:
        report.save(args.out)
    return {"table": report.table(), **report.to_dict()}


def cmd_opd(args: argparse.Namespace) -> dict:
    from .data.prompts import load_prompts, render_prompt
    from .train.losses import LossConfig
    from .train.opd import OPDConfig, train_opd

    target, drafter = load_pair(args.target, args.drafter, build_config(DrafterConfig, args, "draft_"))
    prompts = [render_prompt(p, target.tokenizer, chat_template=not args.raw) for p in load_prompts(args.prompts, split="train", limit=args.limit, seed=args.seed).prompts]
    prompts = [p for p in prompts if len(p) <= args.max_prompt_tokens]
    if not prompts:
        raise UserError(f"no prompts of at most {args.max_prompt_tokens} tokens in {args.prompts}")
    cfg = build_config(OPDConfig(), args, loss=build_config(LossConfig, args, "loss_"), optim=build_config(OPDConfig().optim, args, "optim_"))
    final = train_opd(drafter, prompts, cfg, args.out, resume=args.resume)
    return {"checkpoint": str(final), "prompts": len(prompts)}


def cmd_demo(args: argparse.Namespace) -> dict:
    from .experiment import ABLATIONS, ExperimentConfig, format_results, run_experiment

    unknown = set(args.ablations) - set(ABLATIONS)
    if unknown:
        raise UserError(f"unknown ablation(s) {sorted(unknown)}; choose from {sorted(ABLATIONS)}")
    cfg = ExperimentConfig(target=args.target, out_dir=args.out, ablations=tuple(args.ablations))
    summary = run_experiment(cfg)
    return {"table": format_results(summary), **summary}


def print_table(result: dict) -> None:
    print(result.get("table") or json.dumps(result, indent=2))


def _target(name: str):
    from .models.load import load_target

    return load_target(name)


def _positive(value: int, flag: str) -> int:
    if value < 1:
        raise UserError(f"{flag} must be at least 1")
    return value


# ---- parser ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="draftopd", description="Draft-OPD: train and measure speculative-decoding drafters")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="speculative generation with a drafter (or an untrained one)")
    _target_args(gen)
    gen.add_argument("--prompt", help="prompt text (the target's chat template is applied unless --raw)")
    gen.add_argument("--prompt-file", help="JSONL of {\"prompt\": ...} or {\"messages\": [...]} records")
    gen.add_argument("--raw", action="store_true", help="raw completion: do not apply the chat template")
    gen.add_argument("--autoregressive", action="store_true", help="plain target decoding (the baseline)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_config_args(gen, DecodeConfig)
    gen.set_defaults(func=cmd_generate, printer=print_generate)

    from .config import EvalConfig, OptimConfig, PromptConfig, SFTConfig
    from .train.losses import LossConfig
    from .train.opd import OPDConfig

    reg = sub.add_parser("regenerate", help="the target answers training prompts (JSONL with token ids)")
    _target_args(reg)
    reg.add_argument("--out", default="runs/regenerated.jsonl")
    reg.add_argument("--raw", action="store_true")
    add_config_args(reg, PromptConfig)
    reg.add_argument("--json", action="store_true")
    add_config_args(reg, DecodeConfig)
    reg.set_defaults(func=cmd_regenerate, printer=print_table)

    sft = sub.add_parser("sft", help="DFlash SFT of a drafter on regenerated data (resumable)")
    _target_args(sft)
    sft.add_argument("--data", required=True, help="JSONL written by `draftopd regenerate`")
    sft.add_argument("--out", default="runs/sft")
    sft.add_argument("--resume", action="store_true", help="continue from OUT/last exactly where it stopped")
    sft.add_argument("--json", action="store_true")
    add_config_args(sft, SFTConfig)
    add_config_args(sft, OptimConfig, prefix="optim_")
    sft.set_defaults(func=cmd_sft, printer=print_table)

    ev = sub.add_parser("eval", help="tau, acceptance and speedup over AR on held-out prompt sets")
    _target_args(ev)
    ev.add_argument("--out", help="write the report as JSON here")
    ev.add_argument("--json", action="store_true")
    add_config_args(ev, EvalConfig)
    ev.set_defaults(func=cmd_eval, printer=print_table)

    opd = sub.add_parser("opd", help="Draft-OPD training from a drafter checkpoint (resumable)")
    _target_args(opd)
    add_config_args(opd, PromptConfig, skip=("split", "batch_size"))
    opd.add_argument("--raw", action="store_true")
    opd.add_argument("--out", default="runs/opd")
    opd.add_argument("--resume", action="store_true")
    opd.add_argument("--json", action="store_true")
    add_config_args(opd, OPDConfig())
    add_config_args(opd, LossConfig, prefix="loss_")
    add_config_args(opd, OPDConfig().optim, prefix="optim_")
    opd.set_defaults(func=cmd_opd, printer=print_table)

    demo = sub.add_parser("demo", help="the whole pipeline at small scale on the embedded target (~20 min on 2 cores)")
    demo.add_argument("--target", default=DEFAULT_TARGET)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--ablations", nargs="*", default=[], help="Draft-OPD variants to add as rows")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo, printer=print_table)
    return parser


def _target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"embedded name, local HF folder or hub id (default {DEFAULT_TARGET})")
    parser.add_argument("--drafter", help="drafter checkpoint folder (default: a new untrained drafter)")
    add_config_args(parser, DrafterConfig, prefix="draft_")


def main(argv: list[str] | None = None) -> int:
    from .data.prompts import DataError
    from .models.dflash import DrafterError
    from .models.target import TargetError

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (UserError, TargetError, DrafterError, DataError) as err:
        print(f"draftopd: error: {err}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif result is not None:
        args.printer(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
