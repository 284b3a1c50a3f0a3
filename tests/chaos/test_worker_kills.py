"""SIGKILL inference workers mid-generation while users keep writing: every accepted message is
answered once. Two workers serve; each kill takes one down at a random moment while it holds
requests, and a replacement starts, as a supervisor would start it. What the dead worker held
stays pending on the bus until the other worker reclaims it (``SPRBOT_RECLAIM_IDLE_MS``)."""

from __future__ import annotations

import random
import time

import pytest
from harness import FinalWatcher, Load, wait_until

pytestmark = pytest.mark.chaos

MESSAGES = 200
KILLS = 5


def test_five_worker_kills_during_200_messages_lose_and_duplicate_no_answer(
    deployment, rng, figures, request
):
    deployment.start_adapter()
    workers = [deployment.start_worker(), deployment.start_worker()]
    kill_after = sorted(rng.sample(range(15, MESSAGES - 15), KILLS))  # messages sent first
    kills = []  # (when, request ids the dead worker held)
    watcher = FinalWatcher(deployment.client)

    def holders() -> list:
        """Serving workers that hold requests right now."""
        holding = deployment.holding()
        return [w for w in workers if w.consumer in holding and w.alive()]

    with Load(deployment, MESSAGES, kill_after, random.Random(rng.random())) as load:
        for after in kill_after:
            load.wait_for(after)
            # A random moment while it holds work: mid-prefill, mid-decode or mid-write. Frozen
            # first, so that it cannot answer its last request between the check and the kill.
            while True:
                holding = wait_until(holders, 60, "a worker holding requests", every=0.01)
                victim = rng.choice(holding)
                time.sleep(rng.uniform(0.0, 0.1))
                victim.freeze()
                held = deployment.pending_of(victim.consumer)
                if held:
                    break
                victim.thaw()  # it finished in the meantime: pick a moment again
            at = victim.kill()
            kills.append((at, held))
            watcher.watch(kills[-1][1])
            workers.remove(victim)
            # The supervisor's restart. Until it serves, the other worker alone recovers what
            # the dead one held, and the next kill waits: one of two workers dies each time.
            workers.append(deployment.start_worker())
            load.fault_done()

    ledger = deployment.settled(timeout=240)
    watcher.close()
    accepted = ledger.accepted
    recovery, first_answer = [], []  # kill -> all it held shown; -> the first of them
    on_bus = []  # kill -> all it held answered on the bus (the rest is the adapter's part)
    for at, held in kills:
        delivered = [ledger.delivered_at(rid) for rid in held]
        if held and all(t is not None for t in delivered):
            recovery.append(max(delivered) - at)
            first_answer.append(min(delivered) - at)
        written = [watcher.written.get(rid) for rid in held]
        if held and all(t is not None for t in written):
            on_bus.append(max(written) - at)
    figures.record(
        request,
        "inference worker SIGKILL",
        fault="SIGKILL one of two inference workers while it holds requests; restart it",
        faults=len(kills),
        accepted=len(accepted),
        lost=len(ledger.lost),
        duplicated=len(ledger.duplicated),
        recovery_s=recovery,
        held_at_kill=[len(held) for _, held in kills],
        first_answer_s=[round(t, 2) for t in first_answer],
        all_answered_s=[round(t, 2) for t in recovery],
        all_written_on_bus_s=[round(t, 2) for t in on_bus],
        errors=len(ledger.errors),
        stray_placeholders=ledger.stray_placeholders,
        requests=MESSAGES,
    )
    assert len(kills) == KILLS
    assert all(held for _, held in kills), "a kill hit a worker holding nothing"
    assert len(accepted) == MESSAGES, "some messages were never taken onto the bus"
    assert not ledger.lost, f"lost: {ledger.describe(ledger.lost)}"
    assert not ledger.duplicated, f"answered twice: {ledger.describe(ledger.duplicated)}"
    assert not ledger.errors, f"answered with an error: {ledger.describe(ledger.errors)}"
    assert all(a.answered for a in accepted)
    assert len(recovery) == KILLS  # each kill's requests were all answered in the end
