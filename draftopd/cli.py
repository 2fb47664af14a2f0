"""`draftopd` command line. Flags are generated from the frozen config dataclasses, so defaults live only there.

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

from .config import COMMITTED_DRAFTERS, DEFAULT_TARGET, DTYPES, DecodeConfig, DrafterConfig, PromptConfig


class UserError(ValueError):
    """Bad input detected by the CLI itself."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors (unknown flag, bad number, missing argument) are one `draftopd: error:` line, not a usage block."""

    def error(self, message: str):
        raise UserError(message)


def add_config_args(parser: argparse.ArgumentParser, defaults: Any, prefix: str | None = None, skip: tuple[str, ...] = (),
                    unset: tuple[str, ...] = ()) -> None:
    """One `--prefix-field-name` flag per dataclass field; defaults come from `defaults` (a dataclass or an instance),
    the prefix from its `flag_prefix` (the name its errors use) unless given. Fields in `unset` default to None, so a
    command can tell a flag given at its default value from one not given (`build_config` then keeps the field's default)."""
    prefix = getattr(defaults, "flag_prefix", "") if prefix is None else prefix
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
            parser.add_argument(flag, dest=prefix + f.name, type=_scalar_type(default, f.type), default=None if f.name in unset else default,
                                help=(f"{f.metadata['help']}: " if "help" in f.metadata else "") + f"default {default}"
                                + (" unless the command chooses another" if f.name in unset else ""))


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
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if v is not None or getattr(base, k) is None}  # None: not given
    return dataclasses.replace(base, **{**values, **overrides})


# ---- generate ----------------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> dict:
    from .data.prompts import Prompt, load_prompts, render_prompt
    from .decode.speculative import autoregressive_generate, generate
    from .decode.stats import summarize

    drafter_path, decoding = default_drafter(args.target, args.drafter)
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


def default_drafter(target_name: str, drafter: str | None) -> tuple[str | None, DecodeConfig]:
    """`--drafter` and the default decoding, else the drafter committed for this target (`config.COMMITTED_DRAFTERS`)
    with the decoding its benchmark chose (its config.json "decode": the base that `generate`'s flags override field by
    field, so `--lookup-ngram 0` turns lookup off and keeps the drafter's draft length; `--drafter` with the same
    folder decodes without it), else None (an untrained drafter) and the default decoding."""
    if drafter is not None:
        return drafter, DecodeConfig()
    folder = COMMITTED_DRAFTERS.get(target_name)
    if folder is None or not (folder / "config.json").is_file():
        return None, DecodeConfig()
    return str(folder), DecodeConfig(**json.loads((folder / "config.json").read_text()).get("decode", {}))


def drafter_note(target_name: str, drafter_flag: str | None, path: str | None, cfg: DecodeConfig) -> str:
    """What `generate` tells stderr about the drafter it chose ("" when `--drafter` was given)."""
    if drafter_flag is not None:
        return ""
    if path is None:
        return ("note: no --drafter and none committed for this target: an untrained drafter, expect no "
                "speedup (train one with `draftopd recipe` or `draftopd sft`)")
    lookup = f", prompt lookup on {cfg.lookup_ngram}-grams" if cfg.lookup_ngram else ""
    drafts = "all" if cfg.num_drafts is None else cfg.num_drafts
    return (f"drafter: {path} (committed for {target_name}; {drafts} drafts a round{lookup}; "
            "--drafter DIR for another, --autoregressive for plain decoding)")


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


def load_pair(target_name: str, drafter_path: str | None, drafter_cfg: DrafterConfig, args: argparse.Namespace | None = None,
              train: bool = False):
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
    summary = regenerate(target, prompts, args.out, cfg, drafter=drafter, batch_size=pcfg.batch_size,
                         chat_template=not args.raw, max_prompt_tokens=pcfg.max_prompt_tokens)
    return {"out": args.out, "prompts": len(prompts), "split": pcfg.resolved_split(), **summary.to_dict()}


