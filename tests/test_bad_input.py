"""Every bad input to every sub-command: exit status 2, one `draftopd: error:` line on stderr, files untouched.

`CASES` is the table: an id, the command line (placeholders in braces are filled from `paths`), a fragment the
error line must contain, and the files that must come out byte-identical. Commands are small (tiny local target,
one training step), and validation happens before any model is loaded, so the whole table takes seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from test_cli import save_tiny_target

from draftopd.cli import main

G = "generate --target {target} --prompt w1 --max-new-tokens 4"
R = "regenerate --target {target} --prompts {prompts} --split all --out {tmp}/out.jsonl --max-new-tokens 4"
S = "sft --target {target} --data {data} --out {tmp}/sft --steps 1 --batch-size 2 --anchors-per-seq 2 --draft-block-size 4"
E = "eval --target {target} --sets {prompts} --num-prompts 2 --max-new-tokens 4"
OPD = (
    "opd --target {target} --prompts {prompts} --out {tmp}/opd --steps 1 --prompts-per-rollout 2 --rollouts-per-step 1 "
    "--replay-batch 2 --max-new-tokens 4 --draft-block-size 4"
)
BASES = {"generate": G, "regenerate": R, "sft": S, "eval": E, "opd": OPD}

CASES: list[tuple[str, str, str, tuple[str, ...]]] = [
    # ---- generate: decode and drafter flags, prompts, targets broken in every way
    ("gen-temperature-nan", G + " --temperature nan", "--temperature", ()),
    ("gen-temperature-negative", G + " --temperature -1", "--temperature", ()),
    ("gen-temperature-inf", G + " --temperature inf", "--temperature", ()),
    ("gen-max-new-tokens-0", G + " --max-new-tokens 0", "--max-new-tokens", ()),
    ("gen-max-new-tokens-text", G + " --max-new-tokens abc", "invalid int", ()),
    ("gen-seed-negative", G + " --seed -1", "--seed", ()),
    ("gen-num-drafts-negative", G + " --num-drafts -1", "--num-drafts", ()),
    ("gen-lookup-only-without-lookup", G + " --num-drafts 0", "--lookup-ngram", ()),
    ("gen-lookup-ngram-negative", G + " --lookup-ngram -1", "--lookup-ngram", ()),
    ("gen-block-size-1", G + " --draft-block-size 1", "--draft-block-size", ()),
    ("gen-draft-layers-0", G + " --draft-num-layers 0", "--draft-num-layers", ()),
    ("gen-rope-theta-0", G + " --draft-rope-theta 0", "--draft-rope-theta", ()),
    ("gen-draft-heads-0", G + " --draft-num-heads 0", "--draft-num-heads", ()),
    ("gen-layer-ids-outside", G + " --draft-target-layer-ids 99", "outside", ()),
    ("gen-layer-ids-negative", G + " --draft-target-layer-ids -1", "--draft-target-layer-ids", ()),
    (
        "gen-draft-heads-not-dividing-hidden",
        G + " --draft-num-heads 5",
        "--draft-num-heads 5 does not divide the target's hidden size 32",
        (),
    ),
    ("gen-draft-kv-heads-not-dividing", G + " --draft-num-heads 4 --draft-num-kv-heads 3", "--draft-num-kv-heads must divide", ()),
    ("gen-draft-targets-kv-heads-not-dividing", G + " --draft-num-heads 1", "--draft-num-kv-heads must divide the 1 attention heads", ()),
    ("gen-draft-head-dim-odd", G + " --draft-head-dim 7", "--draft-head-dim must be even", ()),
    ("gen-learned-mask-and-mask-id", G + " --draft-learned-mask --draft-mask-token-id 3", "exclude each other", ()),
    ("gen-learned-mask-eagle3", G + " --draft-arch eagle3 --draft-learned-mask", "applies to DFlash drafters", ()),
    ("gen-drafter-block-size-text", G + " --drafter {drafter_block_text}", "draftopd_spec.block_size must be an integer >= 2, got '8'", ()),
    ("gen-drafter-block-size-0", G + " --drafter {drafter_block_0}", "draftopd_spec.block_size must be an integer >= 2, got 0", ()),
    ("gen-drafter-block-size-negative", G + " --drafter {drafter_block_negative}", "draftopd_spec.block_size", ()),
    ("gen-drafter-layer-beyond-depth", G + " --drafter {drafter_deep_layer}", "outside the target's 4 layers", ()),
    ("gen-drafter-kv-heads-not-dividing", G + " --drafter {drafter_kv_heads}", "draftopd_spec.num_kv_heads must divide", ()),
    ("gen-drafter-rope-theta-text", G + " --drafter {drafter_rope_text}", "draftopd_spec.rope_theta", ()),
    ("gen-drafter-mask-outside-vocab", G + " --drafter {drafter_mask_outside}", "draftopd_spec.mask_token_id", ()),
    ("gen-unknown-flag", G + " --no-such-flag", "unrecognized arguments", ()),
    ("gen-device-bogus", G + " --device bogus", "--device must be auto, cpu, cuda or cuda:N, got 'bogus'", ()),
    ("gen-no-prompt", "generate --target {target}", "--prompt", ()),
    ("gen-missing-prompt-file", G + " --prompt-file {tmp}/missing.jsonl", "missing file", ()),
    ("gen-missing-drafter", G + " --drafter {tmp}/missing", "drafter", ()),
    ("gen-unknown-target", "generate --target {tmp}/nothing --prompt w1", "unknown target", ()),
    ("gen-target-no-config", "generate --target {folder} --prompt w1", "no config.json", ()),
    ("gen-target-remote-code", "generate --target {remote_code} --prompt w1", "never runs code", ()),
    ("gen-target-unknown-type", "generate --target {unknown_type} --prompt w1", "not built into transformers", ()),
    ("gen-target-no-tokenizer", "generate --target {no_tokenizer} --prompt w1", "tokenizer", ()),
    ("gen-target-config-not-json", "generate --target {config_not_json} --prompt w1", "config.json", ()),
    ("gen-target-bad-config-field", "generate --target {bad_field} --prompt w1", "hidden_size", ()),
    ("gen-target-bad-heads", "generate --target {bad_heads} --prompt w1", "attention heads", ()),
    ("gen-target-no-weights", "generate --target {no_weights} --prompt w1", "weights", ()),
    ("gen-target-truncated-weights", "generate --target {truncated} --prompt w1", "weights", ()),
    ("gen-target-garbage-weights", "generate --target {garbage} --prompt w1", "weights", ()),
    ("gen-target-missing-tensor", "generate --target {missing_tensor} --prompt w1", "lacks", ()),
    ("gen-target-shape-mismatch", "generate --target {shape_mismatch} --prompt w1", "shape", ()),
    # ---- regenerate: prompt flags, and output files that are not ours to append to
    ("regen-batch-size-0", R + " --batch-size 0", "--batch-size", ()),
    ("regen-limit-0", R + " --limit 0", "--limit", ()),
    ("regen-split-bogus", R + " --split bogus", "--split", ()),
    ("regen-max-prompt-tokens-0", R + " --max-prompt-tokens 0", "--max-prompt-tokens", ()),
    ("regen-temperature-negative", R + " --temperature -0.5", "--temperature", ()),
    ("regen-missing-prompts", R + " --prompts {tmp}/missing.jsonl", "missing file", ()),
    ("regen-target-unknown-type", R + " --target {unknown_type}", "not built into transformers", ()),
    ("regen-missing-drafter", R + " --drafter {tmp}/missing", "drafter", ()),
    ("regen-out-directory", R + " --out {folder}", "directory", ()),
    ("regen-out-under-file", R + " --out {notes}/out.jsonl", "not a folder", ("notes",)),
    ("regen-out-read-only", R + " --out {read_only}/out.jsonl", "cannot write", ()),
    ("regen-out-is-prompts", R + " --out {prompts}", "refusing", ("prompts",)),
    ("regen-out-notes", R + " --out {notes}", "refusing", ("notes",)),
    ("regen-out-int-id", R + " --out {int_id}", "refusing", ("int_id",)),
    ("regen-out-junk-in-middle", R + " --out {junk_in_middle}", "refusing", ("junk_in_middle",)),
    ("regen-out-foreign-last-line", R + " --out {foreign_last_line}", "refusing", ("foreign_last_line",)),
    ("regen-out-one-prompt-no-newline", R + " --out {one_prompt}", "refusing", ("one_prompt",)),
    ("regen-out-not-utf8", R + " --out {binary}", "refusing", ("binary",)),
    # ---- sft: every SFT and optimizer flag, data files
    ("sft-feature-noise-negative", S + " --feature-noise -0.1", "--feature-noise", ()),
    ("sft-steps-0", S + " --steps 0", "--steps", ()),
    ("sft-steps-float", S + " --steps 1.5", "invalid int", ()),
    ("sft-batch-size-0", S + " --batch-size 0", "--batch-size", ()),
    ("sft-grad-accum-0", S + " --grad-accum 0", "--grad-accum", ()),
    ("sft-anchors-0", S + " --anchors-per-seq 0", "--anchors-per-seq", ()),
    ("sft-loss-bogus", S + " --loss mse", "--loss", ()),
    ("sft-save-every-0", S + " --save-every 0", "--save-every", ()),
    ("sft-log-every-0", S + " --log-every 0", "--log-every", ()),
    ("sft-slot-decay-0", S + " --slot-decay 0", "--slot-decay", ()),
    ("sft-max-flops-negative", S + " --max-flops -1", "--max-flops", ()),
    ("sft-seed-huge", S + " --seed 99999999999", "--seed", ()),
    ("sft-lr-0", S + " --optim-lr 0", "--optim-lr", ()),
    ("sft-lr-nan", S + " --optim-lr nan", "--optim-lr", ()),
    ("sft-lr-negative", S + " --optim-lr -1", "--optim-lr", ()),
    ("sft-betas-one", S + " --optim-betas 0.9", "--optim-betas", ()),
    ("sft-betas-above-1", S + " --optim-betas 0.9 1.5", "--optim-betas", ()),
    ("sft-warmup-2", S + " --optim-warmup-fraction 2", "--optim-warmup-fraction", ()),
    ("sft-min-warmup-0", S + " --optim-min-warmup-steps 0", "--optim-min-warmup-steps", ()),
    ("opd-rej-slots-bogus", OPD + " --loss-rej-slots second", "--loss-rej-slots", ()),
    ("sft-min-lr-ratio-negative", S + " --optim-min-lr-ratio -0.1", "--optim-min-lr-ratio", ()),
    ("sft-weight-decay-nan", S + " --optim-weight-decay nan", "--optim-weight-decay", ()),
    ("sft-grad-clip-0", S + " --optim-grad-clip 0", "--optim-grad-clip", ()),
    ("sft-block-size-1", S + " --draft-block-size 1", "--draft-block-size", ()),
    ("sft-no-data-flag", "sft --target {target}", "--data", ()),
    ("sft-missing-data", S + " --data {tmp}/missing.jsonl", "no regenerated data", ()),
    ("sft-data-notes", S + " --data {notes}", "no usable training examples", ("notes",)),
    ("sft-data-outside-vocab", S + " --data {big_vocab}", "outside the target vocabulary", ("big_vocab",)),
    ("sft-out-is-file", S + " --out {notes}", "not a folder", ("notes",)),
    ("sft-data-format-bogus", S + " --data-format xml", "--data-format", ()),
    ("sft-data-max-tokens-1", S + " --data-max-tokens 1", "--data-max-tokens", ()),
    ("sft-data-format-excludes-every-record", S + " --data-format conversations", "unrecognised record 4", ("data",)),
    ("sft-data-no-assistant-turn", S + " --data {chat_no_answer}", "no assistant turn 2", ("chat_no_answer",)),
    ("sft-data-conversations-too-long", S + " --data {chat} --data-max-tokens 4", "too long 2", ("chat",)),
    ("sft-data-token-ids-outside-vocab", S + " --data {ids_big_vocab}", "outside the target vocabulary", ("ids_big_vocab",)),
    ("sft-data-token-ids-bad-mask", S + " --data {ids_bad_mask}", "bad token ids 1", ("ids_bad_mask",)),
    ("sft-trim-loops-without-data", "sft --target {target} --features {tmp}/cache --out {tmp}/sft --trim-loops", "--trim-loops", ()),
    ("sft-report-to-bogus", S + " --report-to mlflow", "invalid choice", ()),
    # ---- --config FILE (a run.yaml): unreadable, unknown keys, wrong types, another command's
    ("sft-config-missing", S + " --config {tmp}/missing.yaml", "cannot read it", ()),
    ("sft-config-not-yaml", S + " --config {config_not_yaml}", "not YAML", ()),
    ("sft-config-not-mapping", S + " --config {config_list}", "not a mapping of sections", ()),
    ("sft-config-unknown-section", S + " --config {config_unknown_section}", "unknown key 'trainer'", ()),
    ("sft-config-unknown-key", S + " --config {config_unknown_key}", "unknown key sft.stepz (not a field of SFTConfig)", ()),
    ("sft-config-unknown-nested-key", S + " --config {config_unknown_nested}", "unknown key sft.optim.learning_rate", ()),
    ("sft-config-wrong-type", S + " --config {config_wrong_type}", "sft.steps must be an integer, got 'ten'", ()),
    ("sft-config-bool-for-int", S + " --config {config_bool_steps}", "sft.steps must be an integer, got True", ()),
    ("sft-config-wrong-list", S + " --config {config_wrong_betas}", "sft.optim.betas must be a list of 2 numbers, got [0.9]", ()),
    ("sft-config-wrong-section-type", S + " --config {config_section_list}", "drafter must be a mapping of DrafterConfig fields", ()),
    ("sft-config-out-of-range", S + " --config {config_steps_0}", "sft: --steps must be at least 1, got 0", ()),
    ("sft-config-unknown-arg", S + " --config {config_unknown_arg}", "unknown key args.bogus", ()),
    ("sft-config-arg-wrong-type", S + " --config {config_arg_type}", "args.trim_loops must be true or false, got 'yes please'", ()),
    ("sft-config-other-command", S + " --config {config_opd}", "records a `draftopd opd` run, not `draftopd sft`", ()),
    # ---- eval
    ("eval-num-prompts-0", E + " --num-prompts 0", "--num-prompts", ()),
    ("eval-max-new-tokens-0", E + " --max-new-tokens 0", "--max-new-tokens", ()),
    ("eval-temperature-nan", E + " --temperature nan", "--temperature", ()),
    ("eval-seed-negative", E + " --seed -3", "--seed", ()),
    ("eval-lookup-only-without-lookup", E + " --num-drafts 0", "--lookup-ngram", ()),
    ("eval-unknown-set", E + " --sets nonsense", "nonsense", ()),
    ("eval-out-directory", E + " --out {folder}", "directory", ()),
    ("eval-unknown-target", "eval --target {tmp}/nothing --sets {prompts}", "unknown target", ()),
    # ---- opd: OPD, loss and optimizer flags
    ("opd-steps-0", OPD + " --steps 0", "--steps", ()),
    ("opd-prompts-per-rollout-0", OPD + " --prompts-per-rollout 0", "--prompts-per-rollout", ()),
    ("opd-rollouts-per-step-0", OPD + " --rollouts-per-step 0", "--rollouts-per-step", ()),
    ("opd-replay-batch-0", OPD + " --replay-batch 0", "--replay-batch", ()),
    ("opd-max-new-tokens-0", OPD + " --max-new-tokens 0", "--max-new-tokens", ()),
    ("opd-temperature-negative", OPD + " --temperature -1", "--temperature", ()),
    ("opd-anchors-bogus", OPD + " --anchors bogus", "--anchors", ()),
    ("opd-save-every-0", OPD + " --save-every 0", "--save-every", ()),
    ("opd-limit-0", OPD + " --limit 0", "--limit", ()),
    ("opd-max-prompt-tokens-0", OPD + " --max-prompt-tokens 0", "--max-prompt-tokens", ()),
    ("opd-gamma-0", OPD + " --loss-gamma 0", "--loss-gamma", ()),
    ("opd-gamma-above-1", OPD + " --loss-gamma 1.5", "--loss-gamma", ()),
    ("opd-loss-mode-bogus", OPD + " --loss-mode approx", "--loss-mode", ()),
    ("opd-acc-direction-bogus", OPD + " --loss-acc-direction sideways", "--loss-acc-direction", ()),
    ("opd-rej-direction-bogus", OPD + " --loss-rej-direction both", "--loss-rej-direction", ()),
    ("opd-aggregation-bogus", OPD + " --loss-aggregation mean", "--loss-aggregation", ()),
    ("opd-lam-acc-nan", OPD + " --loss-lam-acc nan", "--loss-lam-acc", ()),
    ("opd-lams-both-0", OPD + " --loss-lam-acc 0 --loss-lam-rej 0", "cannot both be 0", ()),
    ("opd-clamp-0", OPD + " --loss-clamp 0", "--loss-clamp", ()),
    ("opd-lr-inf", OPD + " --optim-lr inf", "--optim-lr", ()),
    ("opd-missing-prompts", OPD + " --prompts {tmp}/missing.jsonl", "missing file", ()),
    ("opd-missing-drafter", OPD + " --drafter {tmp}/missing", "drafter", ()),
    ("opd-out-is-file", OPD + " --out {notes}", "not a folder", ("notes",)),
    ("opd-config-rollout-wrong-type", OPD + " --config {config_opd_rollout}", "opd.rollout.temperature must be a number, got 'hot'", ()),
    ("opd-config-rollout-lookup", OPD + " --config {config_opd_lookup}", "Draft-OPD rollouts draft every slot", ()),
    # ---- demo and the top level
    ("demo-unknown-ablation", "demo --out {tmp}/demo --ablations nonsense", "unknown ablation", ()),
    ("demo-unknown-flag", "demo --out {tmp}/demo --bogus", "unrecognized arguments", ()),
    ("demo-out-is-file", "demo --out {notes}", "not a folder", ("notes",)),
    ("demo-unknown-target", "demo --out {tmp}/demo --target {tmp}/nothing", "unknown target", ()),
    ("demo-device-bogus", "demo --out {tmp}/demo --device gpu", "--device must be auto, cpu, cuda or cuda:N, got 'gpu'", ()),
    ("demo-dtype-bogus", "demo --out {tmp}/demo --dtype half", "invalid choice", ()),
    # ---- recipe
    ("recipe-device-bogus", "recipe --target {target} --out-dir {tmp}/rec --device cuda:one", "--device must be auto", ()),
    ("recipe-feature-dtype-bogus", "recipe --target {target} --out-dir {tmp}/rec --feature-dtype half", "--feature-dtype", ()),
    (
        "recipe-config-wrong-type",
        "recipe --target {target} --out-dir {tmp}/rec --config {config_recipe}",
        "recipe.eval.decode.max_new_tokens must be an integer, got 1.5",
        (),
    ),
    ("demo-config-unknown-key", "demo --out {tmp}/demo --config {config_demo}", "unknown key experiment.opd.rollout.bogus", ()),
    ("no-command", "", "required", ()),
    ("unknown-command", "bogus", "invalid choice", ()),
]


# --------------------------------------------------------------------------- fixtures


def _config(folder: Path, **change) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


def _drop_tensor(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors.pop("model.layers.1.input_layernorm.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BROKEN_TARGETS = {
    "remote_code": lambda f: _config(f, model_type="my-arch", auto_map={"AutoModelForCausalLM": "modeling_mine.MyModel"}),
    "unknown_type": lambda f: _config(f, model_type="frobnicator"),
    "no_tokenizer": lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")],
    "config_not_json": lambda f: (f / "config.json").write_text("{not json"),
    "bad_field": lambda f: _config(f, hidden_size="abc"),
    "bad_heads": lambda f: _config(f, num_attention_heads=5),
    "no_weights": lambda f: (f / "model.safetensors").unlink(),
    "truncated": lambda f: _truncate(f / "model.safetensors"),
    "garbage": lambda f: (f / "model.safetensors").write_bytes(b"\x00garbage" * 64),
    "missing_tensor": _drop_tensor,
    "shape_mismatch": lambda f: _config(f, vocab_size=100),
}


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, Path]:
    """The tiny target folder, and one copy of it broken in each way of BROKEN_TARGETS."""
    good = save_tiny_target(tmp_path_factory.mktemp("target"))
    found = {"target": good}
    for name, breaker in BROKEN_TARGETS.items():
        folder = tmp_path_factory.mktemp(name)
        shutil.copytree(good, folder, dirs_exist_ok=True)
        breaker(folder)
        found[name] = folder
    return found


BROKEN_DRAFTERS = {  # config.json draftopd_spec changes of a good drafter checkpoint
    "drafter_block_text": {"block_size": "8"},
    "drafter_block_0": {"block_size": 0},
    "drafter_block_negative": {"block_size": -3},
    "drafter_deep_layer": {"target_layer_ids": [1, 9]},
    "drafter_kv_heads": {"num_kv_heads": 3},
    "drafter_rope_text": {"rope_theta": "big"},
    "drafter_mask_outside": {"mask_token_id": 64},
}


@pytest.fixture(scope="module")
def drafters(targets, tmp_path_factory) -> dict[str, Path]:
    """A drafter checkpoint of the tiny target with one bad shape value in its config.json, per BROKEN_DRAFTERS."""
    from draftopd.config import DrafterConfig
    from draftopd.models.drafter import new_drafter, save_drafter
    from draftopd.models.load import load_target

    good = tmp_path_factory.mktemp("drafter")
    save_drafter(new_drafter(load_target(str(targets["target"])), DrafterConfig(block_size=4)), good)
    found = {}
    for name, change in BROKEN_DRAFTERS.items():
        folder = tmp_path_factory.mktemp(name)
        shutil.copytree(good, folder, dirs_exist_ok=True)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "draftopd_spec": {**config["draftopd_spec"], **change}}))
        found[name] = folder
    return found


def _record(rid, prompt=(6, 7), response=(8, 9, 2)) -> str:
    return json.dumps({"id": rid, "source": "t", "prompt_ids": list(prompt), "response_ids": list(response), "finish": "eos"})


@pytest.fixture
def paths(targets, drafters, tmp_path) -> dict[str, str]:
    """Every placeholder of CASES: targets, input files, and files that a bad --out must leave alone."""
    prompts = "\n".join(json.dumps({"prompt": " ".join(f"w{(i * 5 + j) % 50}" for j in range(4))}) for i in range(4)) + "\n"
    files = {
        "prompts.jsonl": prompts,
        "data.jsonl": "".join(_record(f"r{i}", (6 + i, 7), (8, 9 + i, 10)) + "\n" for i in range(4)),
        "big_vocab.jsonl": _record("a") + "\n" + _record("b", response=(8, 1000)) + "\n",
        "notes.txt": "my notes\nline two\n",
        "chat.jsonl": "".join(
            json.dumps({"messages": [{"role": "user", "content": f"w{i} w2"}, {"role": "assistant", "content": "w3 w4 w5"}]}) + "\n"
            for i in range(2)
        ),
        "chat_no_answer.jsonl": "".join(json.dumps({"conversations": [{"from": "human", "value": f"w{i}"}]}) + "\n" for i in range(2)),
        "ids_big_vocab.jsonl": json.dumps({"id": "a", "input_ids": [6, 7, 1000], "loss_mask": [0, 1, 1]}) + "\n",
        "ids_bad_mask.jsonl": json.dumps({"id": "a", "input_ids": [6, 7, 8], "loss_mask": [0, 1]}) + "\n",
        "int_id.jsonl": _record("a") + "\n" + _record(5) + "\n",
        "junk_in_middle.jsonl": _record("a") + "\nnot json\n" + _record("b") + "\n",
        "foreign_last_line.jsonl": _record("a") + "\n" + '{"id": 5}',
        "one_prompt.jsonl": json.dumps({"id": "q1", "prompt": "w1 w2"}),
        "config_not_yaml.yaml": "sft: {steps: [1,\n",
        "config_list.yaml": "- sft\n- opd\n",
        "config_unknown_section.yaml": "command: sft\ntrainer: {steps: 1}\n",
        "config_unknown_key.yaml": "command: sft\nsft: {stepz: 1}\n",
        "config_unknown_nested.yaml": "sft: {optim: {learning_rate: 1e-3}}\n",
        "config_wrong_type.yaml": "sft: {steps: ten}\n",
        "config_bool_steps.yaml": "sft: {steps: true}\n",
        "config_wrong_betas.yaml": "sft: {optim: {betas: [0.9]}}\n",
        "config_section_list.yaml": "drafter: [1, 2]\n",
        "config_steps_0.yaml": "sft: {steps: 0}\n",
        "config_unknown_arg.yaml": "args: {bogus: 1}\n",
        "config_arg_type.yaml": "args: {trim_loops: yes please}\n",
        "config_opd.yaml": "command: opd\nopd: {steps: 1}\n",
        "config_opd_rollout.yaml": "opd: {rollout: {temperature: hot}}\n",
        "config_opd_lookup.yaml": "opd: {rollout: {lookup_ngram: 2}}\n",
        "config_recipe.yaml": "recipe: {eval: {decode: {max_new_tokens: 1.5}}}\n",
        "config_demo.yaml": "experiment: {opd: {rollout: {bogus: 1}}}\n",
    }
    found = {name: str(path) for name, path in {**targets, **drafters}.items()}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        found[name.split(".")[0]] = str(tmp_path / name)
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00binary\n")
    found["binary"] = str(tmp_path / "binary.jsonl")
    for name in ("folder", "read_only"):
        (tmp_path / name).mkdir()
        found[name] = str(tmp_path / name)
    os.chmod(tmp_path / "read_only", 0o500)
    found["tmp"] = str(tmp_path)
    return found


def argv(command: str, paths: dict[str, str]) -> list[str]:
    return [word.format(**paths) for word in command.split()]


def snapshot(paths: dict[str, str], keys: tuple[str, ...]) -> dict[str, bytes]:
    return {k: Path(paths[k]).read_bytes() for k in keys}


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("command", list(BASES.values()), ids=list(BASES))
def test_base_commands_succeed(command, paths, capfd):
    """Each case is its base command plus one bad flag: the bases themselves must run."""
    rc = main(argv(command, paths))
    assert rc == 0, capfd.readouterr().err


@pytest.mark.parametrize("case_id, command, fragment, keep", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case_id, command, fragment, keep, paths, capfd):
    if case_id == "regen-out-read-only" and os.geteuid() == 0:
        pytest.skip("root writes through permission bits")
    before = snapshot(paths, keep)
    rc = main(argv(command, paths))
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("draftopd: error: "), err
    assert fragment in lines[0], lines[0]
    assert snapshot(paths, keep) == before, "a refused command changed a file"


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_missing_tracker_is_one_line(tracker, paths, capfd, monkeypatch):
    """--report-to a tracker whose package is not installed: one line naming the package, before any model loads."""
    monkeypatch.setitem(sys.modules, tracker, None)  # what an uninstalled package looks like to importlib
    rc = main(argv(S + f" --report-to {tracker}", paths))
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and lines == [f"draftopd: error: --report-to {tracker}: the {tracker} package is not installed (pip install {tracker})"]
    assert not Path(paths["tmp"], "sft").exists()


def test_table_covers_every_command():
    commands = {command.split()[0] for _, command, _, _ in CASES if command}
    assert commands == {"generate", "regenerate", "sft", "eval", "opd", "demo", "recipe", "bogus"}
    assert len({c[0] for c in CASES}) == len(CASES) >= 100


# --------------------------------------------------------------------------- configs, built directly


def test_every_default_passes_validation():
    from draftopd.config import DecodeConfig, DrafterConfig, EvalConfig, OptimConfig, PromptConfig, SFTConfig
    from draftopd.experiment import ExperimentConfig
    from draftopd.train.losses import LossConfig
    from draftopd.train.opd import OPDConfig

    for cls in (DrafterConfig, PromptConfig, DecodeConfig, OptimConfig, SFTConfig, EvalConfig, LossConfig, OPDConfig, ExperimentConfig):
        cls()


@pytest.mark.parametrize(
    "module, name, change, flag",
    [
        ("config", "DrafterConfig", {"target_layer_ids": ()}, "--draft-target-layer-ids"),
        ("config", "DecodeConfig", {"temperature": float("nan")}, "--temperature"),
        ("config", "DecodeConfig", {"max_new_tokens": 2.5}, "--max-new-tokens must be an integer"),
        ("config", "OptimConfig", {"lr": float("inf")}, "--optim-lr"),
        ("config", "SFTConfig", {"steps": 0}, "--steps must be at least 1, got 0"),
        ("config", "PromptConfig", {"prompts": " "}, "--prompts"),
        ("config", "FeatureConfig", {"trim_loops": True}, "--trim-loops applies to regenerated data"),
        ("config", "EvalConfig", {"sets": ("",)}, "--sets"),
        ("train.losses", "LossConfig", {"gamma": float("nan")}, "--loss-gamma"),
        ("train.opd", "OPDConfig", {"anchors": "both"}, "--anchors"),
        ("recipe", "RecipeConfig", {"feature_dtype": "float16"}, "--feature-dtype"),
        ("recipe", "RecipeConfig", {"eval_dtype": "half"}, "--eval-dtype"),
    ],
)
def test_configs_check_their_values_when_built(module, name, change, flag):
    import importlib

    from draftopd.config import ConfigError

    cls = getattr(importlib.import_module(f"draftopd.{module}"), name)
    with pytest.raises(ConfigError, match=flag.replace("(", r"\(")):
        cls(**change)
