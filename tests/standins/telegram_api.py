"""A stand-in for Telegram: the Bot API as a real HTTP server on localhost, and Telegram's side
of a bot (users writing to it, pressing its buttons, updates queued for ``getUpdates``).

``BotAPI`` answers ``/bot<token>/<method>`` for the methods sprbot's adapter calls: ``getMe``,
``getUpdates``, ``sendMessage``, ``editMessageText``, ``sendChatAction``, ``setMyCommands``,
``deleteWebhook``, ``setWebhook``, ``answerCallbackQuery``, ``sendPhoto``, ``sendDocument``
and ``deleteMessage``. Every answer has Telegram's envelope: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error_code": ..., "description": ...}`` (with ``parameters.retry_after`` on a
429). It keeps the bot's messages as a chat client would show them, records every call, and
refuses what Telegram refuses: text over 4,096 characters after entity parsing, empty text,
HTML it cannot parse (unknown or unbalanced tags, a bare ``<`` or ``&``), an edit that changes
nothing ("message is not modified"), callback data over 64 bytes, unknown chats.

``getUpdates`` behaves as Telegram's: an update stays queued until a later call passes an
``offset`` above its id, which confirms it; ``on_confirm`` sees each confirmation as it
happens, so a test can check what was durable at that moment (or refuse it, as a network
that drops the call would). While a webhook is set,
``getUpdates`` answers 409. On demand a method answers with a 429 and ``retry_after``, with
"message is not modified", or with an entity-parse error.
"""

from __future__ import annotations

import html
import itertools
import json
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TEXT_LIMIT = 4096
CAPTION_LIMIT = 1024
CALLBACK_DATA_LIMIT = 64

NOT_MODIFIED = (
    "Bad Request: message is not modified: specified new message content and reply markup "
    "are exactly the same as a current content and reply markup of the message"
)
# Fields whose form value is JSON (python-telegram-bot posts every parameter as a form field).
_JSON_FIELDS = {
    "reply_markup",
    "reply_parameters",
    "link_preview_options",
    "commands",
    "scope",
    "allowed_updates",
    "entities",
    "caption_entities",
}
_INT_FIELDS = {"chat_id", "message_id", "message_thread_id", "offset", "limit", "timeout"}
_BOOL_FIELDS = {"drop_pending_updates", "show_alert", "disable_notification"}
_ALLOWED_TAGS = {
    "b",
    "strong",
    "i",
    "em",
    "u",
    "ins",
    "s",
    "strike",
    "del",
    "span",
    "tg-spoiler",
    "a",
    "code",
    "pre",
    "blockquote",
    "tg-emoji",
}
_TAG = re.compile(r"<(/?)([a-zA-Z][a-zA-Z0-9-]*)((?:\s+[^<>]*?)?)\s*>")
_ENTITY = re.compile(r"&(?:lt|gt|amp|quot|#\d+|#x[0-9a-fA-F]+);")
_COMMAND = re.compile(r"^/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{5,32})?")
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{5,32}")


class ApiError(Exception):
    """An error answer: HTTP status and Telegram's description (and retry_after for 429)."""

    def __init__(self, code: int, description: str, retry_after: float | None = None) -> None:
        super().__init__(description)
        self.code = code
        self.description = description
        self.retry_after = retry_after


