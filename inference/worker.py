"""The inference worker: reads chat requests from the bus, answers them with one ``Chatbot``.

``sprbot worker inference`` builds one of these. It serves many conversations at once through
the continuous-batching ``Scheduler``: new requests join the running batch between decode
steps. Deltas are coalesced (every few tokens or a quarter second) so adapters are not
flooded. A request is acknowledged only with its final reply (``Bus.finish``); a worker that
dies leaves its requests pending, and another worker reclaims them.

A request that carries its own ``history`` (the web API, whose client keeps the conversation)
is answered from those turns instead of the conversation memory, and is not remembered; its
``generation`` options (token limit, temperature, top_p) apply to it alone, the token limit
capped at the worker's. Each final reply carries the token ``usage``.

FAQ grounding (``WorkerOptions.faq_grounding``): each new question is compared with the
approved FAQ entries. At cosine >= ``faq_threshold`` the entry's answer is the reply,
prefixed ``From the team FAQ:``, streamed and finished like any other; below it, the
``faq_context`` closest entries go into the system message, the closest last, and the answer
is decoded without the repetition penalty. Hits are counted in
``sprbot:faq:stats`` for ``sprbot status``.

Hot reload: with a ``ModelRegistry`` and a loader, the worker follows the serving version. It
subscribes to ``sprbot:events:model`` (and checks ``sprbot:model:current`` at each heartbeat,
for an event missed while disconnected), loads the new version in a background thread, and
swaps it in between two decode steps of the main loop. The swap semantics: requests admitted
after the swap run on the new version; requests already decoding finish on the version they
started with, which stays loaded until its last one ends (so an answer never changes model
half-way, none is restarted, failed or dropped, and none waits for the load). While both
serve, each loop iteration steps both batches. A version that fails to load is reported in
the heartbeat (``load_error``) and the worker keeps serving what it has; announcing the
version again (``/model use``) retries.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import redis

from bot.bus import FAILED_MESSAGE, Bus, Delivery
from bot.connection import reconnect_delay
from bot.faq import Exchange, FaqEntry, FaqStore
from bot.logs import request_context
from bot.memory import ConversationMemory
from bot.metrics import WORKER_PREFIX, WorkerMeter
from bot.registry import BASE, EVENTS, ModelRegistry, parse_event
from bot.schemas import FinalEvent, GenerationOptions, Turn, Usage
from inference.batching import Scheduler
from inference.chatbot import Chatbot, IncrementalDecoder, build_chatbot
from inference.config import GenerationConfig, LoadingModelConfig, PipelineConfig
from inference.errors import EmptyQueryError, PromptTooLongError
from inference.loading import ChildLoadFailed, background_priority, load_in_child
from inference.templates import DEFAULT_SYSTEM_PROMPT

log = logging.getLogger(__name__)

# How often the worker looks for answers whose asker went away: one Redis round trip.
CANCEL_CHECK_S = 0.5
CANCELLED_MESSAGE = "Stopped: the asker went away."

FAQ_PREFIX = "From the team FAQ: "
GREEDY_BELOW_TEMPERATURE = 1e-4


@dataclass
class WorkerOptions:
    max_batch: int = 8
    max_prompt_tokens: int = 1536  # history is trimmed to fit; a longer message is refused
    reclaim_idle_ms: int = 300_000  # above a few heartbeats: each one touches what it holds
    coalesce_tokens: int = 8
    coalesce_s: float = 0.25
    heartbeat_s: float = 2.0
    drain_s: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    faq_grounding: bool = False  # answer close questions from the FAQ, give the rest context
    faq_threshold: float = 0.85  # cosine at which the FAQ answers instead of the model
    faq_context: int = 3  # closest entries put into the prompt below the threshold
    faq_context_floor: float = 0.3  # less similar entries are not worth their prompt tokens
    answered_ttl_s: int = 7 * 86_400  # how long a 👍 or a correction can name an answer


@dataclass
class _Engine:
    """One loaded model version and the scheduler that decodes with it."""

    version: str
    chatbot: Chatbot
    scheduler: Scheduler


@dataclass
class _Sequence:
    delivery: Delivery
    decoder: IncrementalDecoder
    engine: _Engine
    pending: str = ""
    pending_tokens: int = 0
    last_emit: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    max_new_tokens: int = 0  # reaching it means the answer was cut short
    shown: bool = False  # its first text went out: time to first token is measured


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
        faq: FaqStore | None = None,
        registry: ModelRegistry | None = None,
        loader: Callable[[str], Chatbot] | None = None,
        version: str = BASE,
    ) -> None:
        """``faq``: the FAQ store, for grounding (when ``options.faq_grounding``) and to
        remember answers for feedback. ``registry`` and ``loader`` (a version name to a
        loaded ``Chatbot``, see ``version_loader``): follow the serving version; ``version``
        names the one ``chatbot`` is."""
        self.bus = bus
        self.memory = memory
        self.generation = generation
        self.options = options or WorkerOptions()
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.faq = faq
        self.registry = registry
        self.loader = loader
        # The serving engine is the last; earlier ones finish what they hold, then go.
        self.engines = [_Engine(version, chatbot, Scheduler(chatbot, self.options.max_batch))]
        self.sequences: dict[str, _Sequence] = {}
        self.served = 0
        self.meter = WorkerMeter()
        self.started_at = time.time()
        self.swapped_at = 0.0  # wall time of the last hot swap (0: none yet)
        self._last_heartbeat = 0.0
        self._last_reclaim = 0.0
        self._last_cancel_check = 0.0
        # Finals that Redis did not take (it was restarting): written again once it is back.
        self._unsettled: list[tuple[list[tuple[Delivery, FinalEvent]], list, str]] = []
        # Hot reload, shared with the event and loader threads under _lock.
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._wanted: str | None = None
        self._failed: str | None = None
        self._ready: _Engine | None = None
        self.loading = ""
        self.load_error = ""

    @property
    def engine(self) -> _Engine:
        """The engine new requests go to."""
        return self.engines[-1]

    @property
    def chatbot(self) -> Chatbot:
        return self.engine.chatbot

    @property
    def scheduler(self) -> Scheduler:
        return self.engine.scheduler

    @property
    def version(self) -> str:
        return self.engine.version

    def health(self) -> dict[str, object]:
        """The model check of ``/healthz``: which version serves, and any load under way."""
        return {
            "ok": True,
            "version": self.version,
            "model": str(self.chatbot.config.model_name_or_path),
            "loading": self.loading or None,
            "load_error": self.load_error or None,
        }

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set, then finish what is in flight (up to ``drain_s``)."""
        log.info("worker %s serving %s (%s)", self.id, self.chatbot.info()["model"], self.version)
        threads = []
        if self.registry is not None and self.loader is not None:
            threads = [
                threading.Thread(target=target, args=(stop,), name=name, daemon=True)
                for target, name in (
                    (self._watch_models, "sprbot-model-events"),
                    (self._load_models, "sprbot-model-loader"),
                )
            ]
            for thread in threads:
                thread.start()
        failures = 0
        while not stop.is_set():
            try:
                self.poll()
                failures = 0
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                # Redis restarts or is unreachable (redis-py has already retried for a couple
                # of seconds): what this worker holds stays pending there, so wait and go on.
                failures += 1
                delay = reconnect_delay(failures)
                log.warning(
                    "worker %s: Redis unreachable (%s); retrying in %.1fs", self.id, exc, delay
                )
                stop.wait(delay)
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
        self.bus.retire(self.id)
        self._wake.set()
        for thread in threads:
            thread.join(timeout=2)  # a load in progress is abandoned with the daemon thread

    @property
    def redis(self) -> redis.Redis:
        return self.bus.redis

    def poll(self) -> None:
        """Swap in a loaded version, admit new work if there is room, run one decode step."""
        if self._ready is not None:
            self._swap()
        while self._unsettled:
            self._finish(*self._unsettled[0])
            self._unsettled.pop(0)
        now = time.monotonic()
        if self.sequences and now - self._last_cancel_check > CANCEL_CHECK_S:
            self._last_cancel_check = now
            self._drop_cancelled()
        room = min(self.options.max_batch - len(self.sequences), self.scheduler.room)
        if room > 0:
            deliveries: list[Delivery] = []
            if now - self._last_reclaim > min(5.0, self.options.reclaim_idle_ms / 2000):
                self._last_reclaim = now
                # Reclaimed requests first: they have waited longest, and under steady load
                # new ones would otherwise fill every free slot and keep them waiting.
                deliveries = self.bus.reclaim(self.id, self.options.reclaim_idle_ms, count=room)
            if len(deliveries) < room:
                # Block only when idle: with sequences running, the next decode step must not
                # wait.
                block = None if self.sequences or deliveries else 500
                deliveries += self.bus.read_requests(
                    self.id, count=room - len(deliveries), block_ms=block
                )
            grounding = self.ground(deliveries)
            for delivery in deliveries:
                with request_context(delivery.request.id):
                    self.admit(delivery, grounding.get(delivery.request.id))
        if self.sequences:
            self.step()
        if now - self._last_heartbeat > self.options.heartbeat_s:
            self.heartbeat()

    def ground(
        self, deliveries: Sequence[Delivery]
    ) -> dict[str, tuple[FaqEntry | None, list[FaqEntry]]]:
        """Per request id: the FAQ entry that answers it (cosine >= ``faq_threshold``), or
        the entries to give the model as context. All questions are embedded in one batch."""
        fresh = [d for d in deliveries if d.request.id not in self.sequences]
        if self.faq is None or not self.options.faq_grounding or not fresh:
            return {}
        opts = self.options
        try:
            matches = self.faq.match([d.request.text for d in fresh], k=max(1, opts.faq_context))
        except Exception:
            # The FAQ helps; it must never stop the model from answering.
            log.exception("FAQ lookup failed; answering %d requests without it", len(fresh))
            return {}
        out: dict[str, tuple[FaqEntry | None, list[FaqEntry]]] = {}
        hits = context = 0
        for delivery, found in zip(fresh, matches, strict=True):
            if found and found[0][1] >= opts.faq_threshold:
                out[delivery.request.id] = (found[0][0], [])
                hits += 1
                continue
            close = [e for e, score in found[: opts.faq_context] if score >= opts.faq_context_floor]
            if close:
                out[delivery.request.id] = (None, close)
                context += 1
        try:
            self.faq.count_grounding(asked=len(fresh), hits=hits, context=context)
        except redis.RedisError:
            log.warning("could not count FAQ hits", exc_info=True)
        return out

    def admit(
        self, delivery: Delivery, grounding: tuple[FaqEntry | None, list[FaqEntry]] | None = None
    ) -> None:
        request = delivery.request
        if request.id in self.sequences:  # reclaimed from ourselves while still running
            return
        hit, context = grounding or (None, [])
        if hit is not None:
            text = FAQ_PREFIX + hit.answer
            delta = delivery.delta(text)
            usage = Usage(
                prompt_tokens=self._count_tokens(request.text),
                completion_tokens=self._count_tokens(text),
            )
            self._finish([(delivery, delivery.final(text, usage=usage))], [delta], source="faq")
            return
        try:
            prompt_ids, config = self.prompt(
                request.conversation,
                request.text,
                context,
                history=request.history,
                options=request.generation,
            )
        except (PromptTooLongError, EmptyQueryError) as exc:
            self.bus.fail(
                delivery,
                "too_long" if isinstance(exc, PromptTooLongError) else "failed",
                f"Sorry, {exc}",
            )
            return
        except Exception as exc:
            # A client-given history the chat template refuses (roles that do not alternate,
            # say): that request fails, the worker goes on.
            log.warning("cannot build the prompt of %s: %s", request.id, exc)
            self.bus.fail(delivery, "failed", f"Sorry, I cannot read this conversation: {exc}")
            return
        engine = self.engine
        engine.scheduler.add(request.id, prompt_ids, config)
        self.sequences[request.id] = _Sequence(
            delivery,
            IncrementalDecoder(engine.chatbot.tokenizer),
            engine,
            last_emit=0.0,  # the first token goes out at once: coalescing starts after it
            prompt_tokens=len(prompt_ids),
            max_new_tokens=config.max_new_tokens,
        )

    def _count_tokens(self, text: str) -> int:
        return len(self.chatbot.tokenizer(text, add_special_tokens=False).input_ids)

    def prompt(
        self,
        conversation: str,
        text: str,
        faq: Sequence[FaqEntry] = (),
        *,
        history: Sequence[Turn] | None = None,
        options: GenerationOptions | None = None,
    ) -> tuple[list[int], GenerationConfig]:
        """The prompt for ``text`` after the conversation's turns (``history`` when the client
        gave them, else the remembered ones), oldest turns dropped until it fits
        ``max_prompt_tokens`` (then the least close FAQ entries). ``faq`` entries go into the
        system message as reference, after the client's own system messages if any."""
        if history is None:
            turns = self.memory.turns(conversation)
        else:
            turns = [t.model_dump() for t in history]
        # Templates take one system message, first: the client's are merged into it.
        given_system = "\n\n".join(t["content"] for t in turns if t["role"] == "system")
        turns = [t for t in turns if t["role"] != "system"]
        generation = self.generation_for(options)
        faq = list(faq)
        limit = min(self.options.max_prompt_tokens, self.chatbot.context_length - 1)
        while True:
            messages = [*turns, {"role": "user", "content": text}]
            system = given_system
            if faq:
                # The closest entry last, next to the question: small models lean on what
                # they read last.
                notes = "\n".join(f"Q: {e.question}\nA: {e.answer}" for e in reversed(faq))
                base = given_system or self.chatbot.config.system_prompt or DEFAULT_SYSTEM_PROMPT
                system = f"{base}\n\nFrom the team's FAQ, use it where it applies:\n{notes}"
            if system:
                messages.insert(0, {"role": "system", "content": system})
            prompt_ids, config = self.chatbot.prepare(messages, generation)
            if len(prompt_ids) <= limit:
                if faq:
                    # The penalty counts the prompt's tokens, so it steers the model away from
                    # the very words of the entry it should repeat: on SmolLM2-135M, 2 of 8
                    # questions in other words carried the key fact with it, 6 of 8 without
                    # (docs/BENCHMARKS.md).
                    config = replace(config, repetition_penalty=1.0)
                return prompt_ids, config
            if turns:
                turns = turns[2:]
            elif faq:
                faq.pop()
            else:
                raise PromptTooLongError(len(prompt_ids), limit)

    def generation_for(self, options: GenerationOptions | None) -> GenerationConfig:
        """The worker's generation settings with a request's own applied: its token limit
        capped at the worker's; temperature (below 1e-4) or top_p 0 decodes greedily, another
        temperature samples."""
        config = self.generation
        if options is None:
            return config
        changes: dict[str, object] = {}
        if options.max_new_tokens is not None:
            changes["max_new_tokens"] = min(options.max_new_tokens, config.max_new_tokens)
        if options.temperature is not None:
            # Below this, logits / temperature overflows to inf in bf16 and fp32 (a fuzzed
            # 3.9e-74 gave a 500); so small a temperature is greedy decoding anyway.
            if options.temperature >= GREEDY_BELOW_TEMPERATURE:
                changes.update(do_sample=True, temperature=options.temperature)
            else:
                changes["do_sample"] = False
        if options.top_p is not None:
            if options.top_p > 0:
                changes["top_p"] = options.top_p
            else:
                changes["do_sample"] = False
        return replace(config, **changes) if changes else config

    def _drop_cancelled(self) -> None:
        """Stop generating answers nobody waits for any more (a web client went away)."""
        for request_id in self.bus.cancelled(list(self.sequences)):
            seq = self.sequences.pop(request_id)
            seq.engine.scheduler.cancel(request_id)
            self.bus.fail(seq.delivery, "cancelled", CANCELLED_MESSAGE)
            log.info("worker %s: %s cancelled by its asker", self.id, request_id)

    def step(self) -> None:
        """One decode step of every engine that has sequences (two during a swap)."""
        deltas, finals = [], []
        firsts = []  # requests whose first text goes out with this step
        for engine in list(self.engines):
            if not engine.scheduler.active:
                continue
            rows, started = engine.scheduler.active, time.perf_counter()
            try:
                produced = engine.scheduler.step()
                tokens = sum(token is not None for _, token in produced)
                self.meter.decode_step(rows, tokens, time.perf_counter() - started)
            except Exception:
                mine = [rid for rid, seq in self.sequences.items() if seq.engine is engine]
                log.exception("decode step failed; failing the %d requests in it", len(mine))
                for request_id in mine:
                    engine.scheduler.cancel(request_id)
                    self.bus.fail(self.sequences.pop(request_id).delivery, "failed", FAILED_MESSAGE)
                continue
            now = time.monotonic()
            for request_id, token in produced:
                seq = self.sequences[request_id]
                if token is None:
                    piece = seq.decoder.flush()
                    if piece or seq.pending:
                        deltas.append(seq.delivery.delta(seq.pending + piece))
                    usage = Usage(
                        prompt_tokens=seq.prompt_tokens, completion_tokens=seq.completion_tokens
                    )
                    final = seq.delivery.final(
                        seq.decoder.text,
                        usage=usage,
                        truncated=seq.completion_tokens >= seq.max_new_tokens,
                    )
                    finals.append((seq.delivery, final))
                    if not seq.shown:
                        firsts.append(seq.delivery.request)
                    del self.sequences[request_id]
                    continue
                seq.pending += seq.decoder.push(token)
                seq.pending_tokens += 1
                seq.completion_tokens += 1
                due = now - seq.last_emit >= self.options.coalesce_s
                if seq.pending and (seq.pending_tokens >= self.options.coalesce_tokens or due):
                    deltas.append(seq.delivery.delta(seq.pending))
                    seq.pending, seq.pending_tokens, seq.last_emit = "", 0, now
                    if not seq.shown:
                        seq.shown = True
                        firsts.append(seq.delivery.request)
        if finals:
            self._finish(finals, deltas)
        elif deltas:
            self.bus.emit(*deltas)
        for request in firsts:
            self.meter.first_text(request, "model")
        if len(self.engines) > 1:
            self._retire()

    def _finish(
        self, finals: list[tuple[Delivery, FinalEvent]], deltas: list, source: str = "model"
    ) -> None:
        """Write the finals; ``source`` (``model`` or ``faq``) labels their latencies."""
        remember = {  # a client that sends the history keeps it itself
            delivery.request.id: self.memory.exchange(
                delivery.request.conversation, delivery.request.text, final.text
            )
            for delivery, final in finals
            if delivery.request.history is None
        }
        try:
            written = self.bus.finish_many(finals, events=deltas, remember=remember)
        except (redis.ConnectionError, redis.TimeoutError):
            # Finishing is idempotent (one final per request id), so ``poll`` simply tries
            # again; otherwise these would wait for the reclaim bound (minutes).
            if not any(item[0] is finals for item in self._unsettled):
                self._unsettled.append((finals, deltas, source))
            raise
        fresh = [(d, event.text) for (d, event), new in zip(finals, written, strict=True) if new]
        for delivery, _ in fresh:
            request = delivery.request
            if source == "faq":  # the whole answer is its first text
                self.meter.first_text(request, source)
            took = self.meter.answered(request, source)
            log.info(
                "answered %s from the %s in %.2fs",
                request.id,
                source,
                took,
                extra={"request_id": request.id, "answer_s": round(took, 3)},
            )
            self.served += 1
        if self.faq is not None and fresh:
            self.faq.remember(
                [Exchange(d.request.text, text, d.request.id) for d, text in fresh],
                self.options.answered_ttl_s,
            )

    def heartbeat(self) -> None:
        self._last_heartbeat = time.monotonic()
        # What this worker holds is alive: not for another worker to reclaim, however long
        # the batch takes.
        self.bus.touch(self.id, [seq.delivery.entry_id for seq in self.sequences.values()])
        if self.registry is not None and self.loader is not None:
            # Catches a promotion whose event this worker missed (it was reconnecting).
            try:
                current = self.registry.current()
                if current != self._wanted:
                    self.want(current, retry=False)
            except redis.RedisError:
                log.warning("could not read the serving version", exc_info=True)
        info = self.chatbot.info()
        stats = self.bus.stats()
        opts = self.options
        grounding = "off"
        if self.faq is not None and opts.faq_grounding:
            grounding = f"on, threshold {opts.faq_threshold:g}, context {opts.faq_context}"
        key = WORKER_PREFIX + self.id
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(
            key,
            mapping={
                "id": self.id,
                "model": str(info["model"]),
                "version": self.version,
                "loading": self.loading,
                "load_error": self.load_error[:300],
                "faq": grounding,
                "backend": info["backend"],
                "dtype": info["dtype"],
                "batch": len(self.sequences),
                "max_batch": self.options.max_batch,
                "served": self.served,
                "queue_lag": stats.backlog - stats.pending,
                "started_at": self.started_at,
                "swapped_at": self.swapped_at,
                "updated_at": time.time(),
                **self.meter.heartbeat_fields(),
            },
        )
        self.meter.serving(self.version, info, len(self.sequences), self.options.max_batch)
        pipe.expire(key, max(10, int(self.options.heartbeat_s * 5)))
        pipe.execute()

    # -- hot reload --------------------------------------------------------------------------

    def want(self, version: str, *, retry: bool = True) -> None:
        """Ask for ``version`` to serve; the loader thread loads it, ``poll`` swaps it in.
        ``retry``: try again even if that version failed to load before."""
        with self._lock:
            if retry and self._failed == version:
                self._failed = None
            self._wanted = version
        self._wake.set()

    def _watch_models(self, stop: threading.Event) -> None:
        """Follow ``promoted <version>`` events, resubscribing after a lost connection."""
        while not stop.is_set():
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(EVENTS)
                while not stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        version = parse_event(message["data"])
                        if version:
                            log.info("worker %s: %s was promoted", self.id, version)
                            self.want(version)
            except (redis.RedisError, OSError):
                log.warning("model events: connection lost; resubscribing", exc_info=True)
                stop.wait(1.0)
            finally:
                pubsub.close()

    def _load_models(self, stop: threading.Event) -> None:
        """Load the wanted version off the main thread; ``poll`` swaps it in."""
        background_priority()  # the version's optimisation and warm-up run here
        while not stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            with self._lock:
                wanted, serving = self._wanted, self.engines[-1].version
                if wanted == serving:
                    self._ready = None  # e.g. rolled back before the new one swapped in
                if wanted in (None, serving, self._failed) or (
                    self._ready is not None and self._ready.version == wanted
                ):
                    continue
                self.loading = wanted
            log.info("worker %s: loading %s in the background", self.id, wanted)
            started = time.perf_counter()
            try:
                chatbot = self.loader(wanted)  # type: ignore[misc]
                engine = _Engine(wanted, chatbot, Scheduler(chatbot, self.options.max_batch))
                _warm_up(engine.scheduler)
            except Exception as exc:
                log.exception(
                    "worker %s: cannot load %s; still serving %s", self.id, wanted, serving
                )
                with self._lock:
                    self._failed, self.loading = wanted, ""
                    self.load_error = f"{wanted}: {exc}"
                continue
            with self._lock:
                self.loading = ""
                if self._wanted != wanted:
                    self._wake.set()  # superseded while loading: load the newer one
                    continue
                self._ready, self.load_error = engine, ""
            log.info(
                "worker %s: %s loaded in %.1fs", self.id, wanted, time.perf_counter() - started
            )

    def _swap(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, None
            if ready is None or ready.version != self._wanted:
                return
            old = self.engines[-1]
            self.engines.append(ready)
            self.swapped_at = time.time()
        under_way = sum(seq.engine is old for seq in self.sequences.values())
        log.info(
            "worker %s now serves %s (was %s; %d answers under way finish on it)",
            self.id,
            ready.version,
            old.version,
            under_way,
        )
        self.heartbeat()  # `sprbot status` shows the new version at once
        self._retire()

    def _retire(self) -> None:
        """Drop engines that no longer serve and hold no sequence: frees their model."""
        with self._lock:
            self.engines = [e for e in self.engines[:-1] if e.scheduler.active] + [self.engines[-1]]


def _warm_up(scheduler: Scheduler) -> None:
    """A few steps of a dummy sequence, on the loader thread: the first steps of a new model
    allocate caches and create kernels, which would otherwise stall the serving loop (and
    the answers in flight on the old model) right after the swap."""
    tokenizer = scheduler.chatbot.tokenizer
    ids = tokenizer("warm up", add_special_tokens=False).input_ids or [0]
    scheduler.add("warm-up", ids, GenerationConfig(do_sample=False, max_new_tokens=4))
    while scheduler.active:
        scheduler.step()


def version_loader(registry: ModelRegistry, base: PipelineConfig) -> Callable[[str], Chatbot]:
    """Loads a registered version the way ``base`` loads the configured model: ``base``
    itself, a full model folder, or a LoRA adapter applied to the model it was trained on
    (merged at load, so it decodes at full speed). The files are read in a child process
    (``inference.loading``), so that the answers in flight keep decoding meanwhile."""

    def load(version: str) -> Chatbot:
        config = base
        if version != BASE:
            record = registry.get(version)
            path = str(registry.path(record))
            if record.kind == "lora":
                loading = replace(base.loading_config or LoadingModelConfig(), peft_path=path)
                model = record.base_model or base.model_name_or_path
                config = replace(base, model_name_or_path=model, loading_config=loading)
            else:
                config = replace(base, model_name_or_path=path)
        try:
            loaded = load_in_child(config)
        except ChildLoadFailed as exc:
            log.warning("loading %s in this process instead of a child: %s", version, exc)
            loaded = None
        return build_chatbot(config, loaded=loaded)

    return load
