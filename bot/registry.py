"""The model registry: every trained version, which one serves, and the way back.

Keys::

    sprbot:models           hash     version -> JSON record (ModelVersion)
    sprbot:model:current    string   the serving version; unset or "base": SPRBOT_MODEL itself
    sprbot:model:history    list     versions served before, newest first (/model rollback)
    sprbot:model:next       string   counter for new version names: v1, v2, ...
    sprbot:events:model     pub/sub  "promoted <version>": inference workers hot-swap

A version's files live in ``<data dir>/models/<version>/``: a LoRA adapter folder
(``adapter_config.json``, applied to ``base_model``) or a full model folder (``config.json``).
The record stores that path relative to the data dir, so that workers on other hosts that
mount the same data dir elsewhere find it too. Promotion and rollback are each one Lua script
(read current, push or pop history, set current, publish), so two admins racing cannot lose
a step of the history.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis

from bot.errors import SprbotError

MODELS = "sprbot:models"
CURRENT = "sprbot:model:current"
HISTORY = "sprbot:model:history"
NEXT = "sprbot:model:next"
EVENTS = "sprbot:events:model"

BASE = "base"
"""The configured model (``SPRBOT_MODEL``) as a version: what serves before any promotion."""

_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_HISTORY = 100

# KEYS: models, current, history, events.  ARGV: version, base name, history length.
# A version that already serves is announced again, so workers that failed to load it retry.
_PROMOTE = """
local v = ARGV[1]
if v ~= ARGV[2] and redis.call('HEXISTS', KEYS[1], v) == 0 then return {'unknown', ''} end
local cur = redis.call('GET', KEYS[2])
if not cur then cur = ARGV[2] end
if cur ~= v then
  redis.call('LPUSH', KEYS[3], cur)
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[3]) - 1)
  redis.call('SET', KEYS[2], v)
end
redis.call('PUBLISH', KEYS[4], 'promoted ' .. v)
if cur == v then return {'same', cur} end
return {'promoted', cur}
"""

# KEYS: current, history, events.  ARGV: base name.
_ROLLBACK = """
local prev = redis.call('LPOP', KEYS[2])
if not prev then return {'empty', ''} end
local cur = redis.call('GET', KEYS[1])
if not cur then cur = ARGV[1] end
redis.call('SET', KEYS[1], prev)
redis.call('PUBLISH', KEYS[3], 'promoted ' .. prev)
return {cur, prev}
"""


class RegistryError(SprbotError, ValueError):
    """A registry operation that cannot be done; the message says why and what to do."""


@dataclass(frozen=True)
class ModelVersion:
    version: str
    path: str  # relative to the data dir: models/<version>
    kind: Literal["lora", "full"]
    created_at: float
    requested_by: str = ""
    parent: str | None = None  # the version it was trained from
    base_model: str | None = None  # LoRA: the model (HF id or folder) the adapter applies to
    dataset_hash: str | None = None
    dataset_rows: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: str = ""  # e.g. why the eval gate did not promote it


class ModelRegistry:
    def __init__(self, client: redis.Redis, data_dir: Path) -> None:
        self.redis = client
        self.data_dir = Path(data_dir).expanduser()
        self._promote = client.register_script(_PROMOTE)
        self._rollback = client.register_script(_ROLLBACK)

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    # -- versions ---------------------------------------------------------------------------

    def allocate(self) -> tuple[str, Path]:
        """A fresh version name (``v<n>``) and its new, empty folder, for a training job to
        write the model into before ``register``."""
        while True:
            version = f"v{self.redis.incr(NEXT)}"
            folder = self.models_dir / version
            if self.redis.hexists(MODELS, version):
                continue
            try:
                folder.mkdir(parents=True)
            except FileExistsError:
                continue  # left by a job that died before registering: never reuse it
            return version, folder

    def register(
        self,
        version: str,
        *,
        requested_by: str = "",
        parent: str | None = None,
        base_model: str | None = None,
        dataset_hash: str | None = None,
        dataset_rows: int | None = None,
        metrics: dict[str, Any] | None = None,
        notes: str = "",
    ) -> ModelVersion:
        """Record the model in ``<data dir>/models/<version>/``. Registering does not promote."""
        _check_name(version)
        if version == BASE:
            raise RegistryError(f"{BASE!r} is reserved for the configured model (SPRBOT_MODEL)")
        folder = self.models_dir / version
        if (folder / "adapter_config.json").is_file():
            kind: Literal["lora", "full"] = "lora"
        elif (folder / "config.json").is_file():
            kind = "full"
        else:
            raise RegistryError(
                f"{folder} holds no model: expected a LoRA adapter (adapter_config.json) or a "
                "full model (config.json)"
            )
        record = ModelVersion(
            version=version,
            path=f"models/{version}",
            kind=kind,
            created_at=time.time(),
            requested_by=requested_by,
            parent=parent,
            base_model=base_model,
            dataset_hash=dataset_hash,
            dataset_rows=dataset_rows,
            metrics=dict(metrics or {}),
            notes=notes,
        )
        if not self.redis.hsetnx(MODELS, version, json.dumps(asdict(record))):
            raise RegistryError(f"version {version!r} is already registered")
        return record

    def get(self, version: str) -> ModelVersion:
        raw = self.redis.hget(MODELS, version)
        if raw is None:
            known = ", ".join(v.version for v in self.versions()) or "none yet"
            raise RegistryError(
                f"there is no model version {version!r} (known: {known}; {BASE!r} is the "
                "configured model)"
            )
        return ModelVersion(**json.loads(raw))

    def versions(self) -> list[ModelVersion]:
        """Every registered version, oldest first."""
        records = [ModelVersion(**json.loads(v)) for v in self.redis.hvals(MODELS)]
        return sorted(records, key=lambda r: (r.created_at, r.version))

    def path(self, version: str | ModelVersion) -> Path:
        record = version if isinstance(version, ModelVersion) else self.get(version)
        return self.data_dir / record.path

    # -- serving ----------------------------------------------------------------------------

    def current(self) -> str:
        """The version that should serve (``base``: the configured model)."""
        raw = self.redis.get(CURRENT)
        return _text(raw) if raw else BASE

    def history(self) -> list[str]:
        """Versions served before the current one, newest first."""
        return [_text(v) for v in self.redis.lrange(HISTORY, 0, -1)]

    def promote(self, version: str) -> str:
        """Make ``version`` (or ``base``) the serving version and tell the workers; returns
        the version it replaces. Promoting the serving version announces it again."""
        _check_name(version)
        status, previous = self._promote(
            keys=[MODELS, CURRENT, HISTORY, EVENTS], args=[version, BASE, _MAX_HISTORY]
        )
        if _text(status) == "unknown":
            self.get(version)  # raises with the known versions
        return _text(previous)

    def rollback(self) -> tuple[str, str]:
        """Serve the version that served before the current one; ``(from, to)``."""
        was, now = self._rollback(keys=[CURRENT, HISTORY, EVENTS], args=[BASE])
        if _text(was) == "empty":
            raise RegistryError("there is nothing to roll back to: no other version has served")
        return _text(was), _text(now)


def parse_event(message: str | bytes) -> str | None:
    """The version of a ``promoted <version>`` event; None for anything else."""
    text = message.decode() if isinstance(message, bytes) else message
    verb, _, version = text.partition(" ")
    return version if verb == "promoted" and _VERSION.match(version) else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _check_name(version: str) -> None:
    if not _VERSION.match(version):
        raise RegistryError(
            f"{version!r} is not a version name: letters, digits, '.', '_' and '-', up to 64"
        )
