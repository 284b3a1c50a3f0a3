"""Chat commands: declared once, with their permission, dispatched the same way everywhere.

A command is a leading ``/`` verb, with a subcommand where it has several
(``/faq add <question> | <answer>``). Each is declared with ``@command(name, usage, summary,
admin=...)``; ``dispatch`` does the rest, identically for Slack, Telegram, the console and the
web API, so no adapter checks a permission itself:

- Authorisation, server-side on every call: an ``admin`` command runs only for a user id in
  its platform's admin list (``SPRBOT_SLACK_ADMINS``, ``SPRBOT_TELEGRAM_ADMINS``,
  ``SPRBOT_CONSOLE_ADMINS``). Anyone else gets a refusal, and nothing runs.
- The audit trail: every admin command, allowed or refused, goes to ``sprbot:audit``.
- Malformed arguments (``UsageError``) get the usage line; an error a user can act on
  (``SprbotError``) its message; anything else a short apology, with the traceback in the log.

Telegram appends ``@botname`` to commands in groups, which is stripped here. Commands never
reach the model.

``/retrain`` and ``/train`` are declared here with their permission, and call the
``Training`` that the composition root puts into ``Stores`` (the training package's queue):
a non-admin is refused and audited before anything can be enqueued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from bot.audit import AuditLog, Result
from bot.errors import SprbotError
from bot.faq import AddResult, Exchange, FaqEntry, FaqStore, make_embedder
from bot.memory import ConversationMemory
from bot.registry import BASE, ModelRegistry, ModelVersion
from bot.schemas import platform_of

if TYPE_CHECKING:
    import redis

    from bot.config import Settings

log = logging.getLogger(__name__)

PLATFORMS = ("slack", "telegram", "console")  # the platforms that have an admin list
_LIST_LIMIT = 50  # entries per /faq list reply; `sprbot faq list` shows them all


class UsageError(SprbotError):
    """Malformed arguments: ``dispatch`` answers with this message and the usage line."""


class Training(Protocol):
    """What ``/retrain`` and ``/train`` call. The training package implements it (one RQ job
    on queue ``training`` at a time) and the composition root passes it to ``Stores``. Each
    method returns the reply for the admin; it is only called for admins."""

    def retrain(self, context: CommandContext) -> str: ...

    def status(self, context: CommandContext) -> str: ...

    def cancel(self, context: CommandContext) -> str: ...


@dataclass(frozen=True)
class Stores:
    """What commands act on: built once per process (``Stores.build``) and shared."""

    faq: FaqStore
    models: ModelRegistry
    audit: AuditLog
    admins: Mapping[str, frozenset[str]]  # platform -> admin user ids
    training: Training | None = None

    @classmethod
    def build(
        cls, settings: Settings, client: redis.Redis, *, training: Training | None = None
    ) -> Stores:
        return cls(
            faq=FaqStore(
                client,
                make_embedder(settings.faq_embeddings),
                duplicate_threshold=settings.faq_duplicate_threshold,
            ),
            models=ModelRegistry(client, settings.data_dir),
            audit=AuditLog(client),
            admins={p: settings.admins(p) for p in PLATFORMS},
            training=training,
        )


@dataclass(frozen=True)
class CommandContext:
    """Who asked, where, and the stores a command may touch.

    ``platform`` is ``slack``, ``telegram``, ``console`` or ``web``; left empty, it is the
    channel name up to its first ``-`` (``console-ab12`` -> ``console``). ``replying_to`` is
    the bot answer the user's message replies to, when the platform says so (``/faq
    correct``); ``FaqStore.answered(request_id)`` finds it from the request id.
    """

    channel: str
    conversation: str
    user_id: str
    memory: ConversationMemory
    platform: str = ""
    user_name: str = ""
    stores: Stores | None = None
    replying_to: Exchange | None = None
    # Where later messages for this command go (a training job's progress): opaque to bot,
    # like ChatRequest.reply_to.
    reply_to: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.platform:
            object.__setattr__(self, "platform", platform_of(self.channel))

    @property
    def is_admin(self) -> bool:
        if self.stores is None:
            return False
        return self.user_id in self.stores.admins.get(self.platform, frozenset())

    @property
    def who(self) -> str:
        """``platform:user id``: how the registry and the FAQ record who did something."""
        return f"{self.platform}:{self.user_id}"


@dataclass(frozen=True)
class Command:
    name: str  # "/reset", or "/faq add" for a subcommand
    usage: str
    summary: str
    run: Callable[[CommandContext, str], str]
    admin: bool = False


COMMANDS: dict[str, Command] = {}


def command(name: str, usage: str, summary: str, *, admin: bool = False):
    """Declare a command; the decorated function gets the context and the argument text.

    ``admin=True``: only the platform's admins may run it, and every call is audited.
    """

    def register(run: Callable[[CommandContext, str], str]) -> Callable[[CommandContext, str], str]:
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is declared twice")
        COMMANDS[name] = Command(name, usage, summary, run, admin)
        return run

    return register


def parse(text: str) -> tuple[str, str] | None:
    """``("/verb", "arguments")`` for a command, None for ordinary text."""
    stripped = text.strip()
    if not stripped.startswith("/") or stripped.startswith("//"):
        return None
    verb, _, rest = stripped.partition(" ")
    verb = verb.split("@", 1)[0].lower()
    return verb, rest.strip()


def lookup(verb: str, arguments: str) -> tuple[Command | None, str]:
    """The command for ``verb`` and its first argument word (``/faq add``), else for the verb
    alone; with the arguments left for it."""
    sub, _, rest = arguments.partition(" ")
    found = COMMANDS.get(f"{verb} {sub.lower()}") if sub else None
    if found is not None:
        return found, rest.strip()
    return COMMANDS.get(verb), arguments


def dispatch(text: str, context: CommandContext) -> str | None:
    """Run the command in ``text`` and return the reply; None when it is not a command."""
    parsed = parse(text)
    if parsed is None:
        return None
    verb, arguments = parsed
    found, arguments = lookup(verb, arguments)
    if found is None:
        group = [c for c in COMMANDS.values() if c.name.split(" ", 1)[0] == verb]
        if group:
            return f"{verb} needs one of:\n" + "\n".join(_line(c) for c in group)
        return f"Unknown command {verb}. Send /help for the commands I understand."
    if found.admin and not context.is_admin:
        _audit(context, found, arguments, "refused")
        return _refusal(found, context)
    result: Result = "ok"
    try:
        reply = found.run(context, arguments)
    except UsageError as exc:
        result = "usage"
        reply = f"{exc}\nUsage: {found.usage}" if str(exc) else f"Usage: {found.usage}"
    except SprbotError as exc:
        result, reply = "error", _sentence(str(exc))
    except Exception:
        log.exception("command %s failed", found.name)
        result, reply = "error", f"Sorry, {found.name} failed. The error is in the bot's log."
    if found.admin:
        _audit(context, found, arguments, result, reply)
    return reply


def _refusal(found: Command, context: CommandContext) -> str:
    if context.stores is None:
        return f"Sorry, {found.name} is not available here."
    hint = ""
    if context.platform in PLATFORMS:
        hint = f" An admin can add your id to SPRBOT_{context.platform.upper()}_ADMINS."
    return (
        f"Sorry, {found.name} is for admins only, and your {context.platform} id "
        f"{context.user_id} is not on the admin list.{hint}"
    )


def _audit(
    context: CommandContext, found: Command, arguments: str, result: Result, reply: str = ""
) -> None:
    if context.stores is None:
        log.warning("admin command %s by %s not audited: no stores", found.name, context.who)
        return
    context.stores.audit.record(
        platform=context.platform,
        channel=context.channel,
        user_id=context.user_id,
        user_name=context.user_name,
        command=found.name,
        arguments=arguments,
        result=result,
        detail=reply.split("\n", 1)[0],
    )


def _line(c: Command) -> str:
    return f"  {c.usage}  {c.summary}" + ("  (admin)" if c.admin else "")


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def _stores(context: CommandContext) -> Stores:
    if context.stores is None:
        raise SprbotError("this command is not available here: this channel has no FAQ store")
    return context.stores


def _entry_id(arguments: str) -> int:
    text = arguments.strip().lstrip("#")
    if not text.isdigit():
        raise UsageError(f"{arguments!r} is not an entry id" if arguments else "")
    return int(text)


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe(entry: FaqEntry) -> str:
    """One line per entry, as /faq list and `sprbot faq list` show it."""
    return (
        f"#{entry.id} [{entry.status}] {_short(entry.question, 60)} → {_short(entry.answer)}"
        f" ({entry.source}, {entry.author or '?'})"
    )


def describe_add(result: AddResult) -> str:
    e = result.entry
    if result.outcome == "added":
        return f"Added FAQ #{e.id} ({e.status}): {_short(e.question)}"
    similar = f"similarity {result.similarity:.2f}"
    if result.outcome == "updated":
        return f"Updated FAQ #{e.id} ({e.status}), a near duplicate ({similar}) of: {e.question}"
    return f"FAQ #{e.id} ({e.status}) already says that ({similar}): {e.question}"


def describe_version(record: ModelVersion | None, current: str) -> str:
    """One line per model version, as /model list shows it."""
    if record is None:
        mark = "▶" if current == BASE else " "
        return f"{mark} {BASE}  the configured model (SPRBOT_MODEL)"
    mark = "▶" if record.version == current else " "
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(record.created_at))
    parts = [record.kind, created]
    if record.requested_by:
        parts.append(f"by {record.requested_by}")
    if record.parent:
        parts.append(f"from {record.parent}")
    if record.dataset_hash:
        rows = f" ({record.dataset_rows} rows)" if record.dataset_rows is not None else ""
        parts.append(f"data {record.dataset_hash[:8]}{rows}")
    parts += [
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.metrics.items()
    ]
    if record.notes:
        parts.append(record.notes)
    return f"{mark} {record.version}  " + ", ".join(parts)


# -- everyone ---------------------------------------------------------------------------------


@command("/help", "/help", "show the commands")
def _help(context: CommandContext, arguments: str) -> str:
    admin = context.is_admin
    lines = ["Ask me anything in plain words. Commands:"]
    lines += [_line(c) for c in COMMANDS.values() if admin or not c.admin]
    if not admin:
        lines.append("(Admins have more: /faq add, /retrain, /model use, …)")
    return "\n".join(lines)


@command("/reset", "/reset", "forget this conversation")
def _reset(context: CommandContext, arguments: str) -> str:
    forgot = context.memory.clear(context.conversation)
    return "Conversation cleared." if forgot else "Nothing to clear: this conversation is new."


@command("/faq list", "/faq list", "show the FAQ (admins also see candidates)")
def _faq_list(context: CommandContext, arguments: str) -> str:
    entries = _stores(context).faq.entries(None if context.is_admin else "approved")
    if not entries:
        return "The FAQ is empty. An admin adds entries with /faq add <question> | <answer>."
    lines = [describe(e) for e in entries[:_LIST_LIMIT]]
    if len(entries) > _LIST_LIMIT:
        lines.append(f"… and {len(entries) - _LIST_LIMIT} more (`sprbot faq list` shows all).")
    return "\n".join(lines)


@command("/model list", "/model list", "show the model versions and which one serves")
def _model_list(context: CommandContext, arguments: str) -> str:
    models = _stores(context).models
    current = models.current()
    lines = ["Model versions (▶ serving):"]
    lines += [describe_version(r, current) for r in reversed(models.versions())]
    lines.append(describe_version(None, current))
    return "\n".join(lines)


# -- admins -----------------------------------------------------------------------------------


@command(
    "/faq add",
    "/faq add <question> | <answer>",
    "add an approved entry (a near duplicate is updated)",
    admin=True,
)
def _faq_add(context: CommandContext, arguments: str) -> str:
    question, bar, answer = arguments.partition("|")
    if not bar or not question.strip() or not answer.strip():
        raise UsageError("Give a question and an answer, separated by |.")
    result = _stores(context).faq.add(
        question, answer, source="admin", author=context.who, channel=context.channel
    )
    return describe_add(result)


@command("/faq approve", "/faq approve <id>", "approve a candidate entry", admin=True)
def _faq_approve(context: CommandContext, arguments: str) -> str:
    entry, changed = _stores(context).faq.approve(_entry_id(arguments))
    if not changed:
        return f"FAQ #{entry.id} is already approved."
    return f"Approved FAQ #{entry.id}: {_short(entry.question)}"


@command("/faq remove", "/faq remove <id>", "delete an entry", admin=True)
def _faq_remove(context: CommandContext, arguments: str) -> str:
    entry = _stores(context).faq.remove(_entry_id(arguments))
    return f"Removed FAQ #{entry.id}: {_short(entry.question)}"


@command("/faq export", "/faq export", "the whole FAQ as Alpaca JSON", admin=True)
def _faq_export(context: CommandContext, arguments: str) -> str:
    if arguments:
        raise UsageError()
    return _stores(context).faq.export("json")


@command(
    "/faq correct",
    "/faq correct <answer>",
    "in reply to one of my answers: record the right answer",
    admin=True,
)
def _faq_correct(context: CommandContext, arguments: str) -> str:
    if context.replying_to is None:
        raise UsageError("Reply to one of my answers with this, so I know which one you correct.")
    if not arguments.strip():
        raise UsageError("Give the right answer after /faq correct.")
    result = _stores(context).faq.record_correction(
        context.replying_to, arguments, user=context.who, channel=context.channel
    )
    return "Thanks, noted. " + describe_add(result)


@command("/model use", "/model use <version>", "serve a model version", admin=True)
def _model_use(context: CommandContext, arguments: str) -> str:
    version = arguments.strip()
    if not version or " " in version:
        raise UsageError("Name one version; /model list shows them.")
    previous = _stores(context).models.promote(version)
    if previous == version:
        return f"{version} already serves; I asked the workers to load it again where it failed."
    return (
        f"Switching from {previous} to {version}. The workers load it in the background and "
        f"swap it in between decode steps; answers under way finish on {previous}."
    )


@command("/model rollback", "/model rollback", "serve the previous version again", admin=True)
def _model_rollback(context: CommandContext, arguments: str) -> str:
    if arguments:
        raise UsageError()
    was, now = _stores(context).models.rollback()
    return (
        f"Rolling back from {was} to {now}. The workers swap it in between decode steps; "
        f"answers under way finish on {was}."
    )


def _training(context: CommandContext) -> Training:
    training = _stores(context).training
    if training is None:
        raise SprbotError(
            "retraining is not set up in this process: it was started without the training "
            "queue. Ask the operator to run `sprbot worker train` and the current adapter"
        )
    return training


@command("/retrain", "/retrain", "fine-tune on the approved FAQ; promote if better", admin=True)
def _retrain(context: CommandContext, arguments: str) -> str:
    if arguments:
        raise UsageError()
    return _training(context).retrain(context)


@command("/train", "/train", "progress of the running training job", admin=True)
def _train(context: CommandContext, arguments: str) -> str:
    if arguments:
        raise UsageError()
    return _training(context).status(context)


@command("/train cancel", "/train cancel", "cancel the running training job", admin=True)
def _train_cancel(context: CommandContext, arguments: str) -> str:
    if arguments:
        raise UsageError()
    return _training(context).cancel(context)


__all__ = [
    "COMMANDS",
    "Command",
    "CommandContext",
    "Exchange",
    "Stores",
    "Training",
    "UsageError",
    "command",
    "dispatch",
    "parse",
]
