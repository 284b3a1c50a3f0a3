"""FAQ grounding on a real model (SmolLM2-135M-Instruct), no retrain: a question asked in other
words, below the direct-answer threshold, goes to the model with the closest entries as
context, and the answer carries the entry's key fact. Real Redis, a real inference worker.

The figures, with a second wording and the default threshold, come from
``bench/grounding.py`` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_registry import answer
from test_retrain import add_faq
from test_worker import Workers

from bot.bus import Bus
from bot.config import load_settings
from bot.connection import connect
from inference.worker import FAQ_PREFIX

TEAM = json.loads((Path(__file__).parents[1] / "bench" / "data" / "learning.json").read_text())
FACTS = TEAM["faq"]


@pytest.fixture
def env(smollm2_env, monkeypatch):
    for key, value in {
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "64",
        # Above every reworded question's cosine (at most 0.96): the model must answer each.
        "SPRBOT_FAQ_THRESHOLD": "0.99",
    }.items():
        monkeypatch.setenv(key, value)
    return smollm2_env


def replies(bus: Bus, questions: list[str]) -> list[str]:
    """The final reply to each question, asked one at a time in fresh conversations."""
    return [answer(bus, question) for question in questions]


def carried(answers: list[str]) -> int:
    return sum(
        any(k.lower() in a.lower() for k in fact["key"])
        for a, fact in zip(answers, FACTS, strict=True)
    )


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_questions_in_other_words_are_answered_by_the_model_with_the_faq_as_context(env):
    bus = Bus(connect(load_settings()), max_backlog=1024)
    add_faq(bus, [(fact["question"], fact["answer"]) for fact in FACTS])
    reworded = [fact["reworded"] for fact in FACTS]
    workers = Workers()
    try:
        # The model alone does not know the team's facts ...
        workers.start(faq_grounding="off")
        alone = replies(bus, reworded)
        workers.stop_all()
        assert carried(alone) <= 1, alone

        # ... with the closest entries as context it answers them, in its own words.
        workers.start(faq_grounding="on")
        grounded = replies(bus, reworded)
        assert not any(a.startswith(FAQ_PREFIX) for a in grounded), grounded
        assert carried(grounded) >= 7, grounded  # the target

        # And the context does not spoil what it knew: far from every entry, no context.
        [paris] = replies(bus, ["What is the capital of France?"])
        assert "Paris" in paris, paris
    finally:
        workers.stop_all()
