"""The fuzz suite's shared parts: one Redis, one real inference worker on the tiny model, and
the tally of inputs tried per surface (settings and helpers: ``fuzzing.py``).

Hostile input reaches sprbot at three doors: Slack's ``/slack/events`` (HTTP mode, signed),
Telegram's webhook (secret token) and, from anything with Redis access, the requests stream.
Each test drives one door with Hypothesis through the real process behind it, then checks
that the process still answers a valid request. The tally is printed at the end of the run
and written to ``<pytest basetemp>/fuzz-inputs.json``.

Runs are reproducible (``derandomize``, no example database), so CI sees the same inputs
every time; ``FUZZ_EXAMPLES=<n>`` raises each test's example count for a deeper local run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzzing import Served

from bot.config import Settings
from bot.connection import EmbeddedRedis, connect

TALLY = pytest.StashKey[Counter]()
REPORT = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def tally(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Counter:
    """Inputs tried, per surface: ``tally["slack"] += 1`` once per input sent."""
    request.config.stash[REPORT] = tmp_path_factory.getbasetemp() / "fuzz-inputs.json"
    return request.config.stash.setdefault(TALLY, Counter())


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    counts = config.stash.get(TALLY, None)
    if not counts:
        return
    terminalreporter.section("fuzz inputs tried")
    for surface, count in sorted(counts.items()):
        terminalreporter.write_line(f"{surface:36} {count:>7,}")
    terminalreporter.write_line(f"{'total':36} {sum(counts.values()):>7,}")
    path = config.stash[REPORT]
    path.write_text(json.dumps(dict(sorted(counts.items())), indent=2) + "\n")
    terminalreporter.write_line(f"written to {path}")


@pytest.fixture(scope="session")
def served(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    server = EmbeddedRedis(data_dir)
    url = server.ensure_running()
    exe = shutil.which("sprbot", path=str(Path(sys.executable).parent))
    assert exe, "the sprbot console script is not installed in this environment"
    env = {
        **os.environ,
        "SPRBOT_DATA_DIR": str(data_dir),
        "SPRBOT_REDIS_URL": url,
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "8",
        "SPRBOT_LOG_LEVEL": "WARNING",
        "SPRBOT_METRICS_PORT": "0",
        "SPRBOT_FAQ_EMBEDDINGS": "off",
        "OMP_NUM_THREADS": "1",
    }
    log_path = data_dir.parent / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [exe, "worker", "inference"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
    client = connect(Settings(_env_file=None, redis_url=url))
    served = Served(data_dir, url, client, worker, log_path)
    try:
        served.heartbeat(newer_than=0, timeout=180)
        yield served
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)
        server.stop()
