"""Training data: loading, checking, prompts, tokenisation, loss masks and batching.

Every row becomes a conversation (``{role, content}`` turns) and is rendered with exactly the
prompt ``Chatbot.predict`` builds at serving time (``inference.templates.build_prompt``: the
tokenizer's chat template, else the model family's). So what the model learns to answer is
the prompt it will be asked with. The schemas:

- ``completion`` and ``code-generation``: ``instruction``, optional ``input``, ``output``
  (Alpaca, evol-codealpaca). The user turn is the instruction, then the input after a blank
  line.
- ``summarization``: ``article`` and ``highlights`` (cnn_dailymail 3.0.0). The user turn is
  ``SUMMARIZE_INSTRUCTION``, a blank line, then the article.
- ``chat``: ``messages``, a list of turns: an optional system turn, then user and assistant
  turns in turn.

Every row is checked before anything is trained; a bad one raises ``DataError`` naming the
file, the row (counted from 1) and the field.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bot.errors import SprbotError
from inference.templates import Message, Prompt, build_prompt, neutralise_messages
from training.config import DataArguments

IGNORE_INDEX = -100
SUMMARIZE_INSTRUCTION = "Summarize the highlights of this article."
ROLES = ("system", "user", "assistant")


class DataError(SprbotError, ValueError):
    """Training data that cannot be used. The message names the file, row and field."""


# -- loading ---------------------------------------------------------------------------------


@dataclass
class Table:
    """Rows from one file or dataset split, and where each came from (for error messages)."""

    source: str
    rows: Sequence[dict[str, Any]]  # a list, or a datasets.Dataset
    lines: list[int] | None = None  # line of each row in a JSONL/CSV file

    def where(self, index: int) -> str:
        line = f" (line {self.lines[index]})" if self.lines else ""
        return f"{self.source}, row {index + 1}{line}"


@dataclass
class Part:
    """The rows of a table that one split uses."""

    table: Table
    indices: list[int]

    def __len__(self) -> int:
        return len(self.indices)


def read_file(path: str | Path) -> Table:
    """Rows of a JSON (a list of objects, or one object per line), JSONL or CSV file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text: {exc}") from None
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        rows, lines = [], []
        for row in reader:
            if None in row:
                raise DataError(
                    f"{path}, row {len(rows) + 1} (line {reader.line_num}): more cells than "
                    "header columns (quote cells that contain commas)"
                )
            rows.append(dict(row))
            lines.append(reader.line_num)
        return Table(str(path), rows, lines)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # several documents: JSON Lines in a .json file
                raise DataError(
                    f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
                ) from None
        else:
            if not isinstance(data, list):
                raise DataError(f"{path}: the file must hold a JSON list of rows (objects)")
            for i, row in enumerate(data):
                if not isinstance(row, dict):
                    raise DataError(f"{path}, row {i + 1}: a row must be a JSON object")
            return Table(str(path), data)
    rows, lines = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}, row {len(rows) + 1} (line {number}) is not valid JSON: {exc.msg}"
            ) from None
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {len(rows) + 1} (line {number}): must be a JSON object")
        rows.append(row)
        lines.append(number)
    return Table(str(path), rows, lines)


def load_hub_dataset(
    name: str, config_name: str | None, *, cache_dir: str | None = None, token: str | None = None
) -> dict[str, Table]:
    """The splits of ``datasets.load_dataset(name, config_name)``: a hub id or a local path.

    A local folder laid out like a hub repository, with one subfolder per config (as
    cnn_dailymail's ``3.0.0/``), is read from that subfolder.
    """
    import datasets

    local = Path(name).expanduser()
    try:
        loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir, token=token)
    except Exception as exc:  # datasets raises many types: connection, not found, config
        if local.is_dir() and config_name and (local / config_name).is_dir():
            loaded = datasets.load_dataset(name, data_dir=config_name, cache_dir=cache_dir)
        elif local.exists():
            raise DataError(f"dataset {name!r}: cannot load the local dataset: {exc}") from None
        elif _offline() or isinstance(exc, ConnectionError):
            raise DataError(
                f"dataset {name!r} is not a local path, and the Hugging Face Hub cannot be "
                "reached (offline) and the local cache does not have it"
                + (f" with config {config_name!r}" if config_name else "")
                + ". Download it where there is internet (`huggingface-cli download "
                f"--repo-type dataset {name}`), copy the folder here and pass its path as "
                "dataset_name, or export the rows to a JSON/JSONL/CSV file and pass it as "
                "train_file."
            ) from None
        else:
            raise DataError(f"dataset {name!r} could not be loaded: {exc}") from None
    label = name + (f" ({config_name})" if config_name else "")
    return {split: Table(f"{label} [{split}]", rows) for split, rows in loaded.items()}


