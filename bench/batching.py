"""Continuous batching: aggregate decode tokens/s of ``inference.batching.Scheduler`` at several
concurrencies, round-robin (each sequence decoded alone, one after another) vs batched (one
forward per step for all of them), and how soon a request joining mid-generation gets its
first token.

    python bench/batching.py                          # small, bf16, 2 threads, 1,2,4,8
    python bench/batching.py --concurrency 1,8 --new-tokens 32 --repeats 1

The machine is shared and noisy, so the variants run in lockstep: at each concurrency every
variant gets the same prompts, and they take turns, one step each, so all of them see the same
load from moment to moment. A step gives every sequence one token, so decode tokens/s is the
concurrency over the median step time (steps after the first, which evaluates the prompts;
the median shrugs off the steps other processes stole time from); ``mean tok/s`` is tokens
over the summed step time. "vs 1 conv" divides by one conversation decoded alone (the
round-robin path with one sequence: ``Chatbot.generate_token_ids``), which takes its turns in
the same lockstep. Greedy, EOS ignored: each sequence decodes ``--new-tokens`` tokens.

The join figure: ``--max-batch - 1`` sequences decode; after ``--warm-steps`` steps one more
is added with a prompt of ``--join-tokens`` tokens. Reported: the steps from ``add`` to its
first token (1 = it came out of the very next step), whether every running sequence still got
its token in each of those steps, and the wall time of those steps against a median step.

``--hf C`` adds the evaluation behind our choice of scheduler: C prompts decoded to the end by
our batched scheduler, by transformers' static batched ``generate`` and by its own continuous
batching (``generate_batch``), on the same bf16 weights, taking turns; whole-job wall time.

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
ONE = "one conversation"


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


def lockstep(bot: Any, names: list[str], ids: list[list[int]], new: int) -> dict[str, list]:
    """Step times of every variant decoding the same sequences, the variants taking turns.

    ``ONE`` is the reference taking its turns with them: one conversation (the first prompt)
    decoded alone, as ``Chatbot.generate_token_ids`` does."""
    from inference import GenerationConfig
    from inference.batching import Scheduler

    config = GenerationConfig(do_sample=False, max_new_tokens=new)
    schedulers = {name: (Scheduler(bot, len(ids), **VARIANTS[name]), ids) for name in names}
    schedulers[ONE] = (Scheduler(bot, 1, batched=False), ids[:1])
    for scheduler, prompts_ in schedulers.values():
        for key, prompt in enumerate(prompts_):
            scheduler.add(key, prompt, config)
    times: dict[str, list[float]] = {name: [] for name in schedulers}
    counts = dict.fromkeys(schedulers, 0)
    first = dict.fromkeys(schedulers, True)
    while any(s.active for s, _ in schedulers.values()):
        for name, (scheduler, prompts_) in schedulers.items():
            if not scheduler.active:
                continue
            started = time.perf_counter()
            events = scheduler.step()
            elapsed = time.perf_counter() - started
            tokens = sum(token is not None for _, token in events)
            counts[name] += tokens
            # Decode steps only: not the first (prompts), not the last (it only reports ends).
            if tokens == len(prompts_) and not first[name]:
                times[name].append(elapsed)
            first[name] = False
    assert all(counts[name] == new * len(p) for name, (_, p) in schedulers.items()), counts
    return times


def run_join(bot: Any, name: str, args: argparse.Namespace, join_tokens: int) -> dict:
    """Steps (and time) from ``add`` to the first token of a request joining a running batch."""
    from inference import GenerationConfig
    from inference.batching import Scheduler

    running = args.max_batch - 1
    ids = prompts(bot.tokenizer, running, args.prompt_tokens)
    join = prompts(bot.tokenizer, 1, join_tokens)[0]
    scheduler = Scheduler(bot, args.max_batch, **VARIANTS[name])
    config = GenerationConfig(do_sample=False, max_new_tokens=args.warm_steps + 16)
    for key in range(running):
        scheduler.add(key, ids[key], config)
    steps = []
    for _ in range(args.warm_steps):
        started = time.perf_counter()
        scheduler.step()
        steps.append(time.perf_counter() - started)
    scheduler.add("join", join, GenerationConfig(do_sample=False, max_new_tokens=4))
    join_steps, join_s, others_advanced = 0, 0.0, True
    while True:
        started = time.perf_counter()
        events = scheduler.step()
        join_s += time.perf_counter() - started
        join_steps += 1
        keys = {key for key, token in events if token is not None}
        others_advanced &= set(range(running)) <= keys
        if "join" in keys:
            break
    return {
        "variant": name,
        "requested": join_tokens,
        "join_prompt_tokens": len(join),
        "steps_to_first_token": join_steps,
        "join_ms": join_s * 1e3,
        "median_step_ms": statistics.median(steps[1:]) * 1e3,
        "others_advanced_every_step": others_advanced,
    }


def compare_hf(bot: Any, path: Path, args: argparse.Namespace, c: int) -> list[dict]:
    """Aggregate tokens/s of ours vs transformers' ``generate`` and ``generate_batch``."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers import GenerationConfig as HFGenerationConfig

    from inference import GenerationConfig
    from inference.batching import Scheduler

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    ids = prompts(bot.tokenizer, c, args.prompt_tokens)
    new = args.new_tokens
    hf_config = HFGenerationConfig(
        do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=None, pad_token_id=0
    )

    def ours() -> int:
        scheduler = Scheduler(bot, c)
        for key, prompt in enumerate(ids):
            scheduler.add(key, prompt, GenerationConfig(do_sample=False, max_new_tokens=new))
        made = 0
        while scheduler.active:
            made += sum(token is not None for _, token in scheduler.step())
        return made

    def static() -> int:
        with torch.inference_mode():
            out = model.generate(torch.tensor(ids), generation_config=hf_config)
        return (out.shape[1] - len(ids[0])) * c

    def continuous() -> int:
        with torch.inference_mode():
            out = model.generate_batch(inputs=ids, generation_config=hf_config)
        return sum(len(o.generated_tokens) for o in out.values())

    variants = {
        "sprbot scheduler": ours,
        "transformers generate (static)": static,
        "transformers generate_batch": continuous,
    }
    for run in variants.values():  # warm-up
        run()
    walls: dict[str, list[float]] = {name: [] for name in variants}
    made: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            made[name] = run()
            walls[name].append(time.perf_counter() - started)
    rows = [
        {
            "engine": name,
            "concurrency": c,
            "tokens": made[name],
            "wall_s": statistics.median(walls[name]),
            "tok_s": made[name] / statistics.median(walls[name]),
        }
        for name in variants
    ]
    for row in rows:
        row["ours_over_this"] = rows[0]["tok_s"] / row["tok_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="tiny, small or base (init-tiny)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--max-batch", type=int, default=8, help="for the join figure")
    parser.add_argument("--warm-steps", type=int, default=8)
    parser.add_argument("--join-tokens", default="100,1500", help="join prompt lengths")
    parser.add_argument("--hf", type=int, default=0, help="compare with transformers at C")
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

    lockstep(bot, names, prompts(bot.tokenizer, 2, args.prompt_tokens), 4)  # warm-up
    steps: dict[tuple[str, int], list[float]] = {}
    joins: list[dict] = []
    for repeat in range(args.repeats):
        for c in levels:
            times = lockstep(
                bot, names, prompts(bot.tokenizer, c, args.prompt_tokens), args.new_tokens
            )
            for name, values in times.items():
                steps.setdefault((name, c), []).extend(values)
        for tokens in args.join_tokens.split(","):
            joins += [run_join(bot, name, args, int(tokens)) for name in names]
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    table = []
    for name in names:
        for c in levels:
            times = steps[(name, c)]
            one = steps[(ONE, c)]
            table.append(
                {
                    "variant": name,
                    "concurrency": c,
                    "decode_tok_s": c / statistics.median(times),
                    "mean_tok_s": c * len(times) / sum(times),
                    "step_ms_median": statistics.median(times) * 1e3,
                    "steps": len(times),
                    "one_conversation_tok_s": 1 / statistics.median(one),
                    # one conversation decoded alone, measured in the same lockstep
                    "over_one_conversation": statistics.median(one) * c / statistics.median(times),
                }
            )
    tok_s = {(row["variant"], row["concurrency"]): row["decode_tok_s"] for row in table}
    for row in table:
        rr = tok_s.get(("round-robin", row["concurrency"]))
        row["over_round_robin"] = row["decode_tok_s"] / rr if rr else None
    join_rows = []
    for name in names:
        for tokens in args.join_tokens.split(","):
            rows = [r for r in joins if (r["variant"], r["requested"]) == (name, int(tokens))]
            join_rows.append(
                {
                    "variant": name,
                    "join_prompt_tokens": rows[0]["join_prompt_tokens"],
                    "steps_to_first_token": max(r["steps_to_first_token"] for r in rows),
                    "join_ms": statistics.median(r["join_ms"] for r in rows),
                    "median_step_ms": statistics.median(r["median_step_ms"] for r in rows),
                    "others_advanced_every_step": all(
                        r["others_advanced_every_step"] for r in rows
                    ),
                }
            )

    header = (
        f"{'variant':22} {'conc':>4} {'tok/s':>7} {'mean tok/s':>10} {'step ms':>8} "
        f"{'vs round-robin':>14} {'vs 1 conv':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in table:
        vs_rr = row["over_round_robin"]
        print(
            f"{row['variant']:22} {row['concurrency']:>4} {row['decode_tok_s']:7.1f} "
            f"{row['mean_tok_s']:10.1f} {row['step_ms_median']:8.1f} "
            f"{'' if vs_rr is None else f'{vs_rr:.2f}x':>14} {row['over_one_conversation']:8.2f}x"
        )
    print("(vs 1 conv: over one conversation decoded alone, in the same lockstep)")
    print()
    header = (
        f"{'joining request':22} {'prompt':>6} {'steps to 1st tok':>16} {'others kept going':>17} "
        f"{'join ms':>8} {'step ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in join_rows:
        print(
            f"{row['variant']:22} {row['join_prompt_tokens']:>6} "
            f"{row['steps_to_first_token']:>16} {str(row['others_advanced_every_step']):>17} "
            f"{row['join_ms']:8.1f} {row['median_step_ms']:8.1f}"
        )
    hf_rows = compare_hf(bot, path, args, args.hf) if args.hf else []
    if hf_rows:
        print()
        header = f"{'whole job, ' + str(args.hf) + ' prompts':32} {'tok/s':>7} {'ours/this':>9}"
        print(header)
        print("-" * len(header))
        for row in hf_rows:
            print(f"{row['engine']:32} {row['tok_s']:7.1f} {row['ours_over_this']:8.2f}x")
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
        "vs_transformers": hf_rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
