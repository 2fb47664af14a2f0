"""Training from the data users have: multi-turn conversations (chat template, loss masks), token-id files, the
reasons bad records are skipped, loss masks through anchors, labels, the feature cache and SFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import save_tiny_target

from draftopd.cli import main
from draftopd.config import DrafterConfig, SFTConfig
from draftopd.data.conversations import RenderCounts, parse_conversation, render_conversation
from draftopd.data.features import FeatureCache, build_feature_cache, frequent_tokens, loss_mask, read_manifest
from draftopd.data.prompts import DataError
from draftopd.data.regenerate import SFTExample, check_token_ids, load_regenerated
from draftopd.data.training import read_data
from draftopd.models.drafter import new_drafter
from draftopd.train.blocks import block_labels, draw_anchors, pad_batch
from draftopd.train.sft import sft_micro_batch

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}{% generation %}"
    "{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\n' }}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
# like Qwen3: the last answer carries an empty think block, earlier answers do not
THINK_LAST = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)

SHAREGPT = {
    "id": "s1",
    "conversations": [
        {"from": "system", "value": "be brief."},
        {"from": "human", "value": "hi there"},
        {"from": "gpt", "value": "hello!"},
        {"from": "user", "value": "more?"},
        {"from": "assistant", "value": "sure."},
    ],
}
OPENAI = {
    "messages": [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "more?"},
        {"role": "assistant", "content": "sure."},
    ]
}


def chat_tokenizer(template: str = CHATML):
    """A character-level fast tokenizer (35 ids, so its ids fit the tiny targets' 64) with a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<|im_start|>", "<|im_end|>"] + list("abcdefghijklmnopqrstuvwxyz .,!?:\n<>/")
    core = Tokenizer(models.BPE({w: i for i, w in enumerate(words)}, [], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = template
    return tok


def trained_text(tok, tokens: list[int], mask: list[bool]) -> list[str]:
    """The decoded runs of trained tokens."""
    runs, run = [], ""
    for t, m in zip(tokens, mask):
        if m:
            run += tok.decode([t])
        elif run:
            runs, run = runs + [run], ""
    return runs + ([run] if run else [])


def render(tok, record, max_tokens: int = 512, counts: RenderCounts | None = None):
    return render_conversation(tok, parse_conversation(record), max_tokens, counts or RenderCounts())


@pytest.mark.parametrize("record", [SHAREGPT, OPENAI], ids=["sharegpt", "openai"])
def test_mask_is_exactly_the_assistant_turns(record):
    tok = chat_tokenizer()
    tokens, mask = render(tok, record)
    assert trained_text(tok, tokens, mask) == ["hello!<|im_end|>", "sure.<|im_end|>"]  # the newline after it is scaffolding
    full = tok.apply_chat_template([{"role": r, "content": c} for r, c in parse_conversation(record)], tokenize=True)["input_ids"]
    assert tokens == full  # the template's own tokens


def test_mask_equals_the_templates_generation_blocks():
    tok = chat_tokenizer(CHATML_GENERATION)
    tokens, mask = render(tok, OPENAI)
    out = tok.apply_chat_template(OPENAI["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert tokens == out["input_ids"] and mask == [bool(m) for m in out["assistant_masks"]]


def test_plain_template_trains_the_answers_without_their_role_names():
    tok = chat_tokenizer(PLAIN)
    tokens, mask = render(tok, SHAREGPT)
    assert trained_text(tok, tokens, mask) == ["hello!", "sure."]


def test_smollm2_template_when_the_embedded_tokenizer_is_here():
    from draftopd.models.load import cache_dir

    folders = sorted((cache_dir() / "targets").glob("smollm2-135m-*"))
    if not folders:
        pytest.skip("the embedded SmolLM2 target has not been converted on this machine")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folders[0])
    record = {
        "messages": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "More"},
            {"role": "assistant", "content": "Sure."},
        ]
    }
    tokens, mask = render(tok, record)
    assert trained_text(tok, tokens, mask) == [
        "Hello! How can I help?<|im_end|>",
        "Sure.<|im_end|>",
    ]  # its default system prompt is context
    assert "You are a helpful AI assistant" in tok.decode(tokens)


def test_turns_a_template_renders_otherwise_later_stay_context():
    tok, counts = chat_tokenizer(THINK_LAST), RenderCounts()
    tokens, mask = render(tok, OPENAI, counts=counts)
    assert trained_text(tok, tokens, mask) == ["sure.<|im_end|>"] and counts.context_turns == 1
    assert "<think></think>sure." in "".join(tok.decode([t]) for t in tokens)


def test_over_long_conversations_are_cut_after_a_turn_or_skipped():
    tok, counts = chat_tokenizer(), RenderCounts()
    tokens, mask = render(tok, OPENAI)
    first_end = tokens.index(2, mask.index(True)) + 1  # after the first answer's <|im_end|>
    assert render(tok, OPENAI, max_tokens=len(tokens) - 1, counts=counts) == (tokens[:-1], mask[:-1])  # the newline after the last answer
    cut = render(tok, OPENAI, max_tokens=len(tokens) - 2, counts=counts)
    assert cut == (tokens[:first_end], mask[:first_end]) and counts.truncated == 2
    assert render(tok, OPENAI, max_tokens=first_end - 1, counts=counts) is None and counts.skipped == {"too long": 1}


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_every_bad_record_is_counted_by_its_reason(tmp_path):
    tok = chat_tokenizer()
    long_answer = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 300}]}
    records = [
        SHAREGPT,
        OPENAI,
        "not json {",
        {"text": "no kind"},
        [1, 2],
        {"conversations": [{"from": "human", "value": "hi"}, "a string turn"]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "hello"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "anyone?"}]},
        {"messages": [{"role": "assistant", "content": "unprompted"}, {"role": "user", "content": "hi"}]},
        {"id": "empty", "conversations": []},
        {**SHAREGPT},  # repeated id s1
        long_answer,
        {"id": 7, "input_ids": [1, 2, 3], "loss_mask": [0, 1]},
        {"id": 8, "input_ids": [1, 2, 3], "loss_mask": [0, 0, 0]},
        {"id": 9, "input_ids": [3] * 200, "loss_mask": [1] * 200},
        {"id": "r", "prompt_ids": [1], "response_ids": []},
        {"prompt_ids": [1], "response_ids": [2]},
    ]
    data = read_data(write_lines(tmp_path / "mixed.jsonl", records), max_tokens=120).examples(tok)
    assert data.summary.skipped == {
        "not JSON": 1,
        "unrecognised record": 2,
        "bad turn": 1,
        "unknown role": 1,
        "empty content": 1,
        "no assistant turn": 3,
        "repeated id": 1,
        "too long": 2,
        "bad token ids": 1,
        "nothing trained": 2,
        "no id": 1,
    }
    assert data.skipped == 16 and len(data.examples) == 2 and data.summary.examples == {"conversations": 2}
    assert "16 skipped" in data.summary.line() and "no assistant turn 3" in data.summary.line()
    refusing = chat_tokenizer(NO_SYSTEM)
    only = read_data(write_lines(tmp_path / "system.jsonl", [OPENAI, long_answer]), max_tokens=120)
    with pytest.raises(DataError, match="template error 1") as err:
        only.examples(refusing)
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match="no tokenizer"):
        only.examples(None)


