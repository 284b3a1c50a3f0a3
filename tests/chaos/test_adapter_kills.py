"""SIGKILL the Telegram adapter while messages are between ingress (on the bus, a placeholder
shown) and delivery (the answer shown), and start it again as a supervisor would. Telegram
hands out again every update the dead adapter had not confirmed; the bus drops those it
had already taken; the answers the dead adapter read but never showed stay pending in the
reply stream until the new one takes them over (``SPRBOT_REPLY_RECLAIM_IDLE_MS``)."""

from __future__ import annotations

import random
import time

import pytest
from harness import Load, wait_until

pytestmark = pytest.mark.chaos

MESSAGES = 60
KILLS = 3


def test_adapter_kills_between_ingress_and_delivery_lose_and_duplicate_no_answer(
    deployment, rng, figures, request
):
    adapter = deployment.start_adapter()
    deployment.start_worker()
    kill_after = sorted(rng.sample(range(5, MESSAGES - 10), KILLS))
    kills = []  # (when, requests accepted but not shown at that moment)
    text = "Message {i}: what should I bring to the offsite?"
    pace = random.Random(rng.random())
    with Load(deployment, MESSAGES, kill_after, pace, gaps=(0.1, 0.4), text=text) as load:
        for after in kill_after:
            load.wait_for(after)
            wait_until(deployment.in_between, 60, "a message between ingress and delivery", 0.05)
            time.sleep(rng.uniform(0.0, 0.3))
            at = adapter.kill()
            kills.append((at, deployment.in_between()))
            load.fault_done()
            time.sleep(rng.uniform(0.0, 1.0))  # the supervisor notices, then restarts it
            adapter = deployment.start_adapter()

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
