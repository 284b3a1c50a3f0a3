"""``sprbot model init-tiny``: offline, loadable models of three sizes."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from inference.tiny import SIZES, VOCAB_SIZE


def test_cli_writes_a_loadable_offline_model(cli, tmp_path):
    result = cli("model", "init-tiny", str(tmp_path / "m"))
    assert result.returncode == 0, result.stderr
    assert "wrote a random tiny model" in result.stdout
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m")
    text = "Hello, world!\n  def f(x): return x ** 2  # ünïcödé 🚀"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    assert tokenizer.chat_template
    model = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert model.config.vocab_size == len(tokenizer) == VOCAB_SIZE
    assert json.loads((tmp_path / "m" / "sprbot.json").read_text())["size"] == "tiny"
    assert (tmp_path / "m" / "tokenizer.model").exists()  # for llama.cpp's converter


def test_refuses_a_non_empty_folder(cli, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    result = cli("model", "init-tiny", str(tmp_path / "m"))
    assert result.returncode == 2
    assert "not empty" in result.stderr
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"


def test_unknown_size_is_refused(cli, tmp_path):
    result = cli("model", "init-tiny", str(tmp_path / "m"), "--size", "huge")
    assert result.returncode == 2
    assert "tiny, small, base" in result.stderr


@pytest.mark.parametrize(
    ("size", "low", "high"), [("tiny", 0.5e6, 2e6), ("small", 50e6, 60e6), ("base", 0.95e9, 1.1e9)]
)
def test_sizes_have_the_promised_parameter_counts(size, low, high):
    shape = SIZES[size]
    config = LlamaConfig(vocab_size=VOCAB_SIZE, tie_word_embeddings=False, **shape.__dict__)
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert low < params < high
