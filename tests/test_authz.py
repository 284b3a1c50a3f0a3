"""The authorisation matrix: every admin command x {admin, non-admin, unknown user} x every
platform with an admin list, each through that platform's real adapter path.

- Slack: a signed slash command POSTed to the real adapter's ``/slack/events`` (HTTP mode);
  the answer arrives at the command's ``response_url`` on the Web API stand-in.
- Telegram: an update POSTed to the real adapter's webhook (secret token); the answer is the
  bot's message in the chat, on the Bot API stand-in.
- Console: the real ``ConsoleChannel`` of ``sprbot chat``.

The user kinds: the admin is on the platform's admin list; the non-admin is an ordinary user
of the platform; the unknown user is one the platform does not name: a Slack request with
no user id, a Telegram anonymous group admin (Telegram shows the group, not the person, so
sprbot must not guess), a console session whose OS user name is empty.

Before each attempt the state is set up so that the command would change something (a
candidate to approve, a version to promote, a job to cancel...). Then: a non-admin or unknown
user is refused in words, and the FAQ store, the model registry and the training queue are
byte for byte what they were; an admin runs the command (state changes where the command
changes state); every attempt, allowed or refused, is one new ``sprbot:audit`` entry naming
who, what and the result.

The commands come from ``bot.commands.COMMANDS``, and the platforms from ``PLATFORMS``: a
new admin command is covered without editing this file (give it an entry in ``ARRANGE`` to
check what an admin's run changes), and a new platform with an admin list fails here until
it has a driver. The web API (``adapters/web.py``) dispatches commands too, but has no admin
list (it is not in ``PLATFORMS``), so it refuses every admin command to everyone; give it a
driver here when it gets admins.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis
from standins import AdapterThreads
from standins.slack_api import SlackAPI, SlackSender
from standins.telegram_api import BotAPI

from adapters.console import ConsoleChannel
from adapters.slack import SlackAdapter
from adapters.telegram import ANSWER_KEY, TelegramAdapter
from adapters.web import WebAdapter
from bot.bus import REQUESTS, Bus
from bot.commands import COMMANDS, PLATFORMS, CommandContext, Stores
from bot.config import Settings
from bot.connection import connect
from bot.faq import Exchange
from bot.memory import ConversationMemory
from training.jobs import RUNNING, TrainingQueue

ADMIN_COMMANDS = sorted(name for name, command in COMMANDS.items() if command.admin)
USER_KINDS = ("admin", "non-admin", "unknown")
# Where the state lives that only admins may change.
STATE_PREFIXES = ("sprbot:faq:", "sprbot:model", "sprbot:train:", "rq:")

SLACK_SECRET = "authz-signing-secret-0123456789"
TELEGRAM_SECRET = "authz-webhook-secret_0123"
WEBHOOK_URL = "https://sprbot.example.com/telegram/hook"
GROUP_ANONYMOUS_BOT = {"id": 1087968824, "is_bot": True, "first_name": "Group"}
IDS = {
    "slack": {"admin": "U0ADMIN", "non-admin": "U0MEMBER", "unknown": ""},
    "telegram": {"admin": "900001", "non-admin": "900002", "unknown": None},  # None: the group
    "console": {"admin": "ada", "non-admin": "bob", "unknown": ""},
}

_n = itertools.count(1)


@dataclass
class World:
    """The stores commands act on, and ways to put them in a state a command would change."""

    stores: Stores
    training: TrainingQueue
    redis: redis.Redis

    def reset(self) -> None:
        """No retrain holds the slot, none is queued: /retrain may start one."""
        self.redis.delete(RUNNING)
        self.training.queue.empty()

    def entry(self, status: str = "approved") -> int:
        n = next(_n)
        question = f"Where is meeting room {uuid.uuid4().hex[:8]} number {n}?"
        added = self.stores.faq.add(
            question, f"On floor {n}.", source="feedback", author="slack:U9", status=status
        )
        return added.entry.id

    def version(self) -> str:
        """A registered model version that does not serve."""
        version, folder = self.stores.models.allocate()
        (folder / "config.json").write_text("{}")
        self.stores.models.register(version, requested_by="test")
        return version

    def promoted(self) -> str:
        """A version promoted over the one serving, so that there is one to roll back to."""
        self.stores.models.promote(self.version())
        return ""

    def running_job(self) -> str:
        """A retrain in the queue (no training worker runs here, so it stays queued)."""
        self.entry()
        admin = CommandContext(
            "slack", "slack/T/C", "U0ADMIN", ConversationMemory(self.redis), stores=self.stores
        )
        assert self.training.retrain(admin).startswith("Retraining started")
        return ""

    def state(self) -> dict[bytes, bytes]:
        """Every key that only admin commands change, with its value, byte for byte (DUMP;
        hashes and sets as their sorted members: their DUMP follows Redis's bucket order,
        which a background rehash changes without any write)."""
        keys = sorted({k for p in STATE_PREFIXES for k in self.redis.scan_iter(match=p + "*")})
        return {k: self._value(k) for k in keys}

    def _value(self, key: bytes) -> object:
        kind = self.redis.type(key)
        if kind == b"hash":
            return sorted(self.redis.hgetall(key).items())
        if kind == b"set":
            return sorted(self.redis.smembers(key))
        return self.redis.dump(key)


# What an admin's run needs, set up before every attempt (a non-admin's too, so that a
# permission check that let them through would show): the command's arguments, and whether
# it then changes state. A command without an entry is run without arguments, and only its
# refusal and audit are checked.
ARRANGE: dict[str, Callable[[World], tuple[str, bool]]] = {
    "/faq add": lambda w: (f"Is there parking {uuid.uuid4().hex[:8]}? | Yes, level -1.", True),
    "/faq approve": lambda w: (str(w.entry("candidate")), True),
    "/faq remove": lambda w: (str(w.entry()), True),
    "/faq export": lambda w: ("", False),
    "/faq correct": lambda w: ("It is on floor 3, not 2.", True),  # drivers reply to an answer
    "/model use": lambda w: (w.version(), True),
    "/model rollback": lambda w: (w.promoted(), True),
    "/retrain": lambda w: ("", w.entry() > 0),  # an approved entry to train on
    "/train": lambda w: (w.running_job(), False),
    "/train cancel": lambda w: (w.running_job(), True),
}


@dataclass
class Driver:
    """Sends a command as one kind of user through one platform's real adapter path."""

    platform: str
    # (command text, user kind) -> the reply shown, and the user id the adapter must record
    send: Callable[[str, str], tuple[str, str]]
    replies_to_answers: bool  # whether /faq correct can name the answer it corrects
    cleanup: list[Callable[[], None]] = field(default_factory=list)


