"""`draftopd` command line. Flags are generated from the frozen config dataclasses, so defaults live only there, and so
do their help texts and choices (each field's `metadata`); nested configs (an OPD run's rollout `DecodeConfig`, its loss
and optimizer) keep their flags' names.

The training commands (sft, opd, recipe, demo) write run.yaml, command.txt and env.json beside their checkpoints
(`train/tracking.py`); `--config run.yaml` runs one again: the file's configs become the command's defaults, so a flag
given on the command line overrides it, and a file with an unknown key or a value of the wrong type is one error line
naming the key. `--report-to tensorboard|wandb` also sends each step's metrics to that tracker.

Every user-facing failure (a bad flag, unknown target, drafter/target mismatch, corrupt checkpoint, empty or
too-long prompt, empty dataset, an output path that cannot be written) ends as one `draftopd: error: ...` line on
stderr and exit status 2, not a traceback: the project's errors are all ValueErrors, bad paths raise OSError,
and argparse's own errors go through the same line (`Parser.error`). Each command builds and so validates its
configs, and checks its input and output paths, before it loads any model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from .config import BUNDLED_DRAFTERS, DEFAULT_TARGET, DTYPES, DecodeConfig, DrafterConfig, PromptConfig, resolve_device, resolve_dtype


class UserError(ValueError):
    """Bad input detected by the CLI itself."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad number, missing argument) are one `draftopd: error:` line, not a usage block."""

    def error(self, message: str):
        raise UserError(message)


def add_config_args(
    parser: argparse.ArgumentParser, defaults: Any, prefix: str | None = None, skip: tuple[str, ...] = (), unset: tuple[str, ...] = ()
) -> None:
    """One `--prefix-field-name` flag per dataclass field; defaults come from `defaults` (a dataclass or an instance),
    the prefix from its `flag_prefix` (the name its errors use) unless given, help text and choices from the field's
    metadata (`help`, `choices`). Fields in `unset` default to None, so a command can tell a flag given at its default
    value from one not given (`build_config` then keeps the field's default). Nested configs get their own call."""
    prefix = getattr(defaults, "flag_prefix", "") if prefix is None else prefix
    instance = defaults if not isinstance(defaults, type) else None
    for f in dataclasses.fields(defaults):
        if f.name in skip:
            continue
        default = (
            getattr(instance, f.name)
            if instance is not None
            else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        )  # type: ignore[misc]
        if dataclasses.is_dataclass(default):
            continue
        flag, dest = "--" + (prefix + f.name).replace("_", "-"), prefix + f.name
        shown = "unset" if default is None else " ".join(map(str, default)) if isinstance(default, tuple) else default
        text = (
            f.metadata.get("help", "") + f" (default {shown}" + (" unless the command chooses another" if f.name in unset else "") + ")"
        ).replace("%", "%%")
        if isinstance(default, bool):
            parser.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif isinstance(default, tuple) or (default is None and "tuple" in str(f.type)):
            parser.add_argument(flag, dest=dest, nargs="+", type=_scalar_type(default, f.type), default=default, help=text)
        else:
            parser.add_argument(
                flag,
                dest=dest,
                type=_scalar_type(default, f.type),
                default=None if f.name in unset else default,
                choices=f.metadata.get("choices"),
                help=text,
            )


def _scalar_type(default: Any, annotation: Any):
    if isinstance(default, tuple) and default:
        return type(default[0])
    text = str(annotation)
    for name, typ in (("int", int), ("float", float), ("str", str)):
        if name in text:
            return typ
    return type(default) if default is not None else str


def build_config(defaults: Any, args: argparse.Namespace, prefix: str | None = None, **overrides):
    """The dataclass `defaults` (class or instance) with every field that has a flag taken from `args` (validated:
    a bad value raises `config.ConfigError` naming its flag)."""
    prefix = getattr(defaults, "flag_prefix", "") if prefix is None else prefix
    base = defaults() if isinstance(defaults, type) else defaults
    values = {f.name: getattr(args, prefix + f.name) for f in dataclasses.fields(defaults) if hasattr(args, prefix + f.name)}
    values = {
        k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None or getattr(base, k) is None
    }  # None: not given
    return dataclasses.replace(base, **{**values, **overrides})


# ---- run.yaml: a training command's resolved configs, and --config ------------------------------------------
INTERNAL = ("func", "printer", "json", "config", "config_base", "resume", "argv", "command")  # never recorded nor read back


def run_sections(command: str) -> dict[str, Any]:
    """The config sections of a training command's run.yaml, at the command's defaults (besides "args", its plain flags)."""
    if command == "sft":
        from .config import DataConfig, SFTConfig

        return {"sft": SFTConfig(), "drafter": DrafterConfig(), "data": DataConfig()}
    if command == "opd":
        from .train.opd import OPDConfig

        return {"opd": OPDConfig(), "prompts": PromptConfig(), "drafter": DrafterConfig()}
    if command == "recipe":
        from .recipe import RecipeConfig

        return {"recipe": RecipeConfig()}
    from .experiment import ExperimentConfig

    return {"experiment": ExperimentConfig()}


