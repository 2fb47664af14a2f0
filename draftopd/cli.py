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


def add_config_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per dataclass field, default taken from the dataclass."""
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
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


def build_config(cls: type, args: argparse.Namespace, prefix: str = "", **overrides):
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(cls) if hasattr(args, prefix + f.name)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return cls(**{**values, **overrides})


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
