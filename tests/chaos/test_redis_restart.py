"""The embedded Redis server (AOF on) goes away mid-load: SIGKILLed as in a crash, and shut down
cleanly as in an upgrade, then started again. The adapter and the worker ride it out: redis-py
retries a command for about two seconds, and past that each loop waits and tries again with
a growing, jittered delay (``bot.connection.reconnect_delay``).

What AOF ``everysec`` can lose: Redis writes every command to the AOF file before it answers
the client, and fsyncs that file once a second. A SIGKILL of the server leaves the written
bytes in the kernel's page cache, so nothing acknowledged is lost (measured below on the
bus's own ingress). An OS crash or power cut loses what the kernel had not flushed yet: up
to the last second of acknowledged writes (two when the disk stalls). That cannot be caused
from a test; docs/RELIABILITY.md says what it would mean for users, and how
``SPRBOT_REDIS_APPENDFSYNC=always`` closes it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest
import redis
from harness import Load, wait_until
from redis.backoff import NoBackoff
from redis.retry import Retry

from bot.bus import REQUESTS, Bus, Display, ReplyTracker, seen_key
from bot.config import load_settings
from bot.connection import EmbeddedRedis, connect
from bot.schemas import ChatRequest, request_id

pytestmark = pytest.mark.chaos

MESSAGES = 80


def test_redis_killed_then_shut_down_mid_load_loses_and_duplicates_no_answer(
    deployment, rng, figures, request
):
    adapter = deployment.start_adapter()
    worker = deployment.start_worker()
    # Down longer than redis-py's own retries after the crash, shorter after the shutdown.
    faults = [
        ("SIGKILL", deployment.kill_redis, (5.5, 7.0)),
        ("SHUTDOWN", _shutdown(deployment.redis), (0.3, 1.5)),
    ]
    fault_after = sorted(rng.sample(range(10, MESSAGES - 10), len(faults)))
    outages = []  # (fault, down at, up at, requests in between at that moment)
    text = "Message {i}: is the canteen open on Sunday?"
    pace = random.Random(rng.random())
    with Load(deployment, MESSAGES, fault_after, pace, gaps=(0.05, 0.3), text=text) as load:
        for (name, fault, down_s), after in zip(faults, fault_after, strict=True):
            load.wait_for(after)
            wait_until(deployment.in_between, 60, "a message between ingress and delivery", 0.05)
            between = deployment.in_between()
            down = fault()
            time.sleep(rng.uniform(*down_s))
            up = deployment.restart_redis()
            outages.append((name, down, up, between))
            load.fault_done()

    ledger = deployment.settled(timeout=180)
    accepted = ledger.accepted
    recovery = []
    for _, _, up, between in outages:
        delivered = [ledger.delivered_at(rid) for rid in between]
        if all(t is not None for t in delivered):
            recovery.append(max(delivered, default=up) - up)
    figures.record(
        request,
        "Redis SIGKILL + SHUTDOWN (AOF everysec)",
        fault="SIGKILL, later SHUTDOWN, of the Redis server mid-load; start it again",
        faults=len(outages),
        accepted=len(accepted),
        lost=len(ledger.lost),
        duplicated=len(ledger.duplicated),
        recovery_s=recovery,
        outage_s=[round(up - down, 2) for _, down, up, _ in outages],
        in_between_at_fault=[len(between) for *_, between in outages],
        errors=len(ledger.errors),
        stray_placeholders=ledger.stray_placeholders,
        requests=MESSAGES,
    )
    assert adapter.alive() and worker.alive(), "a process died with Redis instead of waiting"
    assert len(accepted) == MESSAGES, "some messages were never taken onto the bus"
    assert not ledger.lost, f"lost: {ledger.describe(ledger.lost)}"
    assert not ledger.duplicated, f"answered twice: {ledger.describe(ledger.duplicated)}"
    assert not ledger.errors, f"answered with an error: {ledger.describe(ledger.errors)}"
    assert len(recovery) == len(outages)


@dataclass
class _Shown:
    """An adapter's record of an answer in hand (what ``ReplyTracker`` keeps per request)."""

    pending: Display | None = None
    entries: list[str] = field(default_factory=list)


