"""The IPEX stack (torch 2.8 + IPEX 2.8 + transformers 4.51.3): run by `make test-ipex` only.

The default suite deselects these (marker ``ipex``); in the IPEX virtualenv they must pass,
so a broken IPEX path fails CI instead of silently falling back to the stock backend.
"""

from __future__ import annotations

import pytest

from inference import GenerationConfig, MixedPrecisionConfig, PipelineConfig, build_chatbot
from inference.device import ipex_status

pytestmark = pytest.mark.ipex


def test_ipex_is_usable_here():
    usable, why = ipex_status()
    assert usable, why


def test_build_chatbot_uses_ipex_and_answers(tiny_model):
    bot = build_chatbot(
        PipelineConfig(
            model_name_or_path=str(tiny_model),
            optimization_config=MixedPrecisionConfig(dtype="bfloat16", force=True),
        )
    )
    info = bot.info()
    assert info["backend"] == "ipex"
    assert info["dtype"] == "bfloat16"
    greedy = GenerationConfig(do_sample=False, max_new_tokens=24)
    answer = bot.predict("Tell me about Intel Xeon Scalable Processors.", greedy)
    assert answer.strip()
    pieces = bot.predict_stream("Tell me about Intel Xeon Scalable Processors.", greedy)
    assert "".join(pieces) == answer
    sampled = bot.predict("Tell me a story", GenerationConfig(max_new_tokens=16, seed=3))
    assert isinstance(sampled, str)


def test_closing_a_stream_early_leaves_the_engine_serving(tiny_model):
    bot = build_chatbot(
        PipelineConfig(
            model_name_or_path=str(tiny_model),
            optimization_config=MixedPrecisionConfig(dtype="bfloat16", force=True),
        )
    )
    bot.eos_token_ids = set()  # the random model must not end the stream before it is closed
    greedy = GenerationConfig(do_sample=False, max_new_tokens=24)
    expected = bot.predict("Tell me about Intel Xeon Scalable Processors.", greedy)
    ids, config = bot.prepare([{"role": "user", "content": "Hi"}], greedy)
    stream = bot.generate_token_ids(ids, config)
    next(stream)
    stream.close()  # a client gone mid-answer: generate stops instead of running to the end
    # The one generate thread is free again: the next request is answered, unchanged.
    assert bot.predict("Tell me about Intel Xeon Scalable Processors.", greedy) == expected
