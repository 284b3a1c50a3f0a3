"""Hostile requests at the web adapter's OpenAI-compatible API: the real Starlette app under
uvicorn over HTTP (bearer keys), and the shared inference worker.

- Without a valid key (none, another scheme, a near miss, a random token) every ``/v1`` route
  answers 401 in OpenAI's error shape, whatever the body, and nothing reaches the bus.
- With a key, malformed chat completions (not JSON, not an object, fields of the wrong type or
  out of range, odd roles and content parts, huge ``messages``, a last message over the text
  limit) get 400 or 413 saying why, never a 5xx, and none reaches the bus.
- Malformed feedback gets 400, an unknown completion 404; no FAQ candidate appears.
- A body over ``MAX_BODY_BYTES`` gets 413, announced or not; odd but valid requests (system and
  developer turns, text parts, unusual Unicode, commands) are answered with 200.
- Afterwards the adapter still answers a plain question.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fuzzing import Served, Tracebacks, examples, raw_post
from hypothesis import example, given
from hypothesis import strategies as st
from standins import AdapterThreads

from adapters.web import MAX_BODY_BYTES, WebAdapter
from bot.bus import DEAD, Bus
from bot.commands import Stores
from bot.config import Settings
from bot.connection import connect
from bot.memory import ConversationMemory

KEY = "fuzz-web-key-0123456789"
MAX_TEXT_CHARS = 4000  # the default SPRBOT_MAX_TEXT_CHARS
COMPLETIONS = "v1/chat/completions"
ROLES = ("system", "developer", "user", "assistant")


@dataclass
class Stack:
    url: str
    port: int
    http: httpx.Client
    bus: Bus
    stores: Stores
    served: Served
    tracebacks: Tracebacks

    def post(self, path: str, body: Any, key: str | None = KEY, **headers: str) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        return self.http.post(self.url + path, content=content, headers=headers)

    def answers_a_question(self) -> None:
        """The adapter (and the worker behind it) still answer a plain question."""
        reply = self.post(COMPLETIONS, {"messages": [user("Are you still there?")]})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
        assert reply.json()["usage"]["completion_tokens"] > 0  # the model wrote it


def openai_error(response: httpx.Response, kind: str) -> dict[str, Any]:
    """The error object of a refusal, checked to be OpenAI's shape."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == kind and error["message"].strip(), error
    return error


@pytest.fixture(scope="module")
def stack(served: Served) -> Iterator[Stack]:
    tracebacks = Tracebacks()
    logging.getLogger().addHandler(tracebacks)
    threads = AdapterThreads()
    settings = Settings(
        _env_file=None,
        redis_url=served.redis_url,
        data_dir=served.data_dir,
        web_api_keys=[KEY],
        max_text_chars=MAX_TEXT_CHARS,
        faq_embeddings="off",
    )
    bus = Bus(connect(settings), max_text_chars=settings.max_text_chars)
    stores = Stores.build(settings, bus.redis)
    adapter = WebAdapter(
        settings, bus, ConversationMemory(bus.redis), stores=stores, reply_timeout_s=60
    )
    port = threads.start(adapter, "web-adapter")
    try:
        with httpx.Client(timeout=60) as http:
            yield Stack(f"http://127.0.0.1:{port}/", port, http, bus, stores, served, tracebacks)
    finally:
        threads.stop_all()
        logging.getLogger().removeHandler(tracebacks)


# -- what is sent ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=16,
)
odd_text = st.one_of(
    st.text(min_size=1, max_size=60),
    st.sampled_from(["\u200b", "\x00\x1f", "\u202eevil", "😀" * 30, "e\u0301" * 9]),
)
# JSON may carry these (as \ud83d escapes); no text encoder takes them.
lone_surrogates = st.sampled_from(["\ud83d", "a\udc00b", "\udfff"])


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def not_(*types: type) -> st.SearchStrategy[Any]:
    """A JSON value of none of ``types`` (a bool is no int here, as in strict validation)."""
    return json_values.filter(
        lambda v: not isinstance(v, types) or (isinstance(v, bool) and bool not in types)
    )


def too_long_text() -> st.SearchStrategy[str]:
    return st.integers(MAX_TEXT_CHARS + 1, 200_000).map(lambda n: "x" * n)


DROP = object()  # a field that a defect removes

