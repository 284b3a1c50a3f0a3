"""``finetune_model``: the seed's examples, real learning, bf16, outputs, bad data, DDP, the CLI.

Every model here is the random-init tiny Llama (``tiny_model``) and every dataset is written by
the test in the schema of the real one (alpaca_data.json, cnn_dailymail 3.0.0,
evol-codealpaca-v1). Training runs on one thread: the tiny model's matrices are too small to
split across cores, and one thread is several times faster on this shared machine.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from inference import GenerationConfig, LoadingModelConfig, PipelineConfig, build_chatbot

# Eight FAQ pairs that the random model cannot answer before it is trained on them.
FAQ = [
    ("Where is the office?", "The office is at 12 Harbour Street, second floor."),
    ("When is the team meeting?", "Every Monday at ten in the big meeting room."),
    ("How do I book a holiday?", "Ask your manager, then add it to the team calendar."),
    ("Who fixes the printer?", "Call the help desk on extension 400."),
    ("Can I work from home?", "Yes, up to two days a week."),
    ("Where do I park?", "Use the visitor car park behind the building."),
    ("What is the wifi password?", "It is printed on the card at reception."),
    ("How do I claim expenses?", "Fill in the expenses form and attach the receipts."),
]
GREEDY = GenerationConfig(do_sample=False, max_new_tokens=40)
TEXT = (
    "the team meets every week to plan work and review what shipped while the bot answers "
    "questions about holidays offices printers parking expenses and the wifi at reception"
)
WORDS = TEXT.split()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_json(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def faq_rows(pairs=FAQ) -> list[dict]:
    return [{"instruction": q, "input": "", "output": a} for q, a in pairs]


def sentence(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n)).capitalize() + "."


def config(model: Path | str, output_dir: Path, data: dict, training: dict | None = None, **ft):
    from training import (
        DataArguments,
        FinetuningArguments,
        ModelArguments,
        TextGenerationFinetuningConfig,
        TrainingArguments,
    )

    return TextGenerationFinetuningConfig(
        model_args=ModelArguments(model_name_or_path=str(model)),
        data_args=DataArguments(**data),
        training_args=TrainingArguments(
            output_dir=str(output_dir),
            do_train=True,
            report_to=[],
            save_strategy="no",
            disable_tqdm=True,
            seed=0,
            **(training or {}),
        ),
        finetune_args=FinetuningArguments(**ft),
    )


def answered(chatbot, pairs=FAQ) -> int:
    return sum(chatbot.predict(q, GREEDY) == a for q, a in pairs)


# -- the seed's three examples, with only their imports changed -------------------------------


def isolate_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep ``datasets.load_dataset``'s cache in the test's folder, not the user's."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


@pytest.fixture
def seed_dir(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory where the seed's names resolve offline: the model id and the two
    hub dataset ids are local folders of those names, alpaca_data.json a local file."""
    monkeypatch.chdir(tmp_path)
    isolate_datasets_cache(tmp_path, monkeypatch)
    shutil.copytree(tiny_model, tmp_path / "meta-llama" / "Llama-2-7b-chat-hf")
    write_json(
        tmp_path / "alpaca_data.json",
        [
            {"instruction": sentence(4 + i % 5, i), "input": sentence(i % 3, i), "output": s}
            for i, s in enumerate(sentence(3 + i % 9, 2 * i) for i in range(20))
        ],
    )
    cnn = tmp_path / "cnn_dailymail" / "3.0.0"  # the hub repository's layout
    for split, n in (("train", 12), ("validation", 3), ("test", 3)):
        write_jsonl(
            cnn / f"{split}.jsonl",
            [
                {"article": sentence(40 + i, i), "highlights": sentence(8, i), "id": f"{split}{i}"}
                for i in range(n)
            ],
        )
    write_jsonl(
        tmp_path / "theblackcat102" / "evol-codealpaca-v1" / "train.jsonl",
        [
            {
                "instruction": f"Write a function that returns {i}.",
                "output": f"def f():\n    return {i}\n",
            }
            for i in range(12)
        ],
    )
    return tmp_path


