"""Import from speculators' format (`draftopd import --format speculators`), the inverse of the export: export -> import
computes the same drafter (the fc blocks come back in the export's ascending layer order, so the logits are compared,
not only the weights) and re-exports to the same folder; the CLI writes a checkpoint `load_drafter` reads; a folder that
is not ours to read (another format, corrupt, another target, an option our drafter does not compute, wrong weights) is
one error line, exit status 2, nothing written."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, run, save_tiny_target
from test_interop_speculators import exportable, read_export, speculators_python

from draftopd.interop.speculators import export_speculators, import_speculators, write_check_file
from draftopd.models.drafter import DrafterError, load_drafter, save_drafter
from draftopd.models.load import load_target, tiny_target

pytestmark = pytest.mark.usefixtures("one_thread")
CASES = [("eagle3", "llama_target", 16), ("eagle3", "llama_target", None), ("dflash", "qwen3_target", 16), ("dflash", "qwen3_target", None)]
IDS = ["eagle3 reduced", "eagle3 full", "dflash reduced", "dflash full"]


def check_logits(drafter, target, folder: Path) -> torch.Tensor:
    """Our draft-vocabulary logits on random text (each drafter fed its own target layers, in its own order)."""
    return load_file(str(write_check_file(drafter, target, folder, length=16)))["logits"]


# ---- export -> import -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, target_fixture, vocab", CASES, ids=IDS)
@torch.no_grad()
def test_round_trip_computes_the_same_drafter(arch, target_fixture, vocab, request, tmp_path):
    target = request.getfixturevalue(target_fixture)
    drafter = exportable(target, arch, vocab=vocab)
    export_speculators(drafter, tmp_path / "export", target)
    back = import_speculators(tmp_path / "export", target)
    ascending = tuple(sorted(drafter.spec.target_layer_ids))
    assert drafter.spec.target_layer_ids != ascending  # given unsorted: the import reorders fc's blocks
    assert back.spec == dataclasses.replace(drafter.spec, target_layer_ids=ascending) and not back.training
    before, after = drafter.state_dict(), back.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before if k != "fc.weight")
    assert all(t.dtype == torch.float32 for t in back.parameters())
    if vocab:
        assert torch.equal(back.head_weight, drafter.head_weight)
    torch.testing.assert_close(
        check_logits(back, target, tmp_path / "b"), check_logits(drafter, target, tmp_path / "a"), rtol=1e-5, atol=1e-5
    )  # the same fc sum in another order: equal up to rounding
    export_speculators(back, tmp_path / "again", target)
    (config, weights), (config2, weights2) = read_export(tmp_path / "export"), read_export(tmp_path / "again")
    assert config2 == config and weights2.keys() == weights.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)


def test_speculators_own_architectures_name_imports(qwen3_target, tmp_path):
    """speculators' save_pretrained writes the model class as architectures (DFlashDraftModel: also the name z-lab's
    reference format uses, told apart by speculators_model_type)."""
    export_speculators(exportable(qwen3_target, "dflash"), tmp_path, qwen3_target)
    edit(tmp_path, lambda c: c.update(architectures=["DFlashDraftModel"]))
    assert import_speculators(tmp_path, qwen3_target).spec.arch == "dflash"
    edit(tmp_path, lambda c: c.update(architectures=["Eagle3DraftModel"]))
    with pytest.raises(DrafterError, match="architectures \\['Eagle3DraftModel'\\]"):
        import_speculators(tmp_path, qwen3_target)


def test_bfloat16_export_imports_in_float32(llama_target, tmp_path):
    drafter = exportable(llama_target, "eagle3").to(torch.bfloat16)
    export_speculators(drafter, tmp_path, llama_target)
    back = import_speculators(tmp_path, llama_target)
    assert all(t.dtype == torch.float32 for t in back.parameters())
    assert torch.equal(back.norm.weight, drafter.norm.weight.float())


def test_missing_eagle3_layer_ids_mean_the_default_capture_ids(tmp_path):
    """speculators and vLLM capture [2, N/2, N-3] when the list is absent: output ids 1, 3, 4 of an 8-layer target."""
    target = tiny_target("llama", num_layers=8)
    export_speculators(exportable(target, "eagle3", target_layer_ids=(4, 1, 3)), tmp_path, target)
    edit(tmp_path, lambda c: c.pop("eagle_aux_hidden_state_layer_ids"))
    assert import_speculators(tmp_path, target).spec.target_layer_ids == (1, 3, 4)


# ---- the CLI ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return save_tiny_target(tmp_path_factory.mktemp("tiny-target"))


@pytest.fixture(scope="module")
def exported(target_dir, tmp_path_factory) -> Path:
    """An EAGLE-3 export (reduced vocabulary) of a drafter of the saved target, recording the target's folder."""
    folder = tmp_path_factory.mktemp("exported") / "spec"
    target = load_target(str(target_dir))
    export_speculators(exportable(target, "eagle3"), folder, target, verifier_path=target_dir)
    return folder


