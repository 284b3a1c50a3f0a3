"""The Telegram adapter end to end: the real python-telegram-bot ``Application``, talking over
HTTP to a local stand-in of the Bot API (``standins/telegram_api.py``) through
``SPRBOT_TELEGRAM_API_URL``, real Redis, and a real inference worker on the tiny model.

Tests that take the ``live`` fixture share one worker (module scope: loading the model is
the slow part). Tests that need an answer with known content (9,000 characters, Markdown
Telegram must parse, an error) take ``offline``: a Redis of their own without a worker, and
they answer through the bus as a worker does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import signal
import struct
import subprocess
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import rq
from processes import sprbot_exe, start_inference_worker, stop
from standins import AdapterThreads
from standins.telegram_api import BotAPI, Message, parse_html, post_update
from telegram import Bot, InlineKeyboardButton, InlineKeyboardMarkup

from adapters.telegram import (
    FEEDBACK_DOWN,
    FEEDBACK_UP,
    PLACEHOLDER,
    TYPING,
    ReplyPump,
    TelegramAdapter,
    api_urls,
    conversation_key,
    to_html,
)
from bot.audit import AUDIT
from bot.bus import FAILED_MESSAGE, REQUESTS, Bus, seen_key
from bot.commands import Stores
from bot.config import Settings
from bot.connection import EmbeddedRedis, connect
from bot.memory import ConversationMemory
from bot.schemas import ChatRequest, FinalEvent, ProgressEvent, request_id
from training.jobs import TrainingQueue

ADMIN_ID = 900_001
EDIT_INTERVAL_S = 0.1  # Telegram wants ~1 s; shorter here so a short answer still shows edits
GROUP_INTERVAL_S = 0.2
TYPING_EVERY_S = 0.3  # ~4 s in production
WEBHOOK_URL = "https://sprbot.example.com/telegram/hook"
WEBHOOK_SECRET = "standin-webhook-secret_0123"

_ids = itertools.count(random.randrange(10_000, 90_000) * 1000)


def new_user(name: str = "Ann", **extra) -> dict:
    """A Telegram user unique within the run: their private chat has the same id, so the
    conversations of different tests never meet in the shared Redis."""
    return BotAPI.user(next(_ids), name, **extra)


def new_group_id() -> int:
    return -1_000_000_000_000 - next(_ids)  # supergroups have ids like -100xxxxxxxxxx


def final_of(messages: list[Message]) -> list[Message]:
    return [m for m in messages if any(d.startswith(FEEDBACK_UP) for d in m.callback_data())]


@dataclass
class Stack:
    """One running adapter and what a test looks at."""

    api: BotAPI
    bus: Bus
    memory: ConversationMemory
    stores: Stores
    settings: Settings
    port: int | None  # the webhook's, in webhook mode

    def answer(self, conversation: str, question: str, timeout: float = 60) -> str:
        """The model's answer to ``question``, as the worker recorded it in memory."""

        def found():
            turns = self.memory.turns(conversation)
            for asked, answered in zip(turns[::2], turns[1::2], strict=False):
                if asked["content"] == question:
                    return answered
            return None

        return self.api.wait_for(found, timeout, f"the answer to {question!r}")["content"]

    def finished(self, chat_id: int, count: int = 1, timeout: float = 60) -> list[Message]:
        """Wait until ``count`` answers in the chat carry their feedback buttons."""

        def done():
            messages = self.api.in_chat(chat_id)
            return messages if len(final_of(messages)) >= count else None

        return self.api.wait_for(done, timeout, f"{count} finished answer(s) in chat {chat_id}")

    def taken(self, update: dict, timeout: float = 30) -> None:
        """Wait until the adapter has confirmed ``update`` (it asked for the ones after it)."""
        self.api.wait_for(
            lambda: update["update_id"] in self.api.confirmed, timeout, "the update's confirmation"
        )

    def webhook(self, update: dict, secret: str | None = WEBHOOK_SECRET) -> int:
        return post_update(f"http://127.0.0.1:{self.port}/telegram/hook", update, secret)


def make_settings(api: BotAPI, redis_url: str, data_dir: Path, **overrides) -> Settings:
    values = dict(
        redis_url=redis_url,
        data_dir=data_dir,
        telegram_token=api.token,
        telegram_api_url=api.url,
        telegram_admins=[str(ADMIN_ID)],
        faq_embeddings="off",
    )
    return Settings(_env_file=None, **{**values, **overrides})


