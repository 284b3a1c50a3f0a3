"""GGUF files (llama.cpp's and Ollama's format) as models: imported once to a bf16 folder,
reused by hash, and refused with a clear message when transformers cannot convert them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from bot.demo import DEMO_NAME, demo_gguf
from inference import GenerationConfig, LoadingModelConfig, PipelineConfig, build_chatbot
from inference.errors import ModelLoadError
from inference.gguf import MARKER, import_gguf, imported_dir


def write_gguf(path: Path, architecture: str, qtype: str) -> Path:
    """A one-tensor GGUF file: enough header for transformers to judge it."""
    writer = GGUFWriter(path, architecture)
    writer.add_name("test")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_feed_forward_length(64)
    writer.add_head_count(4)
    if qtype == "F32":
        writer.add_tensor("token_embd.weight", np.zeros((16, 32), dtype=np.float32))
    else:
        kind = GGMLQuantizationType[qtype]
        block, size = GGML_QUANT_SIZES[kind]
        raw = np.zeros((16, 256 // block * size), dtype=np.uint8)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def folders(data_dir: Path) -> list[str]:
    root = imported_dir(data_dir)
    return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


@pytest.mark.slow
def test_model_import_converts_once_with_progress_then_reuses_by_hash(data_dir, cli, tmp_path):
    first = cli("model", "import", str(demo_gguf()), "--name", "smol", timeout=300)
    assert first.returncode == 0, first.stderr
    folder = Path(first.stdout.strip().splitlines()[-1])
    assert folder.parent == imported_dir(data_dir) and folder.name.startswith("smol-")
    assert "reading the GGUF file" in first.stderr and "dequantizing to bf16" in first.stderr
    marker = json.loads((folder / MARKER).read_text())
    assert marker["architecture"] == "llama" and marker["dtype"] == "bfloat16"
    assert "Q4_1" in marker["quantization"] and marker["parameters"] > 100e6
    assert (folder / "model.safetensors").stat().st_size > 250e6  # bf16: 2 bytes a weight

    # The same bytes under another name and path: found by hash, not converted again.
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(demo_gguf().read_bytes())
    again = cli("model", "import", str(copy), timeout=120)
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip().splitlines()[-1]) == folder
    assert "dequantizing" not in again.stderr
    assert folders(data_dir) == [folder.name]


def test_a_gguf_file_is_a_model_wherever_a_model_is_named(smollm2, data_dir):
    """PipelineConfig(model_name_or_path=FILE.gguf), and NeuralChat's gguf_model_path, load
    the imported folder (here imported already, by the session)."""
    greedy = GenerationConfig(do_sample=False, max_new_tokens=12)
    by_path = build_chatbot(PipelineConfig(model_name_or_path=str(demo_gguf())))
    assert by_path.info()["parameters"] > 100e6
    answer = by_path.predict("What is the capital of France?", greedy)
    assert "Paris" in answer, answer
    neural_chat_style = build_chatbot(
        PipelineConfig(
            model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
            loading_config=LoadingModelConfig(gguf_model_path=str(demo_gguf())),
        )
    )
    assert neural_chat_style.predict("What is the capital of France?", greedy) == answer
    assert folders(data_dir) == [smollm2.name]


def test_an_unsupported_quantization_type_is_named_before_any_conversion(tmp_path, data_dir):
    path = write_gguf(tmp_path / "odd.gguf", "llama", "Q8_K")
    with pytest.raises(ModelLoadError) as caught:
        import_gguf(path, data_dir=data_dir)
    message = str(caught.value)
    assert "quantized as Q8_K" in message and "cannot dequantize" in message
    assert "Q8_0" in message  # what to use instead
    assert folders(data_dir) == []


def test_an_unsupported_architecture_is_named_with_what_to_do(tmp_path, data_dir, cli):
    path = write_gguf(tmp_path / "rwkv.gguf", "rwkv6", "F32")
    result = cli("model", "import", str(path), timeout=120)
    assert result.returncode != 0
    assert "architecture 'rwkv6'" in result.stderr and "not supported" in result.stderr
    assert "Hugging Face folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert folders(data_dir) == []


def test_a_missing_gguf_file_says_so(data_dir, cli):
    result = cli("predict", "hi", "--model", "/nowhere/model.gguf", timeout=120)
    assert result.returncode != 0
    assert "the GGUF file /nowhere/model.gguf does not exist" in result.stderr


def test_the_demo_file_ships_in_the_installed_wheel():
    path = demo_gguf()
    assert path.name.startswith(DEMO_NAME) and path.stat().st_size > 90e6
