"""The Telegram channel: Bot API updates in, the bus in the middle, Bot API calls out.

``sprbot adapter telegram`` runs one ``TelegramAdapter``: python-telegram-bot's
``Application`` (its bot and handlers) for what arrives, and a reply pump for what goes out.

- Updates arrive by long polling (``getUpdates``), or at a webhook when
  ``SPRBOT_TELEGRAM_WEBHOOK_URL`` is set; the webhook answers 403 to an update without the
  secret token of ``SPRBOT_TELEGRAM_WEBHOOK_SECRET``, before looking at it.
- Nothing is lost or replayed across restarts. PTB's own ``Updater`` confirms an update (the
  next ``getUpdates`` offset) once it is queued in memory, and again on shutdown, so an update
  taken just before a crash would be gone. Here the offset moves past an update only after
  ``Application.process_update`` has put its request on the bus; the webhook answers 200 only
  then, and 500 otherwise, so that Telegram delivers it again. A re-delivered update is
  dropped: its request id comes from the update id (``request_id("telegram", bot id,
  update id)``), which the bus's ingress dedupe has seen. Its placeholder is remembered per
  request, so a second delivery does not post a second one; commands and buttons, which do
  not go through the bus, are claimed per update instead (at most once: a replayed
  ``/model rollback`` would roll back twice). Pending updates are never dropped.
- What it answers: every private message; in groups, a message that @mentions the bot,
  replies to one of its messages, or is a command; in a forum topic, within the topic. Other
  bots and edited messages are ignored unless ``SPRBOT_TELEGRAM_ANSWER_BOTS`` /
  ``SPRBOT_TELEGRAM_ANSWER_EDITS`` say otherwise. The conversation is the chat plus its topic.
- The pump reads the ``telegram`` reply stream. It shows "typing…" while the model works
  (again every ``typing_every_s``: Telegram clears it after 5 s), and edits the placeholder
  as deltas arrive, at most once per ``edit_interval_s`` per chat, ``group_interval_s`` in
  groups (Telegram allows about one message a second per chat and 20 a minute per group). A
  429 holds that chat for its ``retry_after``; "message is not modified" means the chat shows
  it already. Answers are rendered to Telegram HTML; if Telegram cannot parse the entities,
  the same answer goes out as plain text. Long answers are split under 4,096 characters at
  paragraphs and code fences, and the last message carries 👍/👎 buttons.
- Commands (``/start``, ``/help``, ``/reset``, ``/faq``, ``/retrain``, ``/train``,
  ``/model``) go through ``bot.commands``, which decides who may run what
  (``SPRBOT_TELEGRAM_ADMINS``). They are registered with ``setMyCommands``: the public ones
  for everyone, all of them in each admin's private chat.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import logging
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from telegram import (
    BotCommand,
    BotCommandScopeChat,
    BotCommandScopeDefault,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    LinkPreviewOptions,
    Message,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatType, MessageEntityType, ParseMode
from telegram.error import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.ext import (
    Application,
    ApplicationBuilder,
    CallbackQueryHandler,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    filters,
)
from telegram.warnings import PTBDeprecationWarning

from bot.bus import Bus, Display, Reply, ReplyTracker, seen_key
from bot.commands import COMMANDS, CommandContext, Stores, dispatch, parse
from bot.config import Settings
from bot.errors import SprbotError
from bot.faq import Exchange, FaqError
from bot.logs import SecretMask, request_context
from bot.memory import ConversationMemory
from bot.render import BULLET, HEADING, INLINE_CODE, Throttle, fenced_segments, split_text
from bot.schemas import ChatRequest, request_id, shape_problem

log = logging.getLogger(__name__)

CHANNEL = "telegram"
TEXT_LIMIT = 4096  # characters of a message, after entity parsing
MAX_MESSAGES = 10  # messages per answer, so one answer cannot flood a chat
PHOTO_LIMIT = 10 * 1024 * 1024  # bytes; a bigger image goes as a document
MAX_BODY_BYTES = 1 << 20  # a webhook update: Telegram's are a few KB
PLACEHOLDER = "…"
TYPING = " …"  # after the text of an answer still being written
NO_ANSWER = "(no answer)"
SORRY = "Sorry, something went wrong — the admins have been told."
WARNING_SIGN = "⚠️ "
THANKS_UP = "Thanks! I saved this answer as a FAQ candidate for the admins to review."
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"

FEEDBACK_UP = "fb:up:"  # callback data: prefix + request id (64 bytes at most)
FEEDBACK_DOWN = "fb:down:"
_FEEDBACK = re.compile(r"^fb:(up|down):(.+)$")

# Redis keys of this adapter; every replica of it shares them.
PLACEHOLDER_KEY = "sprbot:telegram:placeholder:"  # <request id>: its placeholder's message id
ANSWER_KEY = "sprbot:telegram:answer:"  # <chat id>:<message id>: the request it shows
HANDLED = "sprbot:telegram:handled:"  # <request id>: a command or button press acted on
DELIVERED = "sprbot:telegram:delivered:"  # <request id>: the final reply is shown

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp")
_NO_PREVIEW = LinkPreviewOptions(is_disabled=True)
_WEBHOOK_SECRET = re.compile(r"[A-Za-z0-9_-]{1,256}")


class TelegramSetupError(SprbotError):
    """The Telegram settings cannot work: the message names the setting and what to do."""


class _Paused(Exception):
    """Telegram answered 429 for this chat: nothing more goes there until its retry_after."""


# -- the token stays out of the logs -------------------------------------------------------------

# The bot token is part of every Bot API URL: PTB logs the URL at DEBUG when it builds its bot,
# and httpx logs each request's URL at INFO. Masked on the loggers that may, as well as by the
# handlers ``configure_logging`` sets up, for code that embeds the adapter without them.
_REDACT = SecretMask()
_REDACTED_LOGGERS = (
    "telegram",
    "telegram.Bot",
    "telegram.ext",
    "telegram.ext.ExtBot",
    "telegram.ext.Application",
    "telegram.ext.Updater",
    "httpx",
    "httpcore",
    "tornado.access",
    "tornado.application",
    "tornado.general",
    __name__,
)


def _protect(token: str) -> None:
    _REDACT.add(token)
    for name in _REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if _REDACT not in logger.filters:
            logger.addFilter(_REDACT)
    # httpx's INFO line per request is the URL, token included: keep it out at any level.
    root = logging.getLogger().getEffectiveLevel()
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(max(logging.WARNING, root))


# -- text: Markdown to Telegram HTML ---------------------------------------------------------------


def escape(text: str) -> str:
    """The escapes Telegram's HTML needs in text and attribute values."""
    return html.escape(text, quote=True).replace("&#x27;", "'")