def test_a_file_with_no_usable_record_is_one_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ["{", {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError) as err:
        read_data(path)
    assert str(err.value).count("\n") == 0 and "no usable training examples" in str(err.value) and "no assistant turn 1" in str(err.value)
    with pytest.raises(DataError, match="no regenerated data"):
        read_data(tmp_path / "missing.jsonl")


def test_token_id_files_in_both_forms(tmp_path):
    records = [
        {"id": "a", "prompt_ids": [5, 6], "response_ids": [7, 8, 9]},
        {"id": "b", "input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 0, 1, 1, 1]},  # a plain response: the same example
        {"id": 3, "input_ids": [5, 6, 7, 8, 9, 10, 11], "loss_mask": [0, 1, 1, 0, 0, 1, 1]},
        {"input_ids": [1, 2], "loss_mask": [1, 1]},
    ]
    path = write_lines(tmp_path / "ids.jsonl", records)
    examples = read_data(path, "token-ids").examples().examples
    assert examples[0] == SFTExample("a", (5, 6), (7, 8, 9)) and examples[1] == SFTExample("b", (5, 6), (7, 8, 9))
    assert examples[2] == SFTExample("3", (5,), (6, 7, 8, 9, 10, 11), (False, True, True, False, False, True, True))
    assert examples[3] == SFTExample("ids.jsonl/3", (), (1, 2))
    assert loss_mask(examples[2]).tolist() == [False, True, True, False, False, True, True]
    regenerated = read_data(path, "regenerated").examples()
    assert regenerated.examples == examples[:1] and regenerated.summary.skipped == {"unrecognised record": 3}
    with pytest.raises(DataError, match="unrecognised record 4"):
        read_data(path, "conversations")
    cut = read_data(path, "token-ids", max_tokens=5).examples()  # the 7-token record is cut after its first span
    assert cut.examples[2] == SFTExample("3", (5,), (6, 7), None) and cut.summary.truncated == 1
    with pytest.raises(DataError) as err:
        check_token_ids(cut, 9, path)
    assert "has token id 9, outside the target vocabulary of 9" in str(err.value) and "\n" not in str(err.value)


def test_regenerated_files_read_as_before(tmp_path):
    """Auto and regenerated formats give `load_regenerated`'s examples and skip count (loop trimming included)."""
    looped = [5, 6, 7, 8] * 12
    records = [
        {"id": "a", "prompt_ids": [1, 2], "response_ids": looped},
        "junk",
        {"id": "b", "prompt_ids": [1], "response_ids": [3, 4]},
        {"id": "a", "prompt_ids": [1], "response_ids": [2]},
        {"id": 4, "prompt_ids": [1], "response_ids": [2]},
    ]
    path = write_lines(tmp_path / "regen.jsonl", records)
    for trim in (False, True):
        old = load_regenerated(path, trim_loops=trim)
        for fmt in ("auto", "regenerated", "token-ids"):
            new = read_data(path, fmt, trim_loops=trim, max_tokens=4).examples()  # regenerated records are never cut
            assert (new.examples, new.skipped, new.loop_tokens_cut) == (old.examples, old.skipped, old.loop_tokens_cut)


def test_anchors_sit_on_trained_tokens_and_labels_stop_at_the_turn():
    mask = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        anchors, valid = draw_anchors([2], [13], 8, gen, [mask])
        picked = anchors[valid].tolist()
        assert len(picked) == 5 and all(mask[a] and mask[a + 1] for a in picked)  # 2, 3, 4, 9, 10
    batch = pad_batch([list(range(13))], [2], 0, loss_masks=[mask])
    lab = block_labels(batch, torch.tensor([[4, 9]]), torch.tensor([[True, True]]), 4)
    assert lab.mask.tolist() == [[[True, False, False], [True, True, False]]]  # 5 trained; 6, 7 are the user turn; 12 is not trained
    starts, lengths = [3, 0, 7], [10, 6, 8]
    response = [torch.arange(n) >= s for s, n in zip(starts, lengths)]
    plain = draw_anchors(starts, lengths, 4, torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(plain, draw_anchors(starts, lengths, 4, torch.Generator().manual_seed(1), response)))


def conversation_examples(tmp_path, n: int = 6) -> list[SFTExample]:
    words = ["hi", "what is up", "tell me more", "why so", "ok then"]
    records = [
        {
            "messages": [
                {"role": "user", "content": words[i % 5]},
                {"role": "assistant", "content": f"answer {'ab' * (i + 2)}."},
                {"role": "user", "content": words[(i + 2) % 5]},
                {"role": "assistant", "content": f"fine {'cd' * (i + 3)}!"},
            ]
        }
        for i in range(n)
    ]
    return read_data(write_lines(tmp_path / "chat.jsonl", records)).examples(chat_tokenizer()).examples


def test_sft_on_conversations_online_equals_the_cache(llama_target, tmp_path, one_thread):
    examples = conversation_examples(tmp_path)
    assert all(e.loss_mask is not None for e in examples)
    layers = (0, 2)
    manifest = build_feature_cache(llama_target, examples, tmp_path / "cache", layers, shard_tokens=200, progress=False)
    assert manifest.format == "draftopd-features-v2" and all(s.get("loss_mask") for s in manifest.shards)
    cache = FeatureCache.open(tmp_path / "cache", llama_target, layers)
    for i, e in enumerate(examples):
        assert torch.equal(cache[i].loss_mask, loss_mask(e)) and torch.equal(cache.shape(i).loss_mask, loss_mask(e))
    for labels in ("text", "greedy"):
        want = frequent_tokens([cache[i] for i in range(len(cache))], 64, 12, labels)
        assert torch.equal(frequent_tokens(cache, 64, 12, labels), want)
    counts = torch.bincount(torch.cat([torch.tensor(e.prompt_ids + e.response_ids)[loss_mask(e)] for e in examples]), minlength=64)
    assert torch.equal(frequent_tokens(examples, 64, 12, "text"), counts.topk(12).indices.sort().values)
    drafter = new_drafter(llama_target, DrafterConfig(block_size=4, target_layer_ids=layers))
    cfg = SFTConfig(batch_size=6, anchors_per_seq=8, labels="greedy")
    online = sft_micro_batch(llama_target, drafter, examples, cfg, torch.Generator().manual_seed(0))
    cached = sft_micro_batch(llama_target, drafter, [cache[i] for i in range(6)], cfg, torch.Generator().manual_seed(0))
    assert cached.weight_sum == online.weight_sum > 0
    assert float(cached.loss_sum.detach()) == pytest.approx(float(online.loss_sum.detach()), rel=0.02)
    shapes = [cache.shape(i) for i in range(6)]  # another rank's rows: the same anchors, so the same labels
    mixed = sft_micro_batch(
        llama_target, drafter, shapes[:3] + [cache[i] for i in range(3, 6)], cfg, torch.Generator().manual_seed(0), rows=slice(3, 6)
    )
    half = sft_micro_batch(llama_target, drafter, [cache[i] for i in range(6)], cfg, torch.Generator().manual_seed(0), rows=slice(3, 6))
    assert float(mixed.loss_sum.detach()) == float(half.loss_sum.detach())


def test_a_version_1_cache_reads_as_response_masks(llama_target, tmp_path):
    examples = [SFTExample(str(i), (1, 2, 3), (4 + i, 5, 6, 7)) for i in range(3)]
    build_feature_cache(llama_target, examples, tmp_path, (0, 2), progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert not any("loss_mask" in s for s in manifest["shards"])  # plain responses store no mask
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "format": "draftopd-features-v1"}))
    cache = FeatureCache.open(tmp_path, llama_target, (0, 2))
    assert cache[0].loss_mask is None and loss_mask(cache[0]).tolist() == [False] * 3 + [True] * 4
    assert read_manifest(tmp_path).format == "draftopd-features-v1"
    with pytest.raises(DataError, match="format"):  # resuming a build needs this version's format
        build_feature_cache(llama_target, examples, tmp_path, (0, 2), progress=False)


