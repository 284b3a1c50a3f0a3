"""Chat commands on a real Redis: permissions, the audit trail, usage lines, every verb."""

from __future__ import annotations

import io
import time

import pytest

from adapters.console import ConsoleChannel
from bot.audit import AuditLog
from bot.bus import Bus
from bot.commands import CommandContext, Stores, dispatch
from bot.config import load_settings
from bot.connection import connect
from bot.faq import Exchange
from bot.memory import ConversationMemory
from bot.registry import EVENTS


@pytest.fixture
def settings(data_dir, embedded_redis, monkeypatch):
    monkeypatch.setenv("SPRBOT_SLACK_ADMINS", "UADMIN")
    monkeypatch.setenv("SPRBOT_TELEGRAM_ADMINS", "4242")
    monkeypatch.setenv("SPRBOT_FAQ_EMBEDDINGS", "off")  # the embedder has tests of its own
    return load_settings()


class Training:
    """Stands in for the training package's queue: records what the commands asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def retrain(self, context: CommandContext) -> str:
        self.calls.append(("retrain", context.who))
        return "Queued retrain job 1."

    def status(self, context: CommandContext) -> str:
        self.calls.append(("status", context.who))
        return "Step 3/10."

    def cancel(self, context: CommandContext) -> str:
        self.calls.append(("cancel", context.who))
        return "Cancelled."


@pytest.fixture
def stores(settings) -> Stores:
    return Stores.build(settings, connect(settings), training=Training())


def ctx(stores: Stores, user: str, platform: str = "slack", **kw) -> CommandContext:
    memory = ConversationMemory(stores.faq.redis)
    return CommandContext(
        platform, f"{platform}/T1/C1", user, memory, platform=platform, stores=stores, **kw
    )


def audit(stores: Stores) -> list[tuple[str, str, str, str]]:
    return [(e.platform, e.user_id, e.command, e.result) for e in stores.audit.entries()]


def test_a_non_admin_is_refused_nothing_changes_and_it_is_audited(stores):
    pubsub = stores.models.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(EVENTS)
    user = ctx(stores, "UBOB")
    for text in ("/faq add Where is lunch? | At noon", "/model use v1", "/retrain", "/train"):
        reply = dispatch(text, user)
        verb = " ".join(text.split()[:2]) if text.startswith(("/faq", "/model")) else text
        assert reply == (
            f"Sorry, {verb} is for admins only, and your slack id UBOB is not on the admin list. "
            "An admin can add your id to SPRBOT_SLACK_ADMINS."
        )
    assert stores.faq.entries() == []
    assert stores.models.current() == "base"
    assert stores.training.calls == []  # nothing was enqueued
    assert pubsub.get_message(timeout=0.5) is None  # no worker was told to swap
    assert audit(stores) == [
        ("slack", "UBOB", "/faq add", "refused"),
        ("slack", "UBOB", "/model use", "refused"),
        ("slack", "UBOB", "/retrain", "refused"),
        ("slack", "UBOB", "/train", "refused"),
    ]
    entry = stores.audit.entries()[0]
    assert entry.arguments == "Where is lunch? | At noon" and entry.channel == "slack"
    assert abs(entry.at - time.time()) < 60


def test_an_admin_runs_them_and_every_action_is_audited(stores):
    admin = ctx(stores, "UADMIN", user_name="Ada")
    assert dispatch("/faq add Where is lunch? | At noon, floor 2", admin) == (
        "Added FAQ #1 (approved): Where is lunch?"
    )
    [entry] = stores.faq.entries()
    assert (entry.answer, entry.source, entry.author, entry.channel) == (
        "At noon, floor 2",
        "admin",
        "slack:UADMIN",
        "slack",
    )
    assert dispatch("/retrain", admin) == "Queued retrain job 1."
    assert dispatch("/train", admin) == "Step 3/10."
    assert dispatch("/train cancel", admin) == "Cancelled."
    assert stores.training.calls == [
        ("retrain", "slack:UADMIN"),
        ("status", "slack:UADMIN"),
        ("cancel", "slack:UADMIN"),
    ]
    assert dispatch("/faq approve 1", admin) == "FAQ #1 is already approved."
    assert dispatch("/faq remove #1", admin) == "Removed FAQ #1: Where is lunch?"
    assert dispatch("/faq remove 1", admin) == "There is no FAQ entry #1: /faq list shows the ids."
    assert audit(stores) == [
        ("slack", "UADMIN", "/faq add", "ok"),
        ("slack", "UADMIN", "/retrain", "ok"),
        ("slack", "UADMIN", "/train", "ok"),
        ("slack", "UADMIN", "/train cancel", "ok"),
        ("slack", "UADMIN", "/faq approve", "ok"),
        ("slack", "UADMIN", "/faq remove", "ok"),
        ("slack", "UADMIN", "/faq remove", "error"),
    ]
    assert stores.audit.entries()[0].user_name == "Ada"


def test_malformed_arguments_get_the_usage_line(stores):
    admin = ctx(stores, "UADMIN")
    assert dispatch("/faq add no bar here", admin) == (
        "Give a question and an answer, separated by |.\nUsage: /faq add <question> | <answer>"
    )
    assert dispatch("/faq add  | only an answer", admin).endswith(
        "Usage: /faq add <question> | <answer>"
    )
    assert dispatch("/faq approve twelve", admin) == (
        "'twelve' is not an entry id\nUsage: /faq approve <id>"
    )
    assert dispatch("/faq remove", admin) == "Usage: /faq remove <id>"
    assert dispatch("/model use", admin).endswith("Usage: /model use <version>")
    assert dispatch("/train now", admin) == "Usage: /train"
    assert dispatch("/faq export everything", admin) == "Usage: /faq export"
    reply = dispatch("/faq", admin)
    assert reply.startswith("/faq needs one of:") and "/faq approve <id>" in reply
    assert dispatch("/faq frobnicate", admin).startswith("/faq needs one of:")
    assert dispatch("/frobnicate", admin) == (
        "Unknown command /frobnicate. Send /help for the commands I understand."
    )
    assert stores.faq.entries() == []
    assert [r for *_, r in audit(stores)] == ["usage"] * 7


def test_admins_are_per_platform_and_telegram_bot_suffix_is_stripped(stores):
    telegram_admin = ctx(stores, "4242", platform="telegram")
    assert dispatch("/faq@sprbot_bot add Q1? | A1", telegram_admin).startswith("Added FAQ #1")
    same_id_on_slack = ctx(stores, "4242", platform="slack")
    assert "is for admins only" in dispatch("/faq add Q2? | A2", same_id_on_slack)
    web_user = ctx(stores, "UADMIN", platform="web")  # web has no admin list
    assert dispatch("/faq add Q3? | A3", web_user) == (
        "Sorry, /faq add is for admins only, and your web id UADMIN is not on the admin list."
    )
    assert [e.question for e in stores.faq.entries()] == ["Q1?"]


def test_help_lists_what_the_user_may_run(stores):
    user_help = dispatch("/help", ctx(stores, "UBOB"))
    assert "/reset" in user_help and "/faq list" in user_help and "/model list" in user_help
    assert "/faq add" not in user_help.split("(Admins have more")[0]
    assert "/retrain" not in user_help.split("(Admins have more")[0]
    admin_help = dispatch("/help", ctx(stores, "UADMIN"))
    assert "/faq add <question> | <answer>  add an approved entry" in admin_help
    assert "/retrain  fine-tune on the approved FAQ; promote if better  (admin)" in admin_help
    assert "/train cancel" in admin_help and "/model rollback" in admin_help


def test_faq_list_shows_candidates_to_admins_only(stores):
    stores.faq.add("Approved question?", "Yes", source="admin", author="slack:UADMIN")
    stores.faq.record_feedback(Exchange("Thumbed question?", "Thumbed answer"), user="slack:UBOB")
    user_list = dispatch("/faq list", ctx(stores, "UBOB"))
    assert user_list == "#1 [approved] Approved question? → Yes (admin, slack:UADMIN)"
    admin_list = dispatch("/faq list", ctx(stores, "UADMIN"))
    assert "#2 [candidate] Thumbed question? → Thumbed answer (feedback, slack:UBOB)" in admin_list
    assert dispatch("/faq approve 2", ctx(stores, "UADMIN")) == (
        "Approved FAQ #2: Thumbed question?"
    )
    assert stores.faq.get(2).status == "approved"
    export = dispatch("/faq export", ctx(stores, "UADMIN"))
    assert '"instruction": "Thumbed question?"' in export and '"output": "Thumbed answer"' in export


def test_faq_correct_records_the_right_answer_to_the_answer_replied_to(stores):
    admin = ctx(stores, "UADMIN")
    assert dispatch("/faq correct Noon.", admin) == (
        "Reply to one of my answers with this, so I know which one you correct.\n"
        "Usage: /faq correct <answer>"
    )
    stores.faq.remember([Exchange("When is lunch?", "Midnight.", "slack-abc")], ttl_s=60)
    replied = stores.faq.answered("slack-abc")  # what an adapter looks up for the reply
    assert replied == Exchange("When is lunch?", "Midnight.", "slack-abc")
    reply = dispatch("/faq correct At noon.", ctx(stores, "UADMIN", replying_to=replied))
    assert reply == "Thanks, noted. Added FAQ #1 (approved): When is lunch?"
    entry = stores.faq.get(1)
    assert (entry.answer, entry.status, entry.source) == ("At noon.", "approved", "correction")
    refused = dispatch("/faq correct Never.", ctx(stores, "UBOB", replying_to=replied))
    assert "is for admins only" in refused and stores.faq.get(1).answer == "At noon."


def test_without_a_training_queue_retrain_says_so(settings):
    stores = Stores.build(settings, connect(settings))  # no training hook
    reply = dispatch("/retrain", ctx(stores, "UADMIN"))
    assert reply.startswith("Retraining is not set up in this process")
    assert audit(stores) == [("slack", "UADMIN", "/retrain", "error")]


def test_console_user_is_admin_by_default_and_not_when_configured_otherwise(settings, monkeypatch):
    client = connect(settings)
    bus = Bus(client)
    memory = ConversationMemory(client)
    out = io.StringIO()
    console = ConsoleChannel(bus, memory, out=out, stores=Stores.build(settings, client))
    assert console.handle("/faq add Console question? | Console answer").startswith("Added FAQ #1")
    assert AuditLog(client).entries()[-1].platform == "console"

    monkeypatch.setenv("SPRBOT_CONSOLE_ADMINS", "")
    locked = Stores.build(load_settings(), client)
    console = ConsoleChannel(bus, memory, out=out, stores=locked)
    assert "is for admins only" in console.handle("/faq remove 1")
    assert locked.faq.get(1).question == "Console question?"