def test_cli_import_writes_a_checkpoint_load_drafter_reads(target_dir, exported, tmp_path, capsys):
    rc, out, err = run(
        capsys, "import", "--format", "speculators", "--target", target_dir, "--from", exported, "--out", tmp_path / "back", "--json"
    )
    assert rc == 0, err
    assert json.loads(out) == {
        "checkpoint": str(tmp_path / "back"),
        "arch": "eagle3",
        "block_size": 6,
        "target_layer_ids": [0, 1, 2],
        "mask_token_id": None,
    }
    target = load_target(str(target_dir))
    back, direct = load_drafter(tmp_path / "back", target, "eagle3"), import_speculators(exported, target)
    assert all(t.dtype == torch.float32 for t in direct.parameters())  # on a bfloat16 target (--dtype auto on this CPU) too
    assert back.spec == direct.spec and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), direct.state_dict().values()))
    assert json.loads((tmp_path / "back" / "config.json").read_text())["format"] == "speculators"


def edit(folder: Path, change) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, change) -> None:
    weights = load_file(str(folder / "model.safetensors"))
    change(weights)
    save_file(weights, str(folder / "model.safetensors"))


def other_verifier(folder: Path) -> None:
    tiny_target("llama", vocab_size=8).model.save_pretrained(folder.parent / "other")
    edit(folder, lambda c: c["speculators_config"]["verifier"].update(name_or_path=str(folder.parent / "other")))


CLI_REFUSALS = {
    "our own checkpoint": (
        lambda f: save_drafter(exportable(tiny_target(), "eagle3"), f),
        "is not a speculators DFlash or EAGLE-3 drafter: speculators_model_type None",
    ),
    "no config": (lambda f: (f / "config.json").unlink(), "no speculators drafter at"),
    "corrupt config.json": (lambda f: (f / "config.json").write_text("{"), "corrupt speculators drafter at"),
    "another vocabulary": (lambda f: edit(f, lambda c: c["transformer_layer_config"].update(vocab_size=80)), "does not match target"),
    "another hidden size": (
        lambda f: edit(f, lambda c: c["transformer_layer_config"].update(hidden_size=48)),
        "hidden_size 48 vs target 32",
    ),
    "verifier of another shape": (other_verifier, "is not the drafter's target: vocab_size 8 vs target 64"),
    "norm_before_residual": (
        lambda f: edit(f, lambda c: c.update(norm_before_residual=True)),
        "does not compute: norm_before_residual=True",
    ),
    "missing weight": (
        lambda f: edit_weights(f, lambda w: w.pop("layers.0.mlp.up_proj.weight")),
        r"missing ['layers.0.mlp.up_proj.weight']",
    ),
    "wrong-shape weight": (
        lambda f: edit_weights(f, lambda w: w.update({"fc.weight": w["fc.weight"][:, :64].contiguous()})),
        "wrong shape",
    ),
}


@pytest.mark.parametrize("case", CLI_REFUSALS)
def test_cli_import_refuses_with_one_line_and_writes_nothing(case, target_dir, exported, tmp_path, capsys):
    damage, message = CLI_REFUSALS[case]
    folder = tmp_path / "spec"
    shutil.copytree(exported, folder)
    damage(folder)
    rc, out, err = run(capsys, "import", "--format", "speculators", "--target", target_dir, "--from", folder, "--out", tmp_path / "back")
    assert_one_line_error(rc, err, message)
    assert out == "" and not (tmp_path / "back").exists()


# ---- refusals, in the library -------------------------------------------------------------------------------------------
def rename(weights, old, new):
    weights[new] = weights.pop(old)


def scale(weights, name):
    weights[name] = weights[name] * 2


def swap_draft_ids(weights):
    """Draft ids 0 and 1 swapped: a d2t whose target ids are not ascending (set_draft_vocab would sort them)."""
    ids = torch.arange(16) + weights["d2t"]
    weights["d2t"] = ids[[1, 0, *range(2, 16)]] - torch.arange(16)


