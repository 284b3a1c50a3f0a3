"""The chat bus: Redis Streams between adapters and inference workers.

Keys (see DESIGN.md, "Redis layout")::

    sprbot:chat:requests            stream, group "inference"   ChatRequest JSON
    sprbot:chat:replies:<channel>   stream, group "adapters"    reply events JSON
    sprbot:chat:dead                stream                      what could not be served, and why
    sprbot:seen:<request id>        string, TTL                 ingress dedupe
    sprbot:final:<request id>       string, TTL                 the terminal reply was written

Delivery is at-least-once; the effects a user sees are exactly-once:

- ``submit`` sets ``seen`` with SET NX, so a platform's re-delivery enqueues nothing.
- A worker acknowledges a request only together with its final (or error) event, in one Lua
  script: SET NX on ``final``, XADD the event if that key was new, XACK, XDEL. Nothing can
  happen between writing the answer and acknowledging it, so a crash leaves either both or
  neither, and two workers that both finish a request write one final event between them.
- Acknowledged entries are deleted (XACK then XDEL, as Redis 8.2's XACKDEL does). The requests
  stream therefore holds exactly the backlog: entries not yet delivered plus those in flight.
  ``XLEN`` measures it in O(1) on every Redis version (XINFO GROUPS ``lag`` needs Redis 7),
  and backpressure keeps it bounded, which is why that stream is never trimmed by MAXLEN:
  trimming it would silently drop requests nobody has answered. Reply and dead streams are
  trimmed with ``MAXLEN ~``, and the dedupe keys expire.
- A request left pending by a worker that died is taken over with XAUTOCLAIM by ``reclaim``
  once it has been idle for ``min_idle_ms``. One delivered ``max_deliveries`` times goes to
  the dead stream, and its user gets an error reply.

The scripts touch several keys, so on Redis Cluster all ``sprbot:`` keys would need one hash
slot; a single Redis server (or a primary with replicas) is what sprbot deploys.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar

import redis
from pydantic import ValidationError

from bot.memory import MemoryWrite
from bot.metrics import count_request
from bot.schemas import (
    ChatRequest,
    DeltaEvent,
    ErrorCode,
    ErrorEvent,
    FinalEvent,
    ProgressEvent,
    ReplyEvent,
    TextTooLong,
    Usage,
    check_text_length,
    parse_reply,
)

log = logging.getLogger(__name__)

REQUESTS = "sprbot:chat:requests"
REQUEST_GROUP = "inference"
REPLY_GROUP = "adapters"
DEAD = "sprbot:chat:dead"

BUSY_MESSAGE = "Sorry, I'm busy right now. Please try again shortly."
FAILED_MESSAGE = "Sorry, something went wrong — the admins have been told."


def reply_stream(channel: str) -> str:
    """The reply stream of one channel (``slack``, ``telegram``, ``console``, ...)."""
    return f"sprbot:chat:replies:{channel}"


def seen_key(request_id: str) -> str:
    return f"sprbot:seen:{request_id}"


def final_key(request_id: str) -> str:
    return f"sprbot:final:{request_id}"


def cancel_key(request_id: str) -> str:
    return f"sprbot:cancel:{request_id}"


# Ingress in one round trip, atomically: dedupe, then backpressure, then enqueue.
# KEYS: seen, requests.  ARGV: seen ttl, max backlog, request JSON, refuse ("1": too long).
_SUBMIT = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return {'duplicate'} end
if ARGV[4] == '1' then return {'too_long'} end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[2]) then return {'busy'} end
return {'queued', redis.call('XADD', KEYS[2], '*', 'data', ARGV[3])}
"""

# The end of a request: terminal reply at most once, optional dead letter, then ack + delete.
# With a written reply goes the exchange into conversation memory, if one is given.
# KEYS: final, reply stream, source stream, dead stream[, conversation memory].
# ARGV: final ttl, reply JSON ('' none), reply maxlen, group, entry id ('' none),
#       dead maxlen, dead reason ('' none), raw entry, deliveries
#       [, memory turns kept, memory ttl, user turn, assistant turn].
_SETTLE = """
local written = 0
if ARGV[2] ~= '' and redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'data', ARGV[2])
  written = 1
  if KEYS[5] then
    redis.call('RPUSH', KEYS[5], ARGV[12], ARGV[13])
    redis.call('LTRIM', KEYS[5], -tonumber(ARGV[10]), -1)
    redis.call('EXPIRE', KEYS[5], ARGV[11])
  end
end
if ARGV[7] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'reason', ARGV[7],
             'stream', KEYS[3], 'entry', ARGV[5], 'deliveries', ARGV[9], 'data', ARGV[8])
end
if ARGV[5] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[4], ARGV[5])
  redis.call('XDEL', KEYS[3], ARGV[5])
end
return written
"""

