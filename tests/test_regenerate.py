"""Tests for draftopd.data.regenerate on a tiny random target (pre-tokenized prompts, no tokenizer)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from draftopd.config import DecodeConfig, DrafterConfig
from draftopd.data.prompts import DataError, Prompt
from draftopd.data.regenerate import SFTExample, check_output, load_regenerated, loop_start, record_seed, regenerate
from draftopd.decode.loops import LoopWatch
from draftopd.decode.speculative import autoregressive_generate
from draftopd.models.drafter import new_drafter
from draftopd.models.load import tiny_target

CFG = DecodeConfig(max_new_tokens=12)


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def _prompts(n: int, seed: int = 1, lengths=(5, 9, 3, 12, 7, 4, 10)) -> tuple[list[Prompt], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [Prompt(f"p{i}", "unit", (("user", f"prompt {i}"),)) for i in range(n)]
    ids = [torch.randint(0, 63, (lengths[i % len(lengths)],), generator=g).tolist() for i in range(n)]
    return prompts, ids


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_writes_records_equal_to_autoregressive(target, tmp_path):
    prompts, ids = _prompts(5)
    out = tmp_path / "sub" / "regen.jsonl"
    summary = regenerate(target, prompts, out, CFG, batch_size=2, prompt_ids=ids, progress=False)
    assert (summary.written, summary.skipped_done, summary.skipped_too_long) == (5, 0, 0)
    records = _records(out)
    assert [r["id"] for r in records] == [p.id for p in prompts]
    assert summary.tokens == sum(len(r["response_ids"]) for r in records)
    for start in range(0, 5, 2):
        want = autoregressive_generate(target, ids[start : start + 2], CFG)
        for r, p, trace in zip(records[start : start + 2], ids[start : start + 2], want.traces):
            assert set(r) == {"id", "source", "prompt_ids", "response_ids", "finish", "settings"}
            assert r["source"] == "unit" and r["prompt_ids"] == p
            assert r["response_ids"] == trace.output and r["finish"] == trace.finish in ("eos", "length")
            assert r["settings"] == {
                "target": target.name,
                "max_new_tokens": 12,
                "temperature": 0.0,
                "seed": 0,
                "stop_at_loop": False,
                "record_seed": record_seed(0, r["id"]),
                "chat_template": None,
            }
    for p, r in zip(ids, records):  # batching does not change greedy text
        assert autoregressive_generate(target, [p], CFG).traces[0].output == r["response_ids"]


def test_rerun_skips_done_and_torn_line(target, tmp_path):
    prompts, ids = _prompts(6)
    out = tmp_path / "regen.jsonl"
    regenerate(target, prompts[:3], out, CFG, prompt_ids=ids[:3], progress=False)
    full = out.read_text()
    out.write_text(full + '{"id":"p3","source":"unit","prompt_i')  # a kill mid-write
    inode = os.stat(out).st_ino
    summary = regenerate(target, prompts, out, CFG, batch_size=4, prompt_ids=ids, progress=False)
    assert (summary.written, summary.skipped_done) == (3, 3)
    assert os.stat(out).st_ino == inode and out.read_text().startswith(full)  # cut in place, never rewritten
    records = _records(out)  # every line parses: the torn one is gone
    assert [r["id"] for r in records] == [f"p{i}" for i in range(6)]
    again = regenerate(target, prompts, out, CFG, prompt_ids=ids, progress=False)
    assert (again.written, again.skipped_done, again.tokens) == (0, 6, 0)
    assert len(_records(out)) == 6


def test_last_record_without_newline_is_kept(target, tmp_path):
    """A kill between a record and its newline: the record counts as done and the next one starts a new line."""
    prompts, ids = _prompts(4)
    out = tmp_path / "regen.jsonl"
    regenerate(target, prompts[:2], out, CFG, prompt_ids=ids[:2], progress=False)
    out.write_text(out.read_text().rstrip("\n"))
    summary = regenerate(target, prompts, out, CFG, prompt_ids=ids, progress=False)
    assert (summary.written, summary.skipped_done) == (2, 2)
    assert [r["id"] for r in _records(out)] == ["p0", "p1", "p2", "p3"]


def _record_line(rid) -> str:
    return json.dumps({"id": rid, "prompt_ids": [1, 2], "response_ids": [3]})


FOREIGN_FILES = {  # what a user may point --out at by mistake: each must come out byte-identical
    "prompt file": "\n".join(json.dumps({"prompt": f"question {i}"}) for i in range(3)).encode() + b"\n",
    "one prompt, no newline": json.dumps({"id": "q1", "prompt": "question"}).encode(),
    "notes": b"shopping list\nmilk\n",
    "integer id": (_record_line("a") + "\n" + json.dumps({"id": 5, "prompt_ids": [1], "response_ids": [2]}) + "\n").encode(),
    "token ids not lists": (json.dumps({"id": "a", "prompt_ids": "1 2", "response_ids": [3]}) + "\n").encode(),
    "junk between records": (_record_line("a") + "\nnot json\n" + _record_line("b") + "\n").encode(),
    "complete foreign last line": (_record_line("a") + "\n" + '{"id": 7}').encode(),
    "not UTF-8": b"\xff\xfe binary\n",
}


@pytest.mark.parametrize("kind", list(FOREIGN_FILES))
def test_foreign_output_file_is_refused_untouched(target, tmp_path, kind):
    prompts, ids = _prompts(3)
    out = tmp_path / "out.jsonl"
    out.write_bytes(FOREIGN_FILES[kind])
    before = out.read_bytes()
    with pytest.raises(DataError, match="refusing to append"):
        check_output(out)
    with pytest.raises(DataError, match="refusing to append"):
        regenerate(target, prompts, out, CFG, prompt_ids=ids, progress=False)
    assert out.read_bytes() == before


def test_output_directory_is_refused(target, tmp_path):
    prompts, ids = _prompts(1)
    with pytest.raises(DataError, match="is a directory"):
        regenerate(target, prompts, tmp_path, CFG, prompt_ids=ids, progress=False)


def test_record_seed_is_a_stable_hash():
    want = int.from_bytes(hashlib.blake2b(b"regenerate\x003\x00p7", digest_size=8).digest(), "big") >> 1
    assert record_seed(3, "p7") == want and record_seed(3, "p8") != want and record_seed(4, "p7") != want


@pytest.mark.parametrize("with_drafter", [False, True])
def test_resume_at_temperature_is_exact(target, tmp_path, with_drafter):
    """Sampling at T=0.8: a run killed after its first batch and resumed with another batch size writes exactly
    the records of one uninterrupted run (each record's randomness depends only on the seed and its id)."""
    prompts, ids = _prompts(12, seed=5)
    cfg = DecodeConfig(max_new_tokens=12, temperature=0.8, seed=11)
    drafter = new_drafter(target, DrafterConfig(block_size=4)) if with_drafter else None
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    regenerate(target, prompts, whole, cfg, batch_size=4, prompt_ids=ids, drafter=drafter, progress=False)
    regenerate(target, prompts[:4], resumed, cfg, batch_size=4, prompt_ids=ids[:4], drafter=drafter, progress=False)  # killed here
    summary = regenerate(target, prompts, resumed, cfg, batch_size=5, prompt_ids=ids, drafter=drafter, progress=False)
    assert (summary.written, summary.skipped_done) == (8, 4)
    assert _records(resumed) == _records(whole)
    assert len({tuple(r["response_ids"]) for r in _records(whole)}) == 12
    assert {r["settings"]["record_seed"] for r in _records(whole)} == {record_seed(11, p.id) for p in prompts}


def test_too_long_prompts_are_skipped(target, tmp_path):
    prompts, ids = _prompts(3)
    ids[1] = [1] * 40
    out = tmp_path / "regen.jsonl"
    summary = regenerate(target, prompts, out, CFG, prompt_ids=ids, max_prompt_tokens=20, progress=False)
    assert (summary.written, summary.skipped_too_long) == (2, 1)
    assert [r["id"] for r in _records(out)] == ["p0", "p2"]


def test_drafter_gives_identical_output(target, tmp_path):
    prompts, ids = _prompts(4)
    drafter = new_drafter(target, DrafterConfig(block_size=8))
    plain, spec = tmp_path / "ar.jsonl", tmp_path / "spec.jsonl"
    regenerate(target, prompts, plain, CFG, batch_size=3, prompt_ids=ids, progress=False)
    regenerate(target, prompts, spec, CFG, batch_size=3, prompt_ids=ids, drafter=drafter, progress=False)
    assert _records(plain) == _records(spec)


def test_no_tokenizer_without_prompt_ids_is_an_error(target, tmp_path):
    prompts, _ = _prompts(1)
    with pytest.raises(DataError, match="no tokenizer"):
        regenerate(target, prompts, tmp_path / "x.jsonl", CFG, progress=False)


def test_load_regenerated(target, tmp_path):
    prompts, ids = _prompts(3)
    out = tmp_path / "regen.jsonl"
    regenerate(target, prompts, out, CFG, prompt_ids=ids, progress=False)
    good = _records(out)
    bad = [
        "not json",
        json.dumps({**good[0], "id": "empty", "response_ids": []}),
        json.dumps({"id": "x"}),
        json.dumps({**good[0], "prompt_ids": ["a"], "id": "strs"}),
        json.dumps(good[1]),
    ]  # last: repeated id
    out.write_text(out.read_text() + "\n".join(bad) + "\n\n")
    data = load_regenerated(out)
    assert data.skipped == 5
    assert [e.id for e in data.examples] == ["p0", "p1", "p2"]
    assert data.examples[0] == SFTExample("p0", tuple(ids[0]), tuple(good[0]["response_ids"]))


def test_load_regenerated_empty_raises(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no usable training examples"):
        load_regenerated(empty)
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{\n" + json.dumps({"id": "a", "prompt_ids": [1], "response_ids": []}) + "\n")
    with pytest.raises(DataError, match="no usable training examples"):
        load_regenerated(junk)
    with pytest.raises(DataError):
        load_regenerated(tmp_path / "missing.jsonl")


def test_load_regenerated_reads_gzipped_files(tmp_path):
    import gzip as gz

    lines = [json.dumps({"id": f"r{i}", "prompt_ids": [1, 2], "response_ids": [3, i + 4]}) for i in range(3)]
    plain, packed = tmp_path / "r.jsonl", tmp_path / "r.jsonl.gz"
    plain.write_text("\n".join(lines) + "\n")
    with gz.open(packed, "wt") as f:
        f.write("\n".join(lines) + "\n")
    assert load_regenerated(packed).examples == load_regenerated(plain).examples
    assert len(load_regenerated(packed).examples) == 3


def test_loop_start_and_trim_loops_on_load(tmp_path):
    """A greedy loop starts where 8 repeated 4-grams in a row begin; the text before it (the loop's first pass
    included) stays, so a cut answer is never empty. `load_regenerated(trim_loops=True)` cuts there and counts what it
    cut."""
    looped = [10, 11, 12, 13, 14] + [1, 2, 3] * 10
    assert loop_start(looped) == 8 and loop_start(list(range(40))) == 40
    short_repeat = [1, 2, 3] * 3 + list(range(20, 40))
    assert loop_start(short_repeat) == len(short_repeat)  # three repeated 4-grams are not a loop
    assert loop_start([7] * 20) == 1
    path = tmp_path / "regen.jsonl"
    path.write_text(
        "".join(
            json.dumps({"id": str(i), "prompt_ids": [5], "response_ids": r}) + "\n"
            for i, r in enumerate([looped, list(range(40)), [7] * 20])
        )
    )
    plain, trimmed = load_regenerated(path), load_regenerated(path, trim_loops=True)
    assert [e.response_ids for e in plain.examples] == [tuple(looped), tuple(range(40)), (7,) * 20] and plain.loop_tokens_cut == 0
    assert [e.response_ids for e in trimmed.examples] == [tuple(looped[:8]), tuple(range(40)), (7,)]
    assert (trimmed.skipped, trimmed.loop_tokens_cut) == (0, 27 + 19)


def test_loop_watch_finds_the_loop_when_its_last_token_arrives():
    """`LoopWatch` (one token at a time) says "looped" exactly at the token that completes the 8th repeated 4-gram,
    and its start is `loop_start`'s, on texts with and without loops."""
    g = torch.Generator().manual_seed(0)
    texts = [
        [10, 11, 12, 13, 14] + [1, 2, 3] * 10,
        list(range(40)),
        [7] * 20,
        *(torch.randint(0, 4, (60,), generator=g).tolist() for _ in range(20)),
    ]
    for text in texts:
        watch, when = LoopWatch(), None
        for i, token in enumerate(text):
            if watch.push(token) and when is None:
                when = i + 1
        start = loop_start(text)
        assert (when is None) == (start == len(text))
        if when is not None:
            assert watch.start == start and when == start + 8 + 4 - 1


@pytest.mark.parametrize("with_drafter", [False, True])
def test_stop_at_loop_writes_a_prefix_that_trims_to_the_same_answer(target, tmp_path, with_drafter):
    """`stop_at_loop`: each record is a prefix of the full answer, stopped (finish "loop") right where the loop is
    seen, and cut by `trim_loops` it is the full answer cut: the same training text for fewer decoded tokens."""
    prompts, ids = _prompts(8)
    drafter = new_drafter(target, DrafterConfig(block_size=8)) if with_drafter else None
    full, stopped = tmp_path / "full.jsonl", tmp_path / "stopped.jsonl"
    cfg = DecodeConfig(max_new_tokens=80, stop_at_eos=False)
    regenerate(target, prompts, full, cfg, batch_size=3, prompt_ids=ids, drafter=drafter, progress=False)
    summary = regenerate(
        target,
        prompts,
        stopped,
        DecodeConfig(max_new_tokens=80, stop_at_eos=False, stop_at_loop=True),
        batch_size=3,
        prompt_ids=ids,
        drafter=drafter,
        progress=False,
    )
    a, b = _records(full), _records(stopped)
    assert summary.looped == sum(r["finish"] == "loop" for r in b) >= 4  # the tiny target's greedy text loops
    assert summary.tokens == sum(len(r["response_ids"]) for r in b) < sum(len(r["response_ids"]) for r in a)
    for x, y in zip(a, b):
        assert x["response_ids"][: len(y["response_ids"])] == y["response_ids"]
        assert y["settings"]["stop_at_loop"] and not x["settings"]["stop_at_loop"]
        if y["finish"] == "loop":
            assert len(y["response_ids"]) == loop_start(x["response_ids"]) + 8 + 4 - 1
        else:
            assert y == {**x, "settings": y["settings"]}
    cut_full, cut_stopped = load_regenerated(full, trim_loops=True), load_regenerated(stopped, trim_loops=True)
    assert cut_full.examples == cut_stopped.examples