def settings_for(embedded_redis, data_dir, **extra) -> Settings:
    return Settings(
        _env_file=None,
        redis_url=embedded_redis.url,
        data_dir=data_dir,
        slack_admins=[IDS["slack"]["admin"]],
        telegram_admins=[IDS["telegram"]["admin"]],
        console_admins=[IDS["console"]["admin"]],
        faq_embeddings="off",
        **extra,
    )


def slack_driver(world: World, embedded_redis, data_dir) -> Iterator[Driver]:
    threads = AdapterThreads()
    with SlackAPI() as slack:
        settings = settings_for(
            embedded_redis,
            data_dir,
            slack_bot_token=slack.token,
            slack_signing_secret=SLACK_SECRET,
            slack_api_url=slack.url,
        )
        bus = Bus(world.redis)
        adapter = SlackAdapter(settings, bus, ConversationMemory(world.redis), stores=world.stores)
        port = threads.start(adapter, "slack-adapter")
        sender = SlackSender(f"http://127.0.0.1:{port}/slack/events", SLACK_SECRET)

        def send(text: str, who: str) -> str:
            verb, _, arguments = text.partition(" ")
            name = uuid.uuid4().hex
            status, _ = sender.command(
                verb,
                arguments,
                user=IDS["slack"][who],
                channel="C0AUTHZ",
                response_url=slack.response_url(name),
            )
            assert status == 200
            slack.wait_for(lambda: slack.responses.get(name), 30, f"the answer to {text!r}")
            return "\n".join(r["text"] for r in slack.responses[name]), IDS["slack"][who]

        try:
            # A slash command answers no earlier message: /faq correct is a usage error there
            # (its thread form is in test_slack.py).
            yield Driver("slack", send, replies_to_answers=False)
        finally:
            threads.stop_all()


