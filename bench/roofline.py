"""How close batch-1 decoding gets to what PyTorch's own kernels allow (CPU).

* ``kernel_ceiling(model, dtype)``: weight bytes streamed per second by batch-1 ``F.linear``
  (a 1 x in input) over all of the model's weight matrices (every ``nn.Linear``: q, k, v, o,
  gate, up, down of each layer and lm_head), warm, median over repeats. A decode step cannot
  stream its weights faster than this with stock kernels, so tokens/s x weight bytes divided by
  it is the fraction of the ceiling a decode loop reaches. For bf16 it also reports the same
  sweep over oneDNN-prepacked weights, which is what ``prepare_for_decoding`` uses.
* ``memory_copy_bandwidth()``: a large tensor copy and a large read, for scale.

``python bench/roofline.py [--size 1b|small] [--dtypes bf16,fp32] [--json]`` builds a
random-init Llama (1.0B: hidden 2048, 22 layers, 32 heads / 4 kv heads, intermediate 5632,
vocab 8000; small: hidden 512, 8 layers, ~50M params) and prints, per dtype: the kernel ceiling,
plain ``model.generate`` and sprbot's ``generate_ids`` (tokens/s, GB/s-equivalent, fraction of
the ceiling). Baseline and variant run interleaved in the same process, since other work on the
machine makes absolute timings drift; compare the ratios.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

SIZES: dict[str, dict[str, int]] = {
    "1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "intermediate_size": 5632,
    },
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 1408,
    },
}


def _dense_weights(model: nn.Module, dtype: torch.dtype) -> list[torch.Tensor]:
    weights = []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight.detach()
            w = w.to_dense() if w.is_mkldnn else w  # a model already prepared for decoding
            weights.append(w.to(dtype).contiguous())
    return weights


def _sweep_seconds(fn: Any, repeats: int) -> list[float]:
    fn()  # warm: oneDNN primitive creation, page faults, caches
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


@torch.inference_mode()
def kernel_ceiling(
    model: nn.Module, dtype: torch.dtype, threads: int = 2, repeats: int = 15, packed: bool = True
) -> dict[str, Any]:
    """Batch-1 ``F.linear`` over all weight matrices of ``model`` cast to ``dtype``.

    Returns weight bytes, median / best seconds per sweep and GB/s (1e9 bytes/s), plus
    ``packed_gb_s`` for oneDNN-prepacked weights when ``packed`` and dtype is bf16.
    """
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        weights = _dense_weights(model, dtype)
        nbytes = sum(w.numel() * w.element_size() for w in weights)
        inputs = {k: torch.randn(1, 1, k, dtype=dtype) for k in {w.shape[1] for w in weights}}

        def linear_sweep() -> None:
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

        times = _sweep_seconds(linear_sweep, repeats)
        med = statistics.median(times)
        result: dict[str, Any] = {
            "dtype": str(dtype).removeprefix("torch."),
            "threads": threads,
            "matrices": len(weights),
            "weight_bytes": nbytes,
            "seconds_median": med,
            "gb_s": nbytes / med / 1e9,
            "gb_s_best": nbytes / min(times) / 1e9,
        }
        if packed and dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            packed_ws = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights]
            del weights

            def packed_sweep() -> None:
                for w in packed_ws:
                    torch.ops.mkldnn._linear_pointwise(inputs[w.shape[1]], w, None, "none", [], "")

            ptimes = _sweep_seconds(packed_sweep, repeats)
            result["packed_gb_s"] = nbytes / statistics.median(ptimes) / 1e9
            result["packed_gb_s_best"] = nbytes / min(ptimes) / 1e9
        return result
    finally:
        torch.set_num_threads(prev_threads)


def memory_copy_bandwidth(
    nbytes: int = 1 << 30, threads: int = 2, repeats: int = 7
) -> dict[str, float]:
    """GB/s of ``dst.copy_(src)`` (bytes copied; the memory traffic is twice that) and of a
    read-only reduction over ``nbytes`` of data."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.empty_like(src)
        copy_t = statistics.median(_sweep_seconds(lambda: dst.copy_(src), repeats))
        read_t = statistics.median(_sweep_seconds(lambda: src.sum(), repeats))
        return {
            "bytes": nbytes,
            "copy_gb_s": nbytes / copy_t / 1e9,
            "read_gb_s": nbytes / read_t / 1e9,
        }
    finally:
        torch.set_num_threads(prev_threads)


