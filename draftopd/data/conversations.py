"""Multi-turn conversations rendered with the target's chat template, trained on every assistant turn.

A record is ShareGPT (`{"conversations": [{"from": "system" | "human" | "user" | "gpt" | "assistant", "value": str}]}`)
or OpenAI (`{"messages": [{"role": "system" | "user" | "assistant", "content": str}]}`). A record is refused, with its
reason, when a turn is not an object with a string text ("bad turn"), a role is none of these ("unknown role"), a text
is empty ("empty content"), or no assistant turn follows a user turn ("no assistant turn").

Choices:
* One token sequence per conversation: the template's text of the turns up to the last assistant turn (what follows
  it is context nothing reads), tokenized once (`add_special_tokens=False`, as `apply_chat_template` does).
* The loss mask is True exactly on each assistant turn's content and the turn's closing text up to its last
  non-whitespace character: ChatML's `<|im_end|>` (not the newline after it), Llama 3's `<|eot_id|>`, nothing for a
  plain template that closes a turn with a newline. The system and user turns and the template's headers are context.
* Spans are found by rendering, not by searching tokens: for assistant turn i the template renders the turns up to i
  twice, once with the turn's content and once with a placeholder; the content starts where the two texts part (so a
  header such as `<|im_start|>assistant\n` or a plain template's `Assistant: ` is context, with or without
  `add_generation_prompt` support) and the turn ends where the real text ends. Tokens overlapping a span's characters
  (offset mapping of a fast tokenizer) are trained. This works for templates with and without `{% generation %}`
  blocks; where a template has them, `return_assistant_tokens_mask` marks the same tokens (tests).
* A turn is trained only when the text up to it is a prefix of the whole conversation's text. Templates that render a
  turn differently once later turns follow (Qwen3 drops the empty `<think>` block from earlier answers) leave such turns
  as context, counted in `RenderCounts.context_turns`; a conversation with no turn left is refused ("template error").
* Over `max_tokens`: cut after the last trained span that fits (a turn boundary), counted as truncated; a conversation
  whose first trained turn does not fit is refused ("too long").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .prompts import _ROLE_ALIASES, DataError

Messages = tuple[tuple[str, str], ...]  # ((role, content), ...), roles system / user / assistant

_PLACEHOLDERS = ("\ue000", "\ue001")  # private-use characters: a content never starts with both


def parse_conversation(record: dict) -> Messages | str:
    """The messages of a ShareGPT or OpenAI record, or the reason it cannot be trained on."""
    sharegpt = "conversations" in record
    turns = record.get("conversations") if sharegpt else record.get("messages")
    role_key, text_key = ("from", "value") if sharegpt else ("role", "content")
    if not isinstance(turns, list):
        return "bad turn"
    messages = []
    for turn in turns:
        if not isinstance(turn, dict) or not isinstance(turn.get(text_key), str):
            return "bad turn"
        role = _ROLE_ALIASES.get(turn.get(role_key)) if isinstance(turn.get(role_key), str) else None
        if role is None:
            return "unknown role"
        if not turn[text_key].strip():
            return "empty content"
        messages.append((role, turn[text_key]))
    if not trained_turns(messages):
        return "no assistant turn"
    return tuple(messages)


def trained_turns(messages: Messages) -> list[int]:
    """Indices of the assistant turns that follow a user turn (an answer needs a question before it)."""
    first_user = next((i for i, (role, _) in enumerate(messages) if role == "user"), len(messages))
    return [i for i, (role, _) in enumerate(messages) if role == "assistant" and i > first_user]


def check_tokenizer(tokenizer, name: str) -> None:
    """Raise DataError unless `tokenizer` can render conversations: it exists, has a chat template, and is fast
    (character offsets map spans to tokens)."""
    if tokenizer is None:
        raise DataError(f"target '{name}' has no tokenizer: a conversation file needs its chat template (give token ids instead)")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer of target '{name}' has no chat template: conversation files need one (give token ids instead)")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"the tokenizer of target '{name}' is not a fast tokenizer: rendering conversations needs its character offsets")


def _render(tokenizer, messages: Sequence[tuple[str, str]]) -> str:
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False)


def _common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix (a binary search of slice comparisons: no Python loop over characters)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if a[:mid] == b[:mid] else (low, mid - 1)
    return low


def assistant_spans(tokenizer, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text (up to its last trained turn) and the character spans [start, end) of the assistant turns
    it trains on (see the module docstring). Template exceptions propagate."""
    turns = trained_turns(messages)
    text = _render(tokenizer, messages[: turns[-1] + 1])
    spans = []
    for i in turns:
        real = _render(tokenizer, messages[: i + 1])
        content = messages[i][1]
        other = _PLACEHOLDERS[content.startswith(_PLACEHOLDERS[0])]
        start, end = _common_prefix(real, _render(tokenizer, (*messages[:i], ("assistant", other)))), len(real.rstrip())
        if text.startswith(real) and start < end:
            spans.append((start, end))
    return text, spans


def fit(tokens: list[int], mask: list[bool], max_tokens: int) -> tuple[list[int], list[bool]] | None:
    """`tokens` and `mask` cut after the last trained span that ends within `max_tokens` (unchanged when they fit), or
    None when no trained span fits."""
    if len(tokens) <= max_tokens:
        return tokens, mask
    ends = [i + 1 for i in range(min(len(mask), max_tokens)) if mask[i] and (i + 1 == len(mask) or not mask[i + 1])]
    if not ends:
        return None
    return tokens[: ends[-1]], mask[: ends[-1]]


@dataclass
class RenderCounts:
    """What rendering a file's conversations gave besides its sequences."""

    skipped: dict[str, int] = field(default_factory=dict)  # reason -> conversations ("template error", "too long")
    truncated: int = 0  # cut to max_tokens after their last span that fits
    context_turns: int = 0  # assistant turns the template renders differently once later turns follow: context only

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def render_conversation(tokenizer, messages: Messages, max_tokens: int, counts: RenderCounts) -> tuple[list[int], list[bool]] | None:
    """Token ids of one conversation and its loss mask, or None (counted in `counts`) when it cannot be trained on."""
    try:
        text, spans = assistant_spans(tokenizer, messages)
    except Exception:  # whatever the template raises (roles that do not alternate, a system turn it refuses)
        counts.skip("template error")
        return None
    counts.context_turns += len(trained_turns(messages)) - len(spans)
    if not spans:
        counts.skip("template error")
        return None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    first, last = torch.tensor(encoded["offset_mapping"], dtype=torch.long).reshape(-1, 2).unbind(1)
    mask = torch.zeros(len(first), dtype=torch.bool)
    for start, end in spans:  # a token overlapping a span's characters is trained
        mask |= (first < end) & (last > start) & (last > first)
    fitted = fit(list(encoded["input_ids"]), mask.tolist(), max_tokens)
    if fitted is None:
        counts.skip("too long")
    elif len(fitted[0]) < len(mask):
        counts.truncated += 1
    return fitted