def telegram_driver(world: World, embedded_redis, data_dir) -> Iterator[Driver]:
    threads = AdapterThreads()
    with BotAPI() as api:
        settings = settings_for(
            embedded_redis,
            data_dir,
            telegram_token=api.token,
            telegram_api_url=api.url,
            telegram_webhook_url=WEBHOOK_URL,
            telegram_webhook_secret=TELEGRAM_SECRET,
        )
        adapter = TelegramAdapter(
            settings, Bus(world.redis), ConversationMemory(world.redis), stores=world.stores
        )
        port = threads.start(adapter, "telegram-adapter")

        def send(text: str, who: str) -> str:
            user_id = IDS["telegram"][who]
            if user_id is None:  # an anonymous admin: the message comes from the group itself
                chat = api.group(-1_000_000_000_000 - next(_n), "Team")
                update = api.message(chat, GROUP_ANONYMOUS_BOT, text, deliver=False)
                update["message"]["sender_chat"] = chat
                user_id = str(chat["id"])
            else:
                user = BotAPI.user(int(user_id), who.title())
                chat = api.private_chat(user)
                update = api.message(chat, user, text, deliver=False)
            if text.startswith("/faq correct"):  # in reply to an answer of the bot
                rid = f"telegram-authz-{next(_n)}"
                world.stores.faq.remember([Exchange("Where is room 7?", "Floor 2.", rid)], 600)
                answer = 10_000 + next(_n)
                world.redis.set(f"{ANSWER_KEY}{chat['id']}:{answer}", rid)
                update["message"]["reply_to_message"] = {
                    "message_id": answer,
                    "date": int(time.time()) - 60,
                    "chat": chat,
                    "from": api.bot,
                    "text": "Floor 2.",
                }
            shown = len(api.in_chat(chat["id"]))
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/telegram/hook",
                data=json.dumps(update).encode(),
                headers={
                    "Content-Type": "application/json",
                    "X-Telegram-Bot-Api-Secret-Token": TELEGRAM_SECRET,
                },
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200  # answered once the update is handled
            return "\n".join(m.text for m in api.in_chat(chat["id"])[shown:]), user_id

        try:
            yield Driver("telegram", send, replies_to_answers=True)
        finally:
            threads.stop_all()


def console_driver(world: World, embedded_redis, data_dir) -> Iterator[Driver]:
    bus = Bus(world.redis)
    memory = ConversationMemory(world.redis)

    def send(text: str, who: str) -> str:
        console = ConsoleChannel(bus, memory, out=io.StringIO(), stores=world.stores)
        console.user = IDS["console"][who]
        console.last = Exchange("Where is room 7?", "Floor 2.", f"console-authz-{next(_n)}")
        return console.handle(text), console.user

    yield Driver("console", send, replies_to_answers=True)


DRIVERS = {"slack": slack_driver, "telegram": telegram_driver, "console": console_driver}


@pytest.fixture
def world(data_dir, embedded_redis) -> World:
    client = connect(settings_for(embedded_redis, data_dir))
    settings = settings_for(embedded_redis, data_dir)
    training = TrainingQueue(client, settings)
    return World(Stores.build(settings, client, training=training), training, client)


def test_the_matrix_covers_every_admin_command_and_platform():
    assert ADMIN_COMMANDS, "bot.commands declares no admin command"
    assert {"/faq add", "/model use", "/retrain"} <= set(ADMIN_COMMANDS)
    missing = [p for p in PLATFORMS if p not in DRIVERS]
    assert not missing, f"platforms with an admin list but no driver here: {missing}"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_only_admins_change_state_and_every_attempt_is_audited(
    platform, world, data_dir, embedded_redis
):
    drivers = DRIVERS[platform](world, embedded_redis, data_dir)
    driver = next(drivers)
    wrong: list[str] = []
    try:
        for command, who in itertools.product(ADMIN_COMMANDS, USER_KINDS):
            world.reset()
            arguments, changes = ARRANGE.get(command, lambda w: ("", False))(world)
            if command == "/faq correct" and not driver.replies_to_answers:
                changes = False  # a usage error: there is no answer to correct
            before, audited = world.state(), len(world.stores.audit.entries(1000))
            reply, user_id = driver.send(f"{command} {arguments}".strip(), who)
            after, entries = world.state(), world.stores.audit.entries(1000)
            cell = f"{platform} {who} {command}"

            new = entries[audited:]
            if len(new) != 1:
                wrong.append(f"{cell}: {len(new)} audit entries, not 1")
                continue
            entry = new[0]
            if (entry.platform, entry.user_id, entry.command) != (platform, user_id, command):
                wrong.append(f"{cell}: audited as {entry}")
            if who == "admin":
                if entry.result == "refused" or "admins only" in reply:
                    wrong.append(f"{cell}: refused to an admin: {reply[:150]!r}")
                elif changes and after == before:
                    wrong.append(
                        f"{cell}: an admin's run changed nothing ({entry.result}: {reply[:150]!r})"
                    )
            else:
                if entry.result != "refused":
                    wrong.append(f"{cell}: audited {entry.result!r}, not 'refused'")
                if "is for admins only" not in reply:
                    wrong.append(f"{cell}: not refused in words: {reply[:150]!r}")
                if after != before:
                    changed = sorted(k.decode() for k in set(before) ^ set(after)) or sorted(
                        k.decode() for k in before if before[k] != after.get(k)
                    )
                    wrong.append(f"{cell}: changed state: {changed}")
    finally:
        drivers.close()
    assert not wrong, "\n".join(wrong)
    cells = len(ADMIN_COMMANDS) * len(USER_KINDS)
    assert len(world.stores.audit.entries(1000)) == cells  # and no attempt went unrecorded


