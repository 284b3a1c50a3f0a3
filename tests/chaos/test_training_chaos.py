"""Retraining under faults: the process running a /retrain job SIGKILLed at a random phase (what
the kernel's OOM killer does to the biggest process), and the disk filling up while the new
version is saved. Either way the serving model stays, the registry never names a half-written
version, nothing half-written is left in the models folder, and the admin is told once.

The training setup (FAQ, the admin's context, the job's events in the admin's chat, the
``trainers`` fixture) is tests/test_retrain.py's; its own tests kill the training worker and
raise inside a job during fine-tuning.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import threading
import time
from collections import deque

import pytest
from harness import sprbot
from rq.job import Job
from test_registry import answer, serving
from test_retrain import (
    ADMIN_CHANNEL,
    FAQ,
    TRAIN_ENV,
    _children,
    add_faq,
    admin_events,
    context,
    job_id_of,
)

from bot.bus import reply_stream
from bot.commands import dispatch
from bot.registry import BASE, ModelRegistry
from bot.schemas import parse_reply
from training.jobs import RUNNING

pytestmark = pytest.mark.chaos

# Progress lines the job posts as it enters each phase.
PHASES = {
    "snapshot": "snapshotting the approved FAQ",
    "measuring serving": "measuring the serving model",
    "fine-tuning": "fine-tuning",
    "measuring candidate": "measuring the candidate",
}


def terminal_events(bus, job_id: str) -> list:
    """Every final or error event the job wrote to the admin's chat."""
    entries = bus.redis.xrange(reply_stream(ADMIN_CHANNEL))
    events = [parse_reply(fields[b"data"]) for _, fields in entries]
    return [e for e in events if e.request_id == job_id and e.kind in ("final", "error")]


def wait_for_phase(bus, job_id: str, text: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        events = admin_events(bus, job_id, timeout=300, until=("progress", "final", "error"))
        if any(text in e.text for e in events if e.kind == "progress"):
            return
        assert events[-1].kind == "progress", f"the job ended before {text!r}: {events[-1]}"
    raise AssertionError(f"the job never reached {text!r}")


def test_a_retrain_killed_at_a_random_phase_changes_nothing_and_tells_the_admin_once(
    bus, env, trainers, rng, figures, request
):
    add_faq(bus, FAQ[:4])
    job_id = job_id_of(dispatch("/retrain", context(bus)))
    phase = rng.choice(sorted(PHASES))
    worker = trainers("--burst", SPRBOT_TRAIN_EPOCHS="40")
    wait_for_phase(bus, job_id, PHASES[phase])
    time.sleep(rng.uniform(0.0, 0.3))
    [horse] = _children(worker.pid)  # the work horse RQ forked for the job
    killed_in = Job.fetch(job_id, connection=bus.redis).get_meta().get("phase", "")
    os.kill(horse, signal.SIGKILL)
    killed = time.monotonic()

    events = admin_events(bus, job_id, timeout=60)
    told = time.monotonic() - killed
    assert worker.wait(timeout=60) == 0  # the worker itself carries on (and, --burst, ends)
    error = events[-1]
    assert error.kind == "error", error
    assert f"The retrain {job_id} failed" in error.text
    assert "killed" in error.text and "serving model is unchanged" in error.text
    assert len(terminal_events(bus, job_id)) == 1
    registry = ModelRegistry(bus.redis, env)
    assert registry.current() == BASE and registry.versions() == []
    assert not list((env / "models").glob("v*")), "the killed job left a version folder"
    assert bus.redis.get(RUNNING) is None  # the next /retrain may start
    figures.record(
        request,
        "training work horse SIGKILL",
        fault=f"SIGKILL the process running a /retrain job once it is {PHASES[phase]}",
        faults=1,
        accepted=1,
        lost=0,  # the admin was told (asserted above)
        duplicated=len(terminal_events(bus, job_id)) - 1,
        recovery_s=[told],
        aimed_at_phase=phase,
        killed_in_phase=killed_in,  # the job's own record: it may have moved on meanwhile
    )


class Trainer:
    """``sprbot worker train`` with a file size limit: past it a write fails with EFBIG, as
    on a full disk. Output goes through a pipe (a file would hit the limit too)."""

    def __init__(self, file_size_limit: int, *args: str) -> None:
        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

        self.proc = subprocess.Popen(
            [sprbot(), "worker", "train", *args],
            env={**os.environ, **TRAIN_ENV, "SPRBOT_TRAIN_EPOCHS": "20"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=limit,
            start_new_session=True,
        )
        self.output: deque[str] = deque(maxlen=200)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line.decode(errors="replace"))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        print("".join(self.output))  # shown if the test failed


def test_a_full_disk_during_the_model_save_keeps_the_serving_version(
    bus, env, workers, tiny_model, figures, request
):
    # v1, a copy of the tiny model, serves before the retrain.
    registry = ModelRegistry(bus.redis, env)
    version, folder = registry.allocate()
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    registry.register(version, requested_by="chaos")
    registry.promote(version)
    worker = workers.start()
    serving(bus, worker, "v1")
    before = answer(bus, "Where is the VPN guide?")

    add_faq(bus, FAQ[:4])
    job_id = job_id_of(dispatch("/retrain", context(bus)))
    # 32 KiB: the FAQ snapshot and training data fit; the new version's weights do not.
    trainer = Trainer(32 * 1024, "--burst")
    try:
        events = admin_events(bus, job_id, timeout=300)
        trainer.proc.wait(timeout=60)
    finally:
        trainer.stop()
    error = events[-1]
    assert error.kind == "error", error
    assert "serving model is unchanged" in error.text
    assert "disk" in error.text.lower(), error.text  # says what to fix
    failure = Job.fetch(job_id, connection=bus.redis).latest_result().exc_string
    assert "File too large" in failure and "save" in failure, failure  # it failed saving
    assert any("fine-tuning, step" in e.text for e in events if e.kind == "progress")

    assert registry.current() == "v1"
    assert [v.version for v in registry.versions()] == ["v1"]
    left = sorted(p.name for p in (env / "models").iterdir())
    assert left == ["v1"], f"a half-written version is left: {left}"
    assert serving(bus, worker, "v1")["version"] == "v1"
    assert answer(bus, "Where is the VPN guide?") == before  # the same model answers
    assert len(terminal_events(bus, job_id)) == 1
    figures.record(
        request,
        "disk full while saving a new version",
        fault="RLIMIT_FSIZE 32 KiB on the training worker: the save fails with EFBIG",
        faults=1,
        accepted=1,
        lost=0,
        duplicated=len(terminal_events(bus, job_id)) - 1,
        recovery_s=[],
        serving_after=registry.current(),
    )