def test_cli_trains_on_a_conversation_file(tmp_path, capsys):
    target = save_tiny_target(tmp_path / "target")
    records = [
        {
            "conversations": [
                {"from": "human", "value": f"w{i} w{i + 1}"},
                {"from": "gpt", "value": f"w{i + 2} w{i + 3} w{i + 4}"},
                {"from": "human", "value": "w9"},
                {"from": "gpt", "value": f"w{i + 5} w{i + 6}"},
            ]
        }
        for i in range(6)
    ]
    data = write_lines(tmp_path / "chat.jsonl", records + ["oops", {"conversations": [{"from": "tool", "value": "w1"}]}])
    rc = main(
        [
            str(a)
            for a in (
                "sft",
                "--target",
                target,
                "--data",
                data,
                "--out",
                tmp_path / "sft",
                "--steps",
                2,
                "--batch-size",
                3,
                "--anchors-per-seq",
                4,
                "--draft-block-size",
                4,
                "--json",
            )
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    result = json.loads(out)
    assert result["examples"] == 6 and result["skipped"] == 2
    assert result["data"]["skipped"] == {"not JSON": 1, "unknown role": 1} and "2 skipped (not JSON 1, unknown role 1)" in err
    rc = main(
        [
            str(a)
            for a in (
                "features",
                "--target",
                target,
                "--data",
                data,
                "--data-format",
                "conversations",
                "--out",
                tmp_path / "feat",
                "--draft-block-size",
                4,
                "--json",
            )
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert json.loads(out)["sequences"] == 6 and json.loads(out)["data"]["examples"] == {"conversations": 6}
    rc = main(
        [
            str(a)
            for a in (
                "sft",
                "--target",
                target,
                "--features",
                tmp_path / "feat",
                "--out",
                tmp_path / "sft2",
                "--steps",
                2,
                "--batch-size",
                3,
                "--anchors-per-seq",
                4,
                "--draft-block-size",
                4,
                "--json",
            )
        ]
    )
    assert rc == 0, capsys.readouterr().err


def test_vllm_script_writes_what_sft_reads(tmp_path, capsys, monkeypatch):
    """benchmarks/vllm_regenerate.py with a stand-in for vLLM's `LLM` (vLLM itself is not installable here)."""
    import importlib.util
    import sys
    from types import SimpleNamespace

    from draftopd.data.prompts import Prompt

    spec = importlib.util.spec_from_file_location(
        "vllm_regenerate", Path(__file__).resolve().parents[1] / "benchmarks" / "vllm_regenerate.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    tok = chat_tokenizer()
    answer_ids = tok("ok.", add_special_tokens=False)["input_ids"]  # vLLM's ids of an answer that stopped at EOS
    seen = []

    class FakeLLM:
        def generate(self, prompts, params):
            seen.extend(p["prompt_token_ids"] for p in prompts)
            return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(answer_ids), finish_reason="stop", stop_reason=None)])] * len(
                prompts
            )

    chats = script.conversation_answers(
        FakeLLM(), None, tok, [("c1", parse_conversation(OPENAI)), ("c2", parse_conversation(SHAREGPT))], 512
    )
    single = script.single_answers(FakeLLM(), None, tok, [Prompt("p1", "t", (("user", "hi"),))])
    prompts = ["".join(tok.decode([t]) for t in ids) for ids in seen]
    assert all(p.endswith("<|im_start|>assistant\n") for p in prompts) and len(prompts) == 5  # 2 turns of 2 conversations, 1 prompt
    assert "ok.<|im_end|>" in prompts[2] and not any("hello" in p for p in prompts)  # a later turn sees the target's own answer
    assert single == [{"id": "p1", "prompt_ids": seen[-1], "response_ids": answer_ids + [2], "finish": "eos"}]
    script.write(chats + single, tmp_path / "out.jsonl", {"engine": "vllm"})
    data = read_data(tmp_path / "out.jsonl", "token-ids").examples()
    assert [e.id for e in data.examples] == ["c1", "c2", "p1"] and data.summary.examples == {"token-ids": 2, "regenerated": 1}
    for e in data.examples[:2]:
        assert trained_text(tok, list(e.prompt_ids + e.response_ids), loss_mask(e).tolist()) == ["ok.<|im_end|>"] * 2
    with pytest.raises(SystemExit) as done:
        script.main(["--help"])
    assert done.value.code == 0 and "vLLM" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    assert script.main(["--model", "m", "--prompts", "sharegpt", "--out", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vllm is not installed" in err and not (tmp_path / "x.jsonl").exists()
