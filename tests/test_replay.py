"""Greedy replay (`eval/replay.py`) against the decoder it stands in for: same rounds, accepted drafts and tau."""

from __future__ import annotations

import pytest
import torch
from conftest import make_drafter, random_prompts

from draftopd.config import DecodeConfig
from draftopd.decode.speculative import autoregressive_generate, generate
from draftopd.decode.stats import summarize
from draftopd.eval.replay import replay_tau, walk_rounds


def test_walk_rounds_by_hand():
    # 6 new tokens: the first comes from the prefill; at offset 0 two drafts are accepted (3 tokens), at offset 3 one
    # is accepted but only 2 tokens remain to commit.
    text = walk_rounds([2, 0, 0, 1, 0], 6)
    assert text.accepted == (2, 1) and text.committed == 5 and text.rounds == 2
    assert walk_rounds([], 1).rounds == 0


@pytest.mark.parametrize(
    "name,draft_vocab,stop_at_eos,arch",
    [
        ("small_vocab_target", None, False, "dflash"),
        ("small_vocab_target", None, True, "dflash"),
        ("llama_target", None, False, "dflash"),
        ("llama_target", 32, False, "dflash"),
        ("small_vocab_target", None, False, "eagle3"),
        ("llama_target", 32, False, "eagle3"),
    ],
)
def test_replay_equals_greedy_speculative_decoding(request, one_thread, name, draft_vocab, stop_at_eos, arch):
    """For EAGLE-3 this is also the training-time-test check: the chain teacher-forced on the text accepts exactly
    what the decoder's sequential chain (with its KV cache, holes and corrections) accepted."""
    target = request.getfixturevalue(name)
    drafter = make_drafter(target, block_size=4, seed=1, vocab_size=draft_vocab, arch=arch)
    if draft_vocab is not None:
        drafter.set_draft_vocab(torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(0))[:draft_vocab])
    prompts = random_prompts(target.vocab_size, [5, 9, 3, 12, 7, 4], seed=4)
    cfg = DecodeConfig(max_new_tokens=40, stop_at_eos=stop_at_eos)
    outputs = [t.output for t in autoregressive_generate(target, prompts, cfg).traces]
    decoded = generate(target, drafter, prompts, cfg)
    replayed = replay_tau(target, drafter, prompts, outputs, batch_size=3)
    assert [t.output for t in decoded.traces] == outputs  # lossless (float32), so the replay's text is the decoder's
    for trace, text in zip(decoded.traces, replayed.texts):
        assert text.rounds == trace.rounds
        assert list(text.accepted[:-1]) == trace.accepted[:-1]  # the last round may draft past the text's end
        assert text.committed == len(trace.output) - 1
    assert replayed.tau == pytest.approx(summarize(decoded).tau)
    if name == "small_vocab_target":  # vocabulary of 8: random drafts are often accepted, so the walk is exercised
        assert sum(r for t in replayed.texts for r in t.accepted) >= 4
    low, high = replayed.tau_ci(resamples=200)
    assert low <= replayed.tau <= high
    assert len(replayed.slot_acceptance()) == 3


def test_replay_rejects_ragged_input(llama_target):
    with pytest.raises(ValueError):
        replay_tau(llama_target, make_drafter(llama_target), [[1, 2]], [])


def test_scored_texts_are_shared_by_drafters_and_checked(llama_target):
    from draftopd.eval.replay import replay_scored, score_texts

    prompts = random_prompts(llama_target.vocab_size, [4, 7], seed=2)
    outputs = [t.output for t in autoregressive_generate(llama_target, prompts, DecodeConfig(max_new_tokens=12)).traces]
    a, b = make_drafter(llama_target, block_size=4, seed=1), make_drafter(llama_target, block_size=4, seed=2)
    scored = score_texts(llama_target, a.spec.target_layer_ids, prompts, outputs, batch_size=1)
    assert replay_scored(a, scored) == replay_tau(llama_target, a, prompts, outputs)
    assert replay_scored(b, scored) == replay_tau(llama_target, b, prompts, outputs)
    other = make_drafter(llama_target, block_size=4, target_layer_ids=(0,))
    with pytest.raises(ValueError, match="target layers"):
        replay_scored(other, scored)


@pytest.mark.parametrize("draft_vocab", [None, 6])
def test_tree_coverage_chain_equals_replay_and_wider_trees_accept_more(small_vocab_target, one_thread, monkeypatch, draft_vocab):
    """experiments/tree-coverage/tree_coverage.py: the top-1 chain over all slots walks exactly the replay's rounds (so the ranks are
    right), and a wider tree never takes more rounds, every text."""
    from pathlib import Path

    from draftopd.eval.replay import replay_scored, score_texts

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments" / "tree-coverage"))
    from tree_coverage import target_ranks, tree_rounds

    target = small_vocab_target
    drafter = make_drafter(target, block_size=4, seed=2, vocab_size=draft_vocab)
    if draft_vocab is not None:
        drafter.set_draft_vocab(torch.arange(draft_vocab))
    prompts = random_prompts(target.vocab_size, [5, 9, 3, 12, 7, 4], seed=5)
    outputs = [t.output for t in autoregressive_generate(target, prompts, DecodeConfig(max_new_tokens=30)).traces]
    scored = score_texts(target, drafter.spec.target_layer_ids, prompts, outputs, batch_size=4)
    ranks = target_ranks(drafter, scored)
    replayed = replay_scored(drafter, scored)
    chains = [tree_rounds(r, (1, 1, 1), len(o)) for r, o in zip(ranks, outputs)]
    assert [c.accepted for c in chains] == [t.accepted for t in replayed.texts]
    for r, o, chain in zip(ranks, outputs, chains):
        wide = tree_rounds(r, (3, 2, 2), len(o))
        assert wide.rounds <= chain.rounds and wide.committed == chain.committed
    assert sum(tree_rounds(r, (8, 8, 8), len(o)).rounds for r, o in zip(ranks, outputs)) < sum(c.rounds for c in chains)
