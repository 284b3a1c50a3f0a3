"""The engine: NeuralChat's API on the tiny model, in bf16, with clear errors."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from inference import (
    EmptyQueryError,
    GenerationConfig,
    LoadingModelConfig,
    MixedPrecisionConfig,
    ModelLoadError,
    PipelineConfig,
    PromptTooLongError,
    build_chatbot,
)
from inference.device import resolve_dtype

GREEDY = GenerationConfig(do_sample=False, max_new_tokens=48)


@pytest.fixture(scope="module")
def bf16_bot(tiny_model):
    return build_chatbot(
        PipelineConfig(
            model_name_or_path=str(tiny_model),
            optimization_config=MixedPrecisionConfig(dtype="bfloat16", force=True),
        )
    )


def test_seed_snippet_runs_with_only_its_imports_changed(tiny_model, monkeypatch):
    monkeypatch.setenv("SPRBOT_MODEL", str(tiny_model))
    # NeuralChat's README example; only the two import lines differ.
    from inference import build_chatbot, MixedPrecisionConfig, PipelineConfig  # noqa: I001

    config = PipelineConfig(optimization_config=MixedPrecisionConfig())
    chatbot = build_chatbot(config)
    response = chatbot.predict(query="Tell me about Intel Xeon Scalable Processors.")
    assert isinstance(response, str) and response.strip()
    assert chatbot.info()["model"] == str(tiny_model)


def test_bf16_weights_and_logits_close_to_fp32(tiny_model, bf16_bot):
    fp32_bot = build_chatbot(
        PipelineConfig(
            model_name_or_path=str(tiny_model),
            optimization_config=MixedPrecisionConfig(dtype="float32"),
        )
    )
    assert {p.dtype for p in bf16_bot.model.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in fp32_bot.model.parameters()} == {torch.float32}
    assert bf16_bot.info()["dtype"] == "bfloat16"
    ids, _ = bf16_bot.prepare([{"role": "user", "content": "How do I reset the bot?"}])
    with torch.inference_mode():
        low = bf16_bot.model(torch.tensor([ids])).logits.float()
        full = fp32_bot.model(torch.tensor([ids])).logits
    assert low.dtype == torch.float32 and full.shape == low.shape
    # bf16 keeps 8 bits of mantissa: expect agreement to about 1% of the logits' spread.
    assert (low - full).abs().max() < 0.02 * full.abs().max() + 1e-3
    assert torch.nn.functional.cosine_similarity(low.flatten(), full.flatten(), dim=0) > 0.999


def test_stream_concatenation_equals_predict(bf16_bot):
    for query in ["What is sprbot?", "Écris un poème sur les processeurs 🚀", "def f(x):"]:
        pieces = list(bf16_bot.predict_stream(query, GREEDY))
        assert len(pieces) > 1, "the reply arrived in one piece: not streamed"
        assert "".join(pieces) == bf16_bot.predict(query, GREEDY)


def test_chat_uses_the_whole_conversation(bf16_bot):
    one = [{"role": "user", "content": "Hello"}]
    two = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Hello"},
    ]
    ids_one, _ = bf16_bot.prepare(one)
    ids_two, _ = bf16_bot.prepare(two)
    assert len(ids_two) > len(ids_one)
    text = bf16_bot.tokenizer.decode(ids_two)
    assert "Hi, how can I help?" in text
    assert bf16_bot.chat(two, GREEDY) == "".join(bf16_bot.chat_stream(two, GREEDY))


def test_sampling_is_reproducible_with_a_seed(bf16_bot):
    sampled = GenerationConfig(do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=7)
    first = bf16_bot.predict("Tell me a story", sampled)
    assert first == bf16_bot.predict("Tell me a story", sampled)
    others = {
        bf16_bot.predict(
            "Tell me a story",
            GenerationConfig(do_sample=True, temperature=1.5, top_k=0, top_p=1.0, seed=s),
        )
        for s in range(8, 12)
    }
    assert len(others | {first}) > 1


def test_max_new_tokens_bounds_the_reply(bf16_bot):
    ids, config = bf16_bot.prepare([{"role": "user", "content": "Count"}], GREEDY)
    produced = list(
        bf16_bot.generate_token_ids(ids, GenerationConfig(do_sample=False, max_new_tokens=5))
    )
    assert 0 < len(produced) <= 5


def test_lora_adapter_from_peft_path_changes_the_output(tiny_model, tmp_path, bf16_bot):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    lora = get_peft_model(
        base,
        LoraConfig(
            r=8,
            lora_alpha=64,
            target_modules=["q_proj", "v_proj", "down_proj"],
            init_lora_weights=False,
        ),
    )
    lora.save_pretrained(tmp_path / "adapter")
    tuned = build_chatbot(
        PipelineConfig(
            model_name_or_path=str(tiny_model),
            loading_config=LoadingModelConfig(peft_path=str(tmp_path / "adapter")),
            optimization_config=MixedPrecisionConfig(force=True),
        )
    )
    assert tuned.info()["peft_path"] == str(tmp_path / "adapter")
    queries = ["What is sprbot?", "How do I add a FAQ entry?"]
    assert [tuned.predict(q, GREEDY) for q in queries] != [
        bf16_bot.predict(q, GREEDY) for q in queries
    ]


def test_info_reports_what_runs(bf16_bot, tiny_model):
    info = bf16_bot.info()
    assert info["device"] == "cpu"
    assert info["backend"] in ("stock", "ipex")
    assert info["template"] == "chat-template"
    assert 0.5e6 < info["parameters"] < 2e6
    assert info["weight_bytes"] == 2 * info["parameters"]
    assert info["context_length"] == 2048


@pytest.mark.parametrize(
    ("folder", "template", "marker"),
    [
        ("neural-chat-7b-v3-3", "neural-chat", "### System:\n"),
        ("Llama-2-7b-chat-hf", "llama-2", "[INST] <<SYS>>"),
        ("some-base-model", "alpaca", "### Instruction:\nWhat is sprbot?\n\n### Response:\n"),
    ],
)
def test_family_template_without_a_chat_template(tiny_model, tmp_path, folder, template, marker):
    model_dir = tmp_path / folder
    shutil.copytree(tiny_model, model_dir)
    # transformers 5 keeps the template in its own file, 4.x inside tokenizer_config.json.
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    config_file = model_dir / "tokenizer_config.json"
    config_file.write_text(
        json.dumps(
            {k: v for k, v in json.loads(config_file.read_text()).items() if k != "chat_template"}
        )
    )
    bot = build_chatbot(PipelineConfig(model_name_or_path=str(model_dir)))
    assert bot.info()["template"] == template
    ids, _ = bot.prepare([{"role": "user", "content": "What is sprbot?"}])
    assert marker in bot.tokenizer.decode(ids)
    assert (
        bot.predict("What is sprbot?", GenerationConfig(do_sample=False, max_new_tokens=4))
        is not None
    )


def test_unloadable_model_says_why_and_what_to_do():
    with pytest.raises(ModelLoadError) as err:
        build_chatbot(PipelineConfig(model_name_or_path="no-such-org/no-such-model"))
    message = str(err.value)
    assert "no-such-org/no-such-model" in message
    assert "offline" in message
    assert "SPRBOT_MODEL" in message and "sprbot model init-tiny" in message


def test_unloadable_lora_adapter_says_so(tiny_model, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="LoRA adapter"):
        build_chatbot(
            PipelineConfig(
                model_name_or_path=str(tiny_model),
                loading_config=LoadingModelConfig(peft_path=str(tmp_path / "empty")),
            )
        )


def test_prompt_longer_than_context_names_both_lengths(bf16_bot):
    with pytest.raises(PromptTooLongError) as err:
        bf16_bot.predict("word " * 3000)
    assert err.value.context_tokens == 2048
    assert err.value.prompt_tokens > 2048
    assert f"{err.value.prompt_tokens} tokens" in str(err.value)
    assert "2048 tokens" in str(err.value)


def test_near_full_context_shrinks_max_new_tokens(bf16_bot):
    ids, _ = bf16_bot.prepare([{"role": "user", "content": "word " * 10}])
    filler = "word " * (2040 - len(ids))
    ids, config = bf16_bot.prepare(
        [{"role": "user", "content": filler}], GenerationConfig(max_new_tokens=256)
    )
    assert len(ids) + config.max_new_tokens == 2048


@pytest.mark.parametrize("query", ["", "   ", "\n\t"])
def test_empty_query_is_refused(bf16_bot, query):
    with pytest.raises(EmptyQueryError, match="empty"):
        bf16_bot.predict(query)


def test_bad_generation_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="num_beams"):
        GenerationConfig(num_beams=4)


def test_dtype_falls_back_to_fp32_without_native_bf16(caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_dtype("bfloat16", "cpu", forced=False, native_bf16=False) == "float32"
    assert "no native bf16" in caplog.text
    assert resolve_dtype("bfloat16", "cpu", forced=True, native_bf16=False) == "bfloat16"
    assert resolve_dtype("auto", "cpu", forced=False, native_bf16=False) == "float32"
    assert resolve_dtype("auto", "cpu", forced=False, native_bf16=True) == "bfloat16"
    assert resolve_dtype("bfloat16", "cpu", forced=False, native_bf16=True) == "bfloat16"


def test_cli_predict_with_unloadable_model_is_one_line(cli):
    result = cli("predict", "--model", "no-such-org/no-such-model", "hello")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "cannot load the" in result.stderr and "no-such-org/no-such-model" in result.stderr
