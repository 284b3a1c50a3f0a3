"""Continuous batching: sequences share decode steps, join and leave between steps, and decode
what each would decode alone, as far as the arithmetic allows.

What is guaranteed, and asserted here:
- one sequence in the batch: token for token ``Chatbot.generate_token_ids``, in bf16 too;
- several in fp32: the same tokens as alone (the GEMMs round differently at M > 1 only at
  the level of fp32, far below the gap between candidate tokens);
- several in bf16: every prompt's first token as alone, and every later token the solo
  model's greedy choice up to a rounding-sized near-tie (oneDNN's bf16 GEMM rounds a few
  elements per row differently at M > 1 than its M = 1 GEMV, and the batched attention sums
  a padded, masked row in another order).
"""

from __future__ import annotations

import pytest
import torch

from inference import GenerationConfig, MixedPrecisionConfig, PipelineConfig, build_chatbot
from inference.batching import Scheduler
from inference.decoding import apply_repetition_penalty

GREEDY = GenerationConfig(do_sample=False, max_new_tokens=10)
QUESTIONS = [
    "What is sprbot?",
    "How do I reset the bot?",
    "Tell me about Intel Xeon Scalable Processors.",
    "def f(x):",
    "Écris un poème sur les processeurs",
    "Why is the sky blue? Explain it to a child, then to a physicist.",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is all per-op overhead; with two threads on busy cores every op waits
    for both to be scheduled (measured: 36 s for this module instead of 15). Both sides of
    every comparison run on the same thread count, so what is compared does not change."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def bot(tiny_model):
    return build_chatbot(
        PipelineConfig(
            model_name_or_path=str(tiny_model),
            optimization_config=MixedPrecisionConfig(force=True),
        )
    )


@pytest.fixture(scope="module")
def fp32_bot(tiny_model):
    return build_chatbot(
        PipelineConfig(
            model_name_or_path=str(tiny_model),
            optimization_config=MixedPrecisionConfig(dtype="float32"),
        )
    )


def prompt(bot, i: int) -> list[int]:
    return bot.prepare([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])[0]


def solo(bot, prompt_ids: list[int], config: GenerationConfig = GREEDY) -> list[int]:
    return list(bot.generate_token_ids(prompt_ids, config))


def drain(scheduler: Scheduler, out: dict | None = None) -> dict:
    """Step until every sequence has ended; tokens per key. Checks the event protocol: tokens,
    then exactly one None, and nothing after it."""
    out = {} if out is None else out
    ended: set = set()
    for _ in range(10_000):
        if not scheduler.active:
            return out
        for key, token in scheduler.step():
            assert key not in ended, f"{key!r} produced an event after it ended"
            if token is None:
                ended.add(key)
            else:
                out.setdefault(key, []).append(token)
    raise AssertionError("the scheduler never emptied")


def test_the_fast_path_is_taken_for_a_llama(bot):
    scheduler = Scheduler(bot, 4)
    assert scheduler.batched, scheduler.fallback_reason


def test_batch_of_one_equals_generate_token_ids_in_bf16(bot):
    sampled = GenerationConfig(max_new_tokens=10, seed=7, temperature=0.9, top_k=20)
    for i, config in [(0, GREEDY), (2, sampled), (5, GREEDY)]:
        scheduler = Scheduler(bot, 4)
        scheduler.add("only", prompt(bot, i), config)
        assert drain(scheduler).get("only", []) == solo(bot, prompt(bot, i), config)


def test_batched_equals_solo_in_fp32_with_per_sequence_configs(fp32_bot):
    bot = fp32_bot
    configs = [
        GREEDY,
        GenerationConfig(max_new_tokens=8, seed=1),  # NeuralChat defaults: sampling
        GenerationConfig(max_new_tokens=12, seed=2, temperature=0.8, repetition_penalty=1.3),
        GenerationConfig(do_sample=False, max_new_tokens=5, repetition_penalty=1.0),
        GREEDY,
    ]
    scheduler = Scheduler(bot, len(configs))
    for i, config in enumerate(configs):
        scheduler.add(i, prompt(bot, i), config)
    out = drain(scheduler)
    for i, config in enumerate(configs):
        assert out.get(i, []) == solo(bot, prompt(bot, i), config), f"sequence {i} differs"


def test_batched_greedy_in_bf16_is_the_solo_choice_up_to_rounding(bot):
    scheduler = Scheduler(bot, 5)
    prompts = [prompt(bot, i) for i in range(5)]
    for i, ids in enumerate(prompts):
        scheduler.add(i, ids, GREEDY)
    out = drain(scheduler)
    for i, ids in enumerate(prompts):
        tokens = out.get(i, [])
        alone = solo(bot, ids)
        assert tokens[:1] == alone[:1], "a prompt's first token must not depend on the batch"
        # Teacher-forced: the solo model's logits along the batched sequence.
        with torch.inference_mode():
            logits = bot.model(torch.tensor([ids + tokens])).logits[0].float()
        for j, token in enumerate(tokens):
            row = logits[len(ids) - 1 + j].clone()
            history = torch.tensor(ids + tokens[:j])
            row = apply_repetition_penalty(row, history, GREEDY.repetition_penalty)
            # bf16 logits carry ~1/256 relative rounding; a wrong token falls far further.
            assert row[token] >= row.max() - 0.1 * row.std(), f"sequence {i}, token {j}"


def test_a_request_joining_mid_generation_gets_its_first_token_in_the_next_step(
    fp32_bot, monkeypatch
):
    bot = fp32_bot
    monkeypatch.setattr(bot, "eos_token_ids", set())  # "a" and "b" run on past the join
    scheduler = Scheduler(bot, 4)
    scheduler.add("a", prompt(bot, 0), GREEDY)
    scheduler.add("b", prompt(bot, 1), GREEDY)
    out: dict = {}
    for _ in range(3):
        for key, token in scheduler.step():
            out.setdefault(key, []).append(token)
    assert [len(out["a"]), len(out["b"])] == [3, 3]
    scheduler.add("late", prompt(bot, 5), GREEDY)
    events = scheduler.step()
    produced = {key for key, token in events if token is not None}
    assert produced == {"a", "b", "late"}, "the joiner waited, or the others stalled"
    for key, token in events:
        out.setdefault(key, []).append(token)
    drain(scheduler, out)
    assert out["a"] == solo(bot, prompt(bot, 0))
    assert out["late"] == solo(bot, prompt(bot, 5))


def test_a_long_prompt_is_fed_in_chunks_while_the_others_keep_decoding(fp32_bot, monkeypatch):
    bot = fp32_bot
    monkeypatch.setattr(bot, "eos_token_ids", set())  # "a" must outlive the prompt's chunks
    scheduler = Scheduler(bot, 4, prefill_chunk=32)
    scheduler.add("a", prompt(bot, 0), GREEDY)
    scheduler.step()
    long_prompt = bot.prepare([{"role": "user", "content": " ".join(QUESTIONS)}])[0]
    assert len(long_prompt) > 2 * 32
    scheduler.add("long", long_prompt, GREEDY)
    steps = 0
    while True:
        events = dict(scheduler.step())
        steps += 1
        assert events.get("a") is not None, "the running sequence stalled behind a prompt"
        if "long" in events:
            break
    assert steps == -(-len(long_prompt) // 32)
    out = drain(scheduler, {"long": [events["long"]]})
    assert out["long"] == solo(bot, long_prompt)


def test_sequences_leave_when_done_and_free_their_slot(fp32_bot, monkeypatch):
    bot = fp32_bot
    monkeypatch.setattr(bot, "eos_token_ids", set())  # lengths exactly max_new_tokens
    lengths = {"short": 3, "mid": 6, "long": 9}
    scheduler = Scheduler(bot, 3)
    for i, (key, n) in enumerate(lengths.items()):
        scheduler.add(key, prompt(bot, i), GenerationConfig(do_sample=False, max_new_tokens=n))
    assert scheduler.room == 0
    out: dict = {}
    newcomer = prompt(bot, 4)
    for step in range(1, 10):
        for key, token in scheduler.step():
            if token is not None:
                out.setdefault(key, []).append(token)
        alive = [key for key, n in lengths.items() if n > step] + (["new"] if step > 3 else [])
        assert scheduler.active == len(alive), f"after step {step}"
        assert scheduler.room == 3 - len(alive)
        if step == 3:  # the freed slot takes a newcomer, whose cache must start clean
            scheduler.add("new", newcomer, GREEDY)
    assert {key: len(out[key]) for key in lengths} == lengths
    drain(scheduler, out)
    assert out["new"] == solo(bot, newcomer)
    # Idle, then a new burst: the model is re-checked and the used cache is reused.
    assert scheduler.active == 0
    scheduler.add("again", prompt(bot, 5), GREEDY)
    assert drain(scheduler)["again"] == solo(bot, prompt(bot, 5))
    assert out["long"] == solo(
        bot, prompt(bot, 2), GenerationConfig(do_sample=False, max_new_tokens=9)
    )


def test_cancel_frees_the_slot(fp32_bot):
    bot = fp32_bot
    scheduler = Scheduler(bot, 2)
    scheduler.add("a", prompt(bot, 0), GREEDY)
    scheduler.add("b", prompt(bot, 1), GREEDY)
    scheduler.step()
    scheduler.cancel("a")
    scheduler.cancel("never-added")  # ignored
    assert (scheduler.active, scheduler.room) == (1, 1)
    scheduler.add("c", prompt(bot, 2), GREEDY)
    out = drain(scheduler)
    assert "a" not in out
    assert out["c"] == solo(bot, prompt(bot, 2))


def test_max_batch_is_respected(bot):
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(bot, 0)
    scheduler = Scheduler(bot, 2)
    scheduler.add("a", prompt(bot, 0), GREEDY)
    with pytest.raises(ValueError, match="already running"):
        scheduler.add("a", prompt(bot, 0), GREEDY)
    scheduler.add("b", prompt(bot, 1), GREEDY)
    with pytest.raises(RuntimeError, match="full"):
        scheduler.add("c", prompt(bot, 2), GREEDY)
    with pytest.raises(ValueError, match="num_beams"):
        Scheduler(bot, 1).add("x", prompt(bot, 0), GenerationConfig(num_beams=2))
    for _ in range(3):
        assert len({key for key, _ in scheduler.step()}) <= 2


def test_hooks_fall_back_to_round_robin_and_still_serve(bot):
    hook = bot.model.model.norm.register_forward_hook(lambda *args: None)
    try:
        # What generate_token_ids does for this model (the generic HFRunner path).
        expected = {"a": solo(bot, prompt(bot, 0)), "b": solo(bot, prompt(bot, 1))}
        scheduler = Scheduler(bot, 2)
        assert not scheduler.batched and "hook" in scheduler.fallback_reason
        scheduler.add("a", prompt(bot, 0), GREEDY)
        out = {key: [token] for key, token in scheduler.step()}
        scheduler.add("b", prompt(bot, 1), GREEDY)
        assert scheduler.room == 0
        assert drain(scheduler, out) == expected
    finally:
        hook.remove()
    scheduler.add("c", prompt(bot, 2), GREEDY)  # idle again: the model is re-checked
    assert scheduler.batched


def test_ipex_backend_falls_back(bot, monkeypatch):
    config = GenerationConfig(do_sample=False, max_new_tokens=6)
    expected = {"a": solo(bot, prompt(bot, 0), config), "b": solo(bot, prompt(bot, 1), config)}
    monkeypatch.setattr(bot, "backend", "ipex")  # generate_token_ids then uses model.generate
    scheduler = Scheduler(bot, 2)
    assert not scheduler.batched and "IPEX" in scheduler.fallback_reason
    scheduler.add("a", prompt(bot, 0), config)
    scheduler.add("b", prompt(bot, 1), config)
    assert drain(scheduler) == expected
