"""Errors the engine raises instead of NeuralChat's ``None`` returns. Each says what to do."""

from __future__ import annotations

from bot.errors import SprbotError


class ModelLoadError(SprbotError, RuntimeError):
    """The model or tokenizer could not be loaded."""


class EmptyQueryError(SprbotError, ValueError):
    """The query has no text."""


class PromptTooLongError(SprbotError, ValueError):
    """The prompt does not fit in the model's context window."""

    def __init__(self, prompt_tokens: int, context_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.context_tokens = context_tokens
        super().__init__(
            f"the prompt is {prompt_tokens} tokens long, but the model's context holds "
            f"{context_tokens} tokens (with room for at least one new token); shorten the "
            "question or the conversation (/reset clears it)"
        )