def seed_completion():
    from training import (  # was: transformers / intel_extension_for_transformers.neural_chat
        DataArguments,
        FinetuningArguments,
        ModelArguments,
        TextGenerationFinetuningConfig,
        TrainingArguments,
        finetune_model,
    )

    model_args = ModelArguments(model_name_or_path="meta-llama/Llama-2-7b-chat-hf")
    data_args = DataArguments(train_file="alpaca_data.json", validation_split_percentage=1)
    training_args = TrainingArguments(
        output_dir="./tmp",
        do_train=True,
        do_eval=True,
        num_train_epochs=3,
        overwrite_output_dir=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        save_strategy="no",
        log_level="info",
        save_total_limit=2,
        bf16=True,
    )
    finetune_args = FinetuningArguments()
    finetune_cfg = TextGenerationFinetuningConfig(
        model_args=model_args,
        data_args=data_args,
        training_args=training_args,
        finetune_args=finetune_args,
    )
    return finetune_model(finetune_cfg)


def seed_summarization():
    from training import (  # was: transformers / intel_extension_for_transformers.neural_chat
        DataArguments,
        FinetuningArguments,
        ModelArguments,
        TextGenerationFinetuningConfig,
        TrainingArguments,
        finetune_model,
    )

    model_args = ModelArguments(model_name_or_path="meta-llama/Llama-2-7b-chat-hf")
    data_args = DataArguments(dataset_name="cnn_dailymail", dataset_config_name="3.0.0")
    training_args = TrainingArguments(
        output_dir="./tmp",
        do_train=True,
        do_eval=True,
        num_train_epochs=3,
        overwrite_output_dir=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        save_strategy="no",
        log_level="info",
        save_total_limit=2,
        bf16=True,
    )
    finetune_args = FinetuningArguments(task="summarization")
    finetune_cfg = TextGenerationFinetuningConfig(
        model_args=model_args,
        data_args=data_args,
        training_args=training_args,
        finetune_args=finetune_args,
    )
    return finetune_model(finetune_cfg)


def seed_code_generation():
    from training import (  # was: transformers / intel_extension_for_transformers.neural_chat
        DataArguments,
        FinetuningArguments,
        ModelArguments,
        TextGenerationFinetuningConfig,
        TrainingArguments,
        finetune_model,
    )

    model_args = ModelArguments(model_name_or_path="meta-llama/Llama-2-7b-chat-hf")
    data_args = DataArguments(dataset_name="theblackcat102/evol-codealpaca-v1")
    training_args = TrainingArguments(
        output_dir="./tmp",
        do_train=True,
        do_eval=True,
        num_train_epochs=3,
        overwrite_output_dir=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        save_strategy="no",
        log_level="info",
        save_total_limit=2,
        bf16=True,
    )
    finetune_args = FinetuningArguments(task="code-generation")
    finetune_cfg = TextGenerationFinetuningConfig(
        model_args=model_args,
        data_args=data_args,
        training_args=training_args,
        finetune_args=finetune_args,
    )
    return finetune_model(finetune_cfg)


@pytest.mark.slow
@pytest.mark.parametrize(
    "example, task, train_rows, eval_rows",
    [
        (seed_completion, "completion", 19, 1),  # 1% of 20 rows, at least one, held out
        (seed_summarization, "summarization", 12, 3),  # the dataset's validation split
        (seed_code_generation, "code-generation", 12, 0),  # no validation data: eval skipped
    ],
    ids=["completion", "summarization", "code-generation"],
)
def test_seed_examples_run_with_only_imports_changed(
    seed_dir: Path, example, task, train_rows, eval_rows
):
    result = example()

    out = seed_dir / "tmp"
    assert result.output_dir == Path("./tmp") and out.is_dir()
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert (out / "tokenizer.json").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == task and metrics["bf16"] is True
    assert metrics["train_rows"] == train_rows and metrics["eval_rows"] == eval_rows
    assert math.isfinite(metrics["train_loss"])
    assert metrics["train_steps"] >= 3  # at least a step per epoch (4.x drops partial steps)
    if eval_rows:
        assert math.isfinite(metrics["eval_loss"])
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    else:
        assert "eval_loss" not in metrics
    if task == "summarization":
        assert metrics["eval_rouge_rows"] == 3
        for name in ("eval_rouge1", "eval_rouge2", "eval_rougeL"):
            assert 0.0 <= metrics[name] <= 1.0
    card = json.loads((out / "data_card.json").read_text())
    assert card["task"] == task
    assert card["base_model"] == "meta-llama/Llama-2-7b-chat-hf"
    assert card["train"]["rows_used"] == train_rows
    assert len(card["train"]["sha256"]) == 64
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (seed_dir / "tmp.partial").exists()


# -- learning is real -------------------------------------------------------------------------

