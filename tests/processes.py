"""Real sprbot processes for the tests: the console script, and an inference worker that is up."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from bot.config import Settings
from bot.connection import connect
from inference.worker import WORKER_PREFIX


def sprbot_exe() -> str:
    """The ``sprbot`` console script of the environment running the tests."""
    exe = shutil.which("sprbot", path=str(Path(sys.executable).parent))
    assert exe, "the sprbot console script is not installed in this environment"
    return exe


def wait_for_worker(proc: subprocess.Popen, redis_url: str, timeout: float = 180) -> None:
    """Wait until the inference worker ``proc`` has written its first heartbeat: it serves."""
    client = connect(Settings(_env_file=None, redis_url=redis_url))
    deadline = time.monotonic() + timeout
    try:
        while not any(str(proc.pid) in k.decode() for k in client.scan_iter(WORKER_PREFIX + "*")):
            assert proc.poll() is None, "the inference worker exited during start-up"
            assert time.monotonic() < deadline, "the inference worker did not come up"
            time.sleep(0.1)
    finally:
        client.close()


def start_inference_worker(
    env: Mapping[str, str], redis_url: str, timeout: float = 180, **popen
) -> subprocess.Popen:
    """``sprbot worker inference`` with ``env``, once it serves (killed if it never does)."""
    proc = subprocess.Popen([sprbot_exe(), "worker", "inference"], env=dict(env), **popen)
    try:
        wait_for_worker(proc, redis_url, timeout)
    except BaseException:
        proc.kill()
        proc.wait(timeout=30)
        raise
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> str:
    """Send ``sig``, wait up to ``timeout`` (then kill); returns the output it piped, if any."""
    proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
    return out or ""
