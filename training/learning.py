"""What ``/retrain`` trains on and how it judges the result, measured on a real model.

The recipe (docs/FINETUNING.md has what was tried and why):

- **LoRA on the MLP layers** (``SPRBOT_TRAIN_LORA_LAYERS=mlp``), learning rate 1e-3, 10 epochs.
- **Replay**: the base model's own greedy answers to a fixed set of general prompts
  (``data/general_prompts.json``, ``replay``) are trained next to the FAQ. A learning rate
  high enough for a small LoRA to learn new facts makes it forget without them.
- **Loss on answer tokens only**, prompts built as serving builds them (``finetune_model``).

The gate measures what users feel, not exact strings:

- **FAQ recall**: the share of FAQ questions whose greedy answer carries the entry's key fact,
  and the same on **paraphrases the job makes** by asking the serving model to reword each
  question (never trained on). ``carries`` judges by the answer's distinctive tokens (numbers,
  names, commands), else by meaning (the bundled MiniLM).
- **General retention**: the candidate's loss on the base model's own answers to other fixed
  prompts (``retention``, never trained on), against the base model's loss on them.
- A candidate is promoted only if it recalls more than the serving model and forgets no more
  than the tolerance allows.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import random
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GENERAL_PROMPTS = Path(__file__).parent / "data" / "general_prompts.json"
# The MLP projections' names across model families (Llama/Mistral/Qwen, Mixtral's experts,
# Phi, Falcon): LoRA there learned the FAQ and forgot less than on every linear layer.
MLP_MODULES = (
    "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3", "fc1", "fc2",
    "dense_h_to_4h", "dense_4h_to_h",
)  # fmt: skip
BASE_ANSWER_TOKENS = 96  # replay and retention answers: long enough to carry the model's style
ANSWER_TOKENS = 64  # FAQ and paraphrase answers, as judged
EVAL_MAX_ROWS = 48  # a large FAQ is judged on a fixed sample of its entries, to bound the time
KEY_RECALL = 0.5  # share of an answer's distinctive tokens a right answer must carry
SIMILAR = 0.7  # MiniLM cosine for an answer without distinctive tokens
# Few-shot turns: a 135M model asked plainly to reword a question answers it instead.
PARAPHRASE_PROMPT = "Reword this question: {question}"
PARAPHRASE_SHOTS = (
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("Where is the nearest coffee machine?", "Which coffee machine is closest to me?"),
    ("When does the library close?", "At what time does the library close?"),
    ("Who runs the design team?", "Who is the head of the design team?"),
)
PARAPHRASE_SAMPLES = 3  # sampled attempts after the greedy one
PARAPHRASE_SIMILAR = 0.6  # MiniLM cosine to the question: less is another question
_STOP_WORDS = (
    "a an the is are was were be been to of in on at by for with and or not no yes it its "
    "this that these those you your i we our they their he she his her my me do does did can "
    "could will would should may might must have has had from as if so but about into over "
    "under than then there here what which who whom when where why how all any each every "
    "some"
)
_STOP = frozenset(_STOP_WORDS.split())
_WORD = re.compile(r"[#@/]?[\w][\w'.:/#@-]*[\w]|[#@/]?\w")


@dataclass(frozen=True)
class BaseAnswers:
    """The base model's greedy answers to the fixed general prompts, and its own loss on its
    retention answers (the yardstick for forgetting)."""

    replay: list[tuple[str, str]]
    retention: list[tuple[str, str]]
    retention_loss: float

    def to_json(self) -> dict[str, Any]:
        return {
            "replay": self.replay,
            "retention": self.retention,
            "retention_loss": self.retention_loss,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> BaseAnswers:
        return cls(
            [tuple(p) for p in raw["replay"]],
            [tuple(p) for p in raw["retention"]],
            float(raw["retention_loss"]),
        )


def general_prompts() -> dict[str, list[str]]:
    raw = json.loads(GENERAL_PROMPTS.read_text())
    return {"replay": raw["replay"], "retention": raw["retention"]}


def base_answers(base_config, cache_dir: Path) -> BaseAnswers:
    """The base model's answers, generated once per base model and prompt set (cached in
    ``cache_dir``: a later retrain on the same base reuses them)."""
    prompts = general_prompts()
    key = hashlib.sha256(
        json.dumps([_model_identity(base_config), prompts, BASE_ANSWER_TOKENS]).encode()
    ).hexdigest()[:16]
    cached = cache_dir / f"base-answers-{key}.json"
    if cached.is_file():
        try:
            return BaseAnswers.from_json(json.loads(cached.read_text()))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring the unreadable cache %s", cached)
    with _loaded(base_config) as chatbot:
        replay = [(p, _base_answer(chatbot, p)) for p in prompts["replay"]]
        retention = [(p, _base_answer(chatbot, p)) for p in prompts["retention"]]
        answers = BaseAnswers(replay, retention, answer_loss(chatbot, retention))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps(answers.to_json(), indent=1))
    tmp.replace(cached)
    return answers


def _model_identity(config) -> list[Any]:
    """What names a model's weights: its path (with the file's size and mtime when local, so a
    replaced folder is not mistaken for the old one) and its adapter."""
    parts: list[Any] = []
    for name in (config.model_name_or_path, config.loading_config.peft_path):
        path = Path(name) if name else None
        if path is not None and path.exists():
            weights = sorted(path.glob("*.safetensors")) or [path]
            parts.append(
                [str(path.resolve())] + [[w.stat().st_size, w.stat().st_mtime_ns] for w in weights]
            )
        else:
            parts.append(name)
    return parts


def _base_answer(chatbot, prompt: str) -> str:
    from inference import GenerationConfig

    config = GenerationConfig(do_sample=False, max_new_tokens=BASE_ANSWER_TOKENS)
    return _whole_sentences(chatbot.predict(prompt, config).strip())


def _whole_sentences(text: str) -> str:
    """``text`` cut after its last finished sentence, so that an answer cut at the token limit
    does not teach the model to stop mid-sentence (code is kept as it is)."""
    if "```" in text:
        return text
    end = max(text.rfind(c) for c in ".!?")
    return text[: end + 1] if end > len(text) // 2 else text


def make_paraphrases(chatbot, questions: Sequence[str], embedder) -> list[list[str]]:
    """Each question reworded by ``chatbot`` (the serving model): its greedy attempt and
    ``PARAPHRASE_SAMPLES`` sampled ones, keeping those that are usable: a question, in other
    words, on the same topic (MiniLM) and not rambling. Small models often answer instead of
    rewording; those attempts are dropped, so a question may get none."""
    from inference import GenerationConfig

    out: list[list[str]] = []
    for question in questions:
        messages = []
        for asked, reworded in PARAPHRASE_SHOTS:
            messages += [
                {"role": "user", "content": PARAPHRASE_PROMPT.format(question=asked)},
                {"role": "assistant", "content": reworded},
            ]
        messages.append({"role": "user", "content": PARAPHRASE_PROMPT.format(question=question)})
        attempts = []
        for seed in [None, *range(1, PARAPHRASE_SAMPLES + 1)]:
            config = GenerationConfig(
                do_sample=seed is not None, temperature=0.8, top_p=0.9, seed=seed, max_new_tokens=32
            )
            text = chatbot.chat(messages, config).strip().strip('"').strip()
            first = text.splitlines()[0].strip() if text else ""
            if first.endswith("?") and len(first) <= 2 * len(question) + 20:
                attempts.append(first)
        seen = {_norm(question)}
        fresh = []
        for attempt in attempts:
            if _norm(attempt) not in seen:
                seen.add(_norm(attempt))
                fresh.append(attempt)
        similar = _similarities(embedder, [question] * len(fresh), fresh) if fresh else []
        out.append([p for p, sim in zip(fresh, similar, strict=True) if sim >= PARAPHRASE_SIMILAR])
    return out


def _norm(text: str) -> str:
    return " ".join(_words(text))


def _words(text: str) -> list[str]:
    return [w.lower().strip(".:") for w in _WORD.findall(text)]


def key_tokens(answer: str, question: str = "") -> list[str]:
    """The distinctive tokens of an answer: numbers, names, commands and identifiers that the
    question does not already contain. A right answer in other words still carries them."""
    asked = set(_words(question))
    keys = []
    tokens = _WORD.findall(answer)
    for i, token in enumerate(tokens):
        word = token.lower().strip(".:")
        if word in asked or word in _STOP:
            continue
        distinctive = (
            any(c.isdigit() for c in token)
            or any(c in token for c in "#@/_-:")
            or (i > 0 and token[0].isupper() and tokens[i - 1][-1:] not in ".!?")
            or (sum(c.isupper() for c in token) > 1)
        )
        if distinctive and word not in keys:
            keys.append(word)
    return keys


def carries(answer: str, expected: str, question: str, embedder) -> bool:
    """Whether ``answer`` carries the fact of ``expected``: most of its distinctive tokens,
    or, for an answer without any, the same meaning."""
    keys = key_tokens(expected, question)
    if keys:
        said = " ".join(_words(answer))
        found = sum(1 for k in keys if re.search(rf"(?<![\w]){re.escape(k)}(?![\w])", said))
        return found >= max(1, math.ceil(KEY_RECALL * len(keys)))
    return _similarities(embedder, [answer], [expected])[0] >= SIMILAR


def _similarities(embedder, left: Sequence[str], right: Sequence[str]) -> list[float]:
    if embedder is None:  # embeddings off: only exact wording counts
        return [float(_norm(a) == _norm(b)) for a, b in zip(left, right, strict=True)]
    a, b = embedder.embed(list(left)), embedder.embed(list(right))
    return [float(x @ y) for x, y in zip(a, b, strict=True)]


def augmentation(
    pairs: Sequence[tuple[str, str]], paraphrases: Sequence[Sequence[str]]
) -> list[tuple[str, str]]:
    """Extra training pairs: each question's second paraphrase, if any. The first is the
    gate's, never trained on; more than one extra made the amount of training (and so the
    forgetting) swing with how many rewordings the serving model happened to get right."""
    return [(ps[1], a) for ps, (_, a) in zip(paraphrases, pairs, strict=True) if len(ps) > 1]


def eval_sample(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The FAQ pairs that are judged: all of them, or a fixed sample of a large FAQ."""
    if len(pairs) <= EVAL_MAX_ROWS:
        return list(pairs)
    return random.Random(0).sample(list(pairs), EVAL_MAX_ROWS)


