"""The native delta format: one safetensors file, config in its metadata, deterministic bytes.

Layout (the safetensors container, https://github.com/huggingface/safetensors#format): 8 bytes of
little-endian header length, a JSON header, then the tensor bytes. Tensors are the canonical
:class:`Delta`'s, keyed ``<module path>.<suffix>`` with the suffixes of ``ModuleDelta.tensors()``.
``__metadata__`` holds ``format = "deltaserve.native"`` and ``deltaserve`` = canonical JSON::

    {"format_version": 1, "source_format": "peft", "base_fingerprint": "...", "description": "",
     "modules": {"model.layers.0.self_attn.q_proj": {"tensors": ["lora.a", "lora.b"],
                                                    "lora": {"rank": 16, "scale": 2.0}}, ...}}

A delta with a prompt part adds ``"prompt": {"form": "kv", "num_virtual_tokens": 20, "positions":
"after_prefix"}`` and its tensors under the reserved keys ``__prompt__.keys`` / ``__prompt__.values``
(or ``__prompt__.embeddings``); a delta without one has exactly the bytes it had before prompts existed,
so stored digests do not change.

We write the container ourselves rather than through ``safetensors.torch.save``: the header is
dumped with sorted keys and fixed separators and the data laid out in sorted key order, so the
same delta always gives the same bytes and therefore the same sha256 (the blob's address).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from pathlib import Path

import torch

from .delta import ACTIVATIONS, ADAPTER_SOURCES, AdapterTerm, Delta, LoraTerm, ModuleDelta, RowsTerm
from .errors import DeltaError
from .prompt import FORMS, POSITIONS, PromptPart

FORMAT_NAME = "deltaserve.native"
FORMAT_VERSION = 1
_HEADER_LIMIT = 16 << 20  # a header past 16 MiB is malformed (a 7B all-module delta needs ~100 KiB)

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int64: "I64"}  # I64: trainable-token ids (rows.index) only
_SUFFIXES = ("lora.a", "lora.b", "bias", "out_scale", "in_scale",
             "adapter.down", "adapter.down_bias", "adapter.up", "adapter.up_bias",
             "dora.magnitude", "rows.index", "rows.values")
PROMPT_KEY = "__prompt__"  # never a module path: HF module names are Python identifiers joined by dots
_PROMPT_TENSORS = {"embeddings": ("embeddings",), "kv": ("keys", "values")}


def digest_bytes(data: bytes) -> str:
    """The sha256 hex digest of a native blob: its content address."""
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except ValueError as exc:
        raise DeltaError(f"native format: config is not finite JSON ({exc})") from None


def _module_config(path: str, md: ModuleDelta) -> dict:
    cfg: dict = {"tensors": sorted(md.tensors())}
    if md.lora is not None:
        cfg["lora"] = {"rank": md.lora.rank, "scale": float(md.lora.scale)}
    if md.adapter is not None:
        ad = md.adapter
        if ad.activation not in ACTIVATIONS:
            raise DeltaError(f"{path}: adapter activation {ad.activation!r} not in {ACTIVATIONS}")
        if ad.source not in ADAPTER_SOURCES:
            raise DeltaError(f"{path}: adapter source {ad.source!r} not in {ADAPTER_SOURCES}")
        cfg["adapter"] = {"width": ad.width, "activation": ad.activation, "scale": float(ad.scale),
                          "source": ad.source}
    for term, value in (("lora.scale", cfg.get("lora", {}).get("scale", 0.0)),
                        ("adapter.scale", cfg.get("adapter", {}).get("scale", 0.0))):
        if not math.isfinite(value):
            raise DeltaError(f"{path}.{term}: scale {value} is not finite")
    return cfg


def dump_native(delta: Delta) -> bytes:
    """Serialise ``delta`` to native bytes; the same delta always gives the same bytes."""
    config = {"format_version": FORMAT_VERSION, "source_format": delta.source_format,
              "base_fingerprint": delta.base_fingerprint, "description": delta.description,
              "modules": {path: _module_config(path, md) for path, md in delta.modules.items()}}
    tensors: dict[str, torch.Tensor] = {}
    parts = [(path, md.tensors()) for path, md in delta.modules.items()]
    if delta.prompt is not None:
        pp = delta.prompt
        pp.check_structure()
        config["prompt"] = {"form": pp.form, "num_virtual_tokens": pp.num_virtual_tokens, "positions": pp.positions}
        parts.append((PROMPT_KEY, pp.tensors()))
    for path, named in parts:
        for suffix, t in named.items():
            if t.dtype not in _DTYPES or (t.dtype == torch.int64) != (suffix == "rows.index"):
                raise DeltaError(f"{path}.{suffix}: dtype {t.dtype} not storable (float32/16, bfloat16, float64; "
                                 f"int64 for rows.index only)")
            tensors[f"{path}.{suffix}"] = t
    header: dict = {"__metadata__": {"format": FORMAT_NAME, "deltaserve": canonical_json(config)}}
    chunks: list[bytes] = []
    offset = 0
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    head = canonical_json(header).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(head)) + head + b"".join(chunks)


def read_header(data: bytes, where: str = "native file") -> dict:
    """Parse and sanity-check a safetensors header (the JSON object, ``__metadata__`` included)."""
    if len(data) < 8:
        raise DeltaError(f"{where}: {len(data)} bytes is too short for a safetensors header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > _HEADER_LIMIT or 8 + size > len(data):
        raise DeltaError(f"{where}: header length {size} exceeds the file ({len(data)} bytes): truncated or corrupt")
    try:
        header = json.loads(data[8:8 + size])
    except (ValueError, UnicodeDecodeError) as exc:
        raise DeltaError(f"{where}: safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise DeltaError(f"{where}: safetensors header is not a JSON object")
    return header


def is_native(data_head: bytes) -> bool:
    """True if these leading bytes of a file are a native delta's header (cheap format detection)."""
    try:
        meta = read_header(data_head).get("__metadata__") or {}
    except DeltaError:
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT_NAME