# On a random tiny model, LoRA on the attention projections alone (the default) barely moves
# greedy outputs in a test-sized budget, so the LoRA run adapts every linear layer
# (lora_all_linear) at the default rank 8 with a high learning rate. The full fine-tune uses a
# learning rate usual for full training. The loss of the LoRA run stays high (~7.8): the
# frozen final norm and output head cap the logits of a random model near +-1.4, so the right
# token wins greedy decoding by at least ~0.2 logits (measured) without becoming likely. That
# margin is far above bf16 rounding (~0.01), and 150 epochs leave room to spare (100 suffice).
METHODS = {
    "lora": ({"learning_rate": 1e-2, "num_train_epochs": 150}, {"lora_all_linear": True}),
    "full": ({"learning_rate": 1e-3, "num_train_epochs": 120}, {"full_finetune": True}),
}


@pytest.fixture(scope="module")
def faq_runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """Each method trained once on the eight FAQ pairs (bf16, one batch of 8)."""
    from training import finetune_model

    runs = {}
    root = tmp_path_factory.mktemp("faq")
    data = write_json(root / "faq.json", faq_rows())

    def run(method: str):
        if method not in runs:
            training, ft = METHODS[method]
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                runs[method] = finetune_model(
                    config(
                        tiny_model,
                        root / method,
                        {"train_file": str(data)},
                        {"per_device_train_batch_size": 8, "bf16": True, **training},
                        **ft,
                    )
                )
            finally:
                torch.set_num_threads(threads)
        return runs[method]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_learning_is_real(tiny_model: Path, faq_runs, method: str):
    assert answered(build_chatbot(PipelineConfig(model_name_or_path=str(tiny_model)))) == 0

    result = faq_runs(method)

    if method == "lora":  # served the way the registry serves an adapter
        served = PipelineConfig(
            model_name_or_path=str(tiny_model),
            loading_config=LoadingModelConfig(peft_path=str(result.adapter_path)),
        )
    else:
        served = PipelineConfig(model_name_or_path=str(result.model_path))
    chatbot = build_chatbot(served)
    assert chatbot.dtype == "bfloat16"  # served as users are served on this CPU
    assert answered(chatbot) >= 7


@pytest.mark.slow
def test_bf16_losses_are_finite_and_outputs_complete(faq_runs):
    result = faq_runs("lora")

    history = json.loads(result.loss_history_path.read_text())
    losses = [p["loss"] for p in history["train"]]
    assert len(losses) >= 50  # one point per few steps: loss.png has a curve
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["bf16"] is True and metrics["method"] == "lora"
    assert metrics["train_steps"] == 150
    assert metrics["trainable_parameters"] < metrics["parameters"] / 10
    assert metrics["train_tokens"] == 150 * result.data_card["tokens_per_epoch"]
    card = json.loads(result.data_card_path.read_text())
    assert card["train"]["rows_used"] == 8 and card["prompt_template"] == "chat-template"
    assert card["lora"]["lora_all_linear"] is True and card["lora"]["lora_rank"] == 8
    assert result.loss_plot_path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_merged_export_serves_without_peft(faq_runs, tmp_path: Path):
    result = faq_runs("lora")

    merged = result.export_merged(tmp_path / "merged")

    assert not (merged / "adapter_config.json").exists()
    assert (merged / "model.safetensors").exists() and (merged / "tokenizer.json").exists()
    card = json.loads((merged / "data_card.json").read_text())
    assert card["merged_from_adapter"] == str(result.output_dir)
    assert answered(build_chatbot(PipelineConfig(model_name_or_path=str(merged)))) >= 7


@pytest.mark.slow
def test_full_finetune_has_no_adapter_to_merge(faq_runs, tmp_path: Path):
    from training import FinetuneError

    result = faq_runs("full")

    assert result.adapter_path is None and (result.output_dir / "model.safetensors").exists()
    with pytest.raises(FinetuneError, match="already a full model"):
        result.export_merged(tmp_path / "merged")


# -- prompts, masks, truncation, padding ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_chatbot(tiny_model: Path):
    return build_chatbot(PipelineConfig(model_name_or_path=str(tiny_model)))


def encoder(chatbot, **limits):
    from training.data import Encoder

    return Encoder(
        chatbot.tokenizer,
        model_name=chatbot.config.model_name_or_path,
        model_type=chatbot.model_type,
        max_seq_length=limits.get("max_seq_length", 512),
        max_source_length=limits.get("max_source_length", 384),
        max_target_length=limits.get("max_target_length"),
        train_on_inputs=limits.get("train_on_inputs", False),
    )