# Forget a consumer that holds nothing: what it holds must stay pending for others to reclaim.
# KEYS: stream. ARGV: group, consumer.
_RETIRE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class SubmitResult:
    """What ``submit`` did. Only ``queued`` reaches a worker; ``busy`` and ``too_long`` have
    already had their error reply written to the channel's reply stream."""

    status: Literal["queued", "duplicate", "busy", "too_long"]
    entry_id: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status == "queued"


class Delivery:
    """One delivery of a request to a worker: the request, its stream entry and its attempt.

    It numbers the events the worker writes for this attempt, so build them here
    (``delivery.delta(text)``) and hand them to ``Bus.emit``; end it with ``Bus.finish`` or
    ``Bus.fail``, which acknowledge the entry.
    """

    __slots__ = ("request", "entry_id", "attempt", "_seq")

    def __init__(self, request: ChatRequest, entry_id: str, attempt: int) -> None:
        self.request = request
        self.entry_id = entry_id
        self.attempt = attempt
        self._seq = 0

    def _next(self) -> dict[str, Any]:
        self._seq += 1
        r = self.request
        return {
            "request_id": r.id,
            "channel": r.channel,
            "reply_to": r.reply_to,
            "attempt": self.attempt,
            "seq": self._seq,
        }

    def delta(self, text: str) -> DeltaEvent:
        return DeltaEvent(text=text, **self._next())

    def progress(self, text: str) -> ProgressEvent:
        return ProgressEvent(text=text, **self._next())

    def final(
        self, text: str, *, usage: Usage | None = None, truncated: bool = False
    ) -> FinalEvent:
        return FinalEvent(text=text, usage=usage, truncated=truncated, **self._next())

    def error(self, code: ErrorCode, message: str) -> ErrorEvent:
        return ErrorEvent(code=code, text=message, **self._next())

    def __repr__(self) -> str:
        return f"Delivery({self.request.id!r}, entry={self.entry_id}, attempt={self.attempt})"


@dataclass(frozen=True)
class Reply:
    """A reply event as an adapter receives it; pass ``entry_id`` to ``Bus.ack_replies``."""

    entry_id: str
    event: ReplyEvent


@dataclass(frozen=True)
class BusStats:
    """For ``sprbot status`` and worker heartbeats."""

    backlog: int  # requests not yet answered: waiting plus in flight
    pending: int  # of those, delivered to a worker and not yet acknowledged
    dead: int  # entries in the dead stream
    lag_s: float = 0.0  # age of the oldest request not yet answered, by Redis's clock


