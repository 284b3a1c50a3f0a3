"""The FAQ store on a real Redis, FAQ-grounded answers from a real worker, `sprbot faq`."""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from collections import Counter

import pytest
from test_worker import Workers, ask, collect, finals

from bot.audit import AuditLog
from bot.bus import Bus, Delivery
from bot.config import load_settings
from bot.connection import connect
from bot.faq import (
    Exchange,
    FaqError,
    FaqStore,
    MiniLMEmbedder,
    WordEmbedder,
)
from bot.memory import ConversationMemory
from bot.schemas import ChatRequest

WIFI = "What is the wifi password?"
RESET = "How do I reset our conversation?"


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    return MiniLMEmbedder()  # loaded once per module: ~3 s


@pytest.fixture
def client(data_dir, embedded_redis):
    return connect(load_settings())


def test_near_duplicates_update_the_entry_with_embeddings(client, minilm):
    faq = FaqStore(client, minilm)
    first = faq.add(RESET, "Send /reset.", source="admin", author="slack:U1")
    assert (first.outcome, first.entry.id) == ("added", 1)
    same = faq.add(
        "how do I reset our conversation", "Send /reset now.", source="admin", author="a"
    )
    assert (same.outcome, same.entry.id, same.entry.answer) == ("updated", 1, "Send /reset now.")
    assert same.entry.question == RESET  # the first wording stays
    reworded = faq.add(
        "How can I reset our conversation?", "Type /reset.", source="admin", author="a"
    )
    assert (reworded.outcome, reworded.entry.id) == ("updated", 1)
    assert reworded.similarity >= 0.9
    other = faq.add("How do I clear the chat history?", "Ask an admin.", source="admin", author="a")
    assert other.outcome == "added" and other.similarity < 0.9
    again = faq.add("How can I reset our conversation?", "Type /reset.", source="admin", author="a")
    assert again.outcome == "unchanged"
    assert [e.id for e in faq.entries()] == [1, 2]

    # An entry written with the words fallback is found by the model store too: its vector is
    # computed the first time it is needed.
    FaqStore(client, WordEmbedder()).add(WIFI, "hunter2", source="admin", author="a")
    fresh = FaqStore(client, minilm)
    assert fresh.add("what is the password for the wifi", "hunter3", source="admin", author="a")
    assert [(e.id, e.question, e.answer) for e in fresh.entries()][-1] == (3, WIFI, "hunter3")


def test_near_duplicates_without_embeddings_use_the_normalised_text(client):
    faq = FaqStore(client, WordEmbedder())
    assert faq.add(WIFI, "hunter2", source="admin", author="a").outcome == "added"
    assert faq.add("WHAT is the WiFi password", "hunter3", source="admin", author="a").outcome == (
        "updated"
    )
    assert faq.add(
        "Where is the office kitchen?", "Floor 2", source="admin", author="a"
    ).outcome == ("added")
    assert [(e.question, e.answer) for e in faq.entries()] == [
        (WIFI, "hunter3"),
        ("Where is the office kitchen?", "Floor 2"),
    ]


def test_feedback_is_a_candidate_a_correction_is_approved(client):
    faq = FaqStore(client, WordEmbedder())
    thumbs = faq.record_feedback(
        Exchange(WIFI, "It is on the fridge."), user="slack:U2", channel="c"
    )
    assert (thumbs.entry.status, thumbs.entry.source) == ("candidate", "feedback")
    newer = faq.record_feedback(Exchange(WIFI, "hunter2"), user="slack:U3")
    assert (newer.outcome, newer.entry.answer, newer.entry.status) == (
        "updated",
        "hunter2",
        "candidate",
    )
    approved, changed = faq.approve(1)
    assert (
        changed and approved.status == "approved" and approved.updated_at > thumbs.entry.updated_at
    )
    # A thumbs-up does not overrule an approved answer; a correction does.
    assert faq.record_feedback(Exchange(WIFI, "guess"), user="slack:U4").outcome == "unchanged"
    fixed = faq.record_correction(Exchange(WIFI, "hunter2"), "hunter3", user="slack:UADMIN")
    assert (fixed.entry.answer, fixed.entry.source, fixed.entry.status) == (
        "hunter3",
        "correction",
        "approved",
    )
    with pytest.raises(FaqError, match="no FAQ entry #7"):
        faq.approve(7)
    with pytest.raises(FaqError, match="the answer is empty"):
        faq.add("Q?", "   ", source="admin", author="a")


