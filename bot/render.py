"""Showing answers on chat platforms: long text split into messages, edits paced.

Both limits are the platforms', and both adapters stream an answer the same way: post a
placeholder, edit it as text arrives, send what does not fit as follow-up messages.

- Message size: Slack caps a section block at 3,000 characters; Telegram a message at 4,096.
  ``split_text`` cuts at paragraph boundaries and never inside a fenced code block unless the
  block alone is too long, in which case each part is fenced again so it still renders as code.
- Edit rate: both allow about one edit per second per message and answer faster edits with
  HTTP 429 and a ``Retry-After``. ``Throttle`` keeps each key (a message, or a chat) to its
  interval and holds every edit back after a 429, or only that key's where the platform
  limits each chat on its own.

Conversion to a platform's markup (Slack mrkdwn, Telegram HTML) lives in the adapter; it uses
``fenced_segments`` so that code is left as it is, and the Markdown patterns below.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Hashable

# A fence opens with three or more backticks or tildes, indented by at most three spaces.
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
# Markdown the model writes, as both adapters find it before converting it.
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
BULLET = re.compile(r"^([ \t]*)[-*+][ \t]+", re.M)
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def fenced_segments(text: str) -> list[tuple[bool, str]]:
    """Cut Markdown into runs of prose and fenced code: ``[(is_code, text), ...]``.

    Code runs include their fence lines. The runs concatenate to ``text`` exactly. A fence
    that is still open at the end (an answer still streaming) runs to the end as code.
    """
    segments: list[tuple[bool, str]] = []
    lines: list[str] = []
    fence = ""  # the opening fence while inside a code block
    for line in text.splitlines(keepends=True):
        match = _FENCE.match(line.rstrip("\r\n"))
        if not fence:
            if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
                if lines:
                    segments.append((False, "".join(lines)))
                lines, fence = [line], match.group(1)
            else:
                lines.append(line)
            continue
        lines.append(line)
        closes = (
            match is not None
            and not match.group(2).strip()
            and match.group(1)[0] == fence[0]
            and len(match.group(1)) >= len(fence)
        )
        if closes:
            segments.append((True, "".join(lines)))
            lines, fence = [], ""
    if lines:
        segments.append((bool(fence), "".join(lines)))
    return segments


def split_text(text: str, limit: int) -> list[str]:
    """Split ``text`` into parts of at most ``limit`` characters, for consecutive messages.

    Cuts fall, in order of preference, between paragraphs (blank lines), between lines,
    between words, and only then anywhere. A fenced code block is kept whole when it fits in
    a part; a longer one is cut between lines and every part is fenced again. Whitespace at
    the cuts is dropped. Empty text gives no parts.
    """
    if limit < 32:
        raise ValueError(f"split_text: limit must be at least 32 characters, got {limit}")
    text = text.strip()
    if len(text) <= limit:
        return [text] if text else []
    units: list[str] = []
    for is_code, segment in fenced_segments(text):
        if is_code:
            units.append(segment.strip("\n").rstrip())
        else:
            units += [p.strip("\n").rstrip() for p in _BLANK_LINE.split(segment) if p.strip()]
    parts: list[str] = []
    for unit in units:
        if len(unit) <= limit:
            parts.append(unit)
        elif _FENCE.match(unit.split("\n", 1)[0]):
            parts += _split_code(unit, limit)
        else:
            parts += _pack(_split_lines(unit, limit), "\n", limit)
    return _pack(parts, "\n\n", limit)


def _pack(parts: list[str], separator: str, limit: int) -> list[str]:
    """Join consecutive parts (each within ``limit``) greedily into pieces within ``limit``."""
    packed: list[str] = []
    for part in parts:
        if packed and len(packed[-1]) + len(separator) + len(part) <= limit:
            packed[-1] += separator + part
        else:
            packed.append(part)
    return packed


def _split_lines(text: str, limit: int) -> list[str]:
    """Lines of ``text``, each line longer than ``limit`` cut between words (or anywhere)."""
    pieces: list[str] = []
    for line in text.split("\n"):
        if len(line) <= limit:
            pieces.append(line)
            continue
        words = re.findall(r"\S+\s*", line)
        current = ""
        for word in words:
            while len(word) > limit:  # no space to cut at: cut anywhere
                if current:
                    pieces.append(current.rstrip())
                    current = ""
                pieces.append(word[:limit])
                word = word[limit:]
            if len(current) + len(word.rstrip()) > limit:
                pieces.append(current.rstrip())
                current = ""
            current += word
        if current.strip():
            pieces.append(current.rstrip())
    return pieces


def _split_code(block: str, limit: int) -> list[str]:
    """A fenced block too long for one part: cut between lines, fence every part again."""
    lines = block.split("\n")
    opening = lines[0].strip()
    fence = _FENCE.match(opening).group(1)
    body = lines[1:]
    if body and _FENCE.match(body[-1]) and body[-1].strip().startswith(fence[0]):
        body = body[:-1]
    room = limit - len(opening) - len(fence) - 2  # two newlines around the body
    if room < 8:
        raise ValueError(f"split_text: limit {limit} leaves no room inside the fence {opening!r}")
    parts = []
    for piece in _pack(_split_code_lines(body, room), "\n", room):
        parts.append(f"{opening}\n{piece}\n{fence}")
    return parts


def _split_code_lines(lines: list[str], room: int) -> list[str]:
    # Code keeps its spacing, so an overlong line is cut at the limit, not between words.
    pieces: list[str] = []
    for line in lines:
        while len(line) > room:
            pieces.append(line[:room])
            line = line[room:]
        pieces.append(line)
    return pieces


class Throttle:
    """Paces edits: at most one per ``interval_s`` per key (a message), and none at all until a
    platform's ``Retry-After`` has passed. Thread-safe; ``clock`` is for tests of the pacing."""

    def __init__(
        self, interval_s: float = 1.0, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if interval_s < 0:
            raise ValueError(f"Throttle: interval_s must be 0 or more, got {interval_s}")
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[Hashable, float] = {}
        self._paused_until = 0.0
        self._paused: dict[Hashable, float] = {}  # per key: back_off(seconds, key)
        self._lock = threading.Lock()

    def wait_s(self, key: Hashable) -> float:
        """Seconds until ``key`` may be edited; 0 when it may be now."""
        with self._lock:
            now = self.clock()
            last = self._last.get(key)
            paused = max(self._paused_until, self._paused.get(key, 0.0))
            due = paused if last is None else max(paused, last + self.interval_s)
            return max(0.0, due - now)

    def sent(self, key: Hashable) -> None:
        """Record an edit of ``key`` made now."""
        with self._lock:
            self._last[key] = self.clock()

    def back_off(self, seconds: float, key: Hashable | None = None) -> None:
        """Hold edits for ``seconds`` (the platform answered 429 with this Retry-After): every
        edit, or with ``key`` only that key's, where the platform limits each key on its own
        (Telegram's flood control is per chat)."""
        with self._lock:
            now = self.clock()
            until = now + max(0.0, seconds)
            if key is None:
                self._paused_until = max(self._paused_until, until)
                return
            self._paused = {k: t for k, t in self._paused.items() if t > now}  # stay small
            self._paused[key] = max(self._paused.get(key, 0.0), until)

    def forget(self, key: Hashable) -> None:
        """Drop what is known of ``key`` (its message is finished)."""
        with self._lock:
            self._last.pop(key, None)
