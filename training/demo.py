"""The offline demo model: a tiny Llama taught the bundled sample FAQ.

No model can be downloaded here, so the quickstart makes one: ``init_tiny`` writes a random
tiny model, and ``finetune_model`` (a full fine-tune in the ``chat`` task: loss on the answer
tokens only) trains it on ``data/sample_faq.json`` until greedy decoding reproduces every
answer. It knows those twelve
answers and nothing else: it shows the pipeline working, not a useful assistant.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)

DEMO_MAX_STEPS = 1500  # it usually knows every answer after 200-600
SAMPLE_FAQ = Path(__file__).parent / "data" / "sample_faq.json"
DEMO_NOTE = """# sprbot offline demo model

This is NOT a real language model. It is a {params}-parameter Llama initialised at random by
`sprbot model init-tiny` and then trained for a few minutes on sprbot's bundled sample FAQ
({rows} questions). It answers those questions and produces nonsense for anything else.

Point sprbot at a real model with `SPRBOT_MODEL=<Hugging Face id or local folder>`, e.g.
`SPRBOT_MODEL=Intel/neural-chat-7b-v3-3`.
"""


def load_pairs(path: Path = SAMPLE_FAQ) -> list[tuple[str, str]]:
    rows = json.loads(path.read_text())
    return [(r["instruction"], r["output"]) for r in rows]


def _turns(
    question: str, answer: str | None, history: tuple[str, str] | None = None
) -> list[dict[str, str]]:
    """The exchange as chat turns, after an earlier one if given; without the answer if None."""
    turns = [{"role": "user", "content": question}]
    if history:
        turns = [
            {"role": "user", "content": history[0]},
            {"role": "assistant", "content": history[1]},
            *turns,
        ]
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return turns


def _encode(
    tokenizer, question: str, answer: str, history: tuple[str, str] | None = None
) -> tuple[list[int], int]:
    """Token ids of the whole exchange (after an earlier one), and where the answer starts."""
    turns = _turns(question, None, history)
    prompt = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [*turns, {"role": "assistant", "content": answer}], tokenize=False
    )
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    full_ids = tokenizer(full, add_special_tokens=False).input_ids
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not extend the prompt; cannot mask it")
    return full_ids, len(prompt_ids)


def _examples(
    pairs: list[tuple[str, str]], seed: int, contexts: int = 3
) -> list[tuple[str, str, tuple[str, str] | None]]:
    """Every question alone and after ``contexts`` other exchanges picked at random."""
    rng = random.Random(seed)
    examples: list[tuple[str, str, tuple[str, str] | None]] = [(q, a, None) for q, a in pairs]
    for i, (question, answer) in enumerate(pairs):
        others = [p for j, p in enumerate(pairs) if j != i]
        examples += [(question, answer, h) for h in rng.sample(others, contexts)]
    return examples


@torch.no_grad()
def _recall(model, tokenizer, pairs: list[tuple[str, str]]) -> int:
    """How many answers greedy decoding reproduces exactly, both alone and after an exchange
    it was not trained with."""
    hits = 0
    for i, (question, answer) in enumerate(pairs):
        hits += all(
            _answers(model, tokenizer, *_encode(tokenizer, question, answer, history), answer)
            for history in (None, pairs[(i + 5) % len(pairs)])
        )
    return hits


def _answers(model, tokenizer, ids: list[int], start: int, answer: str) -> bool:
    prompt = torch.tensor([ids[:start]])
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=len(ids) - start + 4,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = tokenizer.decode(out[0, start:], skip_special_tokens=True)
    return text.strip() == answer


class _StopWhenRecalled(TrainerCallback):
    """Stops training once greedy decoding reproduces every sample answer.

    Greedy recall over 24 prompts costs as much as ~60 steps, so it is checked only every
    ``every`` steps and only once the loss is low enough for it to have a chance.
    """

    def __init__(self, tokenizer, pairs: list[tuple[str, str]], every: int = 100) -> None:
        self.tokenizer = tokenizer
        self.pairs = pairs
        self.every = every
        self.loss: float | None = None
        self.recalled = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every or self.loss is None or self.loss >= 0.01:
            return
        model.eval()
        self.recalled = _recall(model, self.tokenizer, self.pairs)
        model.train()
        if self.recalled == len(self.pairs):
            control.should_training_stop = True


def build_demo_model(
    outdir: str | Path,
    *,
    max_steps: int = DEMO_MAX_STEPS,
    seed: int = 0,
    progress: Callable[[int, int, float | None], None] | None = None,
) -> Path:
    """Make the demo model in ``outdir`` (written atomically: a half-built one never shows).

    It goes through ``finetune_model`` like any other fine-tune: a full fine-tune (the model
    is tiny) in the ``chat`` task on the sample FAQ, each question alone and after other
    exchanges, since chats through the bus carry memory.
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
    base = outdir.with_name(outdir.name + ".base")
    trained = outdir.with_name(outdir.name + ".trained")
    shutil.rmtree(base, ignore_errors=True)
    init_tiny(base, size="tiny", seed=seed)
    pairs = load_pairs()
    examples = _examples(pairs, seed)
    data_file = base / "sample_faq_chats.json"
    data_file.write_text(json.dumps([{"messages": _turns(*example)} for example in examples]))

    tokenizer = AutoTokenizer.from_pretrained(base)
    stop = _StopWhenRecalled(tokenizer, pairs)
    config = TextGenerationFinetuningConfig(
        model_args=ModelArguments(model_name_or_path=str(base)),
        data_args=DataArguments(train_file=str(data_file)),
        finetune_args=FinetuningArguments(task="chat", full_finetune=True),
        training_args=TrainingArguments(
            output_dir=str(trained),
            overwrite_output_dir=True,
            do_train=True,
            max_steps=max_steps,
            per_device_train_batch_size=len(examples),  # the whole set in every step
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
    finally:
        torch.set_num_threads(threads)
    steps = result.metrics["train_steps"]
    if stop.recalled < len(pairs):  # stopped at max_steps: count what it knows now
        model = AutoModelForCausalLM.from_pretrained(trained)
        stop.recalled = _recall(model.eval(), tokenizer, pairs)
    log.info(
        "demo model: %d/%d answers after %d steps, %.0fs",
        stop.recalled,
        len(pairs),
        steps,
        time.perf_counter() - started,
    )
    params = json.loads((base / "sprbot.json").read_text())["parameters"]
    (trained / "README.md").write_text(
        DEMO_NOTE.format(params=f"{params / 1e6:.1f}M", rows=len(pairs))
    )
    marker = json.loads((base / "sprbot.json").read_text())
    marker.update(kind="demo", recalled=stop.recalled, questions=len(pairs), steps=steps)
    (trained / "sprbot.json").write_text(json.dumps(marker))
    shutil.rmtree(outdir, ignore_errors=True)
    trained.rename(outdir)
    shutil.rmtree(base, ignore_errors=True)
    return outdir
