"""The README's run command: `sprbot up --demo` brings up everything and the demo answers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
from processes import sprbot_exe

from bot.connection import EmbeddedRedis
from inference.worker import WORKER_PREFIX
from training.demo import load_pairs


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_up_demo_answers_the_sample_faq_in_the_terminal_chat(data_dir, cli):
    built = cli("model", "demo", timeout=1500)
    assert built.returncode == 0, built.stderr
    demo_dir = Path(built.stdout.strip().splitlines()[-1])
    marker = json.loads((demo_dir / "sprbot.json").read_text())
    assert marker["kind"] == "demo" and marker["recalled"] == marker["questions"] == 12
    assert "NOT a real language model" in (demo_dir / "README.md").read_text()

    pairs = dict(load_pairs())
    questions = ["What is sprbot?", "/reset", "Do I need a GPU?", "/reset", "Who can run /retrain?"]
    result = cli(
        "up",
        "--demo",
        "--chat",
        stdin="\n".join(questions) + "\n",
        env={"SPRBOT_DO_SAMPLE": "false"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    for question in ("What is sprbot?", "Do I need a GPU?", "Who can run /retrain?"):
        assert pairs[question] in result.stdout, result.stdout
    assert "Conversation cleared." in result.stdout
    assert "offline DEMO model" in result.stderr
    assert not EmbeddedRedis(data_dir).is_running()  # `up` stops the server it started


def test_up_stops_its_worker_and_redis_on_sigterm(data_dir, tiny_model):
    env = {**os.environ, "SPRBOT_MODEL": str(tiny_model), "SPRBOT_LOG_LEVEL": "WARNING"}
    proc = subprocess.Popen(
        [sprbot_exe(), "up", "--no-chat"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        # Connect only once `up` has started the server: a client of ours would start it
        # first, and `up` rightly leaves alone a server it did not start.
        server = EmbeddedRedis(data_dir)
        deadline = time.monotonic() + 120
        while not server.is_running():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        client = redis.Redis.from_url(server.url)
        while not (workers := list(client.scan_iter(WORKER_PREFIX + "*"))):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        worker_pid = int(workers[0].decode().rsplit("-", 1)[1])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0
        assert "sprbot stopped." in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)
    assert not EmbeddedRedis(data_dir).is_running()
