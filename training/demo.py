"""The offline demo model: a tiny Llama taught the bundled sample FAQ.

No model can be downloaded here, so the quickstart makes one: ``init_tiny`` writes a random
tiny model, and a short full fine-tune on ``data/sample_faq.json`` (chat template, loss on the
answer tokens only) runs until greedy decoding reproduces every answer. It knows those twelve
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

log = logging.getLogger(__name__)

DEMO_MAX_STEPS = 1500  # it usually knows every answer after 600
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


def _encode(
    tokenizer, question: str, answer: str, history: tuple[str, str] | None = None
) -> tuple[list[int], int]:
    """Token ids of the whole exchange (after an earlier one), and where the answer starts."""
    turns = [{"role": "user", "content": question}]
    if history:
        turns = [
            {"role": "user", "content": history[0]},
            {"role": "assistant", "content": history[1]},
            *turns,
        ]
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


def build_demo_model(
    outdir: str | Path,
    *,
    max_steps: int = DEMO_MAX_STEPS,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
) -> Path:
    """Make the demo model in ``outdir`` (written atomically: a half-built one never shows)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.tiny import init_tiny

    outdir = Path(outdir)
    staging = outdir.with_name(outdir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    init_tiny(staging, size="tiny", seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(staging)
    model = AutoModelForCausalLM.from_pretrained(staging)
    pairs = load_pairs()

    # Each question alone, and after other exchanges: chats through the bus carry memory.
    encoded = [_encode(tokenizer, q, a, history) for q, a, history in _examples(pairs, seed)]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, start) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, start : len(ids)] = torch.tensor(ids[start:])
        attention[row, : len(ids)] = 1

    torch.manual_seed(seed)
    # A 1M-parameter model's matrices are too small to split across cores: one thread does
    # the same work with far less CPU (8x less here, measured), above all on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(
            model,
            tokenizer,
            pairs,
            (input_ids, attention, labels),
            staging,
            outdir,
            max_steps,
            progress,
        )
    finally:
        torch.set_num_threads(threads)


def _train(
    model, tokenizer, pairs, batch, staging: Path, outdir: Path, max_steps: int, progress
) -> Path:
    input_ids, attention, labels = batch
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    started = time.perf_counter()
    for step in range(1, max_steps + 1):
        # The vocabulary projection dominates a tiny model's cost: apply it only where a
        # label is (the answers), not at every prompt position.
        hidden = model.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
        targets = labels[:, 1:]
        where = targets != -100
        logits = model.lm_head(hidden[:, :-1][where])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[where])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if progress:
            progress(step, max_steps, loss.item())
        # Greedy recall over 24 prompts costs as much as ~60 steps: check now and then.
        if step % 100 == 0 and loss.item() < 0.01:
            model.eval()
            if _recall(model, tokenizer, pairs) == len(pairs):
                break
            model.train()
    model.eval()
    recalled = _recall(model, tokenizer, pairs)
    log.info(
        "demo model: %d/%d answers after %d steps, %.0fs",
        recalled,
        len(pairs),
        step,
        time.perf_counter() - started,
    )
    model.save_pretrained(staging)
    params = sum(p.numel() for p in model.parameters())
    note = DEMO_NOTE.format(params=f"{params / 1e6:.1f}M", rows=len(pairs))
    (staging / "README.md").write_text(note)
    marker = json.loads((staging / "sprbot.json").read_text())
    marker.update(kind="demo", recalled=recalled, questions=len(pairs), steps=step)
    (staging / "sprbot.json").write_text(json.dumps(marker))
    shutil.rmtree(outdir, ignore_errors=True)
    staging.rename(outdir)
    return outdir
