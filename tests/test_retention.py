"""What a long-running sprbot leaves in Redis: per-request keys expire, streams stay short.

The whole path runs for real: ``sprbot adapter web`` and ``sprbot worker inference`` (tiny
model) as processes, on the embedded Redis, with the retention settings a soak uses. The bus's
own trimming of reply and dead streams is in tests/test_bus.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from processes import sprbot_exe

from adapters.web import LIVE_PREFIX
from bot.audit import AUDIT, AuditLog
from bot.bus import final_key, seen_key
from bot.config import SettingsError, load_settings
from bot.connection import EmbeddedRedis, connect
from bot.faq import ANSWERED
from bot.memory import ConversationMemory, conversation_key
from bot.metrics import WORKER_PREFIX

RETENTION_S = 600
# Keys of one request: ingress dedupe, the answered mark, the pair a 👍 can name.
PER_REQUEST = (seen_key(""), final_key(""), ANSWERED)


def _wait(what: str, found, procs: list[subprocess.Popen], timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while (value := found()) is None:
        assert all(p.poll() is None for p in procs), f"a process exited before {what} came up"
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.1)
    return value


@contextlib.contextmanager
def stack(tiny_model: Path, data_dir: Path) -> Iterator[tuple[str, object]]:
    """The web adapter and an inference worker as processes; yields (web URL, Redis client)."""
    server = EmbeddedRedis(data_dir)
    url = server.ensure_running()
    env = {
        **os.environ,
        "SPRBOT_DATA_DIR": str(data_dir),
        "SPRBOT_REDIS_URL": url,
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "8",
        "SPRBOT_LOG_LEVEL": "WARNING",
        "SPRBOT_FAQ_EMBEDDINGS": "off",
        "SPRBOT_METRICS_PORT": "0",
        "SPRBOT_WEB_PORT": "0",
        "SPRBOT_REQUEST_TTL_S": str(RETENTION_S),
        "SPRBOT_MEMORY_TTL_S": str(RETENTION_S),
        "SPRBOT_RECLAIM_IDLE_MS": "60000",
    }
    procs = [
        subprocess.Popen([sprbot_exe(), "worker", "inference"], env=env),
        subprocess.Popen([sprbot_exe(), "adapter", "web"], env=env),
    ]
    client = connect(load_settings(redis_url=url))
    try:
        _wait(
            "the inference worker",
            lambda: next(client.scan_iter(WORKER_PREFIX + "*"), None),
            procs,
        )
        live = f"{LIVE_PREFIX}{socket.gethostname()}-{procs[1].pid}"
        web_url = _wait("the web adapter", lambda: client.hget(live, "url"), procs)
        yield web_url.decode(), client
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        server.stop()


def ask(web_url: str, n: int) -> None:
    """``n`` questions at once, as concurrent users; each must get an answer."""
    with httpx.Client(base_url=web_url, timeout=120) as http:

        def one(i: int) -> httpx.Response:
            body = {"messages": [{"role": "user", "content": f"question {i}: what is sprbot?"}]}
            return http.post("v1/chat/completions", json=body)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for response in pool.map(one, range(n)):
                assert response.status_code == 200, response.text
                assert response.json()["choices"][0]["message"]["content"]


def snapshot(client) -> dict:
    """Keys without a TTL, per-request keys with their TTLs, and every stream's length."""
    lasting, per_request, streams = set(), {}, {}
    for key in client.scan_iter(count=1000):
        name = key.decode()
        ttl = client.ttl(key)
        if name.startswith(PER_REQUEST):
            per_request[name] = ttl
        elif ttl == -1:
            lasting.add(name)
        if client.type(key) == b"stream":
            streams[name] = client.xlen(key)
    return {"lasting": lasting, "per_request": per_request, "streams": streams}


def test_after_many_requests_only_expiring_keys_grow_and_streams_stay_empty(tiny_model, data_dir):
    with stack(tiny_model, data_dir) as (web_url, client):
        ask(web_url, 6)
        before = snapshot(client)
        ask(web_url, 18)
        after = snapshot(client)

    # Nothing that lives forever was added by the 18 more requests.
    assert after["lasting"] == before["lasting"]
    # Each answered request left its three keys, and each expires within the retention set.
    for prefix in PER_REQUEST:
        assert sum(k.startswith(prefix) for k in before["per_request"]) == 6, prefix
        assert sum(k.startswith(prefix) for k in after["per_request"]) == 24, prefix
    assert all(0 < ttl <= RETENTION_S for ttl in after["per_request"].values()), after
    # Answered requests and delivered replies are deleted from their streams, not kept.
    assert after["streams"]["sprbot:chat:requests"] == 0
    replies = {k: n for k, n in after["streams"].items() if k.startswith("sprbot:chat:replies:")}
    assert replies and all(n == 0 for n in replies.values()), after["streams"]


def test_conversation_memory_keeps_its_newest_turns_and_expires(embedded_redis):
    memory = ConversationMemory(connect(load_settings()), ttl_s=120, max_turns=6)
    for i in range(50):
        memory.append("slack/T1/C1", f"question {i}", f"answer {i}")

    turns = memory.turns("slack/T1/C1")
    assert [t["content"] for t in turns[-2:]] == ["question 49", "answer 49"]
    assert len(turns) == 6
    assert 0 < memory.redis.ttl(conversation_key("slack/T1/C1")) <= 120


def test_audit_trail_is_capped_and_keeps_the_newest(embedded_redis):
    audit = AuditLog(connect(load_settings()), maxlen=50)
    for i in range(400):
        audit.record(
            platform="slack",
            channel="slack",
            user_id="U1",
            command="faq add",
            arguments=f"entry {i}",
            result="ok",
        )

    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default): allow one node over.
    assert 50 <= audit.redis.xlen(AUDIT) <= 150
    assert audit.entries(1)[0].arguments == "entry 399"


def test_a_request_ttl_shorter_than_the_retries_is_refused_with_what_to_set(monkeypatch):
    monkeypatch.setenv("SPRBOT_REQUEST_TTL_S", "600")
    monkeypatch.setenv("SPRBOT_RECLAIM_IDLE_MS", "300000")

    with pytest.raises(SettingsError) as caught:
        load_settings()

    message = str(caught.value)
    assert "SPRBOT_REQUEST_TTL_S=600" in message and "at least 900" in message
    assert "SPRBOT_RECLAIM_IDLE_MS" in message
    monkeypatch.setenv("SPRBOT_RECLAIM_IDLE_MS", "60000")
    assert load_settings().request_ttl_s == 600