@pytest.fixture
def run_adapter():
    """Start TelegramAdapters in this process (polling, or a webhook on a free port); stop
    them after the test."""
    threads = AdapterThreads()

    def start(api: BotAPI, settings: Settings, **options) -> Stack:
        bus = Bus(
            connect(settings),
            max_backlog=settings.max_backlog,
            max_text_chars=settings.max_text_chars,
        )
        memory = ConversationMemory(bus.redis, ttl_s=settings.memory_ttl_s)
        stores = Stores.build(settings, bus.redis, training=TrainingQueue(bus.redis, settings))
        adapter = TelegramAdapter(
            settings,
            bus,
            memory,
            stores=stores,
            edit_interval_s=EDIT_INTERVAL_S,
            group_interval_s=GROUP_INTERVAL_S,
            typing_every_s=options.get("typing_every_s", TYPING_EVERY_S),
            consumer=f"test-{uuid.uuid4().hex[:8]}",
            poll_timeout_s=5,
        )
        port = threads.start(adapter, "telegram-adapter")
        return Stack(api, bus, memory, stores, settings, port)

    yield start
    threads.stop_all()


@pytest.fixture
def api():
    with BotAPI() as stand_in:
        yield stand_in


def _worker_env(tiny_model: Path, data_dir: Path, redis_url: str | None = None) -> dict:
    env = {
        **os.environ,
        "SPRBOT_DATA_DIR": str(data_dir),
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "32",
        "SPRBOT_LOG_LEVEL": "WARNING",
        "SPRBOT_FAQ_EMBEDDINGS": "off",
    }
    if redis_url:
        env["SPRBOT_REDIS_URL"] = redis_url
    return env


@dataclass
class Served:
    data_dir: Path
    redis_url: str


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    """Redis and one real inference worker on the tiny model, for the module's live tests."""
    data_dir = tmp_path_factory.mktemp("telegram-live") / "data"
    server = EmbeddedRedis(data_dir)
    url = server.ensure_running()
    worker = start_inference_worker(_worker_env(tiny_model, data_dir, url), url)
    try:
        yield Served(data_dir, url)
    finally:
        stop(worker)
        server.stop()


@pytest.fixture
def live(served, api, run_adapter) -> Stack:
    return run_adapter(api, make_settings(api, served.redis_url, served.data_dir))


@pytest.fixture
def offline(data_dir, embedded_redis, api, run_adapter):
    """An adapter on a Redis of its own, with no worker: the test answers through the bus."""

    def start(**overrides) -> Stack:
        options = {k: overrides.pop(k) for k in ("typing_every_s",) if k in overrides}
        settings = make_settings(api, embedded_redis.url, data_dir, **overrides)
        return run_adapter(api, settings, **options)

    return start


def play_worker(bus: Bus, answer, timeout: float = 30, pause_s: float = EDIT_INTERVAL_S * 2):
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
            time.sleep(pause_s)
            bus.emit(delivery.delta(result[half:]))
            time.sleep(pause_s)
            bus.finish(delivery, result)
        return [d.request for d in deliveries]
    raise AssertionError("no request reached the bus")


# -- answering ---------------------------------------------------------------------------------


def test_a_private_message_gets_typing_a_placeholder_then_paced_edits_and_the_final_text(live):
    user = new_user()
    chat = live.api.private_chat(user)
    question = "What is sprbot?"
    update = live.api.message(chat, user, question)
    (message,) = live.finished(chat["id"])
    final = live.answer(conversation_key(chat["id"], None), question)
    assert final.strip()
    typing = live.api.calls_to("sendChatAction")
    assert typing and {c.args["action"] for c in typing} == {"typing"}
    assert message.versions[0] == PLACEHOLDER
    assert message.reply_to is None  # a private chat is answered without quoting
    assert any(v.endswith(TYPING) for v in message.versions[1:-1]), message.versions
    assert message.text == parse_html(to_html(final))  # rendered, and Telegram could parse it
    assert message.parse_mode == "HTML"
    rid = request_id("telegram", live.api.bot["id"], update["update_id"])
    assert message.callback_data() == [FEEDBACK_UP + rid, FEEDBACK_DOWN + rid]
    assert message.button_texts() == ["👍", "👎"]
    edits = [c.at for c in live.api.calls_to("editMessageText")]
    assert all(b - a >= EDIT_INTERVAL_S * 0.9 for a, b in itertools.pairwise(edits))