def test_training_prompt_is_the_serving_prompt_and_only_answers_count(tiny_chatbot):
    tokenizer = tiny_chatbot.tokenizer
    q, a = FAQ[0]

    (example,) = encoder(tiny_chatbot).encode(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    )

    prompt_ids, _ = tiny_chatbot.prepare([{"role": "user", "content": q}])
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert example["labels"][: len(prompt_ids)] == [-100] * len(prompt_ids)
    answer = [t for t in example["labels"] if t != -100]
    assert answer == example["input_ids"][len(prompt_ids) :]
    assert tokenizer.decode(answer).startswith(a + tokenizer.eos_token)

    (everything,) = encoder(tiny_chatbot, train_on_inputs=True).encode(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    )
    assert everything["labels"] == everything["input_ids"]


def test_a_conversation_trains_every_answer_after_its_serving_prompt(tiny_chatbot):
    turns = [
        {"role": "user", "content": "Hi, who are you?"},
        {"role": "assistant", "content": "I am the team's bot."},
        {"role": "user", "content": "Where is the office?"},
        {"role": "assistant", "content": FAQ[0][1]},
    ]

    (example,) = encoder(tiny_chatbot).encode(turns)

    ids, labels = example["input_ids"], example["labels"]
    for upto in (1, 3):  # each answer follows exactly what Chatbot.chat would send
        prompt_ids, _ = tiny_chatbot.prepare(turns[:upto])
        assert ids[: len(prompt_ids)] == prompt_ids
        assert labels[len(prompt_ids)] == ids[len(prompt_ids)] != -100
        assert labels[len(prompt_ids) - 1] == -100
    learned = tiny_chatbot.tokenizer.decode([t for t in labels if t != -100])
    eos = tiny_chatbot.tokenizer.eos_token
    assert learned == f"I am the team's bot.{eos}\n{FAQ[0][1]}{eos}\n"


def test_long_prompts_and_answers_are_cut_to_the_configured_lengths(tiny_chatbot):
    article = sentence(600)
    turns = [
        {"role": "user", "content": f"Summarize the highlights of this article.\n\n{article}"},
        {"role": "assistant", "content": sentence(300)},
    ]

    (example,) = encoder(
        tiny_chatbot, max_seq_length=160, max_source_length=100, max_target_length=40
    ).encode(turns)

    prompt = next(i for i, t in enumerate(example["labels"]) if t != -100)
    assert prompt <= 100 and len(example["input_ids"]) - prompt == 40
    text = tiny_chatbot.tokenizer.decode(example["input_ids"][:prompt])
    assert "Summarize the highlights of this article." in text  # the article was cut, not it
    assert text.rstrip().endswith("<|assistant|>")  # the prompt still ends as served

    (completion,) = encoder(tiny_chatbot, max_seq_length=160, max_source_length=100).encode(turns)
    assert len(completion["input_ids"]) == 160  # no target limit: the sequence limit


def test_batches_are_padded_to_their_longest_sequence_only(tiny_chatbot):
    from training.data import PadCollator

    short = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}
    longer = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}

    batch = PadCollator(pad_token_id=3)([short, longer])

    assert batch["input_ids"].tolist() == [[5, 6, 7, 3, 3], [5, 6, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 7, 8, 9]]


@pytest.mark.slow
def test_mixed_length_faq_batches_carry_little_padding(tiny_model: Path, tmp_path: Path):
    from training import finetune_model

    rows = [
        {
            "instruction": f"Question {i}: {sentence(3 + i % 7, i)}",
            "output": sentence(2 + 7 * i % 61, i),
        }
        for i in range(128)
    ]
    data = write_json(tmp_path / "faq.json", rows)

    result = finetune_model(
        config(
            tiny_model,
            tmp_path / "out",
            {"train_file": str(data)},
            {"per_device_train_batch_size": 8, "num_train_epochs": 1},
        )
    )

    assert result.metrics["train_tokens"] == result.data_card["tokens_per_epoch"]  # each row once
    assert result.metrics["train_padding_fraction"] <= 0.05


