"""The README's run command: `sprbot up --demo` brings up everything, and the demo model
(SmolLM2-135M-Instruct) answers from the sample FAQ and by itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import redis
from processes import sprbot_exe

from bot.connection import EmbeddedRedis
from bot.demo import SAMPLE_FAQ
from inference.worker import FAQ_PREFIX, WORKER_PREFIX

SAMPLE = {row["instruction"]: row["output"] for row in json.loads(SAMPLE_FAQ.read_text())}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_up_demo_serves_the_real_model_grounded_on_the_sample_faq(data_dir, smollm2, cli):
    questions = ["What is sprbot?", "/reset", "What is Intel?", "/reset", "/faq list"]
    result = cli(
        "up",
        "--demo",
        "--chat",
        stdin="\n".join(questions) + "\n",
        env={"SPRBOT_DO_SAMPLE": "false"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.split("you> ") if line.startswith("bot> ")]
    sprbot, _, intel = replies[:3]
    # Answered from the FAQ, word for word ...
    assert sprbot.startswith(f"bot> {FAQ_PREFIX}{SAMPLE['What is sprbot?']}"), sprbot
    # ... and by the model, which knows what Intel is (a company that makes processors).
    assert FAQ_PREFIX not in intel and "Intel" in intel and len(intel) > 80, intel
    assert any(w in intel.lower() for w in ("company", "corporation", "processor", "chip")), intel
    assert "Conversation cleared." in result.stdout
    assert all(question in replies[4] for question in SAMPLE), replies[4]  # /faq list
    # Labelled a small demo model, with how to serve a real one.
    assert "SmolLM2-135M-Instruct" in result.stderr and "SPRBOT_MODEL" in result.stderr
    assert f"Loaded sprbot's sample FAQ: {len(SAMPLE)} approved entries." in result.stderr
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
