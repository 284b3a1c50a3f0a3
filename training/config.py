"""Fine-tuning configuration: NeuralChat's argument classes, with its names and defaults.

Code written for NeuralChat builds these the same way; only the import lines change. Options
that only made sense on Habana or CUDA (QLoRA, P-tuning, LLaMA-adapter, lm-eval-harness) are
accepted as fields and refused with a clear error when switched on.

``load_config`` reads the same four groups from a YAML or JSON file for
``sprbot finetune --config FILE``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import transformers

from bot.errors import SprbotError

TASKS = ("completion", "chat", "summarization", "code-generation")
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv")


class FinetuneConfigError(SprbotError, ValueError):
    """A fine-tuning option has a value that cannot be used. The message names it."""


@dataclass
class ModelArguments:
    """Which model and tokenizer to fine-tune (NeuralChat's fields and defaults)."""

    model_name_or_path: str | None = None
    config_name: str | None = None
    tokenizer_name: str | None = None
    cache_dir: str | None = None
    use_fast_tokenizer: bool = True
    model_revision: str = "main"
    token: str | None = None
    use_auth_token: bool = False  # deprecated in NeuralChat too: use ``token``
    trust_remote_code: bool = False


@dataclass
class DataArguments:
    """What to train and evaluate on (NeuralChat's fields and defaults).

    ``train_file``/``validation_file`` are JSON, JSONL or CSV. ``dataset_name`` is a Hugging
    Face hub id or a local folder, loaded with ``datasets.load_dataset``. Without a validation
    file or split, ``validation_split_percentage`` percent of the training rows (shuffled with
    ``dataset_seed``) are held out.

    Lengths are in tokens: a prompt is cut to ``max_source_length`` (the end of the last user
    message goes first; and always to less than ``max_seq_length``), the answer to what is left
    of ``max_seq_length`` and, for summarization, to ``max_target_length``. Batches are padded
    to their longest sequence, never to ``max_seq_length``; ``dataset_concatenation=True``
    packs sequences into full blocks instead.

    The ``*_column`` fields (a sprbot addition) name the columns when a file uses other names.
    """

    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    max_seq_length: int = 512
    validation_split_percentage: int = 0
    overwrite_cache: bool = False
    pad_to_max_length: bool = False  # accepted, ignored: batches are always padded dynamically
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    keep_in_memory: bool = False
    dataset_seed: int = 42
    dataset_cache_directory: str | None = None
    dataset_concatenation: bool = False
    special_tokens: list[str] | None = None
    max_source_length: int = 384
    max_target_length: int = 128
    num_beams: int = 4  # accepted, ignored: ROUGE summaries are decoded greedily
    streaming: bool = False
    preprocessing_num_workers: int | None = None
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    article_column: str = "article"
    summary_column: str = "highlights"
    messages_column: str = "messages"

    def __post_init__(self) -> None:
        if not self.dataset_name and not self.train_file:
            raise FinetuneConfigError(
                "DataArguments needs train_file (JSON, JSONL or CSV) or dataset_name "
                "(a Hugging Face hub id or a local folder)"
            )
        for name in ("train_file", "validation_file"):
            value = getattr(self, name)
            if value is not None and Path(value).suffix.lower() not in DATA_FILE_SUFFIXES:
                raise FinetuneConfigError(
                    f"DataArguments.{name}={value!r}: use a .json, .jsonl or .csv file"
                )
        for name in ("max_seq_length", "max_source_length", "max_target_length"):
            if getattr(self, name) < 1:
                raise FinetuneConfigError(
                    f"DataArguments.{name} must be at least 1, got {getattr(self, name)}"
                )
        if not 0 <= self.validation_split_percentage < 100:
            raise FinetuneConfigError(
                "DataArguments.validation_split_percentage must be in [0, 100), got "
                f"{self.validation_split_percentage}"
            )
        if self.streaming:
            raise FinetuneConfigError(
                "DataArguments.streaming=True is not supported: every row is checked before "
                "training starts; set streaming=False"
            )


@dataclass
class FinetuningArguments:
    """How to fine-tune (NeuralChat's fields and defaults).

    ``task`` is ``completion`` (Alpaca ``instruction``/``input``/``output``), ``chat``
    (``messages`` lists), ``summarization`` (``article``/``highlights``) or
    ``code-generation`` (``instruction``/``output``, as evol-codealpaca). LoRA goes on the
    model family's attention projections unless ``lora_target_modules`` names modules or
    ``lora_all_linear`` puts it on every linear layer. ``full_finetune`` trains every weight
    instead. Prompt tokens are left out of the loss unless ``train_on_inputs``. ``eval_ppl``
    (a sprbot addition) reports perplexity next to the eval loss.
    """

    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    adapter_layers: int = 30
    adapter_len: int = 10
    num_virtual_tokens: int = 10
    ptun_hidden_size: int = 1024
    peft: str | None = "lora"
    train_on_inputs: bool = False
    device: str = "auto"
    lora_all_linear: bool = False
    task: str = "completion"
    do_lm_eval: bool = False
    lm_eval_tasks: list[str] | None = field(default_factory=lambda: ["truthfulqa_mc"])
    qlora: bool = False
    double_quant: bool = True
    quant_type: str = "nf4"
    bits: int = 4
    full_finetune: bool = False
    eval_ppl: bool = True

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise FinetuneConfigError(
                f"FinetuningArguments.task must be one of {', '.join(TASKS)}, got {self.task!r}"
            )
        if not self.full_finetune and self.peft != "lora":
            raise FinetuneConfigError(
                f"FinetuningArguments.peft={self.peft!r} is not supported: sprbot trains LoRA "
                "adapters (peft='lora') or every weight (full_finetune=True)"
            )
        if self.qlora:
            raise FinetuneConfigError(
                "FinetuningArguments.qlora=True needs bitsandbytes' 4-bit GPU kernels; sprbot "
                "fine-tunes on CPU in bf16: set qlora=False"
            )
        if self.do_lm_eval:
            raise FinetuneConfigError(
                "FinetuningArguments.do_lm_eval=True (lm-evaluation-harness) is not supported: "
                "set do_lm_eval=False; eval loss and perplexity (eval_ppl) are reported"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise FinetuneConfigError(
                f"FinetuningArguments.device must be auto, cpu or cuda, got {self.device!r}"
            )
        if self.lora_rank < 1:
            raise FinetuneConfigError(
                f"FinetuningArguments.lora_rank must be at least 1, got {self.lora_rank}"
            )


_HF_FIELDS = {f.name for f in fields(transformers.TrainingArguments)}


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """``transformers.TrainingArguments``, also accepting what NeuralChat-era code passes and
    transformers 5 refuses: the removed fields ``overwrite_output_dir``, ``group_by_length``,
    ``no_cuda``, ``use_ipex`` and ``warmup_ratio``, and ``bf16=True`` on a machine without a GPU
    (5.x asks for ``use_cpu=True`` too; this class sets it).

    ``finetune_model`` takes either class; this one lets the seed's examples run on
    transformers 5 with only their imports changed. On transformers 4.x it adds nothing.
    """

    # Declared only where this transformers lacks them, so 4.x keeps its own definitions.
    if "overwrite_output_dir" not in _HF_FIELDS:
        overwrite_output_dir: bool = False
    if "group_by_length" not in _HF_FIELDS:
        group_by_length: bool = False
    if "no_cuda" not in _HF_FIELDS:
        no_cuda: bool = False
    if "use_ipex" not in _HF_FIELDS:
        use_ipex: bool = False
    if "warmup_ratio" not in _HF_FIELDS:
        warmup_ratio: float = 0.0

    def __post_init__(self) -> None:
        # Map the removed fields onto their transformers 5 replacements before validation.
        if "no_cuda" not in _HF_FIELDS and self.no_cuda:
            self.use_cpu = True
        if "warmup_ratio" not in _HF_FIELDS and self.warmup_ratio and not self.warmup_steps:
            self.warmup_steps = self.warmup_ratio  # a value below 1 is a ratio in 5.x
        if "group_by_length" not in _HF_FIELDS and self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        # transformers 5 refuses bf16 without a GPU unless use_cpu is set; 4.x inferred it.
        if (self.bf16 or self.bf16_full_eval) and not torch.cuda.is_available():
            self.use_cpu = True
        super().__post_init__()


@dataclass
class TextGenerationFinetuningConfig:
    """Everything ``finetune_model`` needs: NeuralChat's four argument groups."""

    model_args: ModelArguments
    data_args: DataArguments
    training_args: transformers.TrainingArguments
    finetune_args: FinetuningArguments


# NeuralChat's other names for the same config.
BaseFinetuningConfig = TextGenerationFinetuningConfig
SummarizationFinetuningConfig = TextGenerationFinetuningConfig
CodeGenerationFinetuningConfig = TextGenerationFinetuningConfig

SECTIONS = {
    "model_args": ModelArguments,
    "data_args": DataArguments,
    "training_args": TrainingArguments,
    "finetune_args": FinetuningArguments,
}


def load_config(path: str | Path) -> TextGenerationFinetuningConfig:
    """Read a fine-tuning config from YAML or JSON.

    The file holds the four groups as sections (``model_args``, ``data_args``,
    ``training_args``, ``finetune_args``) or, as NeuralChat's scripts read it, one flat mapping
    whose keys are sorted into the groups by name. Relative paths are relative to the current
    directory, as in NeuralChat.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FinetuneConfigError(f"cannot read the config file {path}: {exc}") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        elif path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raise FinetuneConfigError(f"{path}: use a .yaml, .yml or .json config file")
    except (ValueError, ImportError) as exc:
        if isinstance(exc, FinetuneConfigError):
            raise
        raise FinetuneConfigError(f"{path} is not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(raw, dict):
        raise FinetuneConfigError(f"{path}: the top level must be a mapping of options")

    if set(raw) & set(SECTIONS):
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise FinetuneConfigError(
                f"{path}: unknown section(s) {', '.join(unknown)}; the sections are "
                f"{', '.join(SECTIONS)}"
            )
        grouped = {name: raw.get(name) or {} for name in SECTIONS}
        for name, values in grouped.items():
            if not isinstance(values, dict):
                raise FinetuneConfigError(f"{path}: section {name} must be a mapping")
            known = {f.name for f in fields(SECTIONS[name]) if f.init}
            for key in values:
                if key not in known:
                    raise FinetuneConfigError(f"{path}: {name} has no option {key!r}")
    else:
        grouped = {name: {} for name in SECTIONS}
        for key, value in raw.items():
            owners = [n for n, cls in SECTIONS.items() if key in {f.name for f in fields(cls)}]
            if not owners:
                raise FinetuneConfigError(f"{path}: unknown option {key!r}")
            for owner in owners:
                grouped[owner][key] = value

    built: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        try:
            built[name] = cls(**grouped[name])
        except FinetuneConfigError as exc:
            raise FinetuneConfigError(f"{path}: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise FinetuneConfigError(f"{path}: {name}: {exc}") from None
    return TextGenerationFinetuningConfig(**built)
