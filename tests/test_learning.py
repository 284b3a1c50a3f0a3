"""/retrain on a real model (SmolLM2-135M-Instruct) with the default recipe: a retrain that
gains nothing is not promoted, a good one is (and then answers the team's questions, in the
team's words too, without forgetting the rest), a forgetful one is blocked and the report
says why. Real Redis, a real RQ training worker, FAQ grounding off: the model must answer.

The figures against the issue's targets come from ``bench/learning.py`` (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_retrain import add_faq, admin_events, context, job_id_of, training_workers

from bot.bus import Bus
from bot.commands import dispatch
from bot.config import load_settings
from bot.connection import connect
from bot.registry import BASE, ModelRegistry
from inference import GenerationConfig, LoadingModelConfig, PipelineConfig, build_chatbot

TEAM = json.loads((Path(__file__).parents[1] / "bench" / "data" / "learning.json").read_text())
FAQ = [(item["question"], item["answer"]) for item in TEAM["faq"]]
# The targets. bench/learning.py met them in two runs with the same figures (training
# and greedy decoding are deterministic on one machine): 6 reworded right, 1 general lost.
REWORDED_AT_LEAST = 6
GENERAL_LOST_AT_MOST = 1


@pytest.fixture
def env(smollm2_env, monkeypatch):
    monkeypatch.setenv("SPRBOT_FAQ_GROUNDING", "off")
    return smollm2_env


@pytest.fixture
def trainers():
    yield from training_workers({"SPRBOT_TRAIN_MONITOR_S": "2", "SPRBOT_TRAIN_MAINTENANCE_S": "3"})


def retrain(bus: Bus, trainers, **settings: str):
    job_id = job_id_of(dispatch("/retrain", context(bus)))
    trainer = trainers("--burst", **settings)
    final = admin_events(bus, job_id, timeout=1500)[-1]
    trainer.wait(timeout=120)
    assert final.kind == "final", final
    return final


def right(answer: str, keys: list[str]) -> bool:
    return any(k.lower() in answer.lower() for k in keys)


def answers(config, questions: list[str]) -> list[str]:
    chatbot = build_chatbot(config)
    greedy = GenerationConfig(do_sample=False, max_new_tokens=64)
    return [chatbot.predict(q, greedy) for q in questions]


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_retrain_on_a_real_model_promotes_only_what_learns_without_forgetting(env, trainers):
    bus = Bus(connect(load_settings()), max_backlog=1024)
    registry = ModelRegistry(bus.redis, env)
    add_faq(bus, FAQ)

    # A retrain that learns nothing (a learning rate too small to move the weights) is not
    # promoted, though it is no worse than the serving model.
    idle = retrain(bus, trainers, SPRBOT_TRAIN_LEARNING_RATE="1e-7", SPRBOT_TRAIN_EPOCHS="1")
    assert idle.text.startswith("Retrain done: v1 was NOT promoted; base keeps serving."), idle
    assert "nothing to gain" in idle.text and "/model use v1" in idle.text
    assert registry.current() == BASE

    # The defaults learn the FAQ and keep the rest.
    good = retrain(bus, trainers)
    assert good.text.startswith("Retrain done: v2 is now serving (was base)."), good.text
    lines = good.text.splitlines()
    assert any(line.startswith("FAQ questions answered: 0/8 -> ") for line in lines), lines
    assert any(line.startswith("Asked in other words (") for line in lines), lines
    assert any(line.startswith("General ability (loss on the base model") for line in lines)
    assert any(line.startswith("Time: ") and "fine-tuning" in line for line in lines), lines
    assert good.attachments and good.attachments[0].endswith("loss.png")
    record = registry.get("v2")
    assert record.metrics["candidate"]["faq_recall"] >= 7, record.metrics

    # What users get: the trained questions, the same asked in the test's own words (never
    # trained on, not the job's paraphrases), and general questions the base model gets right.
    model = load_settings().model
    base = PipelineConfig(model_name_or_path=model)
    tuned = PipelineConfig(
        model_name_or_path=model,
        loading_config=LoadingModelConfig(peft_path=str(registry.path(record))),
    )
    items, general = TEAM["faq"], TEAM["general"]
    trained = answers(tuned, [i["question"] for i in items])
    reworded = answers(tuned, [i["reworded"] for i in items])
    assert sum(right(a, i["key"]) for a, i in zip(trained, items, strict=True)) >= 7, trained
    reworded_right = sum(right(a, i["key"]) for a, i in zip(reworded, items, strict=True))
    assert reworded_right >= REWORDED_AT_LEAST, reworded
    before = answers(base, [g["question"] for g in general])
    known = [g for g, a in zip(general, before, strict=True) if right(a, g["key"])]
    assert len(known) >= 7, before
    after = answers(tuned, [g["question"] for g in known])
    kept = sum(right(a, g["key"]) for a, g in zip(after, known, strict=True))
    assert kept >= len(known) - GENERAL_LOST_AT_MOST, after

    # Ten times the learning rate: it learns the FAQ and forgets the rest. Blocked, and why.
    forgetful = retrain(bus, trainers, SPRBOT_TRAIN_LEARNING_RATE="1e-2")
    assert forgetful.text.startswith("Retrain done: v3 was NOT promoted; v2 keeps serving."), (
        forgetful.text
    )
    assert "forgot too much of its general ability" in forgetful.text
    assert registry.current() == "v2"
