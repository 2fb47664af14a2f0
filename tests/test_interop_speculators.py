"""Export to speculators' format (`speculators==0.9.0`, the folder vLLM serves): the folder holds exactly the files,
names, shapes, values and config the exporter promises (checked here without speculators, which pins an older
transformers); what cannot be served exactly is refused with one line; and, opt-in, speculators' own loader uses every
tensor and its forward gives our logits (benchmarks/check_speculators_export.py run in a separate virtual environment)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import make_drafter
from safetensors import safe_open
from safetensors.torch import load_file

from draftopd.interop.speculators import check_file, export_speculators, write_check_file
from draftopd.models.drafter import DrafterError
from draftopd.models.load import tiny_target
from draftopd.models.target import Target

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 6
ROOT = Path(__file__).resolve().parent.parent
SPECULATORS_PYTHON = Path(os.environ.get("DRAFTOPD_SPECULATORS_PYTHON", "/work/.spec-venv/bin/python"))
EAGLE3_LAYER = [
    "input_layernorm",
    "hidden_norm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
DFLASH_LAYER = [
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.q_norm",
    "self_attn.k_norm",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def exportable(target, arch: str, vocab: int | None = 16, seed: int = 0, noise: float = 0.1, **cfg):
    """A servable drafter with every weight perturbed (a swapped or re-initialised tensor shows in the logits) and, when
    reduced, a draft vocabulary of scattered target ids. EAGLE-3 fed target layers 2, 0, 1 (not ascending: the export
    sorts them); DFlash two layers fed 2 then 0, MASK = the row before EOS. A rope theta and eps unlike the defaults."""
    base = {
        "eagle3": dict(arch="eagle3", target_layer_ids=(2, 0, 1)),
        "dflash": dict(num_layers=2, target_layer_ids=(2, 0), mask_token_id=target.vocab_size - 2),
    }[arch]
    cfg = {**base, "vocab_size": vocab, "rope_theta": 1234.0, "rms_norm_eps": 1e-5, "final_norm_init": 1.0, **cfg}
    drafter = make_drafter(target, block_size=BLOCK, seed=seed, **cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    if vocab is not None:
        drafter.set_draft_vocab(torch.randperm(target.vocab_size, generator=g)[:vocab])
    return drafter


def draft_ids(drafter) -> torch.Tensor:
    return drafter.draft_to_target(torch.arange(drafter.spec.draft_vocab_size))


def read_export(folder: Path) -> tuple[dict, dict]:
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    return json.loads((folder / "config.json").read_text()), load_file(str(folder / "model.safetensors"))


# ---- what the folder holds --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vocab", [16, None], ids=["reduced vocabulary", "full vocabulary"])
def test_eagle3_export_names_shapes_values_and_config(vocab, llama_target, tmp_path):
    target, (h, v) = llama_target, (llama_target.hidden_size, llama_target.vocab_size)
    drafter = exportable(target, "eagle3", vocab=vocab)
    export_speculators(drafter, tmp_path, target, verifier_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    config, weights = read_export(tmp_path)
    s = drafter.spec
    q, kv, v_draft = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, vocab or v
    shapes = {
        "fc.weight": (h, 3 * h),
        "norm.weight": (h,),
        "lm_head.weight": (v_draft, h),
        "embed_tokens.weight": (v, h),
        "layers.0.input_layernorm.weight": (h,),
        "layers.0.hidden_norm.weight": (h,),
        "layers.0.post_attention_layernorm.weight": (h,),
        "layers.0.self_attn.q_proj.weight": (q, 2 * h),
        "layers.0.self_attn.k_proj.weight": (kv, 2 * h),  # q/k/v take [embedding, hidden]
        "layers.0.self_attn.v_proj.weight": (kv, 2 * h),
        "layers.0.self_attn.o_proj.weight": (h, q),
        "layers.0.mlp.gate_proj.weight": (s.intermediate_size, h),
        "layers.0.mlp.up_proj.weight": (s.intermediate_size, h),
        "layers.0.mlp.down_proj.weight": (h, s.intermediate_size),
    }
    if vocab:
        shapes |= {"d2t": (vocab,), "t2d": (v,)}
    assert {k: tuple(t.shape) for k, t in weights.items()} == shapes
    assert all(t.dtype == torch.float32 for k, t in weights.items() if k not in ("d2t", "t2d"))

    ours = drafter.state_dict()
    for name in EAGLE3_LAYER:
        assert torch.equal(weights[f"layers.0.{name}.weight"], ours[f"layers.0.{name.split('.')[-1]}.weight"])
    assert torch.equal(weights["norm.weight"], ours["norm.weight"])
    assert torch.equal(weights["embed_tokens.weight"], target.model.get_input_embeddings().weight)
    head = target.model.get_output_embeddings().weight
    if vocab:  # speculators' d2t is an offset and t2d a bool mask, as ours; lm_head = the rows d2t selects, sorted
        assert weights["d2t"].dtype == torch.int64 and weights["t2d"].dtype == torch.bool
        assert torch.equal(weights["d2t"], drafter.d2t) and torch.equal(weights["t2d"], drafter.t2d) and int(weights["t2d"].sum()) == vocab
        assert torch.equal(torch.arange(vocab) + weights["d2t"], weights["t2d"].nonzero()[:, 0])
        assert torch.equal(weights["lm_head.weight"], head[draft_ids(drafter)]) and torch.equal(
            weights["lm_head.weight"], drafter.head_weight
        )
    else:
        assert torch.equal(weights["lm_head.weight"], head)

    layer = config.pop("transformer_layer_config")
    assert config == {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": "0.9.0",
        "draft_vocab_size": v_draft,
        "target_hidden_size": None,
        "dtype": "float32",
        "eagle_aux_hidden_state_layer_ids": [1, 2, 3],  # output ids 2, 0, 1 -> capture ids, ascending
        "norm_before_residual": False,
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "embed_requires_grad": False,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [
                {"proposal_type": "greedy", "speculative_tokens": BLOCK - 1, "verifier_accept_k": 1, "accept_tolerance": 0.0}
            ],
            "verifier": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct", "architectures": ["LlamaForCausalLM"]},
        },
    }
    assert layer["model_type"] == "llama" and layer["num_hidden_layers"] == 1  # a Llama layer: no q/k norm
    assert {
        k: layer[k] for k in ("vocab_size", "hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads", "rms_norm_eps")
    } == {
        "vocab_size": v,
        "hidden_size": h,
        "head_dim": s.head_dim,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "rms_norm_eps": 1e-5,
    }
    assert layer["rope_parameters"] == {"rope_type": "default", "rope_theta": 1234.0} and layer["rope_theta"] == 1234.0
    assert not layer["attention_bias"] and not layer["mlp_bias"] and layer["hidden_act"] == "silu"


@torch.no_grad()
def test_fc_blocks_follow_the_sorted_layer_ids(llama_target, tmp_path):
    """vLLM concatenates the captured layers in ascending order: the exported fc on those features = ours on our order."""
    drafter = exportable(llama_target, "eagle3")
    export_speculators(drafter, tmp_path, llama_target)
    _, weights = read_export(tmp_path)
    tokens, valid = torch.randint(0, 63, (2, 9), generator=torch.Generator().manual_seed(0)), torch.ones(2, 9, dtype=torch.bool)
    ours = llama_target.score(tokens, valid, drafter.spec.target_layer_ids).features
    ascending = llama_target.score(tokens, valid, (0, 1, 2)).features
    assert not torch.equal(weights["fc.weight"], drafter.fc.weight)
    torch.testing.assert_close(ascending @ weights["fc.weight"].T, drafter.fc(ours), atol=1e-6, rtol=0)


@pytest.mark.parametrize("vocab", [16, None], ids=["reduced vocabulary", "full vocabulary"])
def test_dflash_export_names_shapes_values_and_config(vocab, qwen3_target, tmp_path):
    target, (h, v) = qwen3_target, (qwen3_target.hidden_size, qwen3_target.vocab_size)
    drafter = exportable(target, "dflash", vocab=vocab)
    export_speculators(drafter, tmp_path, target)
    config, weights = read_export(tmp_path)
    s = drafter.spec
    names = {"fc.weight", "hidden_norm.weight", "norm.weight"} | {f"layers.{i}.{n}.weight" for i in range(2) for n in DFLASH_LAYER}
    names |= {"lm_head.weight", "d2t", "t2d"} if vocab else set()  # a full head and the embedding come from the verifier
    assert weights.keys() == names
    assert weights["fc.weight"].shape == (h, 2 * h) and weights["layers.1.self_attn.q_proj.weight"].shape == (s.num_heads * s.head_dim, h)
    assert weights["layers.0.self_attn.k_norm.weight"].shape == (s.head_dim,)
    ours = drafter.state_dict()
    assert all(torch.equal(weights[f"layers.1.{n}.weight"], ours[f"layers.1.{n.split('.')[-1]}.weight"]) for n in DFLASH_LAYER)
    assert torch.equal(weights["fc.weight"], torch.cat([drafter.fc.weight[:, h:], drafter.fc.weight[:, :h]], 1))  # ids 2, 0 -> 0, 2
    if vocab:
        assert torch.equal(weights["lm_head.weight"], target.model.get_output_embeddings().weight[draft_ids(drafter)])
    layer = config.pop("transformer_layer_config")
    assert {
        k: config[k]
        for k in (
            "architectures",
            "speculators_model_type",
            "draft_vocab_size",
            "block_size",
            "aux_hidden_state_layer_ids",
            "mask_token_id",
            "sample_from_anchor",
            "sliding_window_non_causal",
        )
    } == {
        "architectures": ["DFlashSpeculator"],
        "speculators_model_type": "dflash",
        "draft_vocab_size": vocab or v,
        "block_size": BLOCK,
        "aux_hidden_state_layer_ids": [1, 3],
        "mask_token_id": v - 2,
        "sample_from_anchor": False,
        "sliding_window_non_causal": False,
    }
    assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == BLOCK - 1
    assert config["speculators_config"]["verifier"] == {"name_or_path": None, "architectures": ["Qwen3ForCausalLM"]}  # built in memory
    assert layer["model_type"] == "qwen3" and layer["num_hidden_layers"] == 2 and layer["head_dim"] == s.head_dim
    assert layer["layer_types"] == ["full_attention"] * 2 and layer["use_sliding_window"] is False


def test_bfloat16_drafter_exports_bfloat16_weights_and_integer_maps(llama_target, tmp_path):
    drafter = exportable(llama_target, "eagle3").to(torch.bfloat16)
    export_speculators(drafter, tmp_path, llama_target)
    config, weights = read_export(tmp_path)
    assert config["dtype"] == config["transformer_layer_config"]["dtype"] == "bfloat16"
    assert {t.dtype for k, t in weights.items() if k not in ("d2t", "t2d")} == {torch.bfloat16}
    assert weights["d2t"].dtype == torch.int64 and weights["t2d"].dtype == torch.bool


def test_verifier_folder_is_checked_and_recorded(llama_target, tmp_path):
    llama_target.model.save_pretrained(tmp_path / "target")
    export_speculators(exportable(llama_target, "eagle3"), tmp_path / "out", llama_target, verifier_path=tmp_path / "target")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["speculators_config"]["verifier"] == {
        "name_or_path": str((tmp_path / "target").resolve()),
        "architectures": ["LlamaForCausalLM"],
    }
    hub = Target(llama_target.model, None, name="org/some-target")  # how load_target names a hub target
    export_speculators(exportable(llama_target, "eagle3"), tmp_path / "hub", hub)
    assert json.loads((tmp_path / "hub" / "config.json").read_text())["speculators_config"]["verifier"]["name_or_path"] == "org/some-target"


def test_check_file_holds_inputs_in_export_order(llama_target, tmp_path):
    drafter = exportable(llama_target, "eagle3")
    path = write_check_file(drafter, llama_target, tmp_path / "export", length=20)
    assert path == check_file(tmp_path / "export") == tmp_path / "export.check.safetensors"
    check = load_file(str(path))
    steps = BLOCK - 1
    assert check["tokens"].shape == (21,) and check["features"].shape == (1, 20, 3 * llama_target.hidden_size)
    assert torch.equal(check["anchors"], torch.arange(1, 20 - steps + 2)) and check["logits"].shape == (20 - steps + 1, steps, 16)
    ascending = llama_target.score(check["tokens"][None, :20], torch.ones(1, 20, dtype=torch.bool), (0, 1, 2)).features
    assert torch.equal(check["features"], ascending)


# ---- refusals ---------------------------------------------------------------------------------------------------------
REFUSALS = {
    "last target layer": ("eagle3", dict(target_layer_ids=(0, 1, 3)), "target layer id 3 is the target's last layer"),
    "a layer twice": ("eagle3", dict(target_layer_ids=(1, 1, 0)), r"name a layer twice: vLLM captures each layer once"),
    "two EAGLE-3 layers": ("eagle3", dict(target_layer_ids=(0, 2)), "vLLM's EAGLE-3 fc takes exactly 3"),
    "learned MASK": ("dflash", dict(mask_token_id=None, learned_mask=True), "learned MASK"),
    "DFlash last layer": ("dflash", dict(target_layer_ids=(3, 0)), "last layer"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_export_refuses_what_it_cannot_write_exactly(case, llama_target, tmp_path):
    arch, cfg, message = REFUSALS[case]
    with pytest.raises(DrafterError, match=message) as err:
        export_speculators(exportable(llama_target, arch, **cfg), tmp_path / "out", llama_target)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_export_refuses_an_unset_vocabulary_another_target_or_verifier(llama_target, small_vocab_target, tmp_path):
    small_vocab_target.model.save_pretrained(tmp_path / "small")
    unset = make_drafter(llama_target, block_size=BLOCK, arch="eagle3", target_layer_ids=(0, 1, 2), vocab_size=16)
    cases = [
        (unset, llama_target, None, r"draft vocabulary is not set \(t2d marks 0 target ids for 16 draft ids\)"),
        (exportable(llama_target, "eagle3"), small_vocab_target, None, "does not match target"),
        (exportable(llama_target, "eagle3"), llama_target, tmp_path / "small", "is not the drafter's target: vocab_size 8 vs target 64"),
        (exportable(llama_target, "dflash"), llama_target, tmp_path / "nowhere", "no such folder"),
    ]
    for drafter, target, verifier, message in cases:
        with pytest.raises(DrafterError, match=message) as err:
            export_speculators(drafter, tmp_path / "out", target, verifier_path=verifier)
        assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


# ---- opt-in: speculators' own loader and forward ------------------------------------------------------------------------
def speculators_python() -> Path:
    if "DRAFTOPD_SPECULATORS_PYTHON" not in os.environ and os.environ.get("CI"):
        pytest.skip("opt-in: set DRAFTOPD_SPECULATORS_PYTHON to a venv's python with speculators==0.9.0 (skipped in CI)")
    if not SPECULATORS_PYTHON.exists():
        pytest.skip(
            f"no speculators venv at {SPECULATORS_PYTHON} (see benchmarks/check_speculators_export.py; or set DRAFTOPD_SPECULATORS_PYTHON)"
        )
    return SPECULATORS_PYTHON


def test_speculators_loads_every_tensor_and_computes_our_logits(tmp_path):
    """Four exports (EAGLE-3 and DFlash, reduced and full vocabulary) on a sharp target (large logits): speculators'
    loader uses every tensor and its forward agrees with ours. A control export that says `norm_before_residual: true`
    (what vLLM assumes when the key is missing) must fail: the check sees a change of computation."""
    python = speculators_python()
    target = tiny_target("qwen3", sharpness=30.0)
    target.model.save_pretrained(tmp_path / "target")
    folders = []
    for arch in ("eagle3", "dflash"):
        for vocab in (16, None):
            folder = tmp_path / f"{arch}-{vocab or 'full'}"
            drafter = exportable(target, arch, vocab=vocab)
            export_speculators(drafter, folder, target, verifier_path=tmp_path / "target")
            write_check_file(drafter, target, folder)
            folders.append(folder)
    control = tmp_path / "control"
    drafter = exportable(target, "eagle3")
    export_speculators(drafter, control, target, verifier_path=tmp_path / "target")
    write_check_file(drafter, target, control)
    config = json.loads((control / "config.json").read_text())
    (control / "config.json").write_text(json.dumps({**config, "norm_before_residual": True}))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [str(python), str(ROOT / "benchmarks" / "check_speculators_export.py"), *map(str, folders + [control])],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    print(run.stdout)  # the script's report, shown with -s
    blocks = split_blocks(run.stdout.splitlines(), folders + [control])
    assert run.returncode == 1, run.stderr[-2000:]
    for folder in folders:
        assert blocks[folder][-1] == "OK", "\n".join(blocks[folder])
        assert any("argmax agrees on 100.0%" in line for line in blocks[folder])
    assert blocks[control][-1] == "FAIL" and any("logits differ" in line for line in blocks[control])


def split_blocks(lines: list[str], folders: list[Path]) -> dict[Path, list[str]]:
    """The script's report, one block of lines per export (each starts with the export's path)."""
    blocks, current = {}, None
    for line in lines:
        head = next((f for f in folders if line.startswith(f"{f} (")), None)
        if head is not None:
            current = blocks[head] = []
        if current is not None:
            current.append(line)
    return blocks
