"""The chaos harness: the real processes of a deployment, faults injected into them, and an exact
count of what users were shown.

A ``Deployment`` is the embedded Redis server of a fresh data dir, the Telegram Bot API
stand-in (``tests/standins/telegram_api.py``), ``sprbot adapter telegram`` and ``sprbot worker
inference`` as subprocesses on the tiny model. Users write to the bot through the stand-in,
one private chat each; ``Deployment.ledger`` then reads, from what the stand-in shows, how
each message was answered. Faults are real: SIGKILL of a process, SIGKILL or SHUTDOWN of
the Redis server.

Random choices (which worker, when, how long an outage lasts) come from one seed (``SEED``),
shown in the session header: ``CHAOS_SEED=<seed>`` replays a run (not ``SPRBOT_*``: those
are cleared by tests/conftest.py). Each scenario records its figures with ``Figures.record``;
conftest.py prints them after the run and, when ``CHAOS_REPORT`` names a file, writes them
there as JSON (docs/RELIABILITY.md cites them).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from standins.telegram_api import BotAPI, Call, Message
from test_telegram import final_of, new_user

from adapters.telegram import FEEDBACK_UP, PLACEHOLDER, PLACEHOLDER_KEY, WARNING_SIGN
from bot.bus import REQUEST_GROUP, REQUESTS, final_key, seen_key
from bot.connection import EmbeddedRedis
from bot.schemas import request_id
from inference.worker import WORKER_PREFIX

SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(10**6))
FIGURES: list[dict[str, Any]] = []


def write_report(path: Path) -> None:
    """Merge this session's scenarios into the report, so one scenario can be rerun alone."""
    report: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        report = json.loads(path.read_text())
    scenarios = {row["scenario"]: row for row in report.get("scenarios", [])}
    scenarios.update({row["scenario"]: row for row in FIGURES})
    report.update(
        seed=SEED,
        machine={"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        scenarios=list(scenarios.values()),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


class Figures:
    """One scenario's figures: what was done, how often, and what users saw."""

    def record(
        self,
        request: pytest.FixtureRequest,
        scenario: str,
        *,
        fault: str,
        faults: int,
        accepted: int,
        lost: int,
        duplicated: int,
        recovery_s: list[float],
        **extra: Any,
    ) -> None:
        FIGURES.append(
            {
                "scenario": scenario,
                "fault": fault,
                "faults": faults,
                "accepted": accepted,
                "lost": lost,
                "duplicated": duplicated,
                "recovery_s": summary(recovery_s),
                "seed": SEED,
                "command": f"CHAOS_SEED={SEED} .venv/bin/pytest {request.node.nodeid}",
                **extra,
            }
        )


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0, "min": None, "mean": None, "max": None}
    return {
        "n": len(values),
        "min": round(min(values), 2),
        "mean": round(sum(values) / len(values), 2),
        "max": round(max(values), 2),
    }


def sprbot() -> str:
    exe = shutil.which("sprbot", path=str(Path(sys.executable).parent))
    assert exe, "the sprbot console script is not installed in this environment"
    return exe


# -- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    """A sprbot subprocess. Its output goes to the test's captured output (shown on failure)."""

    name: str
    popen: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def consumer(self) -> str:
        """Its consumer name in the Redis groups (and its worker id): host and pid."""
        return f"{socket.gethostname()}-{self.pid}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def freeze(self) -> None:
        """SIGSTOP it: what it holds can no longer change."""
        self.popen.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.popen.send_signal(signal.SIGCONT)

    def kill(self) -> float:
        """SIGKILL it (frozen or not); returns when (monotonic), once it is gone."""
        self.popen.send_signal(signal.SIGKILL)
        at = time.monotonic()
        self.popen.wait(timeout=30)
        return at

    def stop(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


def wait_until(predicate, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


# -- what users saw ----------------------------------------------------------------------------


@dataclass
class Asked:
    """One message a user sent to the bot, in a private chat of their own."""

    chat_id: int
    update_id: int
    rid: str
    sent_at: float


@dataclass
class Answer:
    """How the stand-in shows the answer to one ``Asked``."""

    asked: Asked
    accepted: bool  # ingress said yes: the request went on the bus
    finals: list[Message]  # messages carrying the answer's feedback buttons
    final_texts: set[str]  # distinct texts ever shown with those buttons
    error: str | None  # the placeholder ended as an error ("⚠️ ...")
    delivered_at: float | None  # when the final was first shown (monotonic)
    stray_placeholders: int  # "…" messages left over, not the answer's placeholder

    @property
    def answered(self) -> bool:
        return len(self.finals) == 1 and len(self.final_texts) == 1

    @property
    def lost(self) -> bool:
        return self.accepted and not self.finals and self.error is None

    @property
    def duplicated(self) -> bool:
        return len(self.finals) > 1 or len(self.final_texts) > 1


@dataclass
class Ledger:
    answers: list[Answer]

    @property
    def accepted(self) -> list[Answer]:
        return [a for a in self.answers if a.accepted]

    @property
    def lost(self) -> list[Answer]:
        return [a for a in self.answers if a.lost]

    @property
    def duplicated(self) -> list[Answer]:
        return [a for a in self.answers if a.duplicated]

    @property
    def errors(self) -> list[Answer]:
        return [a for a in self.answers if a.error is not None]

    @property
    def stray_placeholders(self) -> int:
        return sum(a.stray_placeholders for a in self.answers)

    def delivered_at(self, rid: str) -> float | None:
        return next((a.delivered_at for a in self.answers if a.asked.rid == rid), None)

    def describe(self, answers: list[Answer]) -> str:
        return "; ".join(
            f"{a.asked.rid} (accepted={a.accepted}, finals={len(a.finals)}, "
            f"texts={len(a.final_texts)}, error={a.error!r})"
            for a in answers[:10]
        )


def _feedback_rid(call: Call) -> str | None:
    rows = (call.args.get("reply_markup") or {}).get("inline_keyboard") or []
    for row in rows:
        for button in row:
            data = button.get("callback_data", "")
            if data.startswith(FEEDBACK_UP):
                return data[len(FEEDBACK_UP) :]
    return None


class Load:
    """Users writing to the bot from a thread: ``count`` messages at a random pace (``gaps``
    seconds apart), never more than ``lead`` messages past a fault still to come, so that
    every fault finds work in flight. The test calls ``fault_done`` after each fault."""

    def __init__(
        self,
        deployment: Deployment,
        count: int,
        faults_after: list[int],
        pace: random.Random,
        *,
        gaps: tuple[float, float] = (0.05, 0.25),
        lead: int = 20,
        text: str = "Message {i}: tell me about the weather, the office and lunch.",
    ) -> None:
        self.deployment = deployment
        self.count = count
        self.faults_after = sorted(faults_after)
        self.pace = pace
        self.gaps = gaps
        self.lead = lead
        self.text = text
        self.faults = 0
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._send, name="chaos-load")

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self._abort.set()
        self._thread.join()

    def fault_done(self) -> None:
        self.faults += 1

    def wait_for(self, sent: int) -> None:
        wait_until(lambda: len(self.deployment.asked) >= sent, 120, f"message {sent} to be sent")

    def _send(self) -> None:
        for i in range(self.count):
            due = sum(after <= i - self.lead for after in self.faults_after)
            while self.faults < due and not self._abort.is_set():
                time.sleep(0.05)
            if self._abort.is_set():
                return
            self.deployment.ask(self.text.format(i=i))
            time.sleep(self.pace.uniform(*self.gaps))


class FinalWatcher:
    """Notes when each watched request's final reply is written on the bus (its ``final`` key
    appears): with the time it is shown, this splits a recovery into the workers' part and the
    adapter's."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.written: dict[str, float] = {}
        self._watched: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def watch(self, rids: list[str]) -> None:
        with self._lock:
            self._watched += [r for r in rids if r not in self._watched]

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                todo = [r for r in self._watched if r not in self.written]
            if not todo:
                continue
            pipe = self.client.pipeline(transaction=False)
            for rid in todo:
                pipe.exists(final_key(rid))
            try:
                found = pipe.execute()
            except redis.RedisError:
                continue  # Redis is being restarted
            now = time.monotonic()
            for rid, exists in zip(todo, found, strict=True):
                if exists:
                    self.written[rid] = now

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- the deployment ----------------------------------------------------------------------------


@dataclass
class Deployment:
    """Redis, the Telegram stand-in, adapters and inference workers of one test."""

    data_dir: Path
    model: Path
    api: BotAPI
    redis: EmbeddedRedis
    env: dict[str, str]
    procs: list[Proc] = field(default_factory=list)
    asked: list[Asked] = field(default_factory=list)

    def __post_init__(self) -> None:
        # redis-py reconnects by itself after a restart of the server.
        self.client = redis.Redis(unix_socket_path=str(self.redis.socket), socket_timeout=5)

    def _spawn(self, name: str, args: list[str], **env: str) -> Proc:
        popen = subprocess.Popen([sprbot(), *args], env={**self.env, **env})
        proc = Proc(name, popen)
        self.procs.append(proc)
        return proc

    def start_worker(self, *, wait: bool = True, **env: str) -> Proc:
        """``sprbot worker inference``; with ``wait``, until its first heartbeat."""
        proc = self._spawn("worker", ["worker", "inference"], **env)
        if wait:
            self.wait_ready(proc)
        return proc

    def ready(self, worker: Proc) -> bool:
        """Whether the worker has sent its first heartbeat (it serves)."""
        return bool(self.client.exists(WORKER_PREFIX + worker.consumer))

    def wait_ready(self, worker: Proc, timeout: float = 180) -> None:
        def up() -> bool:
            assert worker.alive(), "the inference worker exited during start-up"
            return self.ready(worker)

        wait_until(up, timeout, "the inference worker's first heartbeat", every=0.1)

    def start_adapter(self, **env: str) -> Proc:
        """``sprbot adapter telegram`` against the stand-in, until it polls for updates."""
        started = time.monotonic()
        proc = self._spawn("adapter", ["adapter", "telegram"], **env)

        def polling() -> bool:
            assert proc.alive(), "the Telegram adapter exited during start-up"
            # deleteWebhook comes just before its first getUpdates (which is recorded only
            # when the long poll returns).
            return any(c.at >= started for c in self.api.calls_to("deleteWebhook"))

        wait_until(polling, 120, "the Telegram adapter to poll", every=0.1)
        return proc

    def ask(self, text: str) -> Asked:
        user = new_user()
        chat = self.api.private_chat(user)
        update = self.api.message(chat, user, text)
        rid = request_id("telegram", self.api.bot["id"], update["update_id"])
        asked = Asked(chat["id"], update["update_id"], rid, time.monotonic())
        self.asked.append(asked)
        return asked

    def pending_of(self, consumer: str) -> list[str]:
        """Request ids the consumer holds unacknowledged (read, not answered yet)."""
        client = self.client
        entries = client.xpending_range(REQUESTS, REQUEST_GROUP, "-", "+", 1000, consumer)
        rids = []
        for entry in entries:
            found = client.xrange(REQUESTS, entry["message_id"], entry["message_id"])
            if found:
                rids.append(json.loads(found[0][1][b"data"])["id"])
        return rids

    def holding(self) -> set[str]:
        """Consumers that hold unacknowledged requests now (one cheap call)."""
        summary = self.client.xpending(REQUESTS, REQUEST_GROUP)
        return {c["name"].decode() for c in summary["consumers"] if c["pending"]}

    def in_between(self) -> list[str]:
        """Requests on the bus (ingress said yes) whose answer no user has seen yet."""
        ledger = self.ledger()
        return [a.asked.rid for a in ledger.answers if a.accepted and not a.finals and not a.error]

    def ledger(self) -> Ledger:
        calls = list(self.api.calls)
        messages = list(self.api.messages.values())
        final_calls: dict[str, list[Call]] = {}
        for call in calls:
            if call.status != 200 or call.method not in ("sendMessage", "editMessageText"):
                continue
            rid = _feedback_rid(call)
            if rid is not None:
                final_calls.setdefault(rid, []).append(call)
        asked_so_far = list(self.asked)  # the sender thread may add to it meanwhile
        client = self.client
        pipe = client.pipeline(transaction=False)
        for asked in asked_so_far:
            pipe.exists(seen_key(asked.rid))
            pipe.get(PLACEHOLDER_KEY + asked.rid)
        flags = pipe.execute()
        answers = []
        for i, asked in enumerate(asked_so_far):
            accepted, placeholder = bool(flags[2 * i]), flags[2 * i + 1]
            in_chat = [m for m in messages if m.chat_id == asked.chat_id and not m.deleted]
            finals = [m for m in final_of(in_chat) if FEEDBACK_UP + asked.rid in m.callback_data()]
            shown = final_calls.get(asked.rid, [])
            placeholder_id = int(placeholder) if placeholder is not None else None
            error = next(
                (
                    m.text
                    for m in in_chat
                    if m.message_id == placeholder_id and m.text.startswith(WARNING_SIGN)
                ),
                None,
            )
            strays = [
                m for m in in_chat if m.text == PLACEHOLDER and m.message_id != placeholder_id
            ]
            answers.append(
                Answer(
                    asked,
                    accepted,
                    finals,
                    {c.args["text"] for c in shown},
                    error,
                    min((c.at for c in shown), default=None),
                    len(strays),
                )
            )
        return Ledger(answers)

    def settled(self, timeout: float) -> Ledger:
        """The ledger once every message has been answered (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while True:
            ledger = self.ledger()
            done = all((a.accepted and a.finals) or a.error for a in ledger.answers)
            if done or time.monotonic() > deadline:
                return ledger
            time.sleep(0.5)

    def kill_redis(self) -> float:
        """SIGKILL the Redis server, as a crash would; returns when (monotonic)."""
        pid = int((self.redis.dir / "redis.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        at = time.monotonic()
        wait_until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 10, "redis to die")
        return at

    def restart_redis(self) -> float:
        self.redis.ensure_running()
        return time.monotonic()

    def stop_all(self) -> None:
        for proc in self.procs:
            proc.stop()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def worker_env(model: Path, **overrides: str) -> dict[str, str]:
    """Settings of the chaos workers: the tiny model, greedy, long enough answers that a kill
    lands mid-generation, and a short reclaim bound so recovery is quick."""
    return {
        "SPRBOT_MODEL": str(model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "96",
        "SPRBOT_RECLAIM_IDLE_MS": "4000",  # two heartbeats: each touches what a worker holds
        # Each kill adds a delivery to what it held; the default of 3 could dead-letter a
        # request that two kills in a row hit, which is a different test.
        "SPRBOT_MAX_DELIVERIES": "10",
        "SPRBOT_MAX_BACKLOG": "1000",
        **overrides,
    }
