"""Hostile updates at the Telegram adapter's webhook: the real python-telegram-bot application
in webhook mode (secret token), a stand-in of the Bot API, and the shared inference worker.

- Without the right ``X-Telegram-Bot-Api-Secret-Token``, every request gets 403, whatever
  its body, and nothing happens.
- With it, random and mutated updates (fields of the wrong type, odd or out-of-range
  entities, oversized text, invalid UTF-8, lone surrogates, unknown update kinds) get 200 or
  400, never a 5xx (Telegram delivers a 5xx again, forever) and never a traceback in the log.
  Every request that reaches the bus is one the worker can read.
- A body over the limit is refused before it is read; then the adapter still answers.
"""

from __future__ import annotations

import itertools
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fuzzing import Tracebacks, examples, raw_post, wait_for
from hypothesis import given
from hypothesis import strategies as st
from standins import AdapterThreads
from standins.telegram_api import BotAPI

from adapters.telegram import FEEDBACK_UP, MAX_BODY_BYTES, TelegramAdapter
from bot.bus import DEAD, Bus
from bot.commands import Stores
from bot.config import Settings
from bot.connection import connect
from bot.memory import ConversationMemory

WEBHOOK_URL = "https://sprbot.example.com/telegram/hook"
SECRET = "fuzz-webhook-secret_0123"
ADMIN_ID = 900_001

_users = itertools.count(7_000_000)


@dataclass
class Stack:
    api: BotAPI
    port: int
    bus: Bus
    served: object
    tracebacks: Tracebacks

    def post(self, body: bytes, secret: str | None = SECRET) -> int:
        headers = {"Content-Type": "application/json"}
        if secret is not None:
            headers["X-Telegram-Bot-Api-Secret-Token"] = secret
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/telegram/hook", data=body, headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def answers_a_message(self) -> None:
        """The adapter (and the worker behind it) still answer a private message."""
        user = BotAPI.user(next(_users), "Ann")
        chat = self.api.private_chat(user)
        update = self.api.message(chat, user, "Are you still there?", deliver=False)
        assert self.post(json.dumps(update).encode()) == 200

        def finished():
            return [
                m
                for m in self.api.in_chat(chat["id"])
                if any(d.startswith(FEEDBACK_UP) for d in m.callback_data())
            ]

        wait_for(finished, "the answer to a message", timeout=60, alive=self.served.alive)


@pytest.fixture(scope="module")
def stack(served) -> Iterator[Stack]:
    tracebacks = Tracebacks()
    logging.getLogger().addHandler(tracebacks)
    threads = AdapterThreads()
    with BotAPI() as api:
        settings = Settings(
            _env_file=None,
            redis_url=served.redis_url,
            data_dir=served.data_dir,
            telegram_token=api.token,
            telegram_api_url=api.url,
            telegram_admins=[str(ADMIN_ID)],
            telegram_webhook_url=WEBHOOK_URL,
            telegram_webhook_secret=SECRET,
            faq_embeddings="off",
        )
        bus = Bus(connect(settings), max_text_chars=settings.max_text_chars)
        adapter = TelegramAdapter(
            settings,
            bus,
            ConversationMemory(bus.redis),
            stores=Stores.build(settings, bus.redis),
            edit_interval_s=0.05,
            group_interval_s=0.05,
            typing_every_s=1.0,
            consumer="fuzz-telegram",
        )
        port = threads.start(adapter, "telegram-adapter")
        try:
            yield Stack(api, port, bus, served, tracebacks)
        finally:
            threads.stop_all()
            logging.getLogger().removeHandler(tracebacks)


# -- what is sent ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=16,
)
ENTITY_TYPES = ["mention", "bot_command", "text_mention", "bold", "url", "custom_emoji", "zzz"]
entities = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(ENTITY_TYPES) | st.text(max_size=8),
            "offset": st.integers(-5, 70_000),
            "length": st.integers(-5, 70_000),
        },
        optional={"user": st.just(BotAPI.user(1, "Bot", is_bot=True)) | json_values},
    ),
    max_size=5,
)
texts = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["@sprbot_bot hi", "/faq list", "/start@sprbot_bot", "/x@other_bot", "@"]),
    st.integers(4097, 100_000).map(lambda n: "x" * n),  # far over Telegram's 4,096
    st.sampled_from(["\ud83d", "a\udc00b", "\ud83d\ude00", "\x00\x1f"]),  # lone surrogates too
)
MESSAGE_FIELDS = ["text", "entities", "chat", "from", "date", "message_id", "caption",
                  "reply_to_message", "message_thread_id", "is_topic_message", "sender_chat",
                  "photo", "caption_entities", "forward_origin"]  # fmt: skip