def parse_html(raw: str) -> str:
    """The text a reader sees of ``raw`` in Telegram's HTML parse mode; ``ApiError`` (400,
    "can't parse entities") where Telegram would refuse it."""

    def refuse(what: str) -> ApiError:
        return ApiError(400, f"Bad Request: can't parse entities: {what}")

    out: list[str] = []
    stack: list[str] = []
    pos = 0
    while pos < len(raw):
        char = raw[pos]
        if char == "<":
            tag = _TAG.match(raw, pos)
            if tag is None:
                raise refuse(f"Unsupported start tag at byte offset {pos}")
            closing, name, attrs = tag.group(1), tag.group(2).lower(), tag.group(3)
            if name not in _ALLOWED_TAGS:
                raise refuse(f'Unsupported start tag "{name}" at byte offset {pos}')
            if closing:
                if not stack or stack[-1] != name:
                    expected = f"</{stack[-1]}>" if stack else "nothing"
                    raise refuse(
                        f'Unmatched end tag at byte offset {pos}, expected "{expected}", '
                        f'found "</{name}>"'
                    )
                stack.pop()
            else:
                inside = stack[-1] if stack else ""
                if inside == "code" or (inside == "pre" and name != "code"):
                    raise refuse(f'Unsupported start tag "{name}" inside "{inside}"')
                if name == "a" and "href=" not in attrs:
                    raise refuse(f'Tag "a" must have attribute href at byte offset {pos}')
                stack.append(name)
            pos = tag.end()
        elif char == "&":
            entity = _ENTITY.match(raw, pos)
            if entity is None:
                raise refuse(f"Character entity expected at byte offset {pos}")
            out.append(html.unescape(entity.group(0)))
            pos = entity.end()
        else:
            out.append(char)
            pos += 1
    if stack:
        raise refuse(f'Can\'t find end tag corresponding to start tag "{stack[-1]}"')
    return "".join(out)


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def entities_of(text: str) -> list[dict[str, Any]]:
    """The entities a Telegram client attaches to typed text: a leading bot command and
    @mentions, with offsets and lengths in UTF-16 code units as Telegram counts them."""
    found = []
    command = _COMMAND.match(text)
    if command:
        found.append({"type": "bot_command", "offset": 0, "length": _utf16_len(command.group())})
    for mention in _MENTION.finditer(text):
        if command and mention.start() < command.end():
            continue
        found.append(
            {
                "type": "mention",
                "offset": _utf16_len(text[: mention.start()]),
                "length": _utf16_len(mention.group()),
            }
        )
    return found


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    at: float  # time.monotonic() when it arrived
    status: int  # the HTTP status answered
    error: str | None  # Telegram's description, when ok was false


@dataclass
class Message:
    """A message the bot sent, as the chat shows it now (``versions``: after each send/edit)."""

    chat_id: int
    message_id: int
    thread_id: int | None
    text: str  # what the reader sees (caption, for a photo or document)
    raw: str  # as sent: HTML source when parse_mode was HTML
    parse_mode: str | None
    buttons: list[list[dict[str, Any]]]
    reply_to: int | None  # the message it quotes
    kind: str = "text"  # "text", "photo", "document"
    file: bytes = b""
    filename: str = ""
    versions: list[str] = field(default_factory=list)
    deleted: bool = False

    def callback_data(self) -> list[str]:
        return [b.get("callback_data", "") for row in self.buttons for b in row]

    def button_texts(self) -> list[str]:
        return [b.get("text", "") for row in self.buttons for b in row]


