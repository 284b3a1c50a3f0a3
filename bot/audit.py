"""The audit trail: every admin action, allowed or refused, in the ``sprbot:audit`` stream.

One entry per action: who (platform user id and name), on which platform and channel, which
command with which arguments, when, and the result (``ok``, ``refused``, ``usage``,
``error``). The stream is capped approximately at ``maxlen`` entries, far more than a team's
admins produce; read it with ``XRANGE sprbot:audit - +`` or ``AuditLog.entries``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import redis

AUDIT = "sprbot:audit"

Result = Literal["ok", "refused", "usage", "error"]

# Arguments can hold a whole FAQ answer; the trail keeps enough to tell what happened.
_MAX_FIELD = 500


@dataclass(frozen=True)
class AuditEntry:
    at: float
    platform: str
    channel: str
    user_id: str
    user_name: str
    command: str
    arguments: str
    result: Result
    detail: str


class AuditLog:
    def __init__(self, client: redis.Redis, *, maxlen: int = 100_000) -> None:
        self.redis = client
        self.maxlen = maxlen

    def record(
        self,
        *,
        platform: str,
        channel: str,
        user_id: str,
        command: str,
        arguments: str,
        result: Result,
        detail: str = "",
        user_name: str = "",
    ) -> None:
        self.redis.xadd(
            AUDIT,
            {
                "at": repr(time.time()),
                "platform": platform,
                "channel": channel,
                "user_id": user_id,
                "user_name": user_name,
                "command": command,
                "arguments": arguments[:_MAX_FIELD],
                "result": result,
                "detail": detail[:_MAX_FIELD],
            },
            maxlen=self.maxlen,
            approximate=True,
        )

    def entries(self, count: int = 100) -> list[AuditEntry]:
        """The newest ``count`` entries, oldest first."""
        raw = self.redis.xrevrange(AUDIT, count=count)
        out = []
        for _, fields in reversed(raw):
            f = {k.decode(): v.decode() for k, v in fields.items()}
            out.append(
                AuditEntry(
                    at=float(f["at"]),
                    platform=f["platform"],
                    channel=f["channel"],
                    user_id=f["user_id"],
                    user_name=f.get("user_name", ""),
                    command=f["command"],
                    arguments=f["arguments"],
                    result=f["result"],  # type: ignore[arg-type]
                    detail=f.get("detail", ""),
                )
            )
        return out
