"""Fine-tuning speed: training tokens/s and peak memory of ``finetune_model`` for fp32 vs bf16
and LoRA vs full on ``small``, the padding share on a mixed-length FAQ set, and optionally
TRL's ``SFTTrainer`` on the same data and settings.

    python bench/finetune.py                 # small; LoRA r=8 fp32 and bf16, full bf16; 8 x 128
    python bench/finetune.py --trl           # + TRL's SFTTrainer (pip install -e '.[bench]')
    python bench/finetune.py --quick         # smoke test: tiny model, a few steps, to a temp file

The data: ``--rows`` FAQ pairs with answers of 3 to 90 words (sequences of ~25 to 150 tokens,
cut at ``--max-seq-length``), batches of ``--batch``. Every variant trains in a process of its
own, so its peak RSS is its own: a 2-step warm-up run, then ``--steps`` measured steps.
Tokens/s counts real tokens (padding excluded) over the wall time of ``Trainer.train``.
Variants take turns, ``--repeats`` rounds, and each figure is the median: these machines are
shared and noisy, so read the ratios, measured in one run.

Targets (issue 4): bf16 >= 1.3x fp32 (LoRA r=8); at most 5% of batch tokens padding; our
tokens/s at least TRL's. Prints a table and writes JSON (default
``bench/results/finetune.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
# bench/inference.py is named like the `inference` package: keep bench/ off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
sys.path.insert(0, str(BENCH_DIR.parent))

# name -> (finetune_model or trl, bf16, full fine-tune)
VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "lora-fp32": ("ours", False, False),
    "lora-bf16": ("ours", True, False),
    "full-bf16": ("ours", True, True),
    "trl-lora-bf16": ("trl", True, False),
}
TEXT = (
    "sprbot answers the team's questions about holidays offices printers parking expenses "
    "meetings laptops passwords releases deploys reviews builds tests and the wifi at reception"
)
WORDS = TEXT.split()


def model_dir(size: str) -> Path:
    """The init-tiny model of ``size``, from the cache bench/inference.py keeps."""
    spec = importlib.util.spec_from_file_location("bench_inference", BENCH_DIR / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.model_dir(size)


def faq_rows(n: int) -> list[dict[str, str]]:
    """FAQ pairs of mixed length: questions of 5-14 words, answers of 3-90 words."""

    def words(count: int, start: int) -> str:
        return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(count)).capitalize()

    return [
        {
            "instruction": f"{words(5 + i % 10, i)}?",
            "input": "",
            "output": f"{words(3 + (i * 37) % 88, 3 * i)}.",
        }
        for i in range(n)
    ]


# -- one variant, in its own process ----------------------------------------------------------


def run_ours(args: argparse.Namespace, out: Path, steps: int, bf16: bool, full: bool) -> dict:
    from training import (
        DataArguments,
        FinetuningArguments,
        ModelArguments,
        TextGenerationFinetuningConfig,
        TrainingArguments,
        finetune_model,
    )

    result = finetune_model(
        TextGenerationFinetuningConfig(
            model_args=ModelArguments(model_name_or_path=args.model),
            data_args=DataArguments(train_file=args.data, max_seq_length=args.max_seq_length),
            training_args=TrainingArguments(
                output_dir=str(out),
                do_train=True,
                max_steps=steps,
                per_device_train_batch_size=args.batch,
                learning_rate=1e-4,
                bf16=bf16,
                use_cpu=True,
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
                seed=0,
            ),
            finetune_args=FinetuningArguments(lora_rank=8, lora_alpha=16, full_finetune=full),
        )
    )
    m = result.metrics
    return {
        "tokens": m["train_tokens"],
        "seconds": m["train_tokens"] / m["train_tokens_per_second"],
        "padding_fraction": m["train_padding_fraction"],
        "train_loss": m["train_loss"],
        "trainable_parameters": m["trainable_parameters"],
    }


def run_trl(args: argparse.Namespace, out: Path, steps: int, bf16: bool) -> dict:
    """TRL's SFTTrainer with what a TRL user would write for the same job: prompt-completion
    rows through the chat template, loss on the completion, the same LoRA, base weights in
    bf16, the same batch, length limit, steps and learning rate."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = json.loads(Path(args.data).read_text())
    dataset = datasets.Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": r["instruction"]}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in rows
        ]
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(out),
            max_steps=steps,
            per_device_train_batch_size=args.batch,
            learning_rate=1e-4,
            bf16=bf16,
            use_cpu=True,
            max_length=args.max_seq_length,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type="CAUSAL_LM"),
    )
    counts = {"tokens": 0, "slots": 0}
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        counts["tokens"] += int(batch["attention_mask"].sum())
        counts["slots"] += batch["attention_mask"].numel()
        return batch

    trainer.data_collator = counting  # read when train() builds its dataloader
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    return {
        "tokens": counts["tokens"],
        "seconds": seconds,
        "padding_fraction": 1 - counts["tokens"] / counts["slots"],
        "train_loss": result.metrics["train_loss"],
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    engine, bf16, full = VARIANTS[args.child]
    with tempfile.TemporaryDirectory() as tmp:
        for name, steps in (("warm", 2), ("run", args.steps)):
            out = Path(tmp) / name
            if engine == "ours":
                measured = run_ours(args, out, steps, bf16, full)
            else:
                measured = run_trl(args, out, steps, bf16)
    # ru_maxrss is in KiB on Linux.
    measured["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    measured["tokens_per_second"] = measured["tokens"] / measured["seconds"]
    return measured


def spawn(args: argparse.Namespace, variant: str, model: Path, data: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--model",
        str(model),
        "--data",
        str(data),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--max-seq-length",
        str(args.max_seq_length),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the run ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="tiny, small or base (init-tiny)")
    parser.add_argument("--rows", type=int, default=256, help="FAQ pairs in the data set")
    parser.add_argument("--steps", type=int, default=32, help="measured optimizer steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--trl", action="store_true", help="also run TRL's SFTTrainer")
    parser.add_argument("--quick", action="store_true", help="tiny model, 4 steps, 1 round")
    parser.add_argument("--out", help="JSON file (default bench/results/finetune.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.quick:
        args.size, args.rows, args.steps, args.repeats = "tiny", 64, 4, 1
    out = Path(
        args.out
        or (
            Path(tempfile.gettempdir()) / "sprbot-finetune-quick.json"
            if args.quick
            else BENCH_DIR / "results" / "finetune.json"
        )
    )
    names = [n for n in VARIANTS if args.trl or VARIANTS[n][0] == "ours"]
    model = model_dir(args.size)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "faq.json"
        data.write_text(json.dumps(faq_rows(args.rows)))
        for round_ in range(args.repeats):
            # Alternate the order, so neither side always runs first after a quiet spell.
            for name in names if round_ % 2 == 0 else names[::-1]:
                print(f"round {round_ + 1}/{args.repeats}: {name} ...", flush=True)
                runs[name].append(spawn(args, name, model, data))

    summary = {}
    for name, results in runs.items():
        rates = [r["tokens_per_second"] for r in results]
        summary[name] = {
            "tokens_per_second": statistics.median(rates),
            "tokens_per_second_range": [min(rates), max(rates)],
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in results),
            "padding_fraction": statistics.median(r["padding_fraction"] for r in results),
            "train_loss": statistics.median(r["train_loss"] for r in results),
            "trainable_parameters": results[0]["trainable_parameters"],
        }
    ratios = {
        "bf16_over_fp32_lora": summary["lora-bf16"]["tokens_per_second"]
        / summary["lora-fp32"]["tokens_per_second"],
        "lora_over_full_bf16": summary["lora-bf16"]["tokens_per_second"]
        / summary["full-bf16"]["tokens_per_second"],
    }
    if "trl-lora-bf16" in summary:
        ratios["ours_over_trl"] = (
            summary["lora-bf16"]["tokens_per_second"]
            / summary["trl-lora-bf16"]["tokens_per_second"]
        )

    print()
    print(
        f"{args.size}, {args.rows} FAQ rows, batch {args.batch} x <= {args.max_seq_length} "
        f"tokens, {args.steps} steps, {args.threads} threads, median of {args.repeats}"
    )
    header = f"{'variant':<15}{'tok/s':>9}{'range':>17}{'peak MiB':>10}{'padding':>9}{'loss':>8}"
    print(header)
    print("-" * len(header))
    for name, s in summary.items():
        low, high = s["tokens_per_second_range"]
        print(
            f"{name:<15}{s['tokens_per_second']:>9.0f}{f'{low:.0f}-{high:.0f}':>17}"
            f"{s['peak_rss_mib']:>10.0f}{s['padding_fraction']:>9.1%}{s['train_loss']:>8.3f}"
        )
    print()
    if args.quick:
        print("(--quick: a smoke test on the tiny model; its figures mean nothing)")
    padding = summary["lora-bf16"]["padding_fraction"]
    print(f"bf16 / fp32 (LoRA r=8): {ratios['bf16_over_fp32_lora']:.2f}x   (target >= 1.3x)")
    print(f"LoRA / full (bf16):     {ratios['lora_over_full_bf16']:.2f}x")
    print(f"padding, ours:          {padding:.1%}   (target <= 5%)")
    if "ours_over_trl" in ratios:
        print(f"ours / TRL SFTTrainer:  {ratios['ours_over_trl']:.2f}x   (target >= 1.0x)")

    import torch
    import transformers

    results = {
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "model", "data")},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
