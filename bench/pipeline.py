"""What the bus costs: requests/s at peak and the latency it adds, with an echo "model".

    python bench/pipeline.py                          # embedded Redis in a temp data dir
    python bench/pipeline.py --workers 2 --rates 100,500,1000,2000 --duration 5
    SPRBOT_REDIS_URL=redis://host:6379/0 python bench/pipeline.py   # an external server

The full path of a chat message runs, each part in its own process so that the GIL does not
serialise them: a producer (the adapter's ingress: ``Bus.submit``), ``--workers`` echo workers
(``read_requests``, then one ``delta`` with the request text and the final, in one
``finish_many`` round trip) and a collector (the
adapter's egress: ``read_replies``, ``ack_replies``). The echo takes no time, so the latency
measured, from a request's *scheduled* send time to the moment the collector reads its final
event, is what the bus adds. Measuring from the schedule rather than from the actual send
keeps a stalled producer from hiding the requests it delayed (coordinated omission).

- ``peak``: closed loop, ``--window`` requests in flight, ``--peak-requests`` in all.
- one open-loop phase per ``--rates`` entry: requests sent at that fixed rate for
  ``--duration`` seconds, whatever the replies do.

Every final is checked against its request: each request must be answered exactly once.
Prints a table and writes JSON (default ``bench/results/pipeline.json``). The machine is
shared and noisy: compare figures from one run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

CHANNEL = "bench"
# The producer must never see "busy": the bench measures the bus, not its refusals.
NO_BACKPRESSURE = 10_000_000


def make_bus(url: str) -> Any:
    import redis

    from bot.bus import Bus

    return Bus(redis.Redis.from_url(url), max_backlog=NO_BACKPRESSURE, max_text_chars=100_000)


def echo_worker(url: str, name: str, stop: Any, batch: int) -> None:
    """An inference worker whose model answers with the request's own text, at once."""
    bus = make_bus(url)
    while not stop.is_set():
        deliveries = bus.read_requests(name, count=batch, block_ms=100)
        if deliveries:
            deltas = [d.delta(d.request.text) for d in deliveries]
            bus.finish_many([(d, d.request.text) for d in deliveries], events=deltas)


def collector(url: str, commands: Any, results: Any, window: Any) -> None:
    """The adapter side: read finals, time them against their scheduled send time.

    Each command is ``(expected, timeout_s, closed_loop)``; the answer is the list of
    latencies in seconds, plus how many requests got more than one final (must be 0).
    """
    bus = make_bus(url)
    while (command := commands.get()) is not None:
        expected, timeout_s, closed_loop = command
        latencies: list[float] = []
        answered: dict[str, int] = {}
        deadline = time.time() + timeout_s
        while len(latencies) < expected and time.time() < deadline:
            replies = bus.read_replies(CHANNEL, "collector", count=512, block_ms=50)
            if not replies:
                continue
            now = time.time()
            bus.ack_replies(CHANNEL, *(r.entry_id for r in replies))
            for reply in replies:
                event = reply.event
                if event.kind != "final":
                    continue
                answered[event.request_id] = answered.get(event.request_id, 0) + 1
                if event.text != event.reply_to["text"]:
                    raise AssertionError(f"wrong answer for {event.request_id}: {event.text!r}")
                latencies.append(now - float(event.reply_to["t"]))
                if closed_loop:
                    window.release()
        twice = sum(1 for n in answered.values() if n > 1)
        results.put((latencies, twice))


def request(run: str, i: int, scheduled: float) -> Any:
    from bot.schemas import ChatRequest, request_id

    text = f"ping {i}: how long does the bus take to carry this message and its answer?"
    return ChatRequest(
        id=request_id(CHANNEL, run, i),
        channel=CHANNEL,
        conversation=f"bench/{i % 50}",
        user_id=f"U{i % 50}",
        user_name="bench",
        text=text,
        reply_to={"t": scheduled, "text": text},
    )