_QUOTE_LINES = re.compile(r"(?:^[ \t]*&gt;[ \t]?.*(?:\n|$))+", re.M)
_QUOTE_MARK = re.compile(r"^[ \t]*&gt;[ \t]?", re.M)
_INLINE = re.compile(
    r"!?\[(?P<label>[^\]\n]+)\]\((?P<url>(?:https?|tg|mailto):[^)\s]+)\)"
    r"|\*\*(?P<b1>[^*\n]+?)\*\*|__(?P<b2>[^_\n]+?)__"
    r"|(?<![\w*])\*(?P<it>[^*\s](?:[^*\n]*?[^*\s])?)\*(?![\w*])"
    r"|(?<![\w_])_(?P<it2>[^_\s](?:[^_\n]*?[^_\s])?)_(?![\w_])"
    r"|~~(?P<st>[^~\n]+?)~~"
)
_LANGUAGE = re.compile(r"[\w+#.-]{1,32}")


def _inline(match: re.Match) -> str:
    if match.group("url"):
        return f'<a href="{match.group("url")}">{match.group("label")}</a>'
    if match.group("b1") or match.group("b2"):
        return f"<b>{match.group('b1') or match.group('b2')}</b>"
    if match.group("it") or match.group("it2"):
        return f"<i>{match.group('it') or match.group('it2')}</i>"
    return f"<s>{match.group('st')}</s>"


def _quote(match: re.Match) -> str:
    block = match.group(0)
    tail = "\n" if block.endswith("\n") else ""
    return f"<blockquote>{_QUOTE_MARK.sub('', block.rstrip(chr(10)))}</blockquote>{tail}"


def _format(text: str) -> str:
    text = escape(text)  # first: every tag below is ours, every < > & in the text escaped
    text = BULLET.sub(r"\1• ", text)
    text = _INLINE.sub(_inline, text)
    text = HEADING.sub(lambda m: f"<b>{m.group(1)}</b>", text)
    return _QUOTE_LINES.sub(_quote, text)


def _prose(text: str) -> str:
    out = []
    last = 0
    for code in INLINE_CODE.finditer(text):  # inline code is shown as it is
        out.append(_format(text[last : code.start()]))
        out.append(f"<code>{escape(code.group(2).strip() or code.group(2))}</code>")
        last = code.end()
    out.append(_format(text[last:]))
    return "".join(out)


def to_html(markdown: str) -> str:
    """The model's Markdown as Telegram HTML: bold, italics, strikethrough, links, headings,
    bullets and quotes converted; code blocks as ``<pre>`` (with their language), inline code
    as ``<code>``, neither formatted inside; a fence still open at the end (an answer still
    streaming) closed. What is shown never has more characters than ``markdown``, so a part
    that ``split_text`` fitted to 4,096 still fits."""
    out = []
    for is_code, segment in fenced_segments(markdown):
        if not is_code:
            out.append(_prose(segment))
            continue
        lines = segment.split("\n")
        opening, body = lines[0].strip(), lines[1:]
        for i in range(len(body) - 1, -1, -1):
            if body[i].strip():
                if re.fullmatch(r" {0,3}(`{3,}|~{3,})\s*", body[i]):
                    body = body[:i] + body[i + 1 :]
                break
        language = opening.lstrip("`~").strip().split(" ", 1)[0]
        code = escape("\n".join(body).rstrip("\n"))
        tail = "\n" if segment.endswith("\n") else ""
        if _LANGUAGE.fullmatch(language):
            out.append(f'<pre><code class="language-{language}">{code}</code></pre>{tail}')
        else:
            out.append(f"<pre>{code}</pre>{tail}")
    return "".join(out)


def conversation_key(chat_id: int, topic: int | None) -> str:
    """chat/topic: a forum topic is one conversation; the rest of a chat is another."""
    return f"{chat_id}/{topic if topic is not None else 'main'}"


def api_urls(api_url: str) -> tuple[str, str]:
    """``SPRBOT_TELEGRAM_API_URL`` as PTB's ``base_url`` and ``base_file_url``: the token is
    appended to (or put in place of ``{token}`` in) ``…/bot``, and files are served from
    ``…/file/bot`` (as api.telegram.org and the self-hosted Bot API server do)."""
    url = api_url.strip()
    if "{token}" not in url and not url.rstrip("/").endswith("/bot"):
        url = url.rstrip("/") + "/bot"
    url = url if "{token}" in url else url.rstrip("/")
    head, sep, tail = url.rpartition("/bot")
    return url, (head + "/file/bot" + tail if sep else url)


def _retry_after_s(exc: RetryAfter) -> float:
    with warnings.catch_warnings():  # PTB 22 warns that the int form will become a timedelta
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = exc.retry_after
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    return max(0.0, seconds)


def _retryable(exc: BaseException) -> bool:
    """Errors after which an update must be delivered again rather than given up: Redis or
    the network away (``BadRequest`` is a ``NetworkError`` in PTB, but final), a 429."""
    if isinstance(exc, redis.RedisError | RetryAfter):
        return True
    return isinstance(exc, NetworkError) and not isinstance(exc, BadRequest)


def _says(exc: TelegramError, *phrases: str) -> bool:
    text = exc.message.lower()
    return any(p in text for p in phrases)