class Bus:
    """The Redis Streams bus. One per process, shared by its threads (redis-py pools).

    The limits are parameters, not settings lookups, so that the composition root decides:

    - ``max_deliveries``: deliveries of one request before it is dead-lettered.
    - ``max_backlog``: requests waiting or in flight before ``submit`` answers "busy".
    - ``max_text_chars``: the longest request text; longer gets a ``too_long`` refusal.
    - ``dedupe_ttl_s``: how long a request id is remembered. Slack retries within minutes;
      Telegram keeps an unconfirmed update for up to 24 hours, hence a day.
    - ``final_ttl_s``: how long "answered" is remembered; must outlast the last reclaim.
    - ``reply_maxlen`` / ``dead_maxlen``: approximate caps on those streams' lengths.
    - ``stale_consumer_ms``: a group member idle this long and holding nothing is dropped
      when ``reclaim`` runs (a process killed before it could ``retire``). A live one that
      quiet is simply added again by its next read.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        max_deliveries: int = 3,
        max_backlog: int = 256,
        max_text_chars: int = 4000,
        dedupe_ttl_s: int = 86_400,
        final_ttl_s: int = 86_400,
        reply_maxlen: int = 10_000,
        dead_maxlen: int = 10_000,
        stale_consumer_ms: int = 3_600_000,
    ) -> None:
        for name, value in [
            ("max_deliveries", max_deliveries),
            ("max_backlog", max_backlog),
            ("max_text_chars", max_text_chars),
            ("dedupe_ttl_s", dedupe_ttl_s),
            ("final_ttl_s", final_ttl_s),
            ("reply_maxlen", reply_maxlen),
            ("dead_maxlen", dead_maxlen),
            ("stale_consumer_ms", stale_consumer_ms),
        ]:
            if value < 1:
                raise ValueError(f"Bus: {name} must be at least 1, got {value}")
        self.redis = client
        self.max_deliveries = max_deliveries
        self.max_backlog = max_backlog
        self.max_text_chars = max_text_chars
        self.dedupe_ttl_s = dedupe_ttl_s
        self.final_ttl_s = final_ttl_s
        self.reply_maxlen = reply_maxlen
        self.dead_maxlen = dead_maxlen
        self.stale_consumer_ms = stale_consumer_ms
        self._swept: dict[str, float] = {}  # stream -> when its group was last swept
        self._submit = client.register_script(_SUBMIT)
        self._settle = client.register_script(_SETTLE)
        self._retire = client.register_script(_RETIRE)
        self._groups: set[tuple[str, str]] = set()
        self._ensure_group(REQUESTS, REQUEST_GROUP)

    # -- ingress (adapters) ------------------------------------------------------------------

    def submit(self, request: ChatRequest) -> SubmitResult:
        """Enqueue a request once. Refusals are answered here, with an error reply event.

        A re-delivered platform event has the same id and comes back ``duplicate`` with no
        effect, even when its first delivery was refused: the user got one reply either way.
        """
        refusal = ""
        try:
            check_text_length(request.text, self.max_text_chars)
        except TextTooLong as exc:
            refusal = str(exc)
        data = request.model_dump_json()
        status, *rest = self._submit(
            keys=[seen_key(request.id), REQUESTS],
            args=[self.dedupe_ttl_s, self.max_backlog, data, int(bool(refusal))],
        )
        status = _text(status)
        outcome = "accepted" if status == "queued" else status
        count_request(request.channel, outcome)
        log.info("request %s: %s", request.id, outcome, extra={"request_id": request.id})
        if status == "queued":
            return SubmitResult("queued", _text(rest[0]))
        if status == "busy":
            log.warning("backlog at its bound of %d: refused %s", self.max_backlog, request.id)
            self._refuse(request, "busy", BUSY_MESSAGE)
        elif status == "too_long":
            self._refuse(request, "too_long", refusal)
        return SubmitResult(status)

    def _refuse(self, request: ChatRequest, code: ErrorCode, message: str) -> None:
        event = Delivery(request, "", attempt=0).error(code, message)
        self._settle_call(self.redis, event, source=REQUESTS, group=REQUEST_GROUP, entry_id="")

    # -- inference workers -------------------------------------------------------------------

    def read_requests(
        self, consumer: str, count: int = 16, block_ms: int | None = None
    ) -> list[Delivery]:
        """New requests for ``consumer``; waits up to ``block_ms`` for one (None: no wait).

        Entries that are not a valid ``ChatRequest`` go to the dead stream with the reason,
        and are acknowledged, instead of raising: one bad entry must not stop a worker. So an
        empty list does not mean the stream is empty. Keep ``block_ms`` below the client's
        ``socket_timeout``, if it has one.
        """
        entries = self._read(REQUESTS, REQUEST_GROUP, consumer, count, block_ms)
        return self._accept([(entry_id, fields, 1) for entry_id, fields in entries])

    def reclaim(self, consumer: str, min_idle_ms: int, count: int = 16) -> list[Delivery]:
        """Take over requests another consumer left unacknowledged for ``min_idle_ms``.

        A live worker keeps what it holds fresh with ``touch``; set ``min_idle_ms`` above a few
        of its touch intervals, or a slow worker's request is answered twice over (the user
        still sees one final). A request delivered ``max_deliveries`` times already is
        dead-lettered, and its user told, instead.
        """
        claimed = self._claim(REQUESTS, REQUEST_GROUP, consumer, min_idle_ms, count)
        return self._accept(claimed)

    def touch(self, consumer: str, entry_ids: Sequence[str]) -> None:
        """Reset the idle time of requests ``consumer`` is still working on (XCLAIM JUSTID:
        no delivery counted). ``reclaim`` then takes only what a dead or stuck worker left,
        whatever a generation's length; without it, a batch slower than the reclaim bound
        is taken over (and generated twice) while it runs."""
        if entry_ids:
            self.redis.xclaim(REQUESTS, REQUEST_GROUP, consumer, 0, list(entry_ids), justid=True)

    def cancel(self, request_id: str) -> None:
        """Ask the worker to stop generating ``request_id``: its asker went away. It ends with
        a ``cancelled`` error within a moment; one not started yet ends as soon as it starts."""
        self.redis.set(cancel_key(request_id), 1, ex=self.dedupe_ttl_s)

    def cancelled(self, request_ids: Sequence[str]) -> list[str]:
        """Those of ``request_ids`` whose asker went away (one round trip)."""
        if not request_ids:
            return []
        flags = self.redis.mget([cancel_key(rid) for rid in request_ids])
        return [rid for rid, flag in zip(request_ids, flags, strict=True) if flag]

    def retire(self, consumer: str, channel: str | None = None) -> bool:
        """On a clean stop: drop ``consumer`` from the requests group (or from ``channel``'s
        reply group) unless it still holds entries, which stay for another to reclaim.
        Otherwise every process that ever ran stays listed in the group. True if dropped."""
        stream, group = (
            (REQUESTS, REQUEST_GROUP) if channel is None else (reply_stream(channel), REPLY_GROUP)
        )
        try:
            return bool(self._retire(keys=[stream], args=[group, consumer]))
        except redis.RedisError:  # no such group, or Redis gone at stop: a stale entry, harmless
            return False

    def emit(self, *events: DeltaEvent | ProgressEvent) -> None:
        """Write streaming events (deltas, progress) to their channels' reply streams.

        Several events go in one round trip. Final and error events are not accepted here:
        they end a request, so they go through ``finish``/``fail``, which write them once.
        """
        pipe = self.redis.pipeline(transaction=False)
        self._add_events(pipe, events)
        pipe.execute()

    def _add_events(
        self, pipe: redis.client.Pipeline, events: Iterable[DeltaEvent | ProgressEvent]
    ) -> None:
        for event in events:
            if not isinstance(event, DeltaEvent | ProgressEvent):
                raise TypeError(
                    f"emit() takes delta and progress events, not {event.kind!r}: "
                    "end a request with finish() or fail()"
                )
            pipe.xadd(
                reply_stream(event.channel),
                {"data": event.model_dump_json()},
                maxlen=self.reply_maxlen,
                approximate=True,
            )

    def finish(self, delivery: Delivery, text: str) -> bool:
        """Write the final reply unless one exists for this request, then acknowledge it.

        Returns whether this call wrote it; False means another worker answered first.
        """
        return self.finish_many([(delivery, text)])[0]

    def finish_many(
        self,
        items: Iterable[tuple[Delivery, str | FinalEvent]],
        *,
        events: Iterable[DeltaEvent | ProgressEvent] = (),
        remember: Mapping[str, MemoryWrite] | None = None,
    ) -> list[bool]:
        """``finish`` for several deliveries in one round trip (a batch ending together).

        ``events`` (the last coalesced deltas, say) are emitted first in that same round trip,
        so an adapter usually reads them together with the final, in one wake-up. An item is
        the answer's text, or its final event already built with ``delivery.final`` (to carry
        the token usage), after its last delta. ``remember`` maps request ids to the exchange
        that goes into conversation memory with the final, atomically and only once.
        """
        events = list(events)  # numbered before the finals, even when given lazily
        finals = [(d, a if isinstance(a, FinalEvent) else d.final(a)) for d, a in items]
        return self._settle_many(finals, events, remember)

    def fail(self, delivery: Delivery, code: ErrorCode, message: str) -> bool:
        """End a request with an error reply (``message`` is shown to the user), once."""
        return self._settle_many([(delivery, delivery.error(code, message))])[0]

    def announce(self, event: FinalEvent | ErrorEvent) -> bool:
        """Write the final or error event of work that did not come from the request stream (a
        training job reporting to the admin who started it), once per request id."""
        return bool(
            self._settle_call(self.redis, event, source=REQUESTS, group=REQUEST_GROUP, entry_id="")
        )

    # -- adapters ----------------------------------------------------------------------------

    def read_replies(
        self, channel: str, consumer: str, count: int = 64, block_ms: int | None = None
    ) -> list[Reply]:
        """Reply events for ``channel``; acknowledge each with ``ack_replies`` once shown.

        Malformed entries are dead-lettered and acknowledged here, never returned.
        """
        stream = reply_stream(channel)
        self._ensure_group(stream, REPLY_GROUP)
        entries = self._read(stream, REPLY_GROUP, consumer, count, block_ms)
        return self._accept_replies(stream, [(i, f, 1) for i, f in entries])

    def reclaim_replies(
        self, channel: str, consumer: str, min_idle_ms: int, count: int = 64
    ) -> list[Reply]:
        """Take over reply events an adapter replica read and never acknowledged."""
        stream = reply_stream(channel)
        self._ensure_group(stream, REPLY_GROUP)
        claimed = self._claim(stream, REPLY_GROUP, consumer, min_idle_ms, count)
        return self._accept_replies(stream, claimed)

    def ack_replies(self, channel: str, *entry_ids: str) -> None:
        """Acknowledge (and delete) reply events the adapter has acted on."""
        if not entry_ids:
            return
        stream = reply_stream(channel)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(stream, REPLY_GROUP, *entry_ids)
        pipe.xdel(stream, *entry_ids)
        pipe.execute()

    # -- observability -----------------------------------------------------------------------

    def stats(self) -> BusStats:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xlen(REQUESTS)
        pipe.xpending(REQUESTS, REQUEST_GROUP)
        pipe.xlen(DEAD)
        pipe.xrange(REQUESTS, count=1)  # the oldest entry: its id is when it was added
        pipe.time()  # Redis's clock, not ours: the two hosts may disagree
        backlog, pending, dead, oldest, (secs, usecs) = pipe.execute()
        lag_s = 0.0
        if oldest:
            added_ms = int(_text(oldest[0][0]).split("-", 1)[0])
            lag_s = max(0.0, secs + usecs / 1e6 - added_ms / 1000)
        return BusStats(backlog=backlog, pending=pending["pending"], dead=dead, lag_s=lag_s)

    # -- internals ---------------------------------------------------------------------------

    def _ensure_group(self, stream: str, group: str) -> None:
        """Create the group (and stream) once. From id 0, so that entries written before any
        reader started (requests queued while workers were down) are still delivered."""
        if (stream, group) in self._groups:
            return
        try:
            self.redis.xgroup_create(stream, group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((stream, group))

    def _read(
        self, stream: str, group: str, consumer: str, count: int, block_ms: int | None
    ) -> list[tuple[Any, dict]]:
        for retry in (False, True):
            try:
                result = self.redis.xreadgroup(
                    group, consumer, {stream: ">"}, count=count, block=block_ms
                )
                break
            except redis.ResponseError as exc:
                # The stream was deleted under us (FLUSHDB, an operator): recreate and go on.
                if "NOGROUP" not in str(exc) or retry:
                    raise
                self._groups.discard((stream, group))
                self._ensure_group(stream, group)
        if not result:
            return []
        # RESP2 gives [[stream, entries]]; RESP3 gives {stream: [entries]}.
        if isinstance(result, dict):
            return [entry for entries in result.values() for entry in entries[0]]
        return [entry for _, entries in result for entry in entries]

    def _sweep(self, stream: str, group: str) -> None:
        """Drop the group members that have held nothing for ``stale_consumer_ms``, at most
        once per tenth of that bound. ``_RETIRE`` checks atomically that each still holds
        nothing, so a member that reads meanwhile keeps its entries."""
        now = time.monotonic()
        if now - self._swept.get(stream, -math.inf) < self.stale_consumer_ms / 10_000:
            return
        self._swept[stream] = now
        for member in self.redis.xinfo_consumers(stream, group):
            if member["pending"] == 0 and member["idle"] >= self.stale_consumer_ms:
                self._retire(keys=[stream], args=[group, _text(member["name"])])

    def _claim(
        self, stream: str, group: str, consumer: str, min_idle_ms: int, count: int
    ) -> list[tuple[Any, dict | None, int]]:
        """XAUTOCLAIM up to ``count`` idle entries, with their delivery counts after the claim.

        XAUTOCLAIM scans a bounded slice of the pending list per call, so follow its cursor.
        Redis 6.2 returns an entry deleted while pending as nil, without its id, and leaves
        it pending; such ghosts are found by id through XPENDING and acknowledged.
        """
        if count < 1:
            return []
        claimed: list[tuple[Any, dict]] = []
        ghosts = False
        cursor: Any = "0-0"
        for _ in range(64):
            cursor, entries, *_ = self.redis.xautoclaim(
                stream, group, consumer, min_idle_ms, cursor, count=count - len(claimed)
            )
            for entry_id, fields in entries:
                if entry_id is None:
                    ghosts = True
                else:
                    claimed.append((entry_id, fields))
            if _text(cursor) == "0-0" or len(claimed) >= count:
                break
        if ghosts:
            self._ack_ghosts(stream, group, consumer)
        self._sweep(stream, group)
        if not claimed:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry_id, _ in claimed:
            pipe.xpending_range(stream, group, entry_id, entry_id, 1, consumername=consumer)
        result = []
        for (entry_id, fields), pending in zip(claimed, pipe.execute(), strict=True):
            # Empty: acknowledged by its first owner in the meantime, so nothing to do.
            if pending:
                result.append((entry_id, fields, pending[0]["times_delivered"]))
        return result

    def _ack_ghosts(self, stream: str, group: str, consumer: str) -> None:
        pending = self.redis.xpending_range(stream, group, "-", "+", 1000, consumername=consumer)
        ids = [p["message_id"] for p in pending]
        pipe = self.redis.pipeline(transaction=False)
        for entry_id in ids:
            pipe.xrange(stream, entry_id, entry_id, count=1)
        gone = [i for i, found in zip(ids, pipe.execute(), strict=True) if not found]
        if gone:
            log.warning("%s: acknowledging %d entries deleted while pending", stream, len(gone))
            self.redis.xack(stream, group, *gone)

    def _accept(self, entries: Sequence[tuple[Any, dict | None, int]]) -> list[Delivery]:
        """Validate request entries; settle the ones that must not reach a model."""
        good: list[Delivery] = []
        pipe = self.redis.pipeline(transaction=False)
        settle = False
        for entry_id, fields, attempt in entries:
            entry_id = _text(entry_id)
            raw = _field(fields, "data")
            try:
                request = ChatRequest.model_validate_json(_require_data(raw, fields))
            except (ValidationError, ValueError) as exc:
                self._dead_letter(pipe, REQUESTS, REQUEST_GROUP, entry_id, fields, attempt, exc)
                count_request("unknown", "dead_lettered")  # no valid channel to name
                settle = True
                continue
            delivery = Delivery(request, entry_id, attempt)
            if attempt > self.max_deliveries:
                reason = (
                    f"delivered {attempt - 1} times (max_deliveries={self.max_deliveries}) and "
                    "never answered: each worker that took it died or overran the reclaim time"
                )
                log.error(
                    "dead-lettering request %s: %s",
                    request.id,
                    reason,
                    extra={"request_id": request.id},
                )
                count_request(request.channel, "dead_lettered")
                self._settle_call(
                    pipe,
                    delivery.error("failed", FAILED_MESSAGE),
                    source=REQUESTS,
                    group=REQUEST_GROUP,
                    entry_id=entry_id,
                    dead=(reason, raw, attempt - 1),
                )
                settle = True
                continue
            try:
                check_text_length(request.text, self.max_text_chars)
            except TextTooLong as exc:
                # Enqueued without submit()'s check (or under a larger limit): refuse here.
                count_request(request.channel, "too_long")
                self._settle_call(
                    pipe,
                    delivery.error("too_long", str(exc)),
                    source=REQUESTS,
                    group=REQUEST_GROUP,
                    entry_id=entry_id,
                )
                settle = True
                continue
            good.append(delivery)
        if settle:
            pipe.execute()
        return good

    def _accept_replies(
        self, stream: str, entries: Sequence[tuple[Any, dict | None, int]]
    ) -> list[Reply]:
        good: list[Reply] = []
        pipe = self.redis.pipeline(transaction=False)
        settle = False
        for entry_id, fields, attempt in entries:
            entry_id = _text(entry_id)
            try:
                if attempt > self.max_deliveries:
                    raise ValueError(
                        f"delivered {attempt - 1} times (max_deliveries={self.max_deliveries}) "
                        "and never acknowledged: each adapter that took it died or failed on it"
                    )
                good.append(
                    Reply(entry_id, parse_reply(_require_data(_field(fields, "data"), fields)))
                )
            except (ValidationError, ValueError) as exc:
                self._dead_letter(pipe, stream, REPLY_GROUP, entry_id, fields, attempt, exc)
                settle = True
        if settle:
            pipe.execute()
        return good

    def _dead_letter(
        self,
        pipe: redis.client.Pipeline,
        stream: str,
        group: str,
        entry_id: str,
        fields: dict | None,
        attempt: int,
        exc: Exception,
    ) -> None:
        reason = _reason(exc)
        log.error("dead-lettering %s entry %s: %s", stream, entry_id, reason)
        raw = _field(fields, "data")
        if raw is None:  # no data field at all: keep whatever the entry had, for the post-mortem
            raw = repr({_text(k): _text(v) for k, v in (fields or {}).items()})[:10_000]
        pipe.xadd(
            DEAD,
            {
                "reason": reason,
                "stream": stream,
                "entry": entry_id,
                "deliveries": attempt,
                "data": raw,
            },
            maxlen=self.dead_maxlen,
            approximate=True,
        )
        pipe.xack(stream, group, entry_id)
        pipe.xdel(stream, entry_id)

    def _settle_many(
        self,
        items: list[tuple[Delivery, FinalEvent | ErrorEvent]],
        events: Iterable[DeltaEvent | ProgressEvent] = (),
        remember: Mapping[str, MemoryWrite] | None = None,
    ) -> list[bool]:
        remember = remember or {}
        pipe = self.redis.pipeline(transaction=False)
        self._add_events(pipe, events)
        emitted = len(pipe)
        for delivery, event in items:
            self._settle_call(
                pipe,
                event,
                source=REQUESTS,
                group=REQUEST_GROUP,
                entry_id=delivery.entry_id,
                remember=remember.get(delivery.request.id),
            )
        written = [bool(new) for new in pipe.execute()[emitted:]]
        for (delivery, event), new in zip(items, written, strict=True):
            if new:  # not when another worker answered first: that one counted it
                count_request(delivery.request.channel, _outcome(event))
        return written

    def _settle_call(
        self,
        client: redis.Redis | redis.client.Pipeline,
        event: FinalEvent | ErrorEvent,
        *,
        source: str,
        group: str,
        entry_id: str,
        dead: tuple[str, Any, int] | None = None,
        remember: MemoryWrite | None = None,
    ) -> Any:
        reason, raw, deliveries = dead or ("", "", 0)
        keys = [final_key(event.request_id), reply_stream(event.channel), source, DEAD]
        args = [
            self.final_ttl_s,
            event.model_dump_json(),
            self.reply_maxlen,
            group,
            entry_id,
            self.dead_maxlen,
            reason,
            raw if raw is not None else "",
            deliveries,
        ]
        if remember is not None:
            keys.append(remember.key)
            args += [remember.max_turns, remember.ttl_s, *remember.turns]
        return self._settle(keys=keys, args=args, client=client)


@dataclass(frozen=True)
class Display:
    """What an adapter should show for one request, after feeding it an event.

    ``text`` is the message body: the answer so far, the final answer, or the error message.
    ``status`` is the latest progress line. ``done``: stop editing (and attach feedback
    buttons, unless ``code`` says it was an error). ``attachments``: files to upload with a
    final answer (paths on the shared data dir).
    """

    request_id: str
    reply_to: dict[str, Any]
    text: str
    status: str
    done: bool
    code: ErrorCode | None = None
    attachments: tuple[str, ...] = ()


class _Track:
    __slots__ = ("attempt", "next_seq", "parts", "status", "held", "done")

    def __init__(self, attempt: int) -> None:
        self.attempt = attempt
        self.next_seq = 1
        self.parts: list[str] = []
        self.status = ""
        self.held: dict[int, ReplyEvent] = {}
        self.done = False


class ReplyAssembler:
    """Turns the reply events of many requests into what to show, in one adapter process.

    Events can arrive twice (a reclaimed reply entry) or out of order, and a reclaimed request
    starts over with a higher ``attempt``. So: deltas already applied are dropped, a gap is
    held until it fills (up to ``max_held`` events), a higher attempt restarts the text, a
    lower one is stale, and the first final or error ends the request; anything later for
    that id is dropped. The last ``remember`` request ids are kept.
    """

    def __init__(self, remember: int = 10_000, max_held: int = 64) -> None:
        self._tracks: collections.OrderedDict[str, _Track] = collections.OrderedDict()
        self.remember = remember
        self.max_held = max_held

    def feed(self, event: ReplyEvent) -> Display | None:
        """Apply one event; None when it changes nothing the user should see."""
        track = self._tracks.get(event.request_id)
        if track is not None and track.done:
            return None
        if isinstance(event, FinalEvent | ErrorEvent):
            track = track or self._track(event.request_id, event.attempt)
            track.done = True
            code = event.code if isinstance(event, ErrorEvent) else None
            files = tuple(event.attachments) if isinstance(event, FinalEvent) else ()
            return Display(event.request_id, event.reply_to, event.text, "", True, code, files)
        if track is None or event.attempt > track.attempt:
            track = self._track(event.request_id, event.attempt)
        elif event.attempt < track.attempt or event.seq < track.next_seq:
            return None  # stale attempt, or already applied
        track.held[event.seq] = event
        if event.seq > track.next_seq and len(track.held) <= self.max_held:
            return None  # wait for the gap to fill
        changed = False
        while track.held:
            if track.next_seq not in track.held:
                if len(track.held) <= self.max_held:
                    break
                track.next_seq = min(track.held)  # give up on the gap rather than stall
            held = track.held.pop(track.next_seq)
            track.next_seq += 1
            if isinstance(held, DeltaEvent):
                track.parts.append(held.text)
            else:
                track.status = held.text
            changed = True
        if not changed:
            return None
        return Display(event.request_id, event.reply_to, "".join(track.parts), track.status, False)

    def _track(self, request_id: str, attempt: int) -> _Track:
        track = self._tracks[request_id] = _Track(attempt)
        self._tracks.move_to_end(request_id)
        while len(self._tracks) > self.remember:
            self._tracks.popitem(last=False)
        return track


class Outgoing(Protocol):
    """What an adapter keeps per answer it is showing (its own message ids and such)."""

    pending: Display | None  # the newest state not shown yet
    entries: list[str]  # final/error stream entries, acknowledged once shown


Answer = TypeVar("Answer", bound=Outgoing)


class ReplyTracker(Generic[Answer]):
    """An adapter's answers in flight, fed from its channel's reply stream.

    Delta and progress entries are acknowledged as soon as they are read: the final event
    supersedes them. A final or error entry is held until the adapter has shown it
    (``finished``), so a replica that dies first leaves it pending for another replica to
    reclaim; each shown answer is recorded under ``delivered_prefix``, so a reclaimed final that
    was shown already is not shown twice. ``make(request_id, reply_to)`` builds the adapter's
    record of a new answer and raises ``KeyError``/``ValueError``/``TypeError`` for a
    ``reply_to`` it cannot use (such a reply is dropped, with an error in the log).
    """

    def __init__(
        self,
        bus: Bus,
        channel: str,
        delivered_prefix: str,
        make: Callable[[str, dict[str, Any]], Answer],
    ) -> None:
        self.bus = bus
        self.channel = channel
        self.delivered_prefix = delivered_prefix
        self.make = make
        self.assembler = ReplyAssembler()
        self.outgoing: dict[str, Answer] = {}

    def take(self, reply: Reply) -> list[str]:
        """Apply one event; returns the entry ids that may be acknowledged now."""
        event = reply.event
        terminal = event.kind in ("final", "error")
        held = self.outgoing.get(event.request_id)
        # Redis first: should it fail, nothing here has changed and the entry is read again.
        # (Fed first, the assembler would hold the request done, and that final, read again,
        # would be dropped unshown.)
        shown_already = terminal and self.delivered(event.request_id)
        display = self.assembler.feed(event)
        if display is None:
            if terminal and held is not None and held.entries:
                held.entries.append(reply.entry_id)  # a reclaimed copy of a final in hand
                return []
            return [reply.entry_id]
        if shown_already:
            self.outgoing.pop(event.request_id, None)
            return [reply.entry_id]  # shown by a replica that died before acknowledging
        if held is None:
            try:
                held = self.make(event.request_id, dict(display.reply_to))
            except (KeyError, ValueError, TypeError) as exc:
                log.error("reply %s has no usable reply_to (%s): dropped", event.request_id, exc)
                return [reply.entry_id]
            self.outgoing[event.request_id] = held
        held.pending = display
        if terminal:
            held.entries.append(reply.entry_id)
            return []
        return [reply.entry_id]

    def delivered(self, request_id: str) -> bool:
        return bool(self.bus.redis.exists(self.delivered_prefix + request_id))

    def finished(self, request_id: str, *, shown: bool) -> Answer:
        """The answer is shown (or given up): record it, acknowledge its final, forget it.
        Forgotten last: if Redis fails here the answer stays in hand, to be finished again."""
        out = self.outgoing[request_id]
        self.bus.redis.set(
            self.delivered_prefix + request_id, "1" if shown else "0", ex=self.bus.final_ttl_s
        )
        self.bus.ack_replies(self.channel, *out.entries)
        return self.outgoing.pop(request_id)


def _outcome(event: FinalEvent | ErrorEvent) -> str:
    """The ``sprbot_requests_total`` outcome of a request's terminal event."""
    if isinstance(event, FinalEvent):
        return "answered"
    return "too_long" if event.code == "too_long" else "error"


def _text(value: Any) -> str:
    # "replace": a malformed entry's field names and values are quoted in its dead letter,
    # and bytes that are not UTF-8 must not stop the worker that reads them.
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _field(fields: dict | None, name: str) -> Any:
    if not fields:
        return None
    value = fields.get(name.encode())
    return fields.get(name) if value is None else value


def _require_data(raw: Any, fields: dict | None) -> Any:
    if raw is None:
        names = sorted(_text(k) for k in (fields or {}))
        raise ValueError(f"entry has no 'data' field (it has: {', '.join(names) or 'nothing'})")
    return raw


def _reason(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in exc.errors()
        ]
        return ("not a valid entry: " + "; ".join(problems))[:1000]
    return str(exc)[:1000]
