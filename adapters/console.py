"""The console channel: ``sprbot chat`` in a terminal, through the same bus as Slack.

Each terminal session is its own channel (``console-<id>``), so its replies never reach
another terminal. Commands go to ``bot.commands`` as platform ``console``, whose admins are
``SPRBOT_CONSOLE_ADMINS`` (default: the local OS user); everything else is a ``ChatRequest``
that an inference worker answers, streamed back as deltas. A terminal cannot reply to a
message, so ``/faq correct`` corrects the last answer of the session.
"""

from __future__ import annotations

import getpass
import socket
import sys
import time
import uuid
from collections.abc import Callable
from typing import TextIO

from bot.bus import Bus, Display, ReplyAssembler
from bot.commands import CommandContext, Stores, dispatch
from bot.faq import Exchange
from bot.logs import request_context
from bot.memory import ConversationMemory
from bot.schemas import ChatRequest, request_id


class ConsoleChannel:
    def __init__(
        self,
        bus: Bus,
        memory: ConversationMemory,
        *,
        out: TextIO = sys.stdout,
        timeout_s: float = 600.0,
        stores: Stores | None = None,
    ) -> None:
        self.bus = bus
        self.memory = memory
        self.stores = stores
        self.out = out
        self.timeout_s = timeout_s
        self.session = uuid.uuid4().hex[:12]
        self.channel = f"console-{self.session}"
        self.user = getpass.getuser()
        self.conversation = f"console/{self.user}@{socket.gethostname()}/{self.session}"
        self._turn = 0
        self.last: Exchange | None = None  # the last answer, for /faq correct

    def handle(self, text: str) -> str:
        """Answer one line of input; the streamed answer is written to ``out`` as it comes."""
        context = CommandContext(
            self.channel,
            self.conversation,
            self.user,
            self.memory,
            platform="console",
            user_name=self.user,
            stores=self.stores,
            replying_to=self.last,
        )
        reply = dispatch(text, context)
        if reply is not None:
            self.out.write(reply + "\n")
            self.show_notices()
            self.out.flush()
            return reply
        self._turn += 1
        request = ChatRequest(
            id=request_id("console", self.session, self._turn),
            channel=self.channel,
            conversation=self.conversation,
            user_id=self.user,
            user_name=self.user,
            text=text,
        )
        with request_context(request.id):
            self.bus.submit(request)
            answer = self.await_reply(request.id, self.out.write)
        self.last = Exchange(text, answer, request.id) if answer else None
        return answer

    def await_reply(self, request_id: str, show: Callable[[str], object]) -> str:
        """Show the reply's text as it streams in; return the final text (or the error)."""
        assembler = ReplyAssembler()
        shown = ""
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            replies = self.bus.read_replies(self.channel, "console", block_ms=1000)
            for reply in replies:
                display = assembler.feed(reply.event)
                if display is None:
                    continue
                if display.request_id != request_id:
                    self._notice(display)
                    continue
                if display.text.startswith(shown):
                    show(display.text[len(shown) :])
                else:  # a retried attempt restarted the text
                    show("\n" + display.text)
                shown = display.text
                self.out.flush()
                if display.done:
                    self.bus.ack_replies(self.channel, *(r.entry_id for r in replies))
                    show("\n")
                    return display.text
            self.bus.ack_replies(self.channel, *(r.entry_id for r in replies))
        show("\n(no answer yet: is an inference worker running? see `sprbot status`)\n")
        return ""

    def show_notices(self) -> None:
        """Show what arrived for this terminal besides answers (a retrain's report)."""
        assembler = ReplyAssembler()
        while replies := self.bus.read_replies(self.channel, "console", block_ms=None):
            for reply in replies:
                display = assembler.feed(reply.event)
                if display is not None:
                    self._notice(display)
            self.bus.ack_replies(self.channel, *(r.entry_id for r in replies))

    def _notice(self, display: Display) -> None:
        """A finished message that is not the answer being awaited, on lines of its own."""
        if not display.done:
            return  # progress lines: /train shows the running job
        self.out.write(f"\n[{display.request_id}] {display.text}\n")
        for path in display.attachments:
            self.out.write(f"  (attached: {path})\n")
        self.out.flush()

    def close(self) -> None:
        """Delete this session's reply stream: nobody will read it again."""
        self.bus.redis.delete(f"sprbot:chat:replies:{self.channel}")
