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
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")
app.add_typer(worker_app, name="worker")


class UserError(SprbotError):
    """A bad command-line argument."""


def _settings() -> Settings:
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return settings


def _demo_dir(settings: Settings) -> Path:
    return settings.data_dir / "models" / "demo"


def _ensure_demo(settings: Settings) -> Path:
    from training.demo import build_demo_model

    outdir = _demo_dir(settings)
    if not (outdir / "sprbot.json").exists():
        typer.echo(f"Building the offline demo model in {outdir} (a few minutes, once)...")
        with typer.progressbar(length=1, label="training on the sample FAQ") as bar:
            build_demo_model(outdir, progress=lambda step, total, loss: None)
            bar.update(1)
    typer.echo("Using the offline DEMO model: it only knows sprbot's sample FAQ.", err=True)
    return outdir


def _load_chatbot(settings: Settings, model: str | None, demo: bool):
    from inference import PipelineConfig, build_chatbot

    if demo:
        model = str(_ensure_demo(settings))
    return build_chatbot(PipelineConfig(model_name_or_path=model or settings.model))


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
def model_demo(
    force: Annotated[bool, typer.Option(help="Rebuild even if it exists.")] = False,
) -> None:
    """Build the offline demo model (a tiny model taught the sample FAQ); print its folder."""
    settings = _settings()
    if force:
        import shutil

        shutil.rmtree(_demo_dir(settings), ignore_errors=True)
    typer.echo(_ensure_demo(settings))


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


def _bus(settings: Settings):
    from bot.bus import Bus
    from bot.connection import connect

    return Bus(
        connect(settings),
        max_deliveries=settings.max_deliveries,
        max_backlog=settings.max_backlog,
        max_text_chars=settings.max_text_chars,
    )


def _memory(settings: Settings, bus):
    from bot.memory import ConversationMemory

    return ConversationMemory(bus.redis, ttl_s=settings.memory_ttl_s)


@worker_app.command("inference")
def worker_inference(
    model: Annotated[
        str | None, typer.Option(help="Model id or folder (default: SPRBOT_MODEL).")
    ] = None,
    demo: Annotated[bool, typer.Option(help="Serve the offline demo model.")] = False,
) -> None:
    """Serve chat requests from the bus with the model (continuous batching). Stops
    cleanly on SIGTERM or Ctrl-C, finishing what it holds."""
    import signal
    import threading

    from inference.worker import InferenceWorker, WorkerOptions

    settings = _settings()
    bus = _bus(settings)
    chatbot = _load_chatbot(settings, model, demo)
    worker = InferenceWorker(
        chatbot,
        bus,
        _memory(settings, bus),
        generation=_generation(settings),
        options=WorkerOptions(
            max_batch=settings.max_batch,
            max_prompt_tokens=settings.max_prompt_tokens,
            reclaim_idle_ms=settings.reclaim_idle_ms,
        ),
    )
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    worker.run(stop)


@app.command()
def chat() -> None:
    """Chat in the terminal through the bus (start workers first: `sprbot up`).
    Replies stream as they are generated; /help lists the commands."""
    _console(_settings())


def _console(settings: Settings) -> None:
    from adapters.console import ConsoleChannel

    bus = _bus(settings)
    channel = ConsoleChannel(bus, _memory(settings, bus))
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

    from inference.worker import WORKER_PREFIX

    client = _bus(settings).redis
    deadline = time.monotonic() + timeout_s
    while not client.exists(f"{WORKER_PREFIX}{socket.gethostname()}-{proc.pid}"):
        if proc.poll() is not None:
            raise UserError(f"the inference worker exited with code {proc.returncode}; see above")
        if time.monotonic() > deadline:
            raise UserError(f"the inference worker did not start within {timeout_s:.0f}s")
        time.sleep(0.2)


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
    """Start everything for one machine: the embedded Redis (unless SPRBOT_REDIS_URL is set)
    and an inference worker; with a terminal, a chat too. Ctrl-C or SIGTERM stops it all."""
    import signal
    import subprocess
    import time

    from bot.connection import EmbeddedRedis

    settings = _settings()
    embedded = None if settings.redis_url else EmbeddedRedis(settings.data_dir)
    started_redis = embedded is not None and not embedded.is_running()
    _bus(settings)  # starts the embedded server, and fails early if Redis is unreachable
    if demo:
        model = str(_ensure_demo(settings))
    worker_cmd = [sys.executable, "-m", "bot.cli", "worker", "inference"]
    if model:
        worker_cmd += ["--model", model]
    children = [subprocess.Popen(worker_cmd)]
    stop = False

    def _terminate(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _terminate)
    try:
        typer.echo("Loading the model in the inference worker...", err=True)
        _wait_for_worker(settings, children[0])
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
    """Workers, queue depth, pending and dead-lettered requests."""
    import time

    from inference.worker import WORKER_PREFIX

    settings = _settings()
    bus = _bus(settings)
    stats = bus.stats()
    waiting = stats.backlog - stats.pending
    typer.echo(
        f"queue: {waiting} waiting, {stats.pending} in progress, {stats.dead} dead-lettered"
    )
    keys = sorted(bus.redis.scan_iter(match=WORKER_PREFIX + "*"))
    typer.echo(f"workers: {len(keys)}")
    for key in keys:
        w = {k.decode(): v.decode() for k, v in bus.redis.hgetall(key).items()}
        if not w:
            continue
        age = time.time() - float(w.get("updated_at", 0))
        typer.echo(
            f"  {w['id']}: {w['model']} ({w['dtype']}, {w['backend']}), "
            f"batch {w['batch']}/{w['max_batch']}, served {w['served']}, seen {age:.0f}s ago"
        )


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except SprbotError as exc:
        typer.echo(f"sprbot: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