def cmd_sft(args: argparse.Namespace) -> dict:
    from .config import DataConfig, OptimConfig, SFTConfig
    from .data.training import read_data
    from .train.sft import train_sft

    from .data.features import FeatureCache, frequent_tokens, read_manifest

    cfg, drafter_cfg = build_config(SFTConfig, args, optim=build_config(OptimConfig, args)), build_config(DrafterConfig, args)
    data_cfg = build_config(DataConfig, args)
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
    items = data.examples if data is not None else FeatureCache.open(args.features, target, drafter.spec.target_layer_ids, need_final=cfg.loss == "kl")
    if drafter.spec.draft_vocab_size is not None and not args.drafter:  # a new reduced head: the data's most frequent labels
        drafter.set_draft_vocab(frequent_tokens(items, target.vocab_size, drafter.spec.draft_vocab_size, cfg.labels))
    final = train_sft(target, drafter, items, cfg, args.out, resume=args.resume)
    return {"checkpoint": str(final), "examples": len(items), "skipped": data.skipped if data is not None else 0,
            **({"data": data.summary.to_dict()} if data is not None else {})}


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

    cfg, drafter_cfg = build_config(EvalConfig, args), build_config(DrafterConfig, args)
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
    from .train.losses import LossConfig
    from .train.opd import OPDConfig, train_opd

    pcfg, drafter_cfg = build_config(PromptConfig, args), build_config(DrafterConfig, args)
    cfg = build_config(OPDConfig(), args, loss=build_config(LossConfig, args), optim=build_config(OPDConfig().optim, args))
    writable_dir(args.out, "--out")
    prompts = load_prompts(pcfg.prompts, split=pcfg.resolved_split(), limit=pcfg.limit, seed=cfg.seed).prompts
    target, drafter = load_pair(args.target, args.drafter, drafter_cfg, args, train=True)
    ids = [render_prompt(p, target.tokenizer, chat_template=not args.raw) for p in prompts]
    ids = [p for p in ids if len(p) <= pcfg.max_prompt_tokens]
    if not ids:
        raise UserError(f"no prompts of at most {pcfg.max_prompt_tokens} tokens in {pcfg.prompts} (split {pcfg.resolved_split()})")
    final = train_opd(target, drafter, ids, cfg, args.out, resume=args.resume)
    return {"checkpoint": str(final), "prompts": len(ids)}


def cmd_demo(args: argparse.Namespace) -> dict:
    from .experiment import ABLATIONS, ExperimentConfig, format_results, run_experiment

    unknown = set(args.ablations) - set(ABLATIONS)
    if unknown:
        raise UserError(f"unknown ablation(s) {sorted(unknown)}; choose from {sorted(ABLATIONS)}")
    writable_dir(args.out, "--out")
    start = None if args.start == "none" else args.start
    if start not in (None, "committed") and not (Path(start) / "config.json").is_file():
        raise UserError(f"--start {start}: no drafter checkpoint there (a folder with config.json), or 'committed' / 'none'")
    cfg = ExperimentConfig(target=args.target, out_dir=args.out, start=start, ablations=tuple(args.ablations), device=args.device, dtype=args.dtype)
    summary = run_experiment(cfg)
    return {"table": format_results(summary), **summary}


def cmd_features(args: argparse.Namespace) -> dict:
    from .config import DataConfig, FeatureConfig
    from .data.answers import training_examples
    from .data.features import build_feature_cache
    from .data.training import read_data

    cfg, drafter_cfg, data_cfg = build_config(FeatureConfig, args), build_config(DrafterConfig, args), build_config(DataConfig, args)
    writable_dir(args.out, "--out")
    data = None if cfg.data == "answers" else read_data(cfg.data, data_cfg.format, trim_loops=cfg.trim_loops, max_tokens=data_cfg.max_tokens)
    target, drafter = load_pair(args.target, args.drafter, drafter_cfg, args)
    data = data_examples(data, target, cfg.data) if data is not None else None
    examples = training_examples(cfg, target.tokenizer, data)
    manifest = build_feature_cache(target, examples, args.out, drafter.spec.target_layer_ids, keep_final=cfg.keep_final,
                                   shard_tokens=cfg.shard_tokens, batch_tokens=cfg.batch_tokens)
    return {"out": args.out, "sequences": manifest.sequences, "tokens": manifest.tokens, "bytes_per_token": manifest.bytes_per_token,
            "layer_ids": list(manifest.layer_ids), **({"data": data.summary.to_dict()} if data is not None else {})}


