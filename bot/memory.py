"""Conversation memory: the recent turns of each conversation, in Redis.

Turns live in a list per conversation key (``sprbot:conv:<key>``) that expires after a TTL of
inactivity and holds at most ``max_turns`` entries. The worker trims further to the model's
token budget when it builds a prompt, since only it has the tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

PREFIX = "sprbot:conv:"


def conversation_key(conversation: str) -> str:
    return PREFIX + conversation


@dataclass(frozen=True)
class MemoryWrite:
    """One exchange to record: the worker hands it to the bus, which writes it together with
    the final reply, so a user who answers at once is already remembered."""

    key: str
    turns: tuple[str, str]  # the user's and the assistant's turn, as JSON
    max_turns: int
    ttl_s: int


class ConversationMemory:
    def __init__(self, client: redis.Redis, *, ttl_s: int = 7 * 86_400, max_turns: int = 40):
        self.redis = client
        self.ttl_s = ttl_s
        self.max_turns = max_turns

    def turns(self, conversation: str) -> list[dict[str, str]]:
        """The stored turns, oldest first, as ``{role, content}`` dicts."""
        raw = self.redis.lrange(conversation_key(conversation), 0, -1)
        return [json.loads(item) for item in raw]

    def exchange(self, conversation: str, user_text: str, assistant_text: str) -> MemoryWrite:
        """The write that records one exchange, for the bus to do with the final
        (``append`` does it at once)."""
        return MemoryWrite(
            conversation_key(conversation),
            (
                json.dumps({"role": "user", "content": user_text}),
                json.dumps({"role": "assistant", "content": assistant_text}),
            ),
            self.max_turns,
            self.ttl_s,
        )

    def append(self, conversation: str, user_text: str, assistant_text: str) -> None:
        """Record one exchange; refresh the TTL; keep the newest ``max_turns`` turns."""
        write = self.exchange(conversation, user_text, assistant_text)
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(write.key, *write.turns)
        pipe.ltrim(write.key, -write.max_turns, -1)
        pipe.expire(write.key, write.ttl_s)
        pipe.execute()

    def clear(self, conversation: str) -> bool:
        """Forget a conversation (``/reset``); True if there was anything to forget."""
        return bool(self.redis.delete(conversation_key(conversation)))