def build_model(size: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A random-init LlamaForCausalLM of the named size, directly in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=8000, tie_word_embeddings=False, max_position_embeddings=4096, **SIZES[size]
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no fp32 copy of a 1B model
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class _Clock:
    """Records when each new token arrives, for transformers' ``streamer`` hook."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # generate first hands over the prompt
            self.first = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _intervals(times: list[float]) -> list[float]:
    """Seconds between consecutive new tokens: decoding only, prefill is not counted."""
    return [b - a for a, b in zip(times[:-1], times[1:], strict=True)]


def _run_generate(model: nn.Module, prompt: list[int], gen: Any, seed: int) -> list[float]:
    from transformers.generation.streamers import BaseStreamer

    clock = type("Clock", (_Clock, BaseStreamer), {})()
    ids = torch.tensor([prompt])
    torch.manual_seed(seed)
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            streamer=clock,
            do_sample=gen.do_sample,
            temperature=gen.temperature,
            top_k=gen.top_k,
            top_p=gen.top_p,
            repetition_penalty=gen.repetition_penalty,
            max_new_tokens=gen.max_new_tokens,
            min_new_tokens=gen.max_new_tokens,
            pad_token_id=0,
        )
    return _intervals(clock.times)


def _run_generate_ids(model: nn.Module, prompt: list[int], gen: Any, seed: int) -> list[float]:
    from inference.decoding import generate_ids

    times = []
    for _ in generate_ids(model, prompt, gen, set(), generator=torch.Generator().manual_seed(seed)):
        times.append(time.perf_counter())
    return _intervals(times)


def compare(
    size: str, dtype_name: str, tokens: int, prompt_len: int, rounds: int, threads: int
) -> dict[str, Any]:
    """Ceiling, then plain generate vs prepared generate vs generate_ids, interleaved."""
    from types import SimpleNamespace

    from inference.decoding import prepare_for_decoding

    torch.set_num_threads(threads)
    dtype = DTYPES[dtype_name]
    base = build_model(size, dtype)
    ceiling = kernel_ceiling(base, dtype, threads=threads)
    prepared = prepare_for_decoding(copy.deepcopy(base))
    # NeuralChat's defaults (sampling); no EOS so every run decodes exactly `tokens` tokens.
    gen = SimpleNamespace(
        temperature=0.1,
        top_k=40,
        top_p=0.75,
        repetition_penalty=1.1,
        max_new_tokens=tokens,
        do_sample=True,
        num_beams=1,
    )
    prompt = torch.randint(
        3, 8000, (prompt_len,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    # Per run: the intervals between its new tokens.
    runs: dict[str, list[list[float]]] = {
        "generate": [],
        "generate_prepared": [],
        "generate_ids": [],
    }
    _run_generate(base, prompt, gen, 0)  # warm both paths
    _run_generate_ids(prepared, prompt, gen, 0)
    for r in range(rounds):
        runs["generate"].append(_run_generate(base, prompt, gen, r))
        runs["generate_prepared"].append(_run_generate(prepared, prompt, gen, r))
        runs["generate_ids"].append(_run_generate_ids(prepared, prompt, gen, r))
    wb = ceiling["weight_bytes"]
    out: dict[str, Any] = {
        "size": size,
        "dtype": dtype_name,
        "threads": threads,
        "tokens": tokens,
        "prompt_len": prompt_len,
        "rounds": rounds,
        "ceiling": ceiling,
    }
    for name, per_run in runs.items():
        rates = [len(iv) / sum(iv) for iv in per_run]
        tps = statistics.median(rates)
        # Other work on the machine only ever adds time, so a low percentile of the per-token
        # intervals estimates the undisturbed speed; compare it with the ceiling's best sweep.
        best = 1 / statistics.quantiles([t for iv in per_run for t in iv], n=10)[0]
        out[name] = {
            "tokens_per_s": tps,
            "tokens_per_s_best": best,
            "gb_s_equiv": tps * wb / 1e9,
            "fraction_of_ceiling": tps * wb / 1e9 / ceiling["gb_s"],
            "fraction_of_ceiling_best": best * wb / 1e9 / ceiling["gb_s_best"],
            "runs": rates,
        }
    gen_rates = [len(iv) / sum(iv) for iv in runs["generate"]]
    ids_rates = [len(iv) / sum(iv) for iv in runs["generate_ids"]]
    out["speedup_vs_generate"] = statistics.median(
        a / b for a, b in zip(ids_rates, gen_rates, strict=True)
    )
    del base, prepared
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per run")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs of each loop")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = ap.parse_args(argv)

    load_before = os.getloadavg()[0]
    results: dict[str, Any] = {"memory": memory_copy_bandwidth(threads=args.threads), "runs": []}
    for name in args.dtypes.split(","):
        results["runs"].append(
            compare(args.size, name, args.tokens, args.prompt_len, args.rounds, args.threads)
        )
    results["load_average"] = [load_before, os.getloadavg()[0]]
    mem = results["memory"]
    print(
        f"{args.size} Llama, {args.threads} threads, {args.tokens} new tokens after a "
        f"{args.prompt_len}-token prompt, {args.rounds} interleaved runs per loop; load average "
        f"{load_before:.1f} -> {results['load_average'][1]:.1f}"
    )
    print(f"memory: copy {mem['copy_gb_s']:.1f} GB/s, read {mem['read_gb_s']:.1f} GB/s")
    print("GB/s and tok/s: median (best = fastest sweep / 10th-percentile token interval)")
    head = (
        f"{'dtype':5} {'weights':>7} {'F.linear GB/s':>14} {'packed GB/s':>12} | {'loop':17} "
        f"{'tok/s':>13} {'GB/s eq':>7} {'of ceiling':>12}"
    )
    print(head)
    print("-" * len(head))
    for run in results["runs"]:
        c = run["ceiling"]
        packed = (
            f"{c['packed_gb_s']:5.1f} ({c['packed_gb_s_best']:4.1f})" if "packed_gb_s" in c else "-"
        )
        linear = f"{c['gb_s']:7.1f} ({c['gb_s_best']:4.1f})"
        lead = f"{run['dtype']:5} {c['weight_bytes'] / 1e9:5.2f}GB {linear} {packed:>12}"
        for i, name in enumerate(("generate", "generate_prepared", "generate_ids")):
            r = run[name]
            print(
                f"{lead if i == 0 else ' ' * len(lead)} | {name:17} "
                f"{r['tokens_per_s']:5.2f} ({r['tokens_per_s_best']:5.2f}) {r['gb_s_equiv']:7.1f} "
                f"{r['fraction_of_ceiling']:5.0%} ({r['fraction_of_ceiling_best']:4.0%})"
            )
        print(f"{'':{len(lead)}} | generate_ids / generate: {run['speedup_vs_generate']:.2f}x")
    if len(results["runs"]) == 2 and {r["dtype"] for r in results["runs"]} == {"bf16", "fp32"}:
        bf16, fp32 = (
            next(r["generate_ids"] for r in results["runs"] if r["dtype"] == d)
            for d in ("bf16", "fp32")
        )
        ratio = bf16["tokens_per_s"] / fp32["tokens_per_s"]
        best = bf16["tokens_per_s_best"] / fp32["tokens_per_s_best"]
        print(f"generate_ids bf16 / fp32: {ratio:.2f}x (best: {best:.2f}x)")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    # As a script, bench/ is first on sys.path and bench/inference.py would shadow the
    # `inference` package: look it up from the repository root instead.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))
    raise SystemExit(main())
