"""Memory at real model sizes, measured on the `meta` device (`draftopd/check/memory.py`, `draftopd plan`).

At the sizes users train at (a Qwen3-8B or Llama-3.1-8B target in bf16, a 5-layer block-16 DFlash drafter over the
full vocabulary: online SFT 2 x 4096 tokens a rank, Draft-OPD 16 rollouts x 2,048 tokens replayed one trace at a time,
regeneration 64 x (512 + 1,024) tokens) every flow fits an 80 GB GPU beside its target, with the plan's margin for
what a measurement of tensors does not see. The measurement itself is checked against cases worked by hand, and
the logits stay where they are used: a prefill keeps the last position's, a replay never holds a full-vocabulary
float32 tensor."""

from __future__ import annotations

import pytest
import torch

from draftopd.check.memory import LiveBytes, measure, meta_target, model_config
from draftopd.cli import main
from draftopd.config import DrafterConfig
from draftopd.plan import PlanConfig, plan

DRAFTER = DrafterConfig(num_layers=5, block_size=16)
STATED = dict(
    regen_batch=64,
    prompt_tokens=512,
    new_tokens=1024,
    sft_batch=2,
    sequence_tokens=4096,
    opd_rollouts=16,
    opd_new_tokens=2048,
    replay_batch=1,
)
GB = 1e9


@pytest.fixture(scope="module", params=["qwen3-8b", "llama-3.1-8b"])
def report(request):
    return plan(PlanConfig(target_config=request.param, **STATED), DRAFTER)


def test_every_flow_fits_an_80gb_gpu_at_8b_scale(report):
    assert report.target_params > 7.5e9 and report.drafter_params > 0.9e9  # the sizes stated, really built
    for flow in report.flows:
        assert report.fits(flow.flow, 80.0), report.table()
        assert flow.peak >= flow.target + flow.drafter + flow.optimizer + flow.kv_cache  # the parts are inside the peak


def test_the_kv_cache_is_what_its_shape_says(report):
    """Regeneration preallocates the target's cache for prompt + new tokens (+1 slot for the one-token step's
    block): layers x 2 (keys, values) x kv heads x head_dim x 2 bytes a token."""
    cfg = model_config(report.config["target_config"])
    head_dim = cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    per_token = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * 2
    tokens = STATED["regen_batch"] * (STATED["prompt_tokens"] + STATED["new_tokens"] + 1)
    assert report.flow("regenerate").kv_cache == per_token * tokens


def test_optimizer_and_drafter_bytes(report):
    sft = report.flow("sft-online")
    assert sft.optimizer == 12 * report.drafter_params  # float32 gradients + AdamW's two moments
    assert sft.drafter == 4 * report.drafter_params  # float32 weights (the target's head is shared, not counted)


def test_live_bytes_counts_what_is_alive_and_the_peak():
    with LiveBytes() as live:
        a = torch.empty(1000, dtype=torch.float32, device="meta")  # 4000 bytes
        b = torch.empty(500, dtype=torch.bfloat16, device="meta")  # 1000
        view = a[:10]  # a view is not new memory
        assert live.live == 5000
        del a, view
        c = torch.empty(250, dtype=torch.int64, device="meta")  # 2000: peak stays 5000
        assert live.live == 3000 and live.peak == 5000
    del b, c


def test_a_prefill_keeps_only_the_last_positions_logits():
    """A 64 x 512 prefill of Qwen3-8B: the head runs at each prompt's last token only, in bf16 (64 x 151,936 x 2 bytes
    = 19 MB); all-position logits would be 10 GB, and their float32 copy 20 GB more. What is left is the layers' own
    activations (an MLP's 64 x 512 x 12,288 bf16 intermediate, 0.8 GB, is the largest tensor)."""
    target = meta_target(model_config("qwen3-8b"))
    with torch.no_grad(), measure(target.model) as live:
        state, out = target.prefill([[1] * 512] * 64)
        assert out.last_logits.shape == (64, 151936) and out.last_logits.dtype == torch.bfloat16
    weights = sum(p.numel() * p.element_size() for p in target.model.parameters())
    kv = sum(t.numel() * t.element_size() for t in state.cache.keys + state.cache.values)
    assert live.peak - weights - kv < 5 * GB and live.largest < 1 * GB


def test_no_flow_makes_a_full_vocabulary_float32_tensor(report):
    """Heads run a chunk of rows at a time (`train/chunked.py`, at most 256 MB of float32 logits): no tensor of any
    flow is as large as float32 logits over one sequence's tokens (4,096 x the vocabulary x 4 bytes: 2.5 GB for
    Qwen3-8B), let alone over every replayed slot (682 segments x 15 slots: 6.2 GB)."""
    vocab = model_config(report.config["target_config"])["vocab_size"]
    for flow in report.flows:
        assert flow.largest < 4096 * vocab * 4, (flow.flow, flow.largest / GB)


def test_plan_command_prints_the_table_and_refuses_a_bad_config(capsys, tmp_path):
    assert main(["plan", "--target-config", "qwen3-0.6b", "--draft-num-layers", "2", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"flows"' in out and '"opd-replay"' in out
    (tmp_path / "config.json").write_text("{not json")
    assert main(["plan", "--target-config", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("draftopd: error: --target-config") and "\n" not in err
    assert main(["plan", "--target-config", "qwen3-0.6b", "--prompt-tokens", "5000"]) == 2
    assert "--prompt-tokens 5000 must be below --sequence-tokens" in capsys.readouterr().err
