"""/retrain end to end: real Redis, a real RQ training worker (`sprbot worker train`), a real
inference worker that hot-swaps the promoted version, the tiny model.

The tiny random model needs far more epochs and a higher learning rate than a real model to
memorise eight answers with LoRA (see tests/test_finetune.py): the tests set them through
``SPRBOT_TRAIN_*``, and train on one thread, which is faster for matrices this small.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq import Queue
from test_registry import answer, serving
from test_worker import Workers

from adapters.console import ConsoleChannel
from bot.audit import AuditLog
from bot.bus import Bus, reply_stream
from bot.commands import CommandContext, Stores, dispatch
from bot.config import load_settings
from bot.connection import connect
from bot.memory import ConversationMemory
from bot.registry import BASE, ModelRegistry
from bot.schemas import parse_reply
from training.jobs import QUEUE, RUNNING, Announcer, TrainingQueue

ADMIN = "root-admin"
ADMIN_CHANNEL = "console-admin"
FAQ = [
    ("Where is the VPN guide?", "In the IT wiki under Remote work."),
    ("Who approves holidays?", "Your team lead, in the HR portal."),
    ("How do I reset my password?", "Use the self-service page at id.example.com."),
    ("When is payday?", "On the 25th of every month."),
    ("Which printer is on floor 3?", "The one named P3-East, next to the kitchen."),
    ("How do I book a meeting room?", "In the calendar, add the room as a guest."),
    ("What is the guest wifi password?", "It is printed at the reception desk."),
    ("Who do I call for a broken laptop?", "The IT desk on extension 4040."),
]
TRAIN_ENV = {
    "SPRBOT_TRAIN_EPOCHS": "150",
    "SPRBOT_TRAIN_LEARNING_RATE": "1e-2",
    "SPRBOT_TRAIN_LORA_RANK": "8",
    "SPRBOT_TRAIN_LORA_LAYERS": "all",
    # A random model has no general ability to keep: no replay, and any drift is tolerated.
    # tests/test_learning.py checks both on the real model.
    "SPRBOT_TRAIN_REPLAY": "false",
    "SPRBOT_TRAIN_RETENTION_TOLERANCE": "1000",
    "SPRBOT_TRAIN_MONITOR_S": "2",
    "SPRBOT_TRAIN_MAINTENANCE_S": "3",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture
def env(tiny_model, data_dir, embedded_redis, monkeypatch):
    for key, value in {
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "48",
        "SPRBOT_LOG_LEVEL": "WARNING",
        "SPRBOT_CONSOLE_ADMINS": ADMIN,
        "SPRBOT_FAQ_EMBEDDINGS": "off",
        "SPRBOT_FAQ_GROUNDING": "off",  # the model itself must answer
    }.items():
        monkeypatch.setenv(key, value)
    return data_dir


@pytest.fixture
def bus(env) -> Bus:
    return Bus(connect(load_settings()), max_backlog=1024)


def training_workers(base_env: dict[str, str]):
    """`sprbot worker train` processes, each in its own process group (worker + work horse),
    started with ``base_env`` and per-call overrides; killed at the end."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, **env: str) -> subprocess.Popen:
        exe = shutil.which("sprbot", path=str(Path(sys.executable).parent))
        proc = subprocess.Popen(
            [exe, "worker", "train", *args],
            env={**os.environ, **base_env, **env},
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.fixture
def trainers():
    yield from training_workers(TRAIN_ENV)


@pytest.fixture
def workers():
    started = Workers()
    yield started
    started.stop_all()


def context(bus: Bus, user: str = ADMIN) -> CommandContext:
    settings = load_settings()
    stores = Stores.build(settings, bus.redis, training=TrainingQueue(bus.redis, settings))
    return CommandContext(
        ADMIN_CHANNEL,
        f"console/{user}",
        user,
        ConversationMemory(bus.redis),
        stores=stores,
        reply_to={"thread": "t-1"},
    )


def add_faq(bus: Bus, pairs=FAQ) -> None:
    admin = context(bus)
    for question, reference in pairs:
        reply = dispatch(f"/faq add {question} | {reference}", admin)
        assert reply.startswith("Added"), reply


def job_id_of(reply: str) -> str:
    assert reply.startswith("Retraining started: job "), reply
    return reply.split("job ", 1)[1].split(" ", 1)[0]


def admin_events(bus: Bus, job_id: str, timeout: float, until=("final", "error")) -> list:
    """The reply events of the training job in the admin's channel, until it ends."""
    deadline = time.monotonic() + timeout
    seen: list = []
    last = "0"
    while time.monotonic() < deadline:
        for _, entries in bus.redis.xread({reply_stream(ADMIN_CHANNEL): last}, block=500) or []:
            for entry_id, fields in entries:
                last = entry_id
                event = parse_reply(fields[b"data"])
                if event.request_id == job_id:
                    seen.append(event)
        if seen and seen[-1].kind in until:
            return seen
    raise AssertionError(f"the job never ended in the admin's chat; saw {seen}")


def test_faq_to_retrain_to_hot_swap_then_the_bot_gives_the_trained_answers(
    bus, env, workers, trainers
):
    worker = workers.start()
    before = {q: answer(bus, q) for q, _ in FAQ}
    assert not any(before[q] == a for q, a in FAQ), "the untrained model already knows them"

    add_faq(bus)
    reply = dispatch("/retrain", context(bus))
    job_id = job_id_of(reply)
    assert "8 approved FAQ entries" in reply
    again = dispatch("/retrain", context(bus))  # one retrain at a time
    assert again.startswith("A retrain is already running") and job_id in again

    trainers("--burst")
    events = admin_events(bus, job_id, timeout=900)
    progress = [e.text for e in events if e.kind == "progress"]
    final = events[-1]
    assert final.kind == "final", final
    assert any("fine-tuning, step" in p and "loss" in p for p in progress), progress
    assert final.text.startswith("Retrain done: v1 is now serving (was base)"), final.text
    assert final.attachments and final.attachments[0].endswith("loss.png")
    assert Path(final.attachments[0]).is_file()
    # Events arrive in order, numbered across the job's processes.
    assert [e.seq for e in events] == sorted(e.seq for e in events)

    registry = ModelRegistry(bus.redis, env)
    assert registry.current() == "v1"
    record = registry.get("v1")
    assert record.kind == "lora" and record.dataset_rows == 8 and record.parent == BASE
    assert record.requested_by == f"console:{ADMIN}"
    assert record.metrics["gate"]["passed"]
    recalled = record.metrics["candidate"]["faq_recall"]
    assert recalled >= 7 and record.metrics["serving"]["faq_recall"] == 0, record.metrics

    serving(bus, worker, "v1", timeout=120)
    after = {q: answer(bus, q) for q, _ in FAQ}
    right = [q for q, a in FAQ if after[q] == a]
    # What users get through the bus is what the job's evaluation measured.
    assert len(right) == recalled, after
    status = dispatch("/train", context(bus))
    assert status.startswith("No retrain is running. The last one: job " + job_id), status
    assert "promoted v1 (was base)" in status
    assert bus.redis.get(RUNNING) is None


def test_a_non_admin_retrain_is_refused_enqueues_nothing_and_is_audited(bus, env):
    add_faq(bus, FAQ[:1])
    reply = dispatch("/retrain", context(bus, user="intruder"))
    assert "for admins only" in reply
    assert Queue(QUEUE, connection=bus.redis).count == 0
    assert bus.redis.get(RUNNING) is None
    last = AuditLog(bus.redis).entries()[-1]
    assert (last.user_id, last.command, last.result) == ("intruder", "/retrain", "refused")


def test_retrain_with_no_approved_faq_says_what_to_do(bus, env):
    reply = dispatch("/retrain", context(bus))
    assert "no approved FAQ entries" in reply and "/faq add" in reply
    assert Queue(QUEUE, connection=bus.redis).count == 0


def test_a_worse_candidate_is_registered_but_not_promoted(bus, env, trainers):
    add_faq(bus, FAQ[:4])
    first = job_id_of(dispatch("/retrain", context(bus)))
    trainer = trainers("--burst")
    assert "v1 is now serving" in admin_events(bus, first, timeout=600)[-1].text
    trainer.wait(timeout=120)  # or it would take the next job too, with its own settings
    # A retrain cut short (one epoch) learns none of the answers v1 gives.
    second = job_id_of(dispatch("/retrain", context(bus)))
    trainers("--burst", SPRBOT_TRAIN_EPOCHS="1")
    final = admin_events(bus, second, timeout=600)[-1]
    assert final.kind == "final", final
    assert final.text.startswith("Retrain done: v2 was NOT promoted; v1 keeps serving."), final
    assert "it answers fewer FAQ questions (0 vs 4 of 4)" in final.text, final.text
    assert "/model use v2" in final.text
    registry = ModelRegistry(bus.redis, env)
    assert registry.current() == "v1"
    record = registry.get("v2")
    assert not record.metrics["gate"]["passed"] and record.notes.startswith("not promoted")


def test_an_exception_in_the_job_fails_it_and_tells_the_admin(bus, env, trainers):
    add_faq(bus, FAQ[:2])
    job_id = job_id_of(dispatch("/retrain", context(bus)))
    trainers("--burst", "--model", str(env / "no-such-model"))
    events = admin_events(bus, job_id, timeout=300)
    assert events[-1].kind == "error", events
    assert f"The retrain {job_id} failed" in events[-1].text
    assert "serving model is unchanged" in events[-1].text
    assert "Traceback" not in events[-1].text
    registry = ModelRegistry(bus.redis, env)
    assert registry.current() == BASE and registry.versions() == []
    assert not any((env / "models").glob("v*")), "a failed job left a version folder"
    assert bus.redis.get(RUNNING) is None  # the slot is free for the next /retrain


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _start_long_retrain(bus: Bus, trainers) -> tuple[str, subprocess.Popen]:
    add_faq(bus)
    job_id = job_id_of(dispatch("/retrain", context(bus)))
    worker = trainers(SPRBOT_TRAIN_EPOCHS="5000")  # long enough to be killed mid-way
    events: list = []
    while not any("fine-tuning, step" in e.text for e in events if e.kind == "progress"):
        events += admin_events(bus, job_id, timeout=300, until=("progress",))
    return job_id, worker


def _nothing_changed(bus: Bus, env: Path) -> None:
    registry = ModelRegistry(bus.redis, env)
    assert registry.current() == BASE and registry.versions() == []
    assert not any((env / "models").glob("v*")), "a failed job left a version folder"
    assert "Retraining started" in dispatch("/retrain", context(bus))  # the slot was freed


def test_a_crashed_training_host_fails_the_job_within_the_bound(bus, env, trainers):
    job_id, worker = _start_long_retrain(bus, trainers)
    # The worker and its work horse die together, as on a crashed host.
    for pid in [*_children(worker.pid), worker.pid]:
        os.kill(pid, signal.SIGKILL)
    worker.wait(timeout=30)
    killed = time.monotonic()

    trainers()  # what a supervisor does: start a worker again; its maintenance notices
    events = admin_events(bus, job_id, timeout=300)
    noticed = time.monotonic() - killed
    # The heartbeat expires train_monitor_s + 60 s after the last one; then a maintenance run.
    bound = 2 + 60 + 3 + 30
    assert events[-1].kind == "error", events[-1]
    assert "stopped (killed or crashed) mid-job" in events[-1].text
    assert "serving model is unchanged" in events[-1].text
    assert noticed < bound, f"noticed after {noticed:.0f}s"
    _nothing_changed(bus, env)


def test_killing_the_training_worker_stops_its_work_horse_and_tells_the_admin(bus, env, trainers):
    job_id, worker = _start_long_retrain(bus, trainers)
    horses = _children(worker.pid)
    worker.kill()  # the work horse lives on in its own session: it must notice and give up
    worker.wait(timeout=30)
    events = admin_events(bus, job_id, timeout=60)
    assert events[-1].kind == "error", events[-1]
    assert "stopped (killed or crashed) mid-job" in events[-1].text
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in horses):
        assert time.monotonic() < deadline, "the orphaned work horse kept training"
        time.sleep(0.2)
    _nothing_changed(bus, env)