def test_typing_is_repeated_while_the_model_works_and_stops_once_answered(offline):
    stack = offline()
    user = new_user()
    chat = stack.api.private_chat(user)
    stack.api.message(chat, user, "Think hard, please.")
    stack.api.wait_for(lambda: stack.bus.redis.xlen(REQUESTS), 10, "the request on the bus")
    time.sleep(TYPING_EVERY_S * 5)  # the model "thinks" for a while before the first token
    play_worker(stack.bus, lambda d: "Done thinking.")
    stack.finished(chat["id"])
    answered = time.monotonic()
    time.sleep(TYPING_EVERY_S * 3)
    typing = [c.at for c in stack.api.calls_to("sendChatAction")]
    assert len(typing) >= 4, typing  # once at once, then again while waiting
    gaps = [b - a for a, b in itertools.pairwise(typing)]
    assert all(gap >= TYPING_EVERY_S * 0.8 for gap in gaps[1:]), gaps
    assert not [t for t in typing if t > answered + TYPING_EVERY_S], "typing after the answer"


def test_in_a_group_only_mentions_replies_and_commands_are_answered(live):
    api, bot = live.api, live.api.bot["username"]
    group = api.group(new_group_id())
    ann = new_user("Ann")
    chatter = api.message(group, ann, "Lunch at noon, anyone?")
    others = api.message(group, ann, "/help@some_other_bot")
    live.taken(others)
    assert api.in_chat(group["id"]) == []  # taken, and answered with nothing
    rid = request_id("telegram", api.bot["id"], chatter["update_id"])
    assert live.bus.redis.exists(seen_key(rid)) == 0  # never reached the bus

    question = "what is the VPN address?"
    asked = api.message(group, ann, f"@{bot} {question}")
    (answer,) = live.finished(group["id"])
    conversation = conversation_key(group["id"], None)
    live.answer(conversation, question)  # the mention itself never reaches the model
    assert answer.reply_to == asked["message"]["message_id"]  # quotes who asked

    # A reply to the bot's answer needs no mention, and continues the conversation.
    api.message(group, ann, "And the backup one?", reply_to=answer)
    live.finished(group["id"], count=2)
    turns = [t["content"] for t in live.memory.turns(conversation)]
    assert turns[0] == question and turns[2] == "And the backup one?"

    # A command in a group, bare or addressed to this bot, is answered.
    api.message(group, ann, f"/help@{bot}")
    api.wait_for(
        lambda: any("/reset" in m.text for m in api.in_chat(group["id"])), 10, "the help text"
    )


def test_in_a_forum_topic_the_answer_stays_in_the_topic(live):
    api, bot = live.api, live.api.bot["username"]
    forum = api.group(new_group_id(), "Support", forum=True)
    ann = new_user()
    # Every message in a topic "replies" to the topic's creation: that is not a reply to the bot.
    chatter = api.message(forum, ann, "just chatting", thread_id=77)
    live.taken(chatter)
    assert api.in_chat(forum["id"]) == []
    api.message(forum, ann, f"@{bot} hello in the topic", thread_id=77)
    (answer,) = live.finished(forum["id"])
    assert answer.thread_id == 77
    live.answer(conversation_key(forum["id"], 77), "hello in the topic")
    assert {c.args.get("message_thread_id") for c in api.calls_to("sendChatAction")} == {77}
    assert live.memory.turns(conversation_key(forum["id"], None)) == []  # its own conversation


def test_other_bots_and_edited_messages_are_ignored_unless_configured(offline, api):
    stack = offline()
    user, robot = new_user(), new_user("Robo", is_bot=True)
    chat, robot_chat = api.private_chat(user), api.private_chat(robot)
    original = api.message(chat, user, "first version")
    play_worker(stack.bus, lambda d: "ok")
    stack.finished(chat["id"])
    edited = api.message(
        chat, user, "second version", edited=True, message_id=original["message"]["message_id"]
    )
    from_bot = api.message(robot_chat, robot, "beep")
    # allowed_updates leaves edits out; a stand-in Telegram sends what it is given anyway.
    last = api.message(chat, user, "/help")
    stack.taken(last)
    for update in (edited, from_bot):
        rid = request_id("telegram", api.bot["id"], update["update_id"])
        assert not stack.bus.redis.exists(seen_key(rid))
    assert api.in_chat(robot["id"]) == []
    assert "edited_message" not in api.calls_to("getUpdates")[-1].args["allowed_updates"]


def test_when_configured_edits_and_bots_are_answered(offline, api):
    stack = offline(telegram_answer_edits=True, telegram_answer_bots=True)
    user, robot = new_user(), new_user("Robo", is_bot=True)
    chat, robot_chat = api.private_chat(user), api.private_chat(robot)
    api.message(chat, user, "fixed typo", edited=True)
    api.message(robot_chat, robot, "beep")
    asked = {r.text for r in play_worker(stack.bus, lambda d: "ok")}
    if len(asked) < 2:
        asked |= {r.text for r in play_worker(stack.bus, lambda d: "ok")}
    assert asked == {"fixed typo", "beep"}
    assert "edited_message" in api.calls_to("getUpdates")[-1].args["allowed_updates"]


