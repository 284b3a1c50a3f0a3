"""The inference worker: reads chat requests from the bus, answers them with one ``Chatbot``.

``sprbot worker inference`` builds one of these. It serves many conversations at once through
the continuous-batching ``Scheduler``: new requests join the running batch between decode
steps. Deltas are coalesced (every few tokens or a quarter second) so adapters are not
flooded. A request is acknowledged only with its final reply (``Bus.finish``); a worker that
dies leaves its requests pending, and another worker reclaims them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import redis

from bot.bus import FAILED_MESSAGE, Bus, Delivery
from bot.memory import ConversationMemory
from inference.batching import Scheduler
from inference.chatbot import Chatbot, IncrementalDecoder
from inference.config import GenerationConfig
from inference.errors import EmptyQueryError, PromptTooLongError

log = logging.getLogger(__name__)

WORKER_PREFIX = "sprbot:worker:"


@dataclass
class WorkerOptions:
    max_batch: int = 8
    max_prompt_tokens: int = 1536  # history is trimmed to fit; a longer message is refused
    reclaim_idle_ms: int = 300_000  # longer than the longest legitimate generation
    coalesce_tokens: int = 8
    coalesce_s: float = 0.25
    heartbeat_s: float = 2.0
    drain_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish


@dataclass
class _Sequence:
    delivery: Delivery
    decoder: IncrementalDecoder
    pending: str = ""
    pending_tokens: int = 0
    last_emit: float = 0.0


class InferenceWorker:
    def __init__(
        self,
        chatbot: Chatbot,
        bus: Bus,
        memory: ConversationMemory,
        *,
        generation: GenerationConfig,
        options: WorkerOptions | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.chatbot = chatbot
        self.bus = bus
        self.memory = memory
        self.generation = generation
        self.options = options or WorkerOptions()
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.scheduler = Scheduler(chatbot, self.options.max_batch)
        self.sequences: dict[str, _Sequence] = {}
        self.served = 0
        self.started_at = time.time()
        self._last_heartbeat = 0.0
        self._last_reclaim = 0.0

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then finish what is in flight (up to ``drain_s``)."""
        log.info("worker %s serving %s", self.id, self.chatbot.info()["model"])
        while not stop.is_set():
            self.poll()
        deadline = time.monotonic() + self.options.drain_s
        while self.sequences and time.monotonic() < deadline:
            self.step()
        if self.sequences:
            log.warning(
                "worker %s stopping with %d requests unfinished: another worker will reclaim them",
                self.id,
                len(self.sequences),
            )
        self.redis.delete(WORKER_PREFIX + self.id)

    @property
    def redis(self) -> redis.Redis:
        return self.bus.redis

    def poll(self) -> None:
        """Admit new work if there is room, then run one decode step."""
        now = time.monotonic()
        room = self.scheduler.room
        if room:
            # Block only when idle: with sequences running, the next decode step must not wait.
            block = None if self.sequences else 500
            deliveries = self.bus.read_requests(self.id, count=room, block_ms=block)
            if now - self._last_reclaim > min(5.0, self.options.reclaim_idle_ms / 2000):
                self._last_reclaim = now
                deliveries += self.bus.reclaim(
                    self.id, self.options.reclaim_idle_ms, count=self.scheduler.room
                )
            for delivery in deliveries:
                self.admit(delivery)
        if self.sequences:
            self.step()
        if now - self._last_heartbeat > self.options.heartbeat_s:
            self.heartbeat()

    def admit(self, delivery: Delivery) -> None:
        request = delivery.request
        if request.id in self.sequences:  # reclaimed from ourselves while still running
            return
        try:
            prompt_ids, config = self.prompt(request.conversation, request.text)
        except (PromptTooLongError, EmptyQueryError) as exc:
            self.bus.fail(
                delivery,
                "too_long" if isinstance(exc, PromptTooLongError) else "failed",
                f"Sorry, {exc}",
            )
            return
        self.scheduler.add(request.id, prompt_ids, config)
        self.sequences[request.id] = _Sequence(
            delivery, IncrementalDecoder(self.chatbot.tokenizer), last_emit=time.monotonic()
        )

    def prompt(self, conversation: str, text: str) -> tuple[list[int], GenerationConfig]:
        """The prompt for ``text`` after the conversation's remembered turns, oldest turns
        dropped until it fits ``max_prompt_tokens``."""
        history = self.memory.turns(conversation)
        limit = min(self.options.max_prompt_tokens, self.chatbot.context_length - 1)
        while True:
            messages = [*history, {"role": "user", "content": text}]
            prompt_ids, config = self.chatbot.prepare(messages, self.generation)
            if len(prompt_ids) <= limit:
                return prompt_ids, config
            if not history:
                raise PromptTooLongError(len(prompt_ids), limit)
            history = history[2:]

    def step(self) -> None:
        try:
            produced = self.scheduler.step()
        except Exception:
            log.exception("decode step failed; failing the %d requests in it", len(self.sequences))
            for request_id in list(self.sequences):
                self.scheduler.cancel(request_id)
                self.bus.fail(self.sequences.pop(request_id).delivery, "failed", FAILED_MESSAGE)
            return
        now = time.monotonic()
        deltas, finals = [], []
        for request_id, token in produced:
            seq = self.sequences[request_id]
            if token is None:
                piece = seq.decoder.flush()
                if piece or seq.pending:
                    deltas.append(seq.delivery.delta(seq.pending + piece))
                finals.append((seq.delivery, seq.decoder.text))
                del self.sequences[request_id]
                continue
            seq.pending += seq.decoder.push(token)
            seq.pending_tokens += 1
            due = now - seq.last_emit >= self.options.coalesce_s
            if seq.pending and (seq.pending_tokens >= self.options.coalesce_tokens or due):
                deltas.append(seq.delivery.delta(seq.pending))
                seq.pending, seq.pending_tokens, seq.last_emit = "", 0, now
        if finals:
            written = self.bus.finish_many(finals, events=deltas)
            for (delivery, text), fresh in zip(finals, written, strict=True):
                if fresh:
                    request = delivery.request
                    self.memory.append(request.conversation, request.text, text)
                    self.served += 1
        elif deltas:
            self.bus.emit(*deltas)

    def heartbeat(self) -> None:
        self._last_heartbeat = time.monotonic()
        info = self.chatbot.info()
        stats = self.bus.stats()
        key = WORKER_PREFIX + self.id
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            key,
            mapping={
                "id": self.id,
                "model": str(info["model"]),
                "backend": info["backend"],
                "dtype": info["dtype"],
                "batch": self.scheduler.active,
                "max_batch": self.scheduler.max_batch,
                "served": self.served,
                "queue_lag": stats.backlog - stats.pending,
                "started_at": self.started_at,
                "updated_at": time.time(),
            },
        )
        pipe.expire(key, max(10, int(self.options.heartbeat_s * 5)))
        pipe.execute()
