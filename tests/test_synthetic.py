"""The synthetic target (`draftopd/models/synthetic.py`): its language, tokenizer, prompt set, build and cache, and
its bad specs."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from draftopd.config import ConfigError
from draftopd.data.prompts import load_prompts
from draftopd.models import synthetic
from draftopd.models.load import load_target
from draftopd.models.synthetic import SyntheticLanguage, SyntheticSpec, candidate_probs, repeated_ngram_share

TINY = SyntheticSpec(
    topics=2, words=12, max_word=4, branching=3, layers=1, hidden=16, heads=2, train_sequences=32, train_tokens=24, train_steps=3, batch=4
)


def test_candidates_follow_the_spec():
    assert candidate_probs(0.7, 4) == pytest.approx([0.7, 0.3 * 4 / 7, 0.3 * 2 / 7, 0.3 / 7]) and sum(
        candidate_probs(0.72, 5)
    ) == pytest.approx(1)
    lang = SyntheticLanguage(TINY)
    options = lang.candidates(1, 3, 2)
    assert len(set(options)) == 3 and set(options) <= set(lang.topic_words[1]) and options == lang.candidates(1, 3, 2)
    assert lang.end_probability(TINY.min_sentence - 1) == 0 and lang.end_probability(TINY.min_sentence) == pytest.approx(TINY.end_step)


def test_texts_are_words_of_the_lexicon_and_greedy_takes_the_first_candidate():
    lang = SyntheticLanguage(TINY)
    ids = lang.sample(random.Random(0), 200)
    text = lang.decode(ids).removesuffix("<eos>")
    assert text.startswith("<t") and all(w.strip(".") in lang.lexicon for w in text.split(">", 1)[1].split())
    greedy = lang.sample_words(0, random.Random(1), 6, greedy=True)
    assert lang.lexicon.index(greedy[0]) == lang.candidates(0, -1, 0)[0]
    assert lang.lexicon.index(greedy[1]) == lang.candidates(0, lang.lexicon.index(greedy[0]), 1)[0]


def test_tokenizer_and_encoding_agree():
    lang = SyntheticLanguage(TINY)
    text = "<t1>" + " ".join(lang.lexicon[:3]) + "."
    ids = lang.encode(text)
    assert lang.decode(ids) == text and ids[0] == lang.topic_token(1)
    tokenizer = lang.tokenizer()
    assert tokenizer(text, add_special_tokens=False).input_ids == ids and tokenizer.decode(ids) == text


def test_repeated_ngram_share_on_worked_cases():
    assert repeated_ngram_share([1, 2, 3, 4, 5, 6]) == 0
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)  # (1,2,3,4) seen again, 5 4-grams


def test_prompt_set_is_seeded_and_split(monkeypatch):
    monkeypatch.setattr(synthetic, "DEFAULT_SPEC", TINY)
    held = load_prompts("synthetic", split="heldout", limit=50)
    train = load_prompts("synthetic", split="train", limit=50)
    assert not {p.id for p in held.prompts} & {p.id for p in train.prompts}
    assert [p.raw for p in held.prompts] == [p.raw for p in load_prompts("synthetic", split="heldout", limit=50).prompts]
    assert all(p.raw.startswith("<t") for p in held.prompts)


def test_the_named_target_is_built_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("DRAFTOPD_CACHE", str(tmp_path))
    monkeypatch.setattr(synthetic, "DEFAULT_SPEC", TINY)
    target = load_target("synthetic")
    lang = SyntheticLanguage(TINY)
    assert target.vocab_size == lang.vocab_size and target.num_layers == 1 and target.eos_ids == {lang.vocab["<eos>"]}
    folder = tmp_path / "targets" / f"synthetic-{TINY.key()}"
    assert (folder / "synthetic.json").is_file() and not (folder.with_name(folder.name + ".tmp")).exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    load_target("synthetic")  # loads, does not rebuild
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert target.tokenizer("<t0>" + lang.lexicon[0]).input_ids == lang.encode("<t0>" + lang.lexicon[0])


@pytest.mark.parametrize(
    "change,flag",
    [
        ({"words": 0}, "--synthetic-words"),
        ({"peak": 1.5}, "--synthetic-peak"),
        ({"peak": 0.0}, "--synthetic-peak"),
        ({"branching": 20}, "--synthetic-branching"),
        ({"max_word": 1}, "--synthetic-max-word"),
        ({"hidden": 30, "heads": 4}, "--synthetic-hidden"),
        ({"eos": -0.1}, "--synthetic-eos"),
    ],
)
def test_a_spec_that_cannot_be_built_is_one_line(change, flag):
    with pytest.raises(ConfigError, match=flag) as err:
        replace(TINY, **change)
    assert "\n" not in str(err.value)