def cmd_recipe(args: argparse.Namespace) -> dict:
    from .recipe import RecipeConfig, run_recipe

    base = RecipeConfig()
    cfg = build_config(base, args, features=build_config(base.features, args), drafter=build_config(base.drafter, args),
                       eval=build_config(base.eval, args, prefix="eval_"),
                       sft=build_config(base.sft, args, optim=build_config(base.sft.optim, args)))
    writable_dir(cfg.out_dir, "--out-dir")
    return run_recipe(cfg)


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
    return {"format": args.format, "out": args.out, "serve_with": (
        f"vllm serve TARGET --speculative-config '{{\"model\": \"{args.out}\", \"method\": \"{method}\", "
        f"\"num_speculative_tokens\": {drafter.block_size - 1}}}'  (not run here: README, Interop)")}


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
    return {"format": "gguf", "out": args.out, "serve_with": (
        f"llama-server -m TARGET.gguf -md {args.out} --spec-type {spec_type(drafter.spec.arch)} "
        f"--spec-draft-n-max {drafter.block_size - 1}  (benchmarks/llama_server.py runs it)")}


def cmd_import(args: argparse.Namespace) -> dict:
    """A folder in another implementation's format -> a draftopd checkpoint (Draft-OPD can then post-train it)."""
    from .interop.dflash_ref import import_dflash
    from .interop.speculators import import_speculators
    from .models.drafter import save_drafter

    _fresh_out(args.out)
    target = _target(args.target, args)
    drafter = {"dflash": import_dflash, "speculators": import_speculators}[args.format](args.source, target)
    save_drafter(drafter, args.out, extra={"imported_from": str(args.source), "format": args.format})
    return {"checkpoint": args.out, "arch": drafter.spec.arch, "block_size": drafter.block_size,
            "target_layer_ids": list(drafter.spec.target_layer_ids), "mask_token_id": drafter.spec.mask_token_id}


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

    gen = sub.add_parser("generate", help="speculative generation with a drafter (default: the one committed for the target)")
    _target_args(gen)
    gen.add_argument("--prompt", help="prompt text (the target's chat template is applied unless --raw)")
    gen.add_argument("--prompt-file", help="JSONL of {\"prompt\": ...} or {\"messages\": [...]} records")
    gen.add_argument("--raw", action="store_true", help="raw completion: do not apply the chat template")
    gen.add_argument("--autoregressive", action="store_true", help="plain target decoding (the baseline)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_config_args(gen, DecodeConfig, unset=("num_drafts", "draft_confidence", "lookup_ngram"))  # not given: the drafter's choice
    gen.set_defaults(func=cmd_generate, printer=print_generate)

    from .config import DataConfig, EvalConfig, OptimConfig, SFTConfig
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
    sft.add_argument("--data", help="JSONL of regenerated answers (`draftopd regenerate`), token ids (input_ids / loss_mask) or "
                     "conversations (ShareGPT, OpenAI messages): the target scores each batch online (data/training.py)")
    sft.add_argument("--features", help="feature cache written by `draftopd features` (no target forward while training)")
    sft.add_argument("--trim-loops", action="store_true", help="with --data: cut each answer where a greedy loop starts")
    sft.add_argument("--out", default="runs/sft")
    sft.add_argument("--resume", action="store_true", help="continue from OUT/last exactly where it stopped")
    sft.add_argument("--json", action="store_true")
    add_config_args(sft, DataConfig)
    add_config_args(sft, SFTConfig)
    add_config_args(sft, OptimConfig)
    sft.set_defaults(func=cmd_sft, printer=print_table)

    ev = sub.add_parser("eval", help="tau, acceptance and speedup over AR on held-out prompt sets")
    _target_args(ev)
    ev.add_argument("--out", help="write the report as JSON here")
    ev.add_argument("--json", action="store_true")
    add_config_args(ev, EvalConfig)
    ev.set_defaults(func=cmd_eval, printer=print_table)

    opd = sub.add_parser("opd", help="Draft-OPD training from a drafter checkpoint (resumable)")
    _target_args(opd)
    add_config_args(opd, PromptConfig, skip=("batch_size",))
    opd.add_argument("--raw", action="store_true")
    opd.add_argument("--out", default="runs/opd")
    opd.add_argument("--resume", action="store_true")
    opd.add_argument("--json", action="store_true")
    add_config_args(opd, OPDConfig())
    add_config_args(opd, LossConfig)
    add_config_args(opd, OPDConfig().optim)
    opd.set_defaults(func=cmd_opd, printer=print_table)

    from .config import FeatureConfig
    from .recipe import RecipeConfig

    feat = sub.add_parser("features", help="cache the target's features of a dataset for SFT (resumable)")
    _target_args(feat)
    feat.add_argument("--out", default="runs/features")
    feat.add_argument("--json", action="store_true")
    add_config_args(feat, FeatureConfig)
    add_config_args(feat, DataConfig)
    feat.set_defaults(func=cmd_features, printer=print_table)

    rec = sub.add_parser("recipe", help="from nothing to a strong drafter: answers, features, SFT, evaluation (resumable)")
    rec.add_argument("--json", action="store_true")
    add_config_args(rec, RecipeConfig())  # every default is the recipe's own (config.py / recipe.py)
    add_config_args(rec, RecipeConfig().features)
    add_config_args(rec, RecipeConfig().drafter)
    add_config_args(rec, RecipeConfig().sft)
    add_config_args(rec, RecipeConfig().sft.optim)
    add_config_args(rec, RecipeConfig().eval, prefix="eval_")
    rec.set_defaults(func=cmd_recipe, printer=print_table)

    exp = sub.add_parser("export", help="write a drafter in another implementation's format (reference DFlash, speculators, GGUF)")
    _target_args(exp)
    exp.add_argument("--format", default="dflash", choices=EXPORT_FORMATS)
    exp.add_argument("--verifier", help="speculators: the target's local folder or hub id to record (default: the target's own)")
    exp.add_argument("--widen-vocab", action="store_true",
                     help="draft over the target's whole vocabulary (a reduced head's rows are the target's own, so no "
                          "weight changes): what --format dflash and gguf need for a reduced-vocabulary DFlash drafter")
    exp.add_argument("--outtype", default="f32", choices=("f32", "bf16", "f16"), help="gguf: weight type (default f32)")
    exp.add_argument("--out", required=True, help="new folder for the exported drafter (gguf: a new .gguf file)")
    exp.add_argument("--json", action="store_true")
    exp.set_defaults(func=cmd_export, printer=print_table)

    imp = sub.add_parser("import", help="read a drafter of another implementation's format into a draftopd checkpoint")
    _target_args(imp)
    imp.add_argument("--format", default="dflash", choices=IMPORT_FORMATS)
    imp.add_argument("--from", dest="source", required=True, help="folder in that format (config.json + model.safetensors)")
    imp.add_argument("--out", required=True, help="new folder for the draftopd checkpoint")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(func=cmd_import, printer=print_table)

    from .plan import PlanConfig

    pl = sub.add_parser("plan", help="memory per rank, FLOPs and feature-cache size of a run, measured on the target's shapes (no weights)")
    pl.add_argument("--json", action="store_true")
    add_config_args(pl, PlanConfig)
    add_config_args(pl, DrafterConfig)
    pl.set_defaults(func=cmd_plan, printer=print_table)

    from .experiment import ExperimentConfig

    demo = sub.add_parser("demo", help="the whole pipeline at small scale on the embedded target (10 min 30 s measured on 2 cores: AMD EPYC, 2026-12-01)")
    demo.add_argument("--target", default=DEFAULT_TARGET)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--start", default="committed",
                      help="start drafter: 'committed' (the one shipped for the embedded target; others build one), a folder, or 'none' (build)")
    demo.add_argument("--ablations", nargs="*", default=[], help="Draft-OPD variants to add as rows")
    demo.add_argument("--device", default=ExperimentConfig.device, help=f"cpu, cuda, cuda:N; auto = cuda when available (default {ExperimentConfig.device})")
    demo.add_argument("--dtype", default=ExperimentConfig.dtype, choices=DTYPES, help=f"the target's dtype in every stage (default {ExperimentConfig.dtype})")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo, printer=print_table)
    return parser


def _target_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help=f"embedded name, local HF folder or hub id (default {DEFAULT_TARGET})")
    parser.add_argument("--drafter", help="drafter checkpoint folder (default: a new untrained drafter; generate: the one committed for the target, if any)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="model dtype; auto = bfloat16 where the device computes it fast (AVX512-BF16 CPUs, CUDA), else float32")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; auto = cuda when available")
    add_config_args(parser, DrafterConfig)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every ValueError (the project's errors, ConfigError, DataError, TargetError, DrafterError,
    RunDirError, UserError all are) and OSError (a bad path) ends as one stderr line and exit status 2."""
    try:
        args = build_parser().parse_args(argv)
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
