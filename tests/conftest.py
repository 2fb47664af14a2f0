"""Shared fixtures: tiny random targets (Llama and Qwen3), drafters, random prompts, reference decoders.

Targets are session-scoped and frozen (`Target` sets requires_grad False and eval mode); tests must not
modify their weights. Drafters are cheap and built per test (or per module) so tests may perturb them.
"""

from __future__ import annotations

import pytest
import torch

from draftopd.config import DrafterConfig
from draftopd.models.dflash import DFlashDrafter
from draftopd.models.drafter import new_drafter
from draftopd.models.load import tiny_target
from draftopd.models.target import Target

ARCHS = ("llama", "qwen3")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest (and share the machine best) on one intra-op thread; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llama_target() -> Target:
    return tiny_target("llama")


@pytest.fixture(scope="session")
def qwen3_target() -> Target:
    return tiny_target("qwen3")


@pytest.fixture(scope="session")
def small_vocab_target() -> Target:
    """Vocabulary of 8: random drafts often match, and sampled distributions can be enumerated exactly."""
    return tiny_target("llama", vocab_size=8, seed=3)


@pytest.fixture(params=ARCHS)
def target(request) -> Target:
    return request.getfixturevalue(f"{request.param}_target")


def make_drafter(target: Target, block_size: int = 8, seed: int = 0, **cfg) -> DFlashDrafter:
    drafter = new_drafter(target, DrafterConfig(block_size=block_size, **cfg), seed=seed)
    return drafter.eval().requires_grad_(False)


def random_prompts(vocab_size: int, lengths: list[int], seed: int) -> list[list[int]]:
    """Prompts of the given lengths; token ids avoid the last id (the tiny targets' EOS/pad)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size - 1, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def hf_greedy(target: Target, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy continuation by transformers `generate`, exactly `n` tokens.

    EOS is switched off (`eos_token_id=None`) rather than forced away with `min_new_tokens`: min_new_tokens
    suppresses the EOS logit, which changes the greedy text whenever EOS is the argmax, while the
    speculative decoder with `stop_at_eos=False` keeps the target's real argmax (EOS included).
    """
    ids = torch.tensor([prompt], device=target.device)
    out = target.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=target.pad_id)
    tokens = out[0, len(prompt) :].tolist()
    assert len(tokens) == n
    return tokens


@torch.no_grad()
def full_logits(target: Target, tokens: list[int]) -> torch.Tensor:
    """Plain full forward of one sequence (no cache, no mask): (len, V) float logits."""
    return target.model(torch.tensor([tokens], device=target.device)).logits[0].float()
