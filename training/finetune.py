"""``finetune_model``: NeuralChat's fine-tuning on current transformers, in bf16 on CPU.

One call checks the data, trains a LoRA adapter (or every weight) with ``transformers.Trainer``
and writes, atomically, everything a person or the model registry needs into ``output_dir``:

- the adapter (``adapter_config.json``, ``adapter_model.safetensors``) or, with
  ``full_finetune``, the whole model; and the tokenizer;
- ``metrics.json``: train loss, tokens/s, padding, eval loss, perplexity (and ROUGE for
  summarization);
- ``loss_history.json`` and ``loss.png``: training and eval loss by step;
- ``data_card.json``: task, base model, rows used and a hash of them.

The folder is written under ``<output_dir>.partial`` and renamed at the end, so a run that
fails or is killed never leaves a half-written ``output_dir``. It runs unchanged under
``torchrun`` (DDP over gloo on CPU, or oneCCL where installed): every process trains on its
share of each batch and the first one writes the outputs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from bot.errors import SprbotError
from inference.chatbot import _DTYPE_KWARG, _load_help
from inference.device import cpu_has_native_bf16, ipex_status
from inference.tiny import _portable_tokenizer_config
from training.config import (
    DataArguments,
    FinetuneConfigError,
    FinetuningArguments,
    ModelArguments,
    TextGenerationFinetuningConfig,
)
from training.data import (
    Encoder,
    LengthGroupedSampler,
    PadCollator,
    Part,
    conversations,
    encode_part,
    load_splits,
    pack,
    rows_sha256,
)

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
LOSS_HISTORY_FILE = "loss_history.json"
LOSS_PLOT_FILE = "loss.png"
DATA_CARD_FILE = "data_card.json"
# Generating summaries is slow: ROUGE uses this many validation rows unless max_eval_samples
# says otherwise.
ROUGE_DEFAULT_ROWS = 200
# A run logs its training loss at least this often, so that loss.png has a curve.
MIN_LOSS_POINTS = 50

Progress = Callable[[int, int, float | None], None]


class FinetuneError(SprbotError, RuntimeError):
    """Fine-tuning could not start or finish. The message says why and what to do."""


@dataclass(frozen=True)
class FinetuneResult:
    """What ``finetune_model`` wrote, and its metrics."""

    output_dir: Path
    full_finetune: bool
    metrics: dict[str, Any]
    data_card: dict[str, Any]

    @property
    def adapter_path(self) -> Path | None:
        """The LoRA adapter, for ``LoadingModelConfig(peft_path=...)``; None after a full
        fine-tune."""
        return None if self.full_finetune else self.output_dir

    @property
    def model_path(self) -> Path | None:
        """The full model, for ``PipelineConfig(model_name_or_path=...)``; None for LoRA."""
        return self.output_dir if self.full_finetune else None

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    @property
    def loss_history_path(self) -> Path:
        return self.output_dir / LOSS_HISTORY_FILE

    @property
    def loss_plot_path(self) -> Path:
        return self.output_dir / LOSS_PLOT_FILE

    @property
    def data_card_path(self) -> Path:
        return self.output_dir / DATA_CARD_FILE

    def export_merged(self, dest: str | Path, dtype: str = "bfloat16") -> Path:
        """Write the base model with this adapter merged in to ``dest``: serves without peft."""
        if self.full_finetune:
            raise FinetuneError(
                f"{self.output_dir} is already a full model (full_finetune): serve it as is"
            )
        return export_merged(self.output_dir, dest, dtype=dtype)


def finetune_model(
    finetune_cfg: TextGenerationFinetuningConfig,
    *,
    progress: Progress | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> FinetuneResult:
    """Fine-tune ``finetune_cfg.model_args.model_name_or_path`` as NeuralChat did.

    ``training_args`` is a ``transformers.TrainingArguments`` (or ``training.TrainingArguments``,
    which also takes the fields transformers 5 removed). ``bf16=True`` trains in bf16 on CPU:
    with LoRA the frozen base weights are held in bf16, the adapter in fp32 under bf16
    autocast. ``progress(step, total_steps, last_loss)``, if given, is called as training
    goes, in place of transformers' own progress bar. ``callbacks`` are added to the Trainer
    (e.g. to stop early once a goal is met).

    Raises ``DataError`` for unusable data (naming file, row and field) before any training,
    ``FinetuneConfigError`` for unusable options and ``ModelLoadError`` for a model that cannot
    be loaded.
    """
    model_args, data_args, args, ft = _unpack(finetune_cfg)
    output_dir = Path(args.output_dir)
    staging = output_dir.with_name(output_dir.name + ".partial")
    _check_output_dir(output_dir, args)
    transformers.set_seed(args.seed)  # the adapter's initial weights too

    tokenizer = _load_tokenizer(model_args)
    model_type = _model_type(model_args)
    splits = load_splits(data_args, cache_dir=model_args.cache_dir, token=model_args.token)
    train_convs = conversations(splits.train, ft.task, data_args)
    eval_convs = conversations(splits.validation, ft.task, data_args) if splits.validation else []
    encoder = Encoder(
        tokenizer,
        model_name=model_args.model_name_or_path,
        model_type=model_type,
        max_seq_length=data_args.max_seq_length,
        max_source_length=data_args.max_source_length,
        max_target_length=data_args.max_target_length if ft.task == "summarization" else None,
        train_on_inputs=ft.train_on_inputs,
    )
    train_features = encode_part(encoder, train_convs, splits.train)
    eval_features = encode_part(encoder, eval_convs, splits.validation) if eval_convs else []
    if data_args.dataset_concatenation:
        train_features = pack(train_features, data_args.max_seq_length, data_args.dataset_seed)
        eval_features = pack(eval_features, data_args.max_seq_length, data_args.dataset_seed)
    do_eval = bool(args.do_eval and eval_features)
    if args.do_eval and not eval_features:
        log.warning(
            "do_eval is set but there is no validation data: set validation_file or "
            "validation_split_percentage (or use a dataset with a validation split)"
        )
    log.log(
        logging.INFO if args.process_index == 0 else logging.DEBUG,  # once, not once per process
        "%s: %d training rows -> %d examples; %d validation rows; prompt template %s",
        ft.task,
        len(splits.train),
        len(train_features),
        len(splits.validation or []),
        encoder.template,
    )

    if args.bf16 and not cpu_has_native_bf16() and not torch.cuda.is_available():
        log.warning("bf16 on a CPU without AVX-512 BF16 or AMX is emulated and slow")
    model = _load_model(model_args, ft, bf16=args.bf16)
    use_ipex = _ipex_for_training(args)
    run_args = _run_args(args, staging, len(train_features), progress, use_ipex)
    trainer = _Trainer(
        model=model,
        args=run_args,
        train_dataset=train_features if args.do_train else None,
        eval_dataset=eval_features if do_eval else None,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        lengths=[len(f["input_ids"]) for f in train_features],
        group_by_length=not data_args.dataset_concatenation,
    )
    if progress is not None:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_ProgressReport(progress))
    for callback in callbacks or ():
        trainer.add_callback(callback)

    main = run_args.process_index == 0
    if main:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run that was killed
    trainer.accelerator.wait_for_everyone()
    try:
        metrics = _train_and_evaluate(trainer, args, do_eval)
        if do_eval and ft.task == "summarization" and main:
            limit = data_args.max_eval_samples or ROUGE_DEFAULT_ROWS
            metrics.update(
                _rouge(trainer.model, encoder, eval_convs[:limit], data_args, bf16=args.bf16)
            )
        metrics.update(_describe_run(trainer, ft, splits, train_features, eval_features))
        metrics["ipex"] = use_ipex
        model.config.use_cache = True  # saved with a full model: generation wants the cache
        trainer.save_model(str(staging))
        card = _data_card(model_args, data_args, ft, splits, encoder, train_features)
        if main:
            _write_outputs(staging, trainer.state.log_history, metrics, card)
            if output_dir.exists():
                shutil.rmtree(output_dir)
            staging.rename(output_dir)
        trainer.accelerator.wait_for_everyone()
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    log.debug("fine-tuned model written to %s", output_dir)
    return FinetuneResult(output_dir, ft.full_finetune, metrics, card)


# -- configuration ----------------------------------------------------------------------------


def _unpack(cfg: Any) -> tuple[ModelArguments, DataArguments, Any, FinetuningArguments]:
    expected = (
        ("model_args", ModelArguments),
        ("data_args", DataArguments),
        ("training_args", transformers.TrainingArguments),
        ("finetune_args", FinetuningArguments),
    )
    for name, cls in expected:
        value = getattr(cfg, name, None)
        if not isinstance(value, cls):
            raise FinetuneConfigError(
                f"finetune_cfg.{name} must be a {cls.__module__}.{cls.__name__}, "
                f"got {type(value).__name__}"
            )
    args = cfg.training_args
    if not cfg.model_args.model_name_or_path:
        raise FinetuneConfigError("ModelArguments.model_name_or_path is not set: name a model")
    if not (args.do_train or args.do_eval):
        raise FinetuneConfigError(
            "TrainingArguments has neither do_train nor do_eval set: nothing to do; "
            "set do_train=True (and do_eval=True for eval loss and perplexity)"
        )
    if cfg.data_args.special_tokens:
        raise FinetuneConfigError(
            "DataArguments.special_tokens is not supported: new tokens would need new "
            "embeddings; use the tokenizer's own special tokens (its chat template)"
        )
    # A .gguf file trains as the bf16 folder it imports to (once; later runs reuse it).
    from inference.gguf import resolve

    model_args = replace(
        cfg.model_args, model_name_or_path=resolve(cfg.model_args.model_name_or_path)
    )
    return model_args, cfg.data_args, args, cfg.finetune_args


def _check_output_dir(output_dir: Path, args: Any) -> None:
    if output_dir.is_file():
        raise FinetuneConfigError(f"output_dir {output_dir} is a file; name a folder")
    if (
        output_dir.is_dir()
        and any(output_dir.iterdir())
        and not getattr(args, "overwrite_output_dir", False)
    ):
        raise FinetuneConfigError(
            f"output_dir {output_dir} already holds files; choose a new folder, or set "
            "overwrite_output_dir=True (training.TrainingArguments accepts it on any "
            "transformers) to replace it when the run succeeds"
        )


def _run_args(args: Any, staging: Path, examples: int, progress: Progress | None, ipex: bool):
    """The caller's TrainingArguments, pointed at the staging folder (a copy: theirs is kept)."""
    run = copy.copy(args)
    run.output_dir = str(staging)
    logging_dir = getattr(run, "logging_dir", None)  # 4.x derives it from output_dir
    if logging_dir and Path(logging_dir).is_relative_to(args.output_dir):
        run.logging_dir = str(staging / Path(logging_dir).relative_to(args.output_dir))
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps
    per_step *= max(1, args.world_size)
    steps = args.max_steps
    if steps <= 0:
        steps = math.ceil(args.num_train_epochs * max(1, math.ceil(examples / per_step)))
    if run.logging_strategy == "steps" and run.logging_steps >= 1:
        run.logging_steps = max(1, min(int(run.logging_steps), math.ceil(steps / MIN_LOSS_POINTS)))
        run.logging_first_step = True
    if progress is not None:
        run.disable_tqdm = True
    if ipex:
        run.use_ipex = True
    return run


