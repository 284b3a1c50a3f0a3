"""The model registry and hot reload: real Redis, real `sprbot worker inference` processes."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from pathlib import Path

import pytest
from test_worker import CHANNEL, Workers, ask, collect, finals

from bot.bus import Bus, final_key
from bot.commands import CommandContext, Stores, dispatch
from bot.config import load_settings
from bot.connection import connect
from bot.memory import ConversationMemory
from bot.registry import BASE, EVENTS, ModelRegistry, RegistryError
from inference.worker import WORKER_PREFIX

NEW_TOKENS = 400


@pytest.fixture
def env(tiny_model, data_dir, embedded_redis, monkeypatch):
    for key, value in {
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": str(NEW_TOKENS),
        "SPRBOT_LOG_LEVEL": "WARNING",
        "SPRBOT_CONSOLE_ADMINS": "root-admin",
        "SPRBOT_FAQ_EMBEDDINGS": "off",
    }.items():
        monkeypatch.setenv(key, value)
    return data_dir


@pytest.fixture
def bus(env) -> Bus:
    settings = load_settings()
    return Bus(connect(settings), max_backlog=1024)


@pytest.fixture
def registry(bus, env) -> ModelRegistry:
    return ModelRegistry(bus.redis, env)


@pytest.fixture
def workers():
    started = Workers()
    yield started
    started.stop_all()


def make_version(registry: ModelRegistry, tiny_model: Path, seed: int) -> str:
    """A full model folder with the tiny model's tokenizer and weights drawn with ``seed``."""
    import torch
    from transformers import AutoModelForCausalLM

    version, folder = registry.allocate()
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    registry.register(version, requested_by="test", dataset_hash="ab" * 32, dataset_rows=8)
    return version


def admin(bus: Bus) -> CommandContext:
    stores = Stores.build(load_settings(), bus.redis)
    return CommandContext(
        "console-t", "console/t", "root-admin", ConversationMemory(bus.redis), stores=stores
    )


def serving(bus: Bus, proc, version: str, timeout: float = 60) -> dict[str, str]:
    """Wait until the worker's heartbeat reports ``version``; its heartbeat."""
    deadline = time.monotonic() + timeout
    while True:
        for key in bus.redis.scan_iter(WORKER_PREFIX + "*"):
            if str(proc.pid) in key.decode():
                beat = {k.decode(): v.decode() for k, v in bus.redis.hgetall(key).items()}
                if beat.get("version") == version:
                    return beat
        assert time.monotonic() < deadline, f"the worker never reported serving {version}"
        time.sleep(0.05)


def answer(bus: Bus, text: str) -> str:
    request, _ = ask(bus, text)
    [final] = [e for e in collect(bus, {request.id})[request.id] if e.kind == "final"]
    return final.text


def predict(path: Path, text: str) -> str:
    from inference import GenerationConfig, PipelineConfig, build_chatbot

    chatbot = build_chatbot(PipelineConfig(model_name_or_path=str(path)))
    return chatbot.predict(text, GenerationConfig(do_sample=False, max_new_tokens=NEW_TOKENS))


def test_promote_and_rollback_keep_a_history_and_announce_each_change(registry, tiny_model):
    pubsub = registry.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(EVENTS)
    v1 = make_version(registry, tiny_model, seed=1)
    v2 = make_version(registry, tiny_model, seed=2)
    assert (v1, v2) == ("v1", "v2")
    record = registry.get(v1)
    assert record.kind == "full" and record.path == "models/v1" and record.dataset_rows == 8
    assert registry.path(v1) == registry.data_dir / "models" / "v1"

    assert registry.current() == BASE
    assert registry.promote(v1) == BASE
    assert registry.promote(v2) == v1
    assert registry.current() == v2 and registry.history() == [v1, BASE]
    assert registry.rollback() == (v2, v1)
    assert registry.rollback() == (v1, BASE)
    assert registry.current() == BASE
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()

    events = []
    deadline = time.monotonic() + 5
    while len(events) < 4 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message:
            events.append(message["data"].decode())
    assert events == ["promoted v1", "promoted v2", "promoted v1", "promoted base"]

    with pytest.raises(RegistryError, match="no model version 'v9'.*known: v1, v2"):
        registry.promote("v9")
    with pytest.raises(RegistryError, match="already registered"):
        registry.register(v1)
    empty, _ = registry.allocate()
    with pytest.raises(RegistryError, match="holds no model"):
        registry.register(empty)


def test_model_commands_list_use_and_rollback(bus, registry, tiny_model):
    v1 = make_version(registry, tiny_model, seed=1)
    context = admin(bus)
    listing = dispatch("/model list", context)
    assert "▶ base" in listing and f"  {v1}  full" in listing and "by test" in listing
    assert "Switching from base to v1" in dispatch(f"/model use {v1}", context)
    assert f"▶ {v1}" in dispatch("/model list", context)
    assert "already serves" in dispatch(f"/model use {v1}", context)
    assert "Rolling back from v1 to base" in dispatch("/model rollback", context)
    assert "nothing to roll back to" in dispatch("/model rollback", context)
    assert "There is no model version 'nope'" in dispatch("/model use nope", context)
    assert dispatch("/model use", context).endswith("Usage: /model use <version>")
    assert registry.current() == BASE


