"""Offline feature cache, reduced draft vocabulary, mask-token MASK, and SFT from the cache."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import random_prompts
from test_decode import SAMPLING_PROMPT, _chi2_pvalue, _exact_joint3, _sampled_joint3

from draftopd.config import DecodeConfig, DrafterConfig, OptimConfig, SFTConfig
from draftopd.data.features import FeatureCache, SequenceShape, build_feature_cache, frequent_tokens, read_manifest, shard_plan
from draftopd.data.prompts import DataError
from draftopd.decode.speculative import autoregressive_generate, generate
from draftopd.models.drafter import DrafterError, load_drafter, new_drafter, save_drafter
from draftopd.train.blocks import pad_batch, score_batch
from draftopd.train.sft import sft_micro_batch, train_sft

LAYERS = (0, 2)


@dataclass(frozen=True)
class Example:
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]


def examples(n: int = 10, vocab: int = 64) -> list[Example]:
    seqs = random_prompts(vocab, [6 + (i * 7) % 30 for i in range(n)], seed=4)
    return [Example(tuple(s[:4]), tuple(s[4:])) for s in seqs]


def test_cache_equals_online_forward_and_resumes(llama_target, tmp_path, one_thread) -> None:
    data = examples()
    manifest = build_feature_cache(llama_target, data, tmp_path / "a", LAYERS, shard_tokens=60, progress=False)
    assert manifest.sequences == len(data) and len(manifest.shards) > 2
    cache = FeatureCache.open(tmp_path / "a", llama_target, LAYERS, need_final=True)
    batch = pad_batch([list(e.prompt_ids) + list(e.response_ids) for e in data], [4] * len(data), llama_target.pad_id)
    drafter = new_drafter(llama_target, DrafterConfig(target_layer_ids=LAYERS))
    online = score_batch(llama_target, drafter, batch)
    for i, e in enumerate(data):
        c, n = cache[i], len(e.prompt_ids) + len(e.response_ids)
        assert c.tokens.tolist() == list(e.prompt_ids) + list(e.response_ids) and c.response_start == 4
        torch.testing.assert_close(c.features.float(), online.features[i, :n].float(), atol=0.05, rtol=0.02)  # bf16 storage
        assert torch.equal(c.greedy, llama_target.logits(online.final[i, :n]).argmax(-1))
        torch.testing.assert_close(llama_target.lm_head(c.final.float()), llama_target.logits(online.final[i, :n]), atol=0.1, rtol=0.05)
    # kill -9 after two shards: the manifest lists only finished shards; a rerun completes the same cache
    partial = tmp_path / "b"
    build_feature_cache(llama_target, data, partial, LAYERS, shard_tokens=60, progress=False)
    raw = json.loads((partial / "manifest.json").read_text())
    for shard in raw["shards"][2:]:
        (partial / shard["file"]).unlink()
    raw["shards"] = raw["shards"][:2]
    (partial / "manifest.json").write_text(json.dumps(raw))
    (partial / "shard-00002.safetensors.tmp").write_bytes(b"torn")
    resumed = build_feature_cache(llama_target, data, partial, LAYERS, shard_tokens=60, progress=False)
    assert resumed.shards == manifest.shards
    again = FeatureCache.open(partial, llama_target, LAYERS)
    assert all(torch.equal(again[i].features, cache[i].features) for i in range(len(data)))


def test_cache_refuses_other_target_layers_and_truncation(llama_target, qwen3_target, tmp_path) -> None:
    build_feature_cache(llama_target, examples(4), tmp_path, LAYERS, progress=False)
    with pytest.raises(DataError, match=r"holds target layers .* also reads \[5\]"):
        FeatureCache.open(tmp_path, llama_target, (LAYERS[0], 5))
    with pytest.raises(DataError, match="weights_hash"):
        FeatureCache.open(tmp_path, qwen3_target, LAYERS)
    with pytest.raises(DataError, match="layer_ids"):
        build_feature_cache(llama_target, examples(4), tmp_path, (1,), progress=False)
    shard = tmp_path / read_manifest(tmp_path).shards[0]["file"]
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(DataError, match="unreadable|truncated"):
        FeatureCache.open(tmp_path, llama_target, LAYERS)[0]
    with pytest.raises(DataError, match="no feature cache"):
        FeatureCache.open(tmp_path / "none", llama_target, LAYERS)
    with pytest.raises(DataError, match="no examples"):
        build_feature_cache(llama_target, [], tmp_path / "empty", LAYERS, progress=False)


def test_shard_plan_covers_every_example_once() -> None:
    plan = shard_plan([5, 5, 5, 50, 1, 1], 10)
    assert [list(r) for r in plan] == [[0, 1], [2, 3], [4, 5]]


@pytest.mark.parametrize("loss", ["ce", "kl"])
def test_sft_from_cache_matches_online_sft(llama_target, tmp_path, loss, one_thread) -> None:
    """Same seed, same batch: the cached step's loss equals the online one up to bf16 storage of the features."""
    data = examples(8)
    build_feature_cache(llama_target, data, tmp_path, LAYERS, progress=False)
    cache = FeatureCache.open(tmp_path, llama_target, LAYERS)
    cfg = SFTConfig(batch_size=8, anchors_per_seq=8, loss=loss, labels="greedy")
    drafter = new_drafter(llama_target, DrafterConfig(block_size=4, target_layer_ids=LAYERS, vocab_size=32))
    drafter.set_draft_vocab(torch.arange(0, 64, 2))
    online = sft_micro_batch(llama_target, drafter, data, cfg, torch.Generator().manual_seed(0))
    cached = sft_micro_batch(llama_target, drafter, [cache[i] for i in range(8)], cfg, torch.Generator().manual_seed(0))
    assert cached.target_tokens == 0 and online.target_tokens > 0
    assert cached.weight_sum == pytest.approx(online.weight_sum)  # labels outside the draft vocabulary are skipped alike
    assert float(cached.loss_sum.detach()) == pytest.approx(float(online.loss_sum.detach()), rel=0.02)
    drafter_b = new_drafter(llama_target, DrafterConfig(block_size=4, target_layer_ids=LAYERS))
    train_sft(
        llama_target,
        drafter_b,
        cache,
        SFTConfig(steps=3, batch_size=4, anchors_per_seq=4, labels="greedy", optim=OptimConfig(lr=1e-3)),
        tmp_path / "run",
        progress=False,
    )
    assert (tmp_path / "run" / "last" / "trainer.pt").exists()


