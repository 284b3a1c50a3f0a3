"""The chat pipeline end to end: real Redis, real `sprbot worker inference` processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from bot.bus import REQUESTS, Bus
from bot.commands import CommandContext, dispatch
from bot.config import load_settings
from bot.connection import connect
from bot.memory import ConversationMemory
from bot.schemas import ChatRequest, FinalEvent, request_id
from inference.worker import CANCEL_CHECK_S, WORKER_PREFIX

CHANNEL = "console-test"


@pytest.fixture
def pipeline_env(tiny_model, data_dir, embedded_redis, monkeypatch):
    env = {
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "24",
        "SPRBOT_LOG_LEVEL": "WARNING",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


class Workers:
    """Starts real worker processes and cleans them up."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, **env: str) -> subprocess.Popen:
        exe = shutil.which("sprbot", path=str(Path(sys.executable).parent))
        proc = subprocess.Popen(
            [exe, "worker", "inference"],
            env={**os.environ, **{f"SPRBOT_{k.upper()}": v for k, v in env.items()}},
        )
        self.procs.append(proc)
        client = connect(load_settings())
        deadline = time.monotonic() + 120
        while not any(str(proc.pid) in k.decode() for k in client.scan_iter(WORKER_PREFIX + "*")):
            assert proc.poll() is None, "the worker exited during start-up"
            assert time.monotonic() < deadline, "the worker did not come up"
            time.sleep(0.1)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def workers():
    started = Workers()
    yield started
    started.stop_all()


@pytest.fixture
def bus(pipeline_env) -> Bus:
    settings = load_settings()
    return Bus(connect(settings), max_backlog=settings.max_backlog)


def ask(bus: Bus, text: str, n: int = 0, conversation: str | None = None, rid: str | None = None):
    request = ChatRequest(
        id=rid or request_id("test", text, n, time.time_ns()),
        channel=CHANNEL,
        conversation=conversation or f"test/{n}/{time.time_ns()}",
        user_id="u1",
        text=text,
    )
    return request, bus.submit(request)


def collect(bus: Bus, ids: set[str], timeout: float = 120, settle: float = 0.0):
    """Every reply event for ``ids`` until each has a final or error (plus ``settle`` seconds
    more, to catch duplicates)."""
    events = defaultdict(list)
    deadline = time.monotonic() + timeout
    ended: set[str] = set()
    settle_until = None
    while time.monotonic() < deadline:
        for reply in bus.read_replies(CHANNEL, "test", block_ms=200):
            events[reply.event.request_id].append(reply.event)
            if reply.event.kind in ("final", "error"):
                ended.add(reply.event.request_id)
            bus.ack_replies(CHANNEL, reply.entry_id)
        if ids <= ended:
            settle_until = settle_until or time.monotonic() + settle
            if time.monotonic() >= settle_until:
                break
    return events


def finals(events) -> Counter:
    return Counter(rid for rid, evs in events.items() for e in evs if e.kind == "final")


def test_round_trip_streams_deltas_that_add_up_to_the_final(bus, workers):
    workers.start()
    request, result = ask(bus, "What is sprbot?")
    assert result.status == "queued"
    events = collect(bus, {request.id})[request.id]
    deltas = [e.text for e in events if e.kind == "delta"]
    final = [e for e in events if isinstance(e, FinalEvent)]
    assert len(final) == 1 and final[0].text
    assert "".join(deltas) == final[0].text
    assert [e.seq for e in events] == sorted(e.seq for e in events)


def test_two_workers_share_the_load_and_answer_each_request_once(bus, workers):
    procs = [workers.start(), workers.start()]
    ids = {ask(bus, f"question {i}", i)[0].id for i in range(16)}
    events = collect(bus, ids, settle=1.0)
    assert finals(events) == Counter({rid: 1 for rid in ids})
    time.sleep(2.5)  # one more heartbeat each
    served = {}
    for key in bus.redis.scan_iter(WORKER_PREFIX + "*"):
        worker = bus.redis.hgetall(key)
        served[worker[b"id"].decode()] = int(worker[b"served"])
    assert sum(served.values()) == 16
    assert len(served) == 2 and all(n > 0 for n in served.values()), served
    assert all(p.poll() is None for p in procs)