def test_version_loader_applies_a_lora_adapter(registry, tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from inference import PipelineConfig
    from inference.worker import version_loader

    version, folder = registry.allocate()
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(folder)
    registry.register(version, base_model=str(tiny_model))
    assert registry.get(version).kind == "lora"

    load = version_loader(registry, PipelineConfig(model_name_or_path="/not/the/base"))
    chatbot = load(version)
    assert chatbot.info()["peft_path"] == str(folder)
    assert chatbot.info()["model"] == str(tiny_model)  # the adapter's own base, from the record
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert not torch.equal(
        chatbot.model.model.layers[0].self_attn.q_proj.weight.float(),
        base.model.layers[0].self_attn.q_proj.weight.float(),
    ), "the adapter was not merged into the weights"


@pytest.mark.timeout(900)  # start, a swap at background priority, then every answer
def test_hot_swap_under_load_answers_every_request_once(bus, registry, workers, tiny_model):
    v1 = make_version(registry, tiny_model, seed=1)
    question = "What does the new model say?"
    expected = {BASE: predict(tiny_model, question), v1: predict(registry.path(v1), question)}
    assert expected[BASE] != expected[v1], "pick another seed: both models answer alike"
    proc = workers.start(max_batch="64")

    first = {ask(bus, f"question {i}", i)[0].id for i in range(50)}
    seen: dict[str, list] = {}

    def read(block_ms: int) -> None:
        """Take the reply events in, as an adapter does all along: a stream nobody reads is
        trimmed to its cap (``reply_maxlen``), and the oldest events are gone."""
        for reply in bus.read_replies(CHANNEL, "test", count=1000, block_ms=block_ms):
            seen.setdefault(reply.event.request_id, []).append(reply.event)
            bus.ack_replies(CHANNEL, reply.entry_id)

    deadline = time.monotonic() + 120
    while sum(bool(evs) for evs in seen.values()) < 40:  # most of them are decoding
        assert time.monotonic() < deadline, "the requests never started"
        read(100)

    assert "Switching from base to v1" in dispatch(f"/model use {v1}", admin(bus))
    more: set[str] = set()
    swap_deadline = time.monotonic() + 300  # the load runs at background priority
    while True:  # keep 20+ requests in flight until the worker has swapped
        in_flight = [rid for rid in first | more if not bus.redis.exists(final_key(rid))]
        if bus.redis.hget(_key(bus, proc), "version") == v1.encode():
            break
        for _ in range(20 - len(in_flight)):
            more.add(ask(bus, f"more {len(more)}", 100 + len(more))[0].id)
        assert time.monotonic() < swap_deadline, "the worker never swapped"
        read(50)
    assert len(in_flight) >= 10, "the swap did not happen under load"
    # Many answers have ended while the loops above read their events.
    ended = {rid for rid, evs in seen.items() if any(e.kind in ("final", "error") for e in evs)}
    events = collect(bus, (first | more) - ended, timeout=300, settle=2.0)
    for rid, evs in seen.items():
        events[rid] = evs + events.get(rid, [])
    assert finals(events) == Counter({rid: 1 for rid in first | more})
    assert not [e for evs in events.values() for e in evs if e.kind == "error"]

    # New requests run on the new version; rollback brings the old one back the same way.
    assert answer(bus, question) == expected[v1]
    assert "Rolling back from v1 to base" in dispatch("/model rollback", admin(bus))
    serving(bus, proc, BASE)
    assert answer(bus, question) == expected[BASE]
    assert proc.poll() is None


def test_worker_starts_on_the_serving_version_and_survives_a_broken_one(
    bus, registry, workers, tiny_model, cli
):
    v1 = make_version(registry, tiny_model, seed=1)
    registry.promote(v1)
    proc = workers.start(max_new_tokens="24")
    serving(bus, proc, v1)

    broken, folder = registry.allocate()
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    registry.register(broken)
    registry.promote(broken)
    deadline = time.monotonic() + 60
    while broken.encode() not in (bus.redis.hget(_key(bus, proc), "load_error") or b""):
        assert time.monotonic() < deadline, "the load error was never reported"
        time.sleep(0.1)
    beat = serving(bus, proc, v1)
    assert beat["load_error"].startswith(f"{broken}: ")
    assert answer(bus, "Still serving?")  # on v1
    status = cli("status")
    assert f": {v1} = " in status.stdout and f"failed to load {broken}" in status.stdout
    assert f"model: serving {broken}, 2 trained versions" in status.stdout


def _key(bus: Bus, proc) -> str:
    [key] = [k for k in bus.redis.scan_iter(WORKER_PREFIX + "*") if str(proc.pid) in k.decode()]
    return key