def _fill(faq: FaqStore) -> None:
    faq.add("Plain question?", "Plain answer.", source="admin", author="slack:U1", channel="slack")
    faq.add(
        'Commas, "quotes" and\nnewlines?',
        "Yes: a, b\n\nand «ünïcödé» ✓",
        source="import",
        author="shell:ops",
    )
    faq.record_feedback(Exchange("Thumbed question?", "Thumbed answer."), user="telegram:42")
    faq.remove(1)  # ids need not be dense


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_export_then_import_round_trips(client, fmt):
    faq = FaqStore(client, WordEmbedder())
    _fill(faq)
    exported = faq.export(fmt)
    assert faq.import_text(exported, fmt, author="x").unchanged == 2  # into itself: nothing new

    client.flushdb()
    restored = FaqStore(client, WordEmbedder())
    result = restored.import_text(exported, fmt, author="someone else")
    assert (result.added, result.updated, result.unchanged) == (2, 0, 0)
    assert restored.export(fmt) == exported
    assert [(e.id, e.status, e.source, e.author) for e in restored.entries()] == [
        (2, "approved", "import", "shell:ops"),
        (3, "candidate", "feedback", "telegram:42"),
    ]
    added = restored.add("A new one?", "Yes.", source="admin", author="a")
    assert added.entry.id == 4  # imported ids are never handed out again
    if fmt == "json":
        rows = json.loads(exported)
        assert rows[0]["instruction"] == 'Commas, "quotes" and\nnewlines?'
        assert rows[0]["input"] == "" and rows[0]["output"].endswith("✓")


def test_import_reads_plain_alpaca_and_csv_and_refuses_bad_rows_whole(client):
    faq = FaqStore(client, WordEmbedder())
    alpaca = json.dumps(
        [
            {"instruction": "Q1?", "input": "", "output": "A1"},
            {"instruction": "Translate", "input": "bonjour", "output": "hello"},
        ]
    )
    assert faq.import_text(alpaca, "json", author="shell:ops").added == 2
    assert faq.get(2).question == "Translate\n\nbonjour"
    assert (faq.get(1).status, faq.get(1).source, faq.get(1).author) == (
        "approved",
        "import",
        "shell:ops",
    )
    assert faq.import_text("question,answer\nQ3?,A3\n", "csv", author="x").added == 1
    bad = json.dumps([{"instruction": "Q4?", "output": "A4"}, {"instruction": "Q5?"}])
    with pytest.raises(
        FaqError, match="row 2: needs a question and an answer.*nothing was imported"
    ):
        faq.import_text(bad, "json", author="x")
    with pytest.raises(FaqError, match="row 1: status must be candidate or approved"):
        faq.import_text("question,answer,status\nQ6?,A6,maybe\n", "csv", author="x")
    with pytest.raises(FaqError, match="not valid JSON"):
        faq.import_text("{oops", "json", author="x")
    assert len(faq.entries()) == 3


def test_snapshot_writes_the_approved_entries_with_their_hash(client, tmp_path):
    faq = FaqStore(client, WordEmbedder())
    with pytest.raises(FaqError, match="no approved entries to train on"):
        faq.snapshot(tmp_path / "empty.json")
    faq.add("Q1?", "A1", source="admin", author="a")
    faq.record_feedback(Exchange("Q2?", "A2"), user="u")
    faq.add("Q3?", "A3", source="correction", author="a")
    snap = faq.snapshot(tmp_path / "datasets" / "faq.json")
    assert snap.rows == 2
    data = snap.path.read_bytes()
    assert snap.sha256 == hashlib.sha256(data).hexdigest()
    assert json.loads(data) == [
        {"instruction": "Q1?", "input": "", "output": "A1"},
        {"instruction": "Q3?", "input": "", "output": "A3"},
    ]
    assert faq.snapshot(tmp_path / "again.json").sha256 == snap.sha256  # same FAQ, same hash
    faq.approve(2)
    assert faq.snapshot(tmp_path / "more.json").rows == 3


