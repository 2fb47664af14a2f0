"""Tests for the drafters (DFlash and EAGLE-3, the same seam): what a block or chain can see, blocks in one call vs
separate calls, checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_drafter

from draftopd.config import ConfigError, DrafterConfig
from draftopd.models.dflash import default_layers as dflash_default_layers
from draftopd.models.drafter import DraftContext, DrafterError, load_drafter, new_drafter, save_drafter
from draftopd.models.eagle3 import default_layers as eagle3_default_layers
from draftopd.models.load import tiny_target
from draftopd.models.target import Target

pytestmark = pytest.mark.usefixtures("one_thread")

SLOTS = 24
ANCHORS = [3, 10, 17]  # logical anchor positions of the blocks in one call


@pytest.fixture(scope="module", params=["dflash", "eagle3"])
def drafter(llama_target, request):
    """DFlash: two drafter layers (each projects the same context with its own k/v); EAGLE-3: its one layer; blocks of 8."""
    if request.param == "eagle3":
        return make_drafter(llama_target, block_size=8, seed=1, arch="eagle3")
    return make_drafter(llama_target, block_size=8, seed=1, num_layers=2)


def _following(positions: torch.Tensor) -> torch.Tensor:
    """The token after each context slot, a function of its position (EAGLE-3 pairs it with the slot's features;
    DFlash ignores it)."""
    return (positions * 7 + 3) % 60


def _features(drafter, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    width = len(drafter.spec.target_layer_ids) * drafter.spec.hidden_size
    return torch.randn(batch, SLOTS, width, generator=g)


def _layout(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Row 0: plain positions 0..SLOTS-1. Row 1: like a decoding cache, 3 left pads (position 0, invalid) and two
    holes (rejected slots whose positions the next committed slots reuse)."""
    positions = torch.arange(SLOTS).repeat(batch, 1)
    valid = torch.ones(batch, SLOTS, dtype=torch.bool)
    if batch > 1:
        row = [0, 0, 0] + list(range(0, 8)) + [8, 9] + list(range(8, SLOTS - 13 + 8))  # pads, 0..7, holes 8 9, 8..
        positions[1] = torch.tensor(row[:SLOTS])
        valid[1, :3] = False
        valid[1, 11:13] = False
    return positions, valid


def _logits(drafter, features, positions, valid, anchor_tokens, anchors=ANCHORS) -> torch.Tensor:
    with torch.no_grad():
        ctx = drafter.project_context(features, positions, valid, _following(positions))
        anchor_pos = torch.tensor(anchors).repeat(features.shape[0], 1)
        return drafter.draft_logits(ctx, anchor_tokens, anchor_pos)


def _anchor_tokens(batch: int = 2) -> torch.Tensor:
    return torch.tensor([[5, 17, 42]] * batch)[:, : len(ANCHORS)]