# -- showing replies -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """One message of an answer: its plain text, its HTML (None: plain only), and the request
    whose 👍/👎 buttons it carries ("" none)."""

    text: str
    html: str | None = None
    feedback: str = ""


def _part(markdown: str, suffix: str = "") -> _Part:
    return _Part(markdown + suffix, to_html(markdown) + escape(suffix))


@dataclass
class _Outgoing:
    """One answer on its way to a chat: where it is shown, and what is left to show."""

    request_id: str
    chat_id: int
    thread_id: int | None
    quote: int | None  # the message the first one replies to
    feedback: bool  # an answer to someone's question (not a training job's report)
    messages: list[int]  # ids of the messages that show the answer, in order
    shown: list[_Part]  # what each of them shows now
    pending: Display | None = None  # newest state not yet shown
    entries: list[str] = field(default_factory=list)  # final/error entries, acked when shown
    plain: bool = False  # Telegram refused our HTML once: plain text from then on
    files_sent: int = 0
    failures: int = 0
    shown_at: float = 0.0  # when it was last shown (monotonic)

    @classmethod
    def from_reply_to(cls, rid: str, reply_to: dict[str, Any]) -> _Outgoing:
        """``reply_to`` as the ingress wrote it: ``chat_id``, ``message_id`` of the
        placeholder, ``thread_id``. Without ``message_id`` (a training job's report) the
        answer is posted as new messages, replying to ``quote`` when given."""
        chat_id = reply_to["chat_id"]
        message_id, thread_id = reply_to.get("message_id"), reply_to.get("thread_id")
        quote = reply_to.get("quote")
        for value in (chat_id, message_id, thread_id, quote):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError("chat_id, message_id, thread_id and quote must be integers")
        if chat_id is None:
            raise ValueError("no chat_id")
        if message_id is not None:
            return cls(rid, chat_id, thread_id, quote, True, [message_id], [_Part(PLACEHOLDER)])
        return cls(rid, chat_id, thread_id, quote, False, [], [])


class ReplyPump:
    """Reads the ``telegram`` reply stream and shows each answer as it grows. What is
    acknowledged when, and how a replica's reclaimed final is shown once: ``ReplyTracker``.
    """

    def __init__(
        self,
        bot: Any,
        bus: Bus,
        *,
        edit_interval_s: float = 1.0,
        group_interval_s: float = 3.0,
        typing_every_s: float = 4.0,
        consumer: str | None = None,
        reclaim_idle_ms: int = 120_000,
        give_up_after: int = 8,
        answer_ttl_s: int = 7 * 86_400,
    ) -> None:
        self.bot = bot
        self.bus = bus
        # Keyed by chat: Telegram paces messages per chat, and a 429 holds that chat only.
        self.private = Throttle(edit_interval_s)
        self.groups = Throttle(group_interval_s)
        self.typing_every_s = typing_every_s
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.reclaim_idle_ms = reclaim_idle_ms
        self.give_up_after = give_up_after  # failed tries (network) before a final is dropped
        self.answer_ttl_s = answer_ttl_s
        self.tracker: ReplyTracker[_Outgoing] = ReplyTracker(
            bus, CHANNEL, DELIVERED, _Outgoing.from_reply_to
        )
        self.outgoing = self.tracker.outgoing  # the answers being shown, by request id
        self.typing: dict[str, tuple[int, int | None, float]] = {}  # rid -> chat, topic, since
        self.typing_for_s = 900.0  # no reply this long: stop showing "typing"
        self._last_typing = 0.0
        self._last_reclaim = 0.0

    def throttle(self, chat_id: int) -> Throttle:
        return self.groups if chat_id < 0 else self.private  # groups have negative ids

    def expect(self, rid: str, chat_id: int, thread_id: int | None) -> None:
        """Show "typing" in the chat until the answer to ``rid`` is shown."""
        self.typing[rid] = (chat_id, thread_id, time.monotonic())

    async def run(self, stop: threading.Event, drain_s: float = 10.0) -> None:
        """Show replies until ``stop`` is set; then up to ``drain_s`` more for finals in hand."""
        while not stop.is_set():
            try:
                await self.poll()
            except Exception:  # Redis unreachable, say: keep going, it may come back
                log.exception("reading Telegram replies failed; retrying in 1s")
                await asyncio.sleep(1.0)
        deadline = time.monotonic() + drain_s
        while any(o.entries for o in self.outgoing.values()) and time.monotonic() < deadline:
            await self.flush()
            await asyncio.sleep(0.05)
        self.bus.retire(self.consumer, CHANNEL)

    async def poll(self, block_ms: int = 1000) -> None:
        """Read what has arrived (waiting up to ``block_ms``, less when an edit or a typing
        action is due) and show what may be shown now."""
        waits = [
            self.throttle(o.chat_id).wait_s(o.chat_id) for o in self.outgoing.values() if o.pending
        ]
        if self.typing:
            waits.append(self._last_typing + self.typing_every_s - time.monotonic())
        if waits:
            block_ms = max(10, min(block_ms, int(max(0.0, min(waits)) * 1000) + 10))
        replies = await asyncio.to_thread(self._read, block_ms)
        done = [entry for reply in replies for entry in self.tracker.take(reply)]
        if done:
            self.bus.ack_replies(CHANNEL, *done)
        await self.flush()
        await self._keep_typing()

    def _read(self, block_ms: int) -> list[Reply]:
        replies = self.bus.read_replies(CHANNEL, self.consumer, block_ms=block_ms)
        now = time.monotonic()
        if now - self._last_reclaim > min(30.0, self.reclaim_idle_ms / 2000):
            self._last_reclaim = now
            replies += self.bus.reclaim_replies(CHANNEL, self.consumer, self.reclaim_idle_ms)
        return replies

    async def flush(self) -> None:
        """Show the newest state of every answer whose chat may be written to now. The pace
        is per chat, so answers sharing a chat take turns: the least recently shown first."""
        for rid, out in sorted(self.outgoing.items(), key=lambda item: item[1].shown_at):
            throttle = self.throttle(out.chat_id)
            if out.pending is None or throttle.wait_s(out.chat_id) > 0:
                continue
            display = out.pending
            try:
                await self._show(out, display)
            except _Paused:
                continue  # this chat waits for its retry_after; the others go on
            except TelegramError as exc:
                if _retryable(exc):
                    self._failed(out, display, exc)
                    continue
                # The chat is gone, the bot was blocked or removed, the message is not
                # editable: retrying cannot help, so an intermediate edit is skipped and a
                # final dropped.
                log.warning("Telegram refused to show %s: %s", rid, exc.message)
                self._drop(out, display)
                continue
            except Exception as exc:  # the network, or a reply we could not read
                self._failed(out, display, exc)
                continue
            throttle.sent(out.chat_id)
            out.shown_at = time.monotonic()
            if display.done:
                self._finish(out, shown=True)
            elif out.pending is display:
                out.pending = None

    def _failed(self, out: _Outgoing, display: Display, exc: Exception) -> None:
        out.failures += 1
        self.throttle(out.chat_id).sent(out.chat_id)  # try again after the interval
        if out.failures < self.give_up_after:
            log.warning("showing %s failed (%s); will retry", out.request_id, exc)
            return
        log.error("showing %s failed %d times; giving up: %s", out.request_id, out.failures, exc)
        self._drop(out, display)

    def _drop(self, out: _Outgoing, display: Display) -> None:
        if display.done:
            self._finish(out, shown=False)
        else:
            out.pending = None

    async def _call(self, out: _Outgoing, method: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return await method(**kwargs)
        except RetryAfter as exc:
            wait = _retry_after_s(exc)
            log.info("Telegram flood control: nothing to chat %s for %.1fs", out.chat_id, wait)
            self.throttle(out.chat_id).back_off(wait, key=out.chat_id)
            raise _Paused from None

    async def _show(self, out: _Outgoing, display: Display) -> None:
        parts = self._render(display, out)
        for i, part in enumerate(parts):
            if i < len(out.messages):
                if out.shown[i] != part:
                    await self._edit(out, i, part)
            else:
                await self._post(out, part)
        if not display.done:
            return
        while len(out.messages) > len(parts):  # a restarted attempt came out shorter
            try:
                await self._call(
                    out, self.bot.delete_message, chat_id=out.chat_id, message_id=out.messages[-1]
                )
            except BadRequest as exc:
                log.info("deleting a part of %s: %s", out.request_id, exc.message)
            out.messages.pop()
            out.shown.pop()
        for path in display.attachments[out.files_sent :]:
            await self._attach(out, path)
            out.files_sent += 1

    def _content(self, out: _Outgoing, part: _Part) -> dict[str, Any]:
        markup = None
        if part.feedback:
            markup = InlineKeyboardMarkup(
                [
                    [
                        InlineKeyboardButton("👍", callback_data=FEEDBACK_UP + part.feedback),
                        InlineKeyboardButton("👎", callback_data=FEEDBACK_DOWN + part.feedback),
                    ]
                ]
            )
        content: dict[str, Any] = {"reply_markup": markup, "link_preview_options": _NO_PREVIEW}
        if part.html is not None and not out.plain:
            return {**content, "text": part.html, "parse_mode": ParseMode.HTML}
        return {**content, "text": part.text}

    async def _edit(self, out: _Outgoing, i: int, part: _Part) -> None:
        where = {"chat_id": out.chat_id, "message_id": out.messages[i]}
        try:
            await self._call(out, self.bot.edit_message_text, **where, **self._content(out, part))
        except BadRequest as exc:
            if _says(exc, "not modified"):
                pass  # the chat shows exactly this already (a reclaimed final, say)
            elif _says(exc, "can't parse entities", "can't find end tag") and not out.plain:
                log.warning("Telegram could not parse the HTML of %s: sent as plain text (%s)",
                            out.request_id, exc.message)  # fmt: skip
                out.plain = True
                await self._call(
                    out, self.bot.edit_message_text, **where, **self._content(out, part)
                )
            elif _says(exc, "message to edit not found", "message can't be edited"):
                # Someone deleted the placeholder: the answer still arrives, as a new message.
                sent = await self._send(out, part)
                out.messages[i] = sent.message_id
                self._remember(out, sent.message_id)
            else:
                raise
        out.shown[i] = part

    async def _post(self, out: _Outgoing, part: _Part) -> None:
        sent = await self._send(out, part)
        out.messages.append(sent.message_id)
        out.shown.append(part)
        self._remember(out, sent.message_id)

    async def _send(self, out: _Outgoing, part: _Part) -> Message:
        quote = out.quote if not out.messages else None
        kwargs: dict[str, Any] = {"chat_id": out.chat_id, "message_thread_id": out.thread_id}
        if quote is not None:
            kwargs["reply_parameters"] = ReplyParameters(quote, allow_sending_without_reply=True)
        try:
            return await self._call(
                out, self.bot.send_message, **kwargs, **self._content(out, part)
            )
        except BadRequest as exc:
            if out.plain or not _says(exc, "can't parse entities", "can't find end tag"):
                raise
            log.warning("Telegram could not parse the HTML of %s: sent as plain text (%s)",
                        out.request_id, exc.message)  # fmt: skip
            out.plain = True
            return await self._call(
                out, self.bot.send_message, **kwargs, **self._content(out, part)
            )

    def _remember(self, out: _Outgoing, message_id: int) -> None:
        """A reply to this message refers to the request (``/faq correct``)."""
        if out.feedback:
            self.bus.redis.set(
                f"{ANSWER_KEY}{out.chat_id}:{message_id}", out.request_id, ex=self.answer_ttl_s
            )

    async def _attach(self, out: _Outgoing, path: str) -> None:
        """Upload a file of the final answer (a training report's loss.png): images with
        sendPhoto, anything else (or an image Telegram will not take) with sendDocument."""
        file = Path(path)
        if not file.is_file():
            log.warning("attachment %s of %s is missing: not sent", path, out.request_id)
            return
        where = {"chat_id": out.chat_id, "message_thread_id": out.thread_id}
        data = file.read_bytes()
        if file.suffix.lower() in _IMAGE_SUFFIXES and len(data) <= PHOTO_LIMIT:
            try:
                await self._call(out, self.bot.send_photo, photo=data, filename=file.name, **where)
                return
            except BadRequest as exc:
                log.info("sendPhoto refused %s (%s): sent as a document", file.name, exc.message)
        await self._call(out, self.bot.send_document, document=data, filename=file.name, **where)

    def _render(self, display: Display, out: _Outgoing) -> list[_Part]:
        """The messages that show ``display``: the answer split to fit, typing marker while
        it grows, feedback buttons under a finished one; an error's text alone."""
        if display.code is not None:
            return [_Part(WARNING_SIGN + (display.text or SORRY))]
        if not display.done:
            if not display.text.strip():
                if not display.status:
                    return [_Part(PLACEHOLDER)]
                status = display.status
                return [_Part(f"{PLACEHOLDER} {status}", f"{PLACEHOLDER} <i>{escape(status)}</i>")]
            pieces = split_text(display.text, TEXT_LIMIT - len(TYPING))[:MAX_MESSAGES]
            return [_part(p, TYPING if i == len(pieces) - 1 else "") for i, p in enumerate(pieces)]
        pieces = split_text(display.text, TEXT_LIMIT) or [NO_ANSWER]
        if len(pieces) > MAX_MESSAGES:
            pieces = pieces[:MAX_MESSAGES]
            pieces[-1] = pieces[-1][: TEXT_LIMIT - 40] + "\n\n(answer cut short: too long)"
        parts = [_part(p) for p in pieces]
        if out.feedback:
            parts[-1] = replace(parts[-1], feedback=out.request_id)
        return parts

    def _finish(self, out: _Outgoing, *, shown: bool) -> None:
        self.tracker.finished(out.request_id, shown=shown)
        self.typing.pop(out.request_id, None)
        if not any(o.chat_id == out.chat_id for o in self.outgoing.values()):
            self.throttle(out.chat_id).forget(out.chat_id)

    async def _keep_typing(self) -> None:
        """Send "typing" to every chat with an answer still being written, every
        ``typing_every_s`` (Telegram shows it for 5 s at most)."""
        now = time.monotonic()
        if not self.typing or now - self._last_typing < self.typing_every_s:
            return
        self._last_typing = now
        rids = list(self.typing)
        pipe = self.bus.redis.pipeline(transaction=False)
        for rid in rids:
            pipe.exists(DELIVERED + rid)
        for rid, shown in zip(rids, pipe.execute(), strict=True):
            if shown or now - self.typing[rid][2] > self.typing_for_s:
                del self.typing[rid]  # answered (perhaps by another replica), or given up
        for chat_id, thread_id in {(c, t) for c, t, _ in self.typing.values()}:
            throttle = self.throttle(chat_id)
            if throttle.wait_s(chat_id) > throttle.interval_s:
                continue  # longer than an edit's pacing: the chat is held by a 429
            try:
                await self.bot.send_chat_action(
                    chat_id=chat_id, action=ChatAction.TYPING, message_thread_id=thread_id
                )
            except RetryAfter as exc:
                self.throttle(chat_id).back_off(_retry_after_s(exc), key=chat_id)
            except TelegramError as exc:
                log.debug("typing in %s: %s", chat_id, exc)


# -- the adapter ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sender:
    id: str
    name: str


class TelegramAdapter:
    """Telegram in and out: PTB's ``Application`` with its handlers, plus a ReplyPump.

    Needs ``SPRBOT_TELEGRAM_TOKEN``; the Bot API is reached at ``SPRBOT_TELEGRAM_API_URL``.
    Long polling, unless ``SPRBOT_TELEGRAM_WEBHOOK_URL`` is set, which also needs
    ``SPRBOT_TELEGRAM_WEBHOOK_SECRET``. ``stores`` are what commands and feedback act on
    (without them, those that need the FAQ say they are unavailable); ``edit_interval_s`` and
    ``group_interval_s`` pace the messages of one private chat and of one group;
    ``typing_every_s`` repeats the typing action; replicas need distinct ``consumer`` names
    (default: host and process id). Replicas can share the webhook's load; only one may poll.
    """

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        memory: ConversationMemory,
        *,
        stores: Stores | None = None,
        edit_interval_s: float = 1.0,
        group_interval_s: float = 3.0,
        typing_every_s: float = 4.0,
        consumer: str | None = None,
        poll_timeout_s: int = 30,
    ) -> None:
        token = _secret(settings.telegram_token)
        if not token:
            raise TelegramSetupError(
                "SPRBOT_TELEGRAM_TOKEN is not set: give the token BotFather gave the bot"
            )
        _protect(token)
        self.webhook_url = settings.telegram_webhook_url
        self.webhook_secret = _secret(settings.telegram_webhook_secret)
        if self.webhook_url:
            if not self.webhook_url.startswith("https://"):
                raise TelegramSetupError(
                    f"SPRBOT_TELEGRAM_WEBHOOK_URL must be an https:// URL (Telegram only calls "
                    f"those), got {self.webhook_url!r}"
                )
            if not _WEBHOOK_SECRET.fullmatch(self.webhook_secret):
                raise TelegramSetupError(
                    "SPRBOT_TELEGRAM_WEBHOOK_SECRET must be set in webhook mode, 1-256 "
                    "characters of A-Z, a-z, 0-9, _ and - (Telegram sends it with every update)"
                )
        self.settings = settings
        self.bus = bus
        self.memory = memory
        self.stores = stores
        self.poll_timeout_s = poll_timeout_s
        self.admins = [a for a in settings.admins(CHANNEL) if a.lstrip("-").isdigit()]
        for wrong in sorted(settings.admins(CHANNEL) - set(self.admins)):
            log.warning(
                "SPRBOT_TELEGRAM_ADMINS: %r is not a numeric Telegram user id and can never "
                "match a user",
                wrong,
            )
        self.api_url, file_url = api_urls(settings.telegram_api_url)
        self.application: Application = (
            ApplicationBuilder()
            .token(token)
            .base_url(self.api_url)
            .base_file_url(file_url)
            .updater(None)  # polling is ours: see the module docstring
            .build()
        )
        self.bot = self.application.bot
        self.pump = ReplyPump(
            self.bot,
            bus,
            edit_interval_s=edit_interval_s,
            group_interval_s=group_interval_s,
            typing_every_s=typing_every_s,
            consumer=consumer,
            answer_ttl_s=settings.memory_ttl_s,
            reclaim_idle_ms=settings.reply_reclaim_idle_ms,
        )
        self._not_taken: set[int] = set()  # update ids whose handling must be retried
        accepted = (
            filters.UpdateType.MESSAGES
            if settings.telegram_answer_edits
            else filters.UpdateType.MESSAGE
        )
        self.allowed_updates = ["message", "callback_query"]
        if settings.telegram_answer_edits:
            self.allowed_updates.insert(1, "edited_message")
        verbs = sorted({name.split(" ", 1)[0].lstrip("/") for name in COMMANDS} | {"start"})
        app = self.application
        app.add_handler(CallbackQueryHandler(self._on_feedback, pattern=_FEEDBACK))
        app.add_handler(CommandHandler(verbs, self._on_command, filters=accepted))
        app.add_handler(MessageHandler(accepted & filters.COMMAND, self._on_unknown_command))
        app.add_handler(MessageHandler(accepted & (filters.TEXT | filters.CAPTION), self._on_text))
        app.add_handler(
            MessageHandler(
                accepted & filters.ChatType.PRIVATE & ~filters.StatusUpdate.ALL, self._on_other
            )
        )
        app.add_error_handler(self._on_error)

    @property
    def redis(self) -> redis.Redis:
        return self.bus.redis

    # -- running ---------------------------------------------------------------------------

    def serve(
        self,
        stop: threading.Event,
        *,
        host: str = "0.0.0.0",
        port: int | None = None,
        on_ready: Callable[[int | None], None] | None = None,
    ) -> None:
        """Receive from Telegram and show replies until ``stop`` is set: long polling, or a
        webhook on ``port`` (default ``SPRBOT_TELEGRAM_WEBHOOK_PORT``; 0 picks a free one)
        when a webhook URL is set. ``on_ready`` gets the webhook's port (None when polling)."""
        asyncio.run(self._serve(stop, host, port, on_ready))

    async def _serve(self, stop: threading.Event, host: str, port: int | None, on_ready) -> None:
        pump: asyncio.Task | None = None
        try:
            await self._start()
            pump = asyncio.create_task(self.pump.run(stop), name="telegram-replies")
            if self.webhook_url:
                port = self.settings.telegram_webhook_port if port is None else port
                await self._serve_webhook(stop, host, port, on_ready)
            else:
                await self._serve_polling(stop, on_ready)
        finally:
            stop.set()
            if pump is not None:
                await pump
            with contextlib.suppress(Exception):
                await self.application.shutdown()

    async def _start(self) -> None:
        try:
            await self.application.initialize()  # getMe
        except InvalidToken:  # PTB's message quotes the token: not repeated here
            raise TelegramSetupError(
                "Telegram refused SPRBOT_TELEGRAM_TOKEN (getMe: unauthorized): copy the token "
                "BotFather gave the bot (/mybots → API Token), and check SPRBOT_TELEGRAM_API_URL"
            ) from None
        except TelegramError as exc:
            raise TelegramSetupError(
                f"cannot reach the Telegram Bot API at {self.settings.telegram_api_url} "
                f"(SPRBOT_TELEGRAM_API_URL): {_REDACT.mask(exc.message)}"
            ) from None
        self.bot_id = self.bot.id
        self.username = self.bot.username or ""
        await self._register_commands()

    async def _register_commands(self) -> None:
        """The command menu: public commands for everyone; all of them, admin ones included,
        in each admin's private chat (the narrowest scope Telegram has for one user)."""
        public = _bot_commands(admin=False)
        try:
            await self.bot.set_my_commands(public, scope=BotCommandScopeDefault())
        except TelegramError as exc:
            log.warning("setMyCommands failed (%s): the command menu is not set", exc.message)
        for admin in self.admins:
            await self._admin_menu(int(admin))

    async def _admin_menu(self, admin: int) -> None:
        try:
            commands = _bot_commands(admin=True)
            await self.bot.set_my_commands(commands, scope=BotCommandScopeChat(admin))
        except TelegramError as exc:
            log.info(
                "admin %s sees the public command menu until they send the bot /start (%s)",
                admin,
                exc.message,
            )

    async def _serve_polling(self, stop: threading.Event, on_ready) -> None:
        # A webhook left behind makes getUpdates fail; its queued updates are kept.
        try:
            await self.bot.delete_webhook(drop_pending_updates=False)
        except TelegramError as exc:
            log.warning("deleteWebhook failed (%s); polling anyway", exc.message)
        log.info("Telegram adapter: long polling as @%s", self.username)
        if on_ready:
            on_ready(None)
        offset: int | None = None  # None: from the oldest update Telegram still holds
        confirmed = offset
        backoff = 1.0
        while not stop.is_set():
            fetch = asyncio.create_task(
                self.bot.get_updates(
                    offset=offset,
                    timeout=self.poll_timeout_s,
                    allowed_updates=self.allowed_updates,
                )
            )
            if not await _until_stopped(fetch, stop):
                break
            try:
                updates = fetch.result()
            except InvalidToken:
                raise TelegramSetupError(
                    "Telegram refused SPRBOT_TELEGRAM_TOKEN (getUpdates: unauthorized): was the "
                    "token revoked in BotFather?"
                ) from None
            except Conflict as exc:
                log.error(
                    "getUpdates conflict (%s): another process polls this bot, or a webhook was "
                    "set; only one sprbot telegram adapter may poll. Retrying in 10s",
                    exc.message,
                )
                await _sleep(stop, 10.0)
                continue
            except RetryAfter as exc:
                await _sleep(stop, _retry_after_s(exc))
                continue
            except TelegramError as exc:
                log.warning("getUpdates failed (%s); retrying in %.0fs", exc.message, backoff)
                await _sleep(stop, backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 1.0
            confirmed = offset  # the call just made confirmed everything below it
            for update in updates:
                if stop.is_set():
                    break  # not taken: Telegram hands it out again
                if not await self.process(update):
                    await _sleep(stop, backoff)
                    backoff = min(backoff * 2, 30.0)
                    break
                offset = update.update_id + 1
        if offset is not None and offset != confirmed:
            try:  # confirm what is on the bus, so a restart does not fetch it again
                await self.bot.get_updates(offset=offset, timeout=0, limit=1)
            except TelegramError as exc:
                log.info("could not confirm updates before %s (%s): the bus dedupes them on "
                         "restart", offset, exc.message)  # fmt: skip

    async def process(self, update: Update) -> bool:
        """Handle one update; True once it is taken for good (its request durably on the bus,
        or nothing to do), False when Telegram must deliver it again."""
        self._not_taken.discard(update.update_id)
        await self.application.process_update(update)
        if update.update_id in self._not_taken:
            self._not_taken.discard(update.update_id)
            return False
        return True

    async def _serve_webhook(self, stop: threading.Event, host: str, port: int, on_ready) -> None:
        import tornado.httpserver
        import tornado.netutil
        import tornado.web

        path = urlsplit(self.webhook_url).path or "/"
        app = tornado.web.Application(
            [(re.escape(path), _webhook_handler(), {"adapter": self})], log_function=_log_request
        )
        server = tornado.httpserver.HTTPServer(app, max_body_size=MAX_BODY_BYTES)
        try:
            sockets = tornado.netutil.bind_sockets(port, host)
        except OSError as exc:
            raise TelegramSetupError(
                f"cannot listen on port {port} (SPRBOT_TELEGRAM_WEBHOOK_PORT): "
                f"{exc.strerror or exc}"
            ) from None
        server.add_sockets(sockets)
        try:
            try:
                await self.bot.set_webhook(
                    url=self.webhook_url,
                    secret_token=self.webhook_secret,
                    allowed_updates=self.allowed_updates,
                    drop_pending_updates=False,
                )
            except TelegramError as exc:
                raise TelegramSetupError(
                    f"Telegram refused SPRBOT_TELEGRAM_WEBHOOK_URL (setWebhook: {exc.message})"
                ) from None
            listening = sockets[0].getsockname()[1]
            log.info("Telegram adapter: webhook on port %d at %s", listening, path)
            if on_ready:
                on_ready(listening)
            while not stop.is_set():
                await asyncio.sleep(0.1)
        finally:
            server.stop()
            await server.close_all_connections()

    # -- messages --------------------------------------------------------------------------

    def _sender(self, message: Message) -> _Sender | None:
        """Who wrote ``message``, if it is someone the bot answers."""
        user = message.from_user
        if message.is_automatic_forward or user is None or user.id == self.bot_id:
            return None
        if message.sender_chat is not None and message.sender_chat.id == message.chat_id:
            # An anonymous group admin: Telegram shows them as the group itself.
            return _Sender(str(message.chat_id), message.chat.title or "")
        if user.is_bot and not self.settings.telegram_answer_bots:
            return None
        return _Sender(str(user.id), (user.full_name or user.username or "")[:256])

    def _for_model(self, message: Message) -> tuple[str, bool]:
        """The text without the bot's own @mention, and whether it mentioned the bot."""
        text = message.text or message.caption or ""
        entities = message.entities if message.text else message.caption_entities
        units = text.encode("utf-16-le")  # Telegram counts offsets in UTF-16 code units
        cuts = []
        for entity in entities or ():
            value = units[entity.offset * 2 : (entity.offset + entity.length) * 2]
            ours = (
                entity.type == MessageEntityType.MENTION
                and value.decode("utf-16-le").lstrip("@").lower() == self.username.lower()
            ) or (
                entity.type == MessageEntityType.TEXT_MENTION
                and entity.user is not None
                and entity.user.id == self.bot_id
            )
            if ours:
                cuts.append((entity.offset * 2, (entity.offset + entity.length) * 2))
        for start, end in sorted(cuts, reverse=True):
            units = units[:start] + units[end:]
        stripped = re.sub(r"[ \t]{2,}", " ", units.decode("utf-16-le")).strip()
        return stripped, bool(cuts)

    def _replies_to_bot(self, message: Message) -> bool:
        replied = message.reply_to_message
        return (
            replied is not None
            and replied.from_user is not None
            and replied.from_user.id == self.bot_id
            and replied.forum_topic_created is None  # in a topic, every message "replies" to it
        )

    @staticmethod
    def _topic(message: Message) -> int | None:
        return message.message_thread_id if message.is_topic_message else None

    async def _on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        sender = self._sender(message)
        if sender is None:
            return
        text, mentioned = self._for_model(message)
        private = message.chat.type == ChatType.PRIVATE
        if not (private or mentioned or self._replies_to_bot(message)):
            return  # group chatter the bot was not asked about
        if not text or parse(text) is not None:  # "@bot" alone, or "@bot /faq list"
            await self._command(update, message, sender, text or "/help")
            return
        await self._ask(update, message, sender, text)

    async def _ask(self, update: Update, message: Message, sender: _Sender, text: str) -> None:
        rid = request_id(CHANNEL, self.bot_id, update.update_id)
        with request_context(rid):  # its log lines carry the request id
            if self.redis.exists(seen_key(rid)):
                return  # on the bus already: Telegram delivered the update again
            chat_id, topic = message.chat_id, self._topic(message)
            reply_to = await self._placeholder(rid, message)
            await self._typing(chat_id, topic)
            try:
                request = ChatRequest(
                    id=rid,
                    channel=CHANNEL,
                    conversation=conversation_key(chat_id, topic),
                    user_id=sender.id,
                    user_name=sender.name,
                    text=text,
                    reply_to=reply_to,
                )
            except ValueError:
                log.exception("update %s makes no valid request", update.update_id)
                await self._replace(reply_to, WARNING_SIGN + SORRY)
                return
            result = await asyncio.to_thread(self.bus.submit, request)
            if result.status != "duplicate":
                self.pump.expect(rid, chat_id, topic)

    async def _placeholder(self, rid: str, message: Message) -> dict[str, Any]:
        """Post where the answer will appear, once per request; its ids become ``reply_to``."""
        chat_id, topic = message.chat_id, self._topic(message)
        key = PLACEHOLDER_KEY + rid
        existing = self.redis.get(key)
        if existing is None:
            quote = None if message.chat.type == ChatType.PRIVATE else message.message_id
            sent = await self._send_waiting(chat_id, topic, PLACEHOLDER, quote)
            if self.redis.set(key, sent.message_id, nx=True, ex=self.bus.dedupe_ttl_s):
                existing = sent.message_id
                self.redis.set(
                    f"{ANSWER_KEY}{chat_id}:{sent.message_id}", rid, ex=self.settings.memory_ttl_s
                )
            else:  # a concurrent delivery of the update posted one first: keep that one
                existing = self.redis.get(key)
                with contextlib.suppress(TelegramError):
                    await self.bot.delete_message(chat_id, sent.message_id)
        return {"chat_id": chat_id, "message_id": int(existing), "thread_id": topic}

    async def _replace(self, reply_to: dict[str, Any], text: str) -> None:
        try:
            await self.bot.edit_message_text(
                text, chat_id=reply_to["chat_id"], message_id=reply_to["message_id"]
            )
        except TelegramError as exc:
            log.warning("could not replace a placeholder: %s", exc.message)

    async def _typing(self, chat_id: int, topic: int | None) -> None:
        try:
            await self.bot.send_chat_action(
                chat_id=chat_id, action=ChatAction.TYPING, message_thread_id=topic
            )
        except TelegramError as exc:  # only a courtesy
            log.debug("typing in %s: %s", chat_id, exc)

    async def _send_waiting(
        self, chat_id: int, topic: int | None, text: str, quote: int | None = None
    ) -> Message:
        """A message from a handler: on 429 wait the retry_after (up to 30 s) and try again,
        three times; after that the update is handled again later."""
        kwargs: dict[str, Any] = {"chat_id": chat_id, "text": text, "message_thread_id": topic}
        if quote is not None:
            kwargs["reply_parameters"] = ReplyParameters(quote, allow_sending_without_reply=True)
        for attempt in range(4):
            try:
                return await self.bot.send_message(**kwargs)
            except RetryAfter as exc:
                wait = _retry_after_s(exc)
                if attempt == 3 or wait > 30:
                    raise
                log.info("Telegram flood control: waiting %.1fs", wait)
                await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def _say(self, message: Message, text: str) -> None:
        """Reply to ``message`` in plain text, split to fit."""
        quote = None if message.chat.type == ChatType.PRIVATE else message.message_id
        for part in split_text(text, TEXT_LIMIT)[:MAX_MESSAGES] or ["(no output)"]:
            await self._send_waiting(message.chat_id, self._topic(message), part, quote)
            quote = None

    def _claim(self, update: Update) -> bool:
        """Act on an update that does not go through the bus at most once."""
        rid = request_id(CHANNEL, self.bot_id, update.update_id)
        return bool(self.redis.set(HANDLED + rid, "1", nx=True, ex=self.bus.dedupe_ttl_s))

    # -- commands --------------------------------------------------------------------------

    async def _on_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        sender = self._sender(message)
        if sender is not None:
            await self._command(update, message, sender, message.text or "")

    async def _on_unknown_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        sender = self._sender(message)
        if sender is None:
            return
        verb = (message.text or "").split(maxsplit=1)[0]
        _, at, name = verb.partition("@")
        if at and name.lower() != self.username.lower():
            return  # another bot's command
        if not at and message.chat.type != ChatType.PRIVATE:
            return  # a bare command in a group may be for another bot
        await self._command(update, message, sender, message.text or "")

    async def _command(self, update: Update, message: Message, sender: _Sender, text: str) -> None:
        if not self._claim(update):
            return
        chat_id, topic = message.chat_id, self._topic(message)
        greeting = ""
        # /start is what Telegram sends first to a bot: say hello, then /help.
        if (parse(text) or ("/help", ""))[0] == "/start":
            name = self.bot.first_name or "sprbot"
            greeting = f"Hi! I'm {name}. Ask me anything in plain words.\n\n"
            text = "/help"
            if message.chat.type == ChatType.PRIVATE and sender.id in self.admins:
                await self._admin_menu(int(sender.id))  # possible only now they wrote to us
        replying_to = None
        if self._replies_to_bot(message):
            replied = message.reply_to_message.message_id
            rid = self.redis.get(f"{ANSWER_KEY}{chat_id}:{replied}")
            if rid is not None:
                replying_to = self._answered(rid.decode())
        context = CommandContext(
            channel=CHANNEL,
            conversation=conversation_key(chat_id, topic),
            user_id=sender.id,
            memory=self.memory,
            platform=CHANNEL,
            user_name=sender.name,
            stores=self.stores,
            replying_to=replying_to,
            # Where a training job reports: a new message in this chat, quoting the command.
            reply_to={"chat_id": chat_id, "thread_id": topic, "quote": message.message_id},
        )
        reply = await asyncio.to_thread(dispatch, text, context)  # may embed: off the loop
        await self._say(message, greeting + (reply or ""))

    async def _on_other(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if self._sender(message) is not None and self._claim(update):
            await self._say(message, "I can only read text so far: please type your question.")

    # -- feedback --------------------------------------------------------------------------

    async def _on_feedback(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if not self._claim(update):
            return
        kind, rid = context.match.group(1), context.match.group(2)
        user = str(query.from_user.id)
        exchange = self._answered(rid)
        if kind == "up":
            if exchange is None:
                text = "Thanks! That answer is too old to record, though."
            else:
                try:
                    await asyncio.to_thread(
                        self.stores.faq.record_feedback,
                        exchange,
                        user=f"{CHANNEL}:{user}",
                        channel=CHANNEL,
                    )
                    text = THANKS_UP
                except FaqError as exc:
                    text = f"Thanks! I could not save it for the FAQ: {exc}"
        else:
            admin = self.stores is not None and user in self.stores.admins.get(CHANNEL, ())
            text = "Thanks for telling me."
            if admin and exchange is not None:
                text += " Reply to my answer with /faq correct <the right answer> to fix it."
        try:
            await query.answer(text=text[:200])
        except BadRequest as exc:  # the query is too old: the press itself is recorded
            log.info("answering a button press: %s", exc.message)

    def _answered(self, rid: str) -> Exchange | None:
        return self.stores.faq.answered(rid) if self.stores is not None else None

    # -- errors ----------------------------------------------------------------------------

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        error = context.error
        if isinstance(error, Forbidden):  # blocked by the user, or removed from the group
            log.info("Telegram refused a reply: %s", error.message)
            return
        if isinstance(update, Update) and _retryable(error):
            self._not_taken.add(update.update_id)
            log.warning(
                "could not take update %s (%s: %s); it will be handled again",
                update.update_id,
                type(error).__name__,
                error,
            )
            return
        log.error("handling a Telegram update failed", exc_info=error)
        message = update.effective_message if isinstance(update, Update) else None
        if message is None or update.callback_query is not None:
            return
        with contextlib.suppress(Exception):
            rid = request_id(CHANNEL, self.bot_id, update.update_id)
            placeholder = self.redis.get(PLACEHOLDER_KEY + rid)
            if placeholder is None:
                await self._say(message, SORRY)
            else:  # no answer will fill it: say so there
                where = {"chat_id": message.chat_id, "message_id": int(placeholder)}
                await self._replace(where, WARNING_SIGN + SORRY)


# Fields of an update that python-telegram-bot and the handlers read without checking their
# type, at any depth, with the types Telegram sends them as; and the fields some must have.
_UPDATE_FIELDS: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("update_id", "message_id", "date", "message_thread_id"), (int,)),
    **dict.fromkeys(("offset", "length"), (int,)),
    "id": (int, str),  # users' and chats' are integers, callback queries' strings
    **dict.fromkeys(("type", "text", "caption", "data", "title"), (str,)),
    **dict.fromkeys(("first_name", "last_name", "username"), (str,)),
    **dict.fromkeys(("is_bot", "is_topic_message", "is_automatic_forward", "is_forum"), (bool,)),
    **dict.fromkeys(("message", "edited_message", "channel_post", "reply_to_message"), (dict,)),
    **dict.fromkeys(("callback_query", "chat", "from", "sender_chat", "user"), (dict,)),
    **dict.fromkeys(("entities", "caption_entities"), (list,)),
}
_UPDATE_REQUIRED: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("message", "edited_message", "channel_post", "reply_to_message"), ("chat",)),
    "chat": ("id", "type"),
    "from": ("id",),
    "callback_query": ("id", "from"),
}