def test_answers_sharing_a_group_take_turns_at_its_pace(offline, api):
    stack = offline()
    group = api.group(new_group_id())
    for name in ("Ann", "Bob"):
        user = new_user(name)
        api.message(group, user, f"@{api.bot['username']} a question from {name}")
    deliveries = []
    deadline = time.monotonic() + 10
    while len(deliveries) < 2 and time.monotonic() < deadline:
        deliveries += stack.bus.read_requests("test-worker", block_ms=200)
    assert len(deliveries) == 2
    for step in range(10):  # both stream at once, faster than the group's pace
        stack.bus.emit(*(d.delta(f"word{step} ") for d in deliveries))
        time.sleep(GROUP_INTERVAL_S / 2)
    for delivery in deliveries:
        stack.bus.finish(delivery, "".join(f"word{step} " for step in range(10)))
    messages = stack.finished(group["id"], count=2)
    for message in messages:  # neither waited for the other to finish
        assert any(v.endswith(TYPING) for v in message.versions), message.versions
    sends = [c.at for c in api.calls_to("editMessageText", "sendMessage")[2:]]
    assert all(b - a >= GROUP_INTERVAL_S * 0.9 for a, b in itertools.pairwise(sends))


# -- failures ----------------------------------------------------------------------------------


def test_a_429_on_edits_is_honoured_and_the_final_text_arrives(live):
    live.api.fail("editMessageText", "retry_after", times=1, retry_after=2)
    user = new_user()
    chat = live.api.private_chat(user)
    live.api.message(chat, user, "Tell me more.")
    (message,) = live.finished(chat["id"], timeout=90)
    final = live.answer(conversation_key(chat["id"], None), "Tell me more.")
    assert message.text == parse_html(to_html(final))
    edits = live.api.calls_to("editMessageText")
    limited = [c for c in edits if c.status == 429]
    assert len(limited) == 1
    after = [c for c in edits if c.at > limited[0].at]
    assert after and after[0].at - limited[0].at >= 2 * 0.95  # nothing before retry_after


def test_tokens_are_never_logged(offline, caplog):
    caplog.set_level(logging.DEBUG)  # before the adapter builds its bot: PTB logs the URL then
    stack = offline()
    stack.api.fail("editMessageText", "retry_after", times=1, retry_after=0.5)
    user = new_user()
    chat = stack.api.private_chat(user)
    stack.api.message(chat, user, "Log this?")
    play_worker(stack.bus, lambda d: "Logged.")
    stack.finished(chat["id"])
    logged = caplog.text
    assert "Calling Bot API endpoint `sendMessage`" in logged  # PTB did log, at DEBUG
    assert "Set Bot API URL: " in logged
    for secret in (stack.api.token, stack.api.token.split(":", 1)[1]):
        assert secret not in logged


def test_message_is_not_modified_is_swallowed(data_dir, embedded_redis, api, caplog):
    """A replica showed an answer and died before acknowledging it. The replica that takes
    over edits the message to what it shows already; Telegram answers "message is not
    modified", which means done, not failed."""
    caplog.set_level(logging.WARNING, logger="adapters.telegram")
    bus = Bus(connect(make_settings(api, embedded_redis.url, data_dir)))
    user = new_user()
    chat = api.private_chat(user)
    base, files = api_urls(api.url)
    answer = "Still **here**."

    async def run() -> str:
        async with Bot(api.token, base_url=base, base_file_url=files) as bot:
            placeholder = await bot.send_message(chat["id"], PLACEHOLDER)
            rid = request_id("telegram", api.bot["id"], 1)
            request = ChatRequest(
                id=rid,
                channel="telegram",
                conversation=conversation_key(chat["id"], None),
                user_id=str(user["id"]),
                text="Anyone there?",
                reply_to={"chat_id": chat["id"], "message_id": placeholder.message_id},
            )
            assert bus.submit(request).accepted
            play_worker(bus, lambda d: answer, pause_s=0)
            assert bus.read_replies("telegram", "replica-a")  # a takes the events...
            buttons = InlineKeyboardMarkup(
                [
                    [
                        InlineKeyboardButton("👍", callback_data=FEEDBACK_UP + rid),
                        InlineKeyboardButton("👎", callback_data=FEEDBACK_DOWN + rid),
                    ]
                ]
            )
            await bot.edit_message_text(  # ... shows the final, and dies
                to_html(answer),
                chat_id=chat["id"],
                message_id=placeholder.message_id,
                parse_mode="HTML",
                reply_markup=buttons,
            )
            pump = ReplyPump(bot, bus, edit_interval_s=0, consumer="replica-b", reclaim_idle_ms=1)
            time.sleep(0.05)
            for _ in range(3):
                await pump.poll(block_ms=50)
            return rid

    rid = asyncio.run(run())
    (message,) = api.in_chat(chat["id"])
    assert message.versions == [PLACEHOLDER, "Still here."]
    refused = [c for c in api.calls_to("editMessageText") if c.status == 400]
    assert len(refused) == 1 and "not modified" in refused[0].error
    assert bus.redis.get(f"sprbot:telegram:delivered:{rid}") == b"1"
    assert bus.redis.xlen("sprbot:chat:replies:telegram") == 0  # acknowledged, and so deleted
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_html_telegram_cannot_parse_falls_back_to_plain_text(offline):
    stack = offline()
    stack.api.fail("editMessageText", "entities", times=100)
    stack.api.fail("sendMessage", "entities", times=100)
    user = new_user()
    chat = stack.api.private_chat(user)
    stack.api.message(chat, user, "Format something")
    answer = "Use **bold** and `code`:\n\n```python\nprint('<hi>')\n```"
    play_worker(stack.bus, lambda d: answer)
    (message,) = stack.finished(chat["id"])
    assert message.text == answer and message.parse_mode is None  # the answer, not lost
    refused = [c for c in stack.api.calls_to("editMessageText") if c.status == 400]
    assert len(refused) == 1  # plain text from then on; HTML is not tried again


