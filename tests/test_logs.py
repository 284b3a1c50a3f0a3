"""Structured logs: JSON lines off a terminal, text on one; request ids that join one message's
path across processes; secrets masked whoever logs them."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from bot.config import load_settings
from bot.connection import connect
from bot.logs import MASK, configure_logging, request_context
from bot.metrics import WORKER_PREFIX

SLACK_TOKEN = "xoxb-1111111111-2222222222-abcdefghijklmnopqrstuvwx"
TELEGRAM_TOKEN = "123456789:AAEhBOweik6ad6PsVMRxjeQKeMxTESTTOKEN"
WEB_KEY = "sk-web-key-that-must-stay-secret"
SECRETS_ENV = {
    "SPRBOT_SLACK_BOT_TOKEN": SLACK_TOKEN,
    "SPRBOT_TELEGRAM_TOKEN": TELEGRAM_TOKEN,
    "SPRBOT_WEB_API_KEYS": f"sk-other-key,{WEB_KEY}",
}
SECRETS = (SLACK_TOKEN, TELEGRAM_TOKEN, WEB_KEY, TELEGRAM_TOKEN.split(":", 1)[1])


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def captured(monkeypatch):
    """Configure logging as a CLI process does, into a stream; restore the root logger after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def configure(stream: io.StringIO | None = None, role: str = "slack", **settings):
        stream = stream if stream is not None else io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        configure_logging(load_settings(**settings), role)
        return stream

    yield configure
    handlers, level = saved
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


def json_lines(text: str) -> list[dict]:
    """Every line must be one JSON object."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_lines_off_a_terminal_carry_role_request_id_and_extras(captured):
    out = captured(role="slack")
    log = logging.getLogger("adapters.slack")
    log.info("outside any request")
    with request_context("slack-abc123"):
        log.warning("placeholder for %s posted", "U1", extra={"channel_id": "C9"})
        try:
            raise RuntimeError("the Web API said no")
        except RuntimeError:
            log.exception("posting failed")
    log.debug("below the level: dropped")
    lines = json_lines(out.getvalue())
    assert [line["message"] for line in lines] == [
        "outside any request",
        "placeholder for U1 posted",
        "posting failed",
    ]
    first, second, third = lines
    assert first["request_id"] is None and first["level"] == "INFO"
    assert first["role"] == "slack" and first["logger"] == "adapters.slack"
    assert first["pid"] == os.getpid() and first["time"].endswith("Z")
    assert second["request_id"] == "slack-abc123" and second["channel_id"] == "C9"
    assert third["request_id"] == "slack-abc123" and third["level"] == "ERROR"
    assert "RuntimeError: the Web API said no" in third["exc"]
    assert "Traceback" in third["exc"]


def test_text_on_a_terminal_unless_json_is_asked_for(captured):
    out = captured(_Terminal(), role="inference")
    with request_context("telegram-42"):
        logging.getLogger("inference.worker").info("answered")
    line = out.getvalue().strip()
    assert line.endswith("INFO inference.worker [inference telegram-42]: answered"), line
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)

    out = captured(_Terminal(), role="inference", log_format="json")
    logging.getLogger("inference.worker").info("answered")
    assert json_lines(out.getvalue())[0]["message"] == "answered"

    out = captured(io.StringIO(), role="train", log_format="text")
    warnings.warn("a library's warning goes through logging too", UserWarning, stacklevel=1)
    assert "WARNING py.warnings [train]:" in out.getvalue()


def test_secrets_are_masked_whoever_logs_them(captured, monkeypatch):
    for name, value in SECRETS_ENV.items():
        monkeypatch.setenv(name, value)
    out = captured(role="telegram")
    other_bot = "987654321:BBFhBOweik6ad6PsVMRxjeQKeMxANOTHERONE"  # not one of our settings
    library = logging.getLogger("httpx")  # a library's logger, with no filter of its own
    library.warning("POST https://api.telegram.org/bot%s/getUpdates", TELEGRAM_TOKEN)
    library.warning("auth with %s and key %s", SLACK_TOKEN, WEB_KEY)
    library.warning("another token pasted in: %s and xapp-1-A0123-456-abcdefabcdef", other_bot)
    library.warning("connecting to redis://admin:hunter2pass@redis.internal:6379/0")
    library.warning("extra fields too", extra={"url": f"https://x/bot{TELEGRAM_TOKEN}/"})
    try:
        raise ConnectionError(f"refused: token {SLACK_TOKEN}")
    except ConnectionError:
        library.exception("request failed")
    logged = out.getvalue()
    for secret in (*SECRETS, other_bot.split(":")[1], "hunter2pass", "xapp-1-A0123"):
        assert secret not in logged, secret
    lines = json_lines(logged)
    assert lines[0]["message"] == f"POST https://api.telegram.org/bot{MASK}/getUpdates"
    assert lines[3]["message"] == f"connecting to redis://admin:{MASK}@redis.internal:6379/0"
    assert lines[4]["url"] == f"https://x/bot{MASK}/"
    assert f"ConnectionError: refused: token {MASK}" in lines[5]["exc"]


def test_one_messages_path_is_joined_by_its_request_id_across_processes(
    tiny_model, data_dir, embedded_redis, tmp_path
):
    env = {
        **os.environ,
        **SECRETS_ENV,
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "16",
        "SPRBOT_LOG_LEVEL": "INFO",
        "SPRBOT_FAQ_EMBEDDINGS": "off",
        "SPRBOT_METRICS_PORT": "0",
    }
    exe = shutil.which("sprbot", path=str(Path(sys.executable).parent))
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "w") as stderr:
        worker = subprocess.Popen(
            [exe, "worker", "inference"], env=env, stdout=stderr, stderr=stderr
        )
    try:
        client = connect(load_settings())
        deadline = time.monotonic() + 120
        while not list(client.scan_iter(WORKER_PREFIX + "*")):
            assert worker.poll() is None, worker_log.read_text()
            assert time.monotonic() < deadline, "the worker did not come up"
            time.sleep(0.2)
        chat = subprocess.run(
            [exe, "chat"],
            input=f"Hello, my slack token is {SLACK_TOKEN}\n",
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert chat.returncode == 0, chat.stderr
        assert "bot> " in chat.stdout
    finally:
        worker.terminate()
        worker.wait(timeout=60)

    adapter_lines = json_lines(chat.stderr)  # stderr is a pipe: JSON, every line
    worker_lines = json_lines(worker_log.read_text())
    [accepted] = [line for line in adapter_lines if line["message"].endswith(": accepted")]
    request_id = accepted["request_id"]
    assert request_id.startswith("console-") and accepted["role"] == "chat"
    handled = [line for line in worker_lines if line["request_id"] == request_id]
    assert [line["role"] for line in handled] == ["inference"]
    assert handled[0]["message"].startswith(f"answered {request_id} from the model in ")
    assert handled[0]["answer_s"] > 0
    for output in (chat.stdout, chat.stderr, worker_log.read_text()):
        for secret in SECRETS:
            assert secret not in output
