"""The web channel: the official OpenAI client and raw HTTP against the real web adapter, a real
inference worker on the tiny model, and a real Redis."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import openai
import pytest
from processes import sprbot_exe, start_inference_worker, stop
from standins import AdapterThreads

from adapters.web import (
    LIVE_PREFIX,
    MAX_BODY_BYTES,
    NO_KEYS_NOTE,
    THANKS_DOWN,
    THANKS_UP,
    WebAdapter,
)
from bot.audit import AuditLog
from bot.bus import Bus
from bot.commands import Stores
from bot.config import Settings
from bot.connection import EmbeddedRedis, connect
from bot.memory import PREFIX as MEMORY_PREFIX
from bot.memory import ConversationMemory
from bot.schemas import ChatRequest, request_id

MAX_NEW_TOKENS = 32
KEYS = ["first-key-0123456789", "second-key-9876543210"]
QUESTION = "What is sprbot?"


@dataclass
class Served:
    data_dir: Path
    redis_url: str
    env: dict[str, str]


@contextlib.contextmanager
def serving(tiny_model: Path, data_dir: Path) -> Iterator[Served]:
    """Redis and one real inference worker on the tiny model (greedy)."""
    server = EmbeddedRedis(data_dir)
    url = server.ensure_running()
    env = {
        **os.environ,
        "SPRBOT_DATA_DIR": str(data_dir),
        "SPRBOT_REDIS_URL": url,
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": str(MAX_NEW_TOKENS),
        "SPRBOT_MAX_PROMPT_TOKENS": "256",
        "SPRBOT_COALESCE_TOKENS": "2",
        "SPRBOT_LOG_LEVEL": "WARNING",
        "SPRBOT_FAQ_EMBEDDINGS": "off",
        "SPRBOT_METRICS_PORT": "0",
    }
    worker = start_inference_worker(env, url)
    try:
        yield Served(data_dir, url, env)
    finally:
        stop(worker)
        server.stop()


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    with serving(tiny_model, tmp_path_factory.mktemp("web-live") / "data") as stack:
        yield stack


@dataclass
class Web:
    """One running web adapter and what a test looks at."""

    url: str
    adapter: WebAdapter
    bus: Bus
    stores: Stores
    settings: Settings

    def client(self, api_key: str = "no key needed") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "v1", api_key=api_key, max_retries=0, timeout=60)


def make_settings(redis_url: str, data_dir: Path, **overrides) -> Settings:
    values = dict(redis_url=redis_url, data_dir=data_dir, faq_embeddings="off")
    return Settings(_env_file=None, **{**values, **overrides})


class WebThreads(AdapterThreads):
    """WebAdapters served in this process, on free local ports."""

    def web(self, settings: Settings, *, max_backlog: int | None = None, **options) -> Web:
        bus = Bus(
            connect(settings),
            max_backlog=max_backlog or settings.max_backlog,
            max_text_chars=settings.max_text_chars,
        )
        stores = Stores.build(settings, bus.redis)
        memory = ConversationMemory(bus.redis, ttl_s=settings.memory_ttl_s)
        adapter = WebAdapter(settings, bus, memory, stores=stores, **options)
        port = self.start(adapter, "web-adapter")
        return Web(f"http://127.0.0.1:{port}/", adapter, bus, stores, settings)


@pytest.fixture
def run_web():
    """Start WebAdapters (``run_web(settings, **options)``); stop them after the test."""
    threads = WebThreads()
    yield threads.web
    threads.stop_all()


@pytest.fixture
def web(served, run_web) -> Web:
    return run_web(make_settings(served.redis_url, served.data_dir))


@pytest.fixture
def offline(data_dir, embedded_redis, run_web):
    """A web adapter on a Redis of its own with no worker: the test plays the worker."""

    def start(**options) -> Web:
        return run_web(make_settings(embedded_redis.url, data_dir), **options)

    return start


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def post(web: Web, body, *, path: str = "v1/chat/completions", **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes | str) else json.dumps(body)
    return httpx.post(web.url + path, content=content, timeout=60, **kwargs)


def sse_lines(web: Web, body: dict) -> list[str]:
    with httpx.stream("POST", web.url + "v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line]


# -- answers -------------------------------------------------------------------------------------


def test_a_completion_has_the_answer_its_usage_and_why_it_stopped(web):
    reply = web.client().chat.completions.create(model="gpt-4o", messages=ask(QUESTION))

    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-web-")
    assert reply.model == "base"  # the serving version, whatever the client asked for
    [choice] = reply.choices
    assert choice.message.role == "assistant" and choice.message.content
    usage = reply.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= MAX_NEW_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    cut = usage.completion_tokens == MAX_NEW_TOKENS
    assert choice.finish_reason == ("length" if cut else "stop")
    # The worker remembers the answer for 👍, and keeps no conversation: the client does.
    exchange = web.stores.faq.answered(reply.id.removeprefix("chatcmpl-"))
    assert (exchange.question, exchange.answer) == (QUESTION, choice.message.content)
    assert not list(web.bus.redis.scan_iter(MEMORY_PREFIX + "*"))


def test_a_streamed_completion_adds_up_to_the_same_answer_and_ends_with_done(web):
    client = web.client()
    plain = client.chat.completions.create(model="sprbot", messages=ask(QUESTION))
    assert plain.usage.completion_tokens >= 4, "the tiny model's greedy answer is that long"

    chunks = list(
        client.chat.completions.create(
            model="sprbot",
            messages=ask(QUESTION),
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) >= 2, "the answer came in one piece: not streamed"
    assert "".join(pieces) == plain.choices[0].message.content
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage

    lines = sse_lines(web, {"model": "sprbot", "messages": ask(QUESTION), "stream": True})
    assert all(line.startswith("data: ") for line in lines), lines
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all("usage" not in e for e in events)  # only when stream_options asks for it
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "".join(pieces)
    assert not web.adapter.pump.waiting  # every request it awaited has ended


def test_the_conversation_comes_from_the_request_and_is_not_remembered(web):
    client = web.client()
    alone = client.chat.completions.create(model="sprbot", messages=ask("And in French?"))
    history = [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": "A chatbot that learns your team's FAQ."},
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "And in French?"}]},
    ]
    after = client.chat.completions.create(model="sprbot", messages=history)

    assert after.usage.prompt_tokens > alone.usage.prompt_tokens + 10
    again = client.chat.completions.create(model="sprbot", messages=history)
    assert again.usage.prompt_tokens == after.usage.prompt_tokens  # nothing was added in between
    assert again.choices[0].message.content == after.choices[0].message.content
    assert not list(web.bus.redis.scan_iter(MEMORY_PREFIX + "*"))


def test_generation_options_apply_to_their_request_within_the_workers_limits(web):
    client = web.client()
    greedy = client.chat.completions.create(model="sprbot", messages=ask(QUESTION))

    short = client.chat.completions.create(model="sprbot", messages=ask(QUESTION), max_tokens=3)
    assert short.usage.completion_tokens == 3 and short.choices[0].finish_reason == "length"
    assert greedy.choices[0].message.content.startswith(short.choices[0].message.content)
    newer = client.chat.completions.create(
        model="sprbot", messages=ask(QUESTION), max_completion_tokens=2
    )
    assert newer.usage.completion_tokens == 2
    capped = client.chat.completions.create(
        model="sprbot", messages=ask(QUESTION), max_tokens=10_000
    )
    assert capped.usage.completion_tokens <= MAX_NEW_TOKENS  # SPRBOT_MAX_NEW_TOKENS wins

    zero = client.chat.completions.create(model="sprbot", messages=ask(QUESTION), temperature=0)
    assert zero.choices[0].message.content == greedy.choices[0].message.content
    # The worker decodes greedily (SPRBOT_DO_SAMPLE=false); a temperature samples instead: two
    # samples of a random model's 32 tokens both equal to the greedy answer would be a miracle.
    sampled = [
        client.chat.completions.create(
            model="sprbot", messages=ask(QUESTION), temperature=1.5, top_p=0.95
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert any(text != greedy.choices[0].message.content for text in sampled)


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        (b"{not json", None, "not valid JSON"),
        ([{"role": "user", "content": "hi"}], None, "JSON object"),
        ({"model": "x"}, "messages", "Field required"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": "hello"}, "messages", "valid list"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.role", "no tools"),
        ({"messages": [{"content": "hi"}]}, "messages.0.role", "Field required"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "?"},
                ]
            },
            "messages.1.role",
            "must be the user's",
        ),
        ({"messages": [{"role": "user", "content": "  "}]}, "messages.0", "empty"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content",
            "only text",
        ),
        ({"messages": ask("hi"), "max_tokens": "10"}, "max_tokens", "valid integer"),
        ({"messages": ask("hi"), "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": ask("hi"), "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"messages": ask("hi"), "top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"messages": ask("hi"), "n": 2}, "n", "less than or equal to 1"),
        ({"messages": ask("hi"), "stream": "yes"}, "stream", "valid boolean"),
    ],
)
def test_a_malformed_request_gets_400_saying_what_is_wrong(web, body, param, says):
    response = post(web, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert says in error["message"]


def test_the_openai_client_sees_a_bad_request_as_bad_request_error(web):
    with pytest.raises(openai.BadRequestError) as caught:
        web.client().chat.completions.create(model="x", messages=ask("hi"), temperature=2.5)
    assert caught.value.status_code == 400 and "temperature" in caught.value.message


def test_oversized_input_gets_413_from_the_edge_or_from_the_worker(web):
    client = web.client()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="x", messages=ask("a" * 4001))
    assert caught.value.status_code == 413
    assert "4,001 characters long, over the limit of 4,000" in caught.value.message

    response = post(web, {"messages": ask("hi"), "padding": "x" * MAX_BODY_BYTES})
    assert response.status_code == 413 and "body is over" in response.json()["error"]["message"]

    # Under the character limit, over the worker's prompt budget (SPRBOT_MAX_PROMPT_TOKENS=256):
    # refused by the worker, before any text, so the status still says why, streamed or not.
    long = " ".join(f"xq{i}zv" for i in range(500))
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            reply = client.chat.completions.create(model="x", messages=ask(long), stream=stream)
            list(reply)
        assert caught.value.status_code == 413
        assert caught.value.code == "too_long" and "Sorry" in caught.value.message


def test_a_full_backlog_gets_503_with_retry_after(offline):
    web = offline(max_backlog=1)
    waiting = ChatRequest(
        id=request_id("test", "waiting"), channel="test", conversation="c", user_id="u", text="hi"
    )
    assert web.bus.submit(waiting).status == "queued"  # no worker: it stays in the backlog

    response = post(web, {"messages": ask(QUESTION)})
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["error"]["code"] == "busy"
    with pytest.raises(openai.InternalServerError) as caught:
        web.client().chat.completions.create(model="x", messages=ask(QUESTION), stream=True)
    assert caught.value.status_code == 503 and "busy" in caught.value.message


def test_no_worker_means_504_and_a_hint_not_a_hang(offline):
    web = offline(reply_timeout_s=1.0)
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as caught:
            list(web.client().chat.completions.create(model="x", messages=ask("hi"), stream=stream))
        assert caught.value.status_code == 504
        assert "is an inference worker running?" in caught.value.message


def _play_worker(web: Web, act) -> threading.Thread:
    """Answer the next request on the bus with ``act(bus, delivery)``, on a thread."""

    def run() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for delivery in web.bus.read_requests("test-worker", count=1, block_ms=200):
                act(web.bus, delivery)
                return

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_worker_failure_is_a_500_before_the_answer_and_an_error_event_within_it(offline):
    web = offline()
    player = _play_worker(web, lambda bus, d: bus.fail(d, "failed", "Sorry, the model broke."))
    with pytest.raises(openai.InternalServerError) as caught:
        web.client().chat.completions.create(model="x", messages=ask("hi"))
    player.join()
    assert caught.value.status_code == 500 and "Sorry, the model broke." in caught.value.message

    def half_then_fail(bus: Bus, delivery) -> None:
        bus.emit(delivery.delta("Half an ans"))
        bus.fail(delivery, "failed", "Sorry, the worker died.")

    player = _play_worker(web, half_then_fail)
    lines = sse_lines(web, {"messages": ask("hi"), "stream": True})
    player.join()
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[1]["choices"][0]["delta"]["content"] == "Half an ans"
    assert events[-1]["error"]["message"] == "Sorry, the worker died."
    assert lines[-1] == "data: [DONE]"
    player = _play_worker(web, half_then_fail)  # first: the stream opens with the first text
    stream = web.client().chat.completions.create(model="x", messages=ask("hi"), stream=True)
    with pytest.raises(openai.APIError, match="the worker died"):
        list(stream)
    player.join()


def _until_cancelled(cancelled: list[str]):
    """A played worker that starts a long answer and goes on until the adapter cancels it."""

    def act(bus: Bus, delivery) -> None:
        bus.emit(delivery.delta("The start of a long answer"))
        deadline = time.monotonic() + 20
        while not bus.cancelled([delivery.request.id]):
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        cancelled.append(delivery.request.id)
        bus.fail(delivery, "cancelled", "Stopped: the asker went away.")

    return act


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "plain"])
def test_a_client_that_hangs_up_stops_its_answer_and_leaves_nothing_behind(offline, stream):
    web = offline()
    cancelled: list[str] = []
    player = _play_worker(web, _until_cancelled(cancelled))
    body = {"messages": ask(QUESTION), "stream": stream}
    if stream:
        with httpx.stream("POST", web.url + "v1/chat/completions", json=body) as response:
            first = next(line for line in response.iter_lines() if line)
        rid = json.loads(first[6:])["id"].removeprefix("chatcmpl-")
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            httpx.post(web.url + "v1/chat/completions", json=body, timeout=1.0)
    player.join()
    assert len(cancelled) == 1, "the worker was never told to stop"
    if stream:
        assert cancelled == [rid]
    deadline = time.monotonic() + 10
    while web.adapter.pump.waiting:
        assert time.monotonic() < deadline, "the adapter still waits for the abandoned answer"
        time.sleep(0.05)

    answered: list[str] = []  # an answer read to its end is not cancelled
    player = _play_worker(
        web, lambda bus, d: (answered.append(d.request.id), bus.finish(d, "A whole answer."))
    )
    reply = web.client().chat.completions.create(model="x", messages=ask(QUESTION), stream=stream)
    text = (
        "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
        if stream
        else (reply.choices[0].message.content)
    )
    player.join()
    assert text == "A whole answer."
    assert web.bus.cancelled(answered) == []


# -- keys ------------------------------------------------------------------------------------


def test_keys_are_checked_and_never_shown(served, run_web, caplog):
    caplog.set_level(logging.DEBUG)
    web = run_web(make_settings(served.redis_url, served.data_dir, web_api_keys=KEYS))
    assert web.adapter.default_host == "0.0.0.0"

    response = post(web, {"messages": ask("hi")})
    assert response.status_code == 401
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "invalid_api_key")
    assert "Authorization: Bearer" in error["message"]
    basic = httpx.get(web.url + "v1/models", headers={"Authorization": f"Basic {KEYS[0]}"})
    assert basic.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        web.client("a-wrong-key").chat.completions.create(model="x", messages=ask("hi"))
    feedback = post(web, {"id": "chatcmpl-x", "rating": "up"}, path="v1/feedback")
    assert feedback.status_code == 401

    assert httpx.get(web.url + "healthz").json() == {"status": "ok", "redis": True}
    assert "<title>sprbot</title>" in httpx.get(web.url).text  # the page holds no secret

    client = web.client(KEYS[1])
    assert client.chat.completions.create(model="x", messages=ask("hi")).choices[0].message
    assert [m.id for m in client.models.list()] == ["base"]
    refused = client.chat.completions.create(model="x", messages=ask("/faq add q | a"))
    assert "for admins only" in refused.choices[0].message.content

    [entry] = [e for e in AuditLog(web.bus.redis).entries() if e.command == "/faq add"]
    assert entry.platform == "web" and entry.result == "refused"
    assert re.fullmatch(r"key-[0-9a-f]{8}", entry.user_id)
    seen = caplog.text + json.dumps([asdict(e) for e in AuditLog(web.bus.redis).entries()])
    assert not any(key in seen for key in KEYS)


def test_without_keys_it_listens_on_loopback_only_and_says_so(served, run_web, caplog):
    caplog.set_level(logging.INFO)
    web = run_web(make_settings(served.redis_url, served.data_dir))
    assert web.adapter.default_host == "127.0.0.1"
    assert NO_KEYS_NOTE in caplog.text
    assert f"Web chat: {web.url}" in caplog.text


# -- the rest of the API ---------------------------------------------------------------------


def test_models_lists_the_serving_version_from_the_registry(offline):
    web = offline()
    assert [m.id for m in web.client().models.list()] == ["base"]

    version, folder = web.stores.models.allocate()
    (folder / "config.json").write_text("{}")
    record = web.stores.models.register(version)
    web.stores.models.promote(version)
    [model] = web.client().models.list()
    assert (model.id, model.created, model.owned_by) == (version, int(record.created_at), "sprbot")


def test_commands_run_on_the_shared_command_path_and_never_reach_the_model(web):
    client = web.client()
    help_reply = client.chat.completions.create(model="x", messages=ask("/help"))
    text = help_reply.choices[0].message.content
    assert "/reset" in text and "(Admins have more" in text
    assert help_reply.usage.total_tokens == 0
    assert web.stores.faq.answered(help_reply.id.removeprefix("chatcmpl-")) is None

    chunks = list(client.chat.completions.create(model="x", messages=ask("/faq list"), stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.startswith("The FAQ is empty")
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_thumbs_up_makes_the_answer_a_faq_candidate_and_a_thumbs_down_does_not(web):
    reply = web.client().chat.completions.create(model="x", messages=ask("Who approves FAQs?"))
    answer = reply.choices[0].message.content

    down = post(web, {"id": reply.id, "rating": "down"}, path="v1/feedback")
    assert down.status_code == 200 and down.json()["message"] == THANKS_DOWN
    assert not web.stores.faq.entries("candidate")
    up = post(web, {"id": reply.id, "rating": "up"}, path="v1/feedback")
    assert up.status_code == 200 and up.json()["message"] == THANKS_UP
    [entry] = web.stores.faq.entries("candidate")
    assert (entry.question, entry.answer) == ("Who approves FAQs?", answer)
    assert (entry.source, entry.author, entry.channel) == ("feedback", "web:local", "web")

    unknown = post(web, {"id": "chatcmpl-web-0000", "rating": "up"}, path="v1/feedback")
    assert unknown.status_code == 404 and "unknown" in unknown.json()["error"]["message"]
    bad = post(web, {"id": reply.id, "rating": "meh"}, path="v1/feedback")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rating"


def test_unknown_routes_and_methods_answer_in_openai_error_shape(web):
    missing = httpx.get(web.url + "v1/embeddings")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = httpx.get(web.url + "v1/chat/completions")
    assert wrong.status_code == 405 and "GET" in wrong.json()["error"]["message"]


# -- the command line ------------------------------------------------------------------------


def _live(client, pid: int, timeout: float = 60) -> tuple[str, dict[str, str]]:
    """The key and fields by which the web adapter of ``pid`` says it is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for key in client.scan_iter(LIVE_PREFIX + "*"):
            if key.decode().endswith(f"-{pid}"):
                return key, {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
        time.sleep(0.1)
    raise AssertionError(f"no web adapter of pid {pid} announced itself")


@pytest.mark.parametrize("keys", ["", ",".join(KEYS)])
def test_sprbot_adapter_web_serves_where_the_keys_say_until_sigterm(served, keys):
    env = {**served.env, "SPRBOT_WEB_PORT": "0", "SPRBOT_WEB_API_KEYS": keys}
    env["SPRBOT_LOG_LEVEL"] = "INFO"
    proc = subprocess.Popen(
        [sprbot_exe(), "adapter", "web"], env=env, stderr=subprocess.PIPE, text=True
    )
    client = connect(Settings(_env_file=None, redis_url=served.redis_url))
    try:
        key, live = _live(client, proc.pid)
        assert live["host"] == ("0.0.0.0" if keys else "127.0.0.1")
        assert httpx.get(live["url"] + "healthz").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stderr.read()
    assert f"Web chat: {live['url']}" in log
    assert ("127.0.0.1 only" in log) == (not keys)
    assert not any(key in log for key in KEYS)
    assert not client.exists(key)  # gone with the process, and so is its reply stream
    assert not client.exists(f"sprbot:chat:replies:{live['channel']}")


def test_sprbot_up_starts_the_web_chat_and_says_where_to_open_it(data_dir, tiny_model):
    env = {
        **os.environ,
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_LOG_LEVEL": "WARNING",
        "SPRBOT_WEB_PORT": "0",
        "SPRBOT_METRICS_PORT": "0",
        "SPRBOT_FAQ_EMBEDDINGS": "off",
    }
    proc = subprocess.Popen(
        [sprbot_exe(), "up", "--no-chat"], env=env, stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in proc.stderr:
            lines.put(line)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        url = None
        while url is None:
            assert proc.poll() is None and time.monotonic() < deadline, "no 'Web chat:' line"
            try:
                found = re.search(r"Web chat: (http://127\.0\.0\.1:\d+/)", lines.get(timeout=1))
            except queue.Empty:
                continue
            url = found and found.group(1)
        assert "<title>sprbot</title>" in httpx.get(url).text
        reply = openai.OpenAI(base_url=url + "v1", api_key="-", max_retries=0).chat.completions
        assert reply.create(model="x", messages=ask("hi")).choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
