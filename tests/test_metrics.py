"""/metrics and /healthz of real processes: an inference worker on the tiny model, a training
worker running a real retrain, `sprbot up`; scraped over HTTP and parsed with
prometheus_client's own parser. `sprbot status` shows the same facts."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rq.job import Job
from test_retrain import ADMIN, add_faq, context, job_id_of, trainers  # noqa: F401 (a fixture)
from test_worker import Workers, ask, collect

from bot.bus import REQUESTS, Bus
from bot.commands import dispatch
from bot.config import load_settings
from bot.connection import connect
from bot.faq import FaqStore, WordEmbedder
from bot.metrics import WORKER_PREFIX, serve_metrics
from bot.schemas import ChatRequest

FAQ_QUESTION = "Where do I find the VPN guide?"
FAQ_ANSWER = "In the IT wiki under Remote work."


@pytest.fixture
def env(tiny_model, data_dir, embedded_redis, monkeypatch):
    for key, value in {
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "24",
        "SPRBOT_LOG_LEVEL": "WARNING",
        "SPRBOT_FAQ_EMBEDDINGS": "off",
        "SPRBOT_FAQ_GROUNDING": "on",
        "SPRBOT_CONSOLE_ADMINS": ADMIN,
        "SPRBOT_METRICS_PORT": "0",  # each process of a test is given its own port
    }.items():
        monkeypatch.setenv(key, value)
    return data_dir


@pytest.fixture
def bus(env) -> Bus:
    return Bus(connect(load_settings()), max_backlog=256)


@pytest.fixture
def workers():
    started = Workers()
    yield started
    started.stop_all()


@pytest.fixture
def metrics_here(env):
    """This test process's own metrics server: it counts what this process submits, as an
    adapter's does."""
    servers = []

    def start(role: str = "console"):
        server = serve_metrics(load_settings(metrics_port=free_port()), role)
        assert server is not None
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def free_port(count: int = 1) -> int:
    """A port with ``count`` free ports from it on (for `sprbot up`'s consecutive ports)."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError(f"no {count} consecutive free ports")


class Scrape:
    """One scrape of /metrics, parsed by prometheus_client."""

    def __init__(self, port: int) -> None:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["Content-Type"].startswith("text/plain")
            self.text = reply.read().decode()
        self.samples = [
            sample
            for family in text_string_to_metric_families(self.text)
            for sample in family.samples
        ]

    def find(self, name: str, **labels: str) -> list:
        """The samples of ``name`` (a prefix, if it ends with ``_``) with those labels."""
        return [
            s
            for s in self.samples
            if (s.name == name or (name.endswith("_") and s.name.startswith(name)))
            and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        """The sample's value; 0 when the series does not exist (yet)."""
        found = self.find(name, **labels)
        assert len(found) <= 1, found
        return found[0].value if found else 0.0


