"""llama.cpp side of sprbot's decode benchmarks (bench-only tool).

Everything heavy lives outside the repo, under a cache dir
(default: ``$SPRBOT_BENCH_CACHE`` or ``~/.cache/sprbot-bench``):

* ``src/``            the llama-cpp-python sdist, fetched with ``pip download`` at run
                      time; its ``vendor/llama.cpp`` provides the HF->GGUF converter
                      (with its own ``gguf-py``) and the sources of ``llama-server``.
* ``convert-venv/``   only created if the converter cannot run in this interpreter.
* ``llama-server/``   cmake build of ``llama-server`` (CPU only, no network features).
* ``gguf/``, ``logs/`` converted models and tool logs.

Batch-1 decoding uses the ``llama_cpp`` Python bindings (the ``bench`` extra:
``pip install 'sprbot[bench]'``). The bindings and the server should come from the
same llama-cpp-python version (``LLAMA_CPP_PYTHON_VERSION``) so both run the same
llama.cpp commit; results record both versions.

Usage: ``python bench/llamacpp.py --model HF_DIR [--server]``
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

StrPath = str | os.PathLike[str]

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
INSTALL_HINT = (
    "llama-cpp-python is not installed. Install the benchmark extra with "
    "`pip install 'sprbot[bench]'` (it compiles llama.cpp from source: ~8-12 min on 2 cores)."
)
# Only these light converter requirements are installed into the fallback venv;
# torch is reused from the current interpreter, gguf comes from the sdist's gguf-py.
_SKIP_CONVERTER_REQS = ("torch", "gguf")


# --------------------------------------------------------------------------- helpers


def default_cache_dir() -> Path:
    """``$SPRBOT_BENCH_CACHE`` or ``~/.cache/sprbot-bench``."""
    env = os.environ.get("SPRBOT_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sprbot-bench"


def _cache(cache_dir: StrPath | None) -> Path:
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


def _run_logged(cmd: list[str], log: Path, **kwargs: Any) -> None:
    """Run ``cmd`` with stdout/stderr appended to ``log``; raise with the log tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(map(str, cmd))}\n")
        fh.flush()
        rc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs
        ).returncode
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"command failed (exit {rc}): {cmd[0]} ...; see {log}\n{tail}")


def _log_path(cache: Path, name: str) -> Path:
    return cache / "logs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}.log"


def _llama_dir(cache_dir: StrPath | None) -> Path:
    return ensure_sdist(cache_dir) / "vendor" / "llama.cpp"


def _prompt(prompt_tokens: list[int] | int, n_vocab: int, bos: int, seed: int) -> list[int]:
    """Use the given ids, or make ``n`` deterministic pseudo-random ids (BOS first)."""
    if not isinstance(prompt_tokens, int):
        return list(prompt_tokens)
    rng = random.Random(seed)
    ids = [rng.randrange(3, n_vocab) for _ in range(prompt_tokens)]
    if ids and bos >= 0:
        ids[0] = bos
    return ids


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# --------------------------------------------------------------------------- sdist + converter