def test_concurrent_adds_of_one_question_make_one_entry(client):
    stores = [FaqStore(connect(load_settings()), WordEmbedder()) for _ in range(4)]
    start = threading.Barrier(len(stores))
    results = []

    def add(store: FaqStore, n: int) -> None:
        start.wait()
        for i in range(5):
            results.append(store.add(WIFI, f"answer {n}.{i}", source="admin", author=f"u{n}"))

    threads = [threading.Thread(target=add, args=(s, n)) for n, s in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20
    [entry] = FaqStore(client, WordEmbedder()).entries()
    assert Counter(r.entry.id for r in results) == {entry.id: 20}


# -- grounding in the real worker -------------------------------------------------------------


@pytest.fixture
def bus(tiny_model, data_dir, embedded_redis, monkeypatch) -> Bus:
    for key, value in {
        "SPRBOT_MODEL": str(tiny_model),
        "SPRBOT_DO_SAMPLE": "false",
        "SPRBOT_MAX_NEW_TOKENS": "24",
        "SPRBOT_LOG_LEVEL": "WARNING",
    }.items():
        monkeypatch.setenv(key, value)
    return Bus(connect(load_settings()))


@pytest.fixture
def workers():
    started = Workers()
    yield started
    started.stop_all()


def reply(bus: Bus, text: str) -> tuple[ChatRequest, str]:
    request, _ = ask(bus, text)
    events = collect(bus, {request.id}, settle=0.5)
    assert finals(events) == Counter({request.id: 1})
    final = events[request.id][-1]
    assert final.kind == "final"
    assert "".join(e.text for e in events[request.id] if e.kind == "delta") == final.text
    return request, final.text


def test_close_questions_are_answered_from_the_faq_others_get_it_as_context(
    bus, workers, cli, tiny_model, minilm
):
    faq = FaqStore(bus.redis, minilm)
    faq.add(WIFI, "It is hunter2; ask IT to rotate it.", source="admin", author="a")
    faq.add(RESET, "Send /reset.", source="admin", author="a")
    faq.record_feedback(Exchange("Where is the office kitchen?", "Floor 2"), user="u")  # candidate
    proc = workers.start()

    _, hit = reply(bus, "What's the WiFi password?")  # cosine 0.99 with WIFI
    assert hit == "From the team FAQ: It is hunter2; ask IT to rotate it."
    near, answer = reply(bus, "How do I reset the conversation with the bot?")  # 0.79: context
    assert not answer.startswith("From the team FAQ")
    _, unrelated = reply(bus, "Where is the office kitchen?")  # only a candidate knows it
    assert not unrelated.startswith("From the team FAQ")

    status = cli("status")
    assert status.returncode == 0, status.stderr
    assert "faq: 2 approved, 1 candidates" in status.stdout
    assert (
        "faq grounding: on, threshold 0.85: 1 of 3 questions answered from the FAQ "
        "(hit rate 33%), 1 with FAQ context" in status.stdout
    )
    assert "FAQ grounding on, threshold 0.85, context 3" in status.stdout

    # The prompt the worker builds for the near miss carries the closest entry.
    from inference import PipelineConfig, build_chatbot
    from inference.config import GenerationConfig
    from inference.worker import InferenceWorker, WorkerOptions

    worker = InferenceWorker(
        build_chatbot(PipelineConfig(model_name_or_path=str(tiny_model))),
        bus,
        ConversationMemory(bus.redis),
        generation=GenerationConfig(do_sample=False),
        options=WorkerOptions(faq_grounding=True),
        faq=faq,
    )
    [(hit_entry, context)] = worker.ground([Delivery(near, "0-1", 1)]).values()
    assert hit_entry is None and [e.question for e in context] == [RESET]
    prompt_ids, config = worker.prompt("c", near.text, context)
    prompt = worker.chatbot.tokenizer.decode(prompt_ids)
    assert f"Q: {RESET}\nA: Send /reset." in prompt and near.text in prompt
    # ... decoded without the repetition penalty, which would push it off the entry's words;
    assert config.repetition_penalty == 1.0
    assert worker.prompt("c", near.text)[1].repetition_penalty == 1.1  # no context: as set
    # with several entries, the closest goes last, next to the question.
    two = [entry for entry, _ in faq.match([near.text], k=2)[0]]
    assert [e.question for e in two] == [RESET, WIFI]
    prompt = worker.chatbot.tokenizer.decode(worker.prompt("c", near.text, two)[0])
    assert prompt.index(f"Q: {WIFI}") < prompt.index(f"Q: {RESET}") < prompt.rindex(near.text)

    # A 👍 on the model's answer names the pair the worker remembered: it becomes a candidate.
    exchange = faq.answered(near.id)
    assert exchange == Exchange(near.text, answer, near.id)
    assert faq.record_feedback(exchange, user="slack:U9").entry.status == "candidate"

    # Switched off, the model answers alone.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    workers.start(faq_grounding="off")
    _, alone = reply(bus, "What's the WiFi password?")
    assert not alone.startswith("From the team FAQ")


# -- the shell --------------------------------------------------------------------------------


def test_sprbot_faq_commands(data_dir, embedded_redis, cli, tmp_path):
    env = {"SPRBOT_FAQ_EMBEDDINGS": "off"}
    added = cli("faq", "add", WIFI, "hunter2", env=env)
    assert added.returncode == 0, added.stderr
    assert added.stdout == f"Added FAQ #1 (approved): {WIFI}\n"
    updated = cli("faq", "add", "what is the WiFi password", "hunter3", env=env)
    assert updated.stdout.startswith("Updated FAQ #1 (approved), a near duplicate")
    client = connect(load_settings())
    FaqStore(client, WordEmbedder()).record_feedback(Exchange("Kitchen?", "Floor 2"), user="u")

    listed = cli("faq", "list", "--status", "candidate", env=env)
    assert listed.stdout == "#2 [candidate] Kitchen? → Floor 2 (feedback, u)\n"
    assert cli("faq", "approve", "2", env=env).stdout == "Approved FAQ #2.\n"
    missing = cli("faq", "approve", "99", env=env)
    assert missing.returncode == 2
    assert missing.stderr == "sprbot: there is no FAQ entry #99: /faq list shows the ids\n"

    export = tmp_path / "faq.json"
    assert cli("faq", "export", str(export), env=env).returncode == 0
    assert cli("faq", "export", str(tmp_path / "faq.csv"), env=env).returncode == 0
    stdout_export = cli("faq", "export", env=env).stdout
    assert stdout_export == export.read_text()
    assert cli("faq", "remove", "1", env=env).stdout == "Removed FAQ #1.\n"
    imported = cli("faq", "import", str(export), env=env)
    assert imported.stdout == f"Imported {export}: 1 added, 0 updated, 1 unchanged.\n"
    assert cli("faq", "export", env=env).stdout == stdout_export  # #1 is back, as it was
    csv_import = cli("faq", "import", str(tmp_path / "faq.csv"), env=env)
    assert csv_import.stdout.endswith(": 0 added, 0 updated, 2 unchanged.\n")

    bad = tmp_path / "bad.csv"
    bad.write_text("question,answer\nGood?,Yes\nBad?,\n")
    refused = cli("faq", "import", str(bad), env=env)
    assert refused.returncode == 2 and "row 2:" in refused.stderr
    assert "Good?" not in cli("faq", "list", env=env).stdout

    # The default: embeddings from the bundled model, offline (HF_HUB_OFFLINE=1 in tests).
    embedded = cli("faq", "add", "What's the WiFi password?", "hunter4")
    assert embedded.stdout.startswith("Updated FAQ #1 (approved), a near duplicate")

    shell = [(e.platform, e.command, e.result) for e in AuditLog(client).entries()]
    assert shell[:2] == [("shell", "faq add", "ok"), ("shell", "faq add", "ok")]
    assert ("shell", "faq approve", "error") in shell and ("shell", "faq import", "error") in shell
