"""A stand-in for Slack: its Web API as a real HTTP server on localhost, and its outgoing side
(signed events, slash commands and interactions POSTed to an app's endpoint).

``SlackAPI`` answers the Web API methods sprbot's adapter calls, keeps the messages the way
Slack would (posted, edited, streamed, deleted), and records every call. It enforces Slack's
documented limits, so a test sees what Slack would refuse: ``text`` up to 40,000 characters
(``msg_too_long``), at most 50 blocks and 3,000 characters in a section's text
(``invalid_blocks``), ``markdown_text`` up to 12,000. On demand it answers a method with HTTP
429 and a ``Retry-After``, or reports the streaming methods unknown, as a workspace without
them does. ``response_url`` POSTs (slash commands, buttons) land at ``/response/<name>``.

``SlackSender`` plays Slack calling the app over HTTP: bodies signed the way slack_sdk's
``SignatureVerifier`` checks them (v0, HMAC-SHA256 of ``v0:<timestamp>:<body>``).
``SocketModeServer`` plays it over Socket Mode: the WebSocket that ``apps.connections.open``
hands out, speaking just enough RFC 6455 to deliver envelopes and collect the app's acks.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from slack_sdk.signature import SignatureVerifier

TEXT_LIMIT = 40_000
SECTION_LIMIT = 3_000
BLOCK_LIMIT = 50
MARKDOWN_LIMIT = 12_000


@dataclass
class Call:
    method: str
    args: dict[str, Any]
    at: float  # time.monotonic() when it arrived
    status: int  # the HTTP status answered
    error: str | None  # Slack's error code, when ok was false


@dataclass
class Message:
    channel: str
    ts: str
    thread_ts: str | None
    text: str
    blocks: list[dict[str, Any]]
    versions: list[str] = field(default_factory=list)  # the text after each post/edit
    streaming: bool = False
    streamed: bool = False  # started with chat.startStream
    deleted: bool = False

    def section_text(self) -> str:
        """What the reader sees: the section blocks' text, else the message text."""
        sections = [b["text"]["text"] for b in self.blocks if b.get("type") == "section"]
        return "\n".join(sections) if sections else self.text

    def action_ids(self) -> list[str]:
        return [
            e["action_id"]
            for b in self.blocks
            if b.get("type") == "actions"
            for e in b.get("elements", [])
        ]


