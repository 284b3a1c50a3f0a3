"""Aggregate decode speed through the inference worker: the bus, the worker and its
continuous-batching scheduler, as a user's message travels. Called by
``bench/inference.py --concurrency 1,8``; not a script of its own.

One worker process (``InferenceWorker`` on the embedded Redis of a temporary data dir, bf16,
greedy, EOS ignored so every answer is exactly ``new_tokens`` long) and this process as the
adapter: at each concurrency C it submits C requests at once, on C conversations, and reads
the reply stream until C finals. Reported per C (median of the rounds):

- ``wall_tok_s``: every generated token over the round's wall time, prompts and the bus
  included: the throughput users get. llama-server's ``wall_tok_s`` is measured the same way.
- ``decode_tok_s``: tokens after the first, summed over the requests, over the longest of
  their own decode windows (first token to final). This is llama-server's aggregate
  (``sum(predicted_n - 1) / max(predicted_ms)``, from its own per-slot timings), so the two
  compare like for like. Requests that reach the worker one step apart are admitted in two
  steps; the later prompts are then evaluated inside the first one's window, as llama-server
  does with a slot whose prompt arrives late.
- ``first_token_s``: submit to the first delta (the worker sends the first token at once).

The join: C-1 requests run; once every one of them has streamed, one more is submitted. Its
first-token time is reported in decode steps of the running batch (a step is the running
requests' mean time per token): the target is within 3.
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the worker process: keep bench/ (it has an inference.py) off the path
    _BENCH = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _BENCH]
    sys.path.insert(0, str(_BENCH.parent))

CHANNEL = "bench"


def _serve(path: str, dtype: str, threads: int, max_batch: int, new_tokens: int, url: str):
    """The worker process: the real ``InferenceWorker`` with EOS switched off, until SIGTERM."""
    import redis
    import torch

    from bot.bus import Bus
    from bot.memory import ConversationMemory
    from inference import GenerationConfig, MixedPrecisionConfig, PipelineConfig, build_chatbot
    from inference.worker import InferenceWorker, WorkerOptions

    torch.set_num_threads(threads)
    bus = Bus(redis.Redis.from_url(url), max_backlog=1024)
    chatbot = build_chatbot(
        PipelineConfig(
            model_name_or_path=path,
            device="cpu",
            optimization_config=MixedPrecisionConfig(dtype=dtype, force=True),
        )
    )
    chatbot.eos_token_ids = set()
    worker = InferenceWorker(
        chatbot,
        bus,
        ConversationMemory(bus.redis, ttl_s=3600),
        generation=GenerationConfig(do_sample=False, max_new_tokens=new_tokens),
        options=WorkerOptions(max_batch=max_batch),
        worker_id="bench",
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker.run(stop)


def _round(bus: Any, texts: list[str], join_text: str | None = None) -> dict[str, Any]:
    """Submit ``texts`` at once (and ``join_text`` once all of them stream); time each reply."""
    from bot.schemas import ChatRequest, DeltaEvent, FinalEvent

    run = uuid.uuid4().hex[:8]

    def submit(i: int, text: str) -> tuple[str, float]:
        request = ChatRequest(
            id=f"bench-{run}-{i}",
            channel=CHANNEL,
            conversation=f"bench/{run}/{i}",  # fresh conversations: no memory in the prompt
            user_id="bench",
            text=text,
        )
        sent = time.perf_counter()
        result = bus.submit(request)
        if not result.accepted:
            raise RuntimeError(f"the bus refused a benchmark request: {result}")
        return request.id, sent

    sent = dict(submit(i, t) for i, t in enumerate(texts))
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    joiner = None
    expected = len(texts) + (join_text is not None)
    last_reply = time.perf_counter()
    while len(done) < expected:
        # Short blocks: redis-py's default socket timeout (5 s) would cut a longer one.
        replies = bus.read_replies(CHANNEL, "bench", count=256, block_ms=1000)
        now = time.perf_counter()
        if not replies:
            if now - last_reply > 300:
                raise TimeoutError("no reply from the worker for 300 s")
            continue
        last_reply = now
        for reply in replies:
            event = reply.event
            if isinstance(event, DeltaEvent):
                first.setdefault(event.request_id, now)
            elif isinstance(event, FinalEvent):
                first.setdefault(event.request_id, now)
                done[event.request_id] = now
            else:
                raise RuntimeError(f"the worker answered with {event!r}")
        bus.ack_replies(CHANNEL, *(r.entry_id for r in replies))
        if join_text is not None and joiner is None and len(first) == len(texts):
            joiner, joined_at = submit(len(texts), join_text)
            sent[joiner] = joined_at
    running = [r for r in sent if r != joiner]
    result = {
        "wall_s": max(done[r] for r in running) - min(sent[r] for r in running),
        "decode_window_s": max(done[r] - first[r] for r in running),
        "first_token_s": statistics.median(first[r] - sent[r] for r in running),
        # > 0: the requests were not all admitted in one step, and the later ones' prompts
        # were evaluated inside the earlier ones' decode window
        "first_token_spread_s": max(first[r] for r in running) - min(first[r] for r in running),
    }
    if joiner is not None:
        result["join_first_token_s"] = first[joiner] - sent[joiner]
    return result


def measure(
    path: Path,
    concurrencies: list[int],
    *,
    prompt_text: str,
    new_tokens: int,
    threads: int,
    repeats: int,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """Aggregate tokens/s at each concurrency, and the mid-generation join, through a worker."""
    import redis

    from bot.bus import Bus
    from bot.connection import EmbeddedRedis

    max_batch = max(concurrencies)
    with tempfile.TemporaryDirectory(prefix="sprbot-bench-serving-") as data_dir:
        server = EmbeddedRedis(Path(data_dir))
        url = server.ensure_running()
        args = [str(path), dtype, str(threads), str(max_batch), str(new_tokens), url]
        worker = subprocess.Popen([sys.executable, __file__, *args])
        bus = Bus(redis.Redis.from_url(url), max_backlog=1024)
        try:
            # Distinct prompts of the same length: each conversation is its own sequence.
            texts = [f"{i} {prompt_text}" for i in range(max_batch + 1)]
            _round(bus, texts[:1])  # warm-up: loading, packing, first allocations
            rows = {}
            for c in concurrencies:
                rounds = [_round(bus, texts[:c]) for _ in range(repeats)]
                rows[c] = {
                    "concurrency": c,
                    "wall_tok_s": statistics.median(c * new_tokens / r["wall_s"] for r in rounds),
                    "decode_tok_s": statistics.median(
                        c * (new_tokens - 1) / r["decode_window_s"] for r in rounds
                    ),
                    "first_token_s": statistics.median(r["first_token_s"] for r in rounds),
                    "rounds": rounds,
                }
            joins = [
                _round(bus, texts[: max_batch - 1], join_text=texts[max_batch])
                for _ in range(repeats)
            ]
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=120)
            except subprocess.TimeoutExpired:
                worker.kill()
            server.stop()
    base = rows[min(concurrencies)]["wall_tok_s"]
    for row in rows.values():
        row["vs_lowest_concurrency"] = row["wall_tok_s"] / base
    join_steps = [
        # a step of the running batch: its decode window over the tokens each sequence made
        j["join_first_token_s"] / (j["decode_window_s"] / (new_tokens - 1))
        for j in joins
    ]
    return {
        "dtype": dtype,
        "threads": threads,
        "new_tokens": new_tokens,
        "max_batch": max_batch,
        "concurrency": list(rows.values()),
        "join": {
            "running": max_batch - 1,
            "first_token_s": statistics.median(j["join_first_token_s"] for j in joins),
            "steps": statistics.median(join_steps),
            "steps_runs": [round(s, 2) for s in join_steps],
        },
    }


if __name__ == "__main__":
    path, dtype, threads, max_batch, new_tokens, url = sys.argv[1:]
    _serve(path, dtype, int(threads), int(max_batch), int(new_tokens), url)