def test_draft_logits_shape(drafter) -> None:
    positions, valid = _layout()
    out = _logits(drafter, _features(drafter), positions, valid, _anchor_tokens())
    assert out.shape == (2, len(ANCHORS), drafter.block_size - 1, drafter.spec.vocab_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("row", [0, 1])
def test_block_ignores_context_at_or_after_its_anchor(drafter, row) -> None:
    positions, valid = _layout()
    feats = _features(drafter)
    base = _logits(drafter, feats, positions, valid, _anchor_tokens())
    for j, a in enumerate(ANCHORS):
        noisy = feats.clone()
        late = positions[row] >= a  # including the anchor's own position
        noisy[row, late] += 5.0 * torch.randn_like(noisy[row, late])
        out = _logits(drafter, noisy, positions, valid, _anchor_tokens())
        torch.testing.assert_close(out[row, j], base[row, j], atol=1e-6, rtol=0)
        torch.testing.assert_close(out[1 - row], base[1 - row], atol=0, rtol=0)  # other row untouched


@pytest.mark.parametrize("row", [0, 1])
def test_block_sees_every_valid_context_slot_before_its_anchor(drafter, row) -> None:
    positions, valid = _layout()
    feats = _features(drafter)
    base = _logits(drafter, feats, positions, valid, _anchor_tokens())
    for j, a in enumerate(ANCHORS):
        for slot in torch.nonzero(valid[row] & (positions[row] < a))[:, 0].tolist():
            noisy = feats.clone()
            noisy[row, slot] += 5.0 * torch.randn_like(noisy[row, slot])
            out = _logits(drafter, noisy, positions, valid, _anchor_tokens())
            assert (out[row, j] - base[row, j]).abs().max() > 1e-4, (
                f"block at {a} blind to slot {slot} (position {int(positions[row, slot])})"
            )


def test_block_ignores_invalid_slots(drafter) -> None:
    """Pads and holes (valid False) are invisible even at positions before the anchor."""
    positions, valid = _layout()
    feats = _features(drafter)
    base = _logits(drafter, feats, positions, valid, _anchor_tokens())
    noisy = feats.clone()
    noisy[~valid] += 5.0 * torch.randn_like(noisy[~valid])
    torch.testing.assert_close(_logits(drafter, noisy, positions, valid, _anchor_tokens()), base, atol=1e-6, rtol=0)


def test_blocks_do_not_see_each_other(drafter) -> None:
    positions, valid = _layout()
    feats = _features(drafter)
    tokens = _anchor_tokens()
    base = _logits(drafter, feats, positions, valid, tokens)
    for j in range(len(ANCHORS)):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1) % drafter.spec.vocab_size
        out = _logits(drafter, feats, positions, valid, changed)
        assert (out[:, j] - base[:, j]).abs().max() > 1e-4  # a block does see its own anchor
        others = [i for i in range(len(ANCHORS)) if i != j]
        torch.testing.assert_close(out[:, others], base[:, others], atol=1e-6, rtol=0)


def test_many_anchors_in_one_call_equal_separate_calls(drafter) -> None:
    """The training forward (many blocks per sequence, batch of rows) equals the inference forward (one block,
    one row) block by block."""
    positions, valid = _layout()
    feats = _features(drafter)
    tokens = _anchor_tokens()
    together = _logits(drafter, feats, positions, valid, tokens)
    for b in range(2):
        for j, a in enumerate(ANCHORS):
            alone = _logits(drafter, feats[b : b + 1], positions[b : b + 1], valid[b : b + 1], tokens[b : b + 1, j : j + 1], anchors=[a])
            torch.testing.assert_close(together[b : b + 1, j : j + 1], alone, atol=1e-5, rtol=0)


def test_inference_context_equals_training_context(drafter, llama_target) -> None:
    """A context truncated to the slots before the anchor (inference) gives the same block as the full
    sequence's context (training), and extending a context slot by slot equals projecting it at once."""
    positions, valid = _layout(1)
    feats = _features(drafter, batch=1)
    a = ANCHORS[1]
    full = _logits(drafter, feats, positions, valid, _anchor_tokens(1)[:, 1:2], anchors=[a])
    cut = _logits(drafter, feats[:, :a], positions[:, :a], valid[:, :a], _anchor_tokens(1)[:, 1:2], anchors=[a])
    torch.testing.assert_close(full, cut, atol=1e-5, rtol=0)
    with torch.no_grad():
        following = _following(positions)
        ctx = drafter.project_context(feats[:, :5], positions[:, :5], valid[:, :5], following[:, :5])
        ctx = ctx.extend(drafter.project_context(feats[:, 5:a], positions[:, 5:a], valid[:, 5:a], following[:, 5:a]))
        pieces = drafter.draft_logits(ctx, _anchor_tokens(1)[:, 1:2], torch.tensor([[a]]))
    assert isinstance(ctx, DraftContext)
    torch.testing.assert_close(pieces, full, atol=1e-5, rtol=0)