class SlackAPI:
    """The Web API stand-in. Use as a context manager; ``url`` is the ``SPRBOT_SLACK_API_URL``."""

    def __init__(
        self,
        *,
        token: str = "xoxb-standin-bot-token",
        app_token: str = "xapp-standin-app-token",
        team_id: str = "T0TEAM",
        bot_user_id: str = "U0BOT",
        bot_id: str = "B0BOT",
    ) -> None:
        self.token = token
        self.app_token = app_token
        self.team_id = team_id
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.streaming = True  # False: chat.*Stream answer unknown_method
        self.socket_mode_url: str | None = None  # apps.connections.open's answer; None: refuse
        self.calls: list[Call] = []
        self.messages: dict[str, Message] = {}  # by ts
        self.responses: dict[str, list[dict[str, Any]]] = {}  # response_url name -> payloads
        self.uploads: dict[str, dict[str, Any]] = {}  # file id -> name, bytes, where shared
        self._limits: dict[str, list[float]] = {}  # method -> [times left, retry_after]
        self._ts = itertools.count(1)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,))

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> SlackAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def url(self) -> str:
        return self.base + "/api/"

    def response_url(self, name: str) -> str:
        return f"{self.base}/response/{name}"

    # -- what a test sets up -----------------------------------------------------------------

    def rate_limit(self, method: str, times: int = 1, retry_after: float = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with 429 and ``Retry-After``."""
        with self._lock:
            self._limits[method] = [times, retry_after]

    # -- what a test reads -------------------------------------------------------------------

    def calls_to(self, *methods: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method in methods]

    def in_channel(self, channel: str) -> list[Message]:
        """Messages the bot posted in ``channel`` (threads included), oldest first."""
        with self._lock:
            found = [m for m in self.messages.values() if m.channel == channel and not m.deleted]
        return sorted(found, key=lambda m: float(m.ts))

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

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                raw = body.decode("latin-1" if self.path.startswith("/upload/") else "utf-8")
                path = urllib.parse.urlparse(self.path).path
                if path.startswith("/upload/"):  # step 2 of files_upload_v2: the bytes
                    api._record_upload(path.removeprefix("/upload/"), raw.encode("latin-1"))
                    self._send(200, b"OK - uploaded", "text/plain")
                    return
                if path.startswith("/response/"):
                    api._record_response(path.removeprefix("/response/"), json.loads(raw or "{}"))
                    self._send(200, b"ok", "text/plain")
                    return
                if not path.startswith("/api/"):
                    self._send(404, b"not found", "text/plain")
                    return
                args = _parse_args(raw, self.headers.get("Content-Type", ""))
                auth = self.headers.get("Authorization", "")
                status, headers, body = api._answer(path.removeprefix("/api/"), args, auth)
                self._send(status, json.dumps(body).encode(), "application/json", headers)

            def _send(self, status, body: bytes, ctype: str, headers=None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def _record_upload(self, file_id: str, data: bytes) -> None:
        with self._changed:
            if file_id in self.uploads:
                self.uploads[file_id]["data"] = data
            self._changed.notify_all()

    def _record_response(self, name: str, payload: dict[str, Any]) -> None:
        with self._changed:
            self.responses.setdefault(name, []).append(payload)
            self._changed.notify_all()

    def _answer(self, method: str, args: dict[str, Any], auth: str):
        with self._changed:
            try:
                status, headers, body = self._dispatch(method, args, auth)
            except KeyError as exc:
                status, headers, body = 200, {}, {"ok": False, "error": f"missing_{exc.args[0]}"}
            error = None if body.get("ok") else body.get("error")
            self.calls.append(Call(method, args, time.monotonic(), status, error))
            self._changed.notify_all()
            return status, headers, body

    def _dispatch(self, method: str, args: dict[str, Any], auth: str):
        expected = self.app_token if method == "apps.connections.open" else self.token
        if auth != f"Bearer {expected}":
            return 200, {}, {"ok": False, "error": "invalid_auth"}
        limit = self._limits.get(method)
        if limit and limit[0] > 0:
            limit[0] -= 1
            retry = limit[1]
            return 429, {"Retry-After": f"{retry:g}"}, {"ok": False, "error": "ratelimited"}
        handler = getattr(self, "_m_" + method.replace(".", "_"), None)
        if handler is None:
            return 200, {}, {"ok": False, "error": "unknown_method"}
        return 200, {}, handler(args)

    def _new_ts(self) -> str:
        return f"{int(time.time())}.{next(self._ts):06d}"

    # -- methods -----------------------------------------------------------------------------

    def _m_auth_test(self, args):
        return {
            "ok": True,
            "url": "https://standin.slack.com/",
            "team": "Stand-in",
            "user": "sprbot",
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
        }

    def _m_apps_connections_open(self, args):
        if self.socket_mode_url is None:
            return {"ok": False, "error": "invalid_auth"}
        return {"ok": True, "url": self.socket_mode_url}

    def _m_files_getUploadURLExternal(self, args):
        file_id = f"F{next(self._ts):06d}"
        self.uploads[file_id] = {"name": args["filename"], "length": int(args["length"])}
        return {"ok": True, "upload_url": f"{self.base}/upload/{file_id}", "file_id": file_id}

    def _m_files_completeUploadExternal(self, args):
        files = json.loads(args["files"]) if isinstance(args["files"], str) else args["files"]
        for f in files:
            upload = self.uploads.get(f["id"])
            if upload is None or "data" not in upload:
                return {"ok": False, "error": "file_not_found"}
            upload.update(
                title=f.get("title"), channel=args.get("channel_id"), thread=args.get("thread_ts")
            )
        return {"ok": True, "files": [{"id": f["id"], "title": f.get("title")} for f in files]}

    def _m_chat_postMessage(self, args):
        problem = _check_message(args)
        if problem:
            return {"ok": False, "error": problem}
        message = Message(
            channel=args["channel"],
            ts=self._new_ts(),
            thread_ts=args.get("thread_ts"),
            text=args.get("text", ""),
            blocks=args.get("blocks") or [],
        )
        message.versions.append(message.section_text())
        self.messages[message.ts] = message
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _m_chat_update(self, args):
        message = self.messages.get(args["ts"])
        if message is None or message.deleted or message.channel != args["channel"]:
            return {"ok": False, "error": "message_not_found"}
        if message.streaming:
            return {"ok": False, "error": "cant_update_message"}
        problem = _check_message(args)
        if problem:
            return {"ok": False, "error": problem}
        message.text = args.get("text", message.text)
        message.blocks = args.get("blocks") or []
        message.versions.append(message.section_text())
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _m_chat_delete(self, args):
        message = self.messages.get(args["ts"])
        if message is None or message.deleted:
            return {"ok": False, "error": "message_not_found"}
        message.deleted = True
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _m_chat_postEphemeral(self, args):
        if not args.get("text") and not args.get("blocks"):
            return {"ok": False, "error": "no_text"}
        return {"ok": True, "message_ts": self._new_ts()}

    def _m_views_open(self, args):
        view = args["view"]
        if isinstance(view, str):
            view = json.loads(view)
        if not args.get("trigger_id"):
            return {"ok": False, "error": "invalid_trigger_id"}
        return {"ok": True, "view": {**view, "id": "V" + self._new_ts().replace(".", "")}}

    def _m_chat_startStream(self, args):
        if not self.streaming:
            return {"ok": False, "error": "unknown_method"}
        if not args["channel"].startswith("D") and not (
            args.get("recipient_team_id") and args.get("recipient_user_id")
        ):
            return {"ok": False, "error": "invalid_arguments"}
        text = args.get("markdown_text", "")
        if len(text) > MARKDOWN_LIMIT:
            return {"ok": False, "error": "msg_too_long"}
        message = Message(
            channel=args["channel"],
            ts=self._new_ts(),
            thread_ts=args.get("thread_ts"),
            text=text,
            blocks=[],
            streaming=True,
            streamed=True,
        )
        message.versions.append(text)
        self.messages[message.ts] = message
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _m_chat_appendStream(self, args):
        if not self.streaming:
            return {"ok": False, "error": "unknown_method"}
        message = self.messages.get(args["ts"])
        if message is None or message.deleted:
            return {"ok": False, "error": "message_not_found"}
        if not message.streaming:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        text = args.get("markdown_text", "")
        if not text or len(text) > MARKDOWN_LIMIT:
            return {"ok": False, "error": "invalid_arguments"}
        if len(message.text) + len(text) > TEXT_LIMIT:
            return {"ok": False, "error": "msg_too_long"}
        message.text += text
        message.versions.append(message.text)
        return {"ok": True, "channel": message.channel, "ts": message.ts}

    def _m_chat_stopStream(self, args):
        if not self.streaming:
            return {"ok": False, "error": "unknown_method"}
        message = self.messages.get(args["ts"])
        if message is None or message.deleted:
            return {"ok": False, "error": "message_not_found"}
        if not message.streaming:
            return {"ok": False, "error": "message_not_in_streaming_state"}
        problem = _check_blocks(args.get("blocks") or [])
        if problem:
            return {"ok": False, "error": problem}
        message.text += args.get("markdown_text", "")
        message.blocks = args.get("blocks") or []
        message.streaming = False
        message.versions.append(message.text)
        return {"ok": True, "channel": message.channel, "ts": message.ts}


def _parse_args(raw: str, content_type: str) -> dict[str, Any]:
    json_body = "json" in content_type
    args = json.loads(raw or "{}") if json_body else dict(urllib.parse.parse_qsl(raw))
    for name in ("blocks", "view"):
        if isinstance(args.get(name), str) and args[name].startswith(("[", "{")):
            args[name] = json.loads(args[name])
    return args


def _check_blocks(blocks: list[dict[str, Any]]) -> str | None:
    if len(blocks) > BLOCK_LIMIT:
        return "invalid_blocks"
    for block in blocks:
        if block.get("type") == "section" and len(block["text"]["text"]) > SECTION_LIMIT:
            return "invalid_blocks"
    return None


def _check_message(args: dict[str, Any]) -> str | None:
    text, blocks = args.get("text", ""), args.get("blocks") or []
    if not text and not blocks:
        return "no_text"
    if len(text) > TEXT_LIMIT:
        return "msg_too_long"
    return _check_blocks(blocks)


class SlackSender:
    """Slack's side of an app: signed requests POSTed to the app's ``/slack/events``."""

    def __init__(self, endpoint: str, signing_secret: str, team_id: str = "T0TEAM") -> None:
        self.endpoint = endpoint
        self.verifier = SignatureVerifier(signing_secret)
        self.team_id = team_id
        self._ids = itertools.count(1)

    def post(
        self,
        body: str,
        content_type: str,
        *,
        timestamp: int | None = None,
        signature: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, str]:
        """POST ``body`` signed (or with the given ``signature``); returns (status, body)."""
        ts = str(int(time.time()) if timestamp is None else timestamp)
        sig = signature or self.verifier.generate_signature(timestamp=ts, body=body)
        request = urllib.request.Request(
            self.endpoint,
            data=body.encode(),
            method="POST",
            headers={
                "Content-Type": content_type,
                "X-Slack-Request-Timestamp": ts,
                "X-Slack-Signature": sig,
                **(headers or {}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def event(
        self, event: dict[str, Any], *, event_id: str | None = None, retry: int = 0, **kw
    ) -> tuple[int, str]:
        """An Events API callback; ``retry`` > 0 adds Slack's retry headers."""
        body = event_callback(event, self.team_id, event_id or f"Ev{next(self._ids):08d}")
        headers = {"X-Slack-Retry-Num": str(retry), "X-Slack-Retry-Reason": "http_timeout"}
        return self.post(
            json.dumps(body), "application/json", headers=headers if retry else None, **kw
        )

    def command(self, command: str, text: str, *, user: str, channel: str, response_url: str):
        form = {
            "token": "legacy-verification-token",
            "team_id": self.team_id,
            "channel_id": channel,
            "user_id": user,
            "user_name": user.lower(),
            "command": command,
            "text": text,
            "response_url": response_url,
            "trigger_id": f"trigger-{next(self._ids)}",
        }
        return self.post(urllib.parse.urlencode(form), "application/x-www-form-urlencoded")

    def interaction(self, payload: dict[str, Any]) -> tuple[int, str]:
        payload = {"token": "legacy-verification-token", "team": {"id": self.team_id}, **payload}
        body = urllib.parse.urlencode({"payload": json.dumps(payload)})
        return self.post(body, "application/x-www-form-urlencoded")

    def click(self, message: Message, action_id: str, *, user: str, response_url: str):
        """A user clicks a button of ``message``."""
        action = next(
            e
            for b in message.blocks
            if b.get("type") == "actions"
            for e in b["elements"]
            if e["action_id"] == action_id
        )
        return self.interaction(
            {
                "type": "block_actions",
                "user": {"id": user},
                "channel": {"id": message.channel},
                "container": {"type": "message", "message_ts": message.ts},
                "message": {"ts": message.ts, "text": message.text, "blocks": message.blocks},
                "trigger_id": f"trigger-{next(self._ids)}",
                "response_url": response_url,
                "actions": [{**action, "block_id": "sprbot_feedback", "action_ts": "1"}],
            }
        )


def event_callback(event: dict[str, Any], team_id: str, event_id: str) -> dict[str, Any]:
    """The body Slack wraps an event in (over HTTP, and as a Socket Mode envelope's payload)."""
    return {
        "token": "legacy-verification-token",
        "team_id": team_id,
        "api_app_id": "A0APP",
        "type": "event_callback",
        "event_id": event_id,
        "event_time": int(time.time()),
        "event": event,
    }


class SocketModeServer:
    """One WebSocket endpoint, as Slack runs for Socket Mode: it greets the app with
    ``hello``, sends envelopes, answers pings, and keeps what the app sends back (acks)."""

    _GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455's handshake constant

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._conn: socket.socket | None = None
        self._send_lock = threading.Lock()
        self._changed = threading.Condition()
        self.received: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self._listener.getsockname()[1]}/link/?ticket=standin"

    def __enter__(self) -> SocketModeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listener.close()
        if self._conn is not None:
            self._conn.close()

    def send(self, kind: str, payload: dict[str, Any], timeout: float = 30) -> str:
        """Deliver an envelope (``events_api``, ``slash_commands``, ``interactive``) once the
        app is connected; returns its envelope id."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._conn is not None, timeout):
                raise AssertionError("the app never connected over Socket Mode")
            conn = self._conn
        envelope_id = f"env-{time.monotonic_ns()}"
        envelope = {
            "envelope_id": envelope_id,
            "type": kind,
            "payload": payload,
            "accepts_response_payload": False,
            "retry_attempt": 0,
            "retry_reason": "",
        }
        self._send(conn, 0x1, json.dumps(envelope).encode())
        return envelope_id

    def wait_for_ack(self, envelope_id: str, timeout: float = 10) -> dict[str, Any]:
        def acked():
            return next((m for m in self.received if m.get("envelope_id") == envelope_id), None)

        with self._changed:
            if not self._changed.wait_for(acked, timeout):
                raise AssertionError(f"the app did not acknowledge {envelope_id}")
            return acked()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            headers = dict(
                line.split(": ", 1) for line in request.decode().split("\r\n")[1:] if ": " in line
            )
            key = headers["Sec-WebSocket-Key"].strip() + self._GUID
            accept = base64.b64encode(hashlib.sha1(key.encode()).digest()).decode()
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept.encode() + b"\r\n\r\n"
            )
            with self._changed:
                self._conn = conn
                self._changed.notify_all()
            self._send(conn, 0x1, json.dumps({"type": "hello", "num_connections": 1}).encode())
            while True:
                opcode, data = self._read_frame(conn)
                if opcode == 0x8:  # close
                    return
                if opcode == 0x9:  # ping: pong with the same payload
                    self._send(conn, 0xA, data)
                elif opcode == 0x1:
                    with self._changed:
                        self.received.append(json.loads(data))
                        self._changed.notify_all()
        except (OSError, ConnectionError, KeyError, ValueError):
            return
        finally:
            conn.close()

    def _send(self, conn: socket.socket, opcode: int, data: bytes) -> None:
        n = len(data)
        if n < 126:
            header = struct.pack(">BB", 0x80 | opcode, n)
        elif n < 1 << 16:
            header = struct.pack(">BBH", 0x80 | opcode, 126, n)
        else:
            header = struct.pack(">BBQ", 0x80 | opcode, 127, n)
        with self._send_lock:
            conn.sendall(header + data)  # a server's frames are not masked

    @staticmethod
    def _read_frame(conn: socket.socket) -> tuple[int, bytes]:
        def read(n: int) -> bytes:
            out = b""
            while len(out) < n:
                chunk = conn.recv(n - len(out))
                if not chunk:
                    raise ConnectionError("closed")
                out += chunk
            return out

        first, second = read(2)
        n = second & 0x7F
        if n == 126:
            (n,) = struct.unpack(">H", read(2))
        elif n == 127:
            (n,) = struct.unpack(">Q", read(8))
        mask = read(4) if second & 0x80 else b""
        data = read(n)
        if mask:  # a client's frames are masked
            data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
        return first & 0x0F, data
