"""Configuration classes of the engine, with NeuralChat's names, fields and defaults.

Code written for Intel NeuralChat builds these the same way; only the import lines change.
Fields that only made sense on Habana, CUDA clusters or NeuralChat's own runtimes are accepted
for compatibility and ignored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from bot.config import DEFAULT_MODEL


@dataclass
class GenerationConfig:
    """How a reply is generated. Defaults are NeuralChat's."""

    device: str = "cpu"
    temperature: float = 0.1
    top_k: int = 40
    top_p: float = 0.75
    repetition_penalty: float = 1.1
    num_beams: int = 1
    max_new_tokens: int = 256
    do_sample: bool = True
    num_return_sequences: int = 1
    bad_words_ids: list[int] | None = None
    force_words_ids: list[int] | None = None
    use_hpu_graphs: bool = False
    use_cache: bool = True
    audio_output_path: str | None = None
    cpu_jit: bool = False
    num_gpus: int = 0
    max_gpu_memory: int | None = None
    use_fp16: bool = False
    ipex_int8: bool = False
    return_stats: bool = False
    format_version: str = "v2"
    task: str = ""
    sql_metadata: str | None = None
    seed: int | None = None  # sprbot: fixes sampling for reproducible runs

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 when do_sample is True, got {self.temperature}; "
                "set do_sample=False for greedy decoding"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.num_beams != 1 or self.num_return_sequences != 1:
            raise ValueError(
                "sprbot decodes one sequence per request: num_beams and num_return_sequences "
                f"must be 1, got {self.num_beams} and {self.num_return_sequences}"
            )


@dataclass
class LoadingModelConfig:
    """How the model is loaded. ``peft_path`` names a LoRA adapter to apply."""

    cpu_jit: bool | None = None
    peft_path: str | None = None
    use_hpu_graphs: bool = False
    use_deepspeed: bool = False
    world_size: int = 1
    ipex_int8: bool = False
    use_neural_speed: bool = False
    gguf_model_path: str | None = None
    trust_remote_code: bool = False


@dataclass
class MixedPrecisionConfig:
    """Run the model in a lower-precision dtype. NeuralChat's default is bfloat16.

    On a CPU without native bf16, bf16 falls back to fp32 with a warning; ``force=True`` (a
    sprbot addition, also ``SPRBOT_DTYPE=bfloat16``) keeps bf16 there anyway.
    """

    dtype: str = "bfloat16"
    force: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32", "float16"):
            raise ValueError(
                f"MixedPrecisionConfig dtype must be bfloat16, float32 or float16, "
                f"got {self.dtype!r}"
            )


def _default_model() -> str:
    return os.environ.get("SPRBOT_MODEL") or DEFAULT_MODEL


@dataclass
class PipelineConfig:
    """What ``build_chatbot`` builds. The model defaults to ``SPRBOT_MODEL``, else
    ``Intel/neural-chat-7b-v3-3``.

    ``optimization_config=None`` follows ``SPRBOT_DTYPE`` (default ``auto``: bf16 on CPUs with
    native bf16, fp32 elsewhere). ``system_prompt`` (a sprbot addition) overrides the
    template's default system turn.
    """

    model_name_or_path: str = field(default_factory=_default_model)
    tokenizer_name_or_path: str | None = None
    hf_access_token: str | None = None
    device: str = "auto"
    task: str = ""
    plugins: dict[str, Any] = field(default_factory=dict)
    loading_config: LoadingModelConfig | None = None
    optimization_config: MixedPrecisionConfig | None = None
    assistant_model: str | None = None
    serving_config: Any = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.loading_config is None:
            self.loading_config = LoadingModelConfig()
