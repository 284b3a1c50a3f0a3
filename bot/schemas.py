"""What travels on the bus: a ``ChatRequest`` in, reply events (delta, progress, final, error) out.

Both are pydantic models serialised as one JSON document per stream entry. Every model is
frozen and ignores unknown fields, so that during a rolling upgrade an older worker still
accepts a request written by a newer adapter instead of dead-lettering it.

Limits that an operator tunes (the longest text, say) are not part of the schema: they are
passed in by the caller (``check_text_length``), so the schema stays the same on every host.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, field_validator

from bot.errors import SprbotError

# Channel names and request ids end up inside Redis key names: keep them to a safe alphabet.
ChannelName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")]
RequestId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")]

ErrorCode = Literal["busy", "too_long", "failed", "cancelled"]
"""Machine-readable reason of an ``ErrorEvent``: ``busy`` (backlog full, try again shortly),
``too_long`` (the text is over the limit), ``failed`` (the request could not be answered),
``cancelled`` (the asker went away, e.g. a web client closed its connection)."""


class TextTooLong(SprbotError, ValueError):
    """The text of a request is over the configured limit. The message is fit for the user."""


def platform_of(channel: str) -> str:
    """A reply channel's platform: its name up to the first ``-``. ``console-ab12`` (one
    terminal session) is ``console``; ``slack`` is ``slack``."""
    return channel.split("-", 1)[0]


def request_id(platform: str, *parts: str | int) -> str:
    """A request id derived from the platform event, so that a re-delivered event collides.

    Pass what identifies the event on its platform: Slack ``(team_id, event_id)`` or
    ``(team_id, channel, ts)``; Telegram ``(bot_id, update_id)`` or ``(chat_id, message_id)``.
    The parts are hashed as a JSON array, so ``("a", "bc")`` and ``("ab", "c")`` differ.
    """
    if not parts:
        raise ValueError("request_id needs at least one part that identifies the event")
    digest = hashlib.sha256(json.dumps([platform, *parts]).encode()).hexdigest()[:32]
    return f"{platform}-{digest}"


def check_text_length(text: str, max_chars: int) -> None:
    """Raise ``TextTooLong`` with a message for the user when ``text`` exceeds ``max_chars``."""
    if len(text) > max_chars:
        raise TextTooLong(
            f"Your message is {len(text):,} characters long, over the limit of "
            f"{max_chars:,}. Please shorten it or send it in parts."
        )


def shape_problem(
    data: Any,
    field_types: Mapping[str, tuple[type, ...]],
    required: Mapping[str, tuple[str, ...]] | None = None,
) -> str:
    """Why a platform's parsed JSON (a Slack event, a Telegram update) cannot be what the
    platform sends, "" when it can. The SDKs that read these (slack-bolt, python-telegram-bot)
    index into them without checking, so an adapter checks first, at its edge: ``data`` must
    be an object in which, at any depth, a field named in ``field_types`` has one of its types
    (a bool is not an int), an object under a key of ``required`` has those fields, and every
    string is valid Unicode (JSON allows lone surrogates; no encoder takes them)."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__} where an object belongs"
    stack: list[Any] = [data]
    while stack:  # iterative: the nesting depth is the sender's to choose
        value = stack.pop()
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            name = key if isinstance(key, str) else ""
            types = field_types.get(name)
            if types and (
                not isinstance(item, types) or (type(item) is bool and bool not in types)
            ):
                return f"{name!r} is a {type(item).__name__}"
            if isinstance(item, dict):
                missing = [f for f in (required or {}).get(name, ()) if f not in item]
                if missing:
                    return f"{name!r} has no {missing[0]!r}"
            for text in (name, item) if isinstance(item, str) else (name,):
                try:
                    text.encode()
                except UnicodeEncodeError:
                    return f"{name!r} holds text that is not valid Unicode"
            if isinstance(item, dict | list):
                stack.append(item)
    return ""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class Turn(_Model):
    """One earlier message of a conversation that the client keeps itself (the web API's)."""

    role: Literal["system", "user", "assistant"]
    content: str