def test_block_mask_shape_and_rule(drafter) -> None:
    if drafter.spec.arch != "dflash":
        pytest.skip("DFlash's block mask (an EAGLE-3 chain's visibility is checked by the tests above)")
    positions, valid = _layout()
    with torch.no_grad():
        ctx = drafter.project_context(_features(drafter), positions, valid)
    anchors = torch.tensor([ANCHORS, ANCHORS])
    mask = drafter.block_mask(ctx, anchors)
    size, nb = drafter.block_size, len(ANCHORS)
    assert mask.shape == (2, 1, nb * size, SLOTS + nb * size)
    for b in range(2):
        for j, a in enumerate(ANCHORS):
            rows = mask[b, 0, j * size : (j + 1) * size]
            assert (rows[:, :SLOTS] == (valid[b] & (positions[b] < a))).all()
            own = torch.zeros(nb * size, dtype=torch.bool)
            own[j * size : (j + 1) * size] = True
            assert (rows[:, SLOTS:] == own).all()


# ============================================================================ construction and checkpoints


def test_default_layer_rule() -> None:
    assert dflash_default_layers(36, 5) == (1, 9, 17, 25, 33)
    assert dflash_default_layers(4, 1) == (2,)
    assert eagle3_default_layers(30) == (1, 14, 26)  # SmolLM2: inputs of layers 2, 15, 27
    assert eagle3_default_layers(4) == (1, 1, 0)


def test_eagle3_chain_sees_its_own_drafts_and_dflash_does_not(llama_target) -> None:
    """Slot k of an EAGLE-3 chain depends on the tokens of slots < k it is fed; a DFlash block on none of them."""
    positions, valid = _layout()
    for arch, sees in (("eagle3", True), ("dflash", False)):
        drafter = make_drafter(llama_target, block_size=5, seed=2, arch=arch)
        feats = _features(drafter)
        with torch.no_grad():
            ctx = drafter.project_context(feats, positions, valid, _following(positions))
            anchor_pos, tokens = torch.tensor([ANCHORS] * 2), _anchor_tokens()
            block = torch.randint(0, 60, (2, len(ANCHORS), 3), generator=torch.Generator().manual_seed(1))
            base = drafter(ctx, tokens, anchor_pos, block)
            changed = block.clone()
            changed[..., 1] = (changed[..., 1] + 1) % 60  # the token of slot 2
            out = drafter(ctx, tokens, anchor_pos, changed)
        torch.testing.assert_close(out[..., :2, :], base[..., :2, :], atol=0, rtol=0)  # slots 1 and 2 do not see it
        assert ((out[..., 2:, :] - base[..., 2:, :]).abs().amax() > 1e-4) == sees


def test_eagle3_shape_rules_and_wrong_architecture_errors(llama_target, tmp_path) -> None:
    with pytest.raises(DrafterError, match="one decoder layer"):
        new_drafter(llama_target, DrafterConfig(arch="eagle3", num_layers=2))
    with pytest.raises(ConfigError, match="--draft-arch must be one of dflash, eagle3"):
        DrafterConfig(arch="medusa")
    eagle = make_drafter(llama_target, block_size=4, arch="eagle3")
    assert eagle.spec.target_layer_ids == eagle3_default_layers(llama_target.num_layers) and eagle.spec.mask_token_id is None
    save_drafter(eagle, tmp_path / "e3")
    save_drafter(make_drafter(llama_target, block_size=4), tmp_path / "df")
    assert json.loads((tmp_path / "e3" / "config.json").read_text())["architecture"] == "Eagle3Drafter"
    assert load_drafter(tmp_path / "e3", llama_target, arch="eagle3").spec == eagle.spec
    with pytest.raises(DrafterError, match=r"holds an EAGLE-3 drafter, not a DFlash one \(drop --draft-arch or pass --draft-arch eagle3\)"):
        load_drafter(tmp_path / "e3", llama_target, arch="dflash")
    with pytest.raises(DrafterError, match="holds a DFlash drafter, not an EAGLE-3 one"):
        load_drafter(tmp_path / "df", llama_target, arch="eagle3")
    config = json.loads((tmp_path / "e3" / "config.json").read_text())
    config["architecture"] = "DFlashDrafter"  # an EAGLE-3 spec under the other architecture's name
    (tmp_path / "e3" / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrafterError, match="corrupt"):
        load_drafter(tmp_path / "e3", llama_target)


