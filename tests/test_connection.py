"""The embedded Redis server: started once per data dir, with AOF on, reused by later processes."""

from __future__ import annotations

import subprocess
import sys

import redis

from bot.config import load_settings
from bot.connection import connect


def test_embedded_server_starts_with_aof(embedded_redis, data_dir):
    client = connect(load_settings())
    assert client.ping()
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert client.config_get("dir")["dir"] == str(data_dir.resolve() / "redis")
    # unix socket only: no TCP port is opened
    assert client.config_get("port") == {"port": "0"}


def test_later_processes_reuse_the_same_server(embedded_redis, data_dir):
    client = connect(load_settings())
    pid = client.info("server")["process_id"]
    client.set("written-by", "first")
    code = (
        "from bot.config import load_settings; from bot.connection import connect; "
        "c = connect(load_settings()); "
        "print(c.info('server')['process_id'], c.get('written-by').decode())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == [str(pid), "first"]


def test_concurrent_first_starts_share_one_server(data_dir):
    code = (
        "from bot.config import load_settings; from bot.connection import connect; "
        "print(connect(load_settings()).info('server')['process_id'])"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    pids = {p.communicate(timeout=60)[0].strip() for p in procs}
    try:
        assert len(pids) == 1 and pids != {""}
    finally:
        from bot.connection import EmbeddedRedis

        EmbeddedRedis(data_dir).stop()


def test_data_survives_a_restart(embedded_redis, data_dir):
    client = connect(load_settings())
    client.xadd("sprbot:test", {"k": "v"})
    embedded_redis.stop()
    assert not embedded_redis.is_running()
    client = connect(load_settings())  # starts it again from the AOF
    entries = client.xrange("sprbot:test")
    assert [fields for _, fields in entries] == [{b"k": b"v"}]


def test_configured_url_is_used_instead(monkeypatch, embedded_redis):
    monkeypatch.setenv("SPRBOT_REDIS_URL", embedded_redis.url + "?db=3")
    client = connect(load_settings())
    client.set("k", "v")
    assert redis.Redis(unix_socket_path=str(embedded_redis.socket), db=3).get("k") == b"v"