def config_flags(command: str, configs: dict[str, Any]) -> dict[str, Any]:
    """The flag values (argparse dests) that give `configs`, `command`'s sections: each field under its flag, nested
    configs under their own `flag_prefix` (the recipe's evaluation under `eval_`), as `build_parser` names them."""
    if command == "demo":  # its flags are written by hand (build_parser)
        exp = configs["experiment"]
        return {
            "target": exp.target,
            "out": exp.out_dir,
            "start": exp.start or "none",
            "ablations": list(exp.ablations),
            "device": exp.device,
            "dtype": exp.dtype,
        }
    nested = {"eval": "eval_"} if command == "recipe" else {}
    return {dest: v for name, cfg in configs.items() if name != "args" for dest, v in _dests(cfg, None, nested).items()}


def _dests(cfg: Any, prefix: str | None, nested: dict[str, str]) -> dict[str, Any]:
    prefix = getattr(cfg, "flag_prefix", "") if prefix is None else prefix
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out |= _dests(value, nested.get(f.name, getattr(value, "flag_prefix", "") or prefix), {})
        else:
            out[prefix + f.name] = value
    return out


def run_info(args: argparse.Namespace, **configs):
    """What a training command records beside its checkpoints and reports to (`train/tracking.py`): its plain flags
    ("args") and its resolved configs. The tracker's package is checked here, before any model loads."""
    from .train.tracking import RunInfo, check_installed

    check_installed(args.report_to)
    dests = set(config_flags(args.command, configs))
    plain = {k: v for k, v in vars(args).items() if k not in dests and k not in INTERNAL}
    return RunInfo(args.command, {"args": plain, **configs}, tuple(args.argv), args.report_to)