def test_drafter_does_not_own_target_weights(drafter, llama_target) -> None:
    keys = set(drafter.state_dict())
    assert not any(k.startswith("target") or "embed_tokens" in k or "lm_head" in k for k in keys)
    assert all(p.data_ptr() != llama_target.model.get_input_embeddings().weight.data_ptr() for p in drafter.parameters())


def test_drafter_holds_the_targets_frozen_tensors_not_the_target(llama_target, tmp_path) -> None:
    """Embedding and head are the target's own tensors (shared storage, not saved); no module refers to the `Target`;
    copying or converting a drafter leaves the target's weights where and what they are."""
    from safetensors.torch import load_file

    drafter = make_drafter(llama_target, block_size=4, vocab_size=16)
    drafter.set_draft_vocab(torch.arange(16) * 3)
    embed, head = llama_target.model.get_input_embeddings().weight, llama_target.model.get_output_embeddings().weight
    assert not any(isinstance(v, Target) for m in drafter.modules() for v in vars(m).values())
    assert drafter.embed_weight.data_ptr() == embed.data_ptr() and drafter.lm_head_weight.data_ptr() == head.data_ptr()
    assert torch.equal(drafter.head_weight, head[torch.arange(16) * 3])
    save_drafter(drafter, tmp_path / "ckpt")
    saved = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert set(saved) == {name for name, _ in drafter.named_parameters()} | {"d2t", "t2d"}  # no embedding, no head
    assert copy.deepcopy(drafter).embed_weight.data_ptr() == embed.data_ptr()  # copies share, too
    half = copy.deepcopy(drafter).to(torch.bfloat16)
    assert half.embed_weight.dtype == half.head_weight.dtype == torch.bfloat16
    assert embed.dtype == head.dtype == torch.float32 and drafter.embed_weight.dtype == torch.float32
    copy.deepcopy(drafter).to("meta")
    assert embed.device.type == head.device.type == "cpu"


def test_copied_layers_hold_the_target_layers_weights(target) -> None:
    """Drafter layer i starts as target layer ids[i]: every copied weight equal, the rest (fc, q/k norms) untouched."""
    ids = (target.num_layers - 1, 0)
    copied = make_drafter(target, num_layers=2, copy_target_layers=ids)
    fresh = make_drafter(target, num_layers=2)
    for layer, i in zip(copied.layers, ids):
        source = target.model.model.layers[i]
        assert torch.equal(layer.q_proj.weight, source.self_attn.q_proj.weight)
        assert torch.equal(layer.o_proj.weight, source.self_attn.o_proj.weight)
        assert torch.equal(layer.down_proj.weight, source.mlp.down_proj.weight)
        assert torch.equal(layer.input_layernorm.weight, source.input_layernorm.weight)
    assert not torch.equal(copied.layers[0].q_proj.weight, copied.layers[1].q_proj.weight)
    assert torch.equal(copied.fc.weight, fresh.fc.weight)
    assert torch.equal(copied.layers[0].q_norm.weight, fresh.layers[0].q_norm.weight)


@pytest.mark.parametrize("ids, error, words", [((0,), ConfigError, "one target layer id"), ((0, 99), DrafterError, "outside the target")])
def test_copy_target_layers_bad_ids_raise(llama_target, ids, error, words) -> None:
    with pytest.raises(error, match=words):
        new_drafter(llama_target, DrafterConfig(num_layers=2, copy_target_layers=ids))


