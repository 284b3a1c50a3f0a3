"""The web channel: an OpenAI-compatible HTTP API and a small chat page, through the bus.

``sprbot adapter web`` runs one ``WebAdapter`` (Starlette under uvicorn) on
``SPRBOT_WEB_PORT``:

- ``POST /v1/chat/completions``: OpenAI's chat completions. ``messages`` is the whole
  conversation; its last message, the user's, becomes the ``ChatRequest`` text and the earlier
  ones its ``history``, which the worker reads instead of its conversation memory (the client
  keeps the conversation, as with OpenAI). ``max_tokens`` (or ``max_completion_tokens``),
  ``temperature`` and ``top_p`` travel as the request's ``generation`` options; ``model`` is
  accepted and ignored, since the bus serves one model. ``stream`` answers with server-sent
  events in OpenAI's ``chat.completion.chunk`` format, ending with ``data: [DONE]``; token
  ``usage`` comes with every answer (in a stream, with ``stream_options.include_usage``).
  A last message that is a command (``/help``, ``/faq list``...) goes to ``bot.commands``
  like on every other channel, and its reply comes back as the completion.
- ``GET /v1/models``: the model version serving now, from the registry.
- ``POST /v1/feedback``: ``{"id": <completion id>, "rating": "up"|"down"}``. A 👍 makes the
  answer a FAQ candidate, as Slack's and Telegram's buttons do.
- ``GET /healthz``: 200 while the adapter runs and reaches Redis, else 503. No key needed.
- ``GET /``: the chat page (``adapters/static/index.html``), which uses the same API.

Every ``/v1`` route wants ``Authorization: Bearer <key>`` with one of
``SPRBOT_WEB_API_KEYS``, compared in constant time. With no key set there is no check, and the
adapter listens on 127.0.0.1 only. A key's user id is ``key-`` and the start of its SHA-256,
so that audit entries and FAQ authors name the key without containing it. Web users are never
admins: admin commands are refused and audited, as for any non-admin.

Errors are OpenAI's error object, ``{"error": {"message", "type", "param", "code"}}``: 401 for
a missing or wrong key, 400 for a malformed body, 413 for a body over ``MAX_BODY_BYTES``, a
message over ``SPRBOT_MAX_TEXT_CHARS`` or a prompt over the worker's token budget, 503 (with
``Retry-After``) when the backlog is full, 500 when the worker failed, 504 when no answer
came within ``reply_timeout_s``. A stream that fails after it started ends with an
``error`` event before ``[DONE]``.

Replies: each adapter process reads a reply stream of its own (channel ``web-<random id>``):
the HTTP connection awaiting an answer lives in that process, so no other replica could
deliver it, and a restarted process has no connection left to deliver to. One thread reads
the stream and hands each event to the request awaiting it; events for a client that went
away are acknowledged and dropped, and the worker is told to stop generating them
(``Bus.cancel``; it checks twice a second). The stream is deleted on a clean stop, and
expires an hour after a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

import redis
import uvicorn
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bot.bus import BUSY_MESSAGE, FAILED_MESSAGE, Bus, ReplyAssembler, reply_stream
from bot.commands import CommandContext, Stores, dispatch, parse
from bot.config import Settings
from bot.errors import SprbotError
from bot.faq import FaqError
from bot.memory import ConversationMemory
from bot.registry import ModelRegistry
from bot.schemas import (
    ChatRequest,
    ErrorEvent,
    FinalEvent,
    GenerationOptions,
    ReplyEvent,
    TextTooLong,
    Turn,
    Usage,
    check_text_length,
    request_id,
    shape_problem,
)

log = logging.getLogger(__name__)

CHANNEL = "web"  # the platform; each process's reply channel is web-<id>
COMPLETION_PREFIX = "chatcmpl-"  # completion ids are this plus the request id
MAX_BODY_BYTES = 1 << 20  # the longest request body: history included
LIVE_PREFIX = "sprbot:web:live:"  # <host>-<pid>: a running adapter's address, for `sprbot up`
LIVE_TTL_S = 30
STREAM_TTL_S = 3600  # a crashed process's reply stream goes this long after its last refresh
DISCONNECT_CHECK_S = 0.5  # how often a plain (non-streamed) completion looks for a hang-up
THANKS_UP = "Thanks! I saved this answer as a FAQ candidate for the admins to review."
THANKS_DOWN = "Thanks for telling me."
NO_KEYS_NOTE = (
    "SPRBOT_WEB_API_KEYS is not set: the web API listens on 127.0.0.1 only, without keys. "
    "Set keys to serve other machines."
)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_STATUS_OF_CODE = {"busy": 503, "too_long": 413, "failed": 500, "cancelled": 499}


class WebSetupError(SprbotError):
    """The web settings cannot work: the message names the setting and what to do."""


class ApiError(Exception):
    """An HTTP error in OpenAI's shape; raised anywhere in a handler, answered by the app."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        if self.status == 401:
            return "authentication_error"
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _unanswered(event: ErrorEvent) -> ApiError:
    status = _STATUS_OF_CODE.get(event.code, 500)
    headers = {"Retry-After": "5"} if event.code == "busy" else None
    return ApiError(status, event.text, code=event.code, headers=headers)


