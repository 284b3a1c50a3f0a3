"""Hostile requests at the Slack adapter's ``/slack/events``: the real slack-bolt app over HTTP
(HTTP mode, signing secret), a stand-in of Slack's Web API, and the shared inference worker.

- Without a valid signature (none, forged, for another body, stale or future timestamp)
  every request gets 401, whatever its body, and nothing happens.
- Signed but malformed (random JSON, events with fields of the wrong type, unknown event
  types, odd commands and interactions): never a 5xx and never a traceback in the log;
  events get 200 (Slack retries anything else, and turns off an app that keeps failing).
  Every request that reaches the bus is one the worker can read.
- Bodies over the limit get 413, bodies that are not UTF-8 or have no valid length 400,
  before the body is read; a message over the text limit gets the user a clear refusal.
- Afterwards the adapter still answers a DM.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import logging
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fuzzing import Tracebacks, examples, raw_post, wait_for
from hypothesis import given
from hypothesis import strategies as st
from standins import AdapterThreads
from standins.slack_api import SlackAPI, SlackSender, event_callback

from adapters.slack import FEEDBACK_UP, MAX_BODY_BYTES, SlackAdapter
from bot.bus import DEAD, Bus
from bot.commands import Stores
from bot.config import Settings
from bot.connection import connect
from bot.memory import ConversationMemory

SECRET = "fuzz-signing-secret-0123456789"
TEAM = "T0TEAM"
ADMIN = "U0ADMIN"
EVENTS_PATH = "/slack/events"

_ts = itertools.count(1)


def new_ts() -> str:
    return f"{int(time.time())}.{next(_ts):06d}"


def dm(text: str, channel: str, user: str = "U0USER") -> dict:
    ts = new_ts()
    return {
        "type": "message",
        "channel": channel,
        "channel_type": "im",
        "user": user,
        "text": text,
        "ts": ts,
        "event_ts": ts,
    }


@dataclass
class Stack:
    slack: SlackAPI
    sender: SlackSender
    port: int
    bus: Bus
    served: object
    tracebacks: Tracebacks

    def answers_a_dm(self) -> None:
        """The adapter (and the worker behind it) still answer: a DM gets its final answer."""
        channel = "D" + uuid.uuid4().hex[:8].upper()
        status, _ = self.sender.event(dm("Are you still there?", channel))
        assert status == 200

        def finished():
            return [m for m in self.slack.in_channel(channel) if FEEDBACK_UP in m.action_ids()]

        wait_for(finished, "the answer to a DM", timeout=60, alive=self.served.alive)

    def nothing_reached_the_bus_since(self, last_id: str) -> None:
        assert self.served.last_request_id() == last_id, "a refused request reached the bus"


@pytest.fixture(scope="module")
def stack_for_module(served) -> Iterator[Stack]:
    tracebacks = Tracebacks()
    logging.getLogger().addHandler(tracebacks)
    threads = AdapterThreads()
    with SlackAPI() as slack:
        settings = Settings(
            _env_file=None,
            redis_url=served.redis_url,
            data_dir=served.data_dir,
            slack_bot_token=slack.token,
            slack_signing_secret=SECRET,
            slack_api_url=slack.url,
            slack_admins=[ADMIN],
            faq_embeddings="off",
        )
        bus = Bus(connect(settings), max_text_chars=settings.max_text_chars)
        adapter = SlackAdapter(
            settings,
            bus,
            ConversationMemory(bus.redis),
            stores=Stores.build(settings, bus.redis),
            edit_interval_s=0.05,
            consumer="fuzz-slack",
        )
        port = threads.start(adapter, "slack-adapter")
        sender = SlackSender(f"http://127.0.0.1:{port}{EVENTS_PATH}", SECRET, TEAM)
        try:
            yield Stack(slack, sender, port, bus, served, tracebacks)
        finally:
            threads.stop_all()
            logging.getLogger().removeHandler(tracebacks)


@pytest.fixture
def stack(stack_for_module: Stack) -> Stack:
    stack_for_module.tracebacks.records.clear()  # each test answers for its own
    return stack_for_module


# -- what is sent ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=16,
)
EVENT_TYPES = ["message", "app_mention", "reaction_added", "app_home_opened", "team_join"]
KINDS = ["event", "unknown event", "deep", "envelope", "json", "command", "interaction"]
event_fields = st.sampled_from(
    ["type", "subtype", "channel", "channel_type", "user", "text", "ts", "thread_ts",
     "event_ts", "bot_id", "user_profile", "files", "blocks"]
)  # fmt: skip


@st.composite
def mutated_events(draw) -> dict:
    """A DM or mention, with fields removed, given values of any type, or added."""
    text = draw(st.text(max_size=60) | st.sampled_from(["\ud83d", "a\udc00b", "\x00", "<@U0BOT>"]))
    event = dm(text, "D" + draw(st.sampled_from(["FUZZ1", "FUZZ2"])))
    if draw(st.booleans()):
        event["type"] = draw(st.sampled_from(EVENT_TYPES) | st.text(max_size=20))
    for name in draw(st.lists(event_fields, max_size=4)):
        if draw(st.booleans()):
            event.pop(name, None)
        else:
            event[name] = draw(json_values)
    return event


@st.composite
def signed_bodies(draw) -> tuple[str, str, str]:
    """(what it is, body, content type): everything a signed request could carry."""
    kind = draw(st.sampled_from(KINDS))
    if kind == "event":
        body = event_callback(draw(mutated_events()), TEAM, f"Ev{uuid.uuid4().hex[:10]}")
        return kind, json.dumps(body), "application/json"
    if kind == "unknown event":  # well formed, of a type the adapter has no listener for
        event = draw(st.dictionaries(st.sampled_from(["user", "text", "x"]), st.text(max_size=9)))
        event["type"] = draw(st.text(max_size=20).filter(lambda t: t not in EVENT_TYPES[:2]))
        return kind, json.dumps(event_callback(event, TEAM, "Ev1")), "application/json"
    if kind == "deep":  # nesting deeper than any parser's recursion limit
        depth = draw(st.integers(1_000, 200_000))
        return kind, '{"event": ' + "[" * depth + "]" * depth + "}", "application/json"
    if kind == "envelope":  # the callback's own fields mutated
        body = event_callback(dm("hi", "DFUZZ3"), TEAM, "Ev2")
        for name in draw(st.lists(st.sampled_from(sorted(body)), max_size=3)):
            body[name] = draw(json_values)
        return kind, json.dumps(body), "application/json"
    if kind == "json":
        return kind, json.dumps(draw(json_values)), "application/json"
    form = draw(
        st.dictionaries(
            st.sampled_from(["command", "text", "user_id", "channel_id", "team_id", "x"]),
            st.text(max_size=40),
        )
    )
    if kind == "command":
        form.setdefault("command", draw(st.sampled_from(["/faq", "/sprbot", "/model", "/x"])))
        return kind, urllib.parse.urlencode(form), "application/x-www-form-urlencoded"
    payload = draw(
        st.dictionaries(
            st.sampled_from(["type", "user", "actions", "view", "trigger_id"]), json_values
        )
    )
    form["payload"] = draw(st.sampled_from([json.dumps(payload), draw(st.text(max_size=30))]))
    return kind, urllib.parse.urlencode(form), "application/x-www-form-urlencoded"


any_bodies = st.one_of(
    signed_bodies().map(lambda b: b[1:]),
    st.text(max_size=200).map(lambda t: (t, "text/plain")),
)

# How a request can fail Slack's signature check (https://api.slack.com/authentication/verifying-requests-from-slack).
forgeries = st.sampled_from(
    ["no headers", "forged", "other secret", "other body", "stale", "future", "not a number",
     "empty", "other version"]
)  # fmt: skip


def forge(sender: SlackSender, how: str, body: str) -> dict:
    """``post`` keyword arguments that make the request fail verification ``how``."""
    now = int(time.time())
    sign = sender.verifier.generate_signature
    if how == "no headers":
        return {"headers": {"X-Slack-Signature": "", "X-Slack-Request-Timestamp": ""}}
    if how == "forged":
        return {"signature": "v0=" + uuid.uuid4().hex * 2}
    if how == "other secret":
        other = SlackSender(sender.endpoint, SECRET + "x").verifier
        return {"signature": other.generate_signature(timestamp=str(now), body=body)}
    if how == "other body":
        return {"signature": sign(timestamp=str(now), body=body + " ")}
    if how in ("stale", "future"):
        when = now - 6 * 60 if how == "stale" else now + 6 * 60
        return {"timestamp": when, "signature": sign(timestamp=str(when), body=body)}
    if how == "not a number":
        return {"headers": {"X-Slack-Request-Timestamp": "soon"}}
    if how == "empty":
        return {"signature": "v0="}
    return {"signature": sign(timestamp=str(now), body=body).replace("v0=", "v1=")}


# -- the tests ---------------------------------------------------------------------------------


def test_without_a_valid_signature_every_request_gets_401_and_changes_nothing(stack, tally):
    last_id = stack.served.last_request_id()
    calls = len(stack.slack.calls)

    @examples(150)
    @given(body=any_bodies, how=forgeries)
    def send(body: tuple[str, str], how: str) -> None:
        tally["slack: unsigned or forged"] += 1
        text, content_type = body
        status, _ = stack.sender.post(text, content_type, **forge(stack.sender, how, text))
        assert status == 401, (how, text[:200])

    send()
    time.sleep(0.5)  # a listener that wrongly ran would have posted by now
    stack.nothing_reached_the_bus_since(last_id)
    assert stack.slack.calls[calls:] == []  # not a placeholder, not an answer
    assert not stack.tracebacks.records, stack.tracebacks.summary()
    stack.answers_a_dm()


def test_signed_garbage_never_gets_a_5xx_and_events_are_acknowledged(stack, tally):
    dead = stack.bus.redis.xlen(DEAD)
    seen: set[str] = set()

    @examples(300)
    @given(body=signed_bodies())
    def send(body: tuple[str, str, str]) -> None:
        tally["slack: signed garbage"] += 1
        kind, text, content_type = body
        seen.add(kind)
        status, answer = stack.sender.post(text, content_type)
        assert status in (200, 400, 404), (status, answer, text[:300])
        if kind == "unknown event":
            assert status == 200, (status, answer, text[:300])  # else Slack retries it

    send()
    assert seen == set(KINDS)
    stack.answers_a_dm()  # after it, everything sent before has been handled
    stack.served.quiet()
    # Every request the adapter put on the bus was one the worker could read.
    assert stack.bus.redis.xlen(DEAD) == dead
    assert not stack.tracebacks.records, stack.tracebacks.summary()


def test_huge_bodies_bad_lengths_and_invalid_utf8_are_refused_before_reading(stack, tally):
    last_id = stack.served.last_request_id()
    now = str(int(time.time()))

    @examples(60)
    @given(
        size=st.integers(MAX_BODY_BYTES + 1, 1 << 40),
        length=st.sampled_from(["-1", "abc", "1e3", "0x10", "１２", "+5"]),
        junk=st.binary(min_size=1, max_size=200),
    )
    def send(size: int, length: str, junk: bytes) -> None:
        tally["slack: oversized or malformed body"] += 3
        head = {"Content-Type": "application/json", "X-Slack-Request-Timestamp": now}
        # Over the limit: refused from its Content-Length, before a byte of it is read.
        assert raw_post(stack.port, EVENTS_PATH, {**head, "Content-Length": str(size)}, b"{") == 413
        assert raw_post(stack.port, EVENTS_PATH, {**head, "Content-Length": length}, b"{}") == 400
        # Not UTF-8 (a lone continuation byte makes sure of it), even with a valid signature.
        body = b"\x80" + junk
        mac = hmac.new(SECRET.encode(), f"v0:{now}:".encode() + body, hashlib.sha256)
        sig = "v0=" + mac.hexdigest()
        head = {**head, "Content-Length": str(len(body)), "X-Slack-Signature": sig}
        assert raw_post(stack.port, EVENTS_PATH, head, body) == 400

    send()
    stack.nothing_reached_the_bus_since(last_id)
    assert not stack.tracebacks.records, stack.tracebacks.summary()
    stack.answers_a_dm()


def test_a_message_over_the_text_limit_is_refused_in_words_and_never_queued(stack, tally):
    last_id = stack.served.last_request_id()
    channel = "DLONG" + uuid.uuid4().hex[:6].upper()
    sizes = []

    @examples(10)
    @given(size=st.integers(4001, 200_000))
    def send(size: int) -> None:
        tally["slack: oversized text"] += 1
        status, _ = stack.sender.event(dm("x" * size, channel))
        assert status == 200
        sizes.append(size)

    send()

    def refusals():
        shown = [m.section_text() for m in stack.slack.in_channel(channel)]
        if len(shown) == len(sizes) and all("over the limit of 4,000" in s for s in shown):
            return shown
        return None

    wait_for(refusals, "a refusal for each message", alive=stack.served.alive)
    stack.nothing_reached_the_bus_since(last_id)
    stack.answers_a_dm()
