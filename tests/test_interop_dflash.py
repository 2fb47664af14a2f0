"""Interop with z-lab's reference DFlash (`dflash==0.1.0`, installed by ./run with --no-deps): an exported drafter
loads in the reference with every tensor used, gives the same block logits, and the reference's `spec_generate`
decodes the same tokens with the same accepted lengths as ours; export -> import is bit-identical; what cannot be
converted exactly is refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("dflash", reason="z-lab's reference DFlash is not installed: pip install --no-deps dflash==0.1.0")

from conftest import make_drafter, random_prompts  # noqa: E402

from draftopd.config import DecodeConfig, OptimConfig, SFTConfig  # noqa: E402
from draftopd.data.regenerate import SFTExample  # noqa: E402
from draftopd.decode.speculative import autoregressive_generate, generate  # noqa: E402
from draftopd.interop.dflash_ref import export_dflash, import_dflash, load_reference, reference_run, whole_block_rounds  # noqa: E402
from draftopd.models.drafter import DrafterError  # noqa: E402
from draftopd.models.load import tiny_target  # noqa: E402
from draftopd.train.sft import train_sft  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = 6


def exact_drafter(target, seed: int = 0, noise: float = 0.1, **cfg):
    """An exportable drafter (MASK = the target row before EOS) with every weight perturbed, so a swapped or
    re-initialised tensor shows in the logits: two layers fed target layers 2 then 0 (order matters), a rope theta
    and an eps unlike Qwen3Config's defaults, a final norm near 1 (large logits)."""
    cfg = {
        "num_layers": 2,
        "target_layer_ids": (2, 0),
        "rope_theta": 1234.0,
        "rms_norm_eps": 1e-5,
        "mask_token_id": target.vocab_size - 2,
        "final_norm_init": 1.0,
        **cfg,
    }
    drafter = make_drafter(target, block_size=BLOCK, seed=seed, **cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in drafter.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g))
    return drafter


@pytest.fixture(scope="module")
def trained(one_thread, tmp_path_factory):
    """A sharp tiny target (greedy text a drafter can learn) and an exact drafter after 150 SFT steps on its own
    greedy answers (~5 s): random drafters are almost never accepted, this one accepts 0..B-1 drafts per round."""
    target = tiny_target("qwen3", sharpness=30.0)
    prompts = random_prompts(target.vocab_size, [3 + i % 8 for i in range(40)], seed=0)
    answers = autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=40, stop_at_eos=False)).traces
    examples = [SFTExample(str(i), tuple(t.prompt), tuple(t.output)) for i, t in enumerate(answers)]
    drafter = exact_drafter(target, noise=0.0).requires_grad_(True)
    sft = SFTConfig(steps=150, batch_size=8, anchors_per_seq=16, optim=OptimConfig(lr=1e-2, min_warmup_steps=1))
    train_sft(target, drafter, examples, sft, tmp_path_factory.mktemp("sft"), progress=False)
    return target, drafter.requires_grad_(False), prompts[:4]  # decoded on prompts it was trained on: long acceptances


def context(target, drafter, rows: int = 2, length: int = 11, seed: int = 0):
    """Target features of `rows` random sequences of `length` tokens (all valid), and an anchor token per row."""
    tokens = torch.tensor(random_prompts(target.vocab_size, [length + 1] * rows, seed))
    sequences, valid = tokens[:, :-1], torch.ones(rows, length, dtype=torch.bool)
    features = target.score(sequences, valid, drafter.spec.target_layer_ids).features
    return features, torch.arange(length).expand(rows, -1), valid, tokens[:, -1]


