"""Shared fixtures: a tiny offline model, the real demo model (SmolLM2-135M-Instruct), an
isolated data dir and the embedded Redis server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Nothing in the suite may reach the Hugging Face Hub: fail fast instead of retrying.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for name in list(os.environ):
    if name.startswith("SPRBOT_"):
        del os.environ[name]  # the developer's own settings must not leak into tests
# Processes started by tests would contend for the default metrics port (9740); the tests
# of metrics give each process a port of its own.
os.environ["SPRBOT_METRICS_PORT"] = "0"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny Llama with a locally trained tokenizer, made once per session."""
    from inference.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("models") / "tiny", size="tiny", seed=0)


@pytest.fixture(scope="session")
def smollm2_import(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data dir of one import of the demo model's GGUF file, made once per session (about
    25 s): tests that need the real model share its bf16 folder."""
    from bot.demo import DEMO_NAME, demo_gguf
    from inference.gguf import import_gguf

    root = tmp_path_factory.mktemp("smollm2")
    import_gguf(demo_gguf(), data_dir=root, name=DEMO_NAME)
    return root


@pytest.fixture
def smollm2(smollm2_import: Path, data_dir: Path) -> Path:
    """The real model's bf16 folder, seen from this test's data dir as if imported there
    (linked, with the import's index), so that `--demo` and .gguf paths reuse it."""
    from inference.gguf import imported_dir

    source, target = imported_dir(smollm2_import), imported_dir(data_dir)
    target.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_dir():
            (target / entry.name).symlink_to(entry, target_is_directory=True)
        else:
            shutil.copy(entry, target / entry.name)
    [folder] = [p for p in target.iterdir() if p.is_dir()]
    return folder


@pytest.fixture
def smollm2_env(smollm2: Path, data_dir: Path, embedded_redis, monkeypatch) -> Path:
    """The settings of a test on the real model: it serves, logs quietly, and the admin of
    ``test_retrain.context`` may run admin commands. Returns the data dir."""
    from test_retrain import ADMIN

    monkeypatch.setenv("SPRBOT_MODEL", str(smollm2))
    monkeypatch.setenv("SPRBOT_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("SPRBOT_CONSOLE_ADMINS", ADMIN)
    return data_dir


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SPRBOT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def embedded_redis(data_dir: Path):
    """The embedded Redis server of a fresh data dir, shut down after the test."""
    from bot.connection import EmbeddedRedis

    server = EmbeddedRedis(data_dir)
    server.ensure_running()
    yield server
    server.stop()


@pytest.fixture
def cli():
    """Run the real ``sprbot`` console script in a subprocess; returns CompletedProcess."""
    exe = shutil.which("sprbot", path=str(Path(sys.executable).parent))
    assert exe, "the sprbot console script is not installed in this environment"

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600, stdin=None):
        return subprocess.run(
            [exe, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin,
            env={**os.environ, **(env or {})},
        )

    return run
