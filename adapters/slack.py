"""The Slack channel: Slack events in, the bus in the middle, Slack's Web API out.

``sprbot adapter slack`` runs one ``SlackAdapter``: slack-bolt's ``App`` for what arrives, and a
reply pump for what goes out.

- Events, slash commands and interactions arrive over HTTP at ``/slack/events`` (Bolt checks
  every request's signature and timestamp, and answers 401 to a bad one), or over Socket Mode
  when an app-level token is set. Bolt acknowledges an event before any listener runs, well
  within Slack's 3 s.
- A message the bot answers (every DM, a mention, every later message in a thread it has
  joined) gets a placeholder and becomes a ``ChatRequest`` whose ``reply_to`` names that
  placeholder. Its id comes from the message (team, channel, ts), not from the event: Slack's
  retries of an event, and the ``app_mention`` plus ``message`` pair Slack sends for one
  mention (bolt-python #941), are one message and get one reply. The message is claimed before
  the placeholder is posted, so a duplicate posts no placeholder either; the bus then dedupes
  the request id once more.
- The pump reads the ``slack`` reply stream and edits the placeholder as deltas arrive, at
  most once per ``edit_interval_s`` per message, and after a 429 not before its
  ``Retry-After``. In a thread, where the workspace supports it, the answer is streamed with
  ``chat.startStream``/``appendStream``/``stopStream`` instead; elsewhere, or when Slack refuses
  those methods, ``chat.update`` does it. A long answer continues in follow-up messages, split
  at paragraphs and code fences; the last one carries the 👍/👎 buttons.
- Commands (``/faq``, ``/retrain``, ``/train``, ``/model``, and ``/sprbot <verb>`` for every
  command) go through ``bot.commands``, which decides who may run what.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from slack_bolt import App, BoltResponse
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web import SlackResponse

from bot.bus import Bus, Display, ReplyTracker
from bot.commands import CommandContext, Stores, dispatch, lookup, parse
from bot.config import Settings
from bot.errors import SprbotError
from bot.faq import Exchange, FaqError
from bot.logs import request_context
from bot.memory import ConversationMemory
from bot.render import BULLET, HEADING, INLINE_CODE, Throttle, fenced_segments, split_text
from bot.schemas import ChatRequest, request_id, shape_problem

log = logging.getLogger(__name__)

CHANNEL = "slack"
ENDPOINT = "/slack/events"

SECTION_LIMIT = 3000  # characters in a section block's text
STREAM_LIMIT = 3000  # markdown streamed into one message before it goes on as ordinary edits
MAX_MESSAGES = 20  # messages per answer (60,000 characters), so one answer cannot flood a channel
# Slack's requests are a few KB (a 40,000-character message included); the Telegram webhook
# has the same cap.
MAX_BODY_BYTES = 1 << 20
PLACEHOLDER = "…"
TYPING = " …"  # after the text of an answer still being written
NO_ANSWER = "_(no answer)_"
SORRY = "Sorry, something went wrong — the admins have been told."

FEEDBACK_BLOCK = "sprbot_feedback"
FEEDBACK_UP = "sprbot_feedback_up"
FEEDBACK_DOWN = "sprbot_feedback_down"
CORRECTION_VIEW = "sprbot_correction"

# Redis keys of this adapter; every replica of it shares them.
CLAIM = "sprbot:slack:claim:"  # <request id>: a message being answered (set before the placeholder)
THREAD = "sprbot:slack:thread:"  # <team>/<channel>/<thread ts>: joined; value: last request id
ASKED = "sprbot:slack:asked:"  # <request id>: where it was asked, for a correction's thanks
DELIVERED = "sprbot:slack:delivered:"  # <request id>: the final reply is shown

# Messages the bot reads: plain ones, ones with files, thread replies sent to the channel too.
# Edits (message_changed), deletions, joins and bot_message are not someone asking.
_ANSWERED_SUBTYPES = (None, "file_share", "thread_broadcast")
_EVENTS_ANSWERED = ("message", "app_mention")  # the events with a listener
_SLACK_LINK = re.compile(r"<([^<>|]+)(?:\|([^<>]*))?>")


class SlackSetupError(SprbotError):
    """The Slack settings cannot work: the message names the setting and what to do."""


@dataclass(frozen=True)
class SlackCommandContext(CommandContext):
    """A command's context, plus where in Slack to post what the command reports later
    (a training job's progress and result), as the ``reply_to`` of its reply events. The
    context's ``channel`` is the bus channel, ``slack``, whose reply stream this adapter reads.
    """

    reply_to: dict[str, Any] = field(default_factory=dict)


# -- text: Slack to plain, Markdown to mrkdwn ------------------------------------------------


def from_slack(text: str, bot_user_id: str = "") -> str:
    """A Slack message's text as the model should read it: the bot's own mention removed,
    user, channel and link markup turned into words, Slack's HTML escapes undone."""

    def link(match: re.Match) -> str:
        target, label = match.group(1), match.group(2)
        if bot_user_id and target == f"@{bot_user_id}":
            return ""
        if target[0] in "@#":
            return target[0] + (label or target[1:])
        if target[0] == "!":  # <!here>, <!channel>, <!subteam^ID|@team>
            return label or "@" + target[1:].split("^", 1)[0]
        return f"{label} ({target})" if label and label != target else target

    text = _SLACK_LINK.sub(link, text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").strip()


def _escape(text: str) -> str:
    """Slack's three HTML escapes: the only characters its text must not carry raw."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


_QUOTE = re.compile(r"^([ \t]*)&gt;", re.M)
_INLINE = re.compile(
    r"!?\[(?P<label>[^\]\n]+)\]\((?P<url>[^)\s]+)\)"
    r"|\*\*(?P<b1>[^*\n]+?)\*\*|__(?P<b2>[^_\n]+?)__"
    r"|(?<![\w*])\*(?P<it>[^*\s](?:[^*\n]*?[^*\s])?)\*(?![\w*])"
    r"|~~(?P<st>[^~\n]+?)~~"
)


def _inline(match: re.Match) -> str:
    if match.group("url"):
        return f"<{match.group('url')}|{match.group('label')}>"
    if match.group("b1") or match.group("b2"):
        return f"*{match.group('b1') or match.group('b2')}*"
    if match.group("it"):
        return f"_{match.group('it')}_"
    return f"~{match.group('st')}~"


def _prose(text: str) -> str:
    out = []
    last = 0
    for code in INLINE_CODE.finditer(text):  # inline code is shown as it is
        out.append(_format(text[last : code.start()]))
        out.append(_escape(code.group(0)))
        last = code.end()
    out.append(_format(text[last:]))
    return "".join(out)


def _format(text: str) -> str:
    text = _escape(text)
    text = _QUOTE.sub(r"\1>", text)  # a quote is the one '>' Slack must see raw
    text = BULLET.sub(r"\1• ", text)
    text = _INLINE.sub(_inline, text)
    return HEADING.sub(lambda m: f"*{m.group(1)}*", text)  # after: its * is not italics


def to_mrkdwn(markdown: str) -> str:
    """The model's Markdown as Slack mrkdwn: bold, italics, strikethrough, links, headings and
    bullets converted; code blocks and inline code left as they are (Slack ignores a fence's
    language, so it is dropped); a fence still open at the end (a streaming answer) closed."""
    out = []
    for is_code, segment in fenced_segments(markdown):
        if not is_code:
            out.append(_prose(segment))
            continue
        lines = segment.split("\n")
        body, closed = lines[1:], False
        for i in range(len(body) - 1, -1, -1):
            if body[i].strip():
                closed = i > 0 and re.fullmatch(r" {0,3}(`{3,}|~{3,})\s*", body[i]) is not None
                if closed:
                    body = body[:i] + body[i + 1 :]
                break
        tail = "\n" if segment.endswith("\n") else ""
        code = _escape("\n".join(body).rstrip("\n"))
        out.append(f"```\n{code}\n```{tail}")
    return "".join(out)


def conversation_key(team: str, channel: str, thread_ts: str | None) -> str:
    """team/channel/thread: a thread is one conversation; a DM's main timeline is another."""
    return f"{team}/{channel}/{thread_ts or 'main'}"


def _retry_after(exc: SlackApiError) -> float | None:
    """Seconds Slack asked to wait, when ``exc`` is a 429; None for any other error."""
    response = exc.response
    if getattr(response, "status_code", None) != 429:
        return None
    headers = {k.lower(): v for k, v in (response.headers or {}).items()}
    value = headers.get("retry-after", "1")
    if isinstance(value, list):
        value = value[0] if value else "1"
    try:
        return max(0.0, float(value))
    except ValueError:
        return 1.0


def _error_code(exc: SlackApiError) -> str:
    try:
        return str(exc.response.get("error") or exc.response.status_code)
    except Exception:  # a response that is not JSON
        return f"HTTP {getattr(exc.response, 'status_code', '?')}"


class _Paused(Exception):
    """Slack answered 429: nothing more is sent until the throttle's back-off has passed."""


def _feedback_block(rid: str) -> dict[str, Any]:
    button = {"type": "button", "value": rid}
    return {
        "type": "actions",
        "block_id": FEEDBACK_BLOCK,
        "elements": [
            {**button, "action_id": FEEDBACK_UP, "text": _plain("👍")},
            {**button, "action_id": FEEDBACK_DOWN, "text": _plain("👎")},
        ],
    }


def _plain(text: str) -> dict[str, Any]:
    return {"type": "plain_text", "text": text, "emoji": True}


def _message(mrkdwn: str, *extra: dict[str, Any]) -> dict[str, Any]:
    """chat.postMessage/chat.update arguments: the text in a section block (``text`` is the
    notification fallback), then any other blocks."""
    section = {"type": "section", "text": {"type": "mrkdwn", "text": mrkdwn}}
    return {"text": mrkdwn, "blocks": [section, *extra]}


# -- showing replies ---------------------------------------------------------------------------


@dataclass
class _Outgoing:
    """One answer on its way to Slack: where it is shown, and what is left to show."""

    request_id: str
    channel: str
    thread_ts: str | None
    mode: str  # "stream" (chat.*Stream) or "update" (chat.update edits)
    messages: list[str]  # ts of the messages that show the answer, in order
    shown: list[Any]  # what each of them shows now
    streamed: str = ""  # markdown appended to the stream so far
    pending: Display | None = None  # newest state not yet shown
    entries: list[str] = field(default_factory=list)  # final/error entries, acked when shown
    failures: int = 0

    @classmethod
    def from_reply_to(cls, rid: str, reply_to: dict[str, Any]) -> _Outgoing:
        """``reply_to`` as the ingress wrote it: ``channel``, ``ts`` of the placeholder,
        ``thread_ts``, ``mode``. Without ``ts`` (an announcement, such as a training job's
        report) the answer is posted as new messages, in ``thread_ts`` when given."""
        channel, ts, thread_ts = reply_to["channel"], reply_to.get("ts"), reply_to.get("thread_ts")
        mode = reply_to.get("mode", "update") if ts else "update"
        if mode not in ("stream", "update"):
            raise ValueError(f"unknown reply mode {mode!r}")
        if not isinstance(channel, str) or not all(
            isinstance(v, str | None) for v in (ts, thread_ts)
        ):
            raise ValueError("channel, ts and thread_ts must be strings")
        messages, shown = ([ts], [PLACEHOLDER]) if ts else ([], [])
        return cls(rid, channel, thread_ts, mode, messages, shown)


class ReplyPump:
    """Reads the ``slack`` reply stream and shows each answer as it grows. What is
    acknowledged when, and how a replica's reclaimed final is shown once: ``ReplyTracker``.
    """

    def __init__(
        self,
        client: WebClient,
        bus: Bus,
        *,
        edit_interval_s: float = 1.0,
        consumer: str | None = None,
        reclaim_idle_ms: int = 120_000,
        give_up_after: int = 8,
    ) -> None:
        self.client = client
        self.bus = bus
        self.throttle = Throttle(edit_interval_s)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.reclaim_idle_ms = reclaim_idle_ms
        self.give_up_after = give_up_after  # failed tries (network, 5xx) before a final is dropped
        self.tracker: ReplyTracker[_Outgoing] = ReplyTracker(
            bus, CHANNEL, DELIVERED, _Outgoing.from_reply_to
        )
        self.outgoing = self.tracker.outgoing  # the answers being shown, by request id
        self._last_reclaim = 0.0

    def run(self, stop: threading.Event, drain_s: float = 10.0) -> None:
        """Show replies until ``stop`` is set; then up to ``drain_s`` more for finals in hand."""
        while not stop.is_set():
            try:
                self.poll()
            except Exception:  # Redis unreachable, say: keep going, it may come back
                log.exception("reading Slack replies failed; retrying in 1s")
                stop.wait(1.0)
        deadline = time.monotonic() + drain_s
        while any(o.entries for o in self.outgoing.values()) and time.monotonic() < deadline:
            self.flush()
            time.sleep(0.05)
        self.bus.retire(self.consumer, CHANNEL)

    def poll(self, block_ms: int = 1000) -> None:
        """Read what has arrived (waiting up to ``block_ms``, less when an edit is due) and
        show what may be shown now."""
        waits = [self.throttle.wait_s(rid) for rid, o in self.outgoing.items() if o.pending]
        if waits:
            block_ms = max(10, min(block_ms, int(min(waits) * 1000) + 10))
        replies = self.bus.read_replies(CHANNEL, self.consumer, block_ms=block_ms)
        now = time.monotonic()
        if now - self._last_reclaim > min(30.0, self.reclaim_idle_ms / 2000):
            self._last_reclaim = now
            replies += self.bus.reclaim_replies(CHANNEL, self.consumer, self.reclaim_idle_ms)
        done = [entry for reply in replies for entry in self.tracker.take(reply)]
        self.bus.ack_replies(CHANNEL, *done)
        self.flush()

    def flush(self) -> None:
        """Show the newest state of every answer whose message may be edited now."""
        for rid, out in list(self.outgoing.items()):
            if out.pending is None or self.throttle.wait_s(rid) > 0:
                continue
            display = out.pending
            try:
                self._show(out, display)
            except _Paused:
                return  # every edit waits for the Retry-After
            except SlackApiError as exc:
                log.warning("Slack refused to show %s: %s", rid, _error_code(exc))
                if out.mode == "stream":  # the stream methods failed midway: go on with edits
                    # Most likely it is not streaming any more, which is what is wanted.
                    with contextlib.suppress(SlackApiError):
                        self.client.chat_stopStream(channel=out.channel, ts=out.messages[0])
                    out.mode, out.shown = "update", [out.streamed]
                    continue
                # The message or channel is gone, or the bot was removed: retrying cannot
                # help, so an intermediate edit is skipped and a final dropped.
                if display.done:
                    self._finish(out, display, shown=False)
                else:
                    out.pending = None
                continue
            except Exception as exc:  # the network: try again after the interval
                out.failures += 1
                self.throttle.sent(rid)
                if out.failures < self.give_up_after:
                    log.warning("showing %s failed (%s); will retry", rid, exc)
                    continue
                log.error("showing %s failed %d times; giving up: %s", rid, out.failures, exc)
                if display.done:
                    self._finish(out, display, shown=False)
                else:
                    out.pending = None
                continue
            self.throttle.sent(rid)
            if display.done:
                self._finish(out, display, shown=True)
            elif out.pending is display:
                out.pending = None

    def _call(self, method: Callable[..., SlackResponse], **kwargs: Any) -> SlackResponse:
        try:
            return method(**kwargs)
        except SlackApiError as exc:
            wait = _retry_after(exc)
            if wait is None:
                raise
            log.info("Slack rate limit: no edits for %.1fs (Retry-After)", wait)
            self.throttle.back_off(wait)
            raise _Paused from None

    def _show(self, out: _Outgoing, display: Display) -> None:
        if not (out.mode == "stream" and self._stream(out, display)):
            self._update(out, display)
        if display.done:
            for path in display.attachments:  # a retrain report's loss.png
                self._upload(out, path)

    def _upload(self, out: _Outgoing, path: str) -> None:
        """Share a file in the answer's thread; a file that cannot be sent is logged, the
        answer itself is already shown."""
        try:
            self._call(
                self.client.files_upload_v2,
                channel=out.channel,
                thread_ts=out.thread_ts,
                file=path,
                title=Path(path).name,
            )
        except (SlackApiError, OSError) as exc:
            log.warning("could not upload %s for %s: %s", path, out.request_id, exc)

    def _stream(self, out: _Outgoing, display: Display) -> bool:
        """Append to the streamed message; False once it must go on as ordinary edits."""
        text = display.text or (NO_ANSWER if display.done else "")
        fits = len(text) <= STREAM_LIMIT
        if display.code is None and fits and text.startswith(out.streamed):
            if len(text) > len(out.streamed):
                self._call(
                    self.client.chat_appendStream,
                    channel=out.channel,
                    ts=out.messages[0],
                    markdown_text=text[len(out.streamed) :],
                )
                out.streamed = text
            if display.done:
                self._call(
                    self.client.chat_stopStream,
                    channel=out.channel,
                    ts=out.messages[0],
                    blocks=[_feedback_block(out.request_id)],
                )
            return True
        # An error, a retried attempt that restarted the text, or an answer longer than one
        # message: end the stream where it is and show the rest with chat.update.
        try:
            self._call(self.client.chat_stopStream, channel=out.channel, ts=out.messages[0])
        except SlackApiError as exc:
            log.info("chat.stopStream for %s: %s", out.request_id, _error_code(exc))
        out.mode, out.shown = "update", [out.streamed]
        return False

    def _update(self, out: _Outgoing, display: Display) -> None:
        messages = self._render(display, out.request_id)
        for i, message in enumerate(messages):
            if i < len(out.messages):
                if out.shown[i] != message:
                    self._call(
                        self.client.chat_update, channel=out.channel, ts=out.messages[i], **message
                    )
                    out.shown[i] = message
            else:
                posted = self._call(
                    self.client.chat_postMessage,
                    channel=out.channel,
                    thread_ts=out.thread_ts,
                    **message,
                )
                out.messages.append(posted["ts"])
                out.shown.append(message)
        if display.done:
            while len(out.messages) > len(messages):  # a restarted attempt came out shorter
                try:
                    self._call(self.client.chat_delete, channel=out.channel, ts=out.messages[-1])
                except SlackApiError as exc:
                    log.info("chat.delete for %s: %s", out.request_id, _error_code(exc))
                out.messages.pop()
                out.shown.pop()

    def _render(self, display: Display, rid: str) -> list[dict[str, Any]]:
        """The messages that show ``display``: the answer split to fit, typing marker while
        it grows, feedback buttons under a finished one; an error's text alone."""
        if display.code is not None:
            return [_message(f":warning: {_escape(display.text or SORRY)}")]
        text = to_mrkdwn(display.text)
        if not display.done:
            if not text.strip():
                status = f" _{_escape(display.status)}_" if display.status else ""
                return [_message(PLACEHOLDER + status)]
            parts = split_text(text, SECTION_LIMIT - len(TYPING))[:MAX_MESSAGES]
            return [
                _message(p + (TYPING if i == len(parts) - 1 else "")) for i, p in enumerate(parts)
            ]
        parts = split_text(text, SECTION_LIMIT) or [NO_ANSWER]
        if len(parts) > MAX_MESSAGES:
            parts = parts[:MAX_MESSAGES]
            parts[-1] = parts[-1][: SECTION_LIMIT - 40] + "\n_(answer cut short: too long)_"
        messages = [_message(p) for p in parts]
        messages[-1] = _message(parts[-1], _feedback_block(rid))
        return messages

    def _finish(self, out: _Outgoing, display: Display, *, shown: bool) -> None:
        self.tracker.finished(out.request_id, shown=shown)
        self.throttle.forget(out.request_id)


# -- the adapter -------------------------------------------------------------------------------


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow client never holds up shutdown


class _Handler(WSGIRequestHandler):
    timeout = 30  # seconds a client may stall mid-request before it is dropped

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def _checked_request(app: Callable, verifier: SignatureVerifier) -> Callable:
    """The WSGI app ``app`` (Bolt's) behind the checks Bolt makes too late or not at all.

    Bolt reads a body of any size, and parses it before it checks the signature: a body that
    is not a JSON object, or a missing timestamp, gets a 500 and a traceback from anyone. So
    here, before Bolt sees a byte: over ``MAX_BODY_BYTES``, 413 (from the Content-Length,
    unread); no valid Content-Length, or not UTF-8, 400; not signed with the signing secret
    within the last 5 minutes, 401 (Slack's unsigned ``ssl_check`` gets its 200). What Bolt
    then cannot parse, although signed, gets 400.
    """

    def answer(start_response: Callable, status: str, text: str) -> list[bytes]:
        start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
        return [text.encode()]

    def checked(environ: dict[str, Any], start_response: Callable) -> Any:
        length = (environ.get("CONTENT_LENGTH") or "0").strip()
        if not (length.isascii() and length.isdigit()):
            return answer(start_response, "400 Bad Request", "Invalid Content-Length.")
        if int(length) > MAX_BODY_BYTES:
            limit = f"The body is over the limit of {MAX_BODY_BYTES:,} bytes."
            return answer(start_response, "413 Payload Too Large", limit)
        raw = environ["wsgi.input"].read(int(length)) if int(length) else b""
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            return answer(start_response, "400 Bad Request", "The body is not UTF-8.")
        if urllib.parse.parse_qs(body).get("ssl_check") == ["1"]:
            return answer(start_response, "200 OK", "")  # Slack checking the certificate
        timestamp = environ.get("HTTP_X_SLACK_REQUEST_TIMESTAMP", "")
        signature = environ.get("HTTP_X_SLACK_SIGNATURE", "")
        signed = timestamp.isascii() and timestamp.isdigit()
        if not (signed and verifier.is_valid(body, timestamp, signature)):
            return answer(start_response, "401 Unauthorized", "Invalid or stale signature.")
        problem = _misshapen(body, environ.get("CONTENT_TYPE", ""))
        if problem:
            log.warning("refused a signed Slack request: %s", problem)
            return answer(start_response, "400 Bad Request", f"Malformed request: {problem}.")
        environ["wsgi.input"] = io.BytesIO(raw)
        return app(environ, start_response)

    return checked


# Fields that Bolt (building its context, in its built-in middleware) and the listeners read
# without checking their type, at any depth of a body, and the types Slack sends them as.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("type", "subtype", "ts", "thread_ts", "event_ts", "bot_id"), (str,)),
    **dict.fromkeys(("channel_type", "user_id", "channel_id", "team_id"), (str,)),
    **dict.fromkeys(("enterprise_id", "trigger_id", "response_url", "command"), (str,)),
    **dict.fromkeys(("team", "user", "channel", "enterprise", "text"), (str, dict, type(None))),
    **dict.fromkeys(("event", "view", "container", "message"), (dict,)),
    **dict.fromkeys(("authorizations", "actions"), (list,)),
}


def _misshapen(body: str, content_type: str) -> str:
    """Why a body cannot be one Slack sent ("" when it can), parsed the way Bolt parses it: a
    JSON object, or a form whose ``payload`` is one, of the shape ``_FIELD_TYPES`` gives."""
    if not body:
        return ""
    try:
        if content_type == "application/json" or body.startswith("{"):
            data = json.loads(body)
        elif "payload" in body:
            form = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
            data = json.loads(form.get("payload", "{}"))
        else:
            return ""  # a slash command's form: strings only
    except (ValueError, RecursionError):
        return "not JSON"
    problem = shape_problem(data, _FIELD_TYPES)
    for name in ("authorizations", "actions"):  # Bolt takes their first item's fields
        if not problem and not all(isinstance(i, dict) for i in data.get(name, ())):
            problem = f"{name!r} holds something other than objects"
    return problem


def api_url(url: str) -> str:
    """``SPRBOT_SLACK_API_URL`` as slack_sdk needs it: method names are joined onto it."""
    return url if url.endswith("/") else url + "/"


class SlackAdapter:
    """Slack in and out: Bolt's listeners for events, commands and buttons, plus a ReplyPump.

    HTTP mode needs the bot token and the signing secret; Socket Mode the bot token and an
    app-level token (``xapp-``). The Web API is reached at ``SPRBOT_SLACK_API_URL``.
    ``stores`` are what commands and feedback act on (without them, those that need the FAQ
    say they are unavailable); ``edit_interval_s`` paces the edits of one message; replicas
    of the adapter need distinct ``consumer`` names (default: host and process id).
    """

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        memory: ConversationMemory,
        *,
        stores: Stores | None = None,
        edit_interval_s: float = 1.0,
        consumer: str | None = None,
    ) -> None:
        token = _secret(settings.slack_bot_token)
        if not token:
            raise SlackSetupError("SPRBOT_SLACK_BOT_TOKEN is not set: give the bot token (xoxb-)")
        self.app_token = _secret(settings.slack_app_token)
        signing_secret = _secret(settings.slack_signing_secret)
        if not self.app_token and not signing_secret:
            raise SlackSetupError(
                "SPRBOT_SLACK_SIGNING_SECRET is not set: HTTP mode needs it to verify requests "
                "(or set SPRBOT_SLACK_APP_TOKEN to use Socket Mode)"
            )
        self.settings = settings
        self.bus = bus
        self.memory = memory
        self.stores = stores
        # HTTP mode's signature check, before Bolt's (see _checked_request); none in Socket Mode.
        self.verifier = SignatureVerifier(signing_secret) if signing_secret else None
        self.api_url = api_url(settings.slack_api_url)
        self.client = WebClient(token=token, base_url=self.api_url)
        self.identity = self._auth_test()
        self.bot_user_id = self.identity.get("user_id", "")
        self.streaming = True  # until the workspace refuses chat.startStream
        self.pump = ReplyPump(
            self.client,
            bus,
            edit_interval_s=edit_interval_s,
            consumer=consumer,
            reclaim_idle_ms=settings.reply_reclaim_idle_ms,
        )
        # Bolt logs request bodies (they carry Slack's verification token) at INFO and below.
        bolt_log = logging.getLogger("adapters.slack.bolt")
        bolt_log.setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
        self.app = App(
            client=self.client,
            signing_secret=signing_secret or None,
            token_verification_enabled=False,  # done above, with a clearer error
            request_verification_enabled=not self.app_token,
            logger=bolt_log,
        )
        self.app.middleware(_ignore_other_events)
        self.app.event("app_mention")(self._on_message)
        self.app.event("message")(self._on_message)
        self.app.command(re.compile(r"^/[\w.-]+$"))(self._on_command)
        self.app.action(FEEDBACK_UP)(self._on_thumbs_up)
        self.app.action(FEEDBACK_DOWN)(self._on_thumbs_down)
        self.app.view(CORRECTION_VIEW)(self._on_correction)
        self.app.error(self._on_error)

    @property
    def redis(self):
        return self.bus.redis

    def _auth_test(self) -> dict[str, Any]:
        try:
            return dict(self.client.auth_test().data)
        except SlackApiError as exc:
            raise SlackSetupError(
                f"Slack refused SPRBOT_SLACK_BOT_TOKEN (auth.test: {_error_code(exc)}): install "
                "the app to the workspace and copy its Bot User OAuth Token"
            ) from None
        except OSError as exc:
            raise SlackSetupError(
                f"cannot reach the Slack Web API at {self.api_url} (SPRBOT_SLACK_API_URL): {exc}"
            ) from None

    # -- running ---------------------------------------------------------------------------

    def serve(
        self,
        stop: threading.Event,
        *,
        host: str = "0.0.0.0",
        port: int | None = None,
        on_ready: Callable[[int | None], None] | None = None,
    ) -> None:
        """Receive from Slack and show replies until ``stop`` is set. Socket Mode when an
        app-level token is set, else HTTP on ``port`` (default ``SPRBOT_SLACK_PORT``; 0 picks a
        free one). ``on_ready`` gets the port listened on (None in Socket Mode)."""
        pump = threading.Thread(target=self.pump.run, args=(stop,), name="slack-replies")
        pump.start()
        try:
            if self.app_token:
                self._serve_socket_mode(stop, on_ready)
            else:
                self._serve_http(
                    stop, host, self.settings.slack_port if port is None else port, on_ready
                )
        finally:
            stop.set()
            pump.join()

    def _serve_http(self, stop: threading.Event, host: str, port: int, on_ready) -> None:
        try:
            server = make_server(
                host,
                port,
                _checked_request(SlackRequestHandler(self.app, ENDPOINT), self.verifier),
                _Server,
                _Handler,
            )
        except OSError as exc:
            raise SlackSetupError(
                f"cannot listen on port {port} (SPRBOT_SLACK_PORT): {exc.strerror or exc}"
            ) from None
        thread = threading.Thread(target=server.serve_forever, args=(0.2,), name="slack-http")
        thread.start()
        log.info("Slack adapter: HTTP on port %d, events at %s", server.server_port, ENDPOINT)
        try:
            if on_ready:
                on_ready(server.server_port)
            stop.wait()
        finally:
            server.shutdown()
            server.server_close()
            thread.join()

    def _serve_socket_mode(self, stop: threading.Event, on_ready) -> None:
        from slack_bolt.adapter.socket_mode import SocketModeHandler

        handler = SocketModeHandler(self.app, self.app_token)
        try:
            handler.connect()
        except SlackApiError as exc:
            raise SlackSetupError(
                f"Slack refused SPRBOT_SLACK_APP_TOKEN (apps.connections.open: "
                f"{_error_code(exc)}): create an app-level token with connections:write"
            ) from None
        log.info("Slack adapter: connected in Socket Mode")
        try:
            if on_ready:
                on_ready(None)
            stop.wait()
        finally:
            handler.close()

    # -- messages --------------------------------------------------------------------------

    def _on_message(self, body: dict, event: dict) -> None:
        team = body.get("team_id") or event.get("team") or self.identity.get("team_id", "")
        user = event.get("user")
        if (
            event.get("subtype") not in _ANSWERED_SUBTYPES
            or event.get("bot_id")
            or not user
            or user == self.bot_user_id
            or "ts" not in event
            or "channel" not in event
        ):
            return  # an edit, a deletion, a bot (this one included), a join: nobody asking
        channel, ts, thread_ts = event["channel"], event["ts"], event.get("thread_ts")
        raw = event.get("text") or ""
        dm = event.get("channel_type") == "im" or channel.startswith("D")
        mentioned = event.get("type") == "app_mention" or f"<@{self.bot_user_id}>" in raw
        if dm:
            root = thread_ts  # a DM is answered where it was written
        elif mentioned:
            root = thread_ts or ts  # a mention is answered in its thread
        elif thread_ts and self.redis.exists(THREAD + conversation_key(team, channel, thread_ts)):
            root = thread_ts
        else:
            return  # channel chatter the bot was not asked about
        # The message, not the event, identifies the request: see the module docstring.
        rid = request_id(CHANNEL, team, channel, ts)
        if not self.redis.set(CLAIM + rid, "1", nx=True, ex=self.bus.dedupe_ttl_s):
            return
        conversation = conversation_key(team, channel, root)
        text = from_slack(raw, self.bot_user_id)
        profile = event.get("user_profile") or {}
        name = profile.get("display_name") or profile.get("real_name") or ""
        with request_context(rid):
            try:
                if parse(text) is not None or not text:
                    self._command_in_thread(team, channel, root, conversation, user, name, text)
                else:
                    self._ask(rid, team, channel, root, conversation, user, name, text, dm)
            except Exception:
                log.exception("answering message %s failed", rid)
                self._say(channel, root, SORRY)

    def _ask(
        self,
        rid: str,
        team: str,
        channel: str,
        root: str | None,
        conversation: str,
        user: str,
        name: str,
        text: str,
        dm: bool,
    ) -> None:
        reply_to = self._placeholder(team, channel, root, user)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(ASKED + rid, mapping={"channel": channel, "user": user})
            pipe.expire(ASKED + rid, self.settings.memory_ttl_s)
            if root and not dm:  # a channel thread the bot now takes part in
                pipe.set(THREAD + conversation, rid, ex=self.settings.memory_ttl_s)
            pipe.execute()
            result = self.bus.submit(
                ChatRequest(
                    id=rid,
                    channel=CHANNEL,
                    conversation=conversation,
                    user_id=user,
                    user_name=name,
                    text=text,
                    reply_to=reply_to,
                )
            )
        except Exception:
            log.exception("submitting message %s failed", rid)
            self._replace(reply_to, SORRY)
            return
        if result.status == "duplicate":  # submitted before, under an expired claim
            self._discard(reply_to)

    def _placeholder(self, team: str, channel: str, root: str | None, user: str) -> dict:
        """Post where the answer will appear; its channel and ts become ``reply_to``."""
        if root and self.streaming:
            try:
                started = self._call_waiting(
                    self.client.chat_startStream,
                    channel=channel,
                    thread_ts=root,
                    recipient_team_id=team,
                    recipient_user_id=user,
                )
                return {
                    "channel": channel,
                    "ts": started["ts"],
                    "thread_ts": root,
                    "mode": "stream",
                }
            except SlackApiError as exc:
                self.streaming = False
                log.warning(
                    "chat.startStream failed (%s): answers are shown with chat.update edits "
                    "from now on",
                    _error_code(exc),
                )
        posted = self._call_waiting(
            self.client.chat_postMessage, channel=channel, thread_ts=root, text=PLACEHOLDER
        )
        return {"channel": channel, "ts": posted["ts"], "thread_ts": root, "mode": "update"}

    def _replace(self, reply_to: dict, text: str) -> None:
        """Show ``text`` in place of a placeholder that no answer will fill."""
        try:
            if reply_to["mode"] == "stream":
                self.client.chat_stopStream(
                    channel=reply_to["channel"], ts=reply_to["ts"], markdown_text=text
                )
            else:
                self.client.chat_update(channel=reply_to["channel"], ts=reply_to["ts"], text=text)
        except SlackApiError as exc:
            log.warning("could not replace a placeholder: %s", _error_code(exc))

    def _discard(self, reply_to: dict) -> None:
        try:
            if reply_to["mode"] == "stream":
                self.client.chat_stopStream(channel=reply_to["channel"], ts=reply_to["ts"])
            self.client.chat_delete(channel=reply_to["channel"], ts=reply_to["ts"])
        except SlackApiError as exc:
            log.info("could not remove a duplicate placeholder: %s", _error_code(exc))

    def _call_waiting(self, method: Callable[..., SlackResponse], **kwargs: Any) -> SlackResponse:
        """A call from a listener thread: on 429, wait the Retry-After and try again (3 times)."""
        for attempt in range(4):
            try:
                return method(**kwargs)
            except SlackApiError as exc:
                wait = _retry_after(exc)
                if wait is None or attempt == 3:
                    raise
                log.info("Slack rate limit: waiting %.1fs (Retry-After)", wait)
                time.sleep(min(wait, 30.0))
        raise AssertionError("unreachable")

    def _say(self, channel: str, thread_ts: str | None, text: str) -> None:
        try:
            self._call_waiting(
                self.client.chat_postMessage, channel=channel, thread_ts=thread_ts, text=text
            )
        except Exception:
            log.exception("posting to %s failed", channel)

    # -- commands --------------------------------------------------------------------------

    def _context(
        self,
        conversation: str,
        user: str,
        name: str = "",
        *,
        replying_to: Exchange | None = None,
        reply_to: dict[str, Any] | None = None,
    ) -> CommandContext:
        return SlackCommandContext(
            channel=CHANNEL,
            conversation=conversation,
            user_id=user,
            memory=self.memory,
            platform=CHANNEL,
            user_name=name,
            stores=self.stores,
            replying_to=replying_to,
            reply_to=reply_to or {},
        )

    def _command_in_thread(
        self,
        team: str,
        channel: str,
        root: str | None,
        conversation: str,
        user: str,
        name: str,
        text: str,
    ) -> None:
        """A command written as a message ("@sprbot /faq list"); a bare mention gets /help.
        In a thread the bot answered, the command refers to its last answer there."""
        replying_to = None
        last = self.redis.get(THREAD + conversation)
        if last and self.stores is not None:
            replying_to = self.stores.faq.answered(last.decode())
        context = self._context(
            conversation,
            user,
            name,
            replying_to=replying_to,
            reply_to={"channel": channel, "thread_ts": root},
        )
        reply = dispatch(text or "/help", context) or ""
        for part in split_text(_escape(reply), SECTION_LIMIT)[:MAX_MESSAGES]:
            self._say(channel, root, part)

    def _on_command(self, ack: Callable, command: dict, respond: Callable) -> None:
        if not command.get("response_url"):  # Slack always sends one: the answer goes there
            ack(response_type="ephemeral", text="This command came without a response_url.")
            return
        verb = command.get("command", "")
        arguments = (command.get("text") or "").strip()
        if verb == "/sprbot":  # the prefix form reaches every command: /sprbot help
            sub, _, rest = arguments.partition(" ")
            verb, arguments = "/" + (sub.lstrip("/") or "help"), rest.strip()
        line = f"{verb} {arguments}".strip()
        ack(response_type="ephemeral", text=f"Working on `{_escape(line)}`…")
        team, channel = command.get("team_id", ""), command.get("channel_id", "")
        user = command.get("user_id", "")
        context = self._context(
            conversation_key(team, channel, None),
            user,
            command.get("user_name", ""),
            reply_to={"channel": channel},
        )
        found, _ = lookup(verb.lower(), arguments)
        try:
            reply = dispatch(line, context) or ""
        except Exception:
            log.exception("command %s failed", verb)
            reply = SORRY
        # An admin's action is posted to the channel; everything else only to the asker.
        public = found is not None and found.admin and context.is_admin
        parts = split_text(_escape(reply), SECTION_LIMIT) or ["(no output)"]
        if len(parts) > 4:  # a response_url takes five messages: keep one for the note
            parts = [*parts[:4], f"_(cut short: {len(parts) - 4} more parts)_"]
        for part in parts:
            try:
                respond(
                    text=part,
                    response_type="in_channel" if public else "ephemeral",
                    replace_original=False,
                )
            except Exception:
                log.exception("answering %s through its response_url failed", verb)
                return

    # -- feedback --------------------------------------------------------------------------

    def _on_thumbs_up(self, ack: Callable, body: dict, action: dict, respond: Callable) -> None:
        ack()
        user = body.get("user", {}).get("id", "")
        exchange = self._answered(action.get("value", ""))
        if exchange is None:
            text = "Thanks! That answer is too old to record, though."
        else:
            try:
                self.stores.faq.record_feedback(exchange, user=f"{CHANNEL}:{user}", channel=CHANNEL)
                text = "Thanks! I saved this answer as a FAQ candidate for the admins to review."
            except FaqError as exc:
                text = f"Thanks! I could not save it for the FAQ: {_escape(str(exc))}."
        respond(text=text, response_type="ephemeral", replace_original=False)

    def _on_thumbs_down(
        self, ack: Callable, body: dict, action: dict, client: WebClient, respond: Callable
    ) -> None:
        ack()
        user = body.get("user", {}).get("id", "")
        rid = action.get("value", "")
        exchange = self._answered(rid)
        admin = self._context("", user).is_admin
        if exchange is None or not admin:
            hint = "" if exchange is None else " An admin can give the right answer with 👎."
            respond(
                text="Thanks for telling me." + hint,
                response_type="ephemeral",
                replace_original=False,
            )
            return
        client.views_open(trigger_id=body["trigger_id"], view=_correction_view(rid, exchange))

    def _on_correction(self, ack: Callable, body: dict, view: dict, client: WebClient) -> None:
        user = body.get("user", {}).get("id", "")
        rid = view.get("private_metadata", "")
        values = view.get("state", {}).get("values", {})
        answer = (values.get("answer", {}).get("answer", {}).get("value") or "").strip()
        if not answer:
            ack(response_action="errors", errors={"answer": "Write the right answer."})
            return
        exchange = self._answered(rid)
        if exchange is None or not self._context("", user).is_admin:
            ack(response_action="errors", errors={"answer": "Only an admin can correct answers."})
            return
        ack()  # within Slack's 3 s: embedding the question may take longer the first time
        asked = {k.decode(): v.decode() for k, v in self.redis.hgetall(ASKED + rid).items()}
        channel = asked.get("channel", "")
        try:
            result = self.stores.faq.record_correction(
                exchange, answer, user=f"{CHANNEL}:{user}", channel=CHANNEL
            )
            outcome, text = (
                "ok",
                (
                    f"Thanks, noted: FAQ #{result.entry.id} now answers "
                    f"“{_escape(exchange.question[:200])}”."
                ),
            )
        except FaqError as exc:
            outcome, text = "error", f"I could not save that correction: {_escape(str(exc))}."
        self.stores.audit.record(
            platform=CHANNEL,
            channel=CHANNEL,
            user_id=user,
            command="/faq correct",
            arguments=answer,
            result=outcome,
            detail=f"{text} ({rid})",
        )
        if channel:
            try:
                client.chat_postEphemeral(channel=channel, user=user, text=text)
            except SlackApiError as exc:
                log.info("could not confirm the correction: %s", _error_code(exc))

    def _answered(self, rid: str) -> Exchange | None:
        if not rid or self.stores is None:
            return None
        return self.stores.faq.answered(rid)

    def _on_error(self, error: Exception, body: dict) -> None:
        # Bolt's own handler would log the whole body; the kind of request is enough.
        kind = body.get("type") or body.get("command") or "request"
        log.error("handling a Slack %s failed", kind, exc_info=error)