# ---- (a) export -> the reference loads every tensor and computes the same block ------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@torch.no_grad()
def test_export_loads_in_reference_with_same_logits(arch, request, tmp_path):
    from safetensors.torch import load_file

    target = request.getfixturevalue(f"{arch}_target")
    drafter = exact_drafter(target)
    export_dflash(drafter, tmp_path, target)
    reference = load_reference(tmp_path)
    saved, loaded = load_file(str(tmp_path / "model.safetensors")), reference.state_dict()
    assert loaded.keys() == saved.keys()  # every reference tensor comes from the file: none re-initialised
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)

    features, positions, valid, anchor = context(target, drafter)
    ctx = drafter.project_context(features, positions, valid)
    ours = drafter.draft_logits(ctx, anchor[:, None], positions[:, -1:] + 1)[:, 0]  # (rows, B-1, V)
    # the reference's block, as its generate loop builds it: [anchor, MASK x (B-1)] after the context, positions 0..n+B-1
    block = torch.cat([anchor[:, None], torch.full((len(anchor), BLOCK - 1), drafter.spec.mask_token_id)], 1)
    hidden = reference(
        position_ids=torch.arange(positions.shape[1] + BLOCK).expand(len(anchor), -1),
        noise_embedding=F.embedding(block, target.model.get_input_embeddings().weight),
        target_hidden=features,
    )
    theirs = reference.compute_logits(hidden[:, 1:], target.model.lm_head)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


# ---- (b) the reference's spec_generate decodes like ours --------------------------------------------------------------
@pytest.mark.parametrize("case", ["trained", "small vocab, stop at EOS"])
def test_reference_spec_generate_matches_ours(case, request, tmp_path):
    """Same tokens as plain greedy decoding, and per round the same accepted lengths as our `generate`. The trained
    drafter accepts 0..B-1 drafts; the vocabulary-8 target often says EOS, so stop handling is compared too."""
    if case == "trained":
        target, drafter, prompts = request.getfixturevalue("trained")
    else:
        target = request.getfixturevalue("small_vocab_target")
        drafter, prompts = exact_drafter(target, seed=1), random_prompts(target.vocab_size, [3, 9, 16, 5], seed=2)
    export_dflash(drafter, tmp_path, target)
    reference = load_reference(tmp_path)
    new, stop = 30, case != "trained"
    stop_ids, cfg = (sorted(target.eos_ids) if stop else None), DecodeConfig(max_new_tokens=new, stop_at_eos=stop)
    compared = []
    for prompt in prompts:
        tokens = reference.spec_generate(target.model, torch.tensor([prompt]), max_new_tokens=new, stop_token_ids=stop_ids, temperature=0.0)
        plain = autoregressive_generate(target, [prompt], cfg).traces[0].output
        assert tokens[0, len(prompt) :].tolist() == plain  # lossless greedy: the target's own text
        ours = generate(target, drafter, [prompt], cfg).traces[0]
        stats = reference_run(reference, target, prompt, new, stop_ids)
        assert torch.equal(stats.output_ids, tokens) and ours.output == plain
        assert sum(stats.acceptance_lengths) == len(plain) - 1  # each round's accepted drafts + 1; the first token is the prefill's
        n = whole_block_rounds(stats.acceptance_lengths, new, BLOCK)
        assert stats.acceptance_lengths[:n] == [r + 1 for r in ours.accepted[:n]]
        compared += ours.accepted[:n]
    assert len(compared) >= 8
    if case == "trained":
        assert set(compared) >= {0, 1, BLOCK - 1}, compared  # rejections, partial and whole blocks all compared


# ---- (c) export -> import is exact ------------------------------------------------------------------------------------
@torch.no_grad()
def test_round_trip_is_bit_identical(qwen3_target, tmp_path):
    drafter = exact_drafter(qwen3_target)
    export_dflash(drafter, tmp_path, qwen3_target)
    back = import_dflash(tmp_path, qwen3_target)
    assert back.spec == drafter.spec
    before, after = drafter.state_dict(), back.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    features, positions, valid, anchor = context(qwen3_target, drafter)
    logits = [
        d.draft_logits(d.project_context(features, positions, valid), anchor[:, None], positions[:, -1:] + 1) for d in (drafter, back)
    ]
    assert torch.equal(*logits)


# ---- (d) refusals -----------------------------------------------------------------------------------------------------
EXPORT_REFUSALS = {
    "eagle3": (dict(arch="eagle3"), "only a DFlash drafter"),
    "learned MASK": (dict(mask_token_id=None, learned_mask=True), "learned MASK"),
    "reduced vocabulary": (dict(vocab_size=16), "the reference DFlash format has no reduced vocabulary"),
    "last target layer": (dict(target_layer_ids=(1, 3)), "last layer: the reference reads it after the final norm"),
}


