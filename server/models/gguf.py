"""GGUF file -> Hugging Face folder, once per file content, reused on every later start.

    ensure_converted(file, data_dir) -> (<data_dir>/models/<stem>-<sha256[:12]>/, converted_now)

transformers reads GGUF itself (``from_pretrained(..., gguf_file=...)``: config, tokenizer, chat
template and de-quantized weights); we only make that a one-time step. ``save_pretrained`` of a
GGUF-loaded model needs ``quantization_config=GgufConfig(dequantize=True)`` (transformers 5.24), and
the weights are saved as float32, the dtype the loader de-quantizes to, so the folder serves exactly
what transformers computes from the GGUF file. Loading the 98 MB SmolLM2 file takes ~35 s on 2 busy
cores and saving ~13 s; loading the converted 538 MB folder afterwards takes ~3 s.

The folder is written to a temporary sibling and renamed into place, with ``MARKER`` written last, so
an interrupted conversion leaves nothing that looks complete; a file lock makes two servers starting
on one data dir convert once between them.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..logs import get_logger
from .errors import ModelSourceError

log = get_logger("models")
MODELS_DIR = "models"
MARKER = "deltaserve-source.json"
MAGIC = b"GGUF"
HASH_CHUNK = 8 << 20


def is_gguf(path: Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def converted_dir(path: Path, digest: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir) / MODELS_DIR / f"{path.stem}-{digest[:12]}"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def inspect_gguf(path: Path) -> dict:
    """Read the GGUF metadata (no tensors) and check that transformers can serve it as a causal LM.

    Returns {"model_type", "name"}; anything else is a one-line ModelSourceError.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except ImportError as exc:
        raise ModelSourceError(f"{path}: reading GGUF needs the gguf package ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - a corrupt file fails in many ways inside the reader
        reason = _one_line(exc)
        if isinstance(exc, ValueError) and "not supported" in reason:  # "GGUF model with architecture X is ..."
            raise ModelSourceError(f"{path}: {reason.removeprefix('ValueError: ')} "
                                   "(transformers' GGUF loader cannot read it)") from None
        raise ModelSourceError(f"{path}: corrupt or truncated GGUF file ({reason})") from None
    config = parsed.get("config", {})
    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelSourceError(f"{path}: GGUF architecture {model_type!r} is not a causal language model "
                               "transformers can load")
    name = config.get("_model_name_or_path") or path.stem
    return {"model_type": model_type, "name": str(name)}


def ensure_converted(path: str | os.PathLike, data_dir: str | os.PathLike, announce=None) -> tuple[Path, bool]:
    """The converted folder of GGUF file ``path`` under ``data_dir``, converting it if it is not there yet.

    ``announce(line)`` is told one line before a conversion starts (default: stderr), since it takes a
    minute on 2 cores and a silent minute looks like a hang.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelSourceError(f"{path}: no such GGUF file")
    digest = sha256_of(path)
    target = converted_dir(path, digest, data_dir)
    if is_complete(target):
        return target, False
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{target.name}.lock"):
        if is_complete(target):  # another process converted it while we waited for the lock
            return target, False
        info = inspect_gguf(path)
        (announce or _stderr)(f"deltaserve: converting {path.name} to a Hugging Face folder in {target} "
                              "(once; about a minute on 2 cores)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert(path, tmp)
            (tmp / MARKER).write_text(json.dumps({"source": str(path.resolve()), "sha256": digest,
                                                  "bytes": path.stat().st_size, **info}, indent=2) + "\n")
            if target.exists():  # an incomplete folder from an older, interrupted version
                shutil.rmtree(target)
            os.replace(tmp, target)
        except ModelSourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - the loader's failures become one line at start-up
            raise ModelSourceError(f"{path}: GGUF conversion failed ({_one_line(exc)})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("gguf_converted", source=str(path), folder=str(target), model_type=info["model_type"])
    return target, True


def _convert(path: Path, out: Path) -> None:
    import torch
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    from transformers.utils import logging as hf_logging

    # Progress bars only on a terminal: the loader's own tqdm ("Converting and de-quantizing GGUF
    # tensors") takes disable=None = off when stderr is not a TTY; transformers' bars likewise.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()
    quiet_tqdm = functools.partial(gguf_utils.tqdm, disable=None)
    try:
        with _patched(gguf_utils, "tqdm", quiet_tqdm):
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                         quantization_config=GgufConfig(dequantize=True))
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _patched(module, name: str, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
