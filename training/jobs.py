"""``/retrain``: the approved FAQ becomes a LoRA fine-tune, gated by an evaluation, registered
and, if it does at least as well as the serving model, promoted (workers hot-swap it).

``TrainingQueue`` is what ``bot.commands`` calls for ``/retrain`` and ``/train`` (only ever for
admins: the registry checks before it calls). It enqueues one RQ job on queue ``training`` and
holds the one retrain slot (``sprbot:train:running``) while it runs. ``sprbot worker train``
(``run_worker``) runs the job in RQ's forked work horse:

1. snapshot the approved FAQ into ``<job dir>/faq.json`` (its hash and row count go into the
   version's record);
2. ``finetune_model``: LoRA, bf16, ``task=completion``, on top of the configured base model;
3. evaluate the candidate and the serving model on the same pairs: the exact-answer rate on
   the FAQ, loss on held-out FAQ pairs (when there are enough to spare) and on a fixed
   regression set (``data/regression.json``);
4. register the version with its metrics;
5. promote it only if the gate passes; otherwise keep the serving model and say why.

The admin who asked sees one progress message edited in place: the job writes progress events
and then one final (or error) event on the reply stream of the channel the command came from,
under the job id as request id, like any answer. The final carries ``loss.png``.

Failure: an exception or the job timeout ends the job failed and tells the admin (a full
disk, with what to free). A work horse killed alone (the OOM killer's choice) is reported by
its worker at once (``report_killed_horse``). A killed worker leaves the job in RQ's
started registry until its heartbeat expires (the monitoring interval + 60 s); the next
worker's maintenance run (every ``train_maintenance_s``) marks it failed, which runs the same
failure report. Nothing is registered before training and
evaluation succeed, so the serving model is never touched by a failed job.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from rq import Callback, Queue, Worker
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

from bot.bus import Bus
from bot.config import Settings, load_settings
from bot.connection import connect
from bot.logs import REQUEST_ID
from bot.metrics import TrainingState
from bot.schemas import ErrorEvent, FinalEvent, ProgressEvent
from training import learning

if TYPE_CHECKING:
    from bot.commands import CommandContext

log = logging.getLogger(__name__)

QUEUE = "training"
RUNNING = "sprbot:train:running"  # the job id holding the one retrain slot
_SEQ = "sprbot:train:seq:"  # per job: numbers its progress events across processes
_ACTIVE = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}
# What a full disk (or quota, or file size limit) makes writes fail with.
_DISK_FULL = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


@dataclass(frozen=True)
class RetrainOptions:
    """How the retrain job trains and judges; from ``SPRBOT_TRAIN_*`` settings."""

    epochs: float
    learning_rate: float
    lora_rank: int
    lora_layers: str  # "mlp" or "all"
    timeout_s: int
    replay: bool
    retention_tolerance: float

    @classmethod
    def from_settings(cls, settings: Settings) -> RetrainOptions:
        return cls(
            epochs=settings.train_epochs,
            learning_rate=settings.train_learning_rate,
            lora_rank=settings.train_lora_rank,
            lora_layers=settings.train_lora_layers,
            timeout_s=settings.train_timeout_s,
            replay=settings.train_replay,
            retention_tolerance=settings.train_retention_tolerance,
        )


class TrainingWorkerGone(Exception):
    """The worker that forked this job's work horse died: the horse gives the job up."""


class WorkHorseKilled(Exception):
    """The work horse died without a word: a signal (the OOM killer's SIGKILL, say) or exit."""


# -- the command side ----------------------------------------------------------------------------


