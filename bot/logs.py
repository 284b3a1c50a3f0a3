"""Logging for every sprbot process: one ``configure_logging`` call per entry point.

- Format: JSON lines when stderr is not a terminal (a container, systemd, a pipe), readable
  text on a terminal; ``SPRBOT_LOG_FORMAT`` (``auto`` | ``json`` | ``text``) overrides. With
  JSON, Hugging Face's progress bars are off, so that stderr holds only JSON lines. A JSON
  line carries ``time``, ``level``, ``logger``, ``message``, ``role`` (which process:
  ``inference``, ``train``, ``slack``...), ``request_id``, ``pid``, any ``extra=`` fields, and
  ``exc`` with the traceback.
- Request ids: ``request_context(rid)`` puts a request id into a context variable where a
  request is handled (adapter ingress, the inference worker, a training job's id), and every
  record logged inside it carries that id. The id is derived from the platform event, so one
  message's path can be followed across processes with ``grep <id>``. A record logged with
  ``extra={"request_id": ...}`` keeps its own.
- Secrets: a filter on the handler masks every ``SecretStr`` setting, anything shaped like a
  Slack or Telegram token, and passwords in URLs, in the message, the traceback and the extras
  of every record, whichever library logged it. It is a safety net: code still must not log
  secrets.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from pydantic import SecretStr

from bot.config import Settings

MASK = "******"

# The request being handled in this thread or task. Set it with ``request_context``, or with
# ``REQUEST_ID.set``/``reset`` where a ``with`` block does not fit.
REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "sprbot_request_id", default=None
)
_role = "cli"

# Shapes of credentials worth masking even when they are not this process's settings (a token
# pasted into an error message, another bot's token in a URL).
_TOKEN_SHAPES = re.compile(
    r"xox[abposre]-[A-Za-z0-9-]{8,}"  # Slack bot, user, refresh... tokens
    r"|xapp-\d+-[A-Za-z0-9-]{8,}"  # Slack app-level tokens
    r"|\b\d{5,16}:[A-Za-z0-9_-]{30,}"  # Telegram bot tokens: <bot id>:<35 characters>
)
# scheme://user:password@host: keep the user, mask the password.
_URL_PASSWORD = re.compile(r"(?<=://)([^/@\s:]*):[^/@\s]+@")
# Shorter "secrets" would mask ordinary words all over the log.
_MIN_SECRET_CHARS = 4
# What every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "role",
    "taskName",
}


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    """Records logged inside carry ``request_id`` (threads and asyncio tasks each keep their
    own; ``asyncio.to_thread`` and ``contextvars.copy_context`` carry it along)."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


def secrets_of(settings: Settings) -> list[str]:
    """The values of every ``SecretStr`` setting (lists of them too)."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, SecretStr) and item.get_secret_value():
                found.append(item.get_secret_value())
    return found


class SecretMask(logging.Filter):
    """Masks secrets in a record before any handler formats it. Put it on handlers: a filter
    on a logger does not see the records its child loggers propagate."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self.add(*secrets)

    def add(self, *secrets: str) -> None:
        """Mask these too (a token an adapter learns after logging was set up)."""
        known = set(self.secrets) | {s for s in secrets if len(s) >= _MIN_SECRET_CHARS}
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted(known, key=len, reverse=True)

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        text = _TOKEN_SHAPES.sub(MASK, text)
        return _URL_PASSWORD.sub(rf"\1:{MASK}@", text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: show the raw parts rather than lose the line
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = self.mask(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
            record.exc_info = None  # formatters would print the unmasked traceback again
        if record.stack_info:
            record.stack_info = self.mask(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _RECORD_FIELDS and isinstance(value, str):
                setattr(record, key, self.mask(value))
        return True


class _Context(logging.Filter):
    """Adds ``role`` and ``request_id`` to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = _role
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "role": getattr(record, "role", _role),
            "request_id": getattr(record, "request_id", None),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in line:
                line[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [role request-id]: message`` for a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(where)s]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.where = getattr(record, "role", _role) + (f" {rid}" if rid else "")
        return super().format(record)


class _Handler(logging.StreamHandler):
    """sprbot's handler on the root logger; replaced when logging is configured again."""


def configure_logging(settings: Settings, role: str = "cli") -> logging.Handler:
    """Send every logger's records to stderr, as JSON or text (``SPRBOT_LOG_FORMAT``), at
    ``SPRBOT_LOG_LEVEL``, with ``role`` and request ids, secrets masked. Safe to call again
    (the previous handler is replaced). Returns the handler."""
    global _role
    _role = role
    fmt = settings.log_format
    if fmt == "auto":
        fmt = "text" if _isatty(sys.stderr) else "json"
    if fmt == "json":
        # Hugging Face's progress bars write to stderr directly: lines that are not JSON. Read
        # when huggingface_hub is first imported, which the CLI does after this.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    handler = _Handler(sys.stderr)
    handler.addFilter(_Context())
    handler.addFilter(SecretMask(secrets_of(settings)))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    logging.captureWarnings(True)  # warnings.warn() lines become records: same format, masked
    return handler


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no such method, or a closed stream
        return False