def test_a_retrain_report_shows_in_the_admins_terminal(bus, env):
    out = io.StringIO()
    settings = load_settings()
    stores = Stores.build(settings, bus.redis, training=TrainingQueue(bus.redis, settings))
    console = ConsoleChannel(bus, ConversationMemory(bus.redis), out=out, stores=stores)
    say = Announcer(bus, "retrain-1-x", console.channel, {})
    say.progress("Retrain retrain-1-x: fine-tuning, step 3/10")
    say.final("Retrain done: v1 is now serving (was base).", attachments=["/data/loss.png"])
    console.handle("/help")  # the report shows with the next thing the admin does
    shown = out.getvalue()
    assert "[retrain-1-x] Retrain done: v1 is now serving (was base)." in shown
    assert "(attached: /data/loss.png)" in shown
    assert "step 3/10" not in shown  # progress is for /train; the report is what stays


def test_train_cancel_stops_the_running_retrain_and_tells_the_admin(bus, env, trainers):
    job_id, _ = _start_long_retrain(bus, trainers)
    running = dispatch("/train", context(bus))
    assert running.startswith(f"Retrain running: job {job_id} is started, fine-tuning (step ")
    reply = dispatch("/train cancel", context(bus))
    assert reply.startswith(f"Cancelling the retrain {job_id}"), reply
    events = admin_events(bus, job_id, timeout=120)
    assert events[-1].kind == "error", events[-1]
    assert f"The retrain {job_id} failed: it was cancelled" in events[-1].text
    _nothing_changed(bus, env)