# -- the request body ----------------------------------------------------------------------------


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The fields of OpenAI's chat completion request that sprbot reads; others (``stop``,
    ``tools``, ``seed``...) are accepted and ignored. Strict: ``"10"`` is not a number."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = ""
    messages: list[_Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="One answer per request.")
    user: str = Field("", max_length=256)


def parse_completion(body: Any) -> tuple[CompletionRequest, str, list[Turn]]:
    """The request, the user's last message and the turns before it; ``ApiError`` 400 when
    the body is not a chat completion request sprbot can answer."""
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object with 'messages'.")
    if problem := shape_problem(body, {}):  # a lone surrogate: valid JSON, not storable
        raise ApiError(400, f"The body cannot be read: {problem}.")
    try:
        parsed = CompletionRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = ".".join(str(p) for p in error["loc"]) or None
        raise ApiError(400, f"{param or 'body'}: {error['msg']}", param=param) from None
    turns = [_turn(i, m) for i, m in enumerate(parsed.messages)]
    last = turns[-1]
    if last.role != "user":
        raise ApiError(
            400,
            f"The last message must be the user's, got role {last.role!r}.",
            param=f"messages.{len(turns) - 1}.role",
        )
    if not last.content.strip():
        raise ApiError(400, "The last user message is empty.", param=f"messages.{len(turns) - 1}")
    return parsed, last.content, turns[:-1]


def _turn(index: int, message: _Message) -> Turn:
    role = _ROLES.get(message.role)
    if role is None:
        raise ApiError(
            400,
            f"messages.{index}.role must be system, user or assistant, got {message.role!r} "
            "(sprbot has no tools or functions).",
            param=f"messages.{index}.role",
        )
    content = message.content
    if content is None:
        if role != "assistant":
            raise ApiError(400, f"messages.{index} has no content.", param=f"messages.{index}")
        content = ""
    elif isinstance(content, list):
        kinds = {str(part.get("type")) for part in content}  # str: a type may be a list
        if kinds - {"text"} or not all(isinstance(part.get("text"), str) for part in content):
            raise ApiError(
                400,
                f"messages.{index}.content: only text parts are supported "
                f"(got {', '.join(sorted(kinds))}).",
                param=f"messages.{index}.content",
            )
        content = "".join(part["text"] for part in content)
    return Turn(role=role, content=content)


def _generation(parsed: CompletionRequest) -> GenerationOptions | None:
    """The request's own generation settings; None when it sets none."""
    values = {
        "max_new_tokens": parsed.max_completion_tokens or parsed.max_tokens,
        "temperature": parsed.temperature,
        "top_p": parsed.top_p,
    }
    if all(value is None for value in values.values()):
        return None
    return GenerationOptions(**values)


# -- routing replies to the requests awaiting them ---------------------------------------------


class ReplyPump:
    """Reads this process's reply stream on a thread of its own and hands each event to the
    asyncio queue of the request awaiting it (``open``/``close`` on the event loop)."""

    def __init__(self, bus: Bus, channel: str, consumer: str) -> None:
        self.bus = bus
        self.channel = channel
        self.consumer = consumer
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting: dict[str, asyncio.Queue[ReplyEvent]] = {}
        self.on_refresh: Callable[[], None] = lambda: None
        self._last_refresh = 0.0

    def open(self, rid: str) -> asyncio.Queue[ReplyEvent]:
        """Await ``rid``'s events: call before submitting it, so none can come first."""
        queue: asyncio.Queue[ReplyEvent] = asyncio.Queue()
        self.waiting[rid] = queue
        return queue

    def close(self, rid: str) -> None:
        self.waiting.pop(rid, None)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll()
            except Exception:  # Redis unreachable, say: keep going, it may come back
                log.exception("reading web replies failed; retrying in 1s")
                stop.wait(1.0)

    def poll(self, block_ms: int = 1000) -> None:
        replies = self.bus.read_replies(self.channel, self.consumer, block_ms=block_ms)
        for reply in replies:
            event = reply.event
            # After its final nothing more is for that request: forget it here too, in case
            # its handler never runs again (a client gone before its stream started).
            if event.kind in ("final", "error"):
                queue = self.waiting.pop(event.request_id, None)
            else:
                queue = self.waiting.get(event.request_id)
            if queue is not None and self.loop is not None:
                self.loop.call_soon_threadsafe(queue.put_nowait, event)
        # Nothing to hold back: only this process could show these events.
        self.bus.ack_replies(self.channel, *(r.entry_id for r in replies))
        if time.monotonic() - self._last_refresh > LIVE_TTL_S / 3:
            self._last_refresh = time.monotonic()
            self.on_refresh()


