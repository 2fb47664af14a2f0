"""Training data files: what `draftopd sft --data FILE` and `draftopd features --data FILE` read.

One JSON record a line (`.gz` read transparently; a file that starts with `[` is one JSON array, as ShareGPT dumps
are). Three kinds of record, told apart per record (`--data-format auto`: by the key `conversations` / `messages`,
else `input_ids`, else `prompt_ids` / `response_ids`) or one kind required:

* regenerated: `{"id": str, "prompt_ids": [int, ...], "response_ids": [int, ...], ...}`, what `draftopd regenerate`
  writes: the response is trained. Read exactly as `load_regenerated` reads them (never cut; `--trim-loops` applies
  to them only).
* token-ids: the above, or `{"id": str | int, "input_ids": [int, ...], "loss_mask": [0 | 1, ...]}`: one sequence (a
  whole multi-turn conversation, chat template included) trained where loss_mask is 1 (as long as input_ids). The
  format to write from another engine, e.g. vLLM or SGLang answering the prompts (`benchmarks/vllm_regenerate.py`).
  The ids must be the target tokenizer's (`check_token_ids`: one DataError line otherwise).
* conversations: ShareGPT `{"conversations": [{"from", "value"}, ...]}` or OpenAI `{"messages": [{"role",
  "content"}, ...]}`, rendered with the target's chat template, every assistant turn trained (`conversations.py`).

A record without an id is named `<file name>/<index>`. A record that gives no example is counted by its reason,
never silently dropped (`DataSummary.skipped`): "not JSON"; "unrecognised record" (JSON of none of the kinds, or of a
kind `--data-format` excludes); "repeated id"; regenerated "no id"; token ids "bad token ids" (not lists of ids >= 0,
a mask of another length or not 0/1), "nothing trained" (no 1 in the mask, an empty prompt or response);
conversations "bad turn", "unknown role", "empty content", "no assistant turn", "template error", "too long".
Sequences over `max_tokens` (token ids, conversations) are cut after the last trained span that fits (a turn boundary),
else refused as "too long". A missing file, or one with no usable record, is one DataError line.

Reading is in two steps so that a bad file fails before any model loads: `read_data` parses and checks every record
(no tokenizer needed); `DataFile.examples` renders the conversations with the target's tokenizer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .conversations import Messages, RenderCounts, check_tokenizer, fit, parse_conversation, render_conversation
from .prompts import _MALFORMED, DataError, _iter_records, _record_id
from .regenerate import SFTData, SFTExample, _token_list, regenerated_example

KINDS = ("regenerated", "token-ids", "conversations")
_ACCEPTS = {"auto": KINDS, "regenerated": ("regenerated",), "token-ids": ("regenerated", "token-ids"), "conversations": ("conversations",)}


@dataclass(frozen=True)
class DataSummary:
    """What a data file gave: examples by kind of record, records skipped by reason, sequences cut to max_tokens."""

    path: str
    examples: dict[str, int]  # kind -> examples
    skipped: dict[str, int]  # reason -> records
    truncated: int = 0  # sequences cut after their last trained span within max_tokens
    context_turns: int = 0  # assistant turns left untrained (the template renders them otherwise once later turns follow)
    loop_tokens_cut: int = 0  # response tokens `trim_loops` dropped

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        """One line for a person: `data.jsonl: 118 examples (conversations 118); 3 skipped (no assistant turn 2, not JSON 1)`."""
        parts = lambda counts: ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))  # noqa: E731
        line = f"{self.path}: {sum(self.examples.values())} examples ({parts(self.examples) or 'none'})"
        if self.skipped:
            line += f"; {sum(self.skipped.values())} skipped ({parts(self.skipped)})"
        for count, what in (
            (self.truncated, "cut to --data-max-tokens"),
            (self.context_turns, "assistant turns left as context"),
            (self.loop_tokens_cut, "looping response tokens cut"),
        ):
            line += f"; {count} {what}" if count else ""
        return line


@dataclass
class DataFile:
    """A data file parsed without a tokenizer: its records in file order, each (kind, SFTExample or the messages of a
    conversation still to render), and the records refused so far by reason."""

    path: Path
    max_tokens: int
    records: list[tuple[str, SFTExample | Messages, str]] = field(default_factory=list)  # (kind, item, id)
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    loop_tokens_cut: int = 0

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    @property
    def conversations(self) -> int:
        return sum(kind == "conversations" for kind, _, _ in self.records)

    def examples(self, tokenizer=None, target_name: str = "target") -> SFTData:
        """Every record's example, conversations rendered with `tokenizer` (needed only when the file has some)."""
        if self.conversations:
            check_tokenizer(tokenizer, target_name)
        counts = RenderCounts(dict(self.skipped))
        examples, kinds = [], {}
        for kind, item, name in self.records:
            if kind == "conversations":
                rendered = render_conversation(tokenizer, item, self.max_tokens, counts)
                if rendered is None:
                    continue
                item = SFTExample.masked(name, *rendered)
            examples.append(item)
            kinds[kind] = kinds.get(kind, 0) + 1
        summary = DataSummary(
            str(self.path), kinds, counts.skipped, self.truncated + counts.truncated, counts.context_turns, self.loop_tokens_cut
        )
        if not examples:
            raise DataError(f"no usable training examples in {summary.line()}")
        return SFTData(examples, sum(counts.skipped.values()), self.loop_tokens_cut, summary)