def _ipex_for_training(args: Any) -> bool:
    """IPEX where the Trainer can use it: transformers 4.x's ``use_ipex``, on CPU."""
    if "use_ipex" not in transformers.TrainingArguments.__dataclass_fields__:
        return False
    usable, why = ipex_status()
    if not usable:
        log.debug("IPEX not used for training: %s", why)
        return False
    if torch.cuda.is_available() and not args.use_cpu:
        return False
    from intel_extension_for_pytorch.cpu._auto_kernel_selection import _using_tpp

    # ipex.llm.optimize (build_chatbot) switches IPEX to TPP kernels for the whole process;
    # ipex.optimize then packs training weights in a layout that accelerate cannot move.
    if _using_tpp():
        log.info("IPEX not used for training: ipex.llm.optimize already ran in this process")
        return False
    return True


# -- model ------------------------------------------------------------------------------------


def _load_tokenizer(model_args: ModelArguments) -> Any:
    name = model_args.tokenizer_name or model_args.model_name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name,
            use_fast=model_args.use_fast_tokenizer,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            cache_dir=model_args.cache_dir,
        )
    except (OSError, ValueError) as exc:
        raise _load_help("tokenizer", name, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _model_type(model_args: ModelArguments) -> str | None:
    name = model_args.config_name or model_args.model_name_or_path
    try:
        config = AutoConfig.from_pretrained(
            name,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
            cache_dir=model_args.cache_dir,
        )
    except (OSError, ValueError) as exc:
        raise _load_help("model config", name, exc) from None
    return getattr(config, "model_type", None)


def _load_model(model_args: ModelArguments, ft: FinetuningArguments, *, bf16: bool):
    name = model_args.model_name_or_path
    # LoRA leaves the base weights frozen: hold them in bf16. A full fine-tune keeps fp32
    # master weights and computes in bf16 under autocast.
    dtype = torch.bfloat16 if bf16 and not ft.full_finetune else torch.float32
    kwargs: dict[str, Any] = {
        _DTYPE_KWARG: dtype,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
        "cache_dir": model_args.cache_dir,
    }
    if model_args.config_name:
        kwargs["config"] = AutoConfig.from_pretrained(model_args.config_name)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_help("model", name, exc) from None
    model.config.use_cache = False  # no KV cache while training
    if ft.full_finetune:
        return model

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=ft.lora_rank,
        lora_alpha=ft.lora_alpha,
        lora_dropout=ft.lora_dropout,
        target_modules="all-linear" if ft.lora_all_linear else ft.lora_target_modules,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise FinetuneConfigError(
            f"cannot put LoRA on {name}: {exc}. Name the modules in "
            "FinetuningArguments.lora_target_modules, or set lora_all_linear=True"
        ) from None
    return model


# -- training ---------------------------------------------------------------------------------


class _Trainer(Trainer):
    """The Trainer, with batches of similar length and a count of real and padding tokens."""

    def __init__(self, *args: Any, lengths: list[int], group_by_length: bool, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lengths = lengths
        self._group = group_by_length
        self.token_counts = torch.zeros(2, dtype=torch.long)  # real tokens, batch slots

    def _get_train_sampler(self, *args: Any, **kwargs: Any):
        # Dynamic padding pays off only when a batch holds sequences of similar length. Keep
        # a sampler the caller chose explicitly (transformers 5's train_sampling_strategy).
        strategy = getattr(self.args, "train_sampling_strategy", "random")
        if not self._group or strategy != "random":
            return super()._get_train_sampler(*args, **kwargs)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return LengthGroupedSampler(self._lengths, self.args.train_batch_size, seed=seed)

    def compute_loss(self, model, inputs, *args: Any, **kwargs: Any):
        if model.training:
            mask = inputs["attention_mask"]
            self.token_counts += torch.tensor([int(mask.sum()), mask.numel()])
        return super().compute_loss(model, inputs, *args, **kwargs)


class _ProgressReport(TrainerCallback):
    def __init__(self, report: Progress) -> None:
        self.report = report
        self.loss: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.report(state.global_step, state.max_steps, self.loss)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and state.is_world_process_zero:
            self.loss = float(logs["loss"])
            self.report(state.global_step, state.max_steps, self.loss)


def _train_and_evaluate(trainer: _Trainer, args: Any, do_eval: bool) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    if args.do_train:
        started = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        elapsed = time.perf_counter() - started
        metrics.update(result.metrics)
        counts = trainer.token_counts.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        tokens, slots = (int(c) for c in counts)
        metrics["train_tokens"] = tokens
        metrics["train_padding_fraction"] = (slots - tokens) / slots if slots else 0.0
        metrics["train_tokens_per_second"] = tokens / elapsed if elapsed else 0.0
        metrics["train_steps"] = trainer.state.global_step
        for name, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise FinetuneError(
                    f"training diverged: {name} is {value}; lower learning_rate, or train in "
                    "fp32 (bf16=False) to see whether bf16 is the cause"
                )
    if do_eval:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        if "eval_loss" in eval_metrics:
            loss = eval_metrics["eval_loss"]
            metrics["perplexity"] = math.exp(loss) if loss < 700 else math.inf
    return metrics


@torch.no_grad()
def _rouge(
    model, encoder: Encoder, convs: list, data_args: DataArguments, *, bf16: bool
) -> dict[str, Any]:
    """ROUGE-1/2/L (F1) of greedy summaries of validation articles against their highlights."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    tokenizer = encoder.tokenizer
    was_training = model.training
    model.eval()
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device  # the Trainer may have moved it to a GPU
    for conv in convs:
        ids = encoder.prompt_ids(conv[:-1])
        prompt = torch.tensor([ids], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=data_args.max_target_length,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        summary = tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)
        for name, score in scorer.score(conv[-1]["content"], summary).items():
            totals[name] += score.fmeasure
    model.train(was_training)
    n = max(1, len(convs))
    return {**{f"eval_{k}": v / n for k, v in totals.items()}, "eval_rouge_rows": len(convs)}


def _describe_run(trainer: _Trainer, ft, splits, train_features, eval_features) -> dict[str, Any]:
    model = trainer.model
    return {
        "task": ft.task,
        "method": "full" if ft.full_finetune else "lora",
        "train_rows": len(splits.train),
        "train_examples": len(train_features),
        "eval_rows": len(splits.validation or []),
        "eval_examples": len(eval_features),
        "world_size": trainer.args.world_size,
        "bf16": bool(trainer.args.bf16),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


# -- outputs ----------------------------------------------------------------------------------


def _data_card(model_args, data_args, ft, splits, encoder: Encoder, train_features):
    def part(p: Part | None) -> dict[str, Any] | None:
        if p is None:
            return None
        return {
            "source": p.table.source,
            "rows_in_source": len(p.table.rows),
            "rows_used": len(p),
            "sha256": rows_sha256(p),
        }

    return {
        "task": ft.task,
        "base_model": model_args.model_name_or_path,
        "base_model_revision": model_args.model_revision,
        "prompt_template": encoder.template,
        "train": part(splits.train),
        "validation": part(splits.validation),
        "train_examples": len(train_features),
        "tokens_per_epoch": sum(len(f["input_ids"]) for f in train_features),
        "max_seq_length": data_args.max_seq_length,
        "max_source_length": data_args.max_source_length,
        "max_target_length": data_args.max_target_length,
        "train_on_inputs": ft.train_on_inputs,
        "packed": data_args.dataset_concatenation,
        "method": "full" if ft.full_finetune else "lora",
        "lora": None if ft.full_finetune else _lora_card(ft),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _lora_card(ft: FinetuningArguments) -> dict[str, Any]:
    card = {k: v for k, v in asdict(ft).items() if k.startswith("lora_")}
    if not ft.lora_all_linear and ft.lora_target_modules is None:
        card["lora_target_modules"] = "the model family's attention projections (peft default)"
    return card


def _write_outputs(folder: Path, log_history: list[dict], metrics: dict, card: dict) -> None:
    history = _loss_history(log_history)
    (folder / METRICS_FILE).write_text(json.dumps(_finite(metrics), indent=2, sort_keys=True))
    (folder / LOSS_HISTORY_FILE).write_text(json.dumps(history, indent=2))
    (folder / DATA_CARD_FILE).write_text(json.dumps(card, indent=2))
    _plot_loss(history, folder / LOSS_PLOT_FILE)
    tokenizer_config = folder / "tokenizer_config.json"
    if tokenizer_config.exists():
        _portable_tokenizer_config(tokenizer_config)  # readable by transformers 4.x too


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON has no Infinity: write overflowing values (perplexity) as null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v)
        for k, v in metrics.items()
    }


def _loss_history(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    train, evaluation = [], []
    for entry in log_history:
        if "loss" in entry:
            train.append(
                {
                    "step": entry.get("step"),
                    "epoch": entry.get("epoch"),
                    "loss": entry["loss"],
                    "learning_rate": entry.get("learning_rate"),
                }
            )
        if "eval_loss" in entry:
            evaluation.append(
                {"step": entry.get("step"), "epoch": entry.get("epoch"), "loss": entry["eval_loss"]}
            )
    return {"train": train, "eval": evaluation}


def _plot_loss(history: dict[str, list[dict[str, Any]]], path: Path) -> None:
    # The object API draws off-screen without touching pyplot's global backend, which would
    # change plotting in the caller's notebook.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if history["train"]:
        axes.plot(
            [p["step"] for p in history["train"]],
            [p["loss"] for p in history["train"]],
            label="training loss",
        )
    if history["eval"]:
        axes.plot(
            [p["step"] for p in history["eval"]],
            [p["loss"] for p in history["eval"]],
            "o-",
            label="eval loss",
        )
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    if history["train"] or history["eval"]:
        axes.legend()
    else:
        axes.set_title("no loss was logged (no training steps)")
    figure.tight_layout()
    figure.savefig(path)


def export_merged(
    adapter_dir: str | Path,
    dest: str | Path,
    *,
    dtype: str = "bfloat16",
    base_model: str | None = None,
) -> Path:
    """Merge a LoRA adapter into its base model's weights (``merge_and_unload``) and write the
    result, with the tokenizer and data card, to ``dest``: it serves without peft.

    The base model is the one the adapter was trained on, unless ``base_model`` names another
    copy of it (another path to the same weights).
    """
    from peft import PeftModel

    from inference.device import DTYPES

    adapter_dir, dest = Path(adapter_dir), Path(dest)
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.exists():
        raise FinetuneError(f"{adapter_dir} holds no LoRA adapter (no adapter_config.json)")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FinetuneError(f"{dest} already exists and is not empty; choose a new folder")
    if dtype not in ("bfloat16", "float32"):
        raise FinetuneError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    base = base_model or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise FinetuneError(f"{config_file} does not name its base model; pass base_model")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **{_DTYPE_KWARG: DTYPES[dtype]})
    except (OSError, ValueError) as exc:
        raise _load_help("base model", base, exc) from None
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    has_tokenizer = (adapter_dir / "tokenizer_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base)

    staging = dest.with_name(dest.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _portable_tokenizer_config(staging / "tokenizer_config.json")
        if (adapter_dir / DATA_CARD_FILE).exists():
            card = json.loads((adapter_dir / DATA_CARD_FILE).read_text())
            card["merged_from_adapter"] = str(adapter_dir)
            (staging / DATA_CARD_FILE).write_text(json.dumps(card, indent=2))
        if dest.exists():
            dest.rmdir()  # empty, checked above
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