def test_a_9000_character_answer_arrives_as_three_messages(offline):
    stack = offline()
    user = new_user()
    chat = stack.api.private_chat(user)
    stack.api.message(chat, user, "Write a lot")
    paragraphs = [f"Paragraph {i}: " + "lorem ipsum dolor " * 25 for i in range(19)]
    code = "```python\n" + "\n".join(f"x{i} = {i}" for i in range(40)) + "\n```"
    answer = "\n\n".join(p.strip() for p in paragraphs[:10]) + "\n\n" + code + "\n\n"
    answer += "\n\n".join(p.strip() for p in paragraphs[10:])
    answer = answer[:9000].rstrip()
    assert len(answer) >= 8900
    play_worker(stack.bus, lambda d: answer)
    messages = stack.finished(chat["id"])
    assert len(messages) == 3
    assert all(len(m.text) <= 4096 for m in messages)
    assert final_of(messages) == [messages[-1]]  # the buttons go under the last part
    shown = "".join(m.text for m in messages)
    assert "".join(answer.replace("```python", "").replace("```", "").split()) == "".join(
        shown.split()
    )  # nothing lost at the cuts
    assert sum("x0 = 0" in m.text and "x39 = 39" in m.text for m in messages) == 1


def test_refusals_and_failures_are_shown_in_plain_words(offline):
    stack = offline(max_text_chars=50)
    user = new_user()
    chat = stack.api.private_chat(user)
    stack.api.message(chat, user, "x" * 80)
    (refused,) = stack.api.wait_for(
        lambda: [m for m in stack.api.in_chat(chat["id"]) if len(m.versions) > 1], 10, "refusal"
    )
    assert refused.text.startswith("⚠️ Your message is 80 characters long")
    stack.api.message(chat, user, "Break, please.")
    play_worker(stack.bus, lambda d: RuntimeError("the model crashed"))
    failed = stack.api.wait_for(
        lambda: [m for m in stack.api.in_chat(chat["id"]) if FAILED_MESSAGE in m.text], 10, "error"
    )
    assert "Traceback" not in failed[0].text and not failed[0].callback_data()


# -- restarts ----------------------------------------------------------------------------------