def _ignore_other_events(body: dict, next: Callable) -> BoltResponse | None:
    """Bolt middleware: an event this adapter has no listener for gets 200 and is ignored.
    Bolt would answer 404, which Slack retries, and Slack turns off the events of an app that
    keeps failing. Malformed events are ignored the same way, before any listener's matcher
    looks at their fields."""
    event = body.get("event") if body.get("type") == "event_callback" else None
    if body.get("type") == "event_callback" and (
        not isinstance(event, dict) or event.get("type") not in _EVENTS_ANSWERED
    ):
        return BoltResponse(status=200, body="")
    return next()


def _correction_view(rid: str, exchange: Exchange) -> dict[str, Any]:
    """The modal in which an admin gives the right answer to a question the bot got wrong."""

    def quote(text: str) -> str:
        return _escape(text if len(text) <= 1400 else text[:1400] + "…")

    return {
        "type": "modal",
        "callback_id": CORRECTION_VIEW,
        "private_metadata": rid,
        "title": _plain("Correct the answer"),
        "submit": _plain("Save to the FAQ"),
        "close": _plain("Cancel"),
        "blocks": [
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"*Question*\n{quote(exchange.question)}"},
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": f"*My answer*\n{quote(exchange.answer)}"},
            },
            {
                "type": "input",
                "block_id": "answer",
                "label": _plain("The right answer"),
                "element": {
                    "type": "plain_text_input",
                    "action_id": "answer",
                    "multiline": True,
                    "max_length": 3000,
                },
            },
        ],
    }


def _secret(value: Any) -> str:
    return value.get_secret_value() if value is not None else ""


def configured(settings: Settings) -> bool:
    """Whether the settings hold enough to run the Slack adapter (``sprbot up`` starts it)."""
    return bool(
        _secret(settings.slack_bot_token)
        and (_secret(settings.slack_signing_secret) or _secret(settings.slack_app_token))
    )


__all__ = [
    "CHANNEL",
    "ENDPOINT",
    "ReplyPump",
    "SlackAdapter",
    "SlackSetupError",
    "configured",
    "conversation_key",
    "from_slack",
    "to_mrkdwn",
]
