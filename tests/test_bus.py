"""The bus against a real (embedded) Redis: what a user sees through the reply streams."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

from bot.bus import (
    BUSY_MESSAGE,
    DEAD,
    FAILED_MESSAGE,
    REQUESTS,
    Bus,
    Display,
    ReplyAssembler,
    reply_stream,
)
from bot.config import load_settings
from bot.connection import connect
from bot.memory import ConversationMemory
from bot.schemas import (
    ChatRequest,
    DeltaEvent,
    ErrorEvent,
    FinalEvent,
    ProgressEvent,
    request_id,
)

IDLE_MS = 50  # reclaim bound in these tests; sleeps are a little longer


@pytest.fixture
def redis_client(embedded_redis):
    client = connect(load_settings())
    yield client
    client.close()


@pytest.fixture
def make_bus(redis_client):
    return lambda **limits: Bus(redis_client, **limits)


def chat(n: int | str = 1, text: str = "hello", channel: str = "slack", **kw) -> ChatRequest:
    return ChatRequest(
        id=request_id(channel, "T1", f"Ev{n}"),
        channel=channel,
        conversation="T1/C1/1712.5",
        user_id="U1",
        user_name="Ada",
        text=text,
        reply_to={"placeholder": f"ts-{n}"},
        **kw,
    )


class User:
    """What users of one channel see: the adapter side, reading and acknowledging replies."""

    def __init__(self, bus: Bus, channel: str = "slack") -> None:
        self.bus, self.channel = bus, channel
        self.assembler = ReplyAssembler()
        self.events: list = []
        self.shown: dict[str, Display] = {}

    def poll(self) -> list:
        replies = self.bus.read_replies(self.channel, "adapter-1", count=1000)
        self.bus.ack_replies(self.channel, *(r.entry_id for r in replies))
        for reply in replies:
            self.events.append(reply.event)
            display = self.assembler.feed(reply.event)
            if display is not None:
                self.shown[display.request_id] = display
        return [r.event for r in replies]

    def finals(self) -> list[FinalEvent]:
        return [e for e in self.events if isinstance(e, FinalEvent)]

    def errors(self) -> list[ErrorEvent]:
        return [e for e in self.events if isinstance(e, ErrorEvent)]


def dead_entries(bus: Bus) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()} for _, fields in bus.redis.xrange(DEAD)
    ]


def test_round_trip_streams_deltas_that_add_up_to_the_final(make_bus):
    bus = make_bus()
    user = User(bus)
    request = chat(text="what is sprbot?")
    assert bus.submit(request).status == "queued"

    [delivery] = bus.read_requests("worker-1", block_ms=100)
    assert delivery.request == request and delivery.attempt == 1
    bus.emit(delivery.progress("thinking…"))
    pieces = ["sprbot is ", "a chat", "bot."]
    bus.emit(*(delivery.delta(p) for p in pieces))
    assert bus.finish(delivery, "".join(pieces)) is True

    events = user.poll()
    deltas = [e for e in events if isinstance(e, DeltaEvent)]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    assert "".join(d.text for d in deltas) == user.finals()[0].text == "sprbot is a chatbot."
    shown = user.shown[request.id]
    assert shown.done and shown.text == "sprbot is a chatbot." and shown.code is None
    assert shown.reply_to == {"placeholder": "ts-1"}
    # Answered and acknowledged: nothing waits, nothing is left to read.
    assert bus.stats().backlog == 0 and bus.stats().pending == 0
    assert bus.read_requests("worker-1") == [] and user.poll() == []


def test_same_platform_event_three_times_gives_one_request_and_one_reply(make_bus):
    bus = make_bus()
    user = User(bus)
    # A platform retry is a new delivery of the same event: same id, later timestamp.
    results = [bus.submit(chat(7, created_at=time.time() + i)) for i in range(3)]
    assert [r.status for r in results] == ["queued", "duplicate", "duplicate"]

    deliveries = bus.read_requests("worker-1", count=10)
    assert len(deliveries) == 1
    bus.finish(deliveries[0], "hi")
    user.poll()
    assert [f.text for f in user.finals()] == ["hi"] and user.errors() == []


def test_two_consumers_share_load_and_each_request_is_read_once(make_bus):
    bus = make_bus()
    user = User(bus)
    for n in range(20):
        bus.submit(chat(n, text=f"q{n}"))

    taken: dict[str, list] = {"a": [], "b": []}
    while True:
        batch_a = bus.read_requests("worker-a", count=3)
        batch_b = bus.read_requests("worker-b", count=3)
        if not batch_a and not batch_b:
            break
        taken["a"] += batch_a
        taken["b"] += batch_b
    ids_a = {d.request.id for d in taken["a"]}
    ids_b = {d.request.id for d in taken["b"]}
    assert ids_a and ids_b and not ids_a & ids_b
    assert len(ids_a | ids_b) == 20

    everything = taken["a"] + taken["b"]
    last_deltas = (d.delta(d.request.text.upper()) for d in everything)
    written = bus.finish_many([(d, d.request.text.upper()) for d in everything], events=last_deltas)
    assert written == [True] * 20
    user.poll()
    assert sorted(f.text for f in user.finals()) == sorted(f"Q{n}" for n in range(20))
    assert all(user.shown[d.request.id].text == d.request.text.upper() for d in everything)
    # Each request's delta came before its final, in seq order.
    assert [e.kind for e in user.events if e.request_id == everything[0].request.id] == [
        "delta",
        "final",
    ]
    assert len({f.request_id for f in user.finals()}) == 20


def test_a_dead_workers_requests_are_reclaimed_and_answered_once(make_bus):
    bus = make_bus()
    user = User(bus)
    for n in range(5):
        bus.submit(chat(n, text=f"q{n}"))
    taken = bus.read_requests("worker-dead", count=10)
    assert len(taken) == 5
    bus.emit(taken[0].delta("half an ans"))  # it got this far, then died: never acknowledged

    assert bus.reclaim("worker-2", min_idle_ms=60_000) == []  # not idle long enough yet
    time.sleep(IDLE_MS * 2 / 1000)
    reclaimed = bus.reclaim("worker-2", min_idle_ms=IDLE_MS, count=10)
    assert sorted(d.request.id for d in reclaimed) == sorted(d.request.id for d in taken)
    assert {d.attempt for d in reclaimed} == {2}
    for d in reclaimed:
        bus.emit(d.delta("answer "), d.delta(d.request.text))
        assert bus.finish(d, "answer " + d.request.text)

    user.poll()
    assert sorted(f.text for f in user.finals()) == [f"answer q{n}" for n in range(5)]
    # The dead worker's half answer was superseded: attempt 2 restarted the text.
    assert user.shown[taken[0].request.id].text == "answer q0"
    assert bus.stats().pending == 0 and bus.stats().backlog == 0


def test_a_request_that_keeps_failing_is_dead_lettered_and_the_user_told(make_bus):
    bus = make_bus(max_deliveries=2)
    user = User(bus)
    request = chat(text="the poison pill")
    bus.submit(request)
    assert len(bus.read_requests("worker-1")) == 1  # delivery 1: the worker dies
    time.sleep(IDLE_MS * 2 / 1000)
    assert [d.attempt for d in bus.reclaim("worker-2", IDLE_MS)] == [2]  # dies too
    time.sleep(IDLE_MS * 2 / 1000)
    assert bus.reclaim("worker-3", IDLE_MS) == []  # a third delivery is not attempted

    user.poll()
    assert [(e.code, e.text) for e in user.errors()] == [("failed", FAILED_MESSAGE)]
    assert user.shown[request.id].done and user.shown[request.id].code == "failed"
    [dead] = dead_entries(bus)
    assert "max_deliveries=2" in dead["reason"] and dead["deliveries"] == "2"
    assert json.loads(dead["data"])["text"] == "the poison pill"
    assert bus.stats().backlog == 0 and bus.stats().pending == 0


def test_malformed_entries_are_dead_lettered_and_the_next_request_served(make_bus):
    bus = make_bus()
    user = User(bus)
    good = chat(text="still there?").model_dump()
    bus.redis.xadd(REQUESTS, {"garbage": "\x00\xff"})
    bus.redis.xadd(REQUESTS, {"data": "{not json"})
    bus.redis.xadd(REQUESTS, {"data": json.dumps({"id": "x1", "text": "no channel"})})
    bus.redis.xadd(REQUESTS, {"data": json.dumps({**good, "id": "bad-1", "text": 5})})
    bus.redis.xadd(REQUESTS, {"data": json.dumps({**good, "channel": "Slack Team"})})
    bus.submit(chat(text="still there?"))

    [delivery] = bus.read_requests("worker-1", count=10)
    assert delivery.request.text == "still there?"
    bus.finish(delivery, "yes")
    user.poll()
    assert [f.text for f in user.finals()] == ["yes"]

    reasons = [d["reason"] for d in dead_entries(bus)]
    assert len(reasons) == 5
    assert "data" in reasons[0] and "Invalid JSON" in reasons[1]
    assert "channel: Field required" in reasons[2] and "text: Input should be" in reasons[3]
    assert "channel: String should match pattern" in reasons[4]
    assert bus.stats().backlog == 0  # nothing bad is left to be redelivered

    # A malformed reply entry does not stop the adapter either.
    bus.redis.xadd(reply_stream("slack"), {"data": '{"kind": "shout"}'})
    bus.submit(chat(2, text="again"))
    [delivery] = bus.read_requests("worker-1")
    bus.finish(delivery, "still yes")
    user.poll()
    assert [f.text for f in user.finals()] == ["yes", "still yes"]
    assert "kind" in dead_entries(bus)[-1]["reason"]


def test_two_workers_finishing_the_same_request_write_one_final(make_bus):
    bus = make_bus()
    user = User(bus)
    bus.submit(chat())
    [slow] = bus.read_requests("worker-slow")
    time.sleep(IDLE_MS * 2 / 1000)
    [fast] = bus.reclaim("worker-fast", IDLE_MS)  # slow is alive, just slow
    assert bus.finish(fast, "from fast") is True
    assert bus.finish(slow, "from slow") is False
    assert bus.fail(slow, "failed", "late error") is False

    user.poll()
    assert [f.text for f in user.finals()] == ["from fast"] and user.errors() == []
    assert user.shown[fast.request.id].text == "from fast"
    assert bus.stats().pending == 0


def test_the_exchange_is_remembered_with_the_final_and_only_once(make_bus):
    bus = make_bus()
    memory = ConversationMemory(bus.redis)
    request = chat(text="what is the VPN host?")
    bus.submit(request)
    [slow] = bus.read_requests("worker-slow")
    time.sleep(IDLE_MS * 2 / 1000)
    [fast] = bus.reclaim("worker-fast", IDLE_MS)

    def finish(delivery, text):
        write = memory.exchange(request.conversation, request.text, text)
        return bus.finish_many([(delivery, text)], remember={request.id: write})[0]

    assert finish(fast, "vpn.example.com") is True
    # In the same round trip as the final: nothing for a quick follow-up to race.
    assert [t["content"] for t in memory.turns(request.conversation)] == [
        "what is the VPN host?",
        "vpn.example.com",
    ]
    assert finish(slow, "a late second answer") is False
    assert len(memory.turns(request.conversation)) == 2  # the loser wrote nothing


def test_backpressure_refuses_at_once_with_a_busy_reply(make_bus):
    bus = make_bus(max_backlog=3)
    user = User(bus)
    assert [bus.submit(chat(n)).status for n in range(3)] == ["queued"] * 3
    started = time.perf_counter()
    result = bus.submit(chat(3))
    assert time.perf_counter() - started < 0.5
    assert result.status == "busy" and not result.accepted

    user.poll()
    assert [(e.request_id, e.code, e.text) for e in user.errors()] == [
        (chat(3).id, "busy", BUSY_MESSAGE)
    ]
    assert user.shown[chat(3).id].reply_to == {"placeholder": "ts-3"}
    assert bus.stats().backlog == 3  # nothing enqueued for the refused one
    assert bus.submit(chat(3)).status == "duplicate"  # a retry does not get a second reply

    # Once the backlog drains, new requests are accepted again.
    bus.finish_many((d, "ok") for d in bus.read_requests("worker-1", count=10))
    assert bus.submit(chat(4)).status == "queued"


def test_oversized_text_is_refused_with_a_clear_reply(make_bus):
    bus = make_bus(max_text_chars=10)
    user = User(bus)
    assert bus.submit(chat(text="x" * 11)).status == "too_long"
    assert bus.submit(chat(text="x" * 11)).status == "duplicate"
    user.poll()
    [error] = user.errors()
    assert error.code == "too_long"
    assert "11 characters" in error.text and "limit of 10" in error.text
    assert bus.stats().backlog == 0

    # Enqueued past the check (e.g. by a host with a larger limit): the worker refuses it.
    make_bus(max_text_chars=1000).submit(chat(2, text="y" * 50))
    assert bus.read_requests("worker-1") == []
    user.poll()
    assert [e.code for e in user.errors()] == ["too_long", "too_long"]
    assert bus.stats().backlog == 0


def test_streams_are_trimmed_and_keys_expire(make_bus):
    bus = make_bus(reply_maxlen=100, dead_maxlen=100)
    bus.submit(chat())
    [delivery] = bus.read_requests("worker-1")
    bus.emit(*(delivery.delta(".") for _ in range(2000)))  # no adapter is reading
    bus.finish(delivery, "." * 2000)
    for _ in range(500):
        bus.redis.xadd(REQUESTS, {"junk": "1"})
    for _ in range(5):  # all junk: each call dead-letters 100 and returns nothing
        assert bus.read_requests("worker-1", count=100) == []

    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default): allow one node over.
    assert bus.redis.xlen(reply_stream("slack")) <= 200
    assert bus.redis.xlen(DEAD) <= 200
    assert bus.redis.xlen(REQUESTS) == 0  # answered requests are deleted, not kept
    assert 0 < bus.redis.ttl(f"sprbot:seen:{delivery.request.id}") <= bus.dedupe_ttl_s
    assert 0 < bus.redis.ttl(f"sprbot:final:{delivery.request.id}") <= bus.final_ttl_s
    # The newest events survive trimming: the final is still there to deliver.
    assert User(bus).poll()[-1].text == "." * 2000


def test_a_crashed_adapters_replies_are_reclaimed(make_bus):
    bus = make_bus()
    bus.submit(chat())
    [delivery] = bus.read_requests("worker-1")
    bus.finish(delivery, "done")
    assert len(bus.read_replies("slack", "adapter-dead")) == 1  # read, never acknowledged
    time.sleep(IDLE_MS * 2 / 1000)
    [reply] = bus.reclaim_replies("slack", "adapter-2", IDLE_MS)
    assert reply.event.kind == "final" and reply.event.text == "done"


def test_emit_refuses_terminal_events(make_bus):
    bus = make_bus()
    bus.submit(chat())
    [delivery] = bus.read_requests("worker-1")
    with pytest.raises(TypeError, match="finish"):
        bus.emit(delivery.final("x"))


# -- pure parts: no Redis needed ------------------------------------------------------------


def _events(attempt: int, *kinds_texts: tuple[str, str]) -> list:
    classes = {"delta": DeltaEvent, "progress": ProgressEvent, "final": FinalEvent}
    return [
        classes[kind](request_id="r1", channel="web", attempt=attempt, seq=seq, text=text)
        for seq, (kind, text) in enumerate(kinds_texts, start=1)
    ]


def test_assembler_drops_duplicates_reorders_and_delivers_final_once():
    p, a, b, c, final = _events(
        1,
        ("progress", "thinking"),
        ("delta", "a"),
        ("delta", "b"),
        ("delta", "c"),
        ("final", "abc"),
    )
    asm = ReplyAssembler()
    assert asm.feed(p).status == "thinking"
    assert asm.feed(a).text == "a"
    assert asm.feed(a) is None  # duplicate
    assert asm.feed(c) is None  # out of order: held until b arrives
    assert asm.feed(b).text == "abc"
    shown = asm.feed(final)
    assert shown.done and shown.text == "abc"
    assert asm.feed(final) is None and asm.feed(c) is None  # final once, nothing after it


def test_assembler_restarts_on_a_new_attempt_and_ignores_the_old_one():
    old = _events(1, ("delta", "old "), ("delta", "text"))
    new = _events(2, ("delta", "new"))
    asm = ReplyAssembler()
    asm.feed(old[0])
    assert asm.feed(new[0]).text == "new"
    assert asm.feed(old[1]) is None


def test_request_id_is_stable_per_event_and_unambiguous():
    assert request_id("slack", "T1", "Ev1") == request_id("slack", "T1", "Ev1")
    assert request_id("slack", "T1", "Ev1") != request_id("slack", "T1", "Ev2")
    assert request_id("slack", "a", "bc") != request_id("slack", "ab", "c")
    assert request_id("telegram", 42, 7).startswith("telegram-")
    ChatRequest.model_validate({**chat().model_dump(), "id": request_id("slack", "x")})


def test_schema_errors_name_the_field():
    with pytest.raises(ValidationError, match="user_id"):
        ChatRequest(id="r1", channel="web", conversation="c", user_id="", text="hi")
    with pytest.raises(ValidationError, match="code"):
        ErrorEvent(request_id="r1", channel="web", attempt=1, seq=1, code="nope", text="x")


def test_a_consumer_is_retired_on_a_clean_stop_only_if_it_holds_nothing(make_bus):
    bus = make_bus()
    user = User(bus)
    for n in range(2):
        bus.submit(chat(n, text=f"q{n}"))
    [done] = bus.read_requests("worker-done", count=1)
    bus.finish(done, "answered")
    [held] = bus.read_requests("worker-holding", count=1)

    def consumers(stream: str, group: str) -> set[str]:
        return {c["name"].decode() for c in bus.redis.xinfo_consumers(stream, group)}

    assert bus.retire("worker-done")
    assert not bus.retire("worker-holding")  # its request stays pending for a reclaim
    assert consumers(REQUESTS, "inference") == {"worker-holding"}
    time.sleep(IDLE_MS * 2 / 1000)
    assert [d.request.id for d in bus.reclaim("worker-2", IDLE_MS)] == [held.request.id]

    user.poll()  # reads and acknowledges the reply of the first
    assert bus.retire("adapter-1", "slack")
    assert "adapter-1" not in consumers(reply_stream("slack"), "adapters")
    assert not bus.retire("adapter-1", "no-such-channel")


def test_killed_consumers_are_swept_once_they_hold_nothing(make_bus):
    bus = make_bus(stale_consumer_ms=IDLE_MS)
    for n in range(2):
        bus.submit(chat(n, text=f"q{n}"))
    [killed] = bus.read_requests("worker-killed", count=1)  # SIGKILLed: never retires
    [_] = bus.read_requests("worker-busy", count=1)  # alive but slow: holds its request

    def consumers() -> set[str]:
        return {c["name"].decode() for c in bus.redis.xinfo_consumers(REQUESTS, "inference")}

    time.sleep(IDLE_MS * 2 / 1000)
    assert bus.reclaim("worker-2", 60_000) == []  # sweeps: each of the two still holds one
    assert consumers() == {"worker-killed", "worker-busy"}

    reclaimed = bus.reclaim("worker-2", IDLE_MS, count=1)
    assert [d.request.id for d in reclaimed] == [killed.request.id]
    time.sleep(IDLE_MS * 2 / 1000)
    bus.reclaim("worker-2", 60_000)  # the next sweep: the killed worker holds nothing now
    assert consumers() == {"worker-busy", "worker-2"}  # the busy one keeps its request
    assert bus.stats().pending == 2