def read_data(
    path: str | Path, data_format: str = DataConfig.format, *, trim_loops: bool = False, max_tokens: int = DataConfig.max_tokens
) -> DataFile:
    """Parse and check every record of `path` (see the module docstring). Raises DataError when the file is missing or
    has no record that could give an example."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no regenerated data at {path}: run `draftopd regenerate`, or give a conversation or token-id file")
    data, ids = DataFile(path, max_tokens), set()
    for index, record in enumerate(_iter_records(path)):
        kind = _kind(record)
        if record is _MALFORMED or kind not in _ACCEPTS[data_format]:
            data.skip("not JSON" if record is _MALFORMED else "unrecognised record")
            continue
        name = _record_id(record, path.name, index)
        item = _parse(data, kind, record, name, trim_loops)
        name = item.id if isinstance(item, SFTExample) else name  # a regenerated record's own id, even ""
        if isinstance(item, str) or name in ids:
            data.skip(item if isinstance(item, str) else "repeated id")
            continue
        ids.add(name)
        data.records.append((kind, item, name))
    if not data.records:
        raise DataError(f"no usable training examples in {DataSummary(str(path), {}, data.skipped).line()}")
    return data


def _kind(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "conversations" in record or "messages" in record:
        return "conversations"
    if "input_ids" in record:
        return "token-ids"
    if "prompt_ids" in record or "response_ids" in record:
        return "regenerated"
    return None


def _parse(data: DataFile, kind: str, record: dict, name: str, trim_loops: bool) -> SFTExample | Messages | str:
    """One record's example (a conversation: its messages), or the reason it has none."""
    if kind == "conversations":
        return parse_conversation(record)
    if kind == "regenerated":
        example, cut = regenerated_example(record, trim_loops)
        data.loop_tokens_cut += cut
        return example
    tokens, mask = _token_list(record.get("input_ids")), record.get("loss_mask")
    if (
        tokens is None
        or not isinstance(mask, list)
        or len(mask) != len(tokens)
        or any(m not in (0, 1) or isinstance(m, float) for m in mask)
    ):
        return "bad token ids"
    if not any(mask):
        return "nothing trained"
    fitted = fit(list(tokens), [bool(m) for m in mask], data.max_tokens)
    if fitted is None:
        return "too long"
    data.truncated += len(fitted[0]) < len(tokens)
    return SFTExample.masked(name, *fitted)
