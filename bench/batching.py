"""Continuous batching: aggregate decode tokens/s of ``inference.batching.Scheduler`` at several
concurrencies, round-robin (sequences decoded one after another) vs batched (one forward per
step for all of them), and how soon a request joining mid-generation gets its first token.

    python bench/batching.py                          # small, bf16, 2 threads, 1,2,4,8
    python bench/batching.py --concurrency 1,8 --new-tokens 32 --repeats 2

Every variant runs in the same process, interleaved repeat by repeat, so the ratios hold on a
shared, noisy machine; each figure is the median over ``--repeats``. Decode tokens/s counts the
tokens after each sequence's first one (the first comes from the step that evaluates the
prompts) over the wall time of the steps after that first step. Greedy, EOS ignored: every
sequence decodes exactly ``--new-tokens`` tokens.

The join figure: ``max_batch - 1`` sequences decode; after ``--warm-steps`` steps one more is
added with a prompt of ``--join-tokens`` tokens. Reported: decode steps from ``add`` to its
first token, and how long that step took against the batch's median step.

Prints a table and writes JSON (default ``bench/results/batching.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))

# name -> Scheduler keyword arguments
VARIANTS: dict[str, dict[str, Any]] = {
    "round-robin": {"batched": False},
    "batched": {"attention": "auto"},
    "batched-per-seq-attn": {"attention": "per-sequence"},
}


def _bench_inference() -> Any:
    """bench/inference.py, for its model cache (it cannot be imported as ``inference``)."""
    import inference  # noqa: F401  the package first, so bench/inference.py cannot shadow it

    spec = importlib.util.spec_from_file_location("bench_inference", BENCH_DIR / "inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prompts(tokenizer: Any, count: int, length: int) -> list[list[int]]:
    """``count`` different prompts of ``length`` tokens."""
    text = (
        "Explain how a CPU executes instructions, step by step, with examples. "
        "Then say what a cache line is, and why memory bandwidth bounds decoding. "
    ) * (1 + length // 16)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [ids[i : i + length] for i in range(count)]


def run_batch(bot: Any, variant: dict[str, Any], ids: list[list[int]], new: int) -> dict:
    from inference import GenerationConfig
    from inference.batching import Scheduler

    scheduler = Scheduler(bot, max(len(ids), 1), **variant)
    config = GenerationConfig(do_sample=False, max_new_tokens=new)
    for key, prompt in enumerate(ids):
        scheduler.add(key, prompt, config)
    started = time.perf_counter()
    counts = [0] * len(ids)
    steps = []
    while scheduler.active:
        t0 = time.perf_counter()
        for key, token in scheduler.step():
            if token is not None:
                counts[key] += 1
        steps.append(time.perf_counter() - t0)
    assert counts == [new] * len(ids), counts
    decode_s = sum(steps[1:])
    return {
        "first_step_s": steps[0],
        "decode_tok_s": (sum(counts) - len(ids)) / decode_s,
        "step_ms_median": statistics.median(steps[1:]) * 1e3,
        "wall_s": time.perf_counter() - started,
    }


def run_join(bot: Any, variant: dict[str, Any], args: argparse.Namespace) -> dict:
    """Steps (and time) from ``add`` to the first token of a request joining a running batch."""
    from inference import GenerationConfig
    from inference.batching import Scheduler

    running = args.max_batch - 1
    ids = prompts(bot.tokenizer, running + 1, args.prompt_tokens)
    join = prompts(bot.tokenizer, 1, args.join_tokens)[0]
    scheduler = Scheduler(bot, args.max_batch, **variant)
    config = GenerationConfig(do_sample=False, max_new_tokens=args.warm_steps + 16)
    for key in range(running):
        scheduler.add(key, ids[key], config)
    steps = []
    for _ in range(args.warm_steps):
        t0 = time.perf_counter()
        scheduler.step()
        steps.append(time.perf_counter() - t0)
    scheduler.add("join", join, GenerationConfig(do_sample=False, max_new_tokens=4))
    join_steps, join_s, others_advanced = 0, 0.0, True
    while True:
        t0 = time.perf_counter()
        events = scheduler.step()
        join_s += time.perf_counter() - t0
        join_steps += 1
        keys = {key for key, token in events if token is not None}
        others_advanced &= set(range(running)) <= keys
        if "join" in keys:
            break
    median = statistics.median(steps[1:])
    return {
        "join_prompt_tokens": len(join),
        "steps_to_first_token": join_steps,
        "join_s": join_s,
        "median_step_s": median,
        "join_over_median_step": join_s / median,
        "others_advanced_every_step": others_advanced,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="tiny, small or base (init-tiny)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--max-batch", type=int, default=8, help="for the join figure")
    parser.add_argument("--warm-steps", type=int, default=8)
    parser.add_argument("--join-tokens", default="100,1500", help="join prompt lengths")
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "batching.json"))
    args = parser.parse_args(argv)

    import torch

    from inference import MixedPrecisionConfig, PipelineConfig, build_chatbot

    torch.set_num_threads(args.threads)
    path = _bench_inference().model_dir(args.size)
    bot = build_chatbot(
        PipelineConfig(
            model_name_or_path=str(path),
            device="cpu",
            optimization_config=MixedPrecisionConfig(dtype=args.dtype, force=True),
        )
    )
    bot.eos_token_ids = set()  # decode exactly --new-tokens
    levels = [int(c) for c in args.concurrency.split(",")]
    names = args.variants.split(",")
    load_before = os.getloadavg()[0]

    run_batch(bot, VARIANTS["batched"], prompts(bot.tokenizer, 2, args.prompt_tokens), 4)
    runs: dict[tuple[str, int], list[dict]] = {}
    joins: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(args.repeats):
        for c in levels:
            ids = prompts(bot.tokenizer, c, args.prompt_tokens)
            for name in names:
                runs.setdefault((name, c), []).append(
                    run_batch(bot, VARIANTS[name], ids, args.new_tokens)
                )
        for tokens in args.join_tokens.split(","):
            for name in names:
                args_join = argparse.Namespace(**{**vars(args), "join_tokens": int(tokens)})
                joins.setdefault((name, int(tokens)), []).append(
                    run_join(bot, VARIANTS[name], args_join)
                )
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    table = []
    base = {c: med(runs[(names[0], c)], "decode_tok_s") for c in levels}
    one = {name: med(runs[(name, levels[0])], "decode_tok_s") for name in names}
    for name in names:
        for c in levels:
            tok_s = med(runs[(name, c)], "decode_tok_s")
            table.append(
                {
                    "variant": name,
                    "concurrency": c,
                    "decode_tok_s": tok_s,
                    "decode_tok_s_runs": [round(r["decode_tok_s"], 1) for r in runs[(name, c)]],
                    "step_ms_median": med(runs[(name, c)], "step_ms_median"),
                    "first_step_ms": med(runs[(name, c)], "first_step_s") * 1e3,
                    f"over_{names[0]}": tok_s / base[c],
                    f"over_c{levels[0]}": tok_s / one[name],
                }
            )
    join_rows = []
    for (name, _tokens), rows in joins.items():
        join_rows.append(
            {
                "variant": name,
                "join_prompt_tokens": rows[0]["join_prompt_tokens"],
                "steps_to_first_token": max(r["steps_to_first_token"] for r in rows),
                "join_ms": med(rows, "join_s") * 1e3,
                "median_step_ms": med(rows, "median_step_s") * 1e3,
                "join_over_median_step": med(rows, "join_over_median_step"),
                "others_advanced_every_step": all(r["others_advanced_every_step"] for r in rows),
            }
        )

    header = (
        f"{'variant':24} {'conc':>4} {'decode tok/s':>12} {'step ms':>8} "
        f"{'vs ' + names[0]:>16} {'vs conc ' + str(levels[0]):>10}"
    )
    print(header)
    print("-" * len(header))
    for row in table:
        print(
            f"{row['variant']:24} {row['concurrency']:>4} {row['decode_tok_s']:12.1f} "
            f"{row['step_ms_median']:8.1f} {row[f'over_{names[0]}']:15.2f}x "
            f"{row[f'over_c{levels[0]}']:9.2f}x"
        )
    print()
    header = (
        f"{'joining request':24} {'prompt':>6} {'steps to 1st tok':>16} {'join ms':>8} "
        f"{'step ms':>8} {'others kept going':>17}"
    )
    print(header)
    print("-" * len(header))
    for row in join_rows:
        print(
            f"{row['variant']:24} {row['join_prompt_tokens']:>6} "
            f"{row['steps_to_first_token']:>16} {row['join_ms']:8.1f} "
            f"{row['median_step_ms']:8.1f} {str(row['others_advanced_every_step']):>17}"
        )
    info = bot.info()
    results = {
        "bench": "batching",
        "model": args.size,
        "parameters": info["parameters"],
        "dtype": info["dtype"],
        "backend": info["backend"],
        "args": vars(args),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_1m_before": load_before,
            "loadavg_1m_after": os.getloadavg()[0],
        },
        "torch": info["torch"],
        "transformers": info["transformers"],
        "throughput": table,
        "join": join_rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