# -- the web API: no admin list, so every caller is refused ------------------------------------

WEB_KEY = "authz-web-key-0123456789"
# Who calls, and what they must get: a user id (the command runs, is refused and audited) or an
# HTTP status (refused before any command runs, so there is nothing to audit).
WEB_CALLERS: dict[str, str | int] = {
    "valid key": "key-" + hashlib.sha256(WEB_KEY.encode()).hexdigest()[:8],
    "no keys set": "local",  # the adapter serves 127.0.0.1 only, without keys
    "wrong key": 401,
    "no key": 401,
}
WEB_HEADERS = {
    "valid key": {"Authorization": f"Bearer {WEB_KEY}"},
    "no keys set": {},
    "wrong key": {"Authorization": f"Bearer {WEB_KEY[:-1]}x"},
    "no key": {},
}


def test_the_web_api_refuses_every_admin_command_to_every_caller(world, data_dir, embedded_redis):
    assert "web" not in PLATFORMS  # when it is, it needs a driver in DRIVERS instead
    threads = AdapterThreads()
    ports = {}
    for keys in ([WEB_KEY], []):
        settings = settings_for(embedded_redis, data_dir, web_api_keys=keys)
        adapter = WebAdapter(
            settings, Bus(world.redis), ConversationMemory(world.redis), stores=world.stores
        )
        ports[bool(keys)] = threads.start(adapter, "web-adapter")
    wrong: list[str] = []
    try:
        for command, caller in itertools.product(ADMIN_COMMANDS, WEB_CALLERS):
            world.reset()
            arguments, _ = ARRANGE.get(command, lambda w: ("", False))(world)
            text = f"{command} {arguments}".strip()
            before, audited = world.state(), len(world.stores.audit.entries(1000))
            queued = world.redis.xlen(REQUESTS)
            port = ports[caller != "no keys set"]
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps({"messages": [{"role": "user", "content": text}]}).encode(),
                headers={"Content-Type": "application/json", **WEB_HEADERS[caller]},
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    status, body = response.status, json.load(response)
            except urllib.error.HTTPError as exc:
                status, body = exc.code, json.load(exc)
            after, new = world.state(), world.stores.audit.entries(1000)[audited:]
            cell = f"web {caller} {command}"

            if after != before:
                changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
                wrong.append(f"{cell}: changed state: {sorted(k.decode() for k in changed)}")
            if world.redis.xlen(REQUESTS) != queued:
                wrong.append(f"{cell}: reached the model")
            expected = WEB_CALLERS[caller]
            if isinstance(expected, int):  # refused at the door, before any command runs
                if status != expected or body["error"]["code"] != "invalid_api_key":
                    wrong.append(f"{cell}: {status} {body}, not {expected}")
                if new:
                    wrong.append(f"{cell}: audited a request that named no valid key: {new}")
                continue
            reply = body["choices"][0]["message"]["content"] if status == 200 else str(body)
            if "is for admins only" not in reply:
                wrong.append(f"{cell}: not refused in words: {reply[:150]!r}")
            if len(new) != 1:
                wrong.append(f"{cell}: {len(new)} audit entries, not 1")
            elif (new[0].platform, new[0].user_id, new[0].command, new[0].result) != (
                "web",
                expected,
                command,
                "refused",
            ):
                wrong.append(f"{cell}: audited as {new[0]}")
    finally:
        threads.stop_all()
    assert not wrong, "\n".join(wrong)
    entries = world.stores.audit.entries(1000)
    audited_callers = sum(isinstance(v, str) for v in WEB_CALLERS.values())
    assert len(entries) == len(ADMIN_COMMANDS) * audited_callers  # none unrecorded
    assert WEB_KEY not in json.dumps([vars(e) for e in entries])  # the key is never recorded