@dataclass
class _Answer:
    """One request's reply events as text increments, then its end."""

    queue: asyncio.Queue[ReplyEvent]
    deadline: float
    assembler: ReplyAssembler
    sent: str = ""

    async def next(self) -> tuple[str, FinalEvent | None]:
        """The text added since the last call, and the final event once it has come (then the
        text is the rest of the answer). Raises ``ApiError`` for an error event or after the
        deadline."""
        while True:
            remaining = self.deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(self.queue.get(), max(0.0, remaining))
            except (TimeoutError, asyncio.TimeoutError):
                raise ApiError(
                    504,
                    "No answer came in time: is an inference worker running? "
                    "(`sprbot status` shows them)",
                    code="timeout",
                ) from None
            display = self.assembler.feed(event)
            if display is None:
                continue
            if isinstance(event, ErrorEvent):
                raise _unanswered(event)
            if display.text.startswith(self.sent):
                piece = display.text[len(self.sent) :]
            elif display.done:  # a reclaimed attempt wrote a different answer: give it whole
                piece = "\n\n" + display.text
            else:
                continue  # a restarted attempt: wait until it passes what was sent
            self.sent = display.text
            if isinstance(event, FinalEvent):
                return piece, event
            if piece:
                return piece, None


# -- the adapter -----------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the ``stop`` event passed to ``serve`` ends it,
    as it ends every other sprbot process."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class WebAdapter:
    """The HTTP API and the chat page, plus a ReplyPump.

    ``stores``: what commands and 👍 act on (without them, those say they are unavailable).
    ``reply_timeout_s``: how long a request waits for its answer before a 504; keep it above
    the longest generation plus a reclaim (``SPRBOT_RECLAIM_IDLE_MS``). ``drain_s``: on stop,
    how long answers being streamed may take to finish.
    """

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        memory: ConversationMemory,
        *,
        stores: Stores | None = None,
        consumer: str | None = None,
        reply_timeout_s: float = 600.0,
        drain_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.memory = memory
        self.stores = stores
        self.registry = stores.models if stores else ModelRegistry(bus.redis, settings.data_dir)
        self.reply_timeout_s = reply_timeout_s
        self.drain_s = drain_s
        self._keys = [k.get_secret_value().encode() for k in settings.web_api_keys]
        if any(not key.strip() for key in self._keys):
            raise WebSetupError("SPRBOT_WEB_API_KEYS has an empty key: remove it")
        self._key_ids = ["key-" + hashlib.sha256(key).hexdigest()[:8] for key in self._keys]
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.channel = f"{CHANNEL}-{uuid.uuid4().hex[:12]}"
        self.pump = ReplyPump(bus, self.channel, self.consumer)
        self.url = ""
        self.page = (resources.files("adapters") / "static" / "index.html").read_text("utf-8")
        self.app = Starlette(
            routes=[
                Route("/", self._page, methods=["GET"]),
                Route("/healthz", self._health, methods=["GET"]),
                Route("/v1/models", self._models, methods=["GET"]),
                Route("/v1/chat/completions", self._completions, methods=["POST"]),
                Route("/v1/feedback", self._feedback, methods=["POST"]),
            ],
            exception_handlers={
                ApiError: lambda request, exc: exc.response(),
                HTTPException: _http_error,
                redis.RedisError: _redis_error,
                Exception: _server_error,
            },
        )

    @property
    def default_host(self) -> str:
        """Every interface when keys protect the API; else this machine only."""
        return "0.0.0.0" if self._keys else "127.0.0.1"

    # -- running ---------------------------------------------------------------------------

    def serve(
        self,
        stop: threading.Event,
        *,
        host: str | None = None,
        port: int | None = None,
        on_ready: Callable[[int], None] | None = None,
    ) -> None:
        """Serve until ``stop`` is set, then let answers in flight finish (up to ``drain_s``).
        ``host`` defaults to ``default_host``, ``port`` to ``SPRBOT_WEB_PORT`` (0: a free
        one); ``on_ready`` gets the port once it listens."""
        host = host or self.default_host
        port = self.settings.web_port if port is None else port
        try:
            sock = socket.create_server((host, port))
        except OSError as exc:
            raise WebSetupError(
                f"cannot listen on {host}:{port} ({exc.strerror}): set SPRBOT_WEB_PORT to a "
                "free port (0 picks one)"
            ) from None
        asyncio.run(self._serve(stop, sock, on_ready))

    async def _serve(
        self, stop: threading.Event, sock: socket.socket, on_ready: Callable[[int], None] | None
    ) -> None:
        self.pump.loop = asyncio.get_running_loop()
        host, port = sock.getsockname()[:2]
        shown = "127.0.0.1" if host in ("0.0.0.0", "127.0.0.1") else host
        self.url = f"http://{shown}:{port}/"
        self.pump.on_refresh = lambda: self._refresh(host)
        pump_stop = threading.Event()
        pump = threading.Thread(
            target=self.pump.run, args=(pump_stop,), name="sprbot-web-replies", daemon=True
        )
        pump.start()
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=int(self.drain_s),
        )
        server = _Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started and not task.done():
                await asyncio.sleep(0.05)
            if server.started:
                if not self._keys:
                    log.warning(NO_KEYS_NOTE)
                log.info("Web chat: %s (OpenAI API at %sv1)", self.url, self.url)
                await asyncio.to_thread(self._refresh, host)
                if on_ready is not None:
                    on_ready(port)
            while not stop.is_set() and not task.done():
                await asyncio.sleep(0.1)
            server.should_exit = True
            await task
        finally:
            pump_stop.set()
            await asyncio.to_thread(pump.join, 5)
            sock.close()
            with contextlib.suppress(redis.RedisError):
                self.bus.redis.delete(LIVE_PREFIX + self.consumer, reply_stream(self.channel))

    def _refresh(self, host: str) -> None:
        """Say this adapter is up (``sprbot up`` waits for it), and keep its stream alive."""
        pipe = self.bus.redis.pipeline(transaction=False)
        key = LIVE_PREFIX + self.consumer
        pipe.hset(key, mapping={"url": self.url, "host": host, "channel": self.channel})
        pipe.expire(key, LIVE_TTL_S)
        pipe.expire(reply_stream(self.channel), STREAM_TTL_S)
        pipe.execute()

    # -- routes ----------------------------------------------------------------------------

    async def _page(self, request: Request) -> Response:
        return HTMLResponse(self.page, headers={"Cache-Control": "no-cache"})

    async def _health(self, request: Request) -> Response:
        try:
            await asyncio.to_thread(self.bus.redis.ping)
        except (redis.RedisError, OSError):
            return JSONResponse({"status": "unavailable", "redis": False}, status_code=503)
        return JSONResponse({"status": "ok", "redis": True})

    async def _models(self, request: Request) -> Response:
        self._user(request)
        version, created = await asyncio.to_thread(self._serving)
        model = {"id": version, "object": "model", "created": created, "owned_by": "sprbot"}
        return JSONResponse({"object": "list", "data": [model]})

    def _serving(self) -> tuple[str, int]:
        version = self.registry.current()
        try:
            return version, int(self.registry.get(version).created_at)
        except SprbotError:  # the configured model (base) has no record
            return version, 0

    async def _completions(self, request: Request) -> Response:
        user = self._user(request)
        parsed, text, history = parse_completion(await _json_body(request))
        try:
            check_text_length(text, self.settings.max_text_chars)
        except TextTooLong as exc:
            raise ApiError(413, str(exc), code="too_long", param="messages") from None
        rid = request_id(CHANNEL, uuid.uuid4().hex)
        options = parsed.stream_options
        reply = _Reply(
            COMPLETION_PREFIX + rid, int(time.time()), bool(options and options.include_usage)
        )
        if parse(text) is not None:
            return await self._command(reply, parsed, user, text)
        chat = ChatRequest(
            id=rid,
            channel=self.channel,
            conversation=f"{CHANNEL}/{user}/{rid}",
            user_id=user,
            user_name=parsed.user,
            text=text,
            history=history,
            generation=_generation(parsed),
        )
        queue = self.pump.open(rid)
        try:
            status, reply.model = await asyncio.to_thread(self._submit, chat)
            if status == "busy":
                raise ApiError(503, BUSY_MESSAGE, code="busy", headers={"Retry-After": "5"})
            if status != "queued":  # too_long: checked above under the same limit
                raise ApiError(413 if status == "too_long" else 500, f"refused: {status}")
            answer = _Answer(queue, time.monotonic() + self.reply_timeout_s, ReplyAssembler())
            first, final = await answer.next()  # an error before any text keeps its status
        except BaseException:
            self.pump.close(rid)
            raise
        if not parsed.stream:
            try:
                final = await self._final_unless_gone(request, answer, final)
            finally:
                self.pump.close(rid)
            if final is None:
                self._cancel(rid)
                return Response(status_code=499)  # "client closed request": nobody reads it
            return JSONResponse(reply.completion(final.text, final))
        return _event_stream(self._streamed(rid, reply, answer, first, final))

    @staticmethod
    async def _final_unless_gone(
        request: Request, answer: _Answer, final: FinalEvent | None
    ) -> FinalEvent | None:
        """Wait for the final event; None if the client disconnects first."""

        async def rest() -> FinalEvent:
            nonlocal final
            while final is None:
                _, final = await answer.next()
            return final

        waiting = asyncio.ensure_future(rest())
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_CHECK_S)
            if done:
                return waiting.result()
            if await request.is_disconnected():
                waiting.cancel()
                return None

    def _cancel(self, rid: str) -> None:
        """Tell the worker to stop an answer nobody will read (best effort)."""
        with contextlib.suppress(redis.RedisError):
            self.bus.cancel(rid)

    async def _command(
        self, reply: _Reply, parsed: CompletionRequest, user: str, text: str
    ) -> Response:
        """A command runs here, as on every channel; its reply is the completion. It never
        reaches the model, so it has no usage and no FAQ feedback."""
        context = CommandContext(
            channel=self.channel,
            conversation=f"{CHANNEL}/{user}",
            user_id=user,
            memory=self.memory,
            platform=CHANNEL,
            user_name=parsed.user,
            stores=self.stores,
        )
        answer = await asyncio.to_thread(dispatch, text, context) or ""
        reply.model = (await asyncio.to_thread(self._serving))[0]
        if parsed.stream:
            return _event_stream(reply.stream([answer], done=True))
        return JSONResponse(reply.completion(answer))

    def _submit(self, chat: ChatRequest) -> tuple[str, str]:
        return self.bus.submit(chat).status, self.registry.current()

    async def _streamed(
        self, rid: str, reply: _Reply, answer: _Answer, first: str, final: FinalEvent | None
    ) -> AsyncIterator[str]:
        ended = False
        try:
            pieces = [first]
            while final is None:
                for chunk in reply.stream(pieces):
                    yield chunk
                try:
                    piece, final = await answer.next()
                except ApiError as exc:  # after the status line: say it in the stream
                    ended = True
                    yield _sse(exc.body())
                    yield _sse("[DONE]")
                    return
                pieces = [piece]
            ended = True
            for chunk in reply.stream(pieces, done=True, final=final):
                yield chunk
        finally:
            self.pump.close(rid)
            if not ended:  # the client hung up mid-answer
                self._cancel(rid)

    async def _feedback(self, request: Request) -> Response:
        user = self._user(request)
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "The body must be a JSON object with 'id' and 'rating'.")
        if problem := shape_problem(body, {}):
            raise ApiError(400, f"The body cannot be read: {problem}.")
        completion, rating = body.get("id"), body.get("rating")
        if not isinstance(completion, str) or not 0 < len(completion) <= 200:
            raise ApiError(400, "'id' must be the id of a completion (chatcmpl-...).", param="id")
        if rating not in ("up", "down"):
            raise ApiError(400, "'rating' must be 'up' or 'down'.", param="rating")
        if self.stores is None:
            raise ApiError(503, "Feedback is not available here: no FAQ store.", code="failed")
        rid = completion.removeprefix(COMPLETION_PREFIX)
        exchange = await asyncio.to_thread(self.stores.faq.answered, rid)
        if exchange is None:
            raise ApiError(
                404,
                f"No answer {completion} to rate: it is unknown, a command's reply, or too old.",
                code="not_found",
                param="id",
            )
        message = THANKS_DOWN
        if rating == "up":
            try:
                await asyncio.to_thread(
                    self.stores.faq.record_feedback,
                    exchange,
                    user=f"{CHANNEL}:{user}",
                    channel=CHANNEL,
                )
            except FaqError as exc:
                raise ApiError(400, f"I could not save it for the FAQ: {exc}", param="id") from None
            message = THANKS_UP
        return JSONResponse(
            {"object": "feedback", "id": completion, "rating": rating, "message": message}
        )

    def _user(self, request: Request) -> str:
        """The caller's user id; ``ApiError`` 401 without a valid key (when keys are set)."""
        if not self._keys:
            return "local"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401,
                "No API key: send 'Authorization: Bearer <key>' with a key from "
                "SPRBOT_WEB_API_KEYS.",
                code="invalid_api_key",
            )
        given = token.strip().encode()
        # Every key is compared, so the time taken does not tell which one (if any) matched.
        matches = [hmac.compare_digest(given, key) for key in self._keys]
        if not any(matches):
            raise ApiError(401, "Incorrect API key.", code="invalid_api_key")
        return self._key_ids[matches.index(True)]