class BotAPI:
    """The Bot API stand-in. Use as a context manager; ``url`` is ``SPRBOT_TELEGRAM_API_URL``."""

    def __init__(
        self,
        *,
        token: str = "123456789:AAStandInTelegramToken-abcdefghijk",
        bot_id: int = 123456789,
        username: str = "sprbot_test_bot",
        first_name: str = "sprbot",
    ) -> None:
        self.token = token
        self.bot = {"id": bot_id, "is_bot": True, "first_name": first_name, "username": username}
        self.calls: list[Call] = []
        self.messages: dict[tuple[int, int], Message] = {}
        self.chats: dict[int, dict[str, Any]] = {}
        self.pending: list[dict[str, Any]] = []  # updates not confirmed yet
        self.confirmed: list[int] = []  # update ids, in the order they were confirmed
        self.webhook: dict[str, Any] | None = None
        self.commands: dict[str, list[dict[str, str]]] = {}  # scope (JSON) -> commands
        self.callback_answers: dict[str, dict[str, Any]] = {}  # query id -> answer
        # Sees the updates a getUpdates call is about to confirm; returning False answers
        # 502 instead, confirming nothing (as if the call never reached Telegram).
        self.on_confirm: Callable[[list[dict[str, Any]]], bool | None] | None = None
        self._faults: dict[str, list[Any]] = {}  # method -> [kind, times left, retry_after]
        # Update ids are unique per bot and never reused: a random start keeps two stand-ins
        # of one test run from colliding in a shared Redis.
        self._update_ids = itertools.count(random.randrange(10**8, 9 * 10**8))
        self._message_ids: dict[int, itertools.count] = {}
        self._callback_ids = itertools.count(1)
        self._queries: set[str] = set()  # callback query ids handed out by click()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._closing = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,))

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> BotAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._changed:
            self._closing = True  # ends long polls still waiting
            self._changed.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def url(self) -> str:
        return self.base + "/bot"

    # -- Telegram's side: chats, users, what they send ---------------------------------------

    @staticmethod
    def user(user_id: int, first_name: str = "Ann", *, is_bot: bool = False, **extra) -> dict:
        return {"id": user_id, "is_bot": is_bot, "first_name": first_name, **extra}

    def private_chat(self, user: dict[str, Any]) -> dict[str, Any]:
        return self._known({"id": user["id"], "type": "private", "first_name": user["first_name"]})

    def group(self, chat_id: int, title: str = "Team", *, forum: bool = False) -> dict[str, Any]:
        chat = {"id": chat_id, "type": "supergroup", "title": title}
        if forum:
            chat["is_forum"] = True
        return self._known(chat)

    def _known(self, chat: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.chats[chat["id"]] = chat
            self._message_ids.setdefault(chat["id"], itertools.count(1))
        return chat

    def message(
        self,
        chat: dict[str, Any],
        user: dict[str, Any],
        text: str,
        *,
        thread_id: int | None = None,
        reply_to: Message | None = None,
        edited: bool = False,
        message_id: int | None = None,
        deliver: bool = True,
    ) -> dict[str, Any]:
        """A user's message (or its edit) as an update, queued for getUpdates unless
        ``deliver`` is False (to POST it to a webhook instead). ``thread_id``: a forum topic."""
        with self._lock:
            if message_id is None:
                message_id = next(self._message_ids[chat["id"]])
            update_id = next(self._update_ids)
        body: dict[str, Any] = {
            "message_id": message_id,
            "date": int(time.time()),
            "chat": chat,
            "from": user,
            "text": text,
        }
        entities = entities_of(text)
        if entities:
            body["entities"] = entities
        if thread_id is not None:
            body["message_thread_id"] = thread_id
            body["is_topic_message"] = True
            # In a topic, a message that replies to nothing replies to the topic's creation.
            body["reply_to_message"] = {
                "message_id": thread_id,
                "date": int(time.time()) - 60,
                "chat": chat,
                "from": self.user(1, "Topic creator"),
                "message_thread_id": thread_id,
                "is_topic_message": True,
                "forum_topic_created": {"name": "Topic", "icon_color": 7322096},
            }
        if reply_to is not None:
            body["reply_to_message"] = self._message_json(reply_to)
        if edited:
            body["edit_date"] = int(time.time())
        update = {"update_id": update_id, ("edited_message" if edited else "message"): body}
        if deliver:
            self._queue(update)
        return update

    def click(self, message: Message, data: str, user: dict[str, Any]) -> dict[str, Any]:
        """``user`` presses the inline button of ``message`` whose callback data is ``data``."""
        assert data in message.callback_data(), f"{data!r} is not a button of the message"
        with self._lock:
            update_id = next(self._update_ids)
            query_id = f"cbq-{next(self._callback_ids)}"
            self._queries.add(query_id)
        update = {
            "update_id": update_id,
            "callback_query": {
                "id": query_id,
                "from": user,
                "message": self._message_json(message),
                "chat_instance": f"ci{message.chat_id}",
                "data": data,
            },
        }
        self._queue(update)
        return update

    def _queue(self, update: dict[str, Any]) -> None:
        with self._changed:
            self.pending.append(update)
            self._changed.notify_all()

    def _message_json(self, message: Message) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message_id": message.message_id,
            "date": int(time.time()),
            "chat": self.chats[message.chat_id],
            "from": self.bot,
        }
        if message.kind == "text":
            body["text"] = message.text
        else:
            body["caption"] = message.text
        if message.thread_id is not None:
            body["message_thread_id"] = message.thread_id
            body["is_topic_message"] = True
        if message.buttons:
            body["reply_markup"] = {"inline_keyboard": message.buttons}
        return body

    # -- what a test sets up -----------------------------------------------------------------

    def fail(self, method: str, kind: str, times: int = 1, retry_after: float = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with an error: ``retry_after`` (429),
        ``not_modified``, or ``entities`` (a can't-parse-entities 400, to calls with a
        parse_mode only: Telegram parses nothing in plain text)."""
        assert kind in ("retry_after", "not_modified", "entities"), kind
        with self._lock:
            self._faults[method] = [kind, times, retry_after]

    # -- what a test reads -------------------------------------------------------------------

    def calls_to(self, *methods: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method in methods]

    def in_chat(self, chat_id: int, thread_id: int | None = None) -> list[Message]:
        """The bot's messages in a chat (or one topic of it), oldest first, deleted ones left
        out."""
        with self._lock:
            found = [
                m
                for (chat, _), m in self.messages.items()
                if chat == chat_id
                and not m.deleted
                and (thread_id is None or m.thread_id == thread_id)
            ]
        return sorted(found, key=lambda m: m.message_id)

    def commands_for(self, scope: dict[str, Any]) -> list[str]:
        with self._lock:
            listed = self.commands.get(json.dumps(scope, sort_keys=True), [])
        return [c["command"] for c in listed]

    def wait_for(self, predicate, timeout: float = 60.0, what: str = "the condition"):
        """Wait until ``predicate()`` is truthy (checked after every call); return its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            with self._changed:
                self._changed.wait(min(left, 0.2))

    # -- the server --------------------------------------------------------------------------

    def _handler_class(self):
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                path = urllib.parse.urlparse(self.path).path
                match = re.fullmatch(r"/bot([^/]+)/(\w+)", path)
                if match is None:
                    self._send(404, {"ok": False, "error_code": 404, "description": "Not Found"})
                    return
                token, method = match.groups()
                if token != api.token:
                    body = {"ok": False, "error_code": 401, "description": "Unauthorized"}
                    api._record(method, {}, 401, "Unauthorized")
                    self._send(401, body)
                    return
                args = _parse_args(raw, self.headers.get("Content-Type", ""))
                status, body = api._answer(method, args)
                self._send(status, body)

            def _send(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _record(self, method: str, args: dict[str, Any], status: int, error: str | None) -> None:
        with self._changed:
            self.calls.append(Call(method, args, time.monotonic(), status, error))
            self._changed.notify_all()

    def _answer(self, method: str, args: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if method == "getUpdates":  # waits outside the lock
            try:
                result = self._get_updates(args)
            except ApiError as exc:
                self._record(method, args, exc.code, exc.description)
                body = {"ok": False, "error_code": exc.code, "description": exc.description}
                return exc.code, body
            self._record(method, args, 200, None)
            return 200, {"ok": True, "result": result}
        with self._changed:
            try:
                self._inject(method, args)
                handler = getattr(self, "_m_" + method, None)
                if handler is None:
                    raise ApiError(404, "Not Found")
                result = handler(args)
            except ApiError as exc:
                body: dict[str, Any] = {
                    "ok": False,
                    "error_code": exc.code,
                    "description": exc.description,
                }
                if exc.retry_after is not None:
                    body["parameters"] = {"retry_after": exc.retry_after}
                self.calls.append(Call(method, args, time.monotonic(), exc.code, exc.description))
                self._changed.notify_all()
                return exc.code, body
            except KeyError as exc:
                description = f"Bad Request: parameter {exc.args[0]} is required"
                self.calls.append(Call(method, args, time.monotonic(), 400, description))
                self._changed.notify_all()
                return 400, {"ok": False, "error_code": 400, "description": description}
            self.calls.append(Call(method, args, time.monotonic(), 200, None))
            self._changed.notify_all()
            return 200, {"ok": True, "result": result}

    def _inject(self, method: str, args: dict[str, Any]) -> None:
        fault = self._faults.get(method)
        if not fault or fault[1] <= 0:
            return
        kind, _, retry_after = fault
        if kind == "entities" and not args.get("parse_mode"):
            return
        fault[1] -= 1
        if kind == "retry_after":
            raise ApiError(
                429, f"Too Many Requests: retry after {retry_after:g}", retry_after=retry_after
            )
        if kind == "not_modified":
            raise ApiError(400, NOT_MODIFIED)
        raise ApiError(
            400, 'Bad Request: can\'t parse entities: Unsupported start tag "x" at byte offset 0'
        )

    # -- methods -----------------------------------------------------------------------------

    def _get_updates(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(args.get("offset") or 0)
        limit = int(args.get("limit") or 100)
        timeout = float(args.get("timeout") or 0)
        deadline = time.monotonic() + timeout
        with self._changed:
            if self.webhook is not None:
                raise ApiError(
                    409,
                    "Conflict: can't use getUpdates method while webhook is active; use "
                    "deleteWebhook to delete the webhook first",
                )
            if offset > 0:
                done = [u for u in self.pending if u["update_id"] < offset]
                if done:
                    if self.on_confirm is not None and self.on_confirm(done) is False:
                        raise ApiError(502, "Bad Gateway")  # the call never reached Telegram
                    self.confirmed += [u["update_id"] for u in done]
                    self.pending = [u for u in self.pending if u["update_id"] >= offset]
            while True:
                ready = [u for u in self.pending if u["update_id"] >= offset][:limit]
                left = deadline - time.monotonic()
                if ready or left <= 0 or self._closing:
                    return ready
                self._changed.wait(min(left, 0.2))

    def _m_getMe(self, args):
        return {
            **self.bot,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    def _chat(self, args: dict[str, Any]) -> dict[str, Any]:
        chat = self.chats.get(int(args["chat_id"]))
        if chat is None:
            raise ApiError(400, "Bad Request: chat not found")
        return chat

    def _visible(self, text: str, parse_mode: str | None, limit: int) -> str:
        shown = parse_html(text) if (parse_mode or "").upper() == "HTML" else text
        if parse_mode and parse_mode.upper() not in ("HTML", "MARKDOWNV2", "MARKDOWN"):
            raise ApiError(400, f"Bad Request: unsupported parse_mode {parse_mode!r}")
        if len(shown) > limit:
            raise ApiError(400, "Bad Request: message is too long")
        return shown

    @staticmethod
    def _buttons(args: dict[str, Any]) -> list[list[dict[str, Any]]]:
        markup = args.get("reply_markup") or {}
        rows = markup.get("inline_keyboard") or []
        for row in rows:
            for button in row:
                data = button.get("callback_data", "")
                if len(data.encode()) > CALLBACK_DATA_LIMIT:
                    raise ApiError(400, "Bad Request: BUTTON_DATA_INVALID")
        return rows

    def _new_message(self, args: dict[str, Any], text: str, kind: str, **extra) -> Message:
        chat = self._chat(args)
        reply = (args.get("reply_parameters") or {}).get("message_id")
        message = Message(
            chat_id=chat["id"],
            message_id=next(self._message_ids[chat["id"]]),
            thread_id=args.get("message_thread_id"),
            text=text,
            raw=args.get("text", args.get("caption", "")),
            parse_mode=args.get("parse_mode"),
            buttons=self._buttons(args),
            reply_to=reply,
            kind=kind,
            **extra,
        )
        message.versions.append(text)
        self.messages[(message.chat_id, message.message_id)] = message
        return message

    def _m_sendMessage(self, args):
        text = self._visible(args["text"], args.get("parse_mode"), TEXT_LIMIT)
        if not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        return self._message_json(self._new_message(args, text, "text"))

    def _m_editMessageText(self, args):
        self._chat(args)
        message = self.messages.get((int(args["chat_id"]), int(args["message_id"])))
        if message is None or message.deleted:
            raise ApiError(400, "Bad Request: message to edit not found")
        if message.kind != "text":
            raise ApiError(400, "Bad Request: there is no text in the message to edit")
        text = self._visible(args["text"], args.get("parse_mode"), TEXT_LIMIT)
        if not text.strip():
            raise ApiError(400, "Bad Request: message text is empty")
        buttons = self._buttons(args)
        same = (text, args["text"], args.get("parse_mode"), buttons) == (
            message.text,
            message.raw,
            message.parse_mode,
            message.buttons,
        )
        if same:
            raise ApiError(400, NOT_MODIFIED)
        message.text, message.raw, message.parse_mode = text, args["text"], args.get("parse_mode")
        message.buttons = buttons
        message.versions.append(text)
        return self._message_json(message)

    def _m_deleteMessage(self, args):
        self._chat(args)
        message = self.messages.get((int(args["chat_id"]), int(args["message_id"])))
        if message is None or message.deleted:
            raise ApiError(400, "Bad Request: message to delete not found")
        message.deleted = True
        return True

    def _m_sendChatAction(self, args):
        self._chat(args)
        if args["action"] not in ("typing", "upload_photo", "upload_document"):
            raise ApiError(400, "Bad Request: wrong parameter action in request")
        return True

    def _m_sendPhoto(self, args):
        return self._send_file(args, "photo")

    def _m_sendDocument(self, args):
        return self._send_file(args, "document")

    def _send_file(self, args: dict[str, Any], kind: str):
        upload = args.get(kind)
        if not isinstance(upload, tuple):
            raise ApiError(400, f"Bad Request: there is no {kind} in the request")
        filename, data = upload
        if kind == "photo" and not data.startswith((b"\x89PNG", b"\xff\xd8", b"GIF8", b"RIFF")):
            raise ApiError(400, "Bad Request: IMAGE_PROCESS_FAILED")
        caption = self._visible(args.get("caption", ""), args.get("parse_mode"), CAPTION_LIMIT)
        message = self._new_message(args, caption, kind, file=data, filename=filename)
        return self._message_json(message)

    def _m_setMyCommands(self, args):
        commands = args["commands"]
        for command in commands:
            if not re.fullmatch(r"[a-z0-9_]{1,32}", command.get("command", "")):
                raise ApiError(400, "Bad Request: BOT_COMMAND_INVALID")
            if not 1 <= len(command.get("description", "")) <= 256:
                raise ApiError(400, "Bad Request: BOT_COMMAND_DESCRIPTION_INVALID")
        scope = args.get("scope") or {"type": "default"}
        if scope.get("type") == "chat":
            self._chat(scope)
        self.commands[json.dumps(scope, sort_keys=True)] = commands
        return True

    def _m_deleteWebhook(self, args):
        self.webhook = None
        if args.get("drop_pending_updates"):
            self.confirmed += [u["update_id"] for u in self.pending]
            self.pending = []
        return True

    def _m_setWebhook(self, args):
        url = args["url"]
        if not url.startswith("https://"):
            raise ApiError(400, "Bad Request: bad webhook: An HTTPS URL must be provided")
        secret = args.get("secret_token")
        if secret is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,256}", secret):
            raise ApiError(400, "Bad Request: secret token contains unallowed characters")
        self.webhook = {k: v for k, v in args.items() if k != "drop_pending_updates"}
        if args.get("drop_pending_updates"):
            self.pending = []
        return True

    def _m_answerCallbackQuery(self, args):
        query = args["callback_query_id"]
        if query not in self._queries or query in self.callback_answers:
            raise ApiError(
                400,
                "Bad Request: query is too old and response timeout expired or query ID is invalid",
            )
        self.callback_answers[query] = args
        return True


def _parse_args(raw: bytes, content_type: str) -> dict[str, Any]:
    """A Bot API call's parameters from a form, a multipart upload or a JSON body. Uploaded
    files come back as ``(filename, bytes)``."""
    args: dict[str, Any] = {}
    if "multipart/form-data" in content_type:
        message = BytesParser(policy=HTTP).parsebytes(
            b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
        )
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            data = part.get_payload(decode=True) or b""
            if part.get_filename() is not None:
                args[name] = (part.get_filename(), data)
            else:
                args[name] = data.decode()
    elif "json" in content_type:
        args = json.loads(raw or b"{}")
    else:
        args = dict(urllib.parse.parse_qsl(raw.decode(), keep_blank_values=True))
    for name, value in list(args.items()):
        if not isinstance(value, str):
            continue
        if name in _JSON_FIELDS:
            args[name] = json.loads(value)
        elif name in _INT_FIELDS and re.fullmatch(r"-?\d+", value):
            args[name] = int(value)
        elif name in _BOOL_FIELDS:
            args[name] = value.lower() == "true"
    return args


def post_update(url: str, update: dict[str, Any], secret: str | None) -> int:
    """POST ``update`` to a bot's webhook as Telegram does; returns the HTTP status."""
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["X-Telegram-Bot-Api-Secret-Token"] = secret
    request = urllib.request.Request(
        url, data=json.dumps(update).encode(), method="POST", headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