def test_an_answer_read_just_before_redis_goes_away_is_shown_once_it_is_back(embedded_redis):
    """Found by the scenario above: an adapter that read a final, then failed to reach Redis
    while taking it, later dropped that final unshown, as if it had been shown already."""
    # One retry: a connection left from before the restart is replaced, no more.
    client = redis.Redis(unix_socket_path=str(embedded_redis.socket), retry=Retry(NoBackoff(), 1))
    bus = Bus(client)
    reply_to = {"chat_id": 1, "message_id": 2}
    bus.submit(ChatRequest(id="r1", channel="telegram", conversation="c", user_id="u",
                           text="Is the canteen open?", reply_to=reply_to))  # fmt: skip
    [delivery] = bus.read_requests("worker")
    bus.finish(delivery, "Yes, until 3 pm.")
    tracker = ReplyTracker(bus, "telegram", "test:delivered:", lambda rid, to: _Shown())
    [reply] = bus.read_replies("telegram", "adapter")
    embedded_redis.stop()
    with pytest.raises(redis.ConnectionError):
        tracker.take(reply)
    embedded_redis.ensure_running()
    [again] = bus.reclaim_replies("telegram", "adapter", min_idle_ms=0)
    assert tracker.take(again) == []  # held until shown, not acknowledged unshown
    shown = tracker.outgoing["r1"].pending
    assert (shown.text, shown.done, shown.reply_to) == ("Yes, until 3 pm.", True, reply_to)


def _shutdown(server: EmbeddedRedis):
    def shut_down() -> float:
        at = time.monotonic()
        server.stop()
        return at

    return shut_down


@pytest.mark.parametrize("appendfsync", ["everysec", "always"])
def test_no_acknowledged_submit_is_lost_when_redis_is_killed(
    data_dir, monkeypatch, appendfsync, rng, figures, request
):
    monkeypatch.setenv("SPRBOT_REDIS_APPENDFSYNC", appendfsync)
    settings = load_settings()
    # No retries: a submit counts as acknowledged only if Redis answered it.
    client = connect(settings, retry=Retry(NoBackoff(), 0))
    server = EmbeddedRedis(data_dir, appendfsync=appendfsync)
    try:
        assert client.config_get("appendfsync") == {"appendfsync": appendfsync}
        bus = Bus(client, max_backlog=10**6)
        acknowledged: list[str] = []  # request ids that submit() answered "queued"
        refused: list[str] = []
        stop = threading.Event()

        def submit() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                rid = request_id("chaos", appendfsync, n)
                request = ChatRequest(
                    id=rid, channel="console", conversation=f"c{n}", user_id="u", text="hello?"
                )
                try:
                    result = bus.submit(request)
                except redis.ConnectionError:
                    return
                (acknowledged if result.accepted else refused).append(rid)

        writer = threading.Thread(target=submit)
        started = time.monotonic()
        writer.start()
        time.sleep(rng.uniform(0.5, 1.5))
        pid = int((server.dir / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        writer.join(timeout=30)
        stop.set()
        down = time.monotonic()
        rate = len(acknowledged) / (down - started)
        server.ensure_running()
        restarted = time.monotonic() - down

        after = redis.Redis(unix_socket_path=str(server.socket))
        queued = [json.loads(fields[b"data"])["id"] for _, fields in after.xrange(REQUESTS)]
        pipe = after.pipeline(transaction=False)
        for rid in acknowledged:
            pipe.exists(seen_key(rid))
        remembered = pipe.execute()
        lost = sorted(set(acknowledged) - set(queued))
        forgotten = [rid for rid, seen in zip(acknowledged, remembered, strict=True) if not seen]
        figures.record(
            request,
            f"Redis SIGKILL during ingress (AOF {appendfsync})",
            fault="SIGKILL the Redis server while submits stream in; count the acknowledged "
            "ones found after the restart",
            faults=1,
            accepted=len(acknowledged),
            lost=len(lost),
            duplicated=len(queued) - len(set(queued)),
            recovery_s=[restarted],
            dedupe_keys_lost=len(forgotten),
            submits_per_s=round(rate),  # what each fsync policy costs, on this machine
        )
        assert not refused
        assert len(acknowledged) > 100, "too few submits to measure anything"
        assert not lost, f"{len(lost)} of {len(acknowledged)} acknowledged requests are gone"
        assert not forgotten, "acknowledged requests lost their dedupe key"
        assert len(queued) == len(set(queued))
    finally:
        server.ensure_running()
        server.stop()