# -- responses -------------------------------------------------------------------------------


@dataclass
class _Reply:
    """OpenAI's response objects for one completion. ``final``: the worker's final event, None
    for a command's reply (no tokens counted, never cut short)."""

    id: str
    created: int
    include_usage: bool
    model: str = ""
    opened: bool = False  # the stream's first chunk (the assistant's role) is out

    def completion(self, text: str, final: FinalEvent | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": _finish_reason(final),
                }
            ],
            "usage": _usage(final),
        }

    def stream(
        self, pieces: list[str], *, done: bool = False, final: FinalEvent | None = None
    ) -> list[str]:
        """SSE lines for ``pieces`` of text (the first call also opens the message), then,
        when ``done``, the finish reason, the usage and ``[DONE]``."""
        chunks = []
        if not self.opened:
            self.opened = True
            chunks.append(self._chunk({"role": "assistant", "content": ""}))
        chunks += [self._chunk({"content": piece}) for piece in pieces if piece]
        if done:
            chunks.append(self._chunk({}, _finish_reason(final)))
            if self.include_usage:
                chunks.append(_sse({**self._head(), "choices": [], "usage": _usage(final)}))
            chunks.append(_sse("[DONE]"))
        return chunks

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
        }

    def _chunk(self, delta: dict[str, str], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**self._head(), "choices": [choice]})