class TrainingQueue:
    """``/retrain`` and ``/train`` (``bot.commands.Training``): one retrain at a time."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.redis = client
        self.settings = settings
        self.queue = Queue(QUEUE, connection=client)

    def retrain(self, context: CommandContext) -> str:
        running = self.running()
        if running is not None:
            return f"A retrain is already running: {describe(running)}. /train shows it."
        approved = context.stores.faq.counts().get("approved", 0) if context.stores else 0
        if approved == 0:
            return (
                "There are no approved FAQ entries to train on yet. Add some with "
                "/faq add <question> | <answer>, or approve candidates with /faq approve <id>."
            )
        job_id = f"retrain-{int(time.time())}-{context.user_id}"[:100]
        job_id = "".join(c if c.isalnum() or c in "-_." else "-" for c in job_id)
        # The slot is taken before enqueueing, atomically: two admins racing get one job.
        if not self.redis.set(RUNNING, job_id, nx=True, ex=self.settings.train_timeout_s + 600):
            running = self.running()
            return f"A retrain is already running: {describe(running) if running else '?'}."
        options = RetrainOptions.from_settings(self.settings)
        self.queue.enqueue(
            retrain_job,
            kwargs={
                "requested_by": context.who,
                "channel": context.channel,
                "reply_to": dict(context.reply_to),
            },
            job_id=job_id,
            job_timeout=options.timeout_s,
            result_ttl=7 * 86_400,
            failure_ttl=7 * 86_400,
            on_failure=Callback(report_failure),
            description=f"retrain requested by {context.who}",
        )
        return (
            f"Retraining started: job {job_id} on {approved} approved FAQ entries. "
            "I'll post progress here. /train shows it; /train cancel stops it."
        )

    def running(self) -> Job | None:
        """The retrain holding the slot, if it is still alive; a stale slot is freed."""
        raw = self.redis.get(RUNNING)
        if raw is None:
            return None
        job_id = raw.decode() if isinstance(raw, bytes) else raw
        try:
            job = Job.fetch(job_id, connection=self.redis)
        except NoSuchJobError:
            if self.redis.ttl(RUNNING) > self.settings.train_timeout_s + 570:
                return None  # taken a moment ago and being enqueued: leave it be
            job = None
        if job is None or job.get_status() not in _ACTIVE:
            self.redis.delete(RUNNING)  # ended without releasing it (killed): free the slot
            return None
        return job

    def status(self, context: CommandContext) -> str:
        self.sweep()
        job = self.running()
        if job is not None:
            return f"Retrain running: {describe(job)}. /train cancel stops it."
        last = self._last()
        if last is None:
            return "No retrain has run yet. /retrain starts one."
        return f"No retrain is running. The last one: {describe(last)}."

    def cancel(self, context: CommandContext) -> str:
        job = self.running()
        if job is None:
            return "No retrain is running: there is nothing to cancel."
        try:
            if job.get_status() == JobStatus.STARTED:
                send_stop_job_command(self.redis, job.id)  # the worker kills its work horse
                deadline = time.monotonic() + 30
                while job.get_status() == JobStatus.STARTED and time.monotonic() < deadline:
                    time.sleep(0.2)
            else:
                job.cancel()
        except InvalidJobOperation as exc:
            return f"Could not cancel {job.id}: {exc}"
        # RQ runs no failure callback for a stopped job: report and clean up here.
        _remove_unregistered(job, self.redis)
        _announce_error(
            job,
            f"The retrain {job.id} failed: it was cancelled by {context.who}. "
            "The serving model is unchanged.",
        )
        self.redis.delete(RUNNING)
        return f"Cancelling the retrain {job.id}. The serving model stays as it is."

    def state(self) -> TrainingState:
        """For ``sprbot status`` and ``/metrics``: the retrain holding the slot, with its
        progress, and how many ended jobs RQ still keeps."""
        ended = {
            "finished": self.queue.finished_job_registry.count,
            "failed": self.queue.failed_job_registry.count,
            "canceled": self.queue.canceled_job_registry.count,
        }
        job = self.running()  # fetched just now: its meta is current
        if job is None:
            return TrainingState(ended=ended)
        status, meta = job.get_status(), job.meta
        return TrainingState(
            status=getattr(status, "value", str(status)),
            job_id=job.id,
            phase=meta.get("phase", ""),
            step=meta.get("step"),
            total=meta.get("total"),
            loss=meta.get("loss"),
            eta_s=meta.get("eta_s"),
            ended=ended,
        )

    def sweep(self) -> None:
        """Fail jobs whose worker died (RQ's own cleanup, which runs their failure report)."""
        self.queue.started_job_registry.cleanup()

    def _last(self) -> Job | None:
        ids = self.queue.finished_job_registry.get_job_ids()
        ids += self.queue.failed_job_registry.get_job_ids()
        ids += self.queue.canceled_job_registry.get_job_ids()
        jobs = [j for j in Job.fetch_many(ids, connection=self.redis) if j is not None]
        return max(jobs, key=lambda j: j.ended_at or j.enqueued_at, default=None)


def describe(job: Job) -> str:
    """One line for an admin: id, state and, while training, step, loss and ETA."""
    meta = job.get_meta() if job.get_status() == JobStatus.STARTED else job.meta
    status = job.get_status()
    line = f"job {job.id} is {status.value if hasattr(status, 'value') else status}"
    if meta.get("phase"):
        line += f", {meta['phase']}"
    if meta.get("step") is not None and meta.get("total"):
        line += f" (step {meta['step']}/{meta['total']}"
        if meta.get("loss") is not None:
            line += f", loss {meta['loss']:.3f}"
        if meta.get("eta_s") is not None:
            line += f", about {_duration(meta['eta_s'])} left"
        line += ")"
    if meta.get("outcome"):
        line += f": {meta['outcome']}"
    return line


# -- reporting to the admin ----------------------------------------------------------------------


class Announcer:
    """The job's messages in the admin's chat: progress events, then one final or error event,
    on the reply stream of the channel the command came from, under the job id."""

    def __init__(self, bus: Bus, job_id: str, channel: str, reply_to: dict[str, Any]) -> None:
        self.bus = bus
        self.job_id = job_id
        self.channel = channel
        self.reply_to = reply_to
        self._last = 0.0

    def _fields(self) -> dict[str, Any]:
        seq = self.bus.redis.incr(_SEQ + self.job_id)
        self.bus.redis.expire(_SEQ + self.job_id, 7 * 86_400)
        return {
            "request_id": self.job_id,
            "channel": self.channel,
            "reply_to": self.reply_to,
            "attempt": 1,
            "seq": seq,
        }

    def progress(self, text: str, *, every_s: float = 0.0) -> None:
        """A progress line; with ``every_s``, skipped if the last one is more recent."""
        now = time.monotonic()
        if every_s and now - self._last < every_s:
            return
        self._last = now
        self.bus.emit(ProgressEvent(text=text, **self._fields()))

    def final(self, text: str, attachments: list[str] | None = None) -> None:
        self.bus.announce(FinalEvent(text=text, attachments=attachments or [], **self._fields()))

    def error(self, text: str) -> None:
        self.bus.announce(ErrorEvent(code="failed", text=text, **self._fields()))


def _announcer(job: Job, client: redis.Redis) -> Announcer:
    kwargs = job.kwargs or {}
    return Announcer(
        Bus(client), job.id, kwargs.get("channel", "console"), kwargs.get("reply_to") or {}
    )


def _announce_error(job: Job, text: str) -> None:
    _announcer(job, job.connection).error(text)


def report_failure(job: Job, connection: redis.Redis, exc_type, exc_value, tb) -> None:
    """RQ's failure callback: an exception, the timeout, a stop or a dead worker."""
    name = getattr(exc_type, "__name__", str(exc_type))
    if name in ("AbandonedJobError", "TrainingWorkerGone"):
        why = "its training worker stopped (killed or crashed) mid-job"
    elif name in ("JobTimeoutException", "TimeoutError"):
        why = f"it ran past its time limit ({job.timeout}s, SPRBOT_TRAIN_TIMEOUT_S)"
    elif name == "StopRequested":
        why = "it was cancelled"
    elif name == "WorkHorseKilled":
        why = str(exc_value)
    elif _disk_full(exc_value):
        why = (
            f"it could not write to the disk ({_disk_full(exc_value)}): free space where "
            "SPRBOT_DATA_DIR is, then /retrain again"
        )
    else:
        why = f"{name}: {exc_value}" if exc_value else name
    log.warning("retrain %s failed: %s", job.id, why, extra={"request_id": job.id})
    _remove_unregistered(job, connection)
    try:
        _announcer(job, connection).error(
            f"The retrain {job.id} failed: {why}. The serving model is unchanged."
        )
    finally:
        raw = connection.get(RUNNING)
        if raw is not None and (raw.decode() if isinstance(raw, bytes) else raw) == job.id:
            connection.delete(RUNNING)


def _disk_full(exc: BaseException | None) -> str | None:
    """The system's words for a full disk, if that is what ``exc`` is (safetensors raises its
    own error, with only the words)."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return exc.strerror
    text = str(exc)
    return next((os.strerror(code) for code in _DISK_FULL if os.strerror(code) in text), None)


def report_killed_horse(job: Job, retpid: int, ret_val: int, rusage: Any) -> None:
    """RQ's hook for a work horse that died without reporting. RQ then marks the job failed
    but runs no failure callback: without this the admin would never hear of it, and the
    version folder the job had begun would stay behind."""
    if os.WIFSIGNALED(ret_val):
        number = os.WTERMSIG(ret_val)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        hint = " (out of memory?)" if number == signal.SIGKILL else ""
        why = f"its training process was killed by {name}{hint}"
    else:
        why = f"its training process exited with status {os.waitstatus_to_exitcode(ret_val)}"
    report_failure(job, job.connection, WorkHorseKilled, WorkHorseKilled(why), None)


def _remove_unregistered(job: Job, connection: redis.Redis) -> None:
    """Delete the version folder a dead job allocated but never registered (and its
    ``.partial`` sibling), so a crash leaves nothing half-written behind."""
    from bot.registry import MODELS, ModelRegistry

    version = (job.get_meta(refresh=True) or {}).get("version")
    if not version or connection.hexists(MODELS, version):
        return
    folder = ModelRegistry(connection, load_settings().data_dir).models_dir / version
    for path in (folder, folder.with_name(folder.name + ".partial")):
        shutil.rmtree(path, ignore_errors=True)


# -- the job -------------------------------------------------------------------------------------

_WORKER_BASE: dict[str, Any] = {}  # set by run_worker: the base model this worker trains on


def retrain_job(requested_by: str, channel: str, reply_to: dict[str, Any]) -> dict[str, Any]:
    """Run in RQ's work horse. Returns the report (also stored in the job's result)."""
    from rq import get_current_job

    from bot.commands import Stores
    from bot.registry import MODELS, ModelRegistry

    job = get_current_job()
    settings = load_settings()
    client = job.connection if job is not None else connect(settings)
    job_id = job.id if job is not None else f"retrain-{int(time.time())}"
    say = Announcer(Bus(client), job_id, channel, reply_to)
    stores = Stores.build(settings, client)
    registry: ModelRegistry = stores.models
    options = RetrainOptions.from_settings(settings)
    base_model = _WORKER_BASE.get("model") or settings.model
    work = settings.data_dir / "training" / job_id
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    version = folder = None
    logged_as = REQUEST_ID.set(job_id)  # its log lines carry the job id, as a request's do

    def phase(name: str, **meta: Any) -> None:
        if job is not None:
            job.meta.update({"phase": name, **meta})
            job.save_meta()
        log.info("retrain %s: %s", job_id, name)
        say.progress(f"Retrain {job_id}: {name}…")

    try:
        phase("snapshotting the approved FAQ")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        snapshot = stores.faq.snapshot(work / "faq.json")
        pairs = [(r["instruction"], r["output"]) for r in json.loads(snapshot.path.read_text())]
        judged = learning.eval_sample(pairs)
        timings["snapshot"] = time.perf_counter() - started

        phase("measuring the serving model (it also rewords the FAQ questions)")
        started = time.perf_counter()
        serving = registry.current()
        base = learning.base_answers(_pipeline(base_model, None), settings.data_dir / "training")
        embedder = stores.faq.embedder if settings.faq_embeddings != "off" else None
        serving_metrics = learning.evaluate(
            _version_pipeline(registry, serving, base_model),
            judged,
            [],
            base,
            embedder,
            make_paraphrases_with=learning.make_paraphrases,
        )
        paraphrases = serving_metrics["paraphrases"]
        timings["measure serving"] = time.perf_counter() - started

        phase("fine-tuning", step=0, total=None)
        started = time.perf_counter()
        trained = pairs + learning.augmentation(judged, paraphrases)
        if options.replay:
            trained += base.replay
        rows = [{"instruction": q, "input": "", "output": a} for q, a in trained]
        (work / "train.json").write_text(json.dumps(rows))
        version, folder = registry.allocate()
        if job is not None:  # so that a failure report can clear it if the job dies
            job.meta["version"] = version
            job.save_meta()
        result = _finetune(base_model, work / "train.json", folder, options, job, say)
        timings["fine-tuning"] = time.perf_counter() - started

        phase("measuring the candidate")
        started = time.perf_counter()
        candidate_metrics = learning.evaluate(
            _pipeline(base_model, str(folder)), judged, paraphrases, base, embedder
        )
        timings["measure candidate"] = time.perf_counter() - started
        passed, why = learning.gate(
            candidate_metrics, serving_metrics, base, options.retention_tolerance
        )

        metrics = {
            "candidate": candidate_metrics,
            "serving": {"version": serving, **serving_metrics},
            "base": {"retention_loss": base.retention_loss},
            "train": {k: v for k, v in result.metrics.items() if _jsonable(v)},
            "timings": timings,
            "gate": {"passed": passed, "reason": why},
            "train_rows": {"faq": len(pairs), "total": len(trained)},
        }
        record = registry.register(
            version,
            requested_by=requested_by,
            parent=serving,
            base_model=base_model,
            dataset_hash=snapshot.sha256,
            dataset_rows=snapshot.rows,
            metrics=metrics,
            notes="" if passed else f"not promoted: {why}",
        )
        if passed:
            registry.promote(version)
            outcome = f"promoted {version} (was {serving})"
        else:
            outcome = f"kept {serving}; {version} is registered but not promoted"
        if job is not None:
            job.meta.update({"phase": "done", "outcome": outcome, "version": version})
            job.save_meta()
        loss_png = folder / "loss.png"
        text = learning.report(
            record.version,
            serving,
            candidate_metrics,
            serving_metrics,
            base,
            passed,
            why,
            timings,
        )
        if not passed:
            text += f"\nAn admin can still serve it: /model use {version}"
        say.final(text, attachments=[str(loss_png)] if loss_png.is_file() else [])
        return {"version": version, "promoted": passed, "reason": why, "metrics": metrics}
    except BaseException:
        # Nothing was registered: leave no half-made version folder behind.
        if folder is not None and not client.hexists(MODELS, version):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        raw = client.get(RUNNING)
        if raw is not None and (raw.decode() if isinstance(raw, bytes) else raw) == job_id:
            client.delete(RUNNING)
        REQUEST_ID.reset(logged_as)


def _finetune(
    base_model: str, train_file: Path, folder: Path, options: RetrainOptions, job, say: Announcer
):
    from training import (
        DataArguments,
        FinetuningArguments,
        ModelArguments,
        TextGenerationFinetuningConfig,
        TrainingArguments,
        finetune_model,
    )

    started = time.monotonic()
    parent = os.getppid()

    def progress(step: int, total: int, loss: float | None) -> None:
        if os.getppid() != parent:
            # The worker that forked this work horse is gone (killed): stop rather than
            # finish and promote a model behind the back of a job already reported failed.
            raise TrainingWorkerGone("its training worker stopped (killed or crashed) mid-job")
        elapsed = time.monotonic() - started
        eta = elapsed / step * (total - step) if step else None
        if job is not None:
            job.meta.update({"step": step, "total": total, "loss": loss, "eta_s": eta})
            job.save_meta()
        line = f"Retrain {say.job_id}: fine-tuning, step {step}/{total}"
        if loss is not None:
            line += f", loss {loss:.3f}"
        if eta is not None:
            line += f", about {_duration(eta)} left"
        # Throttled for the chat's edit limits, but the last step always shows: a short run
        # would otherwise report its phase and never a step.
        say.progress(line, every_s=0.0 if step >= total else 2.0)

    config = TextGenerationFinetuningConfig(
        model_args=ModelArguments(model_name_or_path=base_model),
        data_args=DataArguments(train_file=str(train_file), validation_split_percentage=0),
        training_args=TrainingArguments(
            output_dir=str(folder),
            overwrite_output_dir=True,
            num_train_epochs=options.epochs,
            learning_rate=options.learning_rate,
            per_device_train_batch_size=8,
            bf16=True,
            do_train=True,
            do_eval=False,
            save_strategy="no",
            report_to=[],
            seed=0,
        ),
        finetune_args=FinetuningArguments(
            task="completion",
            peft="lora",
            lora_rank=options.lora_rank,
            lora_alpha=2 * options.lora_rank,
            **(
                {"lora_target_modules": list(learning.MLP_MODULES)}
                if options.lora_layers == "mlp"
                else {"lora_all_linear": True}
            ),
        ),
    )
    return finetune_model(config, progress=progress)


# -- evaluation (training.learning) -------------------------------------------------------------


def _version_pipeline(registry, version: str, base_model: str):
    """How to load a registered version: a LoRA on its base, or a full model's folder."""
    from bot.registry import BASE

    if version == BASE:
        return _pipeline(base_model, None)
    record = registry.get(version)
    path = registry.path(record)
    if record.kind == "lora":
        return _pipeline(record.base_model or base_model, str(path))
    return _pipeline(str(path), None)