def ensure_sdist(cache_dir: StrPath | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Download (``pip download --no-binary :all:``) and extract the llama-cpp-python sdist once.

    Returns the extracted source root, which contains ``vendor/llama.cpp``.
    """
    cache = _cache(cache_dir)
    root = cache / "src" / f"llama_cpp_python-{version}"
    if (root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".download-") as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
        log = _log_path(cache, "pip-download")
        _run_logged([*pip, f"llama-cpp-python=={version}", "-d", tmp], log)
        (tarball,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        out = Path(tmp) / "x"
        with tarfile.open(tarball) as tf:
            tf.extractall(out, filter="data")
        (top,) = out.iterdir()
        if not root.exists():  # another process may have won the race
            top.rename(root)
    return root


def _converter_imports_ok(python: str, llama_dir: Path) -> bool:
    """True if ``python`` can import the converter (torch, transformers, gguf-py, ...)."""
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
        "import convert_hf_to_gguf, sentencepiece, gguf"
    )
    probe = subprocess.run(
        [python, "-c", code, str(llama_dir), str(llama_dir / "gguf-py")],
        capture_output=True,
        env={**os.environ, "NO_LOCAL_GGUF": "1"},
    )
    return probe.returncode == 0


def _converter_requirements(llama_dir: Path) -> list[str]:
    """The converter's pinned requirements from the sdist, minus torch (reused from this env)."""
    reqs: list[str] = []

    def read(path: Path) -> None:
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if line.startswith("-r"):
                read(path.parent / line[2:].strip())
            elif line and not line.startswith("-") and not line.startswith(_SKIP_CONVERTER_REQS):
                reqs.append(line)

    read(llama_dir / "requirements" / "requirements-convert_hf_to_gguf.txt")
    return reqs


def converter_python(cache_dir: StrPath | None = None, force_venv: bool = False) -> str:
    """Interpreter that runs the converter: this one if it can, else a small venv in the cache.

    The fallback venv gets the converter's own pins (numpy, sentencepiece, transformers,
    protobuf, ...) and sees this interpreter's site-packages (for torch) at lower priority.
    """
    cache = _cache(cache_dir)
    llama_dir = _llama_dir(cache)
    if not force_venv and _converter_imports_ok(sys.executable, llama_dir):
        return sys.executable
    venv = cache / "convert-venv"
    python = venv / "bin" / "python"
    if python.exists() and _converter_imports_ok(str(python), llama_dir):
        return str(python)
    log = _log_path(cache, "convert-venv")
    _run_logged([sys.executable, "-m", "venv", "--clear", str(venv)], log)
    site_dir = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    parent_sites = [p for p in sys.path if p.endswith("site-packages")]
    Path(site_dir, "_sprbot_parent_env.pth").write_text("\n".join(parent_sites) + "\n")
    _run_logged([str(python), "-m", "pip", "install", *_converter_requirements(llama_dir)], log)
    if not _converter_imports_ok(str(python), llama_dir):
        raise RuntimeError(f"converter still cannot import in {venv}; see {log}")
    return str(python)


def _newest_mtime(directory: Path) -> float:
    return max((p.stat().st_mtime for p in directory.iterdir() if p.is_file()), default=0.0)


def convert_to_gguf(
    hf_dir: StrPath,
    out_path: StrPath,
    outtype: str = "bf16",
    cache_dir: StrPath | None = None,
    force: bool = False,
) -> Path:
    """Convert an HF model dir to GGUF with the sdist's own ``convert_hf_to_gguf.py``.

    Runs in a subprocess with the sdist's ``gguf-py`` on ``PYTHONPATH``. Cached by
    ``out_path``: skipped if it exists and is newer than every file in ``hf_dir``.
    """
    hf, out = Path(hf_dir).resolve(), Path(out_path).resolve()
    if out.is_file() and not force and out.stat().st_mtime >= _newest_mtime(hf):
        return out
    cache = _cache(cache_dir)
    llama_dir = _llama_dir(cache)
    python = converter_python(cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    pythonpath = [str(llama_dir / "gguf-py"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, pythonpath))}
    converter = str(llama_dir / "convert_hf_to_gguf.py")
    cmd = [python, converter, str(hf), "--outtype", outtype, "--outfile", str(partial)]
    _run_logged(cmd, _log_path(cache, f"convert-{hf.name}"), env=env)
    partial.replace(out)
    return out


def default_gguf_path(
    hf_dir: StrPath, outtype: str = "bf16", cache_dir: StrPath | None = None
) -> Path:
    """``<cache>/gguf/<name>-<hash of abs path>-<outtype>.gguf``."""
    hf = Path(hf_dir).resolve()
    tag = hashlib.sha1(str(hf).encode()).hexdigest()[:8]
    return _cache(cache_dir) / "gguf" / f"{hf.name}-{tag}-{outtype}.gguf"


# --------------------------------------------------------------------------- batch-1 decode


def llamacpp_available() -> bool:
    """True if the ``llama_cpp`` bindings (the ``bench`` extra) are importable."""
    return importlib.util.find_spec("llama_cpp") is not None


def decode_benchmark(
    gguf_path: StrPath,
    prompt_tokens: list[int] | int,
    new_tokens: int = 128,
    threads: int = 2,
    repeats: int = 3,
    warmup: int = 1,
    flash_attn: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Greedy batch-1 decode with ``llama_cpp.Llama``; exactly ``new_tokens`` tokens (EOS ignored).

    * first-token latency = prompt eval + sampling of the first token (wall clock);
    * decode tokens/s = ``(new_tokens - 1)`` single-token steps / their wall time
      (prompt excluded; same definition as llama-server's ``predicted_per_second``);
    * llama.cpp's own perf counters are reported alongside as ``llama_internal_*``.

    Weights are loaded without mmap (read fully into RAM up front, so no page faults
    during timed runs) and without mlock; one untimed warm-up run precedes ``repeats``.
    Greedy sampling uses llama.cpp's native greedy sampler; the model is reset
    (KV cache cleared) before every run so the prompt is always evaluated in full.
    """
    if not llamacpp_available():
        raise RuntimeError(INSTALL_HINT)
    import llama_cpp
    from llama_cpp import llama_cpp as C

    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2")
    n_prompt = prompt_tokens if isinstance(prompt_tokens, int) else len(prompt_tokens)
    n_ctx = -(-(n_prompt + new_tokens + 8) // 256) * 256
    settings = dict(
        n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=threads, n_threads_batch=threads,
        use_mmap=False, use_mlock=False, flash_attn=flash_attn,
    )  # fmt: skip
    load_before = os.getloadavg()[0]
    t_load = time.perf_counter()
    llm = llama_cpp.Llama(model_path=str(gguf_path), seed=seed, verbose=False, **settings)
    load_s = time.perf_counter() - t_load
    prompt = _prompt(prompt_tokens, llm.n_vocab(), llm.token_bos(), seed)
    sampler = C.llama_sampler_init_greedy()
    runs: list[dict[str, Any]] = []
    try:
        for i in range(warmup + repeats):
            llm.reset()
            C.llama_perf_context_reset(llm.ctx)
            t0 = time.perf_counter()
            llm.eval(prompt)
            tok = C.llama_sampler_sample(sampler, llm.ctx, -1)
            t1 = time.perf_counter()
            out = [tok]
            while len(out) < new_tokens:
                llm.eval([tok])
                tok = C.llama_sampler_sample(sampler, llm.ctx, -1)
                out.append(tok)
            t2 = time.perf_counter()
            perf = C.llama_perf_context(llm.ctx)
            if i >= warmup:
                runs.append(
                    dict(
                        first_token_s=t1 - t0,
                        decode_s=t2 - t1,
                        decode_tok_s=(new_tokens - 1) / (t2 - t1),
                        internal_decode_tok_s=perf.n_eval / perf.t_eval_ms * 1e3
                        if perf.t_eval_ms
                        else float("nan"),
                        internal_prompt_ms=perf.t_p_eval_ms,
                        internal_n_eval=perf.n_eval,
                        tokens=out,
                    )
                )
    finally:
        C.llama_sampler_free(sampler)
        llm.close()
    return {
        "engine": "llama.cpp via llama-cpp-python",
        "llama_cpp_python": llama_cpp.__version__,
        "same_version_as_sdist": llama_cpp.__version__ == LLAMA_CPP_PYTHON_VERSION,
        "gguf": str(gguf_path),
        "threads": threads,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "tokens_generated": [len(r["tokens"]) for r in runs],
        "repeats": repeats,
        "decode_tok_s": _median([r["decode_tok_s"] for r in runs]),
        "first_token_latency_s": _median([r["first_token_s"] for r in runs]),
        "decode_tok_s_best": max((r["decode_tok_s"] for r in runs), default=float("nan")),
        "decode_tok_s_runs": [round(r["decode_tok_s"], 3) for r in runs],
        "first_token_latency_s_runs": [round(r["first_token_s"], 4) for r in runs],
        "llama_internal_decode_tok_s": _median([r["internal_decode_tok_s"] for r in runs]),
        "llama_internal_prompt_ms": _median([r["internal_prompt_ms"] for r in runs]),
        "greedy_deterministic": all(r["tokens"] == runs[0]["tokens"] for r in runs),
        "first_tokens": runs[0]["tokens"][:16] if runs else [],
        "load_s": load_s,
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "settings": settings,
    }


# --------------------------------------------------------------------------- llama-server


def build_llama_server(
    cache_dir: StrPath | None = None, jobs: int = 2, version: str = LLAMA_CPP_PYTHON_VERSION
) -> Path:
    """cmake-build ``llama-server`` from the sdist's ``vendor/llama.cpp`` (cached).

    CPU only (``-march=native``, OpenMP, like the pip build), static llama/ggml libs,
    no OpenSSL/CURL, no web UI (neither npm nor the prebuilt download).
    """
    cache = _cache(cache_dir)
    build = cache / "llama-server" / version
    binary = build / "bin" / "llama-server"
    if binary.is_file():
        return binary
    src = _llama_dir(cache)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    flags = {
        "CMAKE_BUILD_TYPE": "Release",
        "BUILD_SHARED_LIBS": "OFF",
        "GGML_NATIVE": "ON",
        "LLAMA_BUILD_SERVER": "ON",
        "LLAMA_BUILD_TOOLS": "ON",
        "LLAMA_BUILD_COMMON": "ON",
        "LLAMA_BUILD_TESTS": "OFF",
        "LLAMA_BUILD_EXAMPLES": "OFF",
        "LLAMA_BUILD_APP": "OFF",
        "LLAMA_BUILD_UI": "OFF",
        "LLAMA_USE_PREBUILT_UI": "OFF",
        "LLAMA_OPENSSL": "OFF",
        "LLAMA_CURL": "OFF",
        "LLAMA_LLGUIDANCE": "OFF",
        "GGML_CUDA": "OFF",
        "GGML_VULKAN": "OFF",
        "GGML_METAL": "OFF",
        "GGML_BLAS": "OFF",
        "GGML_RPC": "OFF",
    }
    log = _log_path(cache, "llama-server-build")
    configure = ["cmake", "-S", str(src), "-B", str(build), *generator]
    _run_logged(configure + [f"-D{k}={v}" for k, v in flags.items()], log)
    _run_logged(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs)], log)
    if not binary.is_file():
        raise RuntimeError(f"build finished but {binary} is missing; see {log}")
    return binary


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_json(
    url: str, payload: dict[str, Any] | None = None, timeout: float = 600
) -> tuple[int, Any]:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, None


def server_benchmark(
    gguf_path: StrPath,
    parallel: int = 8,
    clients: int = 8,
    new_tokens: int = 128,
    threads: int = 2,
    prompt_tokens: int = 32,
    repeats: int = 2,
    flash_attn: bool = True,
    cache_dir: StrPath | None = None,
    server_bin: StrPath | None = None,
    startup_timeout_s: float = 300,
) -> dict[str, Any]:
    """Run ``llama-server --parallel N`` (continuous batching) and ``clients`` concurrent requests.

    Each client POSTs to the native ``/completion`` endpoint with its own random prompt
    (``cache_prompt: false``), greedy sampling, ``n_predict=new_tokens`` and
    ``ignore_eos``. Aggregate decode tokens/s uses the server's own timings:
    ``sum(predicted_n - 1) / max(predicted_ms)`` (decode windows overlap); the
    wall-clock throughput (all generated tokens / round wall time, prompts included)
    is reported too. One untimed warm-up round precedes ``repeats`` timed rounds.
    Weights are loaded without mmap (``--load-mode none``), as in ``decode_benchmark``.
    """
    cache = _cache(cache_dir)
    binary = Path(server_bin) if server_bin else build_llama_server(cache)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    n_ctx = parallel * (-(-(prompt_tokens + new_tokens + 8) // 256) * 256)
    cmd = [
        str(binary), "-m", str(gguf_path), "--host", "127.0.0.1", "--port", str(port),
        "--parallel", str(parallel), "--cont-batching", "-c", str(n_ctx),
        "-t", str(threads), "-tb", str(threads), "--load-mode", "none",
        "-fa", "on" if flash_attn else "off", "--no-webui",
    ]  # fmt: skip
    load_before = os.getloadavg()[0]
    log = _log_path(cache, f"llama-server-{port}")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {proc.returncode}; see {log}")
            try:
                if _http_json(base + "/health", timeout=5)[0] == 200:
                    break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"llama-server not healthy after {startup_timeout_s}s; see {log}"
                )
            time.sleep(0.5)
        _, models = _http_json(base + "/v1/models", timeout=30)
        n_vocab = int(models["data"][0]["meta"]["n_vocab"])
        _, special = _http_json(
            base + "/tokenize", {"content": "", "add_special": True}, timeout=30
        )
        bos = special["tokens"][0] if special and special.get("tokens") else -1

        def one(i: int, n_predict: int) -> dict[str, Any]:
            body = {
                "prompt": _prompt(prompt_tokens, n_vocab, bos, seed=1000 + i),
                "n_predict": n_predict, "ignore_eos": True, "cache_prompt": False,
                "temperature": 0.0, "top_k": 1, "stream": False,
            }  # fmt: skip
            status, resp = _http_json(base + "/completion", body)
            if status != 200 or not resp:
                raise RuntimeError(f"/completion returned HTTP {status}; see {log}")
            return resp["timings"]

        rounds: list[dict[str, Any]] = []
        with ThreadPoolExecutor(max_workers=clients) as pool:
            list(pool.map(lambda i: one(i, 8), range(clients)))  # warm-up
            for _ in range(repeats):
                t0 = time.perf_counter()
                timings = list(pool.map(lambda i: one(i, new_tokens), range(clients)))
                wall = time.perf_counter() - t0
                steps = sum(t["predicted_n"] - 1 for t in timings)
                decode_window_s = max(t["predicted_ms"] for t in timings) / 1e3
                rounds.append({
                    "aggregate_decode_tok_s": steps / decode_window_s,
                    "wall_tok_s": sum(t["predicted_n"] for t in timings) / wall,
                    "wall_s": wall,
                    "client_tok_s": [round(t["predicted_per_second"], 2) for t in timings],
                    "predicted_n": [t["predicted_n"] for t in timings],
                    "max_prompt_ms": max(t["prompt_ms"] for t in timings),
                })  # fmt: skip
    finally:
        proc.terminate()  # SIGTERM: llama-server shuts down gracefully
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {
        "engine": "llama.cpp llama-server",
        "server_bin": str(binary),
        "gguf": str(gguf_path),
        "parallel": parallel,
        "clients": clients,
        "threads": threads,
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "aggregate_decode_tok_s": _median([r["aggregate_decode_tok_s"] for r in rounds]),
        "aggregate_decode_tok_s_best": max(r["aggregate_decode_tok_s"] for r in rounds),
        "aggregate_decode_tok_s_runs": [round(r["aggregate_decode_tok_s"], 3) for r in rounds],
        "wall_tok_s": _median([r["wall_tok_s"] for r in rounds]),
        "rounds": rounds,
        "server_exit_code": proc.returncode,
        "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "settings": {"cmd": cmd[1:], "log": str(log)},
    }


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """CLI: convert ``--model`` to GGUF, run the batch-1 (and optionally server) benchmark."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", required=True, help="HF model dir (config.json, safetensors, tokenizer)"
    )
    ap.add_argument("--server", action="store_true", help="also run the llama-server benchmark")
    ap.add_argument(
        "--cache-dir", default=None, help="default: $SPRBOT_BENCH_CACHE or ~/.cache/sprbot-bench"
    )
    ap.add_argument("--outtype", default="bf16")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--no-flash-attn", action="store_true")
    ap.add_argument("--json-out", default=None, help="also write the JSON result here")
    args = ap.parse_args(argv)

    cache = _cache(args.cache_dir)
    result: dict[str, Any] = {"model": str(Path(args.model).resolve())}
    result["sdist_version"] = LLAMA_CPP_PYTHON_VERSION
    t = time.perf_counter()
    ensure_sdist(cache)
    result["sdist_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    gguf_out = default_gguf_path(args.model, args.outtype, cache)
    gguf = convert_to_gguf(args.model, gguf_out, args.outtype, cache)
    result.update(gguf=str(gguf), convert_s=round(time.perf_counter() - t, 1))
    fa = not args.no_flash_attn

    rows: list[tuple[str, str]] = []
    if llamacpp_available():
        d = decode_benchmark(gguf, args.prompt_tokens, args.new_tokens, args.threads, args.repeats,
                             flash_attn=fa)  # fmt: skip
        result["decode"] = d
        tps = f"{d['decode_tok_s']:.2f} / {d['decode_tok_s_best']:.2f}"
        rows.append(("decode tok/s (batch 1, median / best)", tps))
        rows.append(("first-token latency (median)", f"{d['first_token_latency_s'] * 1e3:.1f} ms"))
    else:
        print(INSTALL_HINT, file=sys.stderr)
        rows.append(("decode tok/s (batch 1)", "skipped: llama-cpp-python missing"))
    if args.server:
        t = time.perf_counter()
        binary = build_llama_server(cache)
        result["server_build_s"] = round(time.perf_counter() - t, 1)
        s = server_benchmark(gguf, args.parallel, args.clients, args.new_tokens, args.threads,
                             args.prompt_tokens, flash_attn=fa, cache_dir=cache,
                             server_bin=binary)  # fmt: skip
        result["server"] = s
        agg = f"{s['aggregate_decode_tok_s']:.2f} / {s['aggregate_decode_tok_s_best']:.2f}"
        rows.append((f"server aggregate decode tok/s ({args.clients} clients, median / best)", agg))
        rows.append(("server wall tok/s (incl. prompts)", f"{s['wall_tok_s']:.2f}"))

    width = max(len(k) for k, _ in rows)
    shape = f"threads={args.threads}, prompt={args.prompt_tokens}, new={args.new_tokens}"
    print(f"llama.cpp on {gguf.name}  ({shape})")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
