"""The served model's own sampling defaults and length limit, read once at start-up.

A model folder's ``generation_config.json`` decides what request fields left unset mean, as it does for
transformers' ``generate()``: ``do_sample`` (transformers' default: false) chooses greedy decoding or
sampling; when sampling, the file's ``temperature``, ``top_p`` and ``top_k`` apply (vLLM's
``--generation-config auto``); ``repetition_penalty`` and ``max_new_tokens`` apply either way. Keys the
file does not write fall to the API's documented defaults (``server/types.py``), never to transformers'
class defaults (its top_k=50 is not the model's choice). A folder without the file has no defaults.
SmolLM2-135M-Instruct's file (converted from the GGUF) sets no ``do_sample``: greedy, as ``generate()``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    source: str = "none"  # the file they came from, for the start-up log

    @classmethod
    def from_folder(cls, folder: str | Path) -> "GenerationDefaults":
        path = Path(folder) / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except ValueError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "dict") -> "GenerationDefaults":
        sampling = bool(raw.get("do_sample", False))
        temperature = raw.get("temperature") if sampling else 0.0
        top_p, top_k = (raw.get("top_p"), raw.get("top_k")) if sampling else (None, None)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(temperature=_num(temperature, float), top_p=_num(top_p, float), top_k=_num(top_k, int), repetition_penalty=_num(raw.get("repetition_penalty"), float),
                   max_new_tokens=_num(raw.get("max_new_tokens"), int), eos_token_ids=tuple(int(i) for i in eos_ids),
                   source=source)

    def sampling_fields(self) -> dict:
        """The set ones, by SamplingParams field name (for the start-up log and the OpenAI front)."""
        keys = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def _num(value, kind):
    return None if value is None else kind(value)


def model_max_len(config) -> int | None:
    """The model's own context limit from its HF config (``max_position_embeddings`` and its aliases)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