def _finish_reason(final: FinalEvent | None) -> Literal["stop", "length"]:
    return "length" if final is not None and final.truncated else "stop"


def _usage(final: FinalEvent | None) -> dict[str, int]:
    usage = (final and final.usage) or Usage(prompt_tokens=0, completion_tokens=0)
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def _sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


def _event_stream(chunks: AsyncIterator[str] | list[str]) -> StreamingResponse:
    async def each() -> AsyncIterator[str]:
        if isinstance(chunks, list):
            for chunk in chunks:
                yield chunk
        else:
            async for chunk in chunks:
                yield chunk

    # X-Accel-Buffering: a proxy such as nginx would otherwise hold the stream back.
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(each(), media_type="text/event-stream", headers=headers)


async def _json_body(request: Request) -> Any:
    """The body as JSON; ``ApiError`` 413 over ``MAX_BODY_BYTES``, 400 when not JSON."""
    too_big = ApiError(
        413,
        f"The request body is over {MAX_BODY_BYTES:,} bytes: send less history.",
        code="too_long",
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_big
    try:
        return json.loads(body)
    except ValueError as exc:  # UnicodeDecodeError too
        raise ApiError(400, f"The body is not valid JSON: {exc}") from None


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"No route {request.url.path}.", 405: f"{request.method} is not allowed here."}
    text = message.get(exc.status_code, str(exc.detail))
    return ApiError(
        exc.status_code, text, code="not_found" if exc.status_code == 404 else None
    ).response()


async def _redis_error(request: Request, exc: Exception) -> Response:
    log.error("web request failed: Redis is unreachable (%s)", exc)
    return ApiError(
        503, "The chat service cannot reach its Redis: try again shortly.", code="busy"
    ).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    # Starlette re-raises the exception after this response, and uvicorn logs it.
    return ApiError(500, FAILED_MESSAGE, code="failed").response()


__all__ = [
    "CHANNEL",
    "MAX_BODY_BYTES",
    "ApiError",
    "CompletionRequest",
    "WebAdapter",
    "WebSetupError",
    "parse_completion",
]