def test_copy_target_layers_refused_for_eagle3(llama_target) -> None:
    with pytest.raises(DrafterError, match="DFlash"):
        new_drafter(llama_target, DrafterConfig(arch="eagle3", copy_target_layers=(0,)))


def test_target_layer_ids_out_of_range_raise(llama_target) -> None:
    with pytest.raises(DrafterError, match=r"--draft-target-layer-ids .*outside the target's 4 layers, got \(1, 4\)"):
        new_drafter(llama_target, DrafterConfig(target_layer_ids=(1, llama_target.num_layers)))


@pytest.mark.parametrize(
    "cfg, error, words",
    [
        (dict(num_heads=5), DrafterError, "--draft-num-heads 5 does not divide the target's hidden size 32"),
        (dict(num_heads=1), DrafterError, "--draft-num-kv-heads must divide the 1 attention heads, got 2"),  # the target's 2 kv heads
        (dict(num_heads=4, num_kv_heads=3), ConfigError, "--draft-num-kv-heads must divide --draft-num-heads 4, got 3"),
        (dict(head_dim=7), ConfigError, "--draft-head-dim must be even"),
        (dict(num_heads=5, head_dim=8, num_kv_heads=1), None, None),  # an explicit head_dim fits any head count
    ],
    ids=str,
)
def test_drafter_shape_relations_are_one_line(llama_target, cfg, error, words) -> None:
    if error is None:
        assert new_drafter(llama_target, DrafterConfig(**cfg)).spec.num_heads * 8 == 40
        return
    with pytest.raises(error, match=words) as err:
        new_drafter(llama_target, DrafterConfig(**cfg))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change, words",
    [
        ({"block_size": "8"}, "block_size must be an integer >= 2, got '8'"),
        ({"block_size": 0}, "block_size must be an integer >= 2, got 0"),
        ({"block_size": -4}, "block_size must be an integer >= 2"),
        ({"target_layer_ids": [0, 4]}, "target_layer_ids must be layer ids 0..3, none outside the target's 4 layers"),
        ({"target_layer_ids": []}, "target_layer_ids"),
        ({"num_heads": 3}, "num_kv_heads must divide the 3 attention heads"),
        ({"num_kv_heads": 0}, "num_kv_heads must be an integer >= 1"),
        ({"head_dim": 7}, "head_dim must be even"),
        ({"intermediate_size": 2.5}, "intermediate_size must be an integer"),
        ({"rope_theta": "big"}, "rope_theta must be a finite number > 0"),
        ({"rms_norm_eps": 0}, "rms_norm_eps must be a finite number > 0"),
        ({"mask_token_id": -1}, "mask_token_id must be a token id"),
        ({"draft_vocab_size": 65}, "draft_vocab_size must be in [1, 64]"),
        ({"num_layers": True}, "num_layers must be an integer"),
    ],
    ids=str,
)
def test_a_checkpoint_with_a_bad_shape_value_is_one_drafter_error(saved, llama_target, tmp_path, change, words) -> None:
    """config.json is checked as strictly as flags are: one DrafterError line naming the field, not a traceback later."""
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["draftopd_spec"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrafterError) as err:
        load_drafter(folder, llama_target)
    assert f"drafter checkpoint at {folder}: config.json draftopd_spec." in str(err.value) and words in str(err.value)
    assert "\n" not in str(err.value)