class GenerationOptions(_Model):
    """Per-request generation settings (the web API's ``max_tokens``, ``temperature``,
    ``top_p``). Unset fields take the worker's; the worker caps ``max_new_tokens`` at its own
    ``SPRBOT_MAX_NEW_TOKENS``. ``temperature`` 0 (or ``top_p`` 0) means greedy decoding."""

    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)


class Usage(_Model):
    """Tokens a request took: its prompt as the model saw it, and the answer."""

    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ChatRequest(_Model):
    """One user message on its way to an inference worker."""

    id: RequestId = Field(description="Derived from the platform event: see request_id().")
    channel: ChannelName = Field(description="slack, telegram, console, web, ...")
    conversation: str = Field(
        min_length=1,
        max_length=512,
        description="Conversation key. Slack: team/channel/thread_ts; Telegram: chat/topic.",
    )
    user_id: str = Field(min_length=1, max_length=256)
    user_name: str = Field("", max_length=256, description="Display name, for the prompt.")
    text: str = Field(min_length=1, description="Length limit: check_text_length().")
    reply_to: dict[str, JsonValue] = Field(
        default_factory=dict,
        description="Where to deliver, opaque to the bus (e.g. the placeholder message id).",
    )
    is_command: bool = Field(False, description="An admin/chat command such as /faq.")
    created_at: float = Field(default_factory=time.time, description="Unix time, seconds.")
    history: list[Turn] | None = Field(
        None,
        description="The turns before ``text``, when the client keeps the conversation (the "
        "web API): the worker uses them instead of its conversation memory, and does not "
        "remember the exchange. None: the worker's memory of ``conversation``.",
    )
    generation: GenerationOptions | None = Field(
        None, description="Per-request generation settings; None: the worker's."
    )

    @field_validator("created_at")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"created_at must be a unix time in seconds, got {value!r}")
        return value


class _ReplyBase(_Model):
    """Fields every reply event carries, so an adapter can act on it alone.

    ``attempt`` is the delivery of the request that produced the event (0: refused at the
    edge, 1: first delivery, 2+: reclaimed after a worker died). ``seq`` counts the events of
    one attempt from 1. Together they order events: a higher attempt restarts the text, a
    lower one is stale.
    """

    request_id: RequestId
    channel: ChannelName
    reply_to: dict[str, JsonValue] = Field(default_factory=dict)
    attempt: int = Field(ge=0)
    seq: int = Field(ge=0)


class DeltaEvent(_ReplyBase):
    """More text of the answer: the increment, not the text so far."""

    kind: Literal["delta"] = "delta"
    text: str


class ProgressEvent(_ReplyBase):
    """A status line for the user ("thinking…", "3 requests ahead of you"); no answer text."""

    kind: Literal["progress"] = "progress"
    text: str


class FinalEvent(_ReplyBase):
    """The whole answer. Written at most once per request id; it supersedes the deltas."""

    kind: Literal["final"] = "final"
    text: str
    attachments: list[str] = Field(
        default_factory=list,
        description="Files to upload with the answer (a training report's loss.png), by path "
        "on the shared data dir.",
    )
    usage: Usage | None = Field(
        None, description="Tokens of the prompt and answer; None where nobody counted them."
    )
    truncated: bool = Field(
        False, description="The answer stopped at the token limit, not where the model ended it."
    )


class ErrorEvent(_ReplyBase):
    """The request ends without an answer. ``text`` is for the user, ``code`` for programs."""

    kind: Literal["error"] = "error"
    code: ErrorCode
    text: str


ReplyEvent = Annotated[
    DeltaEvent | ProgressEvent | FinalEvent | ErrorEvent, Field(discriminator="kind")
]
_reply_adapter: TypeAdapter[ReplyEvent] = TypeAdapter(ReplyEvent)


def parse_reply(data: str | bytes) -> ReplyEvent:
    """Validate one reply event from its JSON; raises pydantic's ``ValidationError``."""
    return _reply_adapter.validate_json(data)
