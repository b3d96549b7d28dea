"""ServerConfig: the one place where serving defaults live, checked in __post_init__.

Loose settings (a TOML/JSON config file, CLI flags) are filtered through ``dataclasses.fields()``
so an unknown key is an error that names it, not a silently ignored typo.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "c_attn", "c_proj", "c_fc")
"""Leaf names of the modules wrapped by default: every linear of the decoder layers of the Llama
family and GPT-2. Wrapping happens once at start-up, so any later delta can target any of them."""


PROMPT_BYTES_PER_TOKEN = 16
"""Default text-prompt bound per token of ``max_model_len``: English BPE averages ~4 bytes a token and long
whitespace or symbol runs stay under 16, so a prompt past it cannot fit; 2048 tokens -> 32 KiB, which the
byte-level demo tokenizer encodes in ~60 ms (a 7.5 MB prompt took 15 s, on the event loop, before issue 15)."""
_REPLICA_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")  # a metadata value and a log field, nothing to escape


class ConfigError(ValueError):
    """A configuration value out of range; the message names the key and the value."""


@dataclass(slots=True)
class ServerConfig:
    # model
    model_path: str | None = None  # None -> the embedded default; or "demo", an HF folder, a .gguf file
    generation_config: str = "auto"  # auto: unset sampling fields take the model's generation_config.json; none
    dtype: str = "float32"  # float32 | float16 | bfloat16
    device: str = "auto"  # auto -> cuda if available else cpu
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    # delta memory (D13): a byte budget; how many deltas are resident follows from their sizes
    delta_memory_bytes: int = 0  # 0 -> delta_memory_fraction of the memory free after the weights (server/memory.py)
    delta_memory_fraction: float = 0.0  # 0 -> the device default: 0.10 on CUDA, 0.25 (at most 4 GiB) on the CPU
    max_rank: int = 256  # LoRA rank limit checked at upload; costs nothing until such a delta is resident
    max_bottleneck: int = 256  # bottleneck adapter width limit, likewise
    max_token_rows: int = 64  # trainable-token rows per module of one delta (a limit, not a storage size)
    max_merge_parts: int = 8  # deltas one GenerateRequest.merge may name (the merged rank is their sum)
    merge_cache_bytes: int = 256 << 20  # merged deltas kept built in host memory (LRU by bytes; rebuilt on a miss)
    # engine budgets (D6)
    max_batch_tokens: int = 512  # token budget per step (prefill chunks + decode tokens)
    max_running: int = 64  # sequences in the running batch
    max_waiting: int = 1024  # bounded waiting queue; past it, RESOURCE_EXHAUSTED
    max_model_len: int = 0  # prompt + generated tokens per sequence; 0 -> the model's limit, capped by the KV cache
    max_prompt_bytes: int = 0  # UTF-8 bytes of a text prompt, checked before tokenizing; 0 -> 16 per max_model_len token
    kv_block_size: int = 16  # tokens per KV block
    kv_blocks: int = 0  # > 0: exactly this many blocks; 0 -> sized by kv_memory_bytes
    kv_memory_bytes: int = 0  # 0 -> kv_memory_fraction of the memory free after the weights
    kv_memory_fraction: float = 0.0  # 0 -> the device default: 0.60 on CUDA; 1 GiB (at most 0.25) on the CPU
    prefix_caching: bool = True  # reuse full KV blocks across requests with the same tokens and delta (D14)
    torch_threads: int = 0  # intra-op CPU threads of the process; 0 -> torch's default, at most its CPUs less one
    cuda_graphs: bool = False  # replay pure decode steps from CUDA graphs captured per batch bucket (CUDA only)
    # storage (D7, D12)
    data_dir: str = "./.deltaserve"
    host_cache_bytes: int = 2 << 30  # host-memory tier budget (LRU by bytes)
    max_upload_bytes: int = 512 << 20  # one upload
    max_archive_bytes: int = 1 << 30  # what one uploaded archive may expand to on disk, whatever its size
    max_archive_ratio: float = 8.0  # ... and per byte of the archive (fp32 weights compress ~1.1x, zip bombs ~1000x)
    max_uploads: int = 4  # uploads in progress at once (spool + conversion: disk, memory and a thread each)
    max_uploads_per_tenant: int = 2  # ... of one tenant; past either, RESOURCE_EXHAUSTED with a retry hint
    catalogue: str = ""  # "" -> SQLite in data_dir; or postgresql://user:pass@host:port/db (replicas share it)
    blobs: str = ""  # "" -> files under data_dir; or s3://bucket/prefix (endpoint, region, keys: AWS_* env)
    blob_cache_bytes: int = 8 << 30  # with s3:// blobs: this replica's disk cache of fetched blobs (data_dir)
    replica_id: str = ""  # "" -> the host name; sent back in x-deltaserve-replica on every call
    # network
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"
    openai_listen: str = "127.0.0.1:8000"  # the OpenAI-compatible HTTP front; "" turns it off
    grace_seconds: float = 10.0  # SIGTERM: in-flight requests get this long to finish
    health_grace_seconds: float = 5.0  # SIGTERM: Health says NOT_SERVING this long before the listener closes
    # tenancy defaults (D10), per tenant unless set on the tenant
    default_max_deltas: int = 100
    default_max_delta_bytes: int = 4 << 30
    default_requests_per_minute: int = 600
    default_tokens_per_minute: int = 600_000
    default_max_concurrent: int = 32
    log_level: str = "info"  # info: start-up lines, one line per request and per upload

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, str)):
            self.target_modules = tuple([self.target_modules] if isinstance(self.target_modules, str)
                                        else self.target_modules)
        checks = {
            "max_rank": (1, 16384), "max_bottleneck": (1, 16384), "delta_memory_bytes": (0, 1 << 50),
            "kv_memory_bytes": (0, 1 << 50), "max_token_rows": (1, 65536), "max_merge_parts": (1, 16),
            "merge_cache_bytes": (0, 1 << 40),
            "max_batch_tokens": (1, 1 << 20), "max_running": (1, 1 << 16), "max_waiting": (1, 1 << 20),
            "max_model_len": (0, 1 << 20), "kv_block_size": (1, 1024), "kv_blocks": (0, 1 << 24),
            "max_upload_bytes": (1, 1 << 40), "default_max_deltas": (0, 1 << 30), "torch_threads": (0, 1024),
            "max_prompt_bytes": (0, 1 << 30), "max_archive_bytes": (1, 1 << 42), "max_uploads": (1, 4096),
            "max_uploads_per_tenant": (1, 4096), "blob_cache_bytes": (0, 1 << 50),
        }
        for key, (lo, hi) in checks.items():
            value = getattr(self, key)
            if not isinstance(value, int) or not (lo <= value <= hi):
                raise ConfigError(f"{key} must be an integer in [{lo}, {hi}], got {value!r}")
        for key in ("delta_memory_fraction", "kv_memory_fraction"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(f"{key} must be a number in [0, 1), got {value!r}")
        if self.delta_memory_fraction + self.kv_memory_fraction >= 1.0:
            raise ConfigError(f"delta_memory_fraction ({self.delta_memory_fraction}) + kv_memory_fraction "
                              f"({self.kv_memory_fraction}) must stay below 1: activations need the rest")
        for key in ("prefix_caching", "cuda_graphs"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.cuda_graphs:
            self._check_cuda_graphs()
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
        if self.max_batch_tokens < self.max_running:
            raise ConfigError(f"max_batch_tokens ({self.max_batch_tokens}) must be >= max_running "
                              f"({self.max_running}): every running sequence needs a decode token per step")
        if 0 < self.max_model_len < 8:
            raise ConfigError(f"max_model_len must be 0 (the model's limit) or >= 8, got {self.max_model_len}")
        if self.generation_config not in ("auto", "none"):
            raise ConfigError(f"generation_config must be auto or none, got {self.generation_config!r}")
        for key in ("listen", "metrics_listen", "openai_listen"):
            value = getattr(self, key)
            if key == "openai_listen" and value == "":
                continue  # the HTTP front is off
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit() or not (0 <= int(port) <= 65535):
                raise ConfigError(f"{key} must be HOST:PORT, got {value!r}")
        for key in ("grace_seconds", "health_grace_seconds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"{key} must be a number >= 0, got {value!r}")
        if isinstance(self.max_archive_ratio, bool) or not isinstance(self.max_archive_ratio, (int, float)) or \
                not 1 <= self.max_archive_ratio <= 1e6:
            raise ConfigError(f"max_archive_ratio must be a number in [1, 1e6], got {self.max_archive_ratio!r}")
        if not isinstance(self.catalogue, str) or (
                self.catalogue and not self.catalogue.startswith(("postgresql://", "postgres://", "postgresql+",
                                                                  "sqlite:///"))):
            shown = self.catalogue.split("@")[-1] if isinstance(self.catalogue, str) else self.catalogue
            raise ConfigError(f"catalogue must be empty (SQLite in data_dir), sqlite:///PATH or "
                              f"postgresql://USER:PASSWORD@HOST:PORT/DB, got {shown!r}")
        if not isinstance(self.blobs, str) or (self.blobs and not self.blobs.startswith("s3://")):
            raise ConfigError(f"blobs must be empty (files in data_dir) or s3://BUCKET/PREFIX, got {self.blobs!r}")
        if not isinstance(self.replica_id, str) or not _REPLICA_ID_RE.fullmatch(self.replica_id or "x"):
            raise ConfigError(f"replica_id must be 1-128 characters of letters, digits, '.', '_' or '-', "
                              f"got {self.replica_id!r}")

    def _check_cuda_graphs(self) -> None:
        """CUDA graphs capture CUDA work only: a CPU device (named, or ``auto`` without CUDA) is refused."""
        device = self.device.strip().lower()
        if device == "auto":
            import torch  # only when the switch is on: the config module stays import-light

            if not torch.cuda.is_available():
                raise ConfigError("cuda_graphs needs a CUDA device, but device 'auto' resolves to cpu here "
                                  "(no CUDA device); turn cuda_graphs off")
        elif not (device == "cuda" or device.startswith("cuda:")):
            raise ConfigError(f"cuda_graphs needs a CUDA device, got device {self.device!r}; turn cuda_graphs off")

    @property
    def prompt_bytes_limit(self) -> int:
        """UTF-8 bytes a text prompt (or a chat's messages) may have: max_prompt_bytes, or 16 per token of the
        resolved max_model_len (a token is rarely more than 16 bytes of text; the check is before tokenizing)."""
        return self.max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * self.max_model_len

    @classmethod
    def from_dict(cls, values: dict) -> "ServerConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "ServerConfig":
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
        try:
            if p.suffix == ".toml":
                import tomllib

                values = tomllib.loads(text)
            else:
                values = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"config file {p} is not valid {'TOML' if p.suffix == '.toml' else 'JSON'}: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {p} must hold a table/object at the top level")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(values)