def test_default_mask_is_a_target_row_that_exports_and_learned_is_asked_for(target, tmp_path) -> None:
    """A new DFlash drafter's MASK is the target's default row (the reference format holds it) unless `learned_mask`; a
    saved spec's null still means a learned vector, so checkpoints written before the default changed load unchanged."""
    from draftopd.interop.dflash_ref import export_dflash
    from draftopd.models.drafter import default_mask_token

    drafter = make_drafter(target, block_size=4, target_layer_ids=(0, 2))
    assert drafter.spec.mask_token_id == default_mask_token(target) == target.vocab_size - 2 and not hasattr(drafter, "mask_embedding")
    export_dflash(drafter, tmp_path / "exported", target)
    assert make_drafter(target, block_size=4, mask_token_id=5).spec.mask_token_id == 5
    learned = make_drafter(target, block_size=4, target_layer_ids=(0, 2), learned_mask=True)
    assert learned.spec.mask_token_id is None and hasattr(learned, "mask_embedding")
    save_drafter(learned, tmp_path / "learned")
    assert json.loads((tmp_path / "learned" / "config.json").read_text())["draftopd_spec"]["mask_token_id"] is None
    loaded = load_drafter(tmp_path / "learned", target)
    assert loaded.spec == learned.spec and torch.equal(loaded.mask_embedding, learned.mask_embedding)
    with pytest.raises(DrafterError, match="learned MASK"):
        export_dflash(learned, tmp_path / "refused", target)
    with pytest.raises(ConfigError, match="--draft-learned-mask and --draft-mask-token-id 5 exclude each other"):
        DrafterConfig(learned_mask=True, mask_token_id=5)
    with pytest.raises(DrafterError, match="--draft-learned-mask applies to DFlash drafters"):
        new_drafter(target, DrafterConfig(arch="eagle3", learned_mask=True))
    assert new_drafter(target, DrafterConfig(arch="eagle3")).spec.mask_token_id is None


def test_save_load_round_trip_identical_logits(drafter, llama_target, tmp_path) -> None:
    save_drafter(drafter, tmp_path / "ckpt", extra={"step": 7})
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["step"] == 7 and config["target"] == llama_target.name
    loaded = load_drafter(tmp_path / "ckpt", llama_target)
    assert loaded.spec == drafter.spec
    positions, valid = _layout()
    feats = _features(drafter)
    want = _logits(drafter, feats, positions, valid, _anchor_tokens())
    got = _logits(loaded, feats, positions, valid, _anchor_tokens())
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def saved(drafter, tmp_path_factory):
    folder = tmp_path_factory.mktemp("drafter") / "ckpt"
    save_drafter(drafter, folder)
    return folder


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(hidden_size=48), "hidden_size 32 vs target 48"),
        (dict(vocab_size=32), "vocab_size 64 vs target 32"),
        (dict(num_layers=3), "num_target_layers 4 vs target 3"),
    ],
)
def test_load_against_mismatched_target_raises(saved, change, words) -> None:
    other = tiny_target("llama", **change)
    with pytest.raises(DrafterError, match=words):
        load_drafter(saved, other)