def test_sigkill_mid_batch_loses_nothing_and_answers_nothing_twice(bus, workers):
    first = workers.start(max_batch="24", max_new_tokens="400", reclaim_idle_ms="1500")
    ids = {ask(bus, f"long question {i}", i)[0].id for i in range(24)}
    # Wait until the worker is mid-generation for at least 20 of them: deltas, no final yet.
    before = defaultdict(list)
    deadline = time.monotonic() + 120
    in_flight = 0
    while in_flight < 20:
        assert time.monotonic() < deadline, f"only {in_flight} requests in flight"
        for reply in bus.read_replies(CHANNEL, "test", block_ms=100):
            before[reply.event.request_id].append(reply.event)
            bus.ack_replies(CHANNEL, reply.entry_id)
        in_flight = sum(all(e.kind == "delta" for e in evs) for evs in before.values())
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=10)
    workers.start(max_new_tokens="400", reclaim_idle_ms="1500")
    events = collect(
        bus,
        ids - {r for r, evs in before.items() if evs[-1].kind == "final"},
        timeout=300,
        settle=2.0,
    )
    for request, evs in before.items():
        events[request] = evs + events.get(request, [])
    assert finals(events) == Counter({rid: 1 for rid in ids})
    assert not any(e.kind == "error" for evs in events.values() for e in evs)
    assert bus.stats().backlog == 0


def test_the_same_event_delivered_three_times_gets_one_reply(bus, workers):
    workers.start()
    rid = request_id("slack", "T1", "Ev123")
    results = [ask(bus, "Hello?", rid=rid)[1].status for _ in range(3)]
    assert results == ["queued", "duplicate", "duplicate"]
    events = collect(bus, {rid}, settle=1.5)
    assert finals(events) == Counter({rid: 1})


def test_malformed_entry_is_dead_lettered_and_the_worker_keeps_serving(bus, workers):
    proc = workers.start()
    bus.redis.xadd("sprbot:chat:requests", {"data": "{not json"})
    bus.redis.xadd("sprbot:chat:requests", {"garbage": "\xff\x00", "id": "x"})
    request, _ = ask(bus, "Still there?")
    events = collect(bus, {request.id})
    assert finals(events) == Counter({request.id: 1})
    dead = bus.redis.xrange("sprbot:chat:dead")
    assert len(dead) == 2
    assert all(b"reason" in fields for _, fields in dead)
    assert proc.poll() is None


def test_backpressure_answers_busy_at_once(pipeline_env, monkeypatch):
    monkeypatch.setenv("SPRBOT_MAX_BACKLOG", "2")
    settings = load_settings()
    bus = Bus(connect(settings), max_backlog=settings.max_backlog)
    statuses = [ask(bus, f"q{i}", i)[1].status for i in range(3)]  # no worker is running
    assert statuses == ["queued", "queued", "busy"]
    replies = bus.read_replies(CHANNEL, "test", block_ms=100)
    assert [(r.event.kind, r.event.code) for r in replies] == [("error", "busy")]
    assert "try again shortly" in replies[0].event.text


def test_oversized_text_and_prompt_get_clear_refusals(bus, workers, monkeypatch):
    workers.start(max_prompt_tokens="64")
    _, result = ask(bus, "x" * (load_settings().max_text_chars + 1))
    assert result.status == "too_long"
    request, result = ask(bus, "word " * 200)  # under the character limit, over 64 tokens
    assert result.status == "queued"
    events = collect(bus, {request.id})
    [error] = [e for e in events[request.id] if e.kind == "error"]
    assert error.code == "too_long"
    assert "64 tokens" in error.text


