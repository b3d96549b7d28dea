"""``--model`` -> the folder to load: a built-in name, an HF folder, or a GGUF file (see __init__)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .embedded import SERVED_NAME, embedded_gguf
from .errors import ModelSourceError
from .gguf import ensure_converted, is_gguf

DEFAULT_MODEL = "smollm2-135m-instruct"  # what `deltaserve serve` serves when --model is not given
DEMO_MODEL = "demo"  # the random demo model: no download, no wheel, noise for text (tests, offline use)
MODEL_NAMES = (DEFAULT_MODEL, DEMO_MODEL)


@dataclass(frozen=True, slots=True)
class ModelSource:
    path: Path  # an HF folder: config.json, weights, tokenizer (and chat template, if the model has one)
    name: str  # the base model's served name (logs, the OpenAI front's /v1/models)
    origin: str  # "embedded" | "demo" | "folder" | "gguf"
    converted: bool = False  # True when this call converted a GGUF file


def resolve_model(spec: str | os.PathLike | None, data_dir: str | os.PathLike, announce=None) -> ModelSource:
    """Resolve ``spec`` (``--model``; None = the default) to a loadable folder, converting a GGUF once.

    A built-in name wins over a same-named path in the working directory; write ``./demo`` for a
    folder called ``demo``. ``announce`` gets the one-line notice of a GGUF conversion.
    """
    text = DEFAULT_MODEL if spec is None else os.fspath(spec)
    if not text.strip():
        raise ModelSourceError("--model is empty: give an HF folder, a .gguf file, or one of "
                               + ", ".join(MODEL_NAMES))
    if text.lower() == DEFAULT_MODEL:
        folder, converted = ensure_converted(embedded_gguf(), data_dir, announce)
        return ModelSource(folder, SERVED_NAME, "embedded", converted)
    if text.lower() == DEMO_MODEL:
        from ..demo import ensure_demo_model

        folder, _created = ensure_demo_model(data_dir)
        return ModelSource(folder, DEMO_MODEL, "demo")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"--model {path}: no config.json there (expected an HF causal-LM folder: "
                                   "config.json, *.safetensors, tokenizer files)")
        return ModelSource(path, path.resolve().name, "folder")
    if path.is_file():
        if is_gguf(path):
            folder, converted = ensure_converted(path, data_dir, announce)
            return ModelSource(folder, path.stem, "gguf", converted)
        if path.suffix.lower() == ".gguf":
            raise ModelSourceError(f"--model {path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        raise ModelSourceError(f"--model {path}: a file, but not a .gguf one (give an HF folder or a .gguf file)")
    raise ModelSourceError(f"--model {text}: no such folder or file, and not a built-in model "
                           f"({', '.join(MODEL_NAMES)})")
