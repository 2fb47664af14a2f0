"""Fixed-text training data: existing ShareGPT answers instead of target regeneration.

Regeneration costs a decode per answer; an existing answer costs only a prefill of the target, which then
supplies the labels itself: SFT with `labels="greedy"` trains slot k towards the target's argmax after
position a+k-1 of the text (or `loss="kl"`, its whole distribution there), never towards the human-written
token. Prompts are the ShareGPT first user turns of `load_prompts("sharegpt", split=...)` (the same seeded
split, so the held-out ShareGPT prompts stay unseen), answers the assistant turn that follows, rendered with
the target's chat template and closed with its end-of-turn token.
"""

from __future__ import annotations

from .prompts import _MALFORMED, _ROLE_ALIASES, _iter_records, _named_set_path, _text, load_prompts, render_prompt
from .regenerate import SFTExample


def sharegpt_answers() -> dict[str, str]:
    """ShareGPT conversation id -> the assistant turn right after its first user turn."""
    answers = {}
    for record in _iter_records(_named_set_path("sharegpt")):
        turns = record.get("conversations") if record is not _MALFORMED and isinstance(record, dict) else None
        if not isinstance(turns, list):
            continue
        roles = [_ROLE_ALIASES.get(t.get("from")) if isinstance(t, dict) else None for t in turns]
        if "user" in roles:
            first = roles.index("user")
            if first + 1 < len(turns) and roles[first + 1] == "assistant" and _text(turns[first + 1].get("value")):
                answers[str(record.get("id"))] = turns[first + 1]["value"]
    return answers


def load_answers(
    tokenizer, *, limit: int, split: str = "train", seed: int = 0, max_prompt_tokens: int = 512, max_response_tokens: int = 512
) -> list[SFTExample]:
    """Up to `limit` (prompt, existing answer) examples, answers cut to `max_response_tokens`."""
    prompts = load_prompts("sharegpt", split=split, limit=limit, seed=seed).prompts
    answers = sharegpt_answers()
    end = tokenizer.eos_token_id
    out = []
    for prompt in prompts:
        if prompt.id not in answers:
            continue
        prompt_ids = render_prompt(prompt, tokenizer)
        response = tokenizer(answers[prompt.id], add_special_tokens=False).input_ids
        response = (response + ([end] if end is not None else []))[:max_response_tokens]
        if len(prompt_ids) <= max_prompt_tokens and len(response) > 1:
            out.append(SFTExample(prompt.id, tuple(prompt_ids), tuple(response)))
    return out


def training_examples(cfg, tokenizer, regenerated=None) -> list[SFTExample]:
    """The examples a `config.FeatureConfig` names: those of `regenerated` (its data file, loaded by the caller
    before any model so a bad path fails early), else the ShareGPT answers."""
    if regenerated is not None:
        return regenerated.examples
    return load_answers(tokenizer, limit=cfg.limit, max_response_tokens=cfg.max_response_tokens)