def summarise(latencies: list[float], sent: int, seconds: float, twice: int) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies)

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, int(p / 100 * len(ms)))] if ms else float("nan")

    return {
        "sent": sent,
        "answered": len(ms),
        "answered_twice": twice,
        "seconds": round(seconds, 3),
        "achieved_per_s": round(len(ms) / seconds, 1) if seconds else 0.0,
        "p50_ms": round(pct(50), 3),
        "p99_ms": round(pct(99), 3),
        "max_ms": round(ms[-1], 3) if ms else float("nan"),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
    }


class CpuMeter:
    """CPU seconds spent by the bench's processes and the Redis server, all together.

    On a shared machine, wall-clock figures move with the neighbours' load; CPU time per
    request does not, so it says what the bus would do on idle cores.
    """

    def __init__(self, client: Any, pids: list[int]) -> None:
        self.client, self.pids = client, pids
        self.ticks = os.sysconf("SC_CLK_TCK")

    def read(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / self.ticks  # utime + stime
            except (OSError, IndexError, ValueError):
                pass  # not Linux, or gone: count what can be counted
        info = self.client.info("cpu")
        return total + float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def measured(meter: CpuMeter, phase: Any, *args: Any) -> dict[str, Any]:
    before = meter.read()
    row = phase(*args)
    cpu = meter.read() - before
    row["cpu_us_per_request"] = round(cpu / max(1, row["answered"]) * 1e6, 1)
    return row


def run_closed(bus: Any, args: argparse.Namespace, run: str, io: tuple) -> dict[str, Any]:
    commands, results, window = io
    n = args.peak_requests
    commands.put((n, 120.0, True))
    started = time.time()
    for i in range(n):
        if not window.acquire(timeout=30):
            raise RuntimeError("no final for 30 s in the closed loop: is a worker stuck?")
        now = time.time()
        if bus.submit(request(run, i, now)).status != "queued":
            raise RuntimeError(f"request {i} was not queued")
    latencies, twice = results.get()
    elapsed = time.time() - started
    return {"mode": "closed", "offered_per_s": None, "window": args.window} | summarise(
        latencies, n, elapsed, twice
    )


def run_open(bus: Any, rate: float, args: argparse.Namespace, run: str, io: tuple) -> dict:
    commands, results, _ = io
    n = max(1, int(rate * args.duration))
    commands.put((n, args.duration + 30.0, False))
    time.sleep(0.2)  # let the collector block on its first read
    start = time.time() + 0.05
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.time()
        if delay > 0:
            time.sleep(delay)
        if bus.submit(request(run, i, scheduled)).status != "queued":
            raise RuntimeError(f"request {i} was not queued")
    sending = time.time() - start
    latencies, twice = results.get()
    summary = summarise(latencies, n, sending, twice)
    summary["achieved_per_s"] = round(n / sending, 1)  # the offered rate the producer kept up
    return {"mode": "open", "offered_per_s": rate, "window": None} | summary


def hiredis_available() -> bool:
    """redis-py parses replies in C when hiredis is installed: about a third less CPU."""
    from redis.utils import HIREDIS_AVAILABLE

    return bool(HIREDIS_AVAILABLE)


def redis_info(url: str) -> dict[str, Any]:
    import redis

    info = redis.Redis.from_url(url).info("server")
    return {"version": info["redis_version"], "url_scheme": url.split("://", 1)[0]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="echo worker processes (1 leaves a 2-core machine to the bus; 2+ shows the "
        "consumer group sharing load, at the cost of more processes contending)",
    )
    parser.add_argument("--batch", type=int, default=64, help="requests a worker reads at once")
    parser.add_argument("--rates", default="100,500,1000", help="open-loop rates, requests/s")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per rate")
    parser.add_argument("--peak-requests", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=128, help="closed loop: in flight")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "pipeline.json")
    args = parser.parse_args(argv)

    from bot.config import load_settings
    from bot.connection import EmbeddedRedis, redis_url

    temp = None
    if os.environ.get("SPRBOT_REDIS_URL"):
        settings = load_settings()
    else:
        temp = tempfile.TemporaryDirectory(prefix="sprbot-bench-")
        settings = load_settings(data_dir=Path(temp.name))
    url = redis_url(settings)
    run = uuid.uuid4().hex[:8]

    stop = mp.Event()
    commands: Any = mp.Queue()
    results: Any = mp.Queue()
    window = mp.Semaphore(args.window)
    io = (commands, results, window)
    procs = [
        mp.Process(target=echo_worker, args=(url, f"echo-{w}", stop, args.batch), daemon=True)
        for w in range(args.workers)
    ]
    procs.append(mp.Process(target=collector, args=(url, commands, results, window), daemon=True))
    for p in procs:
        p.start()
    bus = make_bus(url)
    meter = CpuMeter(bus.redis, [os.getpid()] + [p.pid for p in procs if p.pid])
    load_before = os.getloadavg()
    rows = []
    try:
        run_open(bus, 200, argparse.Namespace(duration=1.0), f"{run}-warm", io)  # warm-up
        rows.append(measured(meter, run_closed, bus, args, f"{run}-peak", io))
        for rate in [float(r) for r in args.rates.split(",") if r.strip()]:
            rows.append(measured(meter, run_open, bus, rate, args, f"{run}-{rate:g}", io))
    finally:
        stop.set()
        commands.put(None)
        for p in procs:
            p.join(timeout=5)
        if temp is not None:
            EmbeddedRedis(Path(temp.name)).stop()
            temp.cleanup()

    report = {
        "bench": "pipeline",
        "what": "latency the bus adds (scheduled send -> final read by the adapter), echo model",
        "workers": args.workers,
        "batch": args.batch,
        "redis": redis_info(url) if temp is None else {"embedded": True, "scheme": "unix"},
        "hiredis": hiredis_available(),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        },
        # CPUs / CPU cost per request at peak. Neighbours' load inflates that cost (cold
        # caches, context switches), so on idle cores this is a floor, not a ceiling.
        "cpu_bound_capacity_per_s": round(
            (os.cpu_count() or 1) * 1e6 / rows[0]["cpu_us_per_request"]
        ),
        "python": platform.python_version(),
        "rows": rows,
    }
    print_table(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return report


def print_table(report: dict[str, Any]) -> None:
    machine = report["machine"]
    print(
        f"\nbus pipeline, echo model, {report['workers']} worker processes "
        f"(batch {report['batch']}), hiredis {'on' if report['hiredis'] else 'off'}, "
        f"{machine['cpus']} CPUs, load average "
        f"{machine['loadavg_1m_before']} before / {machine['loadavg_1m_after']} after"
    )
    columns = ["mode", "offered/s", "achieved/s", "answered", "twice"]
    columns += ["p50 ms", "p99 ms", "max ms", "CPU us/req"]
    lines = [columns]
    for row in report["rows"]:
        closed = row["mode"] == "closed"
        lines.append(
            [
                f"closed W={row['window']}" if closed else "open",
                "-" if closed else f"{row['offered_per_s']:,.0f}",
                f"{row['achieved_per_s']:,.0f}",
                f"{row['answered']:,}/{row['sent']:,}",
                str(row["answered_twice"]),
                f"{row['p50_ms']:.2f}",
                f"{row['p99_ms']:.2f}",
                f"{row['max_ms']:.2f}",
                f"{row['cpu_us_per_request']:.0f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    for n, line in enumerate(lines):
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if n == 0:
            print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    print(
        f"{machine['cpus']} CPUs / CPU cost per request at peak: "
        f"{report['cpu_bound_capacity_per_s']:,} requests/s"
    )


if __name__ == "__main__":
    main()