def test_restart_loses_and_replays_nothing(tiny_model, data_dir, embedded_redis, api):
    """The adapter takes updates, puts them on the bus, and is killed before any is answered
    (no worker is running) and before Telegram hears that it took them. A message arrives
    while it is down. Started again, beside a worker: every message gets exactly one answer."""
    redis_url = embedded_redis.url
    client = connect(Settings(_env_file=None, redis_url=redis_url))
    bot_id = api.bot["id"]
    early_confirms: list[int] = []
    confirming = {"allowed": False}

    def on_confirm(updates: list[dict]) -> bool:
        for update in updates:  # the offset moves past an update only once it is on the bus
            if not client.exists(seen_key(request_id("telegram", bot_id, update["update_id"]))):
                early_confirms.append(update["update_id"])
        return confirming["allowed"]  # False: Telegram is unreachable; nothing is confirmed

    api.on_confirm = on_confirm
    users = [new_user(f"User{i}") for i in range(4)]
    chats = [api.private_chat(u) for u in users]
    for i in range(3):
        api.message(chats[i], users[i], f"Question number {i}?")
    env = {
        **_worker_env(tiny_model, data_dir, redis_url),
        "SPRBOT_TELEGRAM_TOKEN": api.token,
        "SPRBOT_TELEGRAM_API_URL": api.url,
        "SPRBOT_LOG_LEVEL": "INFO",
    }
    adapter = subprocess.Popen(
        [sprbot_exe(), "adapter", "telegram"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        api.wait_for(lambda: client.xlen(REQUESTS) == 3, 60, "three requests on the bus")
        api.wait_for(lambda: len(api.calls_to("getUpdates")) >= 2, 30, "a confirming poll")
    finally:
        first_output = stop(adapter, signal.SIGKILL)
    assert api.confirmed == [], "confirmed although Telegram never answered"
    placeholders = [api.in_chat(c["id"]) for c in chats[:3]]
    assert all(len(p) == 1 and p[0].versions == [PLACEHOLDER] for p in placeholders)

    api.message(chats[3], users[3], "Question number 3?")  # while the adapter is down
    confirming["allowed"] = True
    worker = start_inference_worker(env, redis_url)
    adapter = subprocess.Popen(
        [sprbot_exe(), "adapter", "telegram"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for chat in chats:
            api.wait_for(lambda c=chat: final_of(api.in_chat(c["id"])), 120, "every answer")
        time.sleep(2)  # room for a second answer, if one were coming
    finally:
        second_output = stop(adapter)
        stop(worker)
    assert adapter.returncode == 0, second_output[-3000:]
    memory = ConversationMemory(client)
    for i, chat in enumerate(chats):
        (message,) = api.in_chat(chat["id"])  # one placeholder, edited into one answer
        assert message.versions[0] == PLACEHOLDER and final_of([message])
        turns = memory.turns(conversation_key(chat["id"], None))
        assert [t["content"] for t in turns[::2]] == [f"Question number {i}?"]
    assert early_confirms == []
    assert api.pending == []  # a clean stop confirms what it took
    assert not api.calls_to("deleteWebhook") or not any(
        c.args.get("drop_pending_updates") for c in api.calls_to("deleteWebhook")
    )
    for output in (first_output, second_output):
        assert api.token not in output and "Traceback" not in output


# -- commands and feedback ---------------------------------------------------------------------


def test_commands_are_registered_with_the_admin_ones_scoped_to_admins(offline, api):
    offline()
    public = api.commands_for({"type": "default"})
    assert {"help", "reset", "faq", "model"} <= set(public)
    assert not {"retrain", "train"} & set(public)
    admin_scope = {"type": "chat", "chat_id": ADMIN_ID}
    # Telegram knows no chat with an admin who never wrote to the bot: their /start sets it.
    assert [c.error for c in api.calls_to("setMyCommands")][-1] == "Bad Request: chat not found"
    admin = BotAPI.user(ADMIN_ID, "Boss")
    api.message(api.private_chat(admin), admin, "/start")
    admins = api.wait_for(lambda: api.commands_for(admin_scope), 10, "the admins' menu")
    assert {"help", "reset", "faq", "model", "retrain", "train"} <= set(admins)


def test_retrain_is_refused_to_a_non_admin_and_queues_a_job_for_an_admin(offline, api):
    stack = offline()
    training = rq.Queue("training", connection=stack.bus.redis)
    user, admin = new_user(), BotAPI.user(ADMIN_ID, "Boss")
    user_chat, admin_chat = api.private_chat(user), api.private_chat(admin)

    def command(chat: dict, sender: dict, text: str) -> str:
        before = len(api.in_chat(chat["id"]))
        api.message(chat, sender, text)
        messages = api.wait_for(
            lambda: (m := api.in_chat(chat["id"]))[before:] and m, 10, f"the reply to {text}"
        )
        return messages[-1].text

    refused = command(user_chat, user, "/retrain")
    assert "admins only" in refused and str(user["id"]) in refused
    assert training.count == 0  # nothing was enqueued
    added = command(admin_chat, admin, "/faq add What is sprbot? | A chatbot.")
    assert added.startswith("Added FAQ #1")
    queued = command(admin_chat, admin, "/retrain")
    (job,) = training.jobs
    assert f"job {job.id}" in queued
    # The job reports in the admin's chat, through this adapter's reply stream.
    assert job.kwargs["channel"] == "telegram"
    assert job.kwargs["reply_to"]["chat_id"] == ADMIN_ID
    assert command(user_chat, user, "/start").startswith("Hi! I'm sprbot.")
    audit = [fields for _, fields in stack.bus.redis.xrange(AUDIT)]
    assert [(f[b"user_id"].decode(), f[b"command"], f[b"result"]) for f in audit] == [
        (str(user["id"]), b"/retrain", b"refused"),
        (str(ADMIN_ID), b"/faq add", b"ok"),
        (str(ADMIN_ID), b"/retrain", b"ok"),
    ]


def test_thumbs_up_records_a_candidate_and_an_admins_reply_corrects_the_answer(live):
    api = live.api
    user, admin = new_user(), BotAPI.user(ADMIN_ID, "Boss")
    group = api.group(new_group_id())
    question = "How do I reset my password?"
    api.message(group, user, f"@{api.bot['username']} {question}")
    (answer,) = live.finished(group["id"])
    said = live.answer(conversation_key(group["id"], None), question)
    rid = answer.callback_data()[0].removeprefix(FEEDBACK_UP)
    api.wait_for(lambda: live.stores.faq.answered(rid), 30, "the remembered answer")

    api.click(answer, FEEDBACK_UP + rid, user)
    thanks = api.wait_for(lambda: list(api.callback_answers.values()), 10, "the thanks")
    assert "FAQ candidate" in thanks[0]["text"]
    (candidate,) = live.stores.faq.entries("candidate")
    assert (candidate.question, candidate.answer) == (question, said)
    assert candidate.source == "feedback" and candidate.author == f"telegram:{user['id']}"

    def reply(sender: dict, text: str) -> str:
        before = len(api.in_chat(group["id"]))
        api.message(group, sender, text, reply_to=answer)
        messages = api.wait_for(
            lambda: (m := api.in_chat(group["id"]))[before:] and m, 10, "the reply"
        )
        return messages[-1].text

    assert "admins only" in reply(user, "/faq correct Use the self-service portal.")
    assert live.stores.faq.entries("approved") == []
    noted = reply(admin, "/faq correct Use the self-service portal.")
    assert noted.startswith("Thanks, noted.")
    (entry,) = [e for e in live.stores.faq.entries() if e.question == question]
    assert (entry.answer, entry.status, entry.source) == (
        "Use the self-service portal.",
        "approved",
        "correction",
    )


def test_a_training_report_edits_its_progress_and_sends_the_loss_plot_as_a_photo(
    offline, api, tmp_path
):
    stack = offline()
    admin = BotAPI.user(ADMIN_ID, "Boss")
    chat = api.private_chat(admin)
    plot = tmp_path / "loss.png"
    plot.write_bytes(_png())
    where = {
        "request_id": "job-1234",
        "channel": "telegram",
        "reply_to": {"chat_id": ADMIN_ID, "thread_id": None, "quote": None},
        "attempt": 1,
    }
    stack.bus.emit(ProgressEvent(seq=1, text="Training: step 3 of 10", **where))
    api.wait_for(lambda: api.in_chat(ADMIN_ID), 10, "the progress message")
    final = FinalEvent(
        seq=2, text="Training **done**: v2 promoted.", attachments=[str(plot)], **where
    )
    assert stack.bus.announce(final)
    messages = api.wait_for(lambda: (m := api.in_chat(chat["id"]))[1:] and m, 10, "the photo")
    report, photo = messages
    assert report.versions == [
        f"{PLACEHOLDER} Training: step 3 of 10",
        "Training done: v2 promoted.",
    ]
    assert report.callback_data() == []  # a report is not an answer to rate
    assert (photo.kind, photo.filename, photo.file) == ("photo", "loss.png", plot.read_bytes())


# -- webhook -----------------------------------------------------------------------------------


def test_webhook_refuses_a_wrong_secret_with_403_and_answers_the_right_one(
    served, api, run_adapter
):
    settings = make_settings(
        api,
        served.redis_url,
        served.data_dir,
        telegram_webhook_url=WEBHOOK_URL,
        telegram_webhook_secret=WEBHOOK_SECRET,
    )
    stack = run_adapter(api, settings)
    (registered,) = api.calls_to("setWebhook")
    assert registered.args["url"] == WEBHOOK_URL
    assert registered.args["secret_token"] == WEBHOOK_SECRET
    assert not registered.args.get("drop_pending_updates")
    user = new_user()
    chat = api.private_chat(user)
    backlog = stack.bus.redis.xlen(REQUESTS)
    for secret in ("wrong-secret", None, WEBHOOK_SECRET.upper()):
        update = api.message(chat, user, "Let me in", deliver=False)
        assert stack.webhook(update, secret) == 403
        rid = request_id("telegram", api.bot["id"], update["update_id"])
        assert not stack.bus.redis.exists(seen_key(rid))
    assert stack.bus.redis.xlen(REQUESTS) == backlog  # nothing enqueued
    assert api.in_chat(chat["id"]) == []

    update = api.message(chat, user, "Hello over the webhook", deliver=False)
    assert stack.webhook(update) == 200
    assert stack.webhook(update) == 200  # Telegram delivering it again: taken, not answered twice
    (message,) = stack.finished(chat["id"])
    stack.answer(conversation_key(chat["id"], None), "Hello over the webhook")
    assert not api.calls_to("getUpdates")  # no polling beside the webhook


# -- text --------------------------------------------------------------------------------------


def test_markdown_becomes_telegram_html_that_telegram_parses():
    markdown = (
        "# Setup\n\n**Bold**, *italic*, _also_, ~~gone~~ and [docs](https://example.com/a?b=1&c=2).\n"
        "- one\n* two\n\n> quoted\n> twice\n\n"
        "Use `a**b**c <x>` inline; 2 * 3 * 4 & snake_case_name.\n\n"
        "```python\nif a < b and c > d:\n    print('**no**')\n```\n"
    )
    html = to_html(markdown)
    assert html == (
        "<b>Setup</b>\n\n<b>Bold</b>, <i>italic</i>, <i>also</i>, <s>gone</s> and "
        '<a href="https://example.com/a?b=1&amp;c=2">docs</a>.\n'
        "• one\n• two\n\n<blockquote>quoted\ntwice</blockquote>\n\n"
        "Use <code>a**b**c &lt;x&gt;</code> inline; 2 * 3 * 4 &amp; snake_case_name.\n\n"
        '<pre><code class="language-python">if a &lt; b and c &gt; d:\n'
        "    print('**no**')</code></pre>\n"
    )
    assert len(parse_html(html)) <= len(markdown)
    # An answer still streaming, inside an open code block, is shown as code already.
    assert (
        to_html("Run:\n```sh\nmake te")
        == 'Run:\n<pre><code class="language-sh">make te</code></pre>'
    )
    # Whatever the model writes, Telegram can parse the result, and it is never longer.
    for text in ("<b>not a tag", "**unclosed", "a & b < c > d", "```\nopen", "[x](javascript:1)"):
        assert len(parse_html(to_html(text))) <= len(text)


def test_the_api_url_gives_ptb_its_bot_and_file_bases():
    assert api_urls("https://api.telegram.org/bot") == (
        "https://api.telegram.org/bot",
        "https://api.telegram.org/file/bot",
    )
    assert api_urls("http://localhost:8081") == (
        "http://localhost:8081/bot",
        "http://localhost:8081/file/bot",
    )
    assert api_urls("http://h/bot{token}/test") == (
        "http://h/bot{token}/test",
        "http://h/file/bot{token}/test",
    )


# -- processes ---------------------------------------------------------------------------------


def test_sprbot_up_starts_the_telegram_adapter_and_a_message_is_answered(tiny_model, data_dir, api):
    env = {
        **_worker_env(tiny_model, data_dir),
        "SPRBOT_MAX_NEW_TOKENS": "16",
        "SPRBOT_LOG_LEVEL": "DEBUG",
        "SPRBOT_TELEGRAM_TOKEN": api.token,
        "SPRBOT_TELEGRAM_API_URL": api.url,
    }
    up = subprocess.Popen(
        [sprbot_exe(), "up", "--no-chat"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    output = ""
    try:
        api.wait_for(lambda: api.calls_to("getUpdates"), 180, "the adapter's first poll")
        user = new_user()
        chat = api.private_chat(user)
        api.message(chat, user, "Hello from Telegram")
        api.wait_for(lambda: final_of(api.in_chat(chat["id"])), 120, "the answer")
    finally:
        output = stop(up, timeout=90)
    assert up.returncode == 0, output[-3000:]
    assert "Telegram adapter" in output
    assert api.token not in output  # never in the log, even at DEBUG


def test_a_refused_token_is_one_clear_line(cli, data_dir, embedded_redis, api):
    result = cli(
        "adapter",
        "telegram",
        env={"SPRBOT_TELEGRAM_TOKEN": "123:revoked-token", "SPRBOT_TELEGRAM_API_URL": api.url},
        timeout=60,
    )
    assert result.returncode == 2
    assert "Telegram refused SPRBOT_TELEGRAM_TOKEN (getMe: unauthorized)" in result.stderr
    assert "revoked-token" not in result.stderr and "Traceback" not in result.stderr
    missing = cli(
        "adapter",
        "telegram",
        env={
            "SPRBOT_TELEGRAM_TOKEN": api.token,
            "SPRBOT_TELEGRAM_API_URL": api.url,
            "SPRBOT_TELEGRAM_WEBHOOK_URL": WEBHOOK_URL,
        },
        timeout=60,
    )
    assert missing.returncode == 2
    assert "SPRBOT_TELEGRAM_WEBHOOK_SECRET must be set" in missing.stderr


def _png() -> bytes:
    """A 1×1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