# Each defect makes a valid request invalid in one way: its name, and the fields it changes.
DEFECTS: dict[str, st.SearchStrategy[Any]] = {
    "messages: wrong type": not_(list).map(lambda v: {"messages": v}),
    "messages: empty": st.just({"messages": []}),
    "messages: missing": st.just({"messages": DROP}),
    "message: not an object": not_(dict).map(lambda v: {"messages": [v]}),
    "role: unknown": st.text(max_size=20)
    .filter(lambda r: r not in ROLES)
    .map(lambda r: {"messages": [{"role": r, "content": "hi"}]}),
    "role: wrong type": not_(str).map(lambda r: {"messages": [{"role": r, "content": "hi"}]}),
    "role: missing": st.just({"messages": [{"content": "hi"}]}),
    "content: wrong type": not_(str, list)
    .filter(lambda v: v is not None)
    .map(lambda c: {"messages": [user(c)]}),
    "content: none for the user": st.just({"messages": [user(None)]}),
    "content: blank": st.sampled_from(["", " ", "\n\t", [], [{"type": "text", "text": " "}]]).map(
        lambda c: {"messages": [user(c)]}
    ),
    "content: non-text part": st.fixed_dictionaries(
        {"type": st.text(max_size=10).filter(lambda t: t != "text") | not_(str)},
        optional={"text": json_values, "image_url": json_values},
    ).map(lambda p: {"messages": [user([{"type": "text", "text": "hi"}, p])]}),
    "content: part without text": not_(str).map(
        lambda t: {"messages": [user([{"type": "text", "text": t}])]}
    ),
    "last message: not the user's": st.sampled_from(["system", "developer", "assistant"]).map(
        lambda r: {"messages": [user("hi"), {"role": r, "content": "and?"}]}
    ),
    "last message: over the text limit": too_long_text().map(lambda t: {"messages": [user(t)]}),
    # Thousands of turns, all well-formed but the last: the whole list is read, and refused.
    "huge messages: last not the user's": st.integers(1_000, 20_000).map(
        lambda n: {"messages": [user(f"q{i}") for i in range(n)] + [{"role": "assistant"}]}
    ),
    "huge messages: one bad turn": st.tuples(st.integers(1_000, 10_000), st.integers(0, 999)).map(
        lambda t: {
            "messages": [
                {"role": "tool", "content": "1"} if i == t[1] else user(f"q{i}")
                for i in range(t[0])
            ]
        }
    ),
    "text: not valid Unicode": st.tuples(
        lone_surrogates, st.sampled_from(["last", "history", "user"])
    ).map(
        lambda t: (
            {"user": t[0]}
            if t[1] == "user"
            else {"messages": [user(t[0]), user("hi")] if t[1] == "history" else [user(t[0])]}
        )
    ),
    "max_tokens": st.one_of(not_(int, type(None)), st.integers(max_value=0)).map(
        lambda v: {"max_tokens": v}
    ),
    "max_completion_tokens": st.one_of(not_(int, type(None)), st.integers(max_value=0)).map(
        lambda v: {"max_completion_tokens": v}
    ),
    "temperature": st.one_of(
        not_(int, float, type(None)),
        st.floats(min_value=2, exclude_min=True),
        st.floats(max_value=0, exclude_max=True),
        st.just(float("nan")),
    ).map(lambda v: {"temperature": v}),
    "top_p": st.one_of(
        not_(int, float, type(None)),
        st.floats(min_value=1, exclude_min=True),
        st.floats(max_value=0, exclude_max=True),
    ).map(lambda v: {"top_p": v}),
    "n": st.one_of(not_(int), st.integers().filter(lambda n: n != 1)).map(lambda v: {"n": v}),
    "stream": not_(bool).map(lambda v: {"stream": v}),
    "stream_options": st.one_of(
        not_(dict, type(None)), not_(bool).map(lambda v: {"include_usage": v})
    ).map(lambda v: {"stream_options": v}),
    "model": not_(str).map(lambda v: {"model": v}),
    "user": st.one_of(not_(str), st.integers(257, 5_000).map(lambda n: "u" * n)).map(
        lambda v: {"user": v}
    ),
}


