"""The seed's three fine-tunes (Alpaca text generation, cnn_dailymail summarization,
evol-codealpaca code generation) on a real small chat model, each measured before and after.

    python bench/seed_finetunes.py --model DIR                  # all three, 20-30 min, 1 thread
    python bench/seed_finetunes.py --model DIR --tasks code     # one (alpaca,summarization,code)
    python bench/seed_finetunes.py --model DIR --quick          # smoke run: a few rows and steps

``DIR`` is a Hugging Face model folder; the figures in docs/FINETUNING.md are for
SmolLM2-135M-Instruct in bf16 (``sprbot model demo`` prints its folder). Every fine-tune is
one ``finetune_model`` call as in the seed (``bf16=True``, batch 4 x 2 accumulation steps),
LoRA with the project's r=8, alpha 16, dropout 0.05, but tuned here: on every linear layer
(``lora_all_linear=True``; ``--attention-only`` keeps the project's default targets, the
attention projections), with each task's learning rate and epochs (``FULL``; ``--lr`` and
``--epochs`` override them). The data is written here, never downloaded, in the originals'
schemas (bench/data/seed/):

- summarization (``article``/``highlights``): made-up local news articles of ~65-130 words,
  their highlights in a house style (three short lines); ROUGE-1/2/L (F1, rouge_score with
  stemming, as ``finetune_model`` reports them) of greedy summaries of 50 held-out articles.
  ``finetune_model``'s own ROUGE (one summary at a time) runs on the first 8 of them only.
- code generation (``instruction``/``output``): 48 training tasks, 36 different held-out
  ones, answers in a house style (``--code-style``); the pass rate of the held-out functions
  against their unit tests, each run in a fresh Python with a 10 s timeout (the code is the
  ```python block that defines the function, else the first fenced block, else the raw
  answer).
- Alpaca (``instruction``/``input``/``output``): ten kinds of small task with terse answers;
  held-out loss, the held-out answers that match the reference exactly, and one example.

Before and after are measured the same way: the base model in bf16, then the same model with
the trained adapter (unmerged, as trained), greedy decoding under bf16 autocast, prompts built
by the training ``Encoder`` (exactly the prompts trained on and served). Held-out loss is the
mean token cross-entropy over answer tokens. The merged adapter (``merge_and_unload`` into the
bf16 weights, as the engine serves it) is checked on the held-out loss too.

Prints a table and writes JSON (default ``bench/results/seed_finetunes.json``; with
``--quick``, the temp dir).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
# bench/inference.py is named like the `inference` package: keep bench/ off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
sys.path.insert(0, str(BENCH_DIR.parent))
DATA_DIR = BENCH_DIR / "data" / "seed"

TASKS = ("alpaca", "summarization", "code")
FINETUNE_TASK = {
    "alpaca": "completion",
    "summarization": "summarization",
    "code": "code-generation",
}
# The held-out Alpaca row shown before -> after: a capital question (one fact, one sentence),
# picked before any run.
ALPACA_EXAMPLE = 3

# Sizes and lengths per task; --quick shrinks them.
FULL = {
    "alpaca": {
        "train": 160,
        "held_out": 40,
        "epochs": 2,
        "lr": 1e-3,
        "all_linear": True,
        "new_tokens": 40,
    },
    "summarization": {
        "train": 96,
        "held_out": 50,
        "epochs": 2,
        "lr": 2e-3,
        "all_linear": True,
        "new_tokens": 64,
        "builtin": 8,
    },
    "code": {
        "train": 48,
        "held_out": 36,
        "epochs": 3,
        "lr": 1e-3,
        "all_linear": True,
        "new_tokens": 128,
    },
}
QUICK = {
    "alpaca": {
        "train": 16,
        "held_out": 4,
        "epochs": 1,
        "lr": 1e-3,
        "all_linear": True,
        "new_tokens": 8,
    },
    "summarization": {
        "train": 8,
        "held_out": 3,
        "epochs": 1,
        "lr": 1e-3,
        "all_linear": True,
        "new_tokens": 8,
        "builtin": 1,
    },
    "code": {
        "train": 8,
        "held_out": 3,
        "epochs": 1,
        "lr": 1e-3,
        "all_linear": True,
        "new_tokens": 16,
    },
}


def load_data_module(name: str):
    spec = importlib.util.spec_from_file_location(f"seed_{name}", DATA_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_json(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


# -- the model, before and after --------------------------------------------------------------


class Bench:
    """The base model, its tokenizer and the training prompts, for one task."""

    def __init__(self, args: argparse.Namespace, task: str, data_args) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from training.data import Encoder

        self.args = args
        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(args.model)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_type = getattr(AutoConfig.from_pretrained(args.model), "model_type", None)
        self.encoder = Encoder(
            self.tokenizer,
            model_name=args.model,
            model_type=model_type,
            max_seq_length=data_args.max_seq_length,
            max_source_length=data_args.max_source_length,
            max_target_length=data_args.max_target_length if task == "summarization" else None,
        )
        self.model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
        self.model.eval()

    def with_adapter(self, adapter_dir: Path) -> None:
        from peft import PeftModel

        self.model = PeftModel.from_pretrained(self.model, str(adapter_dir)).eval()

    def merge(self) -> None:
        self.model = self.model.merge_and_unload().eval()

    def generate(self, convs: list[list[dict]], max_new_tokens: int) -> list[str]:
        """Greedy answers to each conversation's prompt (its last turn left out), in batches of
        similar length, left-padded."""
        torch = self.torch
        tok = self.tokenizer
        prompts = [self.encoder.prompt_ids(conv[:-1]) for conv in convs]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: list[str] = [""] * len(prompts)
        size = self.args.gen_batch
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            width = max(len(prompts[i]) for i in batch)
            ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                n = len(prompts[i])
                ids[row, width - n :] = torch.tensor(prompts[i])
                mask[row, width - n :] = 1
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                    use_cache=True,
                )
            for row, i in enumerate(batch):
                answers[i] = tok.decode(out[row, width:], skip_special_tokens=True).strip()
        return answers

    def loss(self, convs: list[list[dict]]) -> float:
        """Mean cross-entropy per answer token of the held-out answers (labels as trained)."""
        torch = self.torch
        from training.data import IGNORE_INDEX, PadCollator

        features = [f for conv in convs for f in self.encoder.encode(conv)]
        features.sort(key=lambda f: len(f["input_ids"]))
        collate = PadCollator(self.tokenizer.pad_token_id)
        total, count = 0.0, 0
        for start in range(0, len(features), 4):
            batch = collate(features[start : start + 4])
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                logits = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
            labels = batch["labels"][:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                    labels.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            count += int((labels != IGNORE_INDEX).sum())
        return total / max(1, count)


# -- metrics ----------------------------------------------------------------------------------


def rouge(summaries: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1, scored as finetune_model scores its own summaries."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for summary, reference in zip(summaries, references, strict=True):
        for name, score in scorer.score(reference, summary).items():
            totals[name] += score.fmeasure
    return {k: v / max(1, len(summaries)) for k, v in totals.items()}


FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(answer: str, name: str) -> str:
    """The fenced block that defines ``name``, else the first fenced block (an unclosed one
    runs to the end), else the whole answer."""
    blocks = [body for _, body in FENCE.findall(answer)]
    for body in blocks:
        if re.search(rf"^\s*def\s+{re.escape(name)}\s*\(", body, re.M):
            return body
    return blocks[0] if blocks else answer


def pass_rate(code_mod, rows: list[dict], answers: list[str], timeout: float):
    """How many answers pass their task's tests, and each task's result."""
    results = []
    for row, answer in zip(rows, answers, strict=True):
        ok, why = code_mod.run_tests(extract_code(answer, row["name"]), row["tests"], timeout)
        results.append({"name": row["name"], "passed": ok, "error": why})
    passed = sum(r["passed"] for r in results)
    summary = {"passed": passed, "total": len(results), "pass_rate": passed / max(1, len(results))}
    return summary, results


# -- one task ---------------------------------------------------------------------------------


def task_data(task: str, sizes: dict, tmp: Path, style: str) -> tuple[Path, Path, list[dict]]:
    """Training and held-out files for ``task`` (and the held-out rows, with any extra fields)."""
    if task == "alpaca":
        train, held = load_data_module("alpaca").splits(sizes["train"], sizes["held_out"])
    elif task == "summarization":
        train, held = load_data_module("news").splits(sizes["train"], sizes["held_out"])
    else:
        code = load_data_module("code_tasks")
        train = code.train_rows(style)[: sizes["train"]]
        held = code.held_out_rows(style)[: sizes["held_out"]]
    train_file = write_json(tmp / f"{task}-train.json", train)
    # The validation file keeps only the schema's columns (the tests stay here).
    columns = ("instruction", "input", "output", "article", "highlights")
    held_file = write_json(
        tmp / f"{task}-held-out.json", [{k: r[k] for k in columns if k in r} for r in held]
    )
    return train_file, held_file, held


def run_task(args: argparse.Namespace, task: str, sizes: dict, tmp: Path) -> dict[str, Any]:
    from training import (
        DataArguments,
        FinetuningArguments,
        ModelArguments,
        TextGenerationFinetuningConfig,
        TrainingArguments,
        finetune_model,
    )
    from training.data import SUMMARIZE_INSTRUCTION

    train_file, held_file, held = task_data(task, sizes, tmp, args.code_style)
    summarization = task == "summarization"
    data_args = DataArguments(
        train_file=str(train_file),
        validation_file=str(held_file),
        max_seq_length=384 if summarization else 256,
        max_target_length=sizes["new_tokens"],
        # finetune_model generates its own ROUGE summaries one at a time: on a few rows only.
        max_eval_samples=sizes.get("builtin"),
    )
    if summarization:
        convs = [
            [
                {"role": "user", "content": f"{SUMMARIZE_INSTRUCTION}\n\n{r['article'].strip()}"},
                {"role": "assistant", "content": r["highlights"]},
            ]
            for r in held
        ]
    else:
        convs = [
            [
                {
                    "role": "user",
                    "content": r["instruction"]
                    + (f"\n\n{r['input']}" if r.get("input", "").strip() else ""),
                },
                {"role": "assistant", "content": r["output"]},
            ]
            for r in held
        ]
    references = [c[-1]["content"] for c in convs]
    out: dict[str, Any] = {
        "finetune_task": FINETUNE_TASK[task],
        "train_rows": len(json.loads(train_file.read_text())),
        "held_out_rows": len(held),
    }
    code_mod = load_data_module("code_tasks") if task == "code" else None

    def measure(bench: Bench, label: str) -> dict[str, Any]:
        started = time.perf_counter()
        m: dict[str, Any] = {"held_out_loss": bench.loss(convs)}
        if task == "alpaca":
            answers = bench.generate(convs, sizes["new_tokens"])
            exact = sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True))
            m["exact_match"] = exact
            m["exact_match_rate"] = exact / len(answers)
            m["example"] = answers[min(ALPACA_EXAMPLE, len(answers) - 1)]
            m["answers"] = answers
        elif summarization:
            answers = bench.generate(convs, sizes["new_tokens"])
            m.update(rouge(answers, references))
            k = sizes["builtin"]
            m["first_rows_for_builtin"] = rouge(answers[:k], references[:k])
            m["mean_words"] = sum(len(a.split()) for a in answers) / len(answers)
            m["examples"] = answers[:3]
            m["answers"] = answers
        else:
            answers = bench.generate(convs, sizes["new_tokens"])
            summary, per_task = pass_rate(code_mod, held, answers, args.test_timeout)
            m.update(summary)
            m["tasks"] = [{**r, "answer": a} for r, a in zip(per_task, answers, strict=True)]
        m["seconds"] = time.perf_counter() - started
        print(f"  {label}: {_brief(task, m)}  ({m['seconds']:.0f} s)", flush=True)
        return m

    bench = Bench(args, task, data_args)
    out["before"] = measure(bench, "before")

    all_linear = sizes["all_linear"] and not args.attention_only
    lora = {"lora_all_linear": True} if all_linear else {}
    ft_args = FinetuningArguments(task=FINETUNE_TASK[task], **lora)
    lr = args.lr or sizes["lr"]
    started = time.perf_counter()
    result = finetune_model(
        TextGenerationFinetuningConfig(
            model_args=ModelArguments(model_name_or_path=args.model),
            data_args=data_args,
            training_args=TrainingArguments(
                output_dir=str(tmp / f"{task}-lora"),
                do_train=True,
                do_eval=True,
                num_train_epochs=sizes["epochs"],
                overwrite_output_dir=True,
                per_device_train_batch_size=4,
                per_device_eval_batch_size=4,
                gradient_accumulation_steps=2,
                learning_rate=lr,
                save_strategy="no",
                log_level="warning",
                disable_tqdm=True,
                report_to=[],
                seed=args.seed,
                bf16=True,
            ),
            finetune_args=ft_args,
        )
    )
    train_wall = time.perf_counter() - started
    metrics = result.metrics
    out["train"] = {
        "wall_seconds": train_wall,
        "train_runtime": metrics.get("train_runtime"),
        "steps": metrics.get("train_steps"),
        "epochs": sizes["epochs"],
        "learning_rate": lr,
        "train_loss": metrics.get("train_loss"),
        "train_tokens": metrics.get("train_tokens"),
        "train_tokens_per_second": metrics.get("train_tokens_per_second"),
        "trainable_parameters": metrics.get("trainable_parameters"),
        "lora": result.data_card.get("lora"),
    }
    # finetune_model's own eval: loss on the validation file (for summarization its first
    # `builtin` rows, with its own ROUGE on them).
    out["finetune_model_eval"] = {
        k: v for k, v in metrics.items() if k.startswith("eval_") or k == "perplexity"
    }
    print(
        f"  trained: {metrics.get('train_steps')} steps, {train_wall:.0f} s, train loss "
        f"{metrics.get('train_loss', float('nan')):.3f}",
        flush=True,
    )

    bench.with_adapter(result.output_dir)
    out["after"] = measure(bench, "after")
    started = time.perf_counter()
    bench.merge()
    out["after_merged_bf16"] = {
        "held_out_loss": bench.loss(convs),
        "seconds": time.perf_counter() - started,
    }
    if task == "code":
        out["instructions"] = [r["instruction"] for r in held]
    else:
        out["references"] = references
    return out


def _brief(task: str, m: dict[str, Any]) -> str:
    loss = f"loss {m['held_out_loss']:.3f}"
    if task == "alpaca":
        return f"{loss}, exact {m['exact_match']}"
    if task == "summarization":
        return (
            f"{loss}, ROUGE-1/2/L {m['rouge1']:.3f}/{m['rouge2']:.3f}/{m['rougeL']:.3f}, "
            f"{m['mean_words']:.0f} words"
        )
    return f"{loss}, passed {m['passed']}/{m['total']}"


# -- the run ----------------------------------------------------------------------------------


def print_table(results: dict[str, Any]) -> None:
    header = ("task", "metric", "before", "after", "training")
    rows: list[tuple[str, ...]] = []
    for task, r in results["tasks"].items():
        b, a, t = r["before"], r["after"], r["train"]
        n = r["held_out_rows"]
        train = f"{t['wall_seconds']:.0f} s, {t['steps']} steps"
        if task == "summarization":
            for key, label in (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rougeL", "ROUGE-L")):
                rows.append((task, f"{label} ({n} held out)", f"{b[key]:.3f}", f"{a[key]:.3f}"))
        elif task == "code":
            before, after = f"{b['passed']}/{n}", f"{a['passed']}/{n}"
            rows.append((task, f"tests passed ({n} held out)", before, after))
        else:
            before, after = f"{b['exact_match']}/{n}", f"{a['exact_match']}/{n}"
            rows.append((task, f"exact answers ({n} held out)", before, after))
        loss = (f"{b['held_out_loss']:.3f}", f"{a['held_out_loss']:.3f}")
        rows.append((task, "held-out loss", *loss, train))
    rows = [row + ("",) * (len(header) - len(row)) for row in rows]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if "alpaca" in results["tasks"]:
        r = results["tasks"]["alpaca"]
        i = min(ALPACA_EXAMPLE, r["held_out_rows"] - 1)
        print(f"\nalpaca example: {r['references'][i]!r} is the reference")
        print(f"  before: {r['before']['example']!r}")
        print(f"  after:  {r['after']['example']!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a Hugging Face model folder")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="smoke run: a few rows and steps")
    parser.add_argument("--out", help="JSON file (default bench/results/seed_finetunes.json)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--lr", type=float, help="learning rate for every task (default: each task's own)"
    )
    parser.add_argument(
        "--attention-only",
        action="store_true",
        help="LoRA on the attention projections only (the project's default targets) instead "
        "of every linear layer",
    )
    parser.add_argument(
        "--epochs", type=float, help="epochs for every task (default: each task's own)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gen-batch", type=int, default=8, help="prompts per generate batch")
    parser.add_argument("--test-timeout", type=float, default=10.0, help="seconds per test run")
    parser.add_argument(
        "--code-style",
        choices=("terse", "steps"),
        default="terse",
        help="house style of the code answers (default terse; see bench/data/seed/code_tasks.py)",
    )
    parser.add_argument("--keep", help="keep the data and adapters in this folder")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        parser.error(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    args.model = str(Path(args.model).expanduser().resolve())
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: not a Hugging Face model folder (no config.json)")

    # Before torch is imported: its thread pool reads these.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["MKL_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    out = Path(
        args.out
        or (
            Path(tempfile.gettempdir()) / "sprbot-seed-finetunes-quick.json"
            if args.quick
            else BENCH_DIR / "results" / "seed_finetunes.json"
        )
    )
    sizes = {t: dict(v) for t, v in (QUICK if args.quick else FULL).items()}
    if args.epochs:
        for v in sizes.values():
            v["epochs"] = args.epochs
    started = time.perf_counter()
    results: dict[str, Any] = {
        "model": args.model,
        "quick": args.quick,
        "settings": {
            "threads": args.threads,
            "learning_rate": args.lr or "per task (sizes)",
            "attention_only": args.attention_only,
            "code_style": args.code_style,
            "seed": args.seed,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "bf16": True,
            "lora": "r=8, alpha=16, dropout=0.05 (project defaults); on every linear layer "
            "(lora_all_linear=True) unless attention_only",
            "sizes": {t: sizes[t] for t in tasks},
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "tasks": {},
    }
    with tempfile.TemporaryDirectory(prefix="seed-finetunes-") as scratch:
        tmp = Path(args.keep) if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        for task in tasks:
            print(f"{task} ({FINETUNE_TASK[task]}):", flush=True)
            results["tasks"][task] = run_task(args, task, sizes[task], tmp)
    results["wall_seconds"] = time.perf_counter() - started

    print()
    print(
        f"{Path(args.model).name}, LoRA r=8 on "
        f"{'the attention projections' if args.attention_only else 'every linear layer'}, bf16, "
        f"{args.threads} thread(s), {results['wall_seconds'] / 60:.1f} min in all"
    )
    print_table(results)
    if args.quick:
        print("\n(--quick: a smoke run on a few rows; its figures mean nothing)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
