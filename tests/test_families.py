"""The drafter-family registry (`models/registry.py`): a third family, defined in this file alone, decodes losslessly,
trains with SFT, saves, loads and exports through the generic code, and the CLI's `--draft-arch` values are the
registry's. Nothing in decode/, train/ or interop/ knows it exists."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from conftest import random_prompts
from torch import Tensor, nn

from draftopd.config import ConfigError, DecodeConfig, DrafterConfig, OptimConfig, SFTConfig
from draftopd.decode.speculative import autoregressive_generate, generate
from draftopd.interop.dflash_ref import export_dflash
from draftopd.interop.llama_cpp import check_gguf_exportable
from draftopd.interop.speculators import export_speculators, import_speculators
from draftopd.models import registry
from draftopd.models.drafter import DraftContext, Drafter, DrafterError, RMSNorm, load_drafter, new_drafter
from draftopd.models.load import tiny_target
from draftopd.train.sft import train_sft

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- a toy family: the whole of it ----------------------------------------------------------------------------------
class MLPDrafter(Drafter):
    """The fused target feature of the position before the anchor and the anchor's embedding -> all K slots' hidden
    states by one MLP (a parallel drafter without attention: its context is `fused` alone)."""

    def __init__(self, spec, embed_weight: Tensor, lm_head_weight: Tensor, target_name: str = "custom"):
        super().__init__(spec, embed_weight, lm_head_weight, target_name)
        h = spec.hidden_size
        self.fc = nn.Linear(len(spec.target_layer_ids) * h, h, bias=False)
        self.up = nn.Linear(2 * h, spec.intermediate_size, bias=False)
        self.down = nn.Linear(spec.intermediate_size, (spec.block_size - 1) * h, bias=False)
        self.norm = RMSNorm(h, spec.rms_norm_eps)
        self._finish()

    def project_context(self, features: Tensor, positions: Tensor, valid: Tensor, next_tokens: Tensor | None = None) -> DraftContext:
        return DraftContext([], [], positions, valid, self.fc(features.to(self.fc.weight.dtype)))

    def hidden(self, ctx: DraftContext, anchor_tokens: Tensor, anchor_positions: Tensor, block_tokens: Tensor | None = None) -> Tensor:
        last = ctx.valid[:, None, :] & (ctx.positions[:, None, :] == anchor_positions[..., None] - 1)  # (b, n, slots)
        row = last.int().argmax(-1)[..., None].expand(-1, -1, ctx.fused.shape[-1])
        x = torch.cat([ctx.fused.gather(1, row), self.embed(anchor_tokens).to(ctx.fused.dtype)], -1)
        return self.norm(self.down(F.silu(self.up(x))).view(*anchor_tokens.shape, self.block_size - 1, -1))


TOY = registry.Family(
    name="toy-mlp",
    title="toy MLP",
    article="a",
    drafter=MLPDrafter,
    architecture="ToyMLPDrafter",
    default_layers=lambda num_target_layers, num_layers: (num_target_layers - 2,),
    num_layers=1,
    speculators=registry.Speculators(
        model_type="toy_mlp",
        config_class="ToyMLPSpeculator",
        model_class="ToyMLPDraftModel",
        layer_type="toy_mlp",
        layer_keys=lambda spec: {},
        config_keys=lambda spec, captures: {"block_size": spec.block_size, "toy_layer_ids": captures},
        layer_ids_key="toy_layer_ids",
        options=lambda config, layer: {},
        check_anchors=lambda length, block: length - block,
        block_size=lambda config: int(config["block_size"]),
    ),
)


@pytest.fixture
def toy():
    registry.register(TOY)
    yield TOY
    registry.unregister(TOY.name)


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


# ---- the tests --------------------------------------------------------------------------------------------------------
def test_draft_arch_values_are_the_registrys(toy) -> None:
    assert registry.names() == ("dflash", "eagle3", "toy-mlp")
    assert DrafterConfig(arch="toy-mlp").arch == "toy-mlp"
    registry.unregister("toy-mlp")
    with pytest.raises(ConfigError, match="--draft-arch must be one of dflash, eagle3, got 'toy-mlp'"):
        DrafterConfig(arch="toy-mlp")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.family("dflash"))


def test_toy_rules_come_from_its_registration(toy, llama_target) -> None:
    drafter = new_drafter(llama_target, DrafterConfig(arch="toy-mlp", block_size=4))
    assert isinstance(drafter, MLPDrafter) and drafter.spec.target_layer_ids == (2,) and drafter.spec.mask_token_id is None
    with pytest.raises(DrafterError, match=r"a toy MLP drafter has one decoder layer, not 2 \(--draft-num-layers 1\)"):
        new_drafter(llama_target, DrafterConfig(arch="toy-mlp", num_layers=2))
    with pytest.raises(DrafterError, match="--draft-learned-mask applies to DFlash drafters: a toy MLP drafter has no MASK"):
        new_drafter(llama_target, DrafterConfig(arch="toy-mlp", learned_mask=True))
    with pytest.raises(DrafterError, match="copy_target_layers applies to DFlash drafters, not toy-mlp"):
        new_drafter(llama_target, DrafterConfig(arch="toy-mlp", copy_target_layers=(0,)))


def test_toy_decodes_losslessly(toy, small_vocab_target) -> None:
    """Greedy speculative decoding with the toy equals plain decoding, over rounds that accept different numbers."""
    target = small_vocab_target
    drafter = new_drafter(target, DrafterConfig(arch="toy-mlp", block_size=6), seed=1).eval()
    prompts = random_prompts(target.vocab_size, [5, 11, 2, 8], seed=5)
    cfg = DecodeConfig(max_new_tokens=40, stop_at_eos=False)
    out = generate(target, drafter, prompts, cfg)
    assert [t.output for t in out.traces] == [t.output for t in autoregressive_generate(target, prompts, cfg).traces]
    accepted = [a for t in out.traces for a in t.accepted]
    assert max(accepted) > 0 and len(set(accepted)) > 1


def test_toy_trains_saves_and_exports(toy, tmp_path) -> None:
    """SFT a few steps (the loss falls), the checkpoint loads back as the toy, and speculators' format writes and reads
    it through the family's adapter; formats it has no adapter for refuse it in one line."""
    target = tiny_target(vocab_size=64, hidden_size=64, num_layers=4, seed=0)
    rng = random.Random(0)
    prompts = [[rng.randrange(60) for _ in range(rng.randint(3, 10))] for _ in range(16)]
    gen = autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=24, stop_at_eos=False))
    examples = [Example(tuple(t.prompt), tuple(t.output)) for t in gen.traces]
    drafter = new_drafter(target, DrafterConfig(arch="toy-mlp", block_size=4, vocab_size=48), seed=0)
    drafter.set_draft_vocab(torch.arange(48))
    cfg = SFTConfig(steps=8, batch_size=4, anchors_per_seq=8, log_every=1, optim=OptimConfig(lr=3e-3))
    last = train_sft(target, drafter, examples, cfg, tmp_path / "sft", progress=False)
    losses = [json.loads(line)["train/loss"] for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0], losses

    saved = json.loads((last / "config.json").read_text())
    assert saved["architecture"] == "ToyMLPDrafter" and saved["draftopd_spec"]["arch"] == "toy-mlp"
    loaded = load_drafter(last, target, "toy-mlp")
    assert isinstance(loaded, MLPDrafter) and all(torch.equal(v, drafter.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(DrafterError, match=r"holds a toy MLP drafter, not a DFlash one \(drop --draft-arch or pass --draft-arch toy-mlp\)"):
        load_drafter(last, target, "dflash")

    export_speculators(loaded, tmp_path / "spec", target)
    config = json.loads((tmp_path / "spec" / "config.json").read_text())
    assert config["speculators_model_type"] == "toy_mlp" and config["architectures"] == ["ToyMLPSpeculator"]
    assert config["toy_layer_ids"] == [3] and config["transformer_layer_config"]["model_type"] == "toy_mlp"
    back = import_speculators(tmp_path / "spec", target)
    assert isinstance(back, MLPDrafter) and back.spec == loaded.spec
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in back.state_dict().items())

    with pytest.raises(DrafterError, match="only a DFlash drafter has a reference DFlash format, not a toy MLP one"):
        export_dflash(loaded, tmp_path / "ref", target)
    with pytest.raises(DrafterError, match="llama.cpp has no drafter of arch 'toy-mlp'"):
        check_gguf_exportable(loaded)
