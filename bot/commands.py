"""Chat commands: declared once, dispatched the same way for every channel.

A command is recognised by its leading ``/`` verb (``/reset``, ``/help``). Adapters hand the
text of a command to ``dispatch`` and show the reply; commands never reach the model.
Telegram appends ``@botname`` to commands in groups, which is stripped here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from bot.memory import ConversationMemory


@dataclass(frozen=True)
class CommandContext:
    """Who asked, where, and the stores a command may touch."""

    channel: str
    conversation: str
    user_id: str
    memory: ConversationMemory


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    summary: str
    run: Callable[[CommandContext, str], str]


COMMANDS: dict[str, Command] = {}


def command(name: str, usage: str, summary: str):
    """Declare a command; the decorated function gets the context and the argument text."""

    def register(run: Callable[[CommandContext, str], str]) -> Callable[[CommandContext, str], str]:
        COMMANDS[name] = Command(name, usage, summary, run)
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


def dispatch(text: str, context: CommandContext) -> str | None:
    """Run the command in ``text`` and return the reply; None when it is not a command."""
    parsed = parse(text)
    if parsed is None:
        return None
    verb, arguments = parsed
    found = COMMANDS.get(verb)
    if found is None:
        return f"Unknown command {verb}. Send /help for the commands I understand."
    return found.run(context, arguments)


@command("/help", "/help", "show the commands")
def _help(context: CommandContext, arguments: str) -> str:
    lines = ["Ask me anything in plain words. Commands:"]
    lines += [f"  {c.usage}  {c.summary}" for c in COMMANDS.values()]
    return "\n".join(lines)


@command("/reset", "/reset", "forget this conversation")
def _reset(context: CommandContext, arguments: str) -> str:
    forgot = context.memory.clear(context.conversation)
    return "Conversation cleared." if forgot else "Nothing to clear: this conversation is new."
