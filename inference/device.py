"""Where and in what precision the model runs: device, dtype and the IPEX backend."""

from __future__ import annotations

import importlib.util
import logging
from functools import cache

import torch

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def resolve_device(requested: str) -> str:
    """``auto`` is CUDA when a GPU is present, else CPU."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} was asked for, but no CUDA GPU is available")
    if requested not in ("cpu",) and not requested.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {requested!r}")
    return requested


@cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX), as Xeon SPR+ does."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    cpu_api = getattr(torch._C, "_cpu", None)
    if cpu_api is not None and any(hasattr(cpu_api, p) for p in probes):
        return any(getattr(cpu_api, p, lambda: False)() for p in probes)
    try:
        with open("/proc/cpuinfo") as info:
            flags = info.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(requested: str, device: str, *, forced: bool, native_bf16: bool) -> str:
    """The dtype to run in.

    ``requested`` is ``bfloat16``, ``float32``, ``float16`` or ``auto``. On a CPU without native
    bf16, bf16 is emulated and slower than fp32, so it falls back to fp32 with a warning unless
    ``forced`` (``SPRBOT_DTYPE=bfloat16`` set explicitly).
    """
    if requested == "auto":
        return "bfloat16" if device != "cpu" or native_bf16 else "float32"
    if requested == "bfloat16" and device == "cpu" and not native_bf16 and not forced:
        log.warning(
            "this CPU has no native bf16 (no avx512_bf16 and no AMX), so bf16 would be "
            "emulated and slow: running in float32. Set SPRBOT_DTYPE=bfloat16 to force bf16."
        )
        return "float32"
    if requested == "float16" and device == "cpu":
        raise ValueError("float16 is not supported on CPU; use bfloat16 or float32")
    return requested


@cache
def ipex_status() -> tuple[bool, str]:
    """Whether Intel Extension for PyTorch is usable here, and why not if it is not.

    IPEX only works with the torch minor version it was built for; importing a mismatched
    pair fails or warns, so the versions are compared before anything is used.
    """
    if importlib.util.find_spec("intel_extension_for_pytorch") is None:
        return False, "intel-extension-for-pytorch is not installed"
    try:
        import intel_extension_for_pytorch as ipex
    except Exception as exc:  # a broken install must not stop the stock path
        return False, f"intel-extension-for-pytorch failed to import: {exc}"
    ipex_minor = ".".join(ipex.__version__.split(".")[:2])
    torch_minor = ".".join(torch.__version__.split(".")[:2])
    if ipex_minor != torch_minor:
        return False, f"IPEX {ipex.__version__} does not match torch {torch.__version__}"
    if not hasattr(ipex, "llm"):
        return False, f"IPEX {ipex.__version__} has no ipex.llm"
    return True, f"IPEX {ipex.__version__}"