def _copy(saved, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((saved / name).read_bytes())
    return folder


def test_truncated_weights_raise(saved, llama_target, tmp_path) -> None:
    folder = _copy(saved, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DrafterError, match="corrupt"):
        load_drafter(folder, llama_target)


@pytest.mark.parametrize("text", ["{not json", '{"architecture": "DFlashDrafter"}', "[]", ""])
def test_garbage_config_raises(saved, llama_target, tmp_path, text) -> None:
    folder = _copy(saved, tmp_path)
    (folder / "config.json").write_text(text)
    with pytest.raises(DrafterError, match="corrupt"):
        load_drafter(folder, llama_target)


def test_missing_folder_or_config_raises(saved, llama_target, tmp_path) -> None:
    with pytest.raises(DrafterError, match="no drafter checkpoint.*config.json"):
        load_drafter(tmp_path / "nowhere", llama_target)
    folder = _copy(saved, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(DrafterError, match="no drafter checkpoint.*config.json"):
        load_drafter(folder, llama_target)


def test_missing_weights_file_raises(saved, llama_target, tmp_path) -> None:
    folder = _copy(saved, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(DrafterError, match="model.safetensors"):
        load_drafter(folder, llama_target)


def test_weights_of_another_drafter_shape_raise(saved, llama_target, tmp_path) -> None:
    """config.json and weights from different drafters: more layers (missing keys) is refused."""
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["draftopd_spec"]["num_layers"] = 3
    if config["draftopd_spec"]["arch"] == "eagle3":
        config["draftopd_spec"]["arch"], config["architecture"] = "dflash", "DFlashDrafter"  # EAGLE-3 weights as a DFlash
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrafterError, match="wrong weights|wrong shape"):
        load_drafter(folder, llama_target)


def test_weights_with_wrong_shapes_raise_drafter_error(saved, llama_target, tmp_path) -> None:
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["draftopd_spec"]["intermediate_size"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(DrafterError):
        load_drafter(folder, llama_target)


@pytest.mark.parametrize("vocab", [None, 20])
def test_head_of_a_sliced_block_equals_a_plain_matmul(llama_target, vocab) -> None:
    """`head` flattens its input (a block's slots 1..K are a non-contiguous slice); the logits are still each row
    times the head, for the full head and a reduced one."""
    drafter = make_drafter(llama_target, block_size=8, seed=2, vocab_size=vocab)
    if vocab:
        drafter.set_draft_vocab(torch.arange(0, 2 * vocab, 2))
    hidden = torch.randn(2, 3, 8, drafter.spec.hidden_size)[:, :, 1:]
    weight = drafter.lm_head_weight if vocab is None else drafter.head_weight
    want = torch.einsum("bnkh,vh->bnkv", hidden.to(weight.dtype), weight).float()
    got = drafter.head(hidden)
    assert got.shape == (2, 3, 7, vocab or drafter.spec.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["dflash", "eagle3"])
def test_widened_drafter_keeps_every_kept_tokens_logit(llama_target, arch) -> None:
    """`widen_vocab`: the same weights over the whole head. Over the target's vocabulary its logits equal the reduced
    drafter's at the kept tokens (-inf elsewhere there), so a slot's argmax changes only where a dropped token scores
    highest (an EAGLE-3 chain is teacher-forced here: left to itself it feeds such a token on); a full-vocabulary
    drafter comes back as is; dtype kept."""
    from draftopd.models.drafter import widen_vocab

    kwargs = {"arch": "eagle3"} if arch == "eagle3" else {"num_layers": 2}
    drafter = make_drafter(llama_target, block_size=8, seed=3, vocab_size=20, **kwargs)
    kept = torch.randperm(llama_target.vocab_size - 1, generator=torch.Generator().manual_seed(0))[:20]
    drafter.set_draft_vocab(kept)
    with torch.no_grad():
        drafter.norm.weight.fill_(1.0)  # large logits: the kept tokens' logits must match, not just their order
    wide = widen_vocab(drafter)
    assert wide.spec.draft_vocab_size is None and wide.spec.vocab_size == drafter.spec.vocab_size
    assert not hasattr(wide, "d2t") and widen_vocab(wide) is wide
    features, (positions, valid) = _features(drafter), _layout()
    block = kept[torch.randint(0, 20, (2, len(ANCHORS), 7), generator=torch.Generator().manual_seed(1))]

    def logits(d):
        with torch.no_grad():
            ctx = d.project_context(features, positions, valid, _following(positions))
            return d.draft_logits(ctx, _anchor_tokens(), torch.tensor(ANCHORS).repeat(2, 1), block)

    narrow_logits, wide_logits = logits(drafter), logits(wide)
    in_vocab = torch.zeros(llama_target.vocab_size, dtype=torch.bool)
    in_vocab[kept] = True
    torch.testing.assert_close(wide_logits[..., in_vocab], narrow_logits[..., in_vocab], rtol=0, atol=0)
    assert torch.isinf(narrow_logits[..., ~in_vocab]).all() and torch.isfinite(wide_logits).all()
    dropped_top = wide_logits.argmax(-1) != narrow_logits.argmax(-1)
    assert torch.equal(dropped_top, ~in_vocab[wide_logits.argmax(-1)])  # argmaxes differ exactly where a dropped token wins
    assert widen_vocab(copy.deepcopy(drafter).to(torch.bfloat16)).fc.weight.dtype == torch.bfloat16
