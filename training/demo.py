"""The offline demo model: a tiny Llama taught the bundled sample FAQ.

No model can be downloaded here, so the quickstart makes one: ``init_tiny`` writes a random
tiny model, and ``finetune_model`` (the fine-tuning path of ``sprbot finetune`` and
``/retrain``; here a full fine-tune in the ``chat`` task) trains it on ``data/sample_faq.json``
until the chatbot, greedy, gives every answer word for word. It knows those twelve answers and
nothing else: it shows the pipeline working, not a useful assistant.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEMO_MAX_STEPS = 500  # it knows every answer after about 70 steps; this bounds a run that fails
SAMPLE_FAQ = Path(__file__).parent / "data" / "sample_faq.json"
DEMO_NOTE = """# sprbot offline demo model

This is NOT a real language model. It is a {params}-parameter Llama initialised at random by
`sprbot model init-tiny` and then trained for a minute or two on sprbot's bundled sample FAQ
({rows} questions). It answers those questions and produces nonsense for anything else.

Point sprbot at a real model with `SPRBOT_MODEL=<Hugging Face id or local folder>`, e.g.
`SPRBOT_MODEL=Intel/neural-chat-7b-v3-3`.
"""
# Each question is trained after this many different earlier exchanges. Measured over seeds
# 0-3: with 3, some runs never answered one question after an unseen exchange; with 4 or 5,
# every run answered all twelve from the first check on.
CONTEXTS = 5
# The check asks question i after exchange i + UNSEEN_OFFSET, which no training chat has: it
# shows that conversation memory does not derail the answers, rather than recalling a chat.
UNSEEN_OFFSET = 5
# Checking costs about two training steps: only every CHECK_EVERY steps, once the loss is low
# enough for it to have a chance.
CHECK_EVERY = 10
CHECK_BELOW_LOSS = 0.1


def load_pairs(path: Path = SAMPLE_FAQ) -> list[tuple[str, str]]:
    rows = json.loads(path.read_text())
    return [(r["instruction"], r["output"]) for r in rows]


def _chat(*exchanges: tuple[str, str]) -> list[dict[str, str]]:
    turns = []
    for question, answer in exchanges:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


def _training_chats(pairs: list[tuple[str, str]], seed: int) -> list[list[dict[str, str]]]:
    """Two-exchange chats: every question after CONTEXTS others, picked by ``seed``.

    The chat task learns every answer of a chat, so each chat teaches its first answer with no
    context and its second after one, and every answer is learned as often in each place.
    (Chats of one exchange on top, as an earlier version had, tilt the loss towards answers
    without context: the model then stalled at 11/12, failing one question after an exchange.)
    """
    n = len(pairs)
    offsets = [d for d in range(1, n) if d != UNSEEN_OFFSET]
    chosen = random.Random(seed).sample(offsets, CONTEXTS)
    return [_chat(pairs[(i + d) % n], pairs[i]) for d in chosen for i in range(n)]


@torch.no_grad()
def _recall(model, tokenizer, pairs: list[tuple[str, str]]) -> int:
    """How many questions the chatbot answers exactly, greedy, both alone and after an
    exchange it was not trained with, in float32 and in bfloat16 (how it is served on CPUs
    with native bf16)."""
    from inference import Chatbot, GenerationConfig, PipelineConfig

    bots = [
        Chatbot(
            copy.deepcopy(model).to(getattr(torch, dtype)),  # decoding freezes the weights
            tokenizer,
            config=PipelineConfig(model_name_or_path=model.name_or_path),
            device="cpu",
            dtype=dtype,
            backend="stock",
        )
        for dtype in ("float32", "bfloat16")
    ]
    hits = 0
    for i, (question, answer) in enumerate(pairs):
        # Room for the answer and a few tokens more: a longer reply is wrong either way.
        answer_tokens = len(tokenizer(answer, add_special_tokens=False).input_ids)
        greedy = GenerationConfig(do_sample=False, max_new_tokens=answer_tokens + 4)
        asks = [[], _chat(pairs[(i + UNSEEN_OFFSET) % len(pairs)])]
        hits += all(
            bot.chat([*history, {"role": "user", "content": question}], greedy).strip() == answer
            for history in asks
            for bot in bots
        )
    return hits


def _stop_when_recalled(tokenizer, pairs: list[tuple[str, str]]):
    """A Trainer callback that stops training once the chatbot gives every sample answer (see
    ``_recall``); its ``recalled`` is the last count."""
    # Imported here: transformers' Trainer modules take seconds to import, and `sprbot up --demo`
    # imports this module on every start, also when the demo model is built already.
    from transformers import TrainerCallback

    class StopWhenRecalled(TrainerCallback):
        loss: float | None = None
        recalled = 0

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % CHECK_EVERY or self.loss is None:
                return
            if self.loss >= CHECK_BELOW_LOSS:
                return
            self.recalled = _recall(model, tokenizer, pairs)
            if self.recalled == len(pairs):
                control.should_training_stop = True

    return StopWhenRecalled()


def build_demo_model(
    outdir: str | Path,
    *,
    max_steps: int = DEMO_MAX_STEPS,
    seed: int = 0,
    progress: Callable[[int, int, float | None], None] | None = None,
) -> Path:
    """Make the demo model in ``outdir`` (written atomically: a half-built one never shows).

    ``progress(step, max_steps, last_loss)`` is called as training goes; training stops
    before ``max_steps`` once every answer is right.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.tiny import init_tiny
    from training import (
        DataArguments,
        FinetuningArguments,
        ModelArguments,
        TextGenerationFinetuningConfig,
        TrainingArguments,
        finetune_model,
    )

    outdir = Path(outdir)
    staging = outdir.with_name(outdir.name + ".partial")
    pairs = load_pairs()
    chats = _training_chats(pairs, seed)
    with tempfile.TemporaryDirectory(prefix="sprbot-demo-") as tmp:  # the random model, data
        base = init_tiny(Path(tmp) / "base", size="tiny", seed=seed)
        data_file = Path(tmp) / "sample_faq_chats.json"
        data_file.write_text(json.dumps([{"messages": chat} for chat in chats]))
        tokenizer = AutoTokenizer.from_pretrained(base)
        stop = _stop_when_recalled(tokenizer, pairs)
        config = TextGenerationFinetuningConfig(
            model_args=ModelArguments(model_name_or_path=str(base)),
            data_args=DataArguments(train_file=str(data_file)),
            finetune_args=FinetuningArguments(task="chat", full_finetune=True),
            training_args=TrainingArguments(
                output_dir=str(staging),
                overwrite_output_dir=True,
                do_train=True,
                max_steps=max_steps,
                per_device_train_batch_size=len(chats),  # the whole set in every step
                learning_rate=3e-3,
                lr_scheduler_type="constant",
                warmup_steps=0,
                weight_decay=0.0,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                seed=seed,
                use_cpu=True,
            ),
        )
        started = time.perf_counter()
        # A 1M-parameter model's matrices are too small to split across cores: one thread does
        # the same work with far less CPU (8x less here, measured), above all on a busy machine.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = finetune_model(config, progress=progress, callbacks=[stop])
            steps = result.metrics["train_steps"]
            if stop.recalled < len(pairs):  # stopped at max_steps: count what it knows now
                model = AutoModelForCausalLM.from_pretrained(staging)
                stop.recalled = _recall(model, tokenizer, pairs)
        finally:
            torch.set_num_threads(threads)
        marker = json.loads((base / "sprbot.json").read_text())
    (log.info if stop.recalled == len(pairs) else log.warning)(
        "demo model: %d/%d answers after %d steps, %.0fs",
        stop.recalled,
        len(pairs),
        steps,
        time.perf_counter() - started,
    )
    note = DEMO_NOTE.format(params=f"{marker['parameters'] / 1e6:.1f}M", rows=len(pairs))
    (staging / "README.md").write_text(note)
    marker.update(kind="demo", recalled=stop.recalled, questions=len(pairs), steps=steps)
    (staging / "sprbot.json").write_text(json.dumps(marker))
    shutil.rmtree(outdir, ignore_errors=True)
    staging.rename(outdir)
    return outdir
