"""Models from GGUF files: llama.cpp's and Ollama's format, turned into a bf16 folder once.

transformers can read a GGUF file and dequantize its tensors, but that takes tens of seconds
and the result cannot be saved as it loads by default (packed). ``import_gguf`` does it once:
it dequantizes to bf16 and writes a plain Hugging Face folder under
``<data dir>/models/imported/<name>-<sha256[:12]>/``. The folder is keyed by the file's hash,
so a renamed or copied file reuses it, and a changed file gets a new one; the hash itself is
remembered by path, size and mtime, so that a later start does not read the file again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from inference.errors import ModelLoadError

log = logging.getLogger(__name__)

SUFFIX = ".gguf"
MARKER = "sprbot.json"  # written last: a folder without it is not a finished import
_INDEX = "index.json"  # "path|size|mtime_ns" -> sha256
_CHUNK = 8 << 20

# (phase, done, total): "hashing" in bytes, then "converting" and "writing" as 0/1 -> 1/1.
Progress = Callable[[str, int, int], None]


def is_gguf(name: str | os.PathLike[str] | None) -> bool:
    return bool(name) and str(name).lower().endswith(SUFFIX)


def imported_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "models" / "imported"


def data_dir_from_env() -> Path:
    """``SPRBOT_DATA_DIR``, else the settings' default: without loading every setting, so that
    the engine alone (a notebook) can import a file."""
    from bot.config import default_data_dir

    configured = os.environ.get("SPRBOT_DATA_DIR")
    return Path(configured).expanduser() if configured else default_data_dir()


def resolve(name: str, *, data_dir: Path | None = None, progress: Progress | None = None) -> str:
    """``name`` itself, or for a ``.gguf`` file the bf16 folder it was (or is now) imported to."""
    if not is_gguf(name):
        return name
    return str(import_gguf(Path(name), data_dir=data_dir, progress=progress))


def import_gguf(
    file: Path,
    *,
    data_dir: Path | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """The bf16 folder of ``file``, converting it on first use.

    Raises ``ModelLoadError`` naming the problem (missing file, unsupported architecture or
    quantization type) and what to do.
    """
    file = Path(file).expanduser()
    if not file.is_file():
        raise ModelLoadError(
            f"cannot load the model: the GGUF file {file} does not exist. Give the path of a "
            ".gguf file (llama.cpp's and Ollama's model format), a Hugging Face folder or id."
        )
    root = imported_dir(data_dir or data_dir_from_env())
    root.mkdir(parents=True, exist_ok=True)
    digest = _sha256(file, root, progress)
    existing = _find(root, digest)
    if existing is not None:
        log.info("GGUF %s was imported already: %s", file, existing)
        return existing

    architecture, qtypes = _describe(file)
    label = _slug(name or file.stem)
    target = root / f"{label}-{digest[:12]}"
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    started = time.perf_counter()
    if progress:
        progress("converting", 0, 1)
    model, tokenizer = _dequantize(file, architecture, qtypes)
    if progress:
        progress("converting", 1, 1)
        progress("writing", 0, 1)
    try:
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        (partial / MARKER).write_text(
            json.dumps(
                {
                    "kind": "gguf-import",
                    "source": str(file.resolve()),
                    "sha256": digest,
                    "architecture": architecture,
                    "quantization": qtypes,
                    "dtype": "bfloat16",
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "seconds": round(time.perf_counter() - started, 1),
                },
                indent=2,
            )
        )
        os.replace(partial, target)  # a crash mid-write leaves only the .partial behind
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if progress:
        progress("writing", 1, 1)
    log.info("imported %s (%s, %s) to %s", file, architecture, "/".join(qtypes), target)
    return target


def _sha256(file: Path, root: Path, progress: Progress | None) -> str:
    stat = file.stat()
    key = f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = root / _INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    done = 0
    with file.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress:
                progress("hashing", done, stat.st_size)
    index[key] = digest.hexdigest()
    tmp = index_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, index_path)
    return index[key]


def _find(root: Path, digest: str) -> Path | None:
    for folder in sorted(root.glob(f"*-{digest[:12]}")):
        if (folder / MARKER).is_file():
            return folder
    return None


def _slug(text: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return slug[:64] or "model"


def _describe(file: Path) -> tuple[str, list[str]]:
    """The file's architecture and the quantization types of its tensors, read from its header;
    a type the installed ``gguf`` package cannot dequantize is refused here, before the slow
    part."""
    try:
        import numpy as np
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise ModelLoadError(
            "cannot load a GGUF file: the `gguf` package is missing (pip install gguf)"
        ) from None
    try:
        reader = GGUFReader(file)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the model: {file} is not a readable GGUF file: {exc}"
        ) from None
    field = reader.fields.get("general.architecture")
    architecture = field.contents() if field is not None else "unknown"
    qtypes = sorted({GGMLQuantizationType(t.tensor_type).name for t in reader.tensors})
    for qtype in qtypes:
        kind = GGMLQuantizationType[qtype]
        block, size = GGML_QUANT_SIZES[kind]
        try:
            dequantize(np.zeros(size, dtype=np.uint8), kind)
        except NotImplementedError:
            raise ModelLoadError(
                f"cannot load the model: {file} holds tensors quantized as {qtype}, which the "
                f"installed gguf package cannot dequantize (this file uses {', '.join(qtypes)}). "
                "Use a GGUF of the same model in F16, BF16, Q8_0, Q4_K_M or another common "
                "type, or its Hugging Face folder."
            ) from None
    return architecture, qtypes


def _dequantize(file: Path, architecture: str, qtypes: list[str]):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inference.chatbot import _DTYPE_KWARG

    kwargs = {_DTYPE_KWARG: torch.bfloat16}
    try:
        from transformers import GgufConfig
    except ImportError:  # before transformers 5, GGUF weights were always dequantized
        pass
    else:  # dequantize=True: plain bf16 weights, which save_pretrained can write
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    folder, filename = str(file.parent), file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, **kwargs)
    except (ValueError, NotImplementedError, KeyError) as exc:
        why = str(exc).rstrip(".")
        raise ModelLoadError(
            f"cannot load the model: transformers {transformers.__version__} cannot convert "
            f"{file} (architecture {architecture!r}, tensors {', '.join(qtypes)}): {why}. "
            "Use the model's Hugging Face folder or id instead (SPRBOT_MODEL), or a newer "
            "transformers if it has added this architecture."
        ) from None
    return model, tokenizer