def _pipeline(model: str, peft_path: str | None):
    from inference import LoadingModelConfig, PipelineConfig

    return PipelineConfig(
        model_name_or_path=model, loading_config=LoadingModelConfig(peft_path=peft_path)
    )


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds}s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


# -- the worker ----------------------------------------------------------------------------------


def run_worker(settings: Settings, base_model: str, *, burst: bool = False) -> None:
    """``sprbot worker train``: an RQ worker on queue ``training`` that trains on ``base_model``.

    The monitoring and maintenance intervals are short so that a job whose worker was killed
    is failed (and its admin told) within ``train_monitor_s + 60 + train_maintenance_s``
    seconds, not RQ's default of about 11 minutes."""
    _WORKER_BASE["model"] = base_model
    client = connect(settings)
    worker = Worker(
        [Queue(QUEUE, connection=client)],
        connection=client,
        job_monitoring_interval=settings.train_monitor_s,
        maintenance_interval=settings.train_maintenance_s,
        # An idle worker blocks on the queue for worker_ttl - 15 s between maintenance runs
        # (405 s by default): keep that to the maintenance interval.
        worker_ttl=settings.train_maintenance_s + 15,
        work_horse_killed_handler=report_killed_horse,
    )
    worker.work(burst=burst, with_scheduler=False, logging_level=settings.log_level)
