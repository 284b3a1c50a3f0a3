"""The Slack adapter end to end: the real slack-bolt app over HTTP, signed requests, a local
stand-in of Slack's Web API (``standins/slack_api.py``), real Redis, and a real inference
worker on the tiny model.

Tests that take the ``live`` fixture share one worker (module scope: loading the model is
the slow part). Tests that need an answer with known content (a 10,000-character one, an
error) take ``offline``: a Redis of their own without a worker, and they answer through the
bus as a worker does.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import rq
import yaml
from processes import sprbot_exe, start_inference_worker, stop
from slack_sdk import WebClient
from standins import AdapterThreads
from standins.slack_api import SlackAPI, SlackSender, SocketModeServer, event_callback

from adapters.slack import (
    FEEDBACK_DOWN,
    FEEDBACK_UP,
    PLACEHOLDER,
    TYPING,
    ReplyPump,
    SlackAdapter,
    conversation_key,
    from_slack,
    to_mrkdwn,
)
from bot.audit import AUDIT
from bot.bus import FAILED_MESSAGE, REQUESTS, Bus
from bot.commands import COMMANDS, Stores
from bot.config import Settings
from bot.connection import EmbeddedRedis, connect
from bot.memory import ConversationMemory
from bot.schemas import ChatRequest, FinalEvent, ProgressEvent, request_id
from training.jobs import TrainingQueue

ROOT = Path(__file__).resolve().parents[1]
SECRET = "standin-signing-secret-0123456789"
TEAM = "T0TEAM"
ADMIN, USER = "U0ADMIN", "U0USER"
EDIT_INTERVAL_S = 0.1  # Slack wants ~1 s; shorter here so a short answer still shows edits
# Slack's own slash commands: a command of the app must not take one of these names.
SLACK_BUILT_INS = {
    "/active", "/away", "/archive", "/call", "/collapse", "/dm", "/dnd", "/expand", "/feed",
    "/invite", "/join", "/kick", "/leave", "/me", "/msg", "/mute", "/open", "/prefs",
    "/remind", "/remove", "/rename", "/search", "/shortcuts", "/shrug", "/star", "/status",
    "/topic", "/who",
}  # fmt: skip

_ts = itertools.count(1)


def new_ts() -> str:
    """A Slack message ts, unique within the run."""
    return f"{int(time.time())}.{next(_ts):06d}"


def new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:8].upper()


def dm(text: str, channel: str, *, user: str = USER, ts: str | None = None, **extra) -> dict:
    ts = ts or new_ts()
    return {
        "type": "message",
        "channel": channel,
        "channel_type": "im",
        "user": user,
        "text": text,
        "ts": ts,
        "event_ts": ts,
        **extra,
    }


def in_channel(text: str, channel: str, *, user: str = USER, ts: str | None = None, **extra):
    return dm(text, channel, user=user, ts=ts, channel_type="channel", **extra)


def mention(text: str, channel: str, *, ts: str, user: str = USER, **extra) -> dict:
    return {
        "type": "app_mention",
        "channel": channel,
        "user": user,
        "text": f"<@U0BOT> {text}",
        "ts": ts,
        "event_ts": ts,
        **extra,
    }


@dataclass
class Stack:
    """One running adapter and what a test looks at."""

    slack: SlackAPI
    sender: SlackSender | None  # None in Socket Mode
    bus: Bus
    memory: ConversationMemory
    stores: Stores
    settings: Settings

    def answer(self, conversation: str, question: str, timeout: float = 60) -> str:
        """The model's answer to ``question``, as the worker recorded it in memory."""

        def found():
            turns = self.memory.turns(conversation)
            for asked, answered in zip(turns[::2], turns[1::2], strict=False):
                if asked["content"] == question:
                    return answered
            return None

        return self.slack.wait_for(found, timeout, f"the answer to {question!r}")["content"]

    def finished(self, channel: str, count: int = 1, timeout: float = 60):
        """Wait until ``count`` answers in ``channel`` carry their feedback buttons."""

        def done():
            messages = self.slack.in_channel(channel)
            finals = [m for m in messages if FEEDBACK_UP in m.action_ids()]
            return messages if len(finals) >= count else None

        return self.slack.wait_for(done, timeout, f"{count} finished answer(s) in {channel}")


