"""Regenerate training data with vLLM (offline `LLM.generate`) into the token-id JSONL that `draftopd sft --data` reads.

Not run in this repository: vLLM needs a CUDA GPU and does not install on the CPU hosts this project is tested on.
Without vllm the script stops with one error line (nothing written); `--help` works without it. The records are the
token-ids format of `draftopd/data/training.py`:

* prompts (`--prompts`, any draftopd prompt set or file): the target answers each rendered prompt,
  `{"id", "prompt_ids": [...], "response_ids": [...], "finish", "settings"}` (what `draftopd regenerate` writes);
* conversations (`--conversations`, ShareGPT or OpenAI records): the target answers every user turn in order, its own
  earlier answers in the history (batched turn by turn), and the conversation is written as
  `{"id", "input_ids": [...], "loss_mask": [0 | 1, ...], "settings"}`: the chat template's tokens, 1 on the answers.

An answer that stopped at EOS ends with the EOS id, as in `draftopd regenerate`. SGLang's offline engine gives the
same ids (`Engine.generate(input_ids=...)`); write the same records from it. Then:

    python benchmarks/vllm_regenerate.py --model Qwen/Qwen3-8B --prompts sharegpt --limit 20000 --out runs/qwen3-answers.jsonl
    python benchmarks/vllm_regenerate.py --model Qwen/Qwen3-8B --conversations chats.jsonl --out runs/qwen3-chats.jsonl
    draftopd sft --target Qwen/Qwen3-8B --data runs/qwen3-chats.jsonl --data-format token-ids ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from draftopd.config import PromptConfig  # noqa: E402
from draftopd.data.conversations import RenderCounts, parse_conversation, render_conversation  # noqa: E402
from draftopd.data.prompts import _iter_records, _record_id, load_prompts, render_prompt  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the target: a hub id or local folder vLLM loads")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompts", help="a draftopd prompt set (sharegpt, ...) or prompt file: single answers")
    source.add_argument("--conversations", help="JSONL of ShareGPT or OpenAI records: every user turn answered")
    parser.add_argument("--limit", type=int, default=1000, help="prompts taken from --prompts (a named set's train split, a file's all)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=4096, help="conversations: longer ones are cut after the last answer that fits")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


def answer(llm, params, prompts: list[list[int]], eos_id: int | None) -> list[tuple[list[int], str]]:
    """One vLLM call: the response ids and finish reason of each prompt (token ids in, token ids out)."""
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    answers = []
    for out in outputs:
        first = out.outputs[0]
        ids = list(first.token_ids)
        if first.finish_reason == "stop" and getattr(first, "stop_reason", None) is None and eos_id is not None and ids[-1:] != [eos_id]:
            ids.append(eos_id)  # stopped at EOS: keep it, as `draftopd regenerate` does
        answers.append((ids, "eos" if first.finish_reason == "stop" else first.finish_reason))
    return answers


def single_answers(llm, params, tokenizer, prompts) -> list[dict]:
    ids = [render_prompt(p, tokenizer) for p in prompts]
    return [
        {"id": p.id, "prompt_ids": prompt, "response_ids": response, "finish": finish}
        for p, prompt, (response, finish) in zip(prompts, ids, answer(llm, params, ids, tokenizer.eos_token_id))
    ]


def conversation_answers(llm, params, tokenizer, conversations: list[tuple[str, tuple]], max_tokens: int) -> list[dict]:
    """The target answers the user turns of every conversation, turn t of all of them in one call."""
    histories = {cid: [] for cid, _ in conversations}
    user_turns = {cid: [i for i, (role, _) in enumerate(messages) if role == "user"] for cid, messages in conversations}
    for t in range(max(len(turns) for turns in user_turns.values())):
        live = [(cid, messages) for cid, messages in conversations if t < len(user_turns[cid])]
        for cid, messages in live:  # the dataset's turns up to this user turn, without its own answers
            start = user_turns[cid][t - 1] + 1 if t else 0
            histories[cid] += [m for m in messages[start : user_turns[cid][t] + 1] if m[0] != "assistant"]
        prompts = [
            tokenizer(
                tokenizer.apply_chat_template(
                    [{"role": r, "content": c} for r, c in histories[cid]], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )["input_ids"]
            for cid, _ in live
        ]
        for (cid, _), (response, _) in zip(live, answer(llm, params, prompts, tokenizer.eos_token_id)):
            histories[cid].append(("assistant", tokenizer.decode(response, skip_special_tokens=True)))
    records, counts = [], RenderCounts()
    for cid, _ in conversations:
        rendered = render_conversation(tokenizer, tuple(histories[cid]), max_tokens, counts)
        if rendered is not None:
            records.append({"id": cid, "input_ids": rendered[0], "loss_mask": [int(m) for m in rendered[1]]})
    if counts.skipped:
        print(f"conversations skipped: {counts.skipped}", file=sys.stderr)
    return records


def read_conversations(path: str) -> list[tuple[str, tuple]]:
    found = []
    for index, record in enumerate(_iter_records(Path(path))):
        messages = parse_conversation(record) if isinstance(record, dict) else "not a record"
        if not isinstance(messages, str):
            found.append((_record_id(record, Path(path).name, index), messages))
    return found


def write(records: list[dict], out: str, settings: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({**r, "settings": settings}, separators=(",", ":")) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        print("vllm_regenerate.py: error: vllm is not installed (pip install vllm, on a CUDA host); nothing was written", file=sys.stderr)
        return 2
    llm = LLM(model=args.model, seed=args.seed)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_new_tokens, seed=args.seed)
    tokenizer = llm.get_tokenizer()
    if args.prompts:
        split = PromptConfig(prompts=args.prompts).resolved_split()
        records = single_answers(llm, params, tokenizer, load_prompts(args.prompts, split=split, limit=args.limit).prompts)
    else:
        records = conversation_answers(llm, params, tokenizer, read_conversations(args.conversations), args.max_tokens)
    write(
        records,
        args.out,
        {"engine": "vllm", "target": args.model, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed},
    )
    print(f"{len(records)} records -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