@st.composite
def updates(draw, api: BotAPI) -> tuple[str, bytes]:
    """(what it is, body) of an update Telegram could not have sent, or a random one."""
    kind = draw(st.sampled_from(["message", "update", "json", "bytes"]))
    if kind == "json":
        return kind, json.dumps(draw(json_values)).encode()
    if kind == "bytes":
        return kind, draw(st.binary(max_size=300))
    user = BotAPI.user(next(_users), draw(st.text(min_size=1, max_size=20)))
    chat = api.private_chat(user) if draw(st.booleans()) else api.group(-100 - next(_users))
    update = api.message(chat, user, draw(texts), deliver=False)
    message = update["message"]
    if draw(st.booleans()):
        message["entities"] = draw(entities)
    for name in draw(st.lists(st.sampled_from(MESSAGE_FIELDS), max_size=3)):
        if draw(st.booleans()):
            message.pop(name, None)
        else:
            message[name] = draw(json_values)
    if kind == "update":  # the update around it
        if draw(st.booleans()):
            key = draw(st.sampled_from(["edited_message", "channel_post", "callback_query", "zz"]))
            update[key] = update.pop("message")
        if draw(st.booleans()):
            update["update_id"] = draw(json_values)
    return kind, json.dumps(update).encode()


def wrong_secrets() -> st.SearchStrategy[str | None]:
    token = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=80)
    return st.one_of(
        st.none(),
        token,
        st.sampled_from([SECRET.upper(), SECRET[:-1], SECRET + "0", SECRET[1:], "", SECRET * 2]),
    ).filter(lambda s: s is None or s.strip() != SECRET)


# -- the tests ---------------------------------------------------------------------------------


def test_without_the_secret_token_every_request_gets_403_and_changes_nothing(stack, tally):
    last_id = stack.served.last_request_id()
    calls = len(stack.api.calls)

    @examples(150)
    @given(data=st.data(), secret=wrong_secrets())
    def send(data, secret: str | None) -> None:
        tally["telegram: wrong secret"] += 1
        _, body = data.draw(updates(stack.api))
        assert stack.post(body, secret) == 403

    send()
    assert stack.served.last_request_id() == last_id, "a refused update reached the bus"
    assert stack.api.calls[calls:] == []  # not a placeholder, not "typing"
    assert not stack.tracebacks.records, stack.tracebacks.summary()
    stack.answers_a_message()


def test_malformed_updates_get_200_or_400_never_a_5xx(stack, tally):
    dead = stack.bus.redis.xlen(DEAD)
    seen: set[str] = set()

    @examples(300)
    @given(data=st.data())
    def send(data) -> None:
        tally["telegram: malformed update"] += 1
        kind, body = data.draw(updates(stack.api))
        seen.add(kind)
        status = stack.post(body)
        assert status in (200, 400), (status, body[:300])

    send()
    assert seen == {"message", "update", "json", "bytes"}
    stack.answers_a_message()
    stack.served.quiet()
    assert stack.bus.redis.xlen(DEAD) == dead  # every request it queued was readable
    assert not stack.tracebacks.records, stack.tracebacks.summary()


def test_a_body_over_the_limit_is_refused_before_it_is_read(stack, tally):
    last_id = stack.served.last_request_id()

    @examples(30)
    @given(size=st.integers(MAX_BODY_BYTES + 1, 1 << 40))
    def send(size: int) -> None:
        tally["telegram: oversized body"] += 1
        head = {
            "X-Telegram-Bot-Api-Secret-Token": SECRET,
            "Content-Type": "application/json",
            "Content-Length": str(size),
        }
        assert raw_post(stack.port, "/telegram/hook", head, b"{") == 413

    send()
    assert stack.served.last_request_id() == last_id
    stack.answers_a_message()