def make_settings(slack: SlackAPI, redis_url: str, data_dir: Path, **overrides) -> Settings:
    values = dict(
        redis_url=redis_url,
        data_dir=data_dir,
        slack_bot_token=slack.token,
        slack_signing_secret=SECRET,
        slack_api_url=slack.url,
        slack_admins=[ADMIN],
        faq_embeddings="off",
    )
    return Settings(_env_file=None, **{**values, **overrides})


@pytest.fixture
def run_adapter():
    """Start SlackAdapters in this process (HTTP on a free port, or Socket Mode when the
    settings have an app token); stop them after the test."""
    threads = AdapterThreads()

    def start(slack: SlackAPI, settings: Settings) -> Stack:
        bus = Bus(
            connect(settings),
            max_backlog=settings.max_backlog,
            max_text_chars=settings.max_text_chars,
        )
        memory = ConversationMemory(bus.redis, ttl_s=settings.memory_ttl_s)
        stores = Stores.build(settings, bus.redis, training=TrainingQueue(bus.redis, settings))
        adapter = SlackAdapter(
            settings,
            bus,
            memory,
            stores=stores,
            edit_interval_s=EDIT_INTERVAL_S,
            consumer=new_id("test-"),
        )
        port = threads.start(adapter, "slack-adapter")  # None: Socket Mode
        sender = (
            SlackSender(f"http://127.0.0.1:{port}/slack/events", SECRET, TEAM) if port else None
        )
        return Stack(slack, sender, bus, memory, stores, settings)

    yield start
    threads.stop_all()


@pytest.fixture
def slack():
    with SlackAPI() as api:
        yield api


@dataclass
class Served:
    data_dir: Path
    redis_url: str


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """Redis and one real inference worker on the tiny model, for the module's live tests."""
    data_dir = tmp_path_factory.mktemp("slack-live") / "data"
    server = EmbeddedRedis(data_dir)
    url = server.ensure_running()
    env = {
        **os.environ,
        "SPRBOT_DATA_DIR": str(data_dir),
        "SPRBOT_REDIS_URL": url,
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "32",
        "SPRBOT_LOG_LEVEL": "WARNING",
        "SPRBOT_FAQ_EMBEDDINGS": "off",
    }
    worker = start_inference_worker(env, url)
    try:
        yield Served(data_dir, url)
    finally:
        stop(worker)
        server.stop()


@pytest.fixture
def live(served, slack, run_adapter) -> Stack:
    return run_adapter(slack, make_settings(slack, served.redis_url, served.data_dir))


@pytest.fixture
def offline(data_dir, embedded_redis, slack, run_adapter):
    """An adapter on a Redis of its own, with no worker: the test answers through the bus."""

    def start(**overrides) -> Stack:
        settings = make_settings(slack, embedded_redis.url, data_dir, **overrides)
        return run_adapter(slack, settings)

    return start


