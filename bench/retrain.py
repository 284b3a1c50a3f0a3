"""``/retrain`` to a promoted, serving model, phase by phase, and what a hot swap costs the
answers in flight.

    python bench/retrain.py                       # small, 100 FAQ pairs
    python bench/retrain.py --size tiny --pairs 20 --swaps 2   # a quick look

Everything is the real thing: the embedded Redis of a temporary data dir, ``/faq add`` and
``/retrain`` as an admin, ``sprbot worker train --burst`` running the RQ job (LoRA, bf16, the
default ``SPRBOT_TRAIN_*`` settings unless overridden in the environment) and an idle
``sprbot worker inference`` that picks the promoted version up. Phases: snapshot, train and
eval come from the job's own timings; load is from the job's final report to the inference
worker's heartbeat naming the new version (its background load plus the swap).

The swap under load: ``--concurrency`` conversations ask one question after another
(streaming every token: ``SPRBOT_COALESCE_TOKENS=1``), and the serving version is switched
``--swaps`` times (``/model use``, then back). The gap between consecutive tokens of the
answers in flight is compared inside the windows from each switch to one second after the
swap, and outside them. The swap's cost to an answer in flight is its delay beyond the median
step inside a window, minus the same measured over as long a steady window just before the
switch (the machine's own noise). Target: under one decode step.

Prints a table and writes JSON (default ``bench/results/retrain.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
sys.path.insert(0, str(BENCH_DIR.parent))

ADMIN = "bench-admin"
CHANNEL = "bench"


def faq_pairs(n: int) -> list[tuple[str, str]]:
    """``n`` FAQ-like pairs whose questions share few words (so none merge as duplicates)."""
    import random

    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ru", "te", "so", "ba", "ne", "vi", "do", "pa", "ze"]

    def word() -> str:
        return "".join(rng.choice(syllables) for _ in range(rng.randint(2, 3)))

    pairs = []
    for _ in range(n):
        a, b, c = word(), word(), word()
        pairs.append(
            (
                f"How do I {a} the {b} {c}?",
                f"Open the {b} panel, choose {a}, then confirm with {c}.",
            )
        )
    return pairs


def sprbot(*args: str, env: dict[str, str]) -> subprocess.Popen:
    exe = shutil.which("sprbot", path=str(Path(sys.executable).parent)) or "sprbot"
    return subprocess.Popen([exe, *args], env=env)


class Stack(NamedTuple):
    """What a bench that drives the real processes works against. (A NamedTuple: the other
    benches load this file by path, unregistered, where a dataclass cannot be built.)"""

    data_dir: Path
    model: str
    env: dict[str, str]  # for the sprbot processes it starts
    settings: Any
    client: Any
    bus: Any
    admin: Any  # a console admin's CommandContext, for /faq add, /retrain, /model use


@contextmanager
def bench_stack(prefix: str, model: str | None, **settings: str) -> Iterator[Stack]:
    """A temporary data dir with its embedded Redis, the SPRBOT_ settings of the processes a
    bench starts (``settings`` on top of greedy, quiet defaults; also set in this process), and
    an admin's command context. ``model`` None: the demo's SmolLM2, imported into that dir."""
    import redis

    from bot.bus import Bus
    from bot.commands import CommandContext, Stores
    from bot.config import load_settings
    from bot.connection import EmbeddedRedis
    from bot.memory import ConversationMemory
    from training.jobs import TrainingQueue

    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        data_dir = Path(tmp) / "data"
        if model is None:
            from bot.demo import DEMO_NAME, demo_gguf
            from inference.gguf import import_gguf

            model = str(import_gguf(demo_gguf(), data_dir=data_dir, name=DEMO_NAME))
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "SPRBOT_DATA_DIR": str(data_dir),
            "SPRBOT_MODEL": str(model),
            "SPRBOT_CONSOLE_ADMINS": ADMIN,
            "SPRBOT_DO_SAMPLE": "false",
            "SPRBOT_LOG_LEVEL": "WARNING",
            "SPRBOT_METRICS_PORT": "0",  # the workers would contend for the default port
            **settings,
        }
        os.environ.update({k: v for k, v in env.items() if k.startswith(("SPRBOT_", "HF_"))})
        server = EmbeddedRedis(data_dir)
        server.ensure_running()
        try:
            loaded = load_settings()
            client = redis.Redis.from_url(server.url)
            stores = Stores.build(loaded, client, training=TrainingQueue(client, loaded))
            admin = CommandContext(
                "console-bench", "console/bench", ADMIN, ConversationMemory(client), stores=stores
            )
            bus = Bus(client, max_backlog=4096)
            yield Stack(data_dir, str(model), env, loaded, client, bus, admin)
        finally:
            server.stop()


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate the bench's processes, killing any that does not exit within a minute."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def heartbeat_version(client: Any, pid: int) -> str | None:
    return heartbeat_field(client, pid, "version")


def heartbeat_field(client: Any, pid: int, field: str) -> str | None:
    from inference.worker import WORKER_PREFIX

    for key in client.scan_iter(WORKER_PREFIX + "*"):
        if key.decode().endswith(f"-{pid}"):
            value = client.hget(key, field)
            return value.decode() if value else None
    return None


def wait_for(predicate, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")
        time.sleep(0.02)
    return time.perf_counter()


class Load:
    """Conversations asking one question after another; the arrival time of every token."""

    def __init__(self, bus: Any, concurrency: int) -> None:
        self.bus = bus
        self.concurrency = concurrency
        self.arrivals: dict[str, list[float]] = {}
        self.stop = threading.Event()
        self.answered = 0
        self.errors: list[str] = []

    def run(self) -> None:
        from bot.schemas import ChatRequest, DeltaEvent, ErrorEvent, FinalEvent

        asked = 0
        open_ids: set[str] = set()

        def ask() -> None:
            nonlocal asked
            asked += 1
            request = ChatRequest(
                id=f"load-{os.getpid()}-{asked}",
                channel=CHANNEL,
                conversation=f"load/{asked}",
                user_id="u",
                text=f"Tell me about office number {asked} and its badges, in detail.",
            )
            self.arrivals[request.id] = [time.perf_counter()]
            open_ids.add(request.id)
            self.bus.submit(request)

        for _ in range(self.concurrency):
            ask()
        while open_ids:
            replies = self.bus.read_replies(CHANNEL, "bench", count=256, block_ms=1000)
            now = time.perf_counter()
            for reply in replies:
                event = reply.event
                if event.request_id not in open_ids:
                    continue
                if isinstance(event, DeltaEvent):
                    self.arrivals[event.request_id].append(now)
                elif isinstance(event, FinalEvent | ErrorEvent):
                    open_ids.discard(event.request_id)
                    if isinstance(event, ErrorEvent):
                        self.errors.append(event.text)
                    self.answered += 1
                    if not self.stop.is_set():
                        ask()
            if replies:
                self.bus.ack_replies(CHANNEL, *(r.entry_id for r in replies))

    def gaps(self, windows: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
        """Token-to-token gaps (after each answer's first token) inside and outside windows."""
        inside, outside = [], []
        for times in self.arrivals.values():
            for a, b in zip(times[1:-1], times[2:], strict=False):
                hit = any(a < end and b > start for start, end in windows)
                (inside if hit else outside).append(b - a)
        return inside, outside

    def excess(self, window: tuple[float, float], step: float) -> float:
        """Mean delay beyond the median step that the answers streaming in ``window`` took
        there: the sum of each one's excess gaps, averaged over those answers."""
        start, end = window
        per_answer = []
        for times in self.arrivals.values():
            gaps = [
                b - a for a, b in zip(times[1:-1], times[2:], strict=False) if a < end and b > start
            ]
            if gaps:
                per_answer.append(sum(max(0.0, g - step) for g in gaps))
        return statistics.mean(per_answer) if per_answer else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="tiny, small or base (init-tiny)")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--swaps", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "retrain.json"))
    args = parser.parse_args(argv)

    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_inference", BENCH_DIR / "inference.py")
    bench_inference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_inference)
    model = bench_inference.model_dir(args.size)

    from bot.bus import reply_stream
    from bot.commands import dispatch
    from bot.registry import BASE, ModelRegistry
    from bot.schemas import parse_reply

    results: dict[str, Any] = {"args": vars(args), "model": str(model)}
    with bench_stack(
        "sprbot-bench-retrain-",
        str(model),
        SPRBOT_FAQ_EMBEDDINGS="off",
        SPRBOT_FAQ_GROUNDING="off",
        SPRBOT_MAX_NEW_TOKENS=str(args.new_tokens),
        SPRBOT_COALESCE_TOKENS="1",
    ) as stack:
        data_dir, env, client, bus, admin = (
            stack.data_dir,
            stack.env,
            stack.client,
            stack.bus,
            stack.admin,
        )
        procs: list[subprocess.Popen] = []
        try:
            inference = sprbot("worker", "inference", env=env)
            procs.append(inference)
            wait_for(lambda: heartbeat_version(client, inference.pid), 600, "the worker start")

            for question, answer in faq_pairs(args.pairs):
                dispatch(f"/faq add {question} | {answer}", admin)
            started = time.perf_counter()
            reply = dispatch("/retrain", admin)
            if not reply.startswith("Retraining started: job "):
                raise RuntimeError(reply)
            job_id = reply.split("job ", 1)[1].split(" ", 1)[0]
            trainer = sprbot("worker", "train", "--burst", env=env)
            procs.append(trainer)
            final = None
            last = "0"
            stream = reply_stream(admin.channel)
            while final is None:
                for _, entries in client.xread({stream: last}, block=1000) or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        event = parse_reply(fields[b"data"])
                        if event.request_id == job_id and event.kind in ("final", "error"):
                            final = event
                if trainer.poll() is not None and final is None and trainer.returncode:
                    raise RuntimeError("the training worker failed")
            reported = time.perf_counter()
            if final.kind == "error":
                raise RuntimeError(final.text)
            registry = ModelRegistry(client, data_dir)
            version = registry.versions()[-1].version
            record = registry.get(version)
            promoted = record.metrics["gate"]["passed"]
            if not promoted:  # as an admin would: /model use it, to measure load and swap
                dispatch(f"/model use {version}", admin)
            serving = wait_for(
                lambda: heartbeat_version(client, inference.pid) == version, 600, "the swap"
            )
            timings = record.metrics["timings"]
            phases = {
                "snapshot_s": timings["snapshot"],
                "measure_serving_s": timings["measure serving"],
                "train_s": timings["fine-tuning"],
                "measure_candidate_s": timings["measure candidate"],
                "load_and_swap_s": serving - reported,
                "total_s": serving - started,
            }
            results["retrain"] = {
                "version": version,
                "gate_passed": promoted,
                "gate_reason": record.metrics["gate"]["reason"],
                "faq_recall": record.metrics["candidate"]["faq_recall"],
                "faq_rows": record.metrics["candidate"]["faq_rows"],
                "train_tokens_per_second": record.metrics["train"].get("train_tokens_per_second"),
                "phases": phases,
            }

            load = Load(bus, args.concurrency)
            loader = threading.Thread(target=load.run, daemon=True)
            loader.start()
            time.sleep(5)  # steady state before the first switch
            clock = time.time() - time.perf_counter()  # the worker reports wall time
            loads, swaps = [], []
            for i in range(args.swaps):
                target = BASE if i % 2 == 0 else version
                switched = time.perf_counter()
                dispatch(f"/model use {target}", admin)
                wait_for(
                    lambda t=target: heartbeat_version(client, inference.pid) == t, 600, "swap"
                )
                swapped = float(heartbeat_field(client, inference.pid, "swapped_at")) - clock
                loads.append((switched, swapped))
                swaps.append((swapped, swapped + 1.0))
                time.sleep(max(4.0, 2 * (swapped + 1.0 - switched)))  # steady, for the placebo
            load.stop.set()
            loader.join(timeout=600)
            steady = load.gaps(loads + swaps)[1]
            step = statistics.median(steady)

            def cost(windows: list[tuple[float, float]]) -> dict[str, Any]:
                inside = load.gaps(windows)[0]
                # The same windows' length just before each switch, in steady state: what the
                # machine's own noise costs an answer over that long.
                placebo = [(a - (b - a) - 0.5, a - 0.5) for a, b in windows]
                excess = statistics.mean(load.excess(w, step) for w in windows)
                noise = statistics.mean(load.excess(w, step) for w in placebo)
                return {
                    "window_s": [b - a for a, b in windows],
                    "median_ms": statistics.median(inside) * 1e3 if inside else None,
                    "p99_ms": _pct(inside, 99) * 1e3 if inside else None,
                    "max_ms": max(inside) * 1e3 if inside else None,
                    "excess_ms": excess * 1e3,
                    "steady_excess_ms": noise * 1e3,
                    "added_steps": (excess - noise) / step,
                }

            results["swap"] = {
                "concurrency": args.concurrency,
                "answers": load.answered,
                "errors": load.errors,
                "median_step_ms": step * 1e3,
                "steady_p99_ms": _pct(steady, 99) * 1e3,
                "steady_max_ms": max(steady) * 1e3,
                "load": cost(loads),  # from the switch to the swap: the background load
                "swap": cost(swaps),  # the swap and the second after it
            }
        finally:
            stop(procs)

    r, s = results["retrain"], results["swap"]
    print(f"/retrain on {args.pairs} FAQ pairs, {args.size} model, promoted {r['version']}")
    print(f"{'phase':18} {'seconds':>8}")
    print("-" * 27)
    for name, value in r["phases"].items():
        print(f"{name.removesuffix('_s'):18} {value:8.1f}")
    print(
        f"gate: {'passed' if r['gate_passed'] else 'NOT passed'} ({r['gate_reason']}); "
        f"FAQ recall {r['faq_recall']}/{r['faq_rows']}"
    )
    print()
    print(f"hot swap under load: {s['concurrency']} conversations, {args.swaps} switches")
    print(f"{'token gap, ms':26} {'median':>8} {'p99':>8} {'max':>8} {'added steps':>12}")
    print("-" * 66)
    print(
        f"{'steady':26} {s['median_step_ms']:8.1f} {s['steady_p99_ms']:8.1f} "
        f"{s['steady_max_ms']:8.1f}"
    )
    for name, label in (("load", "loading (switch..swap)"), ("swap", "swap (swap..swap + 1 s)")):
        c = s[name]
        if c["max_ms"] is not None:
            print(
                f"{label:26} {c['median_ms']:8.1f} {c['p99_ms']:8.1f} {c['max_ms']:8.1f} "
                f"{c['added_steps']:12.2f}"
            )
    print(
        f"added steps: delay beyond the median step per answer in flight, less the same over "
        f"as long a steady window; {s['answers']} answers, {len(s['errors'])} errors"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


if __name__ == "__main__":
    sys.exit(main())