def _webhook_handler() -> type:
    """The webhook's tornado handler (tornado is imported only in webhook mode)."""
    import tornado.web

    @tornado.web.stream_request_body
    class Handler(tornado.web.RequestHandler):
        """Telegram POSTs each update here. Before the body is read: 403 without the secret
        token, 413 for a body declared over ``MAX_BODY_BYTES``. Then 400 for a body that is
        not an update (not JSON, an ``update_id`` that is not an integer, text that is not
        valid Unicode); 200 once the update is taken (its request on the bus); 500 when it
        must be delivered again."""

        def initialize(self, adapter: TelegramAdapter) -> None:
            self.adapter = adapter
            self.body = bytearray()

        def prepare(self) -> None:
            given = self.request.headers.get(SECRET_HEADER, "").encode()
            length = self.request.headers.get("Content-Length", "")
            if not hmac.compare_digest(given, self.adapter.webhook_secret.encode()):
                self.set_status(403)
                self.finish()
            elif length.isdigit() and int(length) > MAX_BODY_BYTES:
                self.set_status(413)  # tornado refuses it too, but with a bare 400
                self.finish()

        def data_received(self, chunk: bytes) -> None:
            self.body += chunk

        async def post(self) -> None:
            try:
                data = json.loads(self.body)
                problem = shape_problem(data, _UPDATE_FIELDS, _UPDATE_REQUIRED)
                if not problem and "update_id" not in data:
                    problem = "no update_id"
                update = None if problem else Update.de_json(data, self.adapter.bot)
            except Exception as exc:  # not JSON, or what PTB cannot build an Update from
                problem = type(exc).__name__
            if problem or update is None:
                log.warning("webhook: refused a malformed update (%s)", problem or "empty")
                self.set_status(400)
                return
            self.set_status(200 if await self.adapter.process(update) else 500)

    return Handler