def play_worker(bus: Bus, answer, timeout: float = 30) -> list[str]:
    """Take the requests waiting on the bus and end each with ``answer(delivery)``: a string
    (streamed as two deltas, then final) or an exception (the request fails)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deliveries = bus.read_requests("test-worker", block_ms=200)
        if not deliveries:
            continue
        for delivery in deliveries:
            result = answer(delivery)
            if isinstance(result, Exception):
                bus.fail(delivery, "failed", FAILED_MESSAGE)
                continue
            half = len(result) // 2
            bus.emit(delivery.delta(result[:half]))
            time.sleep(EDIT_INTERVAL_S * 2)
            bus.emit(delivery.delta(result[half:]))
            bus.finish(delivery, result)
        return [d.request.id for d in deliveries]
    raise AssertionError("no request reached the bus")


# -- answering ---------------------------------------------------------------------------------


def test_a_dm_gets_a_placeholder_then_paced_edits_and_the_final_text(live):
    channel, question = new_id("D"), "What is sprbot?"
    started = time.monotonic()
    status, _ = live.sender.event(dm(question, channel))
    assert status == 200 and time.monotonic() - started < 3  # acknowledged within Slack's 3 s
    (message,) = live.finished(channel)
    final = live.answer(conversation_key(TEAM, channel, None), question)
    assert message.thread_ts is None  # a DM is answered in place, not in a thread
    assert message.versions[0] == PLACEHOLDER
    assert any(v.endswith(TYPING) for v in message.versions[1:-1]), message.versions
    assert message.versions[-1] == to_mrkdwn(final)
    assert message.action_ids() == [FEEDBACK_UP, FEEDBACK_DOWN]
    edits = [c.at for c in live.slack.calls_to("chat.update") if c.args["ts"] == message.ts]
    assert all(b - a >= EDIT_INTERVAL_S * 0.9 for a, b in itertools.pairwise(edits))


def test_a_mention_is_answered_in_its_thread_and_a_follow_up_there_carries_the_context(live):
    channel, root = new_id("C"), new_ts()
    live.sender.event(mention("Who are you?", channel, ts=root))
    (first,) = live.finished(channel)
    conversation = conversation_key(TEAM, channel, root)
    answer = live.answer(conversation, "Who are you?")
    # Streamed into the thread, where this workspace supports it.
    assert first.thread_ts == root and first.streamed and not first.streaming
    assert first.text == answer
    assert live.slack.calls_to("chat.appendStream")

    # A later message in that thread, without a mention, is answered there too, with the
    # thread's history as its context.
    live.sender.event(in_channel("And what can you do?", channel, thread_ts=root))
    messages = live.finished(channel, count=2)
    assert [m.thread_ts for m in messages] == [root, root]
    live.answer(conversation, "And what can you do?")
    turns = [t["content"] for t in live.memory.turns(conversation)]
    assert turns[0] == "Who are you?" and turns[2] == "And what can you do?"
    assert turns[1] == answer and len(turns) == 4


def test_without_streaming_methods_a_thread_answer_falls_back_to_chat_update(live):
    live.slack.streaming = False  # this workspace does not have chat.startStream
    channel = new_id("C")
    roots = [new_ts(), new_ts()]
    for i, root in enumerate(roots):
        live.sender.event(mention(f"Question {i}?", channel, ts=root))
        live.finished(channel, count=i + 1)
    messages = live.slack.in_channel(channel)
    assert [m.thread_ts for m in messages] == roots
    for i, (message, root) in enumerate(zip(messages, roots, strict=True)):
        final = live.answer(conversation_key(TEAM, channel, root), f"Question {i}?")
        assert not message.streamed and message.versions[0] == PLACEHOLDER
        assert message.versions[-1] == to_mrkdwn(final)
    assert len(live.slack.calls_to("chat.startStream")) == 1  # refused once, then not asked


def test_the_same_event_delivered_three_times_gets_one_reply(live):
    channel, question = new_id("D"), "Are you there?"
    event, event_id = dm(question, channel), new_id("Ev")
    with ThreadPoolExecutor(3) as pool:  # Slack's retries, racing the first delivery
        statuses = list(
            pool.map(lambda n: live.sender.event(event, event_id=event_id, retry=n)[0], range(3))
        )
    assert statuses == [200, 200, 200]
    live.finished(channel)
    live.answer(conversation_key(TEAM, channel, None), question)
    time.sleep(1.5)  # room for a second reply, if one were coming
    assert len(live.slack.in_channel(channel)) == 1
    assert len(live.memory.turns(conversation_key(TEAM, channel, None))) == 2


def test_a_mention_delivered_as_app_mention_and_as_message_gets_one_reply(live):
    # bolt-python #941: Slack sends both events, with different event ids, for one mention.
    channel, ts = new_id("C"), new_ts()
    text = "Hello there"
    events = [mention(text, channel, ts=ts), in_channel(f"<@U0BOT> {text}", channel, ts=ts)]
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(lambda e: live.sender.event(e)[0], events))
    assert statuses == [200, 200]
    live.finished(channel)
    live.answer(conversation_key(TEAM, channel, ts), text)
    time.sleep(1.5)
    assert len(live.slack.in_channel(channel)) == 1
    assert len(live.memory.turns(conversation_key(TEAM, channel, ts))) == 2


def test_a_429_with_retry_after_is_honoured_and_the_final_text_still_arrives(live):
    live.slack.rate_limit("chat.postMessage", times=1, retry_after=1)
    live.slack.rate_limit("chat.update", times=1, retry_after=2)
    channel, question = new_id("D"), "Tell me more."
    live.sender.event(dm(question, channel))
    (message,) = live.finished(channel, timeout=90)
    final = live.answer(conversation_key(TEAM, channel, None), question)
    assert message.versions[-1] == to_mrkdwn(final)
    for method, wait in (("chat.postMessage", 1), ("chat.update", 2)):
        calls = live.slack.calls_to(method)
        limited = [c for c in calls if c.status == 429]
        assert len(limited) == 1
        later = [c for c in calls if c.at > limited[0].at]
        assert later and later[0].at - limited[0].at >= wait * 0.95, method


# -- the edge ----------------------------------------------------------------------------------


def test_a_bad_signature_or_a_stale_timestamp_gets_401_and_reaches_nothing(offline):
    stack = offline()
    body = json.dumps(
        {
            "team_id": TEAM,
            "type": "event_callback",
            "event_id": "Ev1",
            "event": dm("hi", "D0SIG"),
        }
    )
    sign = stack.sender.verifier.generate_signature
    now, stale = int(time.time()), int(time.time()) - 6 * 60
    tries = {
        "forged": {"signature": "v0=" + "0" * 64},
        "signed for another body": {"signature": sign(timestamp=str(now), body=body + " ")},
        "stale": {"timestamp": stale, "signature": sign(timestamp=str(stale), body=body)},
    }
    for name, kw in tries.items():
        status, _ = stack.sender.post(body, "application/json", **kw)
        assert status == 401, name
    time.sleep(0.5)
    assert stack.bus.redis.xlen(REQUESTS) == 0
    assert not [c for c in stack.slack.calls if c.method != "auth.test"]
    # The same request, signed now, does get through: the refusals above were the signature's.
    assert stack.sender.post(body, "application/json")[0] == 200
    stack.slack.wait_for(lambda: stack.bus.redis.xlen(REQUESTS) == 1, 10, "the request")


def test_it_ignores_itself_other_bots_edits_deletions_and_talk_not_addressed_to_it(offline):
    stack = offline()
    channel, thread = new_id("C"), new_ts()
    ignored = [
        dm("my own answer", "D0X", user="U0BOT"),
        dm("a bot's message", "D0X", bot_id="B0OTHER"),
        dm("", "D0X", subtype="message_changed", message={"text": "edited"}),
        dm("", "D0X", subtype="message_deleted"),
        dm("joined", "D0X", subtype="channel_join"),
        in_channel("chatter nobody addressed to the bot", channel),
        in_channel("a thread the bot is not in", channel, thread_ts=thread),
    ]
    for event in ignored:
        assert stack.sender.event(event)[0] == 200
    stack.sender.event(dm("a person asking", "D0ASK"))  # the control: this one is answered
    stack.slack.wait_for(lambda: stack.bus.redis.xlen(REQUESTS) == 1, 10, "the request")
    time.sleep(0.5)  # room for any late listener
    assert stack.bus.redis.xlen(REQUESTS) == 1
    calls = [c for c in stack.slack.calls if c.method != "auth.test"]
    assert [(c.method, c.args["channel"]) for c in calls] == [("chat.postMessage", "D0ASK")]


# -- what users see when it goes wrong ---------------------------------------------------------


def test_users_see_busy_too_long_and_failure_messages_and_never_a_stack_trace(offline):
    stack = offline(max_backlog=1)
    first, second, third = new_id("D"), new_id("D"), new_id("D")
    stack.sender.event(dm("first question", first))
    stack.slack.wait_for(lambda: stack.bus.redis.xlen(REQUESTS) == 1, 10, "the first request")
    stack.sender.event(dm("second question", second))  # the backlog is full: busy
    stack.sender.event(dm("x" * 4500, third))  # over SPRBOT_MAX_TEXT_CHARS (4000)

    def shown(channel):
        def final():
            messages = stack.slack.in_channel(channel)
            return messages and ":warning:" in messages[0].versions[-1] and messages[0]

        return stack.slack.wait_for(final, 30, f"the error in {channel}").versions[-1]

    assert shown(second).startswith(":warning: Sorry, I'm busy right now.")
    assert shown(third).startswith(
        ":warning: Your message is 4,500 characters long, over the limit of 4,000."
    )
    play_worker(stack.bus, lambda d: RuntimeError("the model crashed"))  # the first fails
    assert shown(first) == ":warning: Sorry, something went wrong — the admins have been told."
    for message in stack.slack.messages.values():
        assert not message.action_ids()  # no feedback buttons under an error
        assert "Traceback" not in message.text


def test_a_10000_character_answer_arrives_as_several_messages_within_limits(offline):
    stack = offline()
    code = "\n".join(f"    total += step({i})  # accumulate" for i in range(110))
    paragraphs = [f"**Part {i}.** " + "The *quick* brown fox & friends. " * 18 for i in range(14)]
    long_answer = (
        "\n\n".join(paragraphs[:7])
        + f"\n\n```python\ndef run():\n{code}\n```\n\n"
        + "\n\n".join(paragraphs[7:])
    )
    assert len(long_answer) >= 10_000
    dm_channel, thread_channel, root = new_id("D"), new_id("C"), new_ts()
    stack.sender.event(dm("Explain everything.", dm_channel))
    stack.sender.event(mention("Explain everything.", thread_channel, ts=root))
    answered = set()
    while len(answered) < 2:
        answered.update(play_worker(stack.bus, lambda d: long_answer))

    for channel in (dm_channel, thread_channel):
        messages = stack.finished(channel)
        assert len(messages) >= 4
        for message in messages:
            assert len(message.text) <= 40_000 and len(message.blocks) <= 50
            sections = [b for b in message.blocks if b["type"] == "section"]
            assert all(len(s["text"]["text"]) <= 3000 for s in sections)
            assert message.section_text().count("```") % 2 == 0  # no code block cut open
        assert [bool(m.action_ids()) for m in messages] == [False] * (len(messages) - 1) + [True]

        # Nothing lost or reordered: the same text, give or take whitespace at the cuts and
        # the fences that reopen a code block cut in two.
        def content(text: str) -> str:
            return "".join(text.replace("```", "").split())

        shown = "".join(m.section_text() for m in messages)
        assert content(shown) == content(to_mrkdwn(long_answer))
    # In the thread the answer began as a stream, and went on as ordinary messages.
    threaded = stack.slack.in_channel(thread_channel)
    assert threaded[0].streamed and {m.thread_ts for m in threaded} == {root}


def test_a_report_with_no_placeholder_is_posted_as_a_new_message(offline, tmp_path):
    # What a training job sends the admin who started it: a final event on the slack reply
    # stream, with where to post it but no message to edit, and its loss curve attached.
    stack = offline()
    chart = tmp_path / "loss.png"
    chart.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    where = {
        "request_id": request_id("test", "report", new_ts()),
        "channel": "slack",
        "reply_to": {"channel": "C0OPS", "thread_ts": "1700000000.000100"},
        "attempt": 1,
    }
    stack.bus.emit(ProgressEvent(seq=1, text="Training: step 3 of 10", **where))
    stack.slack.wait_for(lambda: stack.slack.in_channel("C0OPS"), 10, "the progress message")
    final = FinalEvent(
        seq=2, text="Training **done**: v2 promoted.", attachments=[str(chart)], **where
    )
    assert stack.bus.announce(final)
    (message,) = stack.finished("C0OPS")  # one message, edited from progress to the result
    assert message.thread_ts == "1700000000.000100"
    assert message.versions == [
        f"{PLACEHOLDER} _Training: step 3 of 10_",
        "Training *done*: v2 promoted.",
    ]
    stack.slack.wait_for(
        lambda: any(u.get("channel") for u in stack.slack.uploads.values()), 10, "the upload"
    )
    (upload,) = stack.slack.uploads.values()  # the chart, whole, in the report's thread
    assert upload["data"] == chart.read_bytes() and upload["title"] == "loss.png"
    assert (upload["channel"], upload["thread"]) == ("C0OPS", "1700000000.000100")


def test_a_final_read_by_a_replica_that_died_is_shown_by_another_once(
    data_dir, embedded_redis, slack
):
    settings = make_settings(slack, embedded_redis.url, data_dir)
    bus = Bus(connect(settings))
    client = WebClient(token=slack.token, base_url=slack.url)
    channel = new_id("D")
    placeholder = client.chat_postMessage(channel=channel, text=PLACEHOLDER)["ts"]
    reply_to = {"channel": channel, "ts": placeholder, "thread_ts": None, "mode": "update"}
    request = ChatRequest(
        id=request_id("slack", TEAM, channel, placeholder),
        channel="slack",
        conversation=conversation_key(TEAM, channel, None),
        user_id=USER,
        text="Anyone there?",
        reply_to=reply_to,
    )
    assert bus.submit(request).accepted
    play_worker(bus, lambda d: "Still here.")
    assert bus.read_replies("slack", "replica-a")  # ... which dies before showing them
    pump = ReplyPump(client, bus, edit_interval_s=0, consumer="replica-b", reclaim_idle_ms=50)
    time.sleep(0.1)
    for _ in range(5):
        pump.poll(block_ms=50)
    (message,) = slack.in_channel(channel)
    assert message.versions == [PLACEHOLDER, "Still here."]
    assert message.action_ids() == [FEEDBACK_UP, FEEDBACK_DOWN]
    assert bus.redis.xlen("sprbot:chat:replies:slack") == 0  # acknowledged, and so deleted


# -- commands and feedback ---------------------------------------------------------------------


def test_retrain_is_refused_to_a_non_admin_and_queues_a_job_for_an_admin(offline):
    stack = offline()
    training = rq.Queue("training", connection=stack.bus.redis)

    def run(command: str, text: str, user: str, name: str) -> dict:
        url = stack.slack.response_url(name)
        status, body = stack.sender.command(
            command, text, user=user, channel="C0OPS", response_url=url
        )
        assert status == 200
        ack = json.loads(body)
        assert ack["response_type"] == "ephemeral"  # acknowledged at once, privately
        return stack.slack.wait_for(lambda: stack.slack.responses.get(name), 10, name)[0]

    stack.stores.faq.add("What is sprbot?", "A chatbot.", source="admin", author="test")
    refused = run("/retrain", "", USER, "user-retrain")
    assert refused["response_type"] == "ephemeral"
    assert "admins only" in refused["text"] and USER in refused["text"]
    assert training.count == 0  # nothing was enqueued

    queued = run("/retrain", "", ADMIN, "admin-retrain")
    assert queued["response_type"] == "in_channel"  # an admin's action, for the channel to see
    (job,) = training.jobs
    assert f"job {job.id}" in queued["text"]
    # The job reports on the slack reply stream, to be posted in the channel it came from.
    assert (job.kwargs["channel"], job.kwargs["reply_to"]) == ("slack", {"channel": "C0OPS"})

    # Every command, registered by anyone, is reachable through /sprbot <verb>.
    listed = run("/sprbot", "faq list", USER, "user-faq-list")
    assert listed["response_type"] == "ephemeral"
    assert listed["text"].startswith("#1 [approved] What is sprbot?")
    helped = run("/sprbot", "", USER, "user-help")
    assert "/reset" in helped["text"] and "/faq list" in helped["text"]
    audit = [fields for _, fields in stack.bus.redis.xrange(AUDIT)]
    assert [(f[b"user_id"], f[b"result"]) for f in audit] == [
        (USER.encode(), b"refused"),
        (ADMIN.encode(), b"ok"),
    ]


def test_thumbs_up_records_a_faq_candidate_and_an_admins_thumbs_down_a_correction(live):
    channel, question = new_id("D"), "How do I reset my password?"
    live.sender.event(dm(question, channel))
    (answer,) = live.finished(channel)
    said = live.answer(conversation_key(TEAM, channel, None), question)
    faq, slack, sender = live.stores.faq, live.slack, live.sender

    sender.click(answer, FEEDBACK_UP, user=USER, response_url=slack.response_url("up"))
    (thanks,) = slack.wait_for(lambda: slack.responses.get("up"), 10, "the thanks")
    assert thanks["response_type"] == "ephemeral" and "FAQ candidate" in thanks["text"]
    (candidate,) = faq.entries("candidate")
    assert (candidate.question, candidate.answer) == (question, said)
    assert candidate.source == "feedback" and candidate.author == f"slack:{USER}"

    # A non-admin's 👎 is thanked; an admin's opens a modal for the right answer.
    sender.click(answer, FEEDBACK_DOWN, user=USER, response_url=slack.response_url("down"))
    slack.wait_for(lambda: slack.responses.get("down"), 10, "the reply to 👎")
    assert not slack.calls_to("views.open")
    sender.click(answer, FEEDBACK_DOWN, user=ADMIN, response_url=slack.response_url("admin"))
    (opened,) = slack.wait_for(lambda: slack.calls_to("views.open"), 10, "the modal")
    view = opened.args["view"]
    assert question in json.dumps(view)
    right = "Use the self-service portal."
    typed = {"answer": {"answer": {"type": "plain_text_input", "value": right}}}
    submitted = {
        "type": "view_submission",
        "user": {"id": ADMIN},
        "view": {**view, "state": {"values": typed}},
    }
    assert sender.interaction(submitted)[0] == 200
    (confirmed,) = slack.wait_for(lambda: slack.calls_to("chat.postEphemeral"), 10, "the thanks")
    assert confirmed.args["user"] == ADMIN and confirmed.args["channel"] == channel
    (entry,) = [e for e in faq.entries() if e.question == question]  # corrected, approved
    assert (entry.answer, entry.status) == (right, "approved")


def test_a_command_in_a_thread_refers_to_the_last_answer_there(live):
    channel, root, question = new_id("C"), new_ts(), "What is the VPN address?"
    live.sender.event(mention(question, channel, ts=root))
    live.finished(channel)
    rid = request_id("slack", TEAM, channel, root)
    live.slack.wait_for(lambda: live.stores.faq.answered(rid), 30, "the remembered answer")

    def command(text: str, user: str) -> str:
        before = len(live.slack.in_channel(channel))
        live.sender.event(in_channel(f"<@U0BOT> {text}", channel, user=user, thread_ts=root))
        messages = live.slack.wait_for(
            lambda: (m := live.slack.in_channel(channel))[before:] and m, 10, "the reply"
        )
        assert messages[-1].thread_ts == root
        return messages[-1].text

    refused = command("/faq correct It is vpn.example.com", USER)
    assert "admins only" in refused
    assert not [e for e in live.stores.faq.entries() if e.question == question]
    noted = command("/faq correct It is vpn.example.com", ADMIN)
    assert noted.startswith("Thanks, noted.")
    (entry,) = [e for e in live.stores.faq.entries() if e.question == question]
    assert (entry.answer, entry.status, entry.source) == (
        "It is vpn.example.com",
        "approved",
        "correction",
    )


# -- text --------------------------------------------------------------------------------------


def test_the_manifest_subscribes_to_what_the_adapter_handles():
    manifest = yaml.safe_load((ROOT / "deploy" / "slack" / "manifest.yml").read_text())
    settings, features = manifest["settings"], manifest["features"]
    urls = [
        settings["event_subscriptions"]["request_url"],
        settings["interactivity"]["request_url"],
    ]
    urls += [c["url"] for c in features["slash_commands"]]
    assert {url.rsplit("/", 2)[-2:] == ["slack", "events"] for url in urls} == {True}
    assert {"app_mention", "message.im", "message.channels"} <= set(
        settings["event_subscriptions"]["bot_events"]
    )
    assert settings["interactivity"]["is_enabled"]
    commands = {c["command"] for c in features["slash_commands"]}
    assert {"/sprbot", "/faq", "/retrain", "/train", "/model"} <= commands
    assert not commands & SLACK_BUILT_INS
    registered = {name.split(" ", 1)[0] for name in COMMANDS}
    assert commands - {"/sprbot"} <= registered  # each routes to a declared command
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {
        "app_mentions:read",
        "im:history",
        "channels:history",
        "chat:write",
        "commands",
    } <= scopes


def test_markdown_becomes_slack_mrkdwn_without_breaking_code():
    markdown = (
        "# Setup\n\n**Bold**, *italic*, ~~gone~~ and [docs](https://example.com/a?b=1&c=2).\n"
        "- one\n* two\n\n> quoted\n\n"
        "Use `a**b**c <x>` inline.\n\n```python\nif a < b and c > d:\n    print('**no**')\n```\n"
    )
    assert to_mrkdwn(markdown) == (
        "*Setup*\n\n*Bold*, _italic_, ~gone~ and <https://example.com/a?b=1&amp;c=2|docs>.\n"
        "• one\n• two\n\n> quoted\n\n"
        "Use `a**b**c &lt;x&gt;` inline.\n\n"
        "```\nif a &lt; b and c &gt; d:\n    print('**no**')\n```\n"
    )
    # An answer still streaming, inside an open code block, is shown as code already.
    assert to_mrkdwn("Run:\n```sh\nmake te") == "Run:\n```\nmake te\n```"


def test_slack_markup_becomes_plain_text_for_the_model():
    text = "<@U0BOT> ask <@U1|ann> in <#C1|general> about <https://x.io|x> &amp; <!here> &lt;3"
    assert from_slack(text, "U0BOT") == "ask @ann in #general about x (https://x.io) & @here <3"


# -- processes ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sprbot_up_starts_the_slack_adapter_and_a_dm_is_answered(tiny_model, data_dir, slack):
    port = _free_port()
    env = {
        **os.environ,
        "SPRBOT_DATA_DIR": str(data_dir),
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "16",
        "SPRBOT_FAQ_EMBEDDINGS": "off",
        "SPRBOT_LOG_LEVEL": "DEBUG",
        "SPRBOT_SLACK_BOT_TOKEN": slack.token,
        "SPRBOT_SLACK_SIGNING_SECRET": SECRET,
        "SPRBOT_SLACK_API_URL": slack.url,
        "SPRBOT_SLACK_PORT": str(port),
    }
    up = subprocess.Popen(
        [sprbot_exe(), "up", "--no-chat"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = ""
    try:
        sender = SlackSender(f"http://127.0.0.1:{port}/slack/events", SECRET, TEAM)
        deadline = time.monotonic() + 180
        while True:  # until the adapter answers Slack's URL check
            assert up.poll() is None, "sprbot up exited early"
            assert time.monotonic() < deadline, "the Slack adapter did not come up"
            try:
                status, body = sender.post(
                    json.dumps({"type": "url_verification", "challenge": "abc"}),
                    "application/json",
                )
                if status == 200 and "abc" in body:
                    break
            except OSError:
                pass
            time.sleep(0.3)
        channel = new_id("D")
        assert sender.event(dm("Hello from Slack", channel))[0] == 200
        slack.wait_for(
            lambda: any(FEEDBACK_UP in m.action_ids() for m in slack.in_channel(channel)),
            120,
            "the answer",
        )
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            output, _ = up.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            up.kill()
            output, _ = up.communicate(timeout=10)
    assert up.returncode == 0, output[-3000:]
    assert "Slack adapter" in output
    for secret in (slack.token, SECRET):
        assert secret not in output  # tokens never reach the log, even at DEBUG


def test_in_socket_mode_events_arrive_over_the_websocket_and_are_answered(
    data_dir, embedded_redis, slack, run_adapter
):
    with SocketModeServer() as socket_mode:
        slack.socket_mode_url = socket_mode.url
        settings = make_settings(
            slack,
            embedded_redis.url,
            data_dir,
            slack_signing_secret=None,  # Socket Mode needs no signing secret
            slack_app_token=slack.app_token,
        )
        stack = run_adapter(slack, settings)
        assert stack.sender is None  # nothing listens for HTTP
        channel = new_id("D")
        body = event_callback(dm("Hello over a socket?", channel), TEAM, new_id("Ev"))
        envelope = socket_mode.send("events_api", body)
        assert socket_mode.wait_for_ack(envelope) == {"envelope_id": envelope}
        play_worker(stack.bus, lambda d: "Hello, *socket*.")
        (message,) = stack.finished(channel)
        assert message.versions[0] == PLACEHOLDER
        assert message.section_text() == "Hello, _socket_."
    opened = slack.calls_to("apps.connections.open")
    assert len(opened) == 1 and opened[0].error is None  # with the app-level token


def test_with_an_app_token_the_cli_opens_socket_mode_and_a_refusal_is_one_line(
    cli, data_dir, embedded_redis, slack
):
    env = {
        "SPRBOT_SLACK_BOT_TOKEN": slack.token,
        "SPRBOT_SLACK_APP_TOKEN": "xapp-wrong-token",
        "SPRBOT_SLACK_API_URL": slack.url,
        "SPRBOT_LOG_LEVEL": "DEBUG",
    }
    result = cli("adapter", "slack", env=env, timeout=60)
    assert result.returncode == 2
    assert "SPRBOT_SLACK_APP_TOKEN" in result.stderr and "apps.connections.open" in result.stderr
    assert "Traceback" not in result.stderr
    assert "xapp-wrong-token" not in result.stdout + result.stderr
    assert [c.method for c in slack.calls] == ["auth.test", "apps.connections.open"]


def test_missing_or_refused_credentials_are_one_clear_line(cli, data_dir, embedded_redis, slack):
    base = {"SPRBOT_SLACK_API_URL": slack.url}
    missing = cli("adapter", "slack", env={**base, "SPRBOT_SLACK_BOT_TOKEN": slack.token})
    assert missing.returncode == 2
    assert "SPRBOT_SLACK_SIGNING_SECRET is not set" in missing.stderr
    refused = cli(
        "adapter",
        "slack",
        env={
            **base,
            "SPRBOT_SLACK_BOT_TOKEN": "xoxb-revoked",
            "SPRBOT_SLACK_SIGNING_SECRET": SECRET,
        },
    )
    assert refused.returncode == 2
    assert "Slack refused SPRBOT_SLACK_BOT_TOKEN (auth.test: invalid_auth)" in refused.stderr
    assert "xoxb-revoked" not in refused.stderr and "Traceback" not in refused.stderr


def test_tokens_are_never_logged(live, caplog):
    caplog.set_level(logging.DEBUG)
    channel = new_id("D")
    live.sender.event(dm("Log this?", channel))
    live.finished(channel)
    logged = caplog.text
    assert logged  # the adapter did log, at DEBUG
    for secret in (live.slack.token, SECRET):
        assert secret not in logged