def _offline() -> bool:
    return any(
        os.environ.get(var, "").lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


@dataclass
class Splits:
    train: Part
    validation: Part | None


def load_splits(data_args: DataArguments, *, cache_dir=None, token=None) -> Splits:
    """The training rows and the validation rows, as ``data_args`` asks."""
    hub: dict[str, Table] = {}
    if data_args.train_file:
        train = read_file(data_args.train_file)
    else:
        hub = load_hub_dataset(
            data_args.dataset_name,
            data_args.dataset_config_name,
            cache_dir=cache_dir,
            token=token,
        )
        if "train" not in hub:
            raise DataError(
                f"dataset {data_args.dataset_name!r} has no 'train' split (it has "
                f"{', '.join(hub) or 'none'})"
            )
        train = hub["train"]
    if not len(train.rows):
        raise DataError(f"{train.source}: has no rows to train on")

    train_indices = list(range(len(train.rows)))
    validation: Part | None = None
    if data_args.validation_file:
        table = read_file(data_args.validation_file)
        validation = Part(table, list(range(len(table.rows))))
    elif "validation" in hub:
        validation = Part(hub["validation"], list(range(len(hub["validation"].rows))))
    elif data_args.validation_split_percentage and len(train_indices) > 1:
        # Hold out a seeded random sample: FAQ exports are often ordered by topic.
        shuffled = random.Random(data_args.dataset_seed).sample(train_indices, len(train_indices))
        held = max(1, len(shuffled) * data_args.validation_split_percentage // 100)
        validation = Part(train, sorted(shuffled[:held]))
        train_indices = sorted(shuffled[held:])

    if data_args.max_train_samples is not None:
        train_indices = train_indices[: data_args.max_train_samples]
    if validation is not None and data_args.max_eval_samples is not None:
        validation.indices = validation.indices[: data_args.max_eval_samples]
    return Splits(Part(train, train_indices), validation or None)


def rows_sha256(part: Part) -> str:
    """A hash of the rows a split uses, in order: the same rows give the same hash, whatever
    file they came from."""
    digest = hashlib.sha256()
    for i in part.indices:
        row = part.table.rows[i]
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# -- rows to conversations --------------------------------------------------------------------


def conversations(part: Part, task: str, data_args: DataArguments) -> list[list[Message]]:
    """Check every row of ``part`` for ``task`` and turn it into a conversation."""
    convert = {
        "completion": _instruction_row,
        "code-generation": _instruction_row,
        "summarization": _summarization_row,
        "chat": _chat_row,
    }[task]
    out = []
    for i in part.indices:
        row = part.table.rows[i]
        try:
            out.append(convert(row, data_args))
        except _RowError as exc:
            raise DataError(f"{part.table.where(i)}: {exc}") from None
    return out


class _RowError(ValueError):
    pass


def _text(row: dict[str, Any], column: str, why: str, required: bool = True) -> str:
    value = row.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if not required:
            return ""
        state = "missing" if column not in row else "empty"
        raise _RowError(f"required field {column!r} is {state} ({why})")
    if not isinstance(value, str):
        raise _RowError(f"field {column!r} must be text, got {type(value).__name__}")
    return value


def _instruction_row(row: dict[str, Any], a: DataArguments) -> list[Message]:
    why = (
        f"rows need {a.instruction_column!r} and {a.output_column!r}; "
        f"{a.input_column!r} is optional"
    )
    instruction = _text(row, a.instruction_column, why)
    extra = _text(row, a.input_column, why, required=False)
    output = _text(row, a.output_column, why)
    question = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": question}, {"role": "assistant", "content": output}]


def _summarization_row(row: dict[str, Any], a: DataArguments) -> list[Message]:
    why = f"summarization rows need {a.article_column!r} and {a.summary_column!r}"
    article = _text(row, a.article_column, why)
    summary = _text(row, a.summary_column, why)
    # The instruction first, so that cutting a long prompt cuts the article, not the request.
    question = f"{SUMMARIZE_INSTRUCTION}\n\n{article.strip()}"
    return [{"role": "user", "content": question}, {"role": "assistant", "content": summary}]


def _chat_row(row: dict[str, Any], a: DataArguments) -> list[Message]:
    column = a.messages_column
    turns = row.get(column)
    if isinstance(turns, str):  # a CSV cell holds the list as JSON
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise _RowError(f"field {column!r} is text but not a JSON list of turns") from None
    if turns is None:
        raise _RowError(f"required field {column!r} is missing (chat rows need a list of turns)")
    if not isinstance(turns, list) or not turns:
        raise _RowError(f"field {column!r} must be a non-empty list of {{role, content}} turns")
    messages: list[Message] = []
    for j, turn in enumerate(turns):
        where = f"{column}[{j}]"
        if not isinstance(turn, dict):
            raise _RowError(f"{where} must be an object with 'role' and 'content'")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise _RowError(f"{where}.role must be system, user or assistant, got {role!r}")
        if not isinstance(content, str) or not content.strip():
            raise _RowError(f"{where}.content must be non-empty text")
        if j == 0:
            expected: tuple[str, ...] = ("system", "user")
        elif messages[-1]["role"] == "user":
            expected = ("assistant",)
        else:
            expected = ("user",)
        if role not in expected:
            raise _RowError(
                f"{where}.role is {role!r}, expected {' or '.join(expected)}: a conversation is "
                "an optional system turn, then user and assistant turns in turn"
            )
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise _RowError(f"field {column!r} has no assistant turn to learn from")
    return messages


# -- tokenisation -----------------------------------------------------------------------------


class Encoder:
    """Turns conversations into token ids and labels, the way the chatbot will prompt.

    Each answer is trained after exactly the prompt that ``Chatbot.chat`` would build for the
    turns before it, tokenised the same way. Prompt tokens get ``IGNORE_INDEX`` as label
    unless ``train_on_inputs``.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        model_name: str,
        model_type: str | None,
        max_seq_length: int,
        max_source_length: int,
        max_target_length: int | None = None,
        train_on_inputs: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.model_type = model_type
        self.max_seq_length = max_seq_length
        # Every example keeps at least one answer token: a batch with none has no loss.
        self.max_source_length = min(max_source_length, max_seq_length - 1)
        self.max_target_length = max_target_length
        self.train_on_inputs = train_on_inputs
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.template = self._prompt([{"role": "user", "content": "?"}]).template

    def encode(self, messages: list[Message]) -> list[dict[str, list[int]]]:
        """One example for the whole conversation where the chat template allows it, else one
        per assistant turn."""
        # Neutralised up front, as build_prompt does: the chat template's finished text and
        # the answer targets must show markers in content exactly as serving prompts do.
        messages = neutralise_messages(messages, self.tokenizer)
        answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(answers) > 1 and self.has_chat_template:
            whole = self._whole(messages, answers)
            if whole is not None:
                return [whole]
        return [self._turn(messages[: i + 1]) for i in answers]

    def prompt_ids(self, turns: list[Message]) -> list[int]:
        """The prompt for ``turns`` (the last one the user's), fitted to max_source_length and
        tokenised as the chatbot does."""
        prompt = self._prompt(self._fit(neutralise_messages(turns, self.tokenizer)))
        return self._ids(prompt.text, prompt.add_special_tokens)

    def _prompt(self, turns: list[Message]) -> Prompt:
        return build_prompt(
            turns, self.tokenizer, model_name=self.model_name, model_type=self.model_type
        )

    def _finished(self, turns: list[Message]) -> str | None:
        """The chat template's text of a conversation that ends with an answer."""
        if not self.has_chat_template:
            return None
        try:
            return self.tokenizer.apply_chat_template(turns, tokenize=False)
        except Exception:  # templates may refuse some shapes; fall back to answer + EOS
            return None

    def _ids(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids

    def _tokenize(
        self, segments: list[tuple[str, bool]], add_special_tokens: bool
    ) -> tuple[list[int], list[bool], bool]:
        """Token ids of the concatenated segments, which of them are answer tokens, and whether
        every prefix tokenised as it does alone (so each prompt matches serving exactly)."""
        ids: list[int] = []
        is_answer: list[bool] = []
        text = ""
        consistent = True
        for piece, answer in segments:
            text += piece
            longer = self._ids(text, add_special_tokens)
            if longer[: len(ids)] == ids:
                new = longer[len(ids) :]
            else:  # a merge across the boundary: tokenise the piece on its own
                consistent = False
                new = self._ids(piece, False)
            ids += new
            is_answer += [answer] * len(new)
        return ids, is_answer, consistent

    def _labels(self, ids: list[int], is_answer: list[bool]) -> list[int]:
        if self.train_on_inputs:
            return list(ids)
        return [t if a else IGNORE_INDEX for t, a in zip(ids, is_answer, strict=True)]

    def _whole(self, messages: list[Message], answers: list[int]) -> dict | None:
        segments: list[tuple[str, bool]] = []
        done = ""
        add_special = True
        for i in answers:
            prompt = self._prompt(messages[:i])
            finished = self._finished(messages[: i + 1])
            text = prompt.text
            if finished is None or not text.startswith(done) or not finished.startswith(text):
                return None
            segments += [(text[len(done) :], False), (finished[len(text) :], True)]
            done = finished
            add_special = prompt.add_special_tokens
        ids, is_answer, consistent = self._tokenize(segments, add_special)
        first_prompt = is_answer.index(True) if True in is_answer else len(ids)
        if not consistent or len(ids) > self.max_seq_length:
            return None
        if first_prompt > self.max_source_length:
            return None
        return {"input_ids": ids, "labels": self._labels(ids, is_answer)}

    def _turn(self, turns: list[Message]) -> dict[str, list[int]]:
        """The last turn is the answer; the turns before it are the prompt."""
        history, answer = self._fit(turns[:-1]), turns[-1]
        prompt = self._prompt(history)
        finished = self._finished([*history, answer])
        if finished is not None and finished.startswith(prompt.text):
            target = finished[len(prompt.text) :]
        else:
            target = answer["content"] + (self.tokenizer.eos_token or "")
        ids, is_answer, _ = self._tokenize(
            [(prompt.text, False), (target, True)], prompt.add_special_tokens
        )
        prompt_len = is_answer.index(True) if True in is_answer else len(ids)
        room = self.max_seq_length - prompt_len
        if self.max_target_length is not None:
            room = min(room, self.max_target_length)
        ids, is_answer = ids[: prompt_len + room], is_answer[: prompt_len + room]
        return {"input_ids": ids, "labels": self._labels(ids, is_answer)}

    def _fit(self, turns: list[Message]) -> list[Message]:
        """Shorten a prompt to ``max_source_length`` tokens: drop the oldest exchanges, then cut
        the end of the last user turn."""
        turns = list(turns)
        for _ in range(100):
            prompt = self._prompt(turns)
            length = len(self._ids(prompt.text, prompt.add_special_tokens))
            excess = length - self.max_source_length
            if excess <= 0:
                return turns
            first = 1 if turns[0]["role"] == "system" else 0
            if len(turns) - first > 1:
                del turns[first : first + 2]
                continue
            content = self._ids(turns[-1]["content"], False)
            keep = len(content) - excess
            if keep < 1:
                raise _RowError(
                    f"the prompt template alone takes {length - len(content)} tokens, more than "
                    f"max_source_length={self.max_source_length}; raise max_source_length"
                )
            turns[-1] = {**turns[-1], "content": self.tokenizer.decode(content[:keep])}
        raise _RowError(f"could not fit the prompt into max_source_length={self.max_source_length}")


def encode_part(
    encoder: Encoder, convs: list[list[Message]], part: Part
) -> list[dict[str, list[int]]]:
    """Every conversation of ``part`` as training examples; errors name the row."""
    features = []
    for conv, i in zip(convs, part.indices, strict=True):
        try:
            features += encoder.encode(conv)
        except _RowError as exc:
            raise DataError(f"{part.table.where(i)}: {exc}") from None
    return features


def pack(features: list[dict[str, list[int]]], block: int, seed: int) -> list[dict[str, list[int]]]:
    """Concatenate examples (in a seeded random order) and cut them into ``block``-token
    pieces: no padding at all, at the price of attention across example boundaries."""
    order = random.Random(seed).sample(range(len(features)), len(features))
    ids = [t for i in order for t in features[i]["input_ids"]]
    labels = [t for i in order for t in features[i]["labels"]]
    return [
        {"input_ids": ids[s : s + block], "labels": labels[s : s + block]}
        for s in range(0, len(ids), block)
    ]


class LengthGroupedSampler(torch.utils.data.Sampler[int]):
    """Example indices in batches of similar length, the batches in random order.

    Each epoch shuffles the examples, sorts groups of ``group_batches`` batches by length and
    cuts them into batches, so padding to a batch's longest sequence wastes little. (The
    sampler of transformers' ``group_by_length`` sorts groups of only 4 batches on datasets
    under 50 * 4 batches: 14% padding instead of 4% on a 128-row FAQ.) The batch holding the
    longest sequence comes first, so a run that cannot fit in memory fails at its first step;
    the one short batch comes last, so every other batch stays whole.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        group_batches: int = 50,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.group = batch_size * group_batches
        # Seeded the same in every process, so DDP ranks cut the same batches.
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches = []
        for start in range(0, len(order), self.group):
            group = sorted(order[start : start + self.group], key=self.lengths.__getitem__)
            group.reverse()
            batches += [
                group[b : b + self.batch_size] for b in range(0, len(group), self.batch_size)
            ]
        short = [b for b in batches if len(b) < self.batch_size]
        whole = [b for b in batches if len(b) == self.batch_size]
        whole = [whole[i] for i in torch.randperm(len(whole), generator=self.generator).tolist()]
        if whole:
            longest = max(range(len(whole)), key=lambda i: self.lengths[whole[i][0]])
            whole[0], whole[longest] = whole[longest], whole[0]
        return iter([i for batch in whole + short for i in batch])


@dataclass
class PadCollator:
    """Pads a batch to its own longest sequence (right padding), never to max_seq_length."""

    pad_token_id: int

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
