"""``sprbot model init-tiny``: a small, randomly initialised Llama that loads fully offline.

Model weights cannot be downloaded here, so tests, benchmarks and the offline demo use models
made locally: a SentencePiece BPE tokenizer trained on text that ships with Python (the
standard library's docstrings), with a chat template, and a random-init Llama-family model.
SentencePiece (rather than a byte-level BPE) keeps the folder convertible by llama.cpp's
``convert_hf_to_gguf.py``, which the benchmarks use for a side-by-side comparison.
"""

from __future__ import annotations

import importlib
import inspect
import json
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 8000
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MARKER_FILE = "sprbot.json"


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


SIZES: dict[str, Shape] = {
    # milliseconds per token: for tests
    "tiny": Shape(64, 2, 4, 2, 176),
    # ~56M parameters: bf16-vs-fp32 and batching benchmarks
    "small": Shape(640, 10, 10, 5, 1728),
    # ~1.0B parameters: the memory-bandwidth benchmarks
    "base": Shape(2048, 22, 32, 4, 5632),
}

# Standard-library modules whose docstrings make the tokenizer's training text: plain English
# with code, present on every Python install, so no data has to be downloaded.
_CORPUS_MODULES = [
    "argparse",
    "asyncio",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "codecs",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html.parser",
    "http.client",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "math",
    "mimetypes",
    "multiprocessing",
    "numbers",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.request",
    "uuid",
    "warnings",
    "weakref",
    "zipfile",
]


def _corpus_text(extra: list[str]) -> str:
    chunks = list(extra)
    for module_name in _CORPUS_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _, obj in inspect.getmembers(module):
                doc = inspect.getdoc(obj)
                if doc:
                    chunks.append(doc)
    return "\n".join(chunks)


def train_tokenizer(outdir: Path, extra_text: list[str] | None = None) -> None:
    """Train a SentencePiece BPE tokenizer and save it as a transformers tokenizer."""
    import sentencepiece as spm
    from transformers import LlamaTokenizerFast

    outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text(_corpus_text(extra_text or []), encoding="utf-8")
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "tokenizer"),
            vocab_size=VOCAB_SIZE,
            model_type="bpe",
            byte_fallback=True,  # any text encodes, nothing becomes <unk>
            split_digits=True,
            normalization_rule_name="identity",  # decode(encode(text)) == text
            remove_extra_whitespaces=False,
            user_defined_symbols=ROLE_TOKENS,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            num_threads=2,
            input_sentence_size=300_000,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
        model_file = Path(tmp) / "tokenizer.model"
        # from_pretrained converts tokenizer.model to a fast tokenizer (needs protobuf).
        tokenizer = LlamaTokenizerFast.from_pretrained(
            tmp,
            legacy=False,
            add_bos_token=False,  # the chat template writes <s> itself
            pad_token="<pad>",
            additional_special_tokens=ROLE_TOKENS,
        )
        tokenizer.chat_template = CHAT_TEMPLATE
        tokenizer.save_pretrained(outdir)
        _portable_tokenizer_config(outdir / "tokenizer_config.json")
        # llama.cpp's converter reads the SentencePiece model itself.
        (outdir / "tokenizer.model").write_bytes(model_file.read_bytes())


def _portable_tokenizer_config(path: Path) -> None:
    """transformers 5 writes the role tokens as a list under ``extra_special_tokens``, which
    4.x (the IPEX stack) reads as a dict and fails on; ``additional_special_tokens`` is read
    by both."""
    config = json.loads(path.read_text())
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    elif extra:
        config["extra_special_tokens"] = extra
    path.write_text(json.dumps(config, indent=2))


def init_tiny(outdir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a loadable random-init Llama of ``size`` (tiny, small, base) to ``outdir``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    outdir = Path(outdir)
    if outdir.exists() and any(outdir.iterdir()):
        raise FileExistsError(f"{outdir} is not empty; choose a new folder or empty it first")
    train_tokenizer(outdir)
    tokenizer = AutoTokenizer.from_pretrained(outdir)
    shape = SIZES[size]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **asdict(shape),
    )
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if size == "base" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # init the 1B model straight in bf16: half the memory
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(outdir)
    params = sum(p.numel() for p in model.parameters())
    (outdir / MARKER_FILE).write_text(
        json.dumps({"kind": "init-tiny", "size": size, "seed": seed, "parameters": params})
    )
    return outdir
