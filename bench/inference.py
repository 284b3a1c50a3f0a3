"""Batch-1 decode speed of the engine: fp32 vs bf16 (vs IPEX), against the kernel ceiling and
llama.cpp on the same weights.

    python bench/inference.py                      # small: fp32, bf16, kernel ceiling
    python bench/inference.py --sizes small,base --llamacpp --ipex-python .venv-ipex/bin/python
    python bench/inference.py --concurrency 1,8                 # through the worker, small
    python bench/inference.py --sizes base --concurrency 1,8 --llama-server

``--concurrency`` measures aggregate tokens/s through the inference worker instead (see
bench/serving.py), and ``--llama-server`` runs llama.cpp's own server with ``--parallel`` the
highest concurrency on the same weights, as many clients, for the side-by-side.

Each figure is the median of ``--repeats`` runs after a warm-up, measured in this one run, so
compare the ratios: these machines are shared and noisy. Decode tokens/s counts the tokens
after the first one over their wall time; first-token latency is prompt evaluation plus the
first token. Both sides decode exactly ``--new-tokens`` tokens greedily (EOS ignored).
Prints a table and writes JSON (default ``bench/results/inference.json``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
# This script is named like the `inference` package: keep bench/ off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
sys.path.insert(0, str(BENCH_DIR.parent))


def _sibling(name: str) -> Any:
    """Import bench/<name>.py without putting bench/ on the path."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cache_dir() -> Path:
    return Path(os.environ.get("SPRBOT_BENCH_CACHE", Path.home() / ".cache" / "sprbot-bench"))


def model_dir(size: str) -> Path:
    """A random-init model of ``size`` made by init-tiny, cached between runs."""
    from inference.tiny import init_tiny

    path = cache_dir() / "models" / size
    if not (path / "sprbot.json").exists():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        print(f"making the {size} model in {path} ...", flush=True)
        init_tiny(path, size=size)
    return path


def prompt_ids(tokenizer: Any, n: int) -> list[int]:
    text = "Explain how a CPU executes instructions, step by step, with examples. " * 40
    return tokenizer(text, add_special_tokens=False).input_ids[:n]


