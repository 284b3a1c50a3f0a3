"""Prompt templates: the tokenizer's own chat template, else one chosen for the model family.

The fallbacks are the three formats NeuralChat shipped models with: Llama-2's ``[INST]``,
neural-chat's ``### System/User/Assistant`` and Alpaca's instruction/response.

Every message's content is neutralised first (``neutralise``): a role marker or special token
typed by a user, or stored in an FAQ answer, is broken with an invisible U+200B so that it
cannot open a turn of its own, and tokenising the prompt cannot turn it into a special token
id. Serving and training data both build prompts here, so both see the same text.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Message = dict[str, str]

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant for a team. Answer clearly and concisely, "
    "and say so when you do not know."
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


# Inserted after a marker's first character: invisible, and never part of a marker itself.
MARKER_BREAK = "\u200b"
# Role markers that prompt formats write as plain text, whatever the tokenizer: Llama-2's
# [INST] and <<SYS>>, <|name|> tokens (ChatML's <|im_start|>, Zephyr's <|user|>, Llama 3's
# <|eot_id|>) in case a tokenizer lacks them, and "### Role:" headers at the start of a line
# (neural-chat, Alpaca).
_TEXT_MARKERS = [
    r"\[/?INST\]",
    r"<</?SYS>>",
    r"<\|[^|<>\s]{1,64}\|>",
    r"(?im:^[ \t]*#{2,}[ \t]*(?:system|user|assistant|human|instruction|input|response)[ \t]*:)",
]


def neutralise(text: str, special_tokens: Iterable[str] = ()) -> str:
    """``text`` with every role marker and every one of ``special_tokens`` broken by
    ``MARKER_BREAK`` after its first visible character, so that it reads the same but opens
    no turn and tokenises as plain text. Idempotent."""
    pattern = _marker_pattern(tuple(sorted(set(special_tokens), key=len, reverse=True)))
    while True:  # breaking one match can uncover an overlapping one
        broken = pattern.sub(_break, text)
        if broken == text:
            return text
        text = broken


@functools.lru_cache(maxsize=32)
def _marker_pattern(special_tokens: tuple[str, ...]) -> re.Pattern[str]:
    # A one-character token cannot be broken from inside; no tokenizer has one as a role marker.
    tokens = [re.escape(t) for t in special_tokens if len(t.strip()) > 1]
    return re.compile("|".join([*tokens, *_TEXT_MARKERS]))


def _break(match: re.Match[str]) -> str:
    marker = match.group(0)
    first = len(marker) - len(marker.lstrip()) + 1
    return marker[:first] + MARKER_BREAK + marker[first:]


def special_tokens_of(tokenizer) -> list[str]:
    """The strings ``tokenizer`` turns into special token ids (BOS, EOS, role tokens...)."""
    tokens = set(getattr(tokenizer, "all_special_tokens", None) or [])
    for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(added, "special", False):
            tokens.add(str(added))
    return sorted(tokens)


def neutralise_messages(messages: Sequence[Message], tokenizer) -> list[Message]:
    """``messages`` with each content neutralised for ``tokenizer`` (see ``neutralise``)."""
    special = special_tokens_of(tokenizer)
    return [{**m, "content": neutralise(m["content"], special)} for m in messages]


@dataclass(frozen=True)
class Prompt:
    text: str
    template: str
    # Chat templates write the BOS token themselves; the fallbacks let the tokenizer add it.
    add_special_tokens: bool


def family_template(model_name: str, model_type: str | None) -> str:
    """Pick a fallback template from the model's name and type."""
    name = model_name.lower()
    if "neural-chat" in name or "neural_chat" in name:
        return "neural-chat"
    if model_type == "llama" and ("llama-2" in name or "llama2" in name):
        return "llama-2"
    return "alpaca"


def build_prompt(
    messages: Sequence[Message],
    tokenizer,
    *,
    model_name: str,
    model_type: str | None,
    system_prompt: str | None = None,
) -> Prompt:
    """Render ``messages`` (``{role, content}`` turns, the last one the user's) as a prompt.

    Contents are neutralised (``neutralise``): a marker inside one cannot start another turn."""
    _check_messages(messages)
    turns = neutralise_messages(messages, tokenizer)
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return Prompt(text, "chat-template", add_special_tokens=False)
    template = family_template(model_name, model_type)
    render = {"neural-chat": _neural_chat, "llama-2": _llama2, "alpaca": _alpaca}[template]
    return Prompt(render(turns), template, add_special_tokens=True)


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise ValueError("messages is empty: give at least one {'role': 'user', ...} turn")
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant") or "content" not in m:
            raise ValueError(
                f"message {i} must be {{'role': 'system'|'user'|'assistant', 'content': str}}, "
                f"got {m!r}"
            )
    if messages[-1]["role"] != "user":
        raise ValueError(f"the last message must be the user's, got {messages[-1]['role']!r}")


def _split_system(turns: list[Message]) -> tuple[str, list[Message]]:
    if turns[0]["role"] == "system":
        return turns[0]["content"], turns[1:]
    return DEFAULT_SYSTEM_PROMPT, turns


def _neural_chat(turns: list[Message]) -> str:
    system, rest = _split_system(turns)
    parts = [f"### System:\n{system}\n"]
    for m in rest:
        parts.append(f"### {m['role'].capitalize()}:\n{m['content']}\n")
    parts.append("### Assistant:\n")
    return "".join(parts)


def _llama2(turns: list[Message]) -> str:
    system, rest = _split_system(turns)
    text, first = "", True
    for m in rest:
        if m["role"] == "user":
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{m['content']}" if first else m["content"]
            # The tokenizer adds the first <s>; later turns carry their own.
            text += ("" if first else "<s>") + f"[INST] {content} [/INST]"
            first = False
        else:
            text += f" {m['content']} </s>"
    return text


def _alpaca(turns: list[Message]) -> str:
    _, rest = _split_system(turns)
    parts = [ALPACA_PREAMBLE + "\n\n"]
    for m in rest:
        if m["role"] == "user":
            parts.append(f"### Instruction:\n{m['content']}\n\n")
        else:
            parts.append(f"### Response:\n{m['content']}\n\n")
    parts.append("### Response:\n")
    return "".join(parts)