def sniff_native(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` is a native delta, reading only its header."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return False
            (size,) = struct.unpack("<Q", head)
            if size > _HEADER_LIMIT:
                return False
            return is_native(head + f.read(size))
    except OSError:
        return False


def load_native(source: bytes | str | os.PathLike) -> Delta:
    """Parse native bytes (or a file) into a :class:`Delta`; malformed input raises :class:`DeltaError`."""
    where = "native file"
    if not isinstance(source, (bytes, bytearray, memoryview)):
        where = str(source)
        try:
            source = Path(source).read_bytes()
        except FileNotFoundError:
            raise DeltaError(f"{where}: no such file") from None
        except OSError as exc:
            raise DeltaError(f"{where}: cannot read ({exc.strerror})") from None
    data = bytes(source)
    header = read_header(data, where)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DeltaError(f"{where}: not a native delta (metadata 'format' is not {FORMAT_NAME!r})")
    try:
        config = json.loads(meta.get("deltaserve", ""))
    except ValueError as exc:
        raise DeltaError(f"{where}: metadata 'deltaserve' is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise DeltaError(f"{where}: metadata 'deltaserve' is not a JSON object")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise DeltaError(f"{where}: native format version {version!r} is not supported (this server reads "
                         f"{FORMAT_VERSION})")
    tensors = _load_tensors(data, where)
    modules_cfg = config.get("modules")
    if not isinstance(modules_cfg, dict):
        raise DeltaError(f"{where}: metadata 'modules' must be an object")
    modules: dict[str, ModuleDelta] = {}
    claimed: set[str] = set()
    for path, cfg in modules_cfg.items():
        modules[path] = _build_module(path, cfg, tensors, where)
        claimed.update(f"{path}.{s}" for s in cfg["tensors"])
    prompt = None
    if "prompt" in config:
        prompt, names = _build_prompt(config["prompt"], tensors, where)
        claimed.update(names)
    extra = sorted(set(tensors) - claimed)
    if extra:
        raise DeltaError(f"{where}: tensor {extra[0]!r} is not described in the metadata")
    fields = {k: config.get(k, "") for k in ("source_format", "base_fingerprint", "description")}
    for k, v in fields.items():
        if not isinstance(v, str):
            raise DeltaError(f"{where}: metadata '{k}' must be a string")
    return Delta(modules, **fields, prompt=prompt)


def _build_prompt(cfg: object, tensors: dict[str, torch.Tensor], where: str) -> tuple[PromptPart, list[str]]:
    at = f"{where}: prompt"
    if not isinstance(cfg, dict) or cfg.get("form") not in FORMS or cfg.get("positions") not in POSITIONS:
        raise DeltaError(f"{at}: config must name a form in {FORMS} and positions in {POSITIONS}")
    names = [f"{PROMPT_KEY}.{n}" for n in _PROMPT_TENSORS[cfg["form"]]]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise DeltaError(f"{at}: tensor {missing[0]!r} listed by form {cfg['form']!r} is missing from the file")
    got = {n.split(".", 1)[1]: tensors[n] for n in names}
    part = PromptPart(positions=cfg["positions"], **got)
    part.check_structure()
    if cfg.get("num_virtual_tokens") != part.num_virtual_tokens:
        raise DeltaError(f"{at}: num_virtual_tokens {cfg.get('num_virtual_tokens')!r} does not match the tensors "
                         f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in got.items())})")
    return part, names


def _load_tensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError, TypeError) as exc:
        raise DeltaError(f"{where}: corrupt safetensors data ({str(exc).splitlines()[0]})") from None


def _build_module(path: str, cfg: object, tensors: dict[str, torch.Tensor], where: str) -> ModuleDelta:
    at = f"{where}: module {path}"
    if not isinstance(cfg, dict) or not isinstance(cfg.get("tensors"), list):
        raise DeltaError(f"{at}: config must be an object with a 'tensors' list")
    names = cfg["tensors"]
    unknown = [n for n in names if n not in _SUFFIXES]
    if unknown:
        raise DeltaError(f"{at}: unknown tensor suffix {unknown[0]!r}")

    def get(suffix: str, dims: int) -> torch.Tensor | None:
        if suffix not in names:
            return None
        t = tensors.get(f"{path}.{suffix}")
        if t is None:
            raise DeltaError(f"{at}: tensor {suffix!r} listed in the metadata but missing from the file")
        if t.dim() != dims:
            raise DeltaError(f"{at}.{suffix}: expected {dims} dims, got shape {tuple(t.shape)}")
        return t

    md = ModuleDelta(bias=get("bias", 1), out_scale=get("out_scale", 1), in_scale=get("in_scale", 1))
    a, b = get("lora.a", 2), get("lora.b", 2)
    lora_cfg = cfg.get("lora")
    if (a is None) != (lora_cfg is None) or (b is None) != (lora_cfg is None):
        raise DeltaError(f"{at}: LoRA config and tensors lora.a/lora.b must come together")
    if lora_cfg is not None:
        scale = _number(lora_cfg, "scale", at + ".lora")
        if a.shape[0] != b.shape[1] or lora_cfg.get("rank") != a.shape[0]:
            raise DeltaError(f"{at}.lora: rank {lora_cfg.get('rank')!r} does not match A {tuple(a.shape)} "
                             f"and B {tuple(b.shape)}")
        md.lora = LoraTerm(a, b, scale)
    ad_names = ("adapter.down", "adapter.down_bias", "adapter.up", "adapter.up_bias")
    parts = [get(n, d) for n, d in zip(ad_names, (2, 1, 2, 1))]
    ad_cfg = cfg.get("adapter")
    present = [p is not None for p in parts]
    if (ad_cfg is not None and not all(present)) or (ad_cfg is None and any(present)):
        raise DeltaError(f"{at}: adapter config and its four tensors must come together")
    if ad_cfg is not None:
        down, down_bias, up, up_bias = parts
        act, src = ad_cfg.get("activation"), ad_cfg.get("source")
        if act not in ACTIVATIONS or src not in ADAPTER_SOURCES:
            raise DeltaError(f"{at}.adapter: activation {act!r} / source {src!r} not supported")
        m = down.shape[0]
        if ad_cfg.get("width") != m or down_bias.shape[0] != m or up.shape[1] != m or up.shape[0] != up_bias.shape[0]:
            raise DeltaError(f"{at}.adapter: inconsistent shapes down {tuple(down.shape)} up {tuple(up.shape)}")
        md.adapter = AdapterTerm(down, down_bias, up, up_bias, act, _number(ad_cfg, "scale", at + ".adapter"), src)
    md.dora_magnitude = get("dora.magnitude", 1)
    index, values = get("rows.index", 1), get("rows.values", 2)
    if (index is None) != (values is None):
        raise DeltaError(f"{at}: rows.index and rows.values must come together")
    if index is not None:
        if index.dtype != torch.int64 or values.dtype == torch.int64:
            raise DeltaError(f"{at}: rows.index must be int64 and rows.values floating, found {index.dtype} / "
                             f"{values.dtype}")
        md.rows = RowsTerm(index, values)
    for suffix in names:
        if suffix != "rows.index" and tensors[f"{path}.{suffix}"].dtype == torch.int64:
            raise DeltaError(f"{at}.{suffix}: int64 is allowed for rows.index only")
    if not md.kinds():
        raise DeltaError(f"{at}: module has no delta terms")
    return md


def _number(cfg: dict, key: str, at: str) -> float:
    v = cfg.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DeltaError(f"{at}: '{key}' must be a finite number, got {v!r}")
    return float(v)
