"""The chatbot engine: NeuralChat's inference API on current PyTorch and transformers.

>>> from inference import build_chatbot, PipelineConfig, MixedPrecisionConfig
>>> chatbot = build_chatbot(PipelineConfig(optimization_config=MixedPrecisionConfig()))
>>> chatbot.predict("Tell me about Intel Xeon Scalable Processors.")
"""

from inference.chatbot import Chatbot, build_chatbot
from inference.config import (
    GenerationConfig,
    LoadingModelConfig,
    MixedPrecisionConfig,
    PipelineConfig,
)
from inference.errors import EmptyQueryError, ModelLoadError, PromptTooLongError

__all__ = [
    "Chatbot",
    "EmptyQueryError",
    "GenerationConfig",
    "LoadingModelConfig",
    "MixedPrecisionConfig",
    "ModelLoadError",
    "PipelineConfig",
    "PromptTooLongError",
    "build_chatbot",
]
