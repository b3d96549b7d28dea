"""The CPU backend's native loops (``csrc/rows.c``): built once per machine with the system C compiler, called
through ``ctypes`` by the "native" plan (``looped.py``): LoRA, bottleneck adapters, BitFit / (IA)3 rows and DoRA's
column scale, in fp32, at decode.

Why C and not more torch ops: at decode a wrapped module's delta work is reading its slots' rows once, and the
torch plans pay ~15-20 us of dispatch per small op. Measured, one thread, 32 tokens on 32 slots of ranks 4-64
(the served mix's LoRA), rows cold: 1024 -> 1024 strided plan 794 us (7.6 GB/s) against 310 us (19.4 GB/s) here;
256 -> 256 672 against 137 us. One C call per module, no scratch views, no add back.

Built with ``$CC`` (else ``cc``/``gcc`` on PATH) ``-O3 -march=native`` into ``$DELTASERVE_NATIVE_CACHE`` (default
``~/.cache/deltaserve/native``), one file per source, flags, compiler and CPU (``-march=native`` code runs only
where it was built), written atomically; ~0.3 s the first time, a ``dlopen`` after. ``DELTASERVE_CPU_NATIVE``:
``auto`` (default: used when it builds; a failed build logs one line and the torch plans serve), ``off``, or
``on`` (a failed build is an error).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("deltaserve.kernels")

SOURCE = Path(__file__).with_name("csrc") / "rows.c"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c11", "-shared", "-fPIC")
MODES = ("auto", "on", "off")
BUILD_TIMEOUT_S = 120

_P, _I = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {
    # y, y_rs, x, x_rs, a, a_rs, b, b_rs, in, out, start, rank, scale, n_slots, n_rows, segs, n_segs, toks
    "ds_lora_f32": [_P, _I, _P, _I, _P, _I, _P, _I, _I, _I, _P, _P, _P, _I, _I, _P, _I, _P],
    # y, y_rs, u, u_rs, down, d_rs, up, up_rs, dbias, db_s, ubias, ub_rs, hid, start, width, scale, ub_row, act,
    # n_slots, n_rows, n_ub_rows, segs, n_segs, toks, h, h_cap
    "ds_bottleneck_f32": [_P, _I, _P, _I, _P, _I, _P, _I, _P, _I, _P, _I, _I, _P, _P, _P, _P, _P, _I, _I, _I,
                          _P, _I, _P, _P, _I],
    # y, y_rs, rows, rows_rs, n_cols, row, n_slots, n_rows, skip, segs, n_segs, toks, op (0 add, 1 mul)
    "ds_rows_f32": [_P, _I, _P, _I, _I, _P, _I, _I, _I, _P, _I, _P, _I],
    # y, y_rs, scale, s_rs, shift, sh_rs, n_cols, row, flag, n_slots, n_rows, segs, n_segs, toks
    "ds_affine_f32": [_P, _I, _P, _I, _P, _I, _I, _P, _P, _I, _I, _P, _I, _P],
    # y, y_rs, x, x_rs, prog, n_prog, segs, n_segs, toks (prog: records of the three above, native_step.py)
    "ds_terms_f32": [_P, _I, _P, _I, _P, _I, _P, _I, _P],
}
"""Every loop returns int64: 0, or the index + 1 of the first segment whose slot or run leaves the tables or rows
(checked before anything is written; ``ds_terms_f32``: of the first record refused)."""


class NativeUnavailable(RuntimeError):
    """The native loops cannot be built or loaded here (``DELTASERVE_CPU_NATIVE=on`` asked for them)."""


def mode() -> str:
    """``DELTASERVE_CPU_NATIVE``, checked: auto | on | off."""
    value = os.environ.get("DELTASERVE_CPU_NATIVE", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"DELTASERVE_CPU_NATIVE={value!r}: expected one of {', '.join(MODES)}")
    return value


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return shutil.which("cc") or shutil.which("gcc")


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and flags (Linux), else what platform knows."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))][:2]
        if lines:
            return "\n".join(lines)
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def cache_dir() -> Path:
    return Path(os.environ.get("DELTASERVE_NATIVE_CACHE") or Path.home() / ".cache" / "deltaserve" / "native")


def build(cc: str, out_dir: Path) -> Path:
    """The shared library for this source, flags, compiler and CPU under ``out_dir`` (compiled if absent)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu_id()]).encode())
    path = out_dir / f"rows-{digest.hexdigest()[:16]}.so"
    if path.is_file():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".rows-", suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise NativeUnavailable(f"{cc} failed on {SOURCE.name}: {done.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, path)  # atomic: a concurrent builder finds either nothing or the whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, args in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, ctypes.c_int64
    return lib


_lock = threading.Lock()
_state: dict[str, object] = {}  # "lib": the CDLL or None once decided


def library() -> ctypes.CDLL | None:
    """The loaded native loops, or None (off, or ``auto`` and no compiler or a failed build: logged once)."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" in _state:
            return _state["lib"]  # type: ignore[return-value]
        want = mode()
        lib = None
        if want != "off":
            try:
                cc = _compiler()
                if cc is None:
                    raise NativeUnavailable("no C compiler (set CC, or install gcc)")
                lib = load(build(cc, cache_dir()))
            except (NativeUnavailable, OSError, subprocess.SubprocessError) as exc:
                if want == "on":
                    raise NativeUnavailable(f"DELTASERVE_CPU_NATIVE=on: {exc}") from exc
                log.warning("native_unavailable", extra={"fields": {"reason": str(exc), "fallback": "torch_plans"}})
        _state["lib"] = lib
        return lib


mode()  # a bad value fails at import, as DELTASERVE_KERNELS does (``kernels/__init__.py``), not in a step


def available() -> bool:
    return library() is not None


def reset() -> None:
    """Forget the decision (tests that change ``DELTASERVE_CPU_NATIVE`` or the cache dir)."""
    with _lock:
        _state.clear()
