"""Load and soak: a steady rate of chat requests through the web adapter to real workers.

    python bench/load.py --model echo --rates 20,50 --duration 60
    python bench/load.py --model tiny --rates 1,3 --duration 60
    python bench/load.py --model tiny --rates 2 --duration 600 --retention-s 120 \\
        --out bench/results/soak.json --plot docs/img/soak.png

Everything runs as in production, each part in its own process: the embedded Redis of a
temporary data dir, the real web adapter (``sprbot adapter web``, the OpenAI-compatible API),
and a worker. ``--model echo`` is bench/pipeline.py's echo worker (it answers with the request
text at once, so what is measured is the adapter and the bus); ``--model tiny`` is the real
``sprbot worker inference`` on a random-init tiny Llama (``inference.tiny.init_tiny``), greedy,
``--new-tokens`` per answer.

This process offers requests open-loop: each is sent on its schedule (``rate`` per second for
``--duration`` seconds) whatever the earlier ones are doing, so a worker that cannot keep up
shows as queueing, then as ``busy`` refusals (503), not as a slower sender. A request's latency
runs from its scheduled send time to its whole answer. Every ``--sample-s`` seconds it records
Redis's ``used_memory``, its key count (and how many carry a TTL), the number of keys of each
family (``sprbot:seen``, ``sprbot:final``...), the length of every sprbot stream, the AOF size,
and the RSS of the adapter and worker processes (children included).

Redis holds about rate x TTL keys per family that expires: with production TTLs (a day for
request ids, a week for answered pairs) that takes a day to level off. ``--retention-s`` sets
those TTLs (``SPRBOT_REQUEST_TTL_S``, ``SPRBOT_MEMORY_TTL_S``) short, so that a soak reaches its
steady state within minutes and a flat curve says nothing else grows. The echo worker is
bench/pipeline.py's own bus with the default TTLs: its ``sprbot:final`` keys ignore
``--retention-s``.

Prints a table and writes JSON (default ``bench/results/load.json``); ``--plot PATH`` draws
memory, keys, streams, latency and throughput over time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
# The repository first: bench/ (this script's folder, on the path too) has an inference.py.
sys.path.insert(0, str(BENCH_DIR.parent))

import pipeline  # noqa: E402  bench/pipeline.py: its echo worker

QUESTION = "ping {i}: is the bus keeping up with a steady stream of questions like this one?"


@dataclass
class Outcome:
    """One offered request: ``ok``, ``busy`` (503, the backlog was full) or ``error``."""

    phase: int
    scheduled: float  # time.monotonic() of its slot in the schedule
    done: float
    status: str
    detail: str = ""

    @property
    def latency_s(self) -> float:
        return self.done - self.scheduled


@dataclass
class Stack:
    """The processes under test and how to reach them."""

    redis_url: str
    web_url: str
    watched: dict[str, int]  # role -> pid, for RSS
    stop: Any = None
    procs: list[Any] = field(default_factory=list)


# -- the stack ------------------------------------------------------------------------------------


def child_env(args: argparse.Namespace, data_dir: Path, url: str, model: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPRBOT_")}
    env |= {
        "SPRBOT_DATA_DIR": str(data_dir),
        "SPRBOT_REDIS_URL": url,
        "SPRBOT_WEB_PORT": "0",
        "SPRBOT_METRICS_PORT": "0",
        "SPRBOT_LOG_LEVEL": "WARNING",  # a log line per request would cost CPU and say nothing
        "SPRBOT_LOG_FORMAT": "text",
        "SPRBOT_MAX_BACKLOG": str(args.max_backlog),
        "SPRBOT_FAQ_EMBEDDINGS": "off",  # the FAQ is empty: no embedding model to load
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if model is not None:
        env |= {
            "SPRBOT_MODEL": str(model),
            "SPRBOT_DO_SAMPLE": "false",
            "SPRBOT_MAX_NEW_TOKENS": str(args.new_tokens),
            "SPRBOT_MAX_BATCH": str(args.max_batch),
        }
    if args.retention_s:
        env |= {
            "SPRBOT_REQUEST_TTL_S": str(args.retention_s),
            "SPRBOT_MEMORY_TTL_S": str(args.retention_s),
            # The request TTL must outlast the retries (SPRBOT_MAX_DELIVERIES, 3 by default).
            "SPRBOT_RECLAIM_IDLE_MS": str(args.retention_s * 1000 // 4),
        }
    return env


def spawn(role: str, command: list[str], env: dict, logs: Path) -> subprocess.Popen:
    log = open(logs / f"{role}.log", "wb")  # noqa: SIM115  closed with the process
    return subprocess.Popen(
        [sys.executable, "-m", "bot.cli", *command],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=BENCH_DIR.parent,
    )


def wait_for(what: str, check: Any, procs: list[Any], timeout_s: float, logs: Path) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            if (p.poll() if hasattr(p, "poll") else p.exitcode) is not None:
                tails = {f.name: f.read_text()[-2000:] for f in logs.glob("*.log")}
                raise RuntimeError(f"a process exited while waiting for {what}: {tails}")
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up within {timeout_s:.0f}s; logs in {logs}")


def start_stack(args: argparse.Namespace, temp: Path) -> Stack:
    import redis

    from adapters.web import LIVE_PREFIX
    from bot.connection import EmbeddedRedis
    from bot.metrics import WORKER_PREFIX

    data_dir, logs = temp / "data", temp / "logs"
    logs.mkdir(parents=True)
    url = EmbeddedRedis(data_dir).ensure_running()
    client = redis.Redis.from_url(url)
    model = None
    if args.model == "tiny":
        from inference.tiny import init_tiny

        model = init_tiny(temp / "tiny", size="tiny", seed=0)
    env = child_env(args, data_dir, url, model)
    stack = Stack(url, "", {})
    if args.model == "echo":
        stack.stop = mp.Event()
        worker = mp.Process(
            target=pipeline.echo_worker, args=(url, "echo-0", stack.stop, 64), daemon=True
        )
        worker.start()
    else:
        worker = spawn("worker", ["worker", "inference"], env, logs)
    stack.procs.append(worker)
    web = spawn("web", ["adapter", "web"], env, logs)
    stack.procs.append(web)
    stack.watched = {"worker": worker.pid, "web": web.pid}
    if args.model == "tiny":

        def worker_up() -> bool:
            return any(True for _ in client.scan_iter(WORKER_PREFIX + "*"))

        wait_for("the inference worker", worker_up, stack.procs, 300, logs)

    def web_url() -> str | None:
        for key in client.scan_iter(LIVE_PREFIX + "*"):
            found = client.hget(key, "url")
            if found:
                return found.decode()
        return None

    stack.web_url = wait_for("the web adapter", web_url, stack.procs, 120, logs)
    return stack


def stop_stack(stack: Stack, temp: Path) -> None:
    from bot.connection import EmbeddedRedis

    if stack.stop is not None:
        stack.stop.set()
    for p in stack.procs:
        if isinstance(p, subprocess.Popen):
            p.send_signal(signal.SIGTERM)
    for p in stack.procs:
        if isinstance(p, subprocess.Popen):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        else:
            p.join(timeout=10)
    EmbeddedRedis(temp / "data").stop()


# -- what is sampled ----------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (Linux /proc; 0 where unreadable)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += rss_bytes(int(child))
    except (OSError, ValueError):
        pass
    return total


def family(key: bytes) -> str:
    """``sprbot:seen:web-1f..`` -> ``sprbot:seen``; the reply streams of the web processes (one
    per process) count as ``sprbot:chat:replies``."""
    parts = key.decode(errors="replace").split(":")
    if parts[:2] == ["sprbot", "chat"]:
        return ":".join(parts[:3])
    if parts[:2] == ["sprbot", "faq"] and len(parts) > 3:
        return ":".join(parts[:3])
    return ":".join(parts[:2])


def sample(client: Any, stack: Stack, t0: float) -> dict[str, Any]:
    memory = client.info("memory")
    persistence = client.info("persistence")
    keyspace = client.info("keyspace").get("db0", {"keys": 0, "expires": 0})
    families: Counter[str] = Counter()
    streams: Counter[str] = Counter()
    stream_keys = []
    for key in client.scan_iter(count=1000):
        families[family(key)] += 1
    for key in client.scan_iter(match="sprbot:*", count=1000, _type="stream"):
        stream_keys.append(key)
    pipe = client.pipeline(transaction=False)
    for key in stream_keys:
        pipe.xlen(key)
    for key, n in zip(stream_keys, pipe.execute(), strict=True):
        streams[family(key)] += n
    return {
        "t_s": round(time.monotonic() - t0, 2),
        "used_memory": memory["used_memory"],
        "keys": keyspace["keys"],
        "keys_with_ttl": keyspace["expires"],
        "families": dict(sorted(families.items())),
        "streams": dict(sorted(streams.items())),
        "aof_bytes": persistence.get("aof_current_size", 0),
        "rss": {role: rss_bytes(pid) for role, pid in stack.watched.items()},
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }


# -- the load -----------------------------------------------------------------------------------


async def ask(client: Any, text: str, new_tokens: int) -> tuple[str, str]:
    import httpx

    body = {
        "model": "sprbot",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": new_tokens,
    }
    try:
        response = await client.post("v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return "error", f"{type(exc).__name__}: {exc}"
    if response.status_code == 503:
        return "busy", ""
    if response.status_code != 200:
        return "error", f"HTTP {response.status_code}: {response.text[:200]}"
    answer = response.json()["choices"][0]["message"]["content"]
    if not answer:
        return "error", "an empty answer"
    return "ok", answer


async def offer(
    client: Any, phase: int, rate: float, args: argparse.Namespace, outcomes: list[Outcome]
) -> float:
    """Send ``rate`` requests a second for ``args.duration`` s on schedule; returns the seconds
    the schedule took (longer than planned when this process could not keep it)."""
    run = uuid.uuid4().hex[:6]

    async def one(i: int, scheduled: float) -> None:
        text = QUESTION.format(i=f"{run}-{i}")
        status, detail = await ask(client, text, args.new_tokens)
        if status == "ok" and args.model == "echo" and detail != text:
            status, detail = "error", f"the echo answered {detail[:80]!r}"
        if status == "ok":
            detail = ""
        outcomes.append(Outcome(phase, scheduled, time.monotonic(), status, detail))

    n = max(1, round(rate * args.duration))
    start = time.monotonic() + 0.05
    tasks = []
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i, scheduled)))
    sending = time.monotonic() - start
    await asyncio.gather(*tasks)
    return sending


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def summarise(phase: int, rate: float, sending_s: float, outcomes: list[Outcome]) -> dict:
    mine = sorted((o for o in outcomes if o.phase == phase), key=lambda o: o.scheduled)
    ok = [o for o in mine if o.status == "ok"]
    ms = [o.latency_s * 1000 for o in ok]
    first = mine[0].scheduled if mine else 0.0
    span = (max(o.done for o in mine) - first) if mine else 0.0
    thirds = [ok[: len(ok) // 3], ok[-(len(ok) // 3) :]] if len(ok) >= 3 else [ok, ok]
    errors = Counter(o.detail for o in mine if o.status == "error")
    row = {
        "offered_per_s": rate,
        "sent": len(mine),
        "sent_per_s": round(len(mine) / sending_s, 2) if sending_s else None,
        "answered": len(ok),
        "busy": sum(o.status == "busy" for o in mine),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "answered_per_s": round(len(ok) / span, 2) if span else 0.0,
        "p50_ms": round(percentile(ms, 50), 1),
        "p90_ms": round(percentile(ms, 90), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1) if ms else float("nan"),
        "mean_ms": round(statistics.fmean(ms), 1) if ms else float("nan"),
        # A queue that builds up shows as latency rising through the phase.
        "p50_first_third_ms": round(percentile([o.latency_s * 1000 for o in thirds[0]], 50), 1),
        "p50_last_third_ms": round(percentile([o.latency_s * 1000 for o in thirds[1]], 50), 1),
    }
    # Held: every request answered, none refused, and the answers kept pace with the offer
    # (the last third no slower than twice the first, plus a second of slack).
    row["held"] = bool(
        ok
        and row["busy"] == 0
        and row["errors"] == 0
        and row["p50_last_third_ms"] <= 2 * row["p50_first_third_ms"] + 1000
    )
    return row


async def run_load(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    import httpx
    import redis

    client = redis.Redis.from_url(stack.redis_url)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    timeout = httpx.Timeout(args.request_timeout_s)
    outcomes: list[Outcome] = []
    samples: list[dict[str, Any]] = []
    phases: list[dict[str, Any]] = []
    t0 = time.monotonic()
    stop_sampling = asyncio.Event()

    async def sampler() -> None:
        seen = 0
        while True:
            row = await asyncio.to_thread(sample, client, stack, t0)
            window = outcomes[seen:]
            seen = len(outcomes)
            ok = [o.latency_s * 1000 for o in window if o.status == "ok"]
            row["phase"] = len(phases) - 1
            row["window_answered"] = len(ok)
            row["window_busy"] = sum(o.status == "busy" for o in window)
            row["window_p50_ms"] = round(percentile(ok, 50), 1) if ok else None
            row["window_p99_ms"] = round(percentile(ok, 99), 1) if ok else None
            samples.append(row)
            try:
                await asyncio.wait_for(stop_sampling.wait(), args.sample_s)
                return
            except asyncio.TimeoutError:
                pass

    async with httpx.AsyncClient(base_url=stack.web_url, limits=limits, timeout=timeout) as http:
        for _ in range(args.warmup):  # first requests: imports, allocations, the first batch
            status, detail = await ask(http, "warm-up", args.new_tokens)
            if status != "ok":
                raise RuntimeError(f"the warm-up request failed: {status} {detail}")
        task = asyncio.create_task(sampler())
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
        for number, rate in enumerate(rates):
            phases.append({"rate": rate, "start_s": round(time.monotonic() - t0, 2)})
            sending = await offer(http, number, rate, args, outcomes)
            phases[-1]["end_s"] = round(time.monotonic() - t0, 2)
            phases[-1] |= summarise(number, rate, sending, outcomes)
            print_phase(phases[-1])
        await asyncio.sleep(args.sample_s)  # one sample after the last answers
        stop_sampling.set()
        await task
    return {"phases": phases, "samples": samples}


# -- the report --------------------------------------------------------------------------------


def memory_trend(samples: list[dict[str, Any]], retention_s: int | None) -> dict[str, Any]:
    """Start, end and the slope of ``used_memory`` once the TTLs have had time to act."""
    settled_from = (retention_s or 0) + 30
    tail = [s for s in samples if s["t_s"] >= settled_from] or samples[len(samples) // 2 :]
    slope = None
    if len(tail) >= 3:
        xs, ys = [s["t_s"] / 60 for s in tail], [s["used_memory"] for s in tail]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        denominator = sum((x - mx) ** 2 for x in xs)
        if denominator:
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / denominator
    first, last = samples[0], samples[-1]
    return {
        "used_memory_start": first["used_memory"],
        "used_memory_end": last["used_memory"],
        "used_memory_max": max(s["used_memory"] for s in samples),
        "keys_start": first["keys"],
        "keys_end": last["keys"],
        "keys_max": max(s["keys"] for s in samples),
        "streams_start": first["streams"],
        "streams_end": last["streams"],
        "stream_entries_max": max(sum(s["streams"].values()) for s in samples),
        "settled_from_s": tail[0]["t_s"] if tail else None,
        "used_memory_slope_bytes_per_min": round(slope) if slope is not None else None,
        "rss_start": first["rss"],
        "rss_end": last["rss"],
    }


def print_phase(row: dict[str, Any]) -> None:
    print(
        f"  {row['offered_per_s']:g}/s: sent {row['sent_per_s']}/s, answered "
        f"{row['answered']}/{row['sent']} ({row['answered_per_s']}/s), busy {row['busy']}, "
        f"errors {row['errors']}, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms",
        flush=True,
    )


def print_table(report: dict[str, Any]) -> None:
    m, trend = report["machine"], report["trend"]
    print(
        f"\nload through the web adapter, {report['model']} worker, {m['cpus']} CPUs, load "
        f"average {m['loadavg_1m_before']} before / {m['loadavg_1m_after']} after"
    )
    columns = ["offered/s", "sent/s", "answered/s", "answered", "busy", "errors"]
    columns += ["p50 ms", "p99 ms", "max ms", "held"]
    lines = [columns]
    for row in report["phases"]:
        lines.append(
            [
                f"{row['offered_per_s']:g}",
                f"{row['sent_per_s']}",
                f"{row['answered_per_s']}",
                f"{row['answered']}/{row['sent']}",
                str(row["busy"]),
                str(row["errors"]),
                f"{row['p50_ms']:.0f}",
                f"{row['p99_ms']:.0f}",
                f"{row['max_ms']:.0f}",
                "yes" if row["held"] else "no",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    for n, line in enumerate(lines):
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
        if n == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    mib = 1 << 20
    print(
        f"Redis used_memory {trend['used_memory_start'] / mib:.2f} MiB at start, "
        f"{trend['used_memory_end'] / mib:.2f} MiB at end (max "
        f"{trend['used_memory_max'] / mib:.2f}); keys {trend['keys_start']} -> "
        f"{trend['keys_end']} (max {trend['keys_max']}); stream entries at most "
        f"{trend['stream_entries_max']}"
    )
    if trend["used_memory_slope_bytes_per_min"] is not None:
        print(
            f"used_memory slope from {trend['settled_from_s']:.0f} s on: "
            f"{trend['used_memory_slope_bytes_per_min'] / 1024:+.1f} KiB/min"
        )


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = report["samples"]
    minutes = [s["t_s"] / 60 for s in samples]
    mib = 1 << 20
    fig, (mem, rss, keys, lat) = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    mem.plot(minutes, [s["used_memory"] / mib for s in samples], label="Redis used_memory")
    mem.set_ylabel("Redis, MiB")
    mem.set_ylim(bottom=0, top=max(s["used_memory"] for s in samples) / mib * 1.5)
    mem.legend(loc="upper left", fontsize=8)
    title = f"{report['model']} worker through the web adapter"
    if report["retention_s"]:
        title += f", request/answer TTLs {report['retention_s']} s"
    mem.set_title(title)
    for role in report["processes"]:
        rss.plot(minutes, [s["rss"][role] / mib for s in samples], label=f"{role} RSS")
    rss.set_ylabel("processes, MiB")
    rss.set_ylim(bottom=0)
    rss.legend(loc="upper left", fontsize=8)
    keys.plot(minutes, [s["keys"] for s in samples], label="Redis keys", color="black")
    names = sorted({name for s in samples for name in s["streams"]})
    for name in names:
        keys.plot(minutes, [s["streams"].get(name, 0) for s in samples], label=f"XLEN {name}")
    keys.set_ylabel("keys / stream entries")
    keys.set_ylim(bottom=0)
    keys.legend(loc="upper left", fontsize=8)
    for key in ("window_p50_ms", "window_p99_ms"):
        points = [(m, s[key]) for m, s in zip(minutes, samples, strict=True) if s[key] is not None]
        lat.plot(*zip(*points, strict=True), label=key.removeprefix("window_").replace("_", " "))
    lat.set_ylabel("latency, ms")
    lat.set_xlabel("minutes")
    lat.set_ylim(bottom=0)
    lat.legend(loc="upper left", fontsize=8)
    rate = lat.twinx()
    step = report["sample_s"]
    rate.plot(
        minutes, [s["window_answered"] / step for s in samples], color="grey", alpha=0.5, lw=1
    )
    rate.set_ylabel("answered/s", color="grey")
    rate.set_ylim(bottom=0)
    for phase in report["phases"][1:]:
        for ax in (mem, rss, keys, lat):
            ax.axvline(phase["start_s"] / 60, color="grey", ls=":", lw=1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["echo", "tiny"], default="echo")
    parser.add_argument("--rates", default="20,50", help="offered requests/s, one phase each")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per rate")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--retention-s",
        type=int,
        default=None,
        help="TTL of request ids and answered pairs (default: production's day and week)",
    )
    parser.add_argument("--new-tokens", type=int, default=16, help="tiny: tokens per answer")
    parser.add_argument("--max-batch", type=int, default=8, help="tiny: SPRBOT_MAX_BATCH")
    parser.add_argument("--max-backlog", type=int, default=256, help="SPRBOT_MAX_BACKLOG")
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--warmup", type=int, default=3, help="requests before measuring")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "load.json")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of the run here")
    args = parser.parse_args(argv)
    if args.retention_s is not None and args.retention_s < 60:
        parser.error("--retention-s must be at least 60 (SPRBOT_REQUEST_TTL_S's floor)")

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sprbot-load-") as name:
        temp = Path(name)
        stack = start_stack(args, temp)
        try:
            result = asyncio.run(run_load(args, stack))
        finally:
            stop_stack(stack, temp)
    samples = result["samples"]
    report = {
        "bench": "load",
        "what": "open-loop requests through the web adapter (scheduled send -> whole answer)",
        "model": args.model,
        "new_tokens": args.new_tokens if args.model == "tiny" else None,
        "max_batch": args.max_batch if args.model == "tiny" else None,
        "max_backlog": args.max_backlog,
        "retention_s": args.retention_s,
        "duration_s": args.duration,
        "sample_s": args.sample_s,
        "command": "python bench/load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "processes": sorted(stack.watched),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "loadavg_1m_max_during": max(s["loadavg_1m"] for s in samples),
        },
        "python": platform.python_version(),
        "phases": result["phases"],
        "trend": memory_trend(samples, args.retention_s),
        "samples": samples,
    }
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if args.plot is not None:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return report


if __name__ == "__main__":
    main()