def _log_request(handler: Any) -> None:
    status = handler.get_status()
    request = handler.request
    if status == 403:
        log.warning("webhook: refused an update without the right secret token from %s",
                    request.remote_ip)  # fmt: skip
    elif status >= 400:
        log.warning("webhook: %d for %s %s", status, request.method, request.path)
    else:
        log.debug("webhook: %d in %.0f ms", status, request.request_time() * 1000)


async def _until_stopped(task: asyncio.Task, stop: threading.Event) -> bool:
    """Wait for ``task``: True when it is done, False (and the task cancelled) when ``stop``
    is set first. A long poll cancelled midway confirms nothing: its updates come again."""
    while not task.done():
        if stop.is_set():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            return False
        await asyncio.wait({task}, timeout=0.1)
    return True


async def _sleep(stop: threading.Event, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < deadline:
        await asyncio.sleep(min(0.1, deadline - time.monotonic()))


def _bot_commands(*, admin: bool) -> list[BotCommand]:
    """The command menu: each verb once, described by what this audience may do with it."""
    verbs: dict[str, list[str]] = {}
    for name, command in COMMANDS.items():
        if command.admin and not admin:
            continue
        verb, _, sub = name.partition(" ")
        verbs.setdefault(verb.lstrip("/"), []).append(
            f"{sub}: {command.summary}" if sub else command.summary
        )
    return [BotCommand(verb, "; ".join(lines)[:256]) for verb, lines in verbs.items()]


def _secret(value: Any) -> str:
    return value.get_secret_value() if value is not None else ""


def configured(settings: Settings) -> bool:
    """Whether the settings hold enough to run the Telegram adapter (``sprbot up`` starts it)."""
    return bool(_secret(settings.telegram_token))


__all__ = [
    "CHANNEL",
    "FEEDBACK_DOWN",
    "FEEDBACK_UP",
    "PLACEHOLDER",
    "ReplyPump",
    "TelegramAdapter",
    "TelegramSetupError",
    "api_urls",
    "configured",
    "conversation_key",
    "to_html",
]