def test_chat_rows_train_end_to_end(tiny_model: Path, tmp_path: Path):
    from training import finetune_model

    rows = [
        {
            "messages": [
                {"role": "system", "content": "You answer office questions."},
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
                {"role": "user", "content": "Thanks!"},
                {"role": "assistant", "content": "You are welcome."},
            ]
        }
        for q, a in FAQ
    ]
    data = write_jsonl(tmp_path / "chats.jsonl", rows)

    result = finetune_model(
        config(
            tiny_model,
            tmp_path / "out",
            {"train_file": str(data), "validation_split_percentage": 25},
            {"max_steps": 3, "per_device_train_batch_size": 4, "do_eval": True},
            task="chat",
        )
    )

    assert result.metrics["train_rows"] == 6 and result.metrics["eval_rows"] == 2
    assert result.metrics["train_examples"] == 6  # one sequence per conversation
    assert math.isfinite(result.metrics["eval_loss"])


# -- bad data, bad options, and what is left on disk ------------------------------------------


def _alpaca_missing_output(tmp_path: Path) -> tuple[Path, str]:
    rows = faq_rows()
    del rows[2]["output"]
    return write_json(tmp_path / "faq.json", rows), "row 3: required field 'output' is missing"


def _csv_empty_instruction(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "faq.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["instruction", "input", "output"])
        writer.writerow([FAQ[0][0], "", FAQ[0][1]])
        writer.writerow(["", "", FAQ[1][1]])
    return path, "row 2 (line 3): required field 'instruction' is empty"


def _jsonl_not_json(tmp_path: Path) -> tuple[Path, str]:
    path = write_jsonl(tmp_path / "faq.jsonl", faq_rows()[:3])
    path.write_text(path.read_text() + '{"instruction": "Half a row\n')
    return path, "row 4 (line 4) is not valid JSON"


def _output_not_text(tmp_path: Path) -> tuple[Path, str]:
    rows = faq_rows()
    rows[5]["output"] = 42
    return write_json(tmp_path / "faq.json", rows), "row 6: field 'output' must be text"


@pytest.mark.parametrize(
    "make_file", [_alpaca_missing_output, _csv_empty_instruction, _jsonl_not_json, _output_not_text]
)
def test_bad_data_names_file_row_and_field_and_trains_nothing(
    tiny_model: Path, tmp_path: Path, make_file
):
    from training import DataError, finetune_model

    path, problem = make_file(tmp_path)
    out = tmp_path / "out"

    with pytest.raises(DataError) as caught:
        finetune_model(config(tiny_model, out, {"train_file": str(path)}))

    assert str(caught.value).startswith(str(path))
    assert problem in str(caught.value)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize(
    "task, row, problem",
    [
        ("summarization", {"article": "Text."}, "required field 'highlights' is missing"),
        (
            "chat",
            {"messages": [{"role": "assistant", "content": "Hello"}]},
            "messages[0].role is 'assistant', expected system or user",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "?"}]},
            "messages[1].role is 'user', expected assistant",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": "Hi"}]},
            "field 'messages' has no assistant turn",
        ),
    ],
)
def test_each_task_checks_its_schema(tiny_model: Path, tmp_path: Path, task, row, problem):
    from training import DataError, finetune_model

    good = {
        "summarization": {"article": "An article.", "highlights": "A summary."},
        "chat": {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ]
        },
    }[task]
    path = write_jsonl(tmp_path / "data.jsonl", [good, row])

    with pytest.raises(DataError, match=re.escape(f"data.jsonl, row 2 (line 2): {problem}")):
        finetune_model(config(tiny_model, tmp_path / "out", {"train_file": str(path)}, task=task))


def test_a_hub_dataset_offline_says_so(tiny_model: Path, tmp_path: Path, monkeypatch):
    from training import DataError, finetune_model

    monkeypatch.chdir(tmp_path)  # no local folder of that name
    isolate_datasets_cache(tmp_path, monkeypatch)

    with pytest.raises(DataError, match="cannot be reached \\(offline\\)"):
        finetune_model(
            config(
                tiny_model,
                tmp_path / "out",
                {"dataset_name": "cnn_dailymail", "dataset_config_name": "3.0.0"},
            )
        )