def read_run_config(path: str, command: str, known: dict[str, Any]) -> dict[str, Any]:
    """A run.yaml as `command`'s sections: each config over the command's defaults (a section or key left out keeps its
    default), and "args", plain flags (`known`: the command's flags at their defaults). An unreadable file, an unknown
    key, a value of the wrong type or out of range, or another command's file is one UserError naming it."""
    where = f"--config {path}"
    try:
        raw = _load_yaml(Path(path).read_text())
    except OSError as err:
        raise UserError(f"{where}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise UserError(f"{where}: not YAML ({one_line(err)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: not a mapping of sections (command, args, ...)")
    if raw.get("command", command) != command:
        raise UserError(f"{where} records a `draftopd {raw['command']}` run, not `draftopd {command}`")
    sections = run_sections(command)
    out: dict[str, Any] = dict(sections)
    for key, value in raw.items():
        if key == "args":
            out["args"] = _plain_args(value, command, known, set(config_flags(command, sections)), where)
        elif key in sections:
            out[key] = config_from(sections[key], value, key, where)
        elif key != "command":
            raise UserError(f"{where}: unknown key {key!r} (the sections of {command}: command, args, {', '.join(sections)})")
    return out


def _load_yaml(text: str) -> Any:
    """YAML, with floats as YAML 1.2 reads them (`1e-3` is a number, not text); a syntax error is a ValueError."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$"), list("-+.0123456789")
    )
    try:
        return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        raise ValueError(str(err)) from None


def config_from(base: Any, data: Any, key: str, where: str) -> Any:
    """`base` (a config dataclass) with the fields of `data` (run.yaml's mapping at `key`), each type-checked, nested
    configs over `base`'s own; validated as any config is when built."""
    import typing

    from .config import ConfigError

    if not isinstance(data, dict):
        raise UserError(f"{where}: {key} must be a mapping of {type(base).__name__} fields, got {data!r}")
    hints, names = typing.get_type_hints(type(base)), {f.name for f in dataclasses.fields(base)}
    values = {}
    for name, value in data.items():
        if name not in names:
            raise UserError(f"{where}: unknown key {key}.{name} (not a field of {type(base).__name__})")
        current = getattr(base, name)
        values[name] = (
            config_from(current, value, f"{key}.{name}", where)
            if dataclasses.is_dataclass(current)
            else _typed(value, hints[name], f"{key}.{name}", where)
        )
    try:
        return dataclasses.replace(base, **values)
    except ConfigError as err:
        raise UserError(f"{where}: {key}: {one_line(err)}") from None


def _typed(value: Any, hint: Any, key: str, where: str) -> Any:
    ok, converted = _convert(value, hint)
    if not ok:
        raise UserError(f"{where}: {key} must be {_describe(hint)}, got {value!r}")
    return converted


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether `value`, as YAML read it, has type `hint`; the value as the config holds it: lists as tuples, ints as floats)."""
    import types
    import typing

    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return next(((True, v) for ok, v in (_convert(value, h) for h in params) if ok), (False, None))
    if hint is type(None):
        return value is None, None
    if origin is typing.Literal:
        return value in params, value
    if origin is tuple:
        items = params[:1] * len(value) if isinstance(value, list) and params[-1:] == (Ellipsis,) else params
        if not isinstance(value, list) or len(items) != len(value):
            return False, None
        converted = [_convert(v, h) for v, h in zip(value, items)]
        return all(ok for ok, _ in converted), tuple(v for _, v in converted)
    if hint in (int, float):
        number = isinstance(value, int) if hint is int else isinstance(value, (int, float))
        return number and not isinstance(value, bool), hint(value) if number and not isinstance(value, bool) else None
    if hint in (bool, str):
        return isinstance(value, hint), value
    return True, value


def _describe(hint: Any) -> str:
    import types
    import typing

    origin, params = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in params)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, params))
    if origin is tuple:
        plural = {int: "integers", float: "numbers", str: "texts", bool: "trues or falses"}.get(params[0], str(params[0]))
        return f"a list of {plural}" if params[-1:] == (Ellipsis,) else f"a list of {len(params)} {plural}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "text", type(None): "null"}.get(hint, str(hint))


def _plain_args(data: Any, command: str, known: dict[str, Any], config_dests: set[str], where: str) -> dict[str, Any]:
    """run.yaml's "args": plain flags of `command` (paths, switches), each of its default's type (a flag without a
    default: text or null)."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: args must be a mapping of flags, got {data!r}")
    for name, value in data.items():
        if name not in known or name in INTERNAL or name in config_dests:
            raise UserError(f"{where}: unknown key args.{name} (not a plain flag of draftopd {command})")
        default = known[name]
        hint = list[str] if isinstance(default, list) else str | None if default is None else type(default)
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value) if isinstance(default, list) else _convert(value, hint)[0]
        if not ok:
            raise UserError(
                f"{where}: args.{name} must be {'a list of text' if isinstance(default, list) else _describe(hint)}, got {value!r}"
            )
    return dict(data)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line; with `--config FILE` (a run.yaml) over the file's values: its configs become the command's
    defaults (`config_base`) and its flags' defaults, so a flag given on the command line overrides the file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:
        sub = parser.commands[args.command]
        base = read_run_config(args.config, args.command, vars(sub.parse_args([])))
        sub.set_defaults(**base.get("args", {}), **config_flags(args.command, base), config_base=base)
        args = parser.parse_args(argv)
    args.argv = argv
    return args


# ---- generate ----------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> dict:
    from .data.prompts import Prompt, load_prompts, render_prompt
    from .decode.speculative import autoregressive_generate, generate
    from .decode.stats import summarize

    drafter_path, decoding = default_drafter(args.target, args.drafter, decoding_class(args.device, args.dtype))
    cfg, drafter_cfg = build_config(decoding, args), build_config(DrafterConfig, args)
    if args.prompt_file:
        prompts = load_prompts(args.prompt_file).prompts
    elif args.prompt is not None:
        if not args.prompt.strip():
            raise UserError("empty prompt")
        prompts = [Prompt(id="cli", source="cli", messages=(("user", args.prompt),))]
    else:
        raise UserError("give --prompt TEXT or --prompt-file FILE.jsonl")
    target, drafter = load_pair(args.target, drafter_path, drafter_cfg, args)
    ids = [render_prompt(p, target.tokenizer, chat_template=not args.raw) for p in prompts]
    gen = autoregressive_generate(target, ids, cfg) if args.autoregressive else generate(target, drafter, ids, cfg)
    note = drafter_note(args.target, args.drafter, drafter_path, cfg)
    if note and not args.autoregressive:  # after decoding: any bad input above stays a one-line error
        print(note, file=sys.stderr)
    stats = summarize(gen, None if args.autoregressive else drafter.block_size)
    texts = [target.tokenizer.decode(t.output, skip_special_tokens=True) for t in gen.traces]
    return {"texts": texts, "stats": stats.to_dict()}


def decoding_class(device: str, dtype: str) -> str:
    """The device class a bundled drafter's decoding defaults are measured per: device type and resolved dtype
    ("cpu-bfloat16" on CPUs with fast bf16, "cpu-float32", "cuda-bfloat16", ...)."""
    resolved = resolve_device(device)
    return f"{resolved.split(':')[0]}-{str(resolve_dtype(dtype, resolved)).removeprefix('torch.')}"


def default_drafter(target_name: str, drafter: str | None, device_class: str = "cpu-float32") -> tuple[str | None, DecodeConfig]:
    """`--drafter` and the default decoding, else the drafter bundled for this target (`config.BUNDLED_DRAFTERS`) with
    the decoding its benchmark chose for `device_class` (its config.json "decode": DecodeConfig fields, or per device
    class {"by_class": {class: fields}, "other": fields}; the base that `generate`'s flags override field by field, so
    `--lookup-ngram 0` turns lookup off and keeps the drafter's draft length; `--drafter` with the same folder decodes
    without it), else None (an untrained drafter) and the default decoding."""
    if drafter is not None:
        return drafter, DecodeConfig()
    folder = BUNDLED_DRAFTERS.get(target_name)
    if folder is None or not (folder / "config.json").is_file():
        return None, DecodeConfig()
    return str(folder), DecodeConfig(**class_decoding(json.loads((folder / "config.json").read_text()).get("decode", {}), device_class))


def class_decoding(decode: dict, device_class: str) -> dict:
    """A drafter config's "decode" entry for `device_class` (see `default_drafter`)."""
    if "by_class" not in decode:
        return decode
    return decode["by_class"].get(device_class, decode.get("other", {}))


def drafter_note(target_name: str, drafter_flag: str | None, path: str | None, cfg: DecodeConfig) -> str:
    """What `generate` tells stderr about the drafter it chose ("" when `--drafter` was given)."""
    if drafter_flag is not None:
        return ""
    if path is None:
        return (
            "note: no --drafter and none bundled for this target: an untrained drafter, expect no "
            "speedup (train one with `draftopd recipe` or `draftopd sft`)"
        )
    lookup = f", prompt lookup on {cfg.lookup_ngram}-grams" if cfg.lookup_ngram else ""
    drafts = "all" if cfg.num_drafts is None else cfg.num_drafts
    return (
        f"drafter: {path} (bundled for {target_name}; {drafts} drafts a round{lookup}; "
        "--drafter DIR for another, --autoregressive for plain decoding)"
    )


def print_generate(result: dict) -> None:
    for text in result["texts"]:
        print(text)
        print("-" * 40)
    s = result["stats"]
    print(f"tokens: {s['new_tokens']}  rounds: {s['rounds']}  tau: {s['tau']:.2f}  tokens/s: {s['tokens_per_s']:.1f}")
    if s["slot_acceptance"]:
        print("per-slot acceptance: " + " ".join(f"{a:.2f}" for a in s["slot_acceptance"]))
    if s["looked_up"]:
        print(f"rounds drafted by prompt lookup: {s['looked_up']:.0%}")
    print("ms per round: " + "  ".join(f"{k} {v:.1f}" for k, v in s["ms_per_round"].items()))


def load_pair(
    target_name: str, drafter_path: str | None, drafter_cfg: DrafterConfig, args: argparse.Namespace | None = None, train: bool = False
):
    """Target and drafter in the command's --dtype / --device. The drafter follows the target's dtype for decoding;
    a drafter being trained keeps float32 weights whatever the target's dtype."""
    from .models.drafter import load_drafter, new_drafter

    target = _target(target_name, args)
    drafter = load_drafter(drafter_path, target, drafter_cfg.arch) if drafter_path else new_drafter(target, drafter_cfg)
    return target, drafter if train else drafter.to(target.dtype)


# ---- regenerate / sft / eval / opd / demo ---------------------------------------------------------------
def cmd_regenerate(args: argparse.Namespace) -> dict:
    from .data.prompts import load_prompts
    from .data.regenerate import check_output, regenerate

    pcfg, cfg, drafter_cfg = build_config(PromptConfig, args), build_config(DecodeConfig, args), build_config(DrafterConfig, args)
    writable_file(args.out, "--out")
    check_output(args.out)
    prompts = load_prompts(pcfg.prompts, split=pcfg.resolved_split(), limit=pcfg.limit, seed=cfg.seed).prompts
    target, drafter = load_pair(args.target, args.drafter, drafter_cfg, args) if args.drafter else (_target(args.target, args), None)
    summary = regenerate(
        target,
        prompts,
        args.out,
        cfg,
        drafter=drafter,
        batch_size=pcfg.batch_size,
        chat_template=not args.raw,
        max_prompt_tokens=pcfg.max_prompt_tokens,
    )
    return {"out": args.out, "prompts": len(prompts), "split": pcfg.resolved_split(), **summary.to_dict()}


def cmd_sft(args: argparse.Namespace) -> dict:
    from .config import DataConfig, SFTConfig
    from .data.features import FeatureCache, frequent_tokens, read_manifest
    from .data.training import read_data
    from .train.sft import train_sft

    base = getattr(args, "config_base", {})
    sft = base.get("sft", SFTConfig())
    cfg, drafter_cfg = (
        build_config(sft, args, optim=build_config(sft.optim, args)),
        build_config(base.get("drafter", DrafterConfig()), args),
    )
    data_cfg = build_config(base.get("data", DataConfig()), args)
    run = run_info(args, sft=cfg, drafter=drafter_cfg, data=data_cfg)
    if (args.data is None) == (args.features is None):
        raise UserError("give exactly one of --data FILE.jsonl (the target runs online) or --features DIR (the offline cache)")
    writable_dir(args.out, "--out")
    if args.trim_loops and not args.data:
        raise UserError("--trim-loops applies to --data FILE.jsonl (regenerated answers); a feature cache holds what it was built from")
    data = read_data(args.data, data_cfg.format, trim_loops=args.trim_loops, max_tokens=data_cfg.max_tokens) if args.data else None
    if args.features:
        read_manifest(args.features)  # a missing or corrupt cache fails before any model loads
    target, drafter = load_pair(args.target, args.drafter, drafter_cfg, args, train=True)
    data = data_examples(data, target, args.data) if data is not None else None
    items = (
        data.examples
        if data is not None
        else FeatureCache.open(args.features, target, drafter.spec.target_layer_ids, need_final=cfg.loss == "kl")
    )
    if drafter.spec.draft_vocab_size is not None and not args.drafter:  # a new reduced head: the data's most frequent labels
        drafter.set_draft_vocab(frequent_tokens(items, target.vocab_size, drafter.spec.draft_vocab_size, cfg.labels))
    final = train_sft(target, drafter, items, cfg, args.out, resume=args.resume, run=run)
    return {
        "checkpoint": str(final),
        "examples": len(items),
        "skipped": data.skipped if data is not None else 0,
        **({"data": data.summary.to_dict()} if data is not None else {}),
    }


def data_examples(data, target, path: str):
    """The examples of a `read_data` file for `target` (conversations rendered with its chat template), checked against
    its vocabulary; what was skipped or cut is one stderr line."""
    from .data.regenerate import check_token_ids
    from .train.common import log

    examples = data.examples(target.tokenizer, target.name)
    check_token_ids(examples, target.vocab_size, path)
    summary = examples.summary
    if summary.skipped or summary.truncated or summary.context_turns or summary.loop_tokens_cut:
        log(f"data {summary.line()}")
    return examples


def cmd_eval(args: argparse.Namespace) -> dict:
    from .config import EvalConfig
    from .data.prompts import check_source
    from .eval.evaluate import evaluate
    from .train import distributed as ddp

    cfg = build_config(EvalConfig(), args, decode=build_config(EvalConfig().decode, args))
    drafter_cfg = build_config(DrafterConfig, args)
    for name in cfg.sets:
        check_source(name)
    if args.out:
        writable_file(args.out, "--out")
    target, drafter = load_pair(args.target, args.drafter, drafter_cfg, args)
    report = evaluate(target, drafter, cfg)
    report.config["drafter"] = args.drafter or "untrained"
    if args.out and ddp.is_main():  # under torchrun every rank holds the whole report
        report.save(args.out)
    return {"table": report.table(), **report.to_dict()}


def cmd_opd(args: argparse.Namespace) -> dict:
    from .data.prompts import load_prompts, render_prompt
    from .train.opd import OPDConfig, train_opd

    base = getattr(args, "config_base", {})
    opd = base.get("opd", OPDConfig())
    pcfg, drafter_cfg = build_config(base.get("prompts", PromptConfig()), args), build_config(base.get("drafter", DrafterConfig()), args)
    cfg = build_config(
        opd, args, loss=build_config(opd.loss, args), optim=build_config(opd.optim, args), rollout=build_config(opd.rollout, args)
    )
    run = run_info(args, opd=cfg, prompts=pcfg, drafter=drafter_cfg)
    writable_dir(args.out, "--out")
    prompts = load_prompts(pcfg.prompts, split=pcfg.resolved_split(), limit=pcfg.limit, seed=cfg.rollout.seed).prompts
    target, drafter = load_pair(args.target, args.drafter, drafter_cfg, args, train=True)
    ids = [render_prompt(p, target.tokenizer, chat_template=not args.raw) for p in prompts]
    ids = [p for p in ids if len(p) <= pcfg.max_prompt_tokens]
    if not ids:
        raise UserError(f"no prompts of at most {pcfg.max_prompt_tokens} tokens in {pcfg.prompts} (split {pcfg.resolved_split()})")
    final = train_opd(target, drafter, ids, cfg, args.out, resume=args.resume, run=run)
    return {"checkpoint": str(final), "prompts": len(ids)}


def cmd_demo(args: argparse.Namespace) -> dict:
    from .experiment import ABLATIONS, ExperimentConfig, format_results, run_experiment

    unknown = set(args.ablations) - set(ABLATIONS)
    if unknown:
        raise UserError(f"unknown ablation(s) {sorted(unknown)}; choose from {sorted(ABLATIONS)}")
    writable_dir(args.out, "--out")
    start = None if args.start == "none" else args.start
    if start not in (None, "bundled") and not (Path(start) / "config.json").is_file():
        raise UserError(f"--start {start}: no drafter checkpoint there (a folder with config.json), or 'bundled' / 'none'")
    base = getattr(args, "config_base", {}).get("experiment", ExperimentConfig())
    cfg = dataclasses.replace(
        base,
        target=args.target,
        out_dir=args.out,
        start=start,
        ablations=tuple(args.ablations),
        device=args.device,
        dtype=args.dtype,
        synthetic=args.synthetic,
    )
    summary = run_experiment(cfg, run=run_info(args, experiment=cfg))
    return {"table": format_results(summary), **summary}


def cmd_features(args: argparse.Namespace) -> dict:
    from .config import DataConfig, FeatureConfig
    from .data.answers import training_examples
    from .data.features import build_feature_cache
    from .data.training import read_data

    cfg, drafter_cfg, data_cfg = build_config(FeatureConfig, args), build_config(DrafterConfig, args), build_config(DataConfig, args)
    writable_dir(args.out, "--out")
    data = (
        None if cfg.data == "answers" else read_data(cfg.data, data_cfg.format, trim_loops=cfg.trim_loops, max_tokens=data_cfg.max_tokens)
    )
    target, drafter = load_pair(args.target, args.drafter, drafter_cfg, args)
    data = data_examples(data, target, cfg.data) if data is not None else None
    examples = training_examples(cfg, target.tokenizer, data)
    manifest = build_feature_cache(
        target,
        examples,
        args.out,
        drafter.spec.target_layer_ids,
        keep_final=cfg.keep_final,
        shard_tokens=cfg.shard_tokens,
        batch_tokens=cfg.batch_tokens,
    )
    return {
        "out": args.out,
        "sequences": manifest.sequences,
        "tokens": manifest.tokens,
        "bytes_per_token": manifest.bytes_per_token,
        "layer_ids": list(manifest.layer_ids),
        **({"data": data.summary.to_dict()} if data is not None else {}),
    }


def cmd_recipe(args: argparse.Namespace) -> dict:
    from .recipe import RecipeConfig, run_recipe

    base = getattr(args, "config_base", {}).get("recipe", RecipeConfig())
    cfg = build_config(
        base,
        args,
        features=build_config(base.features, args),
        drafter=build_config(base.drafter, args),
        eval=build_config(base.eval, args, prefix="eval_", decode=build_config(base.eval.decode, args, prefix="eval_")),
        sft=build_config(base.sft, args, optim=build_config(base.sft.optim, args)),
    )
    run = run_info(args, recipe=cfg)
    writable_dir(cfg.out_dir, "--out-dir")
    return run_recipe(cfg, run=run)


def cmd_plan(args: argparse.Namespace) -> dict:
    """What a run needs per rank, measured on meta tensors of the target's shapes (`plan.py`)."""
    from .plan import PlanConfig, plan

    report = plan(build_config(PlanConfig, args), build_config(DrafterConfig, args))
    return {"table": report.table(), **report.to_dict()}


EXPORT_FORMATS = ("dflash", "speculators", "gguf")  # z-lab's reference DFlash (dflash==0.1.0); speculators (vLLM); llama.cpp
IMPORT_FORMATS = ("dflash", "speculators")


def cmd_export(args: argparse.Namespace) -> dict:
    """Our checkpoint -> a folder another implementation loads (refused, nothing written, when not exact)."""
    from .interop.dflash_ref import export_dflash
    from .interop.speculators import export_speculators
    from .models.registry import family

    if not args.drafter:
        raise UserError("export needs --drafter DIR (a draftopd checkpoint)")
    if args.format == "gguf":
        return _export_gguf(args)
    _fresh_out(args.out)
    target = _target(args.target, args)
    drafter = _export_drafter(args, target)
    if args.format == "dflash":
        export_dflash(drafter, args.out, target)
        return {"format": args.format, "out": args.out, "load_with": "dflash.model.DFlashDraftModel.from_pretrained(out)"}
    export_speculators(drafter, args.out, target, args.verifier)
    method = family(drafter.spec.arch).speculators.model_type  # vLLM's method: the speculators model type
    return {
        "format": args.format,
        "out": args.out,
        "serve_with": (
            f'vllm serve TARGET --speculative-config \'{{"model": "{args.out}", "method": "{method}", '
            f'"num_speculative_tokens": {drafter.block_size - 1}}}\'  (not run here: docs/interop.md)'
        ),
    }


def _export_drafter(args: argparse.Namespace, target):
    """The checkpoint to export; with --widen-vocab a reduced-vocabulary drafter drafts over the target's whole
    vocabulary (`widen_vocab`: the same weights), which the reference DFlash and llama.cpp's DFlash formats need."""
    from .models.drafter import load_drafter, widen_vocab

    drafter = load_drafter(args.drafter, target, args.draft_arch)
    return widen_vocab(drafter) if args.widen_vocab else drafter


def _export_gguf(args: argparse.Namespace) -> dict:
    from .interop.llama_cpp import export_gguf, require_sources, spec_type

    if not args.out.endswith(".gguf"):
        raise UserError(f"--out {args.out}: a GGUF export is one file, name it *.gguf")
    if Path(args.out).exists():
        raise UserError(f"--out {args.out} exists: give a new file")
    writable_file(args.out, "--out")
    require_sources()
    target = _target(args.target, args)
    drafter = _export_drafter(args, target)
    export_gguf(drafter, args.out, target, outtype=args.outtype)
    return {
        "format": "gguf",
        "out": args.out,
        "serve_with": (
            f"llama-server -m TARGET.gguf -md {args.out} --spec-type {spec_type(drafter.spec.arch)} "
            f"--spec-draft-n-max {drafter.block_size - 1}  (benchmarks/llama_server.py runs it)"
        ),
    }


def cmd_import(args: argparse.Namespace) -> dict:
    """A folder in another implementation's format -> a draftopd checkpoint (Draft-OPD can then post-train it)."""
    from .interop.dflash_ref import import_dflash
    from .interop.speculators import import_speculators
    from .models.drafter import save_drafter

    _fresh_out(args.out)
    target = _target(args.target, args)
    drafter = {"dflash": import_dflash, "speculators": import_speculators}[args.format](args.source, target)
    save_drafter(drafter, args.out, extra={"imported_from": str(args.source), "format": args.format})
    return {
        "checkpoint": args.out,
        "arch": drafter.spec.arch,
        "block_size": drafter.block_size,
        "target_layer_ids": list(drafter.spec.target_layer_ids),
        "mask_token_id": drafter.spec.mask_token_id,
    }


def _fresh_out(out: str) -> None:
    writable_dir(out, "--out")
    if (Path(out) / "config.json").exists():
        raise UserError(f"--out {out} already holds a drafter (config.json): give a new folder")


def print_table(result: dict) -> None:
    print(result.get("table") or json.dumps(result, indent=2))


def _target(name: str, args: argparse.Namespace | None = None):
    from .config import resolve_device, resolve_dtype
    from .models.load import load_target

    device = resolve_device(getattr(args, "device", "auto"))
    return load_target(name, dtype=resolve_dtype(getattr(args, "dtype", "auto"), device), device=device)


# ---- paths, checked before any model is loaded ------------------------------------------------------------
def writable_file(path: str, flag: str) -> None:
    """Refuse an output file that cannot be written: a directory, or a place where no file can be created."""
    if Path(path).is_dir():
        raise UserError(f"{flag} {path} is a directory: give a file path")
    _probe(Path(path).parent, path, flag)


def writable_dir(path: str, flag: str) -> None:
    """Refuse an output folder that cannot be written: an existing file, or a place where nothing can be created."""
    if Path(path).exists() and not Path(path).is_dir():
        raise UserError(f"{flag} {path} exists and is not a folder")
    _probe(Path(path), path, flag)


def _probe(folder: Path, path: str, flag: str) -> None:
    """Create and delete a temp file in `folder`, or in its nearest existing ancestor when it does not exist yet
    (the command creates the missing folders). Permission bits alone are not asked: root ignores them and a
    read-only file system does not show in them, so only trying tells."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {flag} {path}: {folder} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"cannot write {flag} {path}: {err.strerror or err}") from None


# ---- parser ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="draftopd", description="Draft-OPD: train and measure speculative-decoding drafters")
    sub = parser.add_subparsers(dest="command", required=True)
    parser.commands = sub.choices  # name -> its parser (`parse_args` sets a --config file's values on one)

    gen = sub.add_parser("generate", help="speculative generation with a drafter (default: the one bundled for the target)")
    _target_args(gen)
    gen.add_argument("--prompt", help="prompt text (the target's chat template is applied unless --raw)")
    gen.add_argument("--prompt-file", help='JSONL of {"prompt": ...} or {"messages": [...]} records')
    gen.add_argument("--raw", action="store_true", help="raw completion: do not apply the chat template")
    gen.add_argument("--autoregressive", action="store_true", help="plain target decoding (the baseline)")
    _json_arg(gen)
    add_config_args(gen, DecodeConfig, unset=("num_drafts", "draft_confidence", "lookup_ngram"))  # not given: the drafter's choice
    gen.set_defaults(func=cmd_generate, printer=print_generate)

    from .config import DataConfig, EvalConfig, OptimConfig, SFTConfig
    from .train.losses import LossConfig
    from .train.opd import OPDConfig

    reg = sub.add_parser("regenerate", help="the target answers training prompts (JSONL with token ids)")
    _target_args(reg)
    reg.add_argument(
        "--out",
        default="runs/regenerated.jsonl",
        help="JSONL to write, or to resume: its prompts already answered are skipped (default runs/regenerated.jsonl)",
    )
    reg.add_argument("--raw", action="store_true", help=RAW_HELP)
    add_config_args(reg, PromptConfig)
    _json_arg(reg)
    add_config_args(reg, DecodeConfig)
    reg.set_defaults(func=cmd_regenerate, printer=print_table)

    sft = sub.add_parser("sft", help="DFlash SFT of a drafter on regenerated data (resumable)")
    _target_args(sft)
    sft.add_argument(
        "--data",
        help="JSONL of regenerated answers (`draftopd regenerate`), token ids (input_ids / loss_mask) or "
        "conversations (ShareGPT, OpenAI messages): the target scores each batch online (data/training.py)",
    )
    sft.add_argument("--features", help="feature cache written by `draftopd features` (no target forward while training)")
    sft.add_argument("--trim-loops", action="store_true", help="with --data: cut each answer where a greedy loop starts")
    sft.add_argument("--out", default="runs/sft", help=OUT_HELP.format("runs/sft"))
    sft.add_argument("--resume", action="store_true", help=RESUME_HELP)
    _json_arg(sft)
    _run_args(sft)
    add_config_args(sft, DataConfig)
    add_config_args(sft, SFTConfig)
    add_config_args(sft, OptimConfig)
    sft.set_defaults(func=cmd_sft, printer=print_table)

    ev = sub.add_parser("eval", help="tau, acceptance and speedup over AR on held-out prompt sets")
    _target_args(ev)
    ev.add_argument("--out", help="write the report as JSON here")
    _json_arg(ev)
    add_config_args(ev, EvalConfig)
    add_config_args(ev, EvalConfig().decode, skip=("record_draft_logits",))
    ev.set_defaults(func=cmd_eval, printer=print_table)

    opd = sub.add_parser("opd", help="Draft-OPD training from a drafter checkpoint (resumable)")
    _target_args(opd)
    add_config_args(opd, PromptConfig, skip=("batch_size",))
    opd.add_argument("--raw", action="store_true", help=RAW_HELP)
    opd.add_argument("--out", default="runs/opd", help=OUT_HELP.format("runs/opd"))
    opd.add_argument("--resume", action="store_true", help=RESUME_HELP)
    _json_arg(opd)
    _run_args(opd)
    add_config_args(opd, OPDConfig())
    add_config_args(opd, OPDConfig().rollout, skip=("num_drafts", "draft_confidence", "lookup_ngram", "record_draft_logits"))
    add_config_args(opd, LossConfig)
    add_config_args(opd, OPDConfig().optim)
    opd.set_defaults(func=cmd_opd, printer=print_table)

    from .config import FeatureConfig
    from .recipe import RecipeConfig

    feat = sub.add_parser("features", help="cache the target's features of a dataset for SFT (resumable)")
    _target_args(feat)
    feat.add_argument(
        "--out", default="runs/features", help="the cache's folder; a cache there is completed, not redone (default runs/features)"
    )
    _json_arg(feat)
    add_config_args(feat, FeatureConfig)
    add_config_args(feat, DataConfig)
    feat.set_defaults(func=cmd_features, printer=print_table)

    rec = sub.add_parser("recipe", help="from nothing to a strong drafter: answers, features, SFT, evaluation (resumable)")
    _json_arg(rec)
    _run_args(rec)
    add_config_args(rec, RecipeConfig())  # every default is the recipe's own (config.py / recipe.py)
    add_config_args(rec, RecipeConfig().features)
    add_config_args(rec, RecipeConfig().drafter)
    add_config_args(rec, RecipeConfig().sft)
    add_config_args(rec, RecipeConfig().sft.optim)
    add_config_args(rec, RecipeConfig().eval, prefix="eval_")
    add_config_args(rec, RecipeConfig().eval.decode, prefix="eval_", skip=("record_draft_logits",))
    rec.set_defaults(func=cmd_recipe, printer=print_table)

    exp = sub.add_parser("export", help="write a drafter in another implementation's format (reference DFlash, speculators, GGUF)")
    _target_args(exp)
    exp.add_argument(
        "--format",
        default="dflash",
        choices=EXPORT_FORMATS,
        help="dflash: z-lab's reference DFlash; speculators: vLLM's; gguf: llama.cpp's (default dflash)",
    )
    exp.add_argument("--verifier", help="speculators: the target's local folder or hub id to record (default: the target's own)")
    exp.add_argument(
        "--widen-vocab",
        action="store_true",
        help="draft over the target's whole vocabulary (a reduced head's rows are the target's own, so no "
        "weight changes): what --format dflash and gguf need for a reduced-vocabulary DFlash drafter",
    )
    exp.add_argument("--outtype", default="f32", choices=("f32", "bf16", "f16"), help="gguf: weight type (default f32)")
    exp.add_argument("--out", required=True, help="new folder for the exported drafter (gguf: a new .gguf file)")
    _json_arg(exp)
    exp.set_defaults(func=cmd_export, printer=print_table)

    imp = sub.add_parser("import", help="read a drafter of another implementation's format into a draftopd checkpoint")
    _target_args(imp)
    imp.add_argument(
        "--format", default="dflash", choices=IMPORT_FORMATS, help="dflash: z-lab's reference DFlash; speculators: vLLM's (default dflash)"
    )
    imp.add_argument("--from", dest="source", required=True, help="folder in that format (config.json + model.safetensors)")
    imp.add_argument("--out", required=True, help="new folder for the draftopd checkpoint")
    _json_arg(imp)
    imp.set_defaults(func=cmd_import, printer=print_table)

    from .plan import PlanConfig

    pl = sub.add_parser("plan", help="memory per rank, FLOPs and feature-cache size of a run, measured on the target's shapes (no weights)")
    _json_arg(pl)
    add_config_args(pl, PlanConfig)
    add_config_args(pl, DrafterConfig)
    pl.set_defaults(func=cmd_plan, printer=print_table)

    from .config import field_choices, field_help
    from .experiment import ExperimentConfig

    demo = sub.add_parser(
        "demo",
        help="the whole pipeline at small scale on the embedded target (10 min 30 s on 2 cores: AMD EPYC, 2026-12-01), "
        "then on the synthetic target (--no-synthetic skips it; 11 min 30 s on one thread of the same host, 2026-12-08, "
        "plus about 6 min to build the target the first time)",
    )
    exp_help = lambda name: f"{field_help(ExperimentConfig, name)} (default {getattr(ExperimentConfig, name)})".replace("%", "%%")  # noqa: E731
    demo.add_argument("--target", default=ExperimentConfig.target, help=exp_help("target"))
    demo.add_argument("--out", default=ExperimentConfig.out_dir, help=exp_help("out_dir"))
    demo.add_argument("--start", default=ExperimentConfig.start, help=exp_help("start"))
    demo.add_argument("--ablations", nargs="*", default=[], help=exp_help("ablations"))
    demo.add_argument("--device", default=ExperimentConfig.device, help=exp_help("device"))
    demo.add_argument("--dtype", default=ExperimentConfig.dtype, choices=field_choices(ExperimentConfig, "dtype"), help=exp_help("dtype"))
    demo.add_argument("--synthetic", action=argparse.BooleanOptionalAction, default=ExperimentConfig.synthetic, help=exp_help("synthetic"))
    _json_arg(demo)
    _run_args(demo)
    demo.set_defaults(func=cmd_demo, printer=print_table)
    return parser


RAW_HELP = "raw completion: do not apply the target's chat template to the prompts"
OUT_HELP = "the run's folder: checkpoint (last/), metrics.jsonl, run.yaml, command.txt, env.json (default {})"
RESUME_HELP = "continue the run in --out from its last checkpoint, exactly where it stopped"


def _json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object instead of text")


def _run_args(parser: argparse.ArgumentParser) -> None:
    """A training command's tracker and config file (`train/tracking.py`)."""
    from .train.tracking import REPORT_TO

    parser.add_argument(
        "--report-to",
        default="none",
        choices=REPORT_TO,
        help="also send every step's metrics to TensorBoard (OUT/tensorboard) or Weights & Biases (OUT/wandb, offline "
        "unless WANDB_MODE is set); metrics.jsonl is always written (default none)",
    )
    parser.add_argument(
        "--config",
        help="a run.yaml written beside a run's checkpoints: run with its configs and flags; flags given on the command line override it",
    )


def _target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"embedded name, local HF folder or hub id (default {DEFAULT_TARGET})")
    parser.add_argument(
        "--drafter", help="drafter checkpoint folder (default: a new untrained drafter; generate: the one bundled for the target, if any)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="model dtype; auto = bfloat16 where the device computes it fast (AVX512-BF16 CPUs, CUDA), else float32",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto = cuda when available")
    add_config_args(parser, DrafterConfig)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every ValueError (the project's errors, ConfigError, DataError, TargetError, DrafterError,
    RunDirError, UserError all are) and OSError (a bad path) ends as one stderr line and exit status 2."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = parse_args(argv)
        result = args.func(args)
    except (ValueError, OSError) as err:
        print(f"draftopd: error: {one_line(err)}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    elif result is not None:
        args.printer(result)
    return 0


def one_line(err: BaseException) -> str:
    """The error's message on one line (its type name when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