@pytest.mark.parametrize("case", EXPORT_REFUSALS)
def test_export_refuses_what_it_cannot_write_exactly(case, llama_target, tmp_path):
    cfg, message = EXPORT_REFUSALS[case]
    cfg = {"mask_token_id": 62, **cfg}
    with pytest.raises(DrafterError, match=message) as err:
        export_dflash(make_drafter(llama_target, **cfg), tmp_path / "out", llama_target)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_export_refuses_another_target(llama_target, small_vocab_target, tmp_path):
    with pytest.raises(DrafterError, match="does not match target"):
        export_dflash(exact_drafter(llama_target), tmp_path, small_vocab_target)


def edit_config(edit):
    def apply(folder):
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))

    return apply


def edit_weights(edit):
    def apply(folder):
        from safetensors.torch import load_file, save_file

        weights = load_file(str(folder / "model.safetensors"))
        edit(weights)
        save_file(weights, str(folder / "model.safetensors"))

    return apply


def rename(weights, old, new):
    weights[new] = weights.pop(old)


IMPORT_REFUSALS = {
    "architectures": (edit_config(lambda c: c.update(architectures=["Qwen3ForCausalLM"])), "not a reference DFlash drafter"),
    "no num_target_layers": (edit_config(lambda c: c.pop("num_target_layers")), "lacks 'num_target_layers'"),
    "no head_dim": (edit_config(lambda c: c.pop("head_dim")), "lacks 'head_dim'"),
    "no MASK": (edit_config(lambda c: c["dflash_config"].pop("mask_token_id")), "no dflash_config.mask_token_id"),
    "layer out of range": (edit_config(lambda c: c["dflash_config"].update(target_layer_ids=[2, 7])), "outside the target's 4 layers"),
    "last layer": (edit_config(lambda c: c["dflash_config"].update(target_layer_ids=[2, 3])), "last layer"),
    "softcap": (
        edit_config(lambda c: c["dflash_config"].update(final_logit_softcapping=30.0)),
        "does not compute: final_logit_softcapping",
    ),
    "sliding layer": (
        edit_config(lambda c: c.update(layer_types=["sliding_attention", "full_attention"])),
        "does not compute: layer_types",
    ),
    "bad value": (edit_config(lambda c: c.update(hidden_size="wide")), "bad value"),
    "missing tensor": (edit_weights(lambda w: w.pop("layers.1.mlp.up_proj.weight")), r"missing \['layers.1.mlp.up_proj.weight'\]"),
    "embedding saved": (
        edit_weights(lambda w: w.update({"embed_tokens.weight": torch.zeros(64, 32)})),
        r"unexpected \['embed_tokens.weight'\]",
    ),
    "our names": (edit_weights(lambda w: rename(w, "layers.0.self_attn.q_proj.weight", "layers.0.q_proj.weight")), "missing"),
    "wrong shape": (edit_weights(lambda w: w.update({"fc.weight": w["fc.weight"][:, :32].contiguous()})), "wrong shape"),
    "truncated weights": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:100]), "corrupt"),
    "config not JSON": (lambda f: (f / "config.json").write_text("{"), "corrupt"),
    "no config": (lambda f: (f / "config.json").unlink(), "missing config.json"),
}


@pytest.mark.parametrize("case", IMPORT_REFUSALS)
def test_import_refuses_corrupt_or_mismatched(case, qwen3_target, tmp_path):
    damage, message = IMPORT_REFUSALS[case]
    export_dflash(exact_drafter(qwen3_target), tmp_path, qwen3_target)
    damage(tmp_path)
    with pytest.raises(DrafterError, match=message) as err:
        import_dflash(tmp_path, qwen3_target)
    assert "\n" not in str(err.value)


def test_import_refuses_another_target(qwen3_target, small_vocab_target, tmp_path):
    export_dflash(exact_drafter(qwen3_target), tmp_path, qwen3_target)
    with pytest.raises(DrafterError, match="does not match target"):
        import_dflash(tmp_path, small_vocab_target)
