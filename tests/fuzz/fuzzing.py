"""Helpers of the fuzz suite: its Hypothesis settings, the shared worker, waiting."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from hypothesis import HealthCheck, settings

from bot.bus import REQUESTS
from inference.worker import WORKER_PREFIX

settings.register_profile(
    "sprbot-fuzz",
    deadline=None,  # a real server answers each input: its timing is not what is tested
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def examples(n: int) -> settings:
    """Settings for a fuzz test that tries ``n`` inputs (``FUZZ_EXAMPLES`` overrides)."""
    override = os.environ.get("FUZZ_EXAMPLES", "")
    return settings(
        settings.get_profile("sprbot-fuzz"),
        max_examples=int(override) if override.isdigit() else n,
    )


def wait_for(predicate, what: str, timeout: float = 20, alive=lambda: None):
    """Poll ``predicate`` until it returns something truthy, and return that; ``alive``
    raises as soon as what should produce it has died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive()
        found = predicate()
        if found:
            return found
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Tracebacks(logging.Handler):
    """Log records that carry a traceback: an exception sprbot did not expect."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)

    def summary(self) -> str:
        return "\n\n".join(self.format(r) for r in self.records[:3])


def raw_post(port: int, path: str, head: dict[str, str], body: bytes = b"") -> int:
    """POST with exactly these headers, and no more of the body than given: a client that
    announces more than it sends, or a length that is not a number. Returns the status."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in head.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        reply = conn.recv(4096).decode("latin-1")
    return int(reply.split(" ", 2)[1])


@dataclass
class Served:
    """The Redis and the inference worker the fuzz tests share."""

    data_dir: Path
    redis_url: str
    client: redis.Redis
    worker: subprocess.Popen
    worker_log: Path

    def heartbeat(self, newer_than: float, timeout: float = 30) -> dict[str, str]:
        """The worker's next heartbeat written after ``newer_than`` (unix time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.alive()
            for key in self.client.scan_iter(WORKER_PREFIX + "*"):
                beat = {k.decode(): v.decode() for k, v in self.client.hgetall(key).items()}
                if float(beat.get("updated_at", 0)) > newer_than:
                    return beat
            time.sleep(0.1)
        raise AssertionError(f"no heartbeat from the worker:\n{self.log_tail()}")

    def last_request_id(self) -> str:
        """The id of the newest entry ever added to the requests stream ("0-0": none). It
        only moves forward, even after the worker has deleted what it answered."""
        try:
            info = self.client.xinfo_stream(REQUESTS)
        except redis.ResponseError:  # no stream yet
            return "0-0"
        last = info["last-generated-id"]
        return last.decode() if isinstance(last, bytes) else str(last)

    def quiet(self, timeout: float = 60) -> None:
        """Wait until the worker has answered everything on the requests stream."""
        deadline = time.monotonic() + timeout
        while self.client.xlen(REQUESTS):
            assert time.monotonic() < deadline, "the worker did not drain the requests stream"
            time.sleep(0.05)

    def alive(self) -> None:
        assert self.worker.poll() is None, f"the worker exited:\n{self.log_tail()}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.worker_log.read_text(errors="replace").splitlines()[-lines:])