def test_a_failed_run_keeps_the_previous_output_and_cleans_up(tiny_model: Path, tmp_path: Path):
    from training import finetune_model

    data = write_json(tmp_path / "faq.json", faq_rows())
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_model.safetensors").write_text("the serving adapter")
    stale = tmp_path / "out.partial"  # left by a run that was killed
    stale.mkdir()
    (stale / "junk").write_text("")

    def stop_at_step_2(step: int, total: int, loss: float | None) -> None:
        assert stale.exists() is False  # cleared before training started
        if step == 2:
            raise KeyboardInterrupt  # what Ctrl-C or a cancelled job raises mid-training

    with pytest.raises(KeyboardInterrupt):
        finetune_model(
            config(tiny_model, out, {"train_file": str(data)}, {"overwrite_output_dir": True}),
            progress=stop_at_step_2,
        )

    assert (out / "adapter_model.safetensors").read_text() == "the serving adapter"
    assert not stale.exists()


def test_an_existing_output_dir_is_not_replaced_unless_asked(tiny_model: Path, tmp_path: Path):
    from training import FinetuneConfigError, finetune_model

    data = write_json(tmp_path / "faq.json", faq_rows())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")

    with pytest.raises(FinetuneConfigError, match="already holds files"):
        finetune_model(config(tiny_model, tmp_path / "out", {"train_file": str(data)}))
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_neural_chat_defaults_and_refused_options():
    from training import DataArguments, FinetuneConfigError, FinetuningArguments

    ft = FinetuningArguments()
    assert (ft.task, ft.peft, ft.lora_rank, ft.lora_alpha, ft.lora_dropout) == (
        "completion",
        "lora",
        8,
        16,
        0.05,
    )
    assert ft.lora_target_modules is None and not ft.lora_all_linear and not ft.full_finetune
    assert not ft.train_on_inputs and ft.eval_ppl
    data = DataArguments(train_file="x.json")
    assert (data.max_seq_length, data.max_source_length, data.max_target_length) == (512, 384, 128)
    assert data.validation_split_percentage == 0 and data.max_train_samples is None

    with pytest.raises(FinetuneConfigError, match="task must be one of completion, chat"):
        FinetuningArguments(task="translation")
    with pytest.raises(FinetuneConfigError, match="qlora=True needs bitsandbytes"):
        FinetuningArguments(qlora=True)
    with pytest.raises(FinetuneConfigError, match="peft='prefix' is not supported"):
        FinetuningArguments(peft="prefix")
    with pytest.raises(FinetuneConfigError, match="train_file.*or dataset_name"):
        DataArguments()
    with pytest.raises(FinetuneConfigError, match="use a .json, .jsonl or .csv file"):
        DataArguments(train_file="faq.txt")


def test_config_files_take_sections_or_one_flat_mapping(tmp_path: Path):
    from training import FinetuneConfigError, load_config

    sections = tmp_path / "cfg.yaml"
    sections.write_text(
        "model_args: {model_name_or_path: m}\n"
        "data_args: {train_file: faq.json, max_seq_length: 256}\n"
        "training_args: {output_dir: out, num_train_epochs: 2, bf16: true}\n"
        "finetune_args: {task: chat, lora_rank: 4}\n"
    )
    flat = tmp_path / "cfg.json"
    flat.write_text(
        json.dumps(
            {
                "model_name_or_path": "m",
                "train_file": "faq.json",
                "max_seq_length": 256,
                "output_dir": "out",
                "num_train_epochs": 2,
                "bf16": True,
                "task": "chat",
                "lora_rank": 4,
            }
        )
    )
    for path in (sections, flat):
        cfg = load_config(path)
        assert cfg.model_args.model_name_or_path == "m"
        assert cfg.data_args.max_seq_length == 256
        assert cfg.training_args.num_train_epochs == 2 and cfg.training_args.bf16
        assert cfg.finetune_args.task == "chat" and cfg.finetune_args.lora_rank == 4

    flat.write_text(json.dumps({"model_name_or_path": "m", "train_file": "f.json", "lora_rnak": 4}))
    with pytest.raises(FinetuneConfigError, match="cfg.json: unknown option 'lora_rnak'"):
        load_config(flat)
    sections.write_text(
        "model_args: {}\ndata_args: {train_file: f.json}\nfinetune_args: {rank: 4}\n"
    )
    with pytest.raises(FinetuneConfigError, match="finetune_args has no option 'rank'"):
        load_config(sections)


# -- the shell, and more than one process ------------------------------------------------------


