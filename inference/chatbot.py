"""The chatbot engine: ``build_chatbot(PipelineConfig) -> Chatbot``.

A ``Chatbot`` holds one causal LM and its tokenizer, in bf16 on CPU by default. It needs no
Redis and no adapter, so a notebook can use it alone; the inference worker wraps the same
object. On the stock stack, tokens come from the lean decode loop in ``inference.decoding``;
where Intel Extension for PyTorch is usable, the model is optimised with ``ipex.llm.optimize``
and tokens come from its ``generate``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from inference.config import GenerationConfig, PipelineConfig
from inference.device import (
    DTYPES,
    cpu_has_native_bf16,
    ipex_status,
    resolve_device,
    resolve_dtype,
)
from inference.errors import EmptyQueryError, ModelLoadError, PromptTooLongError
from inference.templates import Message, build_prompt

log = logging.getLogger(__name__)

# transformers renamed from_pretrained's torch_dtype to dtype in 4.56.
_DTYPE_KWARG = (
    "dtype"
    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= (4, 56)
    else "torch_dtype"
)


class Chatbot:
    """A loaded model that answers questions. Build it with ``build_chatbot``."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        config: PipelineConfig,
        device: str,
        dtype: str,
        backend: str,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.device = device
        self.dtype = dtype
        self.backend = backend
        model_config = model.config
        self.model_type: str | None = getattr(model_config, "model_type", None)
        self.context_length: int = int(
            getattr(model_config, "max_position_embeddings", None)
            or getattr(tokenizer, "model_max_length", 2048)
        )
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self._hf_thread: ThreadPoolExecutor | None = None
        self.template = build_prompt(
            [{"role": "user", "content": "?"}],
            tokenizer,
            model_name=config.model_name_or_path,
            model_type=self.model_type,
            system_prompt=config.system_prompt,
        ).template

    # -- what it is -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Device, dtype, backend (stock / IPEX), template and model size."""
        params = sum(p.numel() for p in self.model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return {
            "model": self.config.model_name_or_path,
            "peft_path": self.config.loading_config.peft_path,
            "device": self.device,
            "dtype": self.dtype,
            "backend": self.backend,
            "template": self.template,
            "parameters": params,
            "weight_bytes": weight_bytes,
            "context_length": self.context_length,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }

    # -- NeuralChat's API -----------------------------------------------------------------

    def predict(self, query: str, config: GenerationConfig | None = None) -> str:
        """The answer to one question: only the new text."""
        return self.chat([{"role": "user", "content": query}], config)

    def predict_stream(self, query: str, config: GenerationConfig | None = None) -> Iterator[str]:
        """Like ``predict``, as text pieces while they are generated."""
        return self.chat_stream([{"role": "user", "content": query}], config)

    def chat(self, messages: Sequence[Message], config: GenerationConfig | None = None) -> str:
        """The answer to the last user turn of ``messages`` (``{role, content}`` dicts)."""
        prompt_ids, config = self.prepare(messages, config)
        return self.decode(list(self.generate_token_ids(prompt_ids, config)))

    def chat_stream(
        self, messages: Sequence[Message], config: GenerationConfig | None = None
    ) -> Iterator[str]:
        """Like ``chat``, as text pieces while they are generated."""
        prompt_ids, config = self.prepare(messages, config)
        return stream_text(self.tokenizer, self.generate_token_ids(prompt_ids, config))

    # -- the steps, for the inference worker ----------------------------------------------

    def prepare(
        self, messages: Sequence[Message], config: GenerationConfig | None = None
    ) -> tuple[list[int], GenerationConfig]:
        """Check and tokenise a conversation; fit ``max_new_tokens`` into the context."""
        if not messages or not str(messages[-1].get("content", "")).strip():
            raise EmptyQueryError("the query is empty: ask a question with some text in it")
        prompt = build_prompt(
            messages,
            self.tokenizer,
            model_name=self.config.model_name_or_path,
            model_type=self.model_type,
            system_prompt=self.config.system_prompt,
        )
        prompt_ids = self.tokenizer(
            prompt.text, add_special_tokens=prompt.add_special_tokens
        ).input_ids
        if len(prompt_ids) >= self.context_length:
            raise PromptTooLongError(len(prompt_ids), self.context_length)
        config = config or GenerationConfig()
        room = self.context_length - len(prompt_ids)
        if config.max_new_tokens > room:
            config = replace(config, max_new_tokens=room)
        return prompt_ids, config

    def generate_token_ids(self, prompt_ids: list[int], config: GenerationConfig) -> Iterator[int]:
        """New token ids, one at a time, ending before EOS or at ``max_new_tokens``."""
        generator = None
        if config.do_sample and config.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(config.seed)
        if self.backend == "ipex":
            if self._hf_thread is None:
                # One long-lived thread runs every generate: a fresh thread per request measured
                # 15-20% slower decode with IPEX (a new OpenMP team each time), and one thread
                # also keeps concurrent requests from oversubscribing the cores.
                self._hf_thread = ThreadPoolExecutor(
                    1,
                    thread_name_prefix="sprbot-generate",
                    initializer=torch.set_num_threads,
                    initargs=(torch.get_num_threads(),),
                )
            return _generate_with_hf(
                self.model, prompt_ids, config, self.eos_token_ids, self._hf_thread
            )
        from inference.decoding import generate_ids

        return generate_ids(self.model, prompt_ids, config, self.eos_token_ids, generator=generator)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class IncrementalDecoder:
    """Turns token ids, pushed one at a time, into text pieces whose concatenation is the full
    decode.

    A piece is released only once the decoded text is stable: a byte-fallback token can end in
    half a UTF-8 character, which decodes as U+FFFD until the rest arrives.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece

    def flush(self) -> str:
        """Whatever is still held back, once no more tokens will come."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.startswith(self.text):
            return ""
        piece, self.text = text[len(self.text) :], text
        return piece


def stream_text(tokenizer: Any, token_ids: Iterable[int]) -> Iterator[str]:
    """Text pieces for a stream of token ids (see ``IncrementalDecoder``)."""
    decoder = IncrementalDecoder(tokenizer)
    for token_id in token_ids:
        if piece := decoder.push(token_id):
            yield piece
    if piece := decoder.flush():
        yield piece


@dataclass
class LoadedModel:
    """A model and tokenizer as loaded from disk (LoRA merged), before any optimisation."""

    model: torch.nn.Module
    tokenizer: Any
    device: str
    dtype: str


def load_model(config: PipelineConfig) -> LoadedModel:
    """Resolve device and dtype, and load the tokenizer and model of ``config``: the part of
    ``build_chatbot`` that reads files (and may run in another process).

    Raises ``ModelLoadError`` with what to do when the model cannot be loaded.
    """
    device = resolve_device(config.device)
    env_dtype = os.environ.get("SPRBOT_DTYPE", "auto")
    optimization = config.optimization_config
    if optimization is None:
        requested, forced = env_dtype, env_dtype == "bfloat16"
    else:
        requested, forced = optimization.dtype, optimization.force or env_dtype == "bfloat16"
    dtype = resolve_dtype(requested, device, forced=forced, native_bf16=cpu_has_native_bf16())
    config = _gguf_imported(config)
    tokenizer = _load_tokenizer(config)
    return LoadedModel(_load_model(config, dtype, device), tokenizer, device, dtype)


def build_chatbot(
    config: PipelineConfig | None = None, *, loaded: LoadedModel | None = None
) -> Chatbot:
    """Load the model of ``config`` and return a ready ``Chatbot``.

    ``loaded``: the result of ``load_model(config)`` obtained elsewhere (the inference worker
    loads new versions in a child process); it is optimised here instead of loading again.

    Raises ``ModelLoadError`` with what to do when the model cannot be loaded, instead of
    returning ``None`` as NeuralChat did.
    """
    config = config or PipelineConfig()
    started = time.perf_counter()
    loaded = loaded or load_model(config)
    model, tokenizer, device, dtype = loaded.model, loaded.tokenizer, loaded.device, loaded.dtype

    backend = "stock"
    usable, why = ipex_status()
    if device == "cpu" and dtype == "bfloat16" and usable:
        import intel_extension_for_pytorch as ipex

        model = ipex.llm.optimize(model, dtype=torch.bfloat16, inplace=True, deployment_mode=True)
        backend = "ipex"
    else:
        if device == "cpu" and dtype == "bfloat16":
            log.debug("IPEX not used: %s", why)
        from inference.decoding import prepare_for_decoding

        prepare_for_decoding(model)

    bot = Chatbot(model, tokenizer, config=config, device=device, dtype=dtype, backend=backend)
    info = bot.info()
    log.info(
        "loaded %s in %.1fs: %s params, %s on %s, %s backend, %s template, %d threads",
        info["model"],
        time.perf_counter() - started,
        f"{info['parameters'] / 1e6:.1f}M",
        info["dtype"],
        info["device"],
        info["backend"],
        info["template"],
        info["threads"],
    )
    return bot


def _gguf_imported(config: PipelineConfig) -> PipelineConfig:
    """``config`` loading the bf16 folder of its GGUF file, if it names one: as the model
    (``SPRBOT_MODEL=model.gguf``) or as NeuralChat's ``loading_config.gguf_model_path``."""
    from inference.gguf import import_gguf, is_gguf

    source = config.loading_config.gguf_model_path or config.model_name_or_path
    if not is_gguf(source):
        return config
    folder = str(import_gguf(Path(source)))
    tokenizer = config.tokenizer_name_or_path
    return replace(
        config,
        model_name_or_path=folder,
        tokenizer_name_or_path=folder if tokenizer is None or is_gguf(tokenizer) else tokenizer,
    )


def _load_help(what: str, name: str, exc: Exception) -> ModelLoadError:
    local = Path(name).expanduser()
    if local.exists():
        hint = f"{local} exists but does not hold a loadable {what}: {exc}"
    elif os.environ.get("HF_HUB_OFFLINE") == "1" or "connect" in str(exc).lower():
        hint = (
            f"{name!r} is not a local directory, and the Hugging Face Hub cannot be reached "
            "(offline) and the local cache does not have it. Download it where there is "
            f"internet (`huggingface-cli download {name}`) and copy the cache or folder here, "
            "then set SPRBOT_MODEL to that folder. For an offline test model, run "
            "`sprbot model init-tiny DIR`."
        )
    else:
        hint = f"{name!r} could not be loaded: {exc}"
    return ModelLoadError(f"cannot load the {what}: {hint}")


def _load_tokenizer(config: PipelineConfig) -> Any:
    name = config.tokenizer_name_or_path or config.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name,
            token=config.hf_access_token,
            trust_remote_code=config.loading_config.trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise _load_help("tokenizer", name, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(config: PipelineConfig, dtype: str, device: str) -> torch.nn.Module:
    name = config.model_name_or_path
    kwargs = {_DTYPE_KWARG: DTYPES[dtype]}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name,
            token=config.hf_access_token,
            trust_remote_code=config.loading_config.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as exc:
        raise _load_help("model", name, exc) from None
    peft_path = config.loading_config.peft_path
    if peft_path:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, peft_path)
        except (OSError, ValueError) as exc:
            raise _load_help("LoRA adapter (loading_config.peft_path)", peft_path, exc) from None
        # Merged weights decode as fast as the base model; the adapter is not trained here.
        model = model.merge_and_unload()
    return model.to(device).eval()


def _eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    configured = getattr(generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _generate_with_hf(
    model: torch.nn.Module,
    prompt_ids: list[int],
    config: GenerationConfig,
    eos: set[int],
    thread: ThreadPoolExecutor,
) -> Iterator[int]:
    """Token ids from ``model.generate``, streamed from ``thread``.

    Used for IPEX-optimised models, whose forward takes IPEX's own cache layout, so only
    their ``generate`` drives them. Closing the iterator early stops the generation.
    """
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    abandoned = threading.Event()

    class _StopWhenAbandoned(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), abandoned.is_set(), dtype=torch.bool)

    tokens: queue.Queue[Any] = queue.Queue()
    done = object()

    class _Streamer(BaseStreamer):
        prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate first hands over the prompt
                self.prompt_seen = True
                return
            for token_id in value.reshape(-1).tolist():
                tokens.put(token_id)

        def end(self) -> None:
            tokens.put(done)

    sampling = (
        {"temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p}
        if config.do_sample
        else {}
    )
    input_ids = torch.tensor([prompt_ids])
    errors: list[BaseException] = []

    def run() -> None:
        try:
            if config.do_sample and config.seed is not None:
                torch.manual_seed(config.seed)  # generate samples from the global generator
            with torch.inference_mode():
                model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=config.max_new_tokens,
                    do_sample=config.do_sample,
                    repetition_penalty=config.repetition_penalty,
                    num_beams=1,
                    eos_token_id=sorted(eos),
                    pad_token_id=min(eos) if eos else 0,
                    streamer=_Streamer(),
                    stopping_criteria=StoppingCriteriaList([_StopWhenAbandoned()]),
                    **sampling,
                )
        except BaseException as exc:
            errors.append(exc)
            tokens.put(done)

    finished = thread.submit(run)
    try:
        while (token_id := tokens.get()) is not done:
            if token_id in eos:
                break
            yield token_id
    finally:
        abandoned.set()
        finished.result()
    if errors:
        raise errors[0]