@contextmanager
def _loaded(config) -> Iterator[Any]:
    """A chatbot for one evaluation, freed afterwards (two 7B models do not fit at once)."""
    from inference import build_chatbot

    chatbot = build_chatbot(config)
    try:
        yield chatbot
    finally:
        del chatbot
        gc.collect()


def evaluate(
    config,
    pairs: Sequence[tuple[str, str]],
    paraphrases: Sequence[Sequence[str]],
    base: BaseAnswers,
    embedder,
    *,
    make_paraphrases_with: Callable | None = None,
) -> dict[str, Any]:
    """One model's scores: FAQ recall, paraphrase recall and retention loss. With
    ``make_paraphrases_with``, the paraphrases are made by this model first (the serving one)
    and returned under ``paraphrases``."""
    with _loaded(config) as chatbot:
        if make_paraphrases_with is not None:
            paraphrases = make_paraphrases_with(chatbot, [q for q, _ in pairs], embedder)
        faq_right = [carries(_answer(chatbot, q), a, q, embedder) for q, a in pairs]
        reworded = [(ps[0], q, a) for ps, (q, a) in zip(paraphrases, pairs, strict=True) if ps]
        para_right = [carries(_answer(chatbot, p), a, q, embedder) for p, q, a in reworded]
        retention = answer_loss(chatbot, base.retention)
    return {
        "faq_recall": sum(faq_right),
        "faq_rows": len(pairs),
        "paraphrase_recall": sum(para_right),
        "paraphrase_rows": len(reworded),
        "retention_loss": retention,
        "paraphrases": list(paraphrases),
    }