@pytest.mark.slow
def test_sprbot_finetune_from_a_config_file(cli, tiny_model: Path, tmp_path: Path):
    data = write_json(tmp_path / "faq.json", faq_rows())
    cfg = tmp_path / "finetune.yaml"

    def write_config(out: str) -> None:
        cfg.write_text(
            f"model_args: {{model_name_or_path: {tiny_model}}}\n"
            f"data_args: {{train_file: {data}}}\n"
            f"training_args: {{output_dir: {tmp_path / out}, do_train: true, max_steps: 4, "
            "bf16: true, save_strategy: 'no', report_to: []}\n"
            "finetune_args: {lora_all_linear: true}\n"
        )

    write_config("out")
    env = {"OMP_NUM_THREADS": "1"}

    done = cli("finetune", "--config", str(cfg), "--merge-to", str(tmp_path / "merged"), env=env)

    assert done.returncode == 0, done.stderr
    assert f"wrote the LoRA adapter to {tmp_path / 'out'}" in done.stdout
    assert "train_loss: " in done.stdout
    assert f"wrote the merged model to {tmp_path / 'merged'}" in done.stdout
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert (tmp_path / "merged" / "model.safetensors").exists()

    rows = faq_rows()
    rows[6]["output"] = ""
    data.write_text(json.dumps(rows))
    write_config("out2")
    failed = cli("finetune", "--config", str(cfg), env=env)
    assert failed.returncode == 2
    assert f"sprbot: {data}, row 7: required field 'output' is empty" in failed.stderr
    assert not (tmp_path / "out2").exists()


DDP_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from training import (DataArguments, FinetuningArguments, ModelArguments,
                      TextGenerationFinetuningConfig, TrainingArguments, finetune_model)

model, data, out = sys.argv[1:4]
result = finetune_model(TextGenerationFinetuningConfig(
    model_args=ModelArguments(model_name_or_path=model),
    data_args=DataArguments(train_file=data),
    training_args=TrainingArguments(output_dir=out, do_train=True, num_train_epochs=1,
                                    per_device_train_batch_size=4, bf16=True, report_to=[],
                                    save_strategy="no", disable_tqdm=True, seed=0),
    finetune_args=FinetuningArguments(lora_all_linear=True)))
rank = torch.distributed.get_rank()
# One file per process: their stdout lines would interleave.
Path(out + f".rank{rank}.json").write_text(json.dumps(
    {"world": torch.distributed.get_world_size(), "steps": result.metrics["train_steps"]}))
"""


@pytest.mark.slow
def test_runs_unchanged_under_torchrun_with_two_processes(tiny_model: Path, tmp_path: Path):
    data = write_json(tmp_path / "faq.json", faq_rows(FAQ + [(q + " Again?", a) for q, a in FAQ]))
    script = tmp_path / "train.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + [str(script), str(tiny_model), str(data), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    # 16 rows, 4 per process per step, 2 processes: 2 steps (one process would take 4).
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"out.rank{rank}.json").read_text())
        assert seen == {"world": 2, "steps": 2}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    card = json.loads((out / "data_card.json").read_text())
    assert metrics["train_tokens"] == card["tokens_per_epoch"]  # each row once, across both
    assert not (tmp_path / "out.partial").exists()
    served = PipelineConfig(
        model_name_or_path=str(tiny_model), loading_config=LoadingModelConfig(peft_path=str(out))
    )
    assert build_chatbot(served).predict(FAQ[0][0], GREEDY)


@pytest.mark.slow
@pytest.mark.ipex
def test_ipex_trains_where_installed_and_what_it_trains_is_right(
    cli, tiny_model: Path, tmp_path: Path
):
    from inference.device import ipex_status

    assert ipex_status()[0], ipex_status()[1]
    data = write_json(tmp_path / "faq.json", faq_rows())
    training, ft = METHODS["lora"]
    cfg = tmp_path / "finetune.json"
    cfg.write_text(
        json.dumps(
            {
                "model_name_or_path": str(tiny_model),
                "train_file": str(data),
                "output_dir": str(tmp_path / "out"),
                "do_train": True,
                "per_device_train_batch_size": 8,
                "bf16": True,
                "report_to": [],
                **training,
                **ft,
            }
        )
    )

    # A fresh process: IPEX cannot train in one where build_chatbot already used it.
    done = cli("finetune", "--config", str(cfg), env={"OMP_NUM_THREADS": "1"})

    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["ipex"] is True and math.isfinite(metrics["train_loss"])
    served = PipelineConfig(
        model_name_or_path=str(tiny_model),
        loading_config=LoadingModelConfig(peft_path=str(tmp_path / "out")),
    )
    assert answered(build_chatbot(served)) >= 7