def test_memory_carries_the_first_turn_into_the_second_and_reset_clears_it(
    bus, workers, tiny_model
):
    from inference import MixedPrecisionConfig, PipelineConfig, build_chatbot
    from inference.config import GenerationConfig
    from inference.worker import InferenceWorker

    workers.start()
    conversation = "slack/T1/C1/1700000000.000100"
    first, _ = ask(bus, "My name is Ada. Remember it.", conversation=conversation)
    answer = [e for e in collect(bus, {first.id})[first.id] if e.kind == "final"][0].text
    memory = ConversationMemory(bus.redis)
    assert memory.turns(conversation) == [
        {"role": "user", "content": "My name is Ada. Remember it."},
        {"role": "assistant", "content": answer},
    ]
    # The prompt the worker builds for the second turn contains the first turn.
    chatbot = build_chatbot(
        PipelineConfig(
            model_name_or_path=str(tiny_model), optimization_config=MixedPrecisionConfig(force=True)
        )
    )
    worker = InferenceWorker(chatbot, bus, memory, generation=GenerationConfig(do_sample=False))
    prompt_ids, _ = worker.prompt(conversation, "What is my name?")
    prompt = chatbot.tokenizer.decode(prompt_ids)
    assert "My name is Ada." in prompt and answer in prompt and "What is my name?" in prompt

    reply = dispatch("/reset", CommandContext("slack", conversation, "u1", memory))
    assert reply == "Conversation cleared."
    prompt = chatbot.tokenizer.decode(worker.prompt(conversation, "What is my name?")[0])
    assert "Ada" not in prompt and "What is my name?" in prompt
    assert bus.redis.ttl("sprbot:conv:" + conversation) == -2  # gone


def test_memory_is_trimmed_to_the_prompt_budget(bus, tiny_model):
    from inference import PipelineConfig, build_chatbot
    from inference.config import GenerationConfig
    from inference.worker import InferenceWorker, WorkerOptions

    memory = ConversationMemory(bus.redis, ttl_s=60)
    for i in range(10):
        memory.append("c", f"question number {i} " * 5, f"answer number {i} " * 5)
    assert bus.redis.ttl("sprbot:conv:c") > 0
    chatbot = build_chatbot(PipelineConfig(model_name_or_path=str(tiny_model)))
    worker = InferenceWorker(
        chatbot,
        bus,
        memory,
        generation=GenerationConfig(),
        options=WorkerOptions(max_prompt_tokens=200),
    )
    prompt_ids, _ = worker.prompt("c", "and now?")
    prompt = chatbot.tokenizer.decode(prompt_ids)
    assert len(prompt_ids) <= 200
    assert "answer number 9" in prompt and "question number 0" not in prompt


def test_sigterm_finishes_in_flight_requests_then_exits(bus, workers):
    proc = workers.start(max_new_tokens="120")
    ids = {ask(bus, f"q{i}", i)[0].id for i in range(4)}
    deadline = time.monotonic() + 60
    while bus.stats().pending < 4:  # all four taken by the worker
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    events = collect(bus, ids, timeout=10)
    assert finals(events) == Counter({rid: 1 for rid in ids})
    assert not list(bus.redis.scan_iter(WORKER_PREFIX + "*"))  # it said goodbye
    assert bus.redis.xinfo_consumers(REQUESTS, "inference") == []  # and left the group


def test_a_cancelled_request_stops_generating_and_ends_with_one_error(bus, workers):
    worker = workers.start(max_new_tokens="400")
    request, _ = ask(bus, "tell me everything")
    deadline = time.monotonic() + 60
    seen = []
    while not any(e.kind == "delta" for e in seen):  # it is generating
        assert time.monotonic() < deadline, "no answer started"
        for reply in bus.read_replies(CHANNEL, "test", block_ms=200):
            seen.append(reply.event)
            bus.ack_replies(CHANNEL, reply.entry_id)
    # The tiny model can finish a whole answer before the worker's next cancel check, so the
    # worker is paused while the client goes away: on resume it is at most one step further.
    worker.send_signal(signal.SIGSTOP)
    try:
        assert "final" not in [e.kind for e in seen], "the answer ended before the cancel"
        bus.cancel(request.id)
        time.sleep(CANCEL_CHECK_S * 2)  # the cancel check is due at once on resume
    finally:
        worker.send_signal(signal.SIGCONT)
    events = seen + collect(bus, {request.id}, timeout=30, settle=1.0)[request.id]
    assert [e.kind for e in events if e.kind != "delta"] == ["error"]
    assert events[-1].code == "cancelled"  # and no text after it: the generation stopped
    assert bus.stats().pending == 0  # settled: no other worker will take it up again
    other, _ = ask(bus, "and now?")  # the worker goes on serving
    assert finals(collect(bus, {other.id}, timeout=60)) == Counter({other.id: 1})


def test_status_shows_workers_and_queue(bus, workers, cli):
    workers.start()
    ask(bus, "hello")
    result = cli("status")
    assert result.returncode == 0, result.stderr
    assert "workers: 1" in result.stdout
    assert "waiting" in result.stdout and "dead-lettered" in result.stdout