def _answer(chatbot, question: str) -> str:
    from inference import GenerationConfig

    return chatbot.predict(
        question, GenerationConfig(do_sample=False, max_new_tokens=ANSWER_TOKENS)
    )


def answer_loss(chatbot, pairs: Sequence[tuple[str, str]]) -> float:
    """Mean cross-entropy of the answer tokens after each question's prompt."""
    import torch

    total, count = 0.0, 0
    for question, answer in pairs:
        prompt_ids, _ = chatbot.prepare([{"role": "user", "content": question}])
        answer_ids = chatbot.tokenizer(answer, add_special_tokens=False).input_ids
        ids = torch.tensor([prompt_ids + answer_ids])
        with torch.inference_mode():
            logits = chatbot.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(answer_ids), reduction="sum")
        total += float(loss)
        count += len(answer_ids)
    return total / max(count, 1)


def forgetting(metrics: dict[str, Any], base: BaseAnswers) -> float:
    """How much worse (relative) the model predicts the base model's own general answers."""
    return metrics["retention_loss"] / max(base.retention_loss, 1e-6) - 1


def gate(
    candidate: dict[str, Any], serving: dict[str, Any], base: BaseAnswers, tolerance: float
) -> tuple[bool, str]:
    """Promote only a candidate that recalls more than the serving model (on the questions and
    their paraphrases together, neither worse) and forgets no more than ``tolerance``."""
    drift = forgetting(candidate, base)
    if not math.isfinite(candidate["retention_loss"]) or drift > tolerance:
        return False, (
            f"it forgot too much of its general ability: its loss on the base model's own "
            f"answers to general prompts rose {drift:+.0%} (at most {tolerance:+.0%} allowed, "
            "SPRBOT_TRAIN_RETENTION_TOLERANCE); try a lower SPRBOT_TRAIN_LEARNING_RATE"
        )
    for name, label in (("faq_recall", "FAQ questions"), ("paraphrase_recall", "reworded ones")):
        if candidate[name] < serving[name]:
            return False, (
                f"it answers fewer {label} ({candidate[name]} vs {serving[name]} of "
                f"{candidate[name.replace('recall', 'rows')]})"
            )
    gained = candidate["faq_recall"] + candidate["paraphrase_recall"]
    if gained <= serving["faq_recall"] + serving["paraphrase_recall"]:
        return False, (
            "it answers no more FAQ questions than the serving model "
            f"({candidate['faq_recall']}/{candidate['faq_rows']}, reworded "
            f"{candidate['paraphrase_recall']}/{candidate['paraphrase_rows']}): nothing to gain"
        )
    return True, (
        f"it answers more FAQ questions ({candidate['faq_recall']}/{candidate['faq_rows']}, was "
        f"{serving['faq_recall']}) and forgets little ({drift:+.0%} loss on general answers)"
    )


