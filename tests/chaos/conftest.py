"""Fixtures of the chaos suite (see harness.py), its seed in the header, its figures at the end."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import FIGURES, SEED, Deployment, Figures, worker_env, write_report
from standins.telegram_api import BotAPI
from test_retrain import bus, env, trainers, workers  # noqa: F401 (fixtures, shared)

from bot.connection import EmbeddedRedis


def pytest_report_header(config: pytest.Config) -> str:
    return f"chaos seed: {SEED} (replay with CHAOS_SEED={SEED})"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"chaos figures (seed {SEED})")
    head = ("scenario", "faults", "accepted", "lost", "dup", "recovery s")
    write("{:44} {:>6} {:>8} {:>4} {:>4} {:>12}".format(*head))
    for row in FIGURES:
        recovery = row.get("recovery_s") or {}
        shown = f"{recovery['max']:.1f}" if recovery.get("max") is not None else "-"
        write(
            f"{row['scenario'][:44]:44} {row['faults']:>6} {row['accepted']:>8} "
            f"{row['lost']:>4} {row['duplicated']:>4} {shown:>12}"
        )
    target = os.environ.get("CHAOS_REPORT")
    if target:
        write_report(Path(target))
        write(f"figures written to {target}")


@pytest.fixture
def figures() -> Figures:
    return Figures()


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """This test's random choices: the session seed and the test's name decide them."""
    return random.Random(f"{SEED}/{request.node.name}")


@pytest.fixture
def deployment(tiny_model: Path, data_dir: Path) -> Iterator[Deployment]:
    server = EmbeddedRedis(data_dir)
    url = server.ensure_running()
    with BotAPI() as api:
        env = {
            **os.environ,
            "SPRBOT_DATA_DIR": str(data_dir),
            "SPRBOT_REDIS_URL": url,  # no process restarts the server: the test does
            "SPRBOT_LOG_LEVEL": "WARNING",
            "SPRBOT_METRICS_PORT": "0",
            "SPRBOT_FAQ_EMBEDDINGS": "off",
            "SPRBOT_TELEGRAM_TOKEN": api.token,
            "SPRBOT_TELEGRAM_API_URL": api.url,
            # A replica's unshown answers are taken over after 2 s (default 2 minutes).
            "SPRBOT_REPLY_RECLAIM_IDLE_MS": "2000",
            "OMP_NUM_THREADS": "1",  # several processes share two cores
            **worker_env(tiny_model),
        }
        deployment = Deployment(data_dir, tiny_model, api, server, env)
        try:
            yield deployment
        finally:
            deployment.stop_all()
            if not server.is_running():
                server.ensure_running()  # so that stop() below finds it and shuts it down
            server.stop()
