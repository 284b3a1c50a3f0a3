"""``sprbot``: the command line, and the composition root.

This is the one module that imports inference, training and adapters, and it does so inside
each command, so that a command that needs no model never imports torch.
"""

from __future__ import annotations

import logging
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
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")


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
        typer.echo(f"Building the offline demo model in {outdir} (about a minute, once)...")
        with typer.progressbar(length=1, label="training on the sample FAQ") as bar:
            build_demo_model(outdir, progress=lambda step, total, loss: None)
            bar.update(1)
    return outdir


def _load_chatbot(settings: Settings, model: str | None, demo: bool):
    from inference import PipelineConfig, build_chatbot

    if demo:
        model = str(_ensure_demo(settings))
        typer.echo("Using the offline DEMO model: it only knows sprbot's sample FAQ.", err=True)
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
    model: Annotated[str | None, typer.Option(help="Model id or folder (default: SPRBOT_MODEL).")] = None,
    demo: Annotated[bool, typer.Option(help="Use the offline demo model.")] = False,
) -> None:
    """Load the model and print device, dtype, backend, template and size."""
    settings = _settings()
    for key, value in _load_chatbot(settings, model, demo).info().items():
        typer.echo(f"{key}: {value}")


@app.command()
def predict(
    query: Annotated[str, typer.Argument(help="The question.")],
    model: Annotated[str | None, typer.Option(help="Model id or folder (default: SPRBOT_MODEL).")] = None,
    demo: Annotated[bool, typer.Option(help="Use the offline demo model.")] = False,
) -> None:
    """Answer one question, streaming the reply to the terminal."""
    settings = _settings()
    chatbot = _load_chatbot(settings, model, demo)
    for piece in chatbot.predict_stream(query, _generation(settings)):
        typer.echo(piece, nl=False)
    typer.echo()


CHAT_HELP = """Commands:
  /help   show this help
  /reset  forget this conversation
  /exit   leave (Ctrl-D works too)"""


@app.command()
def chat(
    model: Annotated[str | None, typer.Option(help="Model id or folder (default: SPRBOT_MODEL).")] = None,
    demo: Annotated[bool, typer.Option(help="Use the offline demo model.")] = False,
) -> None:
    """Chat with the bot in the terminal. Replies stream as they are generated."""
    from inference import EmptyQueryError, PromptTooLongError

    settings = _settings()
    chatbot = _load_chatbot(settings, model, demo)
    generation = _generation(settings)
    history: list[dict[str, str]] = []
    typer.echo("sprbot chat. /help for commands, /exit to leave.")
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            typer.echo()
            return
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/help":
            typer.echo(CHAT_HELP)
            continue
        if text == "/reset":
            history.clear()
            typer.echo("bot> Conversation cleared.")
            continue
        history.append({"role": "user", "content": text})
        typer.echo("bot> ", nl=False)
        reply = ""
        try:
            for piece in chatbot.chat_stream(history, generation):
                reply += piece
                typer.echo(piece, nl=False)
        except (EmptyQueryError, PromptTooLongError) as exc:
            history.pop()
            typer.echo(f"Sorry, {exc}")
            continue
        typer.echo()
        history.append({"role": "assistant", "content": reply})


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except SprbotError as exc:
        typer.echo(f"sprbot: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