REFUSALS = {
    "norm_before_residual missing": (
        "eagle3",
        lambda f: edit(f, lambda c: c.pop("norm_before_residual")),
        "does not compute: norm_before_residual='missing'",
    ),
    "fc_norm": (
        "eagle3",
        lambda f: edit(f, lambda c: c.update(fc_norm=True, norm_output=True)),
        "does not compute: fc_norm=True, norm_output=True",
    ),
    "qwen3 EAGLE-3 layer": (
        "eagle3",
        lambda f: edit(f, lambda c: c["transformer_layer_config"].update(model_type="qwen3")),
        "model_type='qwen3'",
    ),
    "rope scaling": (
        "dflash",
        lambda f: edit(f, lambda c: c["transformer_layer_config"]["rope_parameters"].update(rope_type="yarn")),
        r"rope_scaling=\['yarn'\]",
    ),
    "sample_from_anchor": (
        "dflash",
        lambda f: edit(f, lambda c: c.update(sample_from_anchor=True, sliding_window_non_causal=True)),
        "sample_from_anchor=True, sliding_window_non_causal=True",
    ),
    "sliding layer": (
        "dflash",
        lambda f: edit(f, lambda c: c["transformer_layer_config"].update(layer_types=["sliding_attention"] * 2)),
        r"layer_types=\['sliding_attention'\]",
    ),
    "gelu": ("dflash", lambda f: edit(f, lambda c: c["transformer_layer_config"].update(hidden_act="gelu")), "hidden_act='gelu'"),
    "two EAGLE-3 layers": (
        "eagle3",
        lambda f: edit(f, lambda c: c["transformer_layer_config"].update(num_hidden_layers=2)),
        "EAGLE-3 drafter of 2 decoder layers",
    ),
    "target_hidden_size": ("eagle3", lambda f: edit(f, lambda c: c.update(target_hidden_size=64)), "target of hidden size 64, not 32"),
    "capture id 0": ("dflash", lambda f: edit(f, lambda c: c.update(aux_hidden_state_layer_ids=[0, 2])), r"capture ids \[0, 2\]"),
    "capture id N": ("eagle3", lambda f: edit(f, lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 2, 4])), "capture ids 1..3"),
    "no head_dim": ("eagle3", lambda f: edit(f, lambda c: c["transformer_layer_config"].pop("head_dim")), "lacks 'head_dim'"),
    "no DFlash ids": ("dflash", lambda f: edit(f, lambda c: c.pop("aux_hidden_state_layer_ids")), "lacks 'aux_hidden_state_layer_ids'"),
    "no MASK": ("dflash", lambda f: edit(f, lambda c: c.update(mask_token_id=None)), "mask_token_id None"),
    "draft vocabulary 0": ("eagle3", lambda f: edit(f, lambda c: c.update(draft_vocab_size=0)), r"draft_vocab_size 0 outside \[1, 64\]"),
    "bad value": ("dflash", lambda f: edit(f, lambda c: c["transformer_layer_config"].update(hidden_size="wide")), "bad value"),
    "own head": ("eagle3", lambda f: edit_weights(f, lambda w: scale(w, "lm_head.weight")), "has its own head"),
    "own embedding": ("eagle3", lambda f: edit_weights(f, lambda w: scale(w, "embed_tokens.weight")), "has its own embedding"),
    "head of another size": (
        "dflash",
        lambda f: edit_weights(f, lambda w: w.update({"lm_head.weight": w["lm_head.weight"][:8]})),
        r"lm_head.weight \(8, 32\), the target's head \(16, 32\)",
    ),
    "our names": (
        "dflash",
        lambda f: edit_weights(f, lambda w: rename(w, "layers.0.self_attn.q_proj.weight", "layers.0.q_proj.weight")),
        r"missing \['layers.0.self_attn.q_proj.weight'\], unexpected \['layers.0.q_proj.weight'\]",
    ),
    "d2t unsorted": ("eagle3", lambda f: edit_weights(f, swap_draft_ids), "d2t and t2d that disagree"),
    "t2d off by one": ("dflash", lambda f: edit_weights(f, lambda w: w.update(t2d=w["t2d"].roll(1))), "d2t and t2d that disagree"),
    "d2t of another size": ("eagle3", lambda f: edit_weights(f, lambda w: w.update(d2t=w["d2t"][:15].contiguous())), "d2t \\(15,\\)"),
    "truncated weights": (
        "eagle3",
        lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]),
        "corrupt speculators drafter",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_import_refuses(case, llama_target, tmp_path):
    arch, damage, message = REFUSALS[case]
    export_speculators(exportable(llama_target, arch), tmp_path, llama_target)
    damage(tmp_path)
    with pytest.raises(DrafterError, match=message) as err:
        import_speculators(tmp_path, llama_target)
    assert "\n" not in str(err.value)


# ---- opt-in: folders speculators itself saved -----------------------------------------------------------------------------
RESAVE = """import sys
from speculators import SpeculatorModel
for source, out in zip(sys.argv[1::2], sys.argv[2::2]):
    SpeculatorModel.from_pretrained(source).save_pretrained(out)
"""


@torch.no_grad()
def test_folders_speculators_saves_import_to_the_same_drafter(tmp_path):
    """Our four exports loaded by speculators (the verifier filling what the loader takes from it) and saved again by its
    own save_pretrained (other architectures name, its own key set): each imports to a drafter computing our logits."""
    python = speculators_python()
    target = tiny_target("qwen3")
    target.model.save_pretrained(tmp_path / "target")
    drafters = {f"{arch}-{vocab or 'full'}": exportable(target, arch, vocab=vocab) for arch in ("eagle3", "dflash") for vocab in (16, None)}
    argv = []
    for name, drafter in drafters.items():
        export_speculators(drafter, tmp_path / name, target, verifier_path=tmp_path / "target")
        argv += [str(tmp_path / name), str(tmp_path / f"{name}-saved")]
    run = subprocess.run(
        [str(python), "-c", RESAVE, *argv], capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert run.returncode == 0, run.stderr[-2000:]
    for name, drafter in drafters.items():
        back = import_speculators(tmp_path / f"{name}-saved", target)
        torch.testing.assert_close(
            check_logits(back, target, tmp_path / f"{name}-b"), check_logits(drafter, target, tmp_path / f"{name}-a"), rtol=1e-5, atol=1e-5
        )