def report(
    version: str,
    serving_version: str,
    candidate: dict[str, Any],
    serving: dict[str, Any],
    base: BaseAnswers,
    passed: bool,
    why: str,
    timings: dict[str, float],
) -> str:
    """The admin's report: before -> after on what users feel, and where the time went."""
    head = f"Retrain done: {version} " + (
        f"is now serving (was {serving_version})."
        if passed
        else f"was NOT promoted; {serving_version} keeps serving."
    )
    rows, reworded = candidate["faq_rows"], candidate["paraphrase_rows"]
    asked = f"{serving['faq_recall']}/{rows} -> {candidate['faq_recall']}/{rows}"
    other = (
        f"{serving['paraphrase_recall']}/{reworded} -> {candidate['paraphrase_recall']}/{reworded}"
    )
    lines = [
        head,
        f"Why: {why}.",
        f"FAQ questions answered: {asked}.",
        f"Asked in other words ({reworded} made by the serving model, never trained on): {other}.",
        f"General ability (loss on the base model's answers, lower is better): "
        f"{serving['retention_loss']:.3f} -> {candidate['retention_loss']:.3f} "
        f"({forgetting(candidate, base):+.0%} against the base model).",
        "Time: " + ", ".join(f"{name} {_seconds(s)}" for name, s in timings.items()) + ".",
    ]
    return "\n".join(lines)


def _seconds(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 90 else f"{seconds / 60:.1f} min"