@pytest.fixture
def read_keys(monkeypatch) -> list[str]:
    """The tensors read from cache shards (every `get_tensor` / `get_slice` key), in order."""
    import safetensors

    keys, real = [], safetensors.safe_open

    class Spy:
        def __init__(self, *args, **kwargs):
            self.handle = real(*args, **kwargs)

        def get_tensor(self, key):
            return keys.append(key) or self.handle.get_tensor(key)

        def get_slice(self, key):
            return keys.append(key) or self.handle.get_slice(key)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    return keys


@pytest.mark.parametrize("labels", ["greedy", "text"])
def test_frequent_tokens_of_a_cache_read_no_features(llama_target, tmp_path, labels, read_keys, monkeypatch) -> None:
    data = examples()
    data[0] = Example((), data[0].response_ids)  # no prompt: greedy labels from its first position on
    build_feature_cache(llama_target, data, tmp_path, LAYERS, shard_tokens=60, progress=False)
    cache = FeatureCache.open(tmp_path, llama_target, LAYERS)
    want = frequent_tokens([cache[i] for i in range(len(cache))], 64, 20, labels)
    counted = torch.zeros(64, dtype=torch.long)
    for i in range(len(cache)):
        c = cache[i]
        ids = c.greedy[max(c.response_start - 1, 0) : -1] if labels == "greedy" else c.tokens[c.response_start :]
        counted += torch.bincount(ids, minlength=64)
    assert torch.equal(want, counted.topk(20).indices.sort().values)
    read_keys.clear()
    monkeypatch.setattr(FeatureCache, "__getitem__", lambda self, i: pytest.fail("read a whole sequence"))
    fresh = FeatureCache.open(tmp_path, llama_target, LAYERS)
    assert torch.equal(frequent_tokens(fresh, 64, 20, labels), want)
    assert set(read_keys) == {"offsets", "response_start", "greedy" if labels == "greedy" else "tokens"}


def test_sequence_shape_reads_offsets_and_response_starts_only(llama_target, tmp_path, read_keys) -> None:
    build_feature_cache(llama_target, examples(), tmp_path, LAYERS, shard_tokens=60, progress=False)
    cache = FeatureCache.open(tmp_path, llama_target, LAYERS)
    read_keys.clear()
    shapes = [cache.shape(i) for i in range(len(cache))]
    assert set(read_keys) == {"offsets", "response_start"}
    assert shapes == [SequenceShape(len(cache[i].tokens), cache[i].response_start) for i in range(len(cache))]


def reduced_drafter(target, vocab: int, block_size: int = 4, **cfg):
    drafter = new_drafter(target, DrafterConfig(block_size=block_size, vocab_size=vocab, **cfg), seed=1)
    drafter.set_draft_vocab(torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(0))[:vocab])
    return drafter.eval().requires_grad_(False)


def test_reduced_vocab_maps_and_round_trips(llama_target, tmp_path) -> None:
    drafter = reduced_drafter(llama_target, 16, mask_token_id=5)
    kept = drafter.draft_to_target(torch.arange(16))
    assert kept.tolist() == sorted(kept.tolist()) and int(drafter.t2d.sum()) == 16
    assert torch.equal(drafter.target_to_draft(kept), torch.arange(16))
    outside = torch.tensor([t for t in range(64) if t not in kept.tolist()])
    assert (drafter.target_to_draft(outside) == -1).all()
    assert not hasattr(drafter, "mask_embedding")  # MASK is the target's row 5, nothing learned
    save_drafter(drafter, tmp_path)
    loaded = load_drafter(tmp_path, llama_target)
    assert torch.equal(loaded.d2t, drafter.d2t) and torch.equal(loaded.head_weight, drafter.head_weight)
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "model.safetensors"))) >= {"d2t", "t2d"}
    with pytest.raises(DrafterError, match="distinct"):
        drafter.set_draft_vocab(torch.zeros(16, dtype=torch.long))


def test_reduced_vocab_greedy_is_lossless(llama_target) -> None:
    drafter = reduced_drafter(llama_target, 24, block_size=8)
    prompts = random_prompts(64, [5, 9, 3], seed=2)
    cfg = DecodeConfig(max_new_tokens=30, stop_at_eos=False)
    spec, ar = generate(llama_target, drafter, prompts, cfg), autoregressive_generate(llama_target, prompts, cfg)
    assert [t.output for t in spec.traces] == [t.output for t in ar.traces]
    assert all(bool(drafter.t2d[d].all()) for t in spec.traces for d in t.drafts)  # drafts come from the kept tokens only


def test_reduced_vocab_sampling_is_lossless(small_vocab_target) -> None:
    drafter = reduced_drafter(small_vocab_target, 5)
    with torch.no_grad():
        drafter.norm.weight.mul_(3.0)
    counts = _sampled_joint3(small_vocab_target, drafter, 1.0, seed=1)
    assert _chi2_pvalue(counts, _exact_joint3(small_vocab_target, SAMPLING_PROMPT, 1.0)) > 1e-4
