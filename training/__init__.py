"""Fine-tuning: NeuralChat's ``finetune_model`` for completion, chat, summarization and code
generation, in bf16 on CPU with LoRA.

>>> from training import (finetune_model, TextGenerationFinetuningConfig, ModelArguments,
...                       DataArguments, FinetuningArguments, TrainingArguments)
>>> result = finetune_model(TextGenerationFinetuningConfig(
...     model_args=ModelArguments(model_name_or_path="Intel/neural-chat-7b-v3-3"),
...     data_args=DataArguments(train_file="faq.json", validation_split_percentage=10),
...     training_args=TrainingArguments(output_dir="./faq-lora", do_train=True, bf16=True),
...     finetune_args=FinetuningArguments()))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Resolved on first use: importing transformers' Trainer takes seconds, and the training
# worker imports this package long before its first job.
_EXPORTS = {
    "BaseFinetuningConfig": "training.config",
    "CodeGenerationFinetuningConfig": "training.config",
    "DataArguments": "training.config",
    "FinetuneConfigError": "training.config",
    "FinetuningArguments": "training.config",
    "ModelArguments": "training.config",
    "SummarizationFinetuningConfig": "training.config",
    "TextGenerationFinetuningConfig": "training.config",
    "TrainingArguments": "training.config",
    "load_config": "training.config",
    "DataError": "training.data",
    "FinetuneError": "training.finetune",
    "FinetuneResult": "training.finetune",
    "export_merged": "training.finetune",
    "finetune_model": "training.finetune",
}
__all__ = [
    "BaseFinetuningConfig",
    "CodeGenerationFinetuningConfig",
    "DataArguments",
    "DataError",
    "FinetuneConfigError",
    "FinetuneError",
    "FinetuneResult",
    "FinetuningArguments",
    "ModelArguments",
    "SummarizationFinetuningConfig",
    "TextGenerationFinetuningConfig",
    "TrainingArguments",
    "export_merged",
    "finetune_model",
    "load_config",
]

if TYPE_CHECKING:
    from training.config import (
        BaseFinetuningConfig,
        CodeGenerationFinetuningConfig,
        DataArguments,
        FinetuneConfigError,
        FinetuningArguments,
        ModelArguments,
        SummarizationFinetuningConfig,
        TextGenerationFinetuningConfig,
        TrainingArguments,
        load_config,
    )
    from training.data import DataError
    from training.finetune import FinetuneError, FinetuneResult, export_merged, finetune_model


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