def measure_engine(path: Path, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """Decode speed through ``build_chatbot`` (the path users and workers take)."""
    import torch

    from inference import GenerationConfig, MixedPrecisionConfig, PipelineConfig, build_chatbot

    torch.set_num_threads(args.threads)
    bot = build_chatbot(
        PipelineConfig(
            model_name_or_path=str(path),
            device="cpu",
            optimization_config=MixedPrecisionConfig(dtype=dtype, force=True),
        )
    )
    bot.eos_token_ids = set()  # decode exactly --new-tokens, like the llama.cpp side
    config = GenerationConfig(do_sample=False, max_new_tokens=args.new_tokens)
    ids = prompt_ids(bot.tokenizer, args.prompt_tokens)
    runs = []
    for i in range(1 + args.repeats):
        started = time.perf_counter()
        first = None
        count = 0
        for _ in bot.generate_token_ids(ids, config):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        if i:  # the first run is the warm-up
            runs.append(
                {"first_token_s": first - started, "decode_tok_s": (count - 1) / (end - first)}
            )
    info = bot.info()
    raw = _raw_generate_tok_s(bot, ids, args) if info["backend"] == "ipex" else None
    return {
        "raw_generate_decode_tok_s": raw,
        "engine": f"sprbot ({info['backend']})",
        "dtype": dtype,
        "backend": info["backend"],
        "weight_bytes": info["weight_bytes"],
        "parameters": info["parameters"],
        "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
        "first_token_s": statistics.median(r["first_token_s"] for r in runs),
        "decode_tok_s_runs": [round(r["decode_tok_s"], 2) for r in runs],
        "torch": info["torch"],
        "transformers": info["transformers"],
    }


def _raw_generate_tok_s(bot: Any, ids: list[int], args: argparse.Namespace) -> float:
    """Decode tokens/s of the optimised model's own ``generate`` on this thread, with nothing of
    ours around it: what our IPEX path should match."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    rates = []
    input_ids = torch.tensor([ids])
    for i in range(1 + args.repeats):
        clock = Clock()
        with torch.inference_mode():
            bot.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        new = clock.times[1:]  # the first put is the prompt
        if i:
            rates.append((len(new) - 1) / (new[-1] - new[0]))
    return statistics.median(rates)


def measure_ceiling(path: Path, dtype: str, threads: int) -> dict[str, Any]:
    import torch

    kernel_ceiling = _sibling("roofline").kernel_ceiling
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return kernel_ceiling(model, getattr(torch, dtype), threads=threads)


def measure_in(python: str, path: Path, dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``measure_engine`` in another interpreter (the IPEX virtualenv)."""
    cmd = [
        python,
        __file__,
        "--engine-only",
        str(path),
        "--dtype",
        dtype,
        "--threads",
        str(args.threads),
        "--new-tokens",
        str(args.new_tokens),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--repeats",
        str(args.repeats),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small", help="comma list of tiny, small, base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--llamacpp", action="store_true", help="compare with llama.cpp")
    parser.add_argument("--ipex-python", help="python of a venv with the ipex extra")
    parser.add_argument(
        "--concurrency", help="comma list, e.g. 1,8: aggregate tokens/s through the worker"
    )
    parser.add_argument(
        "--llama-server", action="store_true", help="with --concurrency: llama-server side by side"
    )
    parser.add_argument("--out", default=str(BENCH_DIR / "results" / "inference.json"))
    parser.add_argument("--engine-only", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="bfloat16", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.engine_only:  # child mode for --ipex-python
        print(json.dumps(measure_engine(Path(args.engine_only), args.dtype, args)))
        return 0
    if args.concurrency:
        return serving_main(args)

    results: dict[str, Any] = {"args": vars(args), "sizes": {}}
    rows = []
    for size in args.sizes.split(","):
        path = model_dir(size)
        entry: dict[str, Any] = {"engines": []}
        for dtype in ("float32", "bfloat16"):
            ceiling = measure_ceiling(path, dtype, args.threads)
            entry[f"kernel_ceiling_{dtype}"] = ceiling
            run = measure_engine(path, dtype, args)
            run["gb_s"] = run["weight_bytes"] * run["decode_tok_s"] / 1e9
            run["of_kernel_ceiling"] = run["gb_s"] / ceiling["gb_s"]
            entry["engines"].append(run)
        if args.ipex_python:
            run = measure_in(args.ipex_python, path, "bfloat16", args)
            run["gb_s"] = run["weight_bytes"] * run["decode_tok_s"] / 1e9
            entry["engines"].append(run)
        if args.llamacpp:
            llamacpp = _sibling("llamacpp")

            gguf = llamacpp.convert_to_gguf(path, llamacpp.default_gguf_path(path))
            run = llamacpp.decode_benchmark(
                gguf,
                args.prompt_tokens,
                new_tokens=args.new_tokens,
                threads=args.threads,
                repeats=args.repeats,
            )
            run["dtype"] = "bfloat16"
            run["first_token_s"] = run["first_token_latency_s"]
            run["weight_bytes"] = entry["engines"][1]["weight_bytes"]
            run["gb_s"] = run["weight_bytes"] * run["decode_tok_s"] / 1e9
            entry["engines"].append({k: v for k, v in run.items() if k != "first_tokens"})
            entry["llamacpp_decode_tok_s"] = run["decode_tok_s"]
        by = {(e["engine"], e["dtype"]): e for e in entry["engines"]}
        stock_bf16 = by[("sprbot (stock)", "bfloat16")]
        entry["bf16_over_fp32"] = (
            stock_bf16["decode_tok_s"] / by[("sprbot (stock)", "float32")]["decode_tok_s"]
        )
        for engine in entry["engines"]:
            if "llamacpp_decode_tok_s" in entry:
                engine["over_llamacpp"] = engine["decode_tok_s"] / entry["llamacpp_decode_tok_s"]
            rows.append((size, engine))
        results["sizes"][size] = entry

    header = (
        f"{'size':6} {'engine':34} {'dtype':9} {'tok/s':>7} {'1st tok ms':>10} {'GB/s':>6} "
        f"{'of ceiling':>10} {'vs llama.cpp':>12}"
    )
    print(header)
    print("-" * len(header))
    for size, e in rows:
        ceiling = e.get("of_kernel_ceiling")
        vs = e.get("over_llamacpp")
        print(
            f"{size:6} {e['engine'][:34]:34} {e['dtype']:9} {e['decode_tok_s']:7.1f} "
            f"{e['first_token_s'] * 1e3:10.1f} {e['gb_s']:6.1f} "
            f"{'' if ceiling is None else f'{ceiling:.0%}':>10} "
            f"{'' if vs is None else f'{vs:.2f}x':>12}"
        )
    for size, e in rows:
        if e.get("raw_generate_decode_tok_s"):
            print(
                f"{size}: the IPEX-optimised model's own generate, nothing of ours around it: "
                f"{e['raw_generate_decode_tok_s']:.1f} tok/s"
            )
    for size, entry in results["sizes"].items():
        print(
            f"{size}: bf16/fp32 = {entry['bf16_over_fp32']:.2f}x; kernel ceiling "
            f"bf16 {entry['kernel_ceiling_bfloat16']['gb_s']:.1f} GB/s, "
            f"fp32 {entry['kernel_ceiling_float32']['gb_s']:.1f} GB/s"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")
    return 0


def serving_main(args: argparse.Namespace) -> int:
    """``--concurrency``: aggregate tokens/s through the worker (and llama-server)."""
    from transformers import AutoTokenizer

    concurrencies = sorted(int(c) for c in args.concurrency.split(","))
    results: dict[str, Any] = {"args": vars(args), "sizes": {}}
    header = f"{'size':6} {'engine':22} {'conc':>4} {'wall tok/s':>10} {'decode tok/s':>12} "
    header += f"{'1st tok ms':>10} {'vs conc 1':>9}"
    lines = []
    for size in args.sizes.split(","):
        path = model_dir(size)
        tokenizer = AutoTokenizer.from_pretrained(path)
        text = tokenizer.decode(prompt_ids(tokenizer, args.prompt_tokens))
        entry = _sibling("serving").measure(
            path,
            concurrencies,
            prompt_text=text,
            new_tokens=args.new_tokens,
            threads=args.threads,
            repeats=args.repeats,
        )
        for row in entry["concurrency"]:
            lines.append(
                f"{size:6} {'sprbot worker (bf16)':22} {row['concurrency']:4d} "
                f"{row['wall_tok_s']:10.1f} {row['decode_tok_s']:12.1f} "
                f"{row['first_token_s'] * 1e3:10.1f} {row['vs_lowest_concurrency']:8.2f}x"
            )
        if args.llama_server:
            llamacpp = _sibling("llamacpp")
            gguf = llamacpp.convert_to_gguf(path, llamacpp.default_gguf_path(path))
            top = max(concurrencies)
            server = llamacpp.server_benchmark(
                gguf,
                parallel=top,
                clients=top,
                new_tokens=args.new_tokens,
                threads=args.threads,
                prompt_tokens=args.prompt_tokens,
                repeats=args.repeats,
            )
            ours = entry["concurrency"][-1]
            entry["llama_server"] = server
            entry["wall_over_llama_server"] = ours["wall_tok_s"] / server["wall_tok_s"]
            entry["decode_over_llama_server"] = (
                ours["decode_tok_s"] / server["aggregate_decode_tok_s"]
            )
            lines.append(
                f"{size:6} {'llama-server':22} {top:4d} {server['wall_tok_s']:10.1f} "
                f"{server['aggregate_decode_tok_s']:12.1f}"
            )
        results["sizes"][size] = entry
    print(header)
    print("-" * len(header))
    print("\n".join(lines))
    for size, entry in results["sizes"].items():
        join = entry["join"]
        print(
            f"{size}: a request joining {join['running']} running ones got its first token "
            f"after {join['first_token_s'] * 1e3:.0f} ms = {join['steps']:.1f} decode steps "
            f"(runs {join['steps_runs']})"
        )
        if "llama_server" in entry:
            print(
                f"{size}: ours / llama-server at {max(concurrencies)} clients: wall "
                f"{entry['wall_over_llama_server']:.2f}x, decode "
                f"{entry['decode_over_llama_server']:.2f}x"
            )
    out = Path(args.out)
    if out.name == "inference.json":
        out = out.with_name("serving.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