@st.composite
def malformed(draw) -> tuple[str, bytes, int]:
    """(what is wrong, body, the status it must get) of a request that cannot be answered."""
    kind = draw(st.sampled_from(["bytes", "json", *DEFECTS]))
    if kind == "bytes":
        body = draw(st.binary(max_size=300))
        return kind, body, 400
    if kind == "json":  # any JSON but an object with messages
        value = draw(json_values.filter(lambda v: not (isinstance(v, dict) and "messages" in v)))
        return kind, json.dumps(value).encode(), 400
    body = {"model": "gpt-4o", "messages": [user("Where is room 7?")], **draw(DEFECTS[kind])}
    body = {name: value for name, value in body.items() if value is not DROP}
    over = kind == "last message: over the text limit"
    return kind, json.dumps(body).encode(), 413 if over else 400


@st.composite
def answerable(draw) -> dict[str, Any]:
    """A chat completion request that is odd but valid."""
    history = draw(
        st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(ROLES), "content": odd_text},
                optional={"name": st.text(max_size=8), "tool_calls": json_values},
            ),
            max_size=4,
        )
    )
    last = draw(
        st.one_of(
            odd_text.filter(str.strip),
            st.lists(
                st.fixed_dictionaries({"type": st.just("text"), "text": odd_text}), min_size=1
            ).filter(lambda parts: "".join(p["text"] for p in parts).strip()),
            st.sampled_from(["/help", "/faq list", "/nonsense", "/"]),
        )
    )
    body: dict[str, Any] = {"messages": [*history, user(last)]}
    options = {
        "model": st.text(max_size=20),
        "max_tokens": st.integers(1, 4),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "stream": st.booleans(),
        "seed": json_values,  # ignored fields
        "tools": json_values,
    }
    for name in draw(st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True)):
        body[name] = draw(options[name])
    return body


def wrong_credentials() -> st.SearchStrategy[dict[str, str]]:
    """Authorization headers that do not carry the key (or none at all)."""
    token = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60)
    near = st.sampled_from([KEY.upper(), KEY[:-1], KEY + "0", KEY[1:], KEY * 2, ""])
    scheme = st.sampled_from(["Bearer", "bearer", "Basic", "Token", ""])
    header = st.builds(lambda s, t: f"{s} {t}".strip(), scheme, token | near)
    wrong = header.filter(lambda h: h.partition(" ")[2].strip() != KEY)
    return st.one_of(st.just({}), wrong.map(lambda h: {"Authorization": h}))


# -- the tests ---------------------------------------------------------------------------------


def test_without_a_valid_key_every_route_answers_401_and_reaches_nothing(stack, tally):
    last_id = stack.served.last_request_id()
    audited = len(stack.stores.audit.entries(1000))

    @examples(150)
    @given(
        headers=wrong_credentials(),
        route=st.sampled_from([COMPLETIONS, "v1/feedback", "v1/models"]),
        body=st.sampled_from(
            [
                {"messages": [user("What is sprbot?")]},
                {"messages": [user("/faq add q | a")]},
                {"id": "chatcmpl-x", "rating": "up"},
            ]
        )
        | json_values,
    )
    def send(headers: dict[str, str], route: str, body: Any) -> None:
        tally["web: no or wrong key"] += 1
        url = stack.url + route
        if route == "v1/models":
            response = stack.http.get(url, headers=headers)
        else:
            response = stack.http.post(url, content=json.dumps(body).encode(), headers=headers)
        assert response.status_code == 401, (headers, route, response.text)
        assert openai_error(response, "authentication_error")["code"] == "invalid_api_key"
        assert KEY not in response.text

    send()
    assert stack.served.last_request_id() == last_id, "a request without a key reached the bus"
    assert len(stack.stores.audit.entries(1000)) == audited  # no command ran
    assert not stack.tracebacks.records, stack.tracebacks.summary()
    stack.answers_a_question()


def test_malformed_requests_get_400_or_413_saying_why_and_reach_nothing(stack, tally):
    last_id = stack.served.last_request_id()
    seen: set[str] = set()

    @examples(400)
    @given(request=malformed())
    def send(request: tuple[str, bytes, int]) -> None:
        kind, body, status = request
        tally["web: malformed completion"] += 1
        seen.add(kind)
        response = stack.post(COMPLETIONS, body)
        assert response.status_code == status, (kind, body[:300], response.text[:300])
        openai_error(response, "invalid_request_error")

    send()
    assert seen == {"bytes", "json", *DEFECTS}, {"bytes", "json", *DEFECTS} - seen
    assert stack.served.last_request_id() == last_id, "a malformed request reached the bus"
    assert not stack.tracebacks.records, stack.tracebacks.summary()
    stack.answers_a_question()