def healthz(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_for(check, timeout: float, what: str, seen=lambda: ""):
    """``check()``'s first true result; on timeout, fail saying what ``seen()`` found."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; {seen()}")


def test_a_workers_metrics_count_what_its_users_got(bus, tiny_model, workers, metrics_here, cli):
    here = metrics_here("console")
    before = Scrape(here.port)
    faq = FaqStore(bus.redis, WordEmbedder())
    faq.add(FAQ_QUESTION, FAQ_ANSWER, source="admin", author="test")

    # Refusals at the edge, before any worker runs: a full backlog, a re-delivery, too long.
    tight = Bus(bus.redis, max_backlog=1)
    first, result = ask(tight, "What is sprbot?", 0)
    assert result.status == "queued"
    assert ask(tight, "And what else?", 1)[1].status == "busy"
    assert bus.submit(first).status == "duplicate"
    assert ask(bus, "x" * 5000, 2)[1].status == "too_long"
    bus.redis.xadd(REQUESTS, {"data": "not a request"})  # dead-lettered by the worker

    port = free_port()
    workers.start(metrics_port=str(port))
    asked = [ask(bus, q, n)[0] for n, q in enumerate(["Hello there", "Tell me more", "   "], 3)]
    faq_request = ask(bus, FAQ_QUESTION, 6)[0]
    ids = {first.id, faq_request.id} | {r.id for r in asked}
    events = collect(bus, ids)
    ends = {rid: evs[-1] for rid, evs in events.items() if rid in ids}
    assert [ends[r.id].kind for r in (first, *asked, faq_request)] == [
        "final",
        "final",
        "final",
        "error",  # a blank question
        "final",
    ]
    assert ends[faq_request.id].text == "From the team FAQ: " + FAQ_ANSWER
    model_answers = [ends[r.id] for r in (first, *asked[:2])]

    # The adapter side (this process): every ingress outcome once.
    after = Scrape(here.port)
    counted = {
        outcome: after.value("sprbot_requests_total", channel="console", outcome=outcome)
        - before.value("sprbot_requests_total", channel="console", outcome=outcome)
        for outcome in ("accepted", "busy", "duplicate", "too_long")
    }
    assert counted == {"accepted": 5, "busy": 1, "duplicate": 1, "too_long": 1}
    assert after.value("sprbot_process_info", role="console") == 1

    # The worker side: how each request ended, and how long it took.
    w = Scrape(port)
    assert w.value("sprbot_process_info", role="inference") == 1
    assert w.value("sprbot_requests_total", channel="console", outcome="answered") == 4
    assert w.value("sprbot_requests_total", channel="console", outcome="error") == 1
    assert w.value("sprbot_requests_total", channel="unknown", outcome="dead_lettered") == 1
    for source, n in (("model", 3), ("faq", 1)):
        labels = {"channel": "console", "source": source}
        assert w.value("sprbot_time_to_first_token_seconds_count", **labels) == n
        assert w.value("sprbot_answer_duration_seconds_count", **labels) == n
        first_token = w.value("sprbot_time_to_first_token_seconds_sum", **labels)
        answer = w.value("sprbot_answer_duration_seconds_sum", **labels)
        assert 0 < first_token <= answer
        assert w.value("sprbot_answer_duration_seconds_bucket", le="+Inf", **labels) == n
    generated = sum(final.usage.completion_tokens for final in model_answers)
    assert w.value("sprbot_decode_tokens_total") == generated > 0
    assert w.value("sprbot_decode_seconds_total") > 0
    steps = w.value("sprbot_decode_batch_size_count")
    assert steps >= max(final.usage.completion_tokens for final in model_answers)
    assert w.value("sprbot_decode_batch_size_sum") >= steps
    [info] = w.find("sprbot_model_info")
    assert info.labels["version"] == "base" and info.labels["model"] == str(tiny_model)
    assert w.value("sprbot_batch_capacity") == 8

    # The deployment's facts from Redis, the same in every process's scrape.
    for scrape in (w, Scrape(here.port)):
        assert scrape.value("sprbot_redis_up") == 1
        assert scrape.value("sprbot_workers") == 1
        assert scrape.value("sprbot_queue_requests", state="waiting") == 0
        assert scrape.value("sprbot_queue_requests", state="in_flight") == 0
        assert scrape.value("sprbot_queue_lag_seconds") == 0
        assert scrape.value("sprbot_dead_letters") == 1
        assert scrape.value("sprbot_serving_version_info", version="base") == 1
        assert scrape.value("sprbot_faq_entries", status="approved") == 1
        assert scrape.value("sprbot_faq_hits_total") == 1
        assert scrape.value("sprbot_faq_questions_total") == 5
        assert scrape.value("sprbot_faq_hit_ratio") == pytest.approx(1 / 5)

    status, report = healthz(port)
    assert status == 200, report
    assert report["role"] == "inference" and report["ok"]
    assert report["checks"]["redis"]["ok"]
    assert report["checks"]["model"]["version"] == "base"

    # `sprbot status` shows the latencies the worker's heartbeat carries.
    [key] = list(bus.redis.scan_iter(WORKER_PREFIX + "*"))
    wait_for(lambda: bus.redis.hget(key, "answer_p50"), 30, "a heartbeat with latencies")
    shown = cli("status")
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"first token p50 \d+\.\d\ds, p99 \d+\.\d\ds; answer p50", shown.stdout)
    assert "faq: 1 approved, 0 candidates" in shown.stdout
    assert "1 of 5 questions answered from the FAQ (hit rate 20%)" in shown.stdout
    assert "queue: 0 waiting, 0 in progress, 1 dead-lettered" in shown.stdout


def test_queue_lag_is_the_age_of_the_oldest_unanswered_request(bus, metrics_here, cli):
    here = metrics_here()
    assert Scrape(here.port).value("sprbot_queue_lag_seconds") == 0
    # A request that has waited 90 s: a stream entry's id is the time it was added.
    request = ChatRequest(
        id="test-lag", channel="console-test", conversation="c", user_id="u", text="Hi"
    )
    added = int(time.time() * 1000) - 90_000
    bus.redis.xadd(REQUESTS, {"data": request.model_dump_json()}, id=f"{added}-0")
    scrape = Scrape(here.port)
    assert scrape.value("sprbot_queue_requests", state="waiting") == 1
    assert 90 <= scrape.value("sprbot_queue_lag_seconds") < 120
    assert scrape.value("sprbot_workers") == 0
    assert re.search(
        r"queue: 1 waiting, 0 in progress, 0 dead-lettered, the oldest 9\d\.\ds old",
        cli("status").stdout,
    )


def test_healthz_says_503_while_redis_is_gone(bus, embedded_redis, metrics_here):
    here = metrics_here("telegram")
    status, report = healthz(here.port)
    assert (status, report["role"], report["ok"]) == (200, "telegram", True)

    embedded_redis.stop()
    status, report = healthz(here.port)
    assert status == 503
    assert report["ok"] is False and report["checks"]["redis"]["ok"] is False
    assert "Error" in report["checks"]["redis"]["error"]
    scrape = Scrape(here.port)  # /metrics still answers, and says what it could not read
    assert scrape.value("sprbot_redis_up") == 0
    assert scrape.value("sprbot_process_info", role="telegram") == 1
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"http://127.0.0.1:{here.port}/nothing", timeout=10)
    assert missing.value.code == 404


def test_a_taken_port_leaves_the_process_running_without_metrics(env, caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert serve_metrics(load_settings(metrics_port=port), "slack") is None
    assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
    assert "SPRBOT_METRICS_PORT" in caplog.text
    assert serve_metrics(load_settings(metrics_port=0), "slack") is None  # 0: off


def test_training_state_and_progress_come_from_the_train_worker(bus, env, trainers, cli):  # noqa: F811
    add_faq(bus)
    job_id = job_id_of(dispatch("/retrain", context(bus)))
    port = free_port()
    trainers(SPRBOT_TRAIN_EPOCHS="5000", SPRBOT_METRICS_PORT=str(port))
    wait_for(lambda: _up(port), 60, "the training worker's metrics")

    training = wait_for(
        lambda: (s := Scrape(port)).value("sprbot_training_step") > 0 and s,
        300,
        "fine-tuning steps in the scrape",
        seen=lambda: (
            [(s.name, s.labels, s.value) for s in Scrape(port).find("sprbot_training_")]
            + [Job.fetch(job_id, connection=bus.redis).get_meta(refresh=True)]
        ),
    )
    assert training.value("sprbot_process_info", role="train") == 1
    assert training.value("sprbot_training_state", state="started") == 1
    assert training.value("sprbot_training_state", state="idle") == 0
    assert training.value("sprbot_training_job_info", job=job_id, phase="fine-tuning") == 1
    step, steps = training.value("sprbot_training_step"), training.value("sprbot_training_steps")
    assert 0 < step < steps
    assert 0 < training.value("sprbot_training_progress_ratio") < 1
    assert training.find("sprbot_training_loss") and training.find("sprbot_training_eta_seconds")
    shown = cli("status")
    assert re.search(
        rf"training: {job_id} is started, fine-tuning, step \d+/{int(steps)}", shown.stdout
    )

    reply = dispatch("/train cancel", context(bus))
    assert reply.startswith(f"Cancelling the retrain {job_id}"), reply
    idle = Scrape(port)
    assert idle.value("sprbot_training_state", state="idle") == 1
    assert idle.value("sprbot_training_state", state="started") == 0
    assert not idle.find("sprbot_training_job_info") and not idle.find("sprbot_training_step")
    assert sum(s.value for s in idle.find("sprbot_training_jobs")) == 1  # the cancelled one
    assert "training: idle" in cli("status").stdout


def _up(port: int) -> bool:
    try:
        return healthz(port)[0] == 200
    except OSError:
        return False


def test_up_gives_each_of_its_processes_a_metrics_port(env, tmp_path):
    base = free_port(3)
    exe = shutil.which("sprbot", path=str(Path(sys.executable).parent))
    log = tmp_path / "up.log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [exe, "up", "--no-chat"],
            env={**os.environ, "SPRBOT_METRICS_PORT": str(base), "SPRBOT_LOG_LEVEL": "WARNING"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,
        )
    try:
        wait_for(lambda: "sprbot is up" in log.read_text(), 180, "sprbot up", log.read_text)
        # Then each adapter it starts (the web one, those with credentials), one port each.
        [listed] = re.findall(
            r"Metrics \(/metrics, /healthz\) on 127.0.0.1: (.*)\.\n", log.read_text()
        )
        ports = [(role, int(port)) for role, port in re.findall(r"(\w+) (\d+)", listed)]
        assert ports[:3] == [("up", base), ("inference", base + 1), ("train", base + 2)]
        assert [port for _, port in ports] == list(range(base, base + len(ports)))
        for role, port in ports:
            status, report = wait_for(lambda p=port: _up(p) and healthz(p), 60, role)
            assert (status, report["role"]) == (200, role), report
        assert Scrape(base + 1).find("sprbot_model_info", version="base")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=90)
    assert "sprbot stopped." in log.read_text()
