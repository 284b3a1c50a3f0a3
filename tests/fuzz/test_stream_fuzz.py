"""Garbage written straight into ``sprbot:chat:requests``, read by a real inference worker.

Whatever a process with Redis access writes there, the worker must not crash and must not
generate for it: an entry that is not a valid ``ChatRequest`` goes to ``sprbot:chat:dead``
with the reason, and one whose text is over the limit gets a ``too_long`` error reply. Then
the worker still answers a valid request.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from typing import Any

from fuzzing import examples, wait_for
from hypothesis import given
from hypothesis import strategies as st

from bot.bus import DEAD, REQUESTS, Bus, reply_stream
from bot.schemas import ChatRequest, ErrorEvent, FinalEvent, parse_reply

CHANNEL = "fuzz"
MAX_TEXT_CHARS = 4000  # the worker's SPRBOT_MAX_TEXT_CHARS (the default)
REQUIRED = ("id", "channel", "conversation", "user_id", "text")
# Per field of a ChatRequest, values its schema refuses (pydantic's lax mode would accept
# "1" for a bool or 1 for a float, so none of those is here).
INVALID: dict[str, list[Any]] = {
    "id": ["", "has space", "../../etc/passwd", "a" * 129, "-dash-first", 123, None, [], {}],
    "channel": ["", "Slack", "x" * 33, "a b", "../x", "sprbot:chat", 5, None, ["slack"]],
    "conversation": ["", "c" * 513, None, 7, {}],
    "user_id": ["", "u" * 257, None, 1.5, []],
    "user_name": ["n" * 257, 3, [], None],
    "text": ["", None, 42, ["hi"], {"text": "hi"}],
    "reply_to": ["here", [1, 2], 5, True],
    "is_command": ["maybe", 2, [], {}],
    "created_at": [-1, "soon", None, [], float("inf"), float("nan")],
    "history": ["hi", [{"role": "root", "content": "x"}], [{"role": "user"}], 3],
    "generation": ["fast", {"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 2}],
}
INVALID = {k: v for k, v in INVALID.items() if k in ChatRequest.model_fields}

_ids = itertools.count(1)


def valid_request(**fields: Any) -> dict[str, Any]:
    n = next(_ids)
    request = {
        "id": f"fuzz-{n}",
        "channel": CHANNEL,
        "conversation": f"fuzz/{n}",
        "user_id": "U1",
        "user_name": "Ann",
        "text": "What time is lunch?",
        "reply_to": {"ts": "1.2"},
        "is_command": False,
        "created_at": time.time(),
    }
    return {**request, **fields}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@st.composite
def mutated(draw) -> tuple[str, dict[str, bytes], str]:
    """A valid request with one field made invalid or, if required, left out."""
    request = valid_request()
    name = draw(st.sampled_from(sorted(INVALID)))
    if name in REQUIRED and draw(st.booleans()):
        del request[name]
    else:
        request[name] = draw(st.sampled_from(INVALID[name]))
    request.update(draw(st.dictionaries(st.sampled_from(["x", "extra", "é"]), json_values)))
    return "mutated", {"data": json.dumps(request).encode()}, name


no_data = st.dictionaries(
    st.binary(min_size=1, max_size=12).filter(lambda k: k != b"data"),
    st.binary(max_size=64),
    min_size=1,
    max_size=4,
).map(lambda fields: ("no data field", fields, "data"))

not_a_request = st.one_of(
    st.binary(max_size=200),
    json_values.filter(lambda v: not isinstance(v, dict)).map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=10), json_values)
    .filter(lambda d: not all(k in d for k in REQUIRED))
    .map(lambda d: json.dumps(d).encode()),
    st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")),
).map(lambda data: ("not a request", {b"data": data}, ""))

too_long = st.integers(MAX_TEXT_CHARS + 1, MAX_TEXT_CHARS * 50).map(
    lambda n: ("too long", {"data": json.dumps(valid_request(text="x" * n)).encode()}, "")
)

garbage = st.one_of(mutated(), no_data, not_a_request, too_long)


def dead_letter(client, entry_id: str) -> dict[str, str] | None:
    for _, fields in client.xrevrange(DEAD, count=50):
        if fields.get(b"entry", b"").decode() == entry_id:
            return {k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}
    return None


def replies(client, request_id: str) -> list:
    events = [parse_reply(f[b"data"]) for _, f in client.xrange(reply_stream(CHANNEL))]
    return [e for e in events if e.request_id == request_id]


def test_garbage_in_the_requests_stream_is_dead_lettered_and_never_generated_for(served, tally):
    client = served.client
    served.quiet()  # what earlier tests asked is answered: only this test's input counts
    before = served.heartbeat(newer_than=time.time())
    sent = Counter()

    @examples(300)
    @given(entry=garbage)
    def send(entry: tuple[str, dict, str]) -> None:
        kind, fields, field = entry
        tally["requests stream"] += 1
        sent[kind] += 1
        entry_id = client.xadd(REQUESTS, fields).decode()
        if kind == "too long":
            request_id = json.loads(fields["data"])["id"]
            (event,) = wait_for(
                lambda: replies(client, request_id), "the too_long reply", alive=served.alive
            )
            assert isinstance(event, ErrorEvent) and event.code == "too_long", event
            assert "over the limit of 4,000" in event.text
            assert dead_letter(client, entry_id) is None
        else:
            dead = wait_for(
                lambda: dead_letter(client, entry_id), f"dead letter of {kind}", alive=served.alive
            )
            assert dead["stream"] == REQUESTS and dead["reason"]
            if field:  # the reason names what was wrong
                assert field in dead["reason"], dead["reason"]
        served.alive()

    send()
    assert set(sent) == {"mutated", "no data field", "not a request", "too long"}, sent
    assert client.xlen(REQUESTS) == 0  # every entry was settled: none left pending
    assert client.xpending(REQUESTS, "inference")["pending"] == 0
    after = served.heartbeat(newer_than=time.time())
    assert after["served"] == before["served"]  # the model generated for none of them

    # The worker is alive and well: a valid request gets its answer.
    request = ChatRequest(**valid_request())
    assert Bus(client).submit(request).accepted
    final = wait_for(
        lambda: [e for e in replies(client, request.id) if isinstance(e, FinalEvent)],
        "the answer to a valid request",
        timeout=60,
        alive=served.alive,
    )
    assert final
    assert int(served.heartbeat(newer_than=time.time())["served"]) == int(before["served"]) + 1
