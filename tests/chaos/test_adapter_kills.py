"""SIGKILL the Telegram adapter while messages are between ingress (on the bus, a placeholder
shown) and delivery (the answer shown), and start it again as a supervisor would. Telegram
hands out again every update the dead adapter had not confirmed; the bus drops those it
had already taken; the answers the dead adapter read but never showed stay pending in the
reply stream until the new one takes them over (``SPRBOT_REPLY_RECLAIM_IDLE_MS``)."""

from __future__ import annotations

import random
import threading
import time

import pytest
from harness import wait_until

pytestmark = pytest.mark.chaos

MESSAGES = 60
KILLS = 3


def test_adapter_kills_between_ingress_and_delivery_lose_and_duplicate_no_answer(
    deployment, rng, figures, request
):
    adapter = deployment.start_adapter()
    deployment.start_worker()
    pace = random.Random(rng.random())
    kills_done = threading.Event()

    def send() -> None:
        for i in range(MESSAGES):
            if i == MESSAGES - 5:
                kills_done.wait(timeout=300)  # keep some load until the last kill
            deployment.ask(f"Message {i}: what should I bring to the offsite?")
            time.sleep(pace.uniform(0.1, 0.4))

    sender = threading.Thread(target=send)
    kill_after = sorted(rng.sample(range(5, MESSAGES - 10), KILLS))
    kills = []  # (when, requests accepted but not shown at that moment)
    sender.start()
    try:
        for after in kill_after:
            wait_until(lambda: len(deployment.asked) >= after, 120, f"message {after}")  # noqa: B023
            wait_until(deployment.in_between, 60, "a message between ingress and delivery", 0.01)
            time.sleep(rng.uniform(0.0, 0.3))
            at = adapter.kill()
            kills.append((at, deployment.in_between()))
            time.sleep(rng.uniform(0.0, 1.0))  # the supervisor notices, then restarts it
            adapter = deployment.start_adapter()
    finally:
        kills_done.set()
        sender.join()

    ledger = deployment.settled(timeout=180)
    accepted = ledger.accepted
    recovery = []
    for at, between in kills:
        delivered = [ledger.delivered_at(rid) for rid in between]
        if between and all(t is not None for t in delivered):
            recovery.append(max(delivered) - at)
    figures.record(
        request,
        "Telegram adapter SIGKILL",
        fault="SIGKILL the adapter with answers between ingress and delivery; restart it",
        faults=len(kills),
        accepted=len(accepted),
        lost=len(ledger.lost),
        duplicated=len(ledger.duplicated),
        recovery_s=recovery,
        in_between_at_kill=[len(between) for _, between in kills],
        errors=len(ledger.errors),
        stray_placeholders=ledger.stray_placeholders,
        requests=MESSAGES,
    )
    assert len(kills) == KILLS
    assert all(between for _, between in kills), "a kill hit an adapter with nothing in hand"
    assert len(accepted) == MESSAGES, "some messages were never taken onto the bus"
    assert not ledger.lost, f"lost: {ledger.describe(ledger.lost)}"
    assert not ledger.duplicated, f"answered twice: {ledger.describe(ledger.duplicated)}"
    assert not ledger.errors, f"answered with an error: {ledger.describe(ledger.errors)}"
    assert len(recovery) == KILLS