def test_malformed_feedback_gets_400_and_unknown_answers_404(stack, tally):
    state = {k: stack.bus.redis.dump(k) for k in stack.bus.redis.scan_iter("sprbot:faq:*")}

    @examples(100)
    @given(
        body=st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"id": json_values | st.text(max_size=250), "rating": json_values},
            ),
            st.fixed_dictionaries(
                {
                    "id": (st.text(min_size=1, max_size=190) | odd_text | lone_surrogates).map(
                        lambda t: "chatcmpl-" + t
                    ),
                    "rating": st.sampled_from(["up", "down"]),
                }
            ),
        )
    )
    def send(body: Any) -> None:
        tally["web: malformed feedback"] += 1
        response = stack.post("v1/feedback", body)
        well_formed = (
            isinstance(body, dict)
            and isinstance(body.get("id"), str)
            and 0 < len(body["id"]) <= 200
            and not any("\ud800" <= c <= "\udfff" for c in body["id"])
            and body.get("rating") in ("up", "down")
        )
        assert response.status_code == (404 if well_formed else 400), (body, response.text)
        openai_error(response, "invalid_request_error")

    send()
    after = {k: stack.bus.redis.dump(k) for k in stack.bus.redis.scan_iter("sprbot:faq:*")}
    assert after == state, "feedback on no answer changed the FAQ store"
    assert not stack.tracebacks.records, stack.tracebacks.summary()


def test_a_body_over_the_limit_gets_413_announced_or_not(stack, tally):
    last_id = stack.served.last_request_id()

    @examples(20)
    @given(size=st.integers(MAX_BODY_BYTES + 1, 1 << 40))
    def announced(size: int) -> None:
        tally["web: oversized body"] += 1
        head = {
            "Authorization": f"Bearer {KEY}",
            "Content-Type": "application/json",
            "Content-Length": str(size),
        }
        assert raw_post(stack.port, f"/{COMPLETIONS}", head, b"{") == 413

    announced()

    # Sent in chunks without a length: counted as it arrives. Huge ``messages``, well-formed.
    @examples(5)
    @given(turns=st.integers(MAX_BODY_BYTES // 40, MAX_BODY_BYTES // 10))
    def streamed(turns: int) -> None:
        tally["web: oversized body"] += 1
        body = json.dumps({"messages": [user(f"question {i}") for i in range(turns)]}).encode()
        assert len(body) > MAX_BODY_BYTES

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), 1 << 16):
                yield body[start : start + (1 << 16)]

        headers = {"Authorization": f"Bearer {KEY}"}
        response = stack.http.post(stack.url + COMPLETIONS, content=chunks(), headers=headers)
        assert response.status_code == 413, response.text[:300]
        assert "body is over" in openai_error(response, "invalid_request_error")["message"]

    streamed()
    assert stack.served.last_request_id() == last_id
    assert not stack.tracebacks.records, stack.tracebacks.summary()
    stack.answers_a_question()


def test_odd_but_valid_requests_are_answered(stack, tally):
    dead = stack.bus.redis.xlen(DEAD)

    @examples(25)
    @given(body=answerable())
    # Found by this test: a temperature so small that logits / temperature overflowed (500).
    @example(body={"messages": [{"role": "user", "content": "0"}], "temperature": 3.9e-74})
    def send(body: dict[str, Any]) -> None:
        tally["web: odd but valid"] += 1
        response = stack.post(COMPLETIONS, body)
        assert response.status_code == 200, (body, response.text[:300])
        if body.get("stream"):
            lines = [line for line in response.text.splitlines() if line]
            assert lines[-1] == "data: [DONE]" and '"error"' not in response.text, lines[-3:]
        else:
            assert response.json()["object"] == "chat.completion"

    send()
    stack.served.quiet()
    assert stack.bus.redis.xlen(DEAD) == dead  # every request it queued was readable
    assert not stack.tracebacks.records, stack.tracebacks.summary()
    stack.answers_a_question()
