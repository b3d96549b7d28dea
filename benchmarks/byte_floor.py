"""The byte floor of a point's delta work (issue 17): the bytes the LoRA op must move, the machine's copy
bandwidth measured in the same run, and achieved time / the time those bytes take at that bandwidth
(``bench_kernels.py``'s ``*_floor`` points, ``replay_serving.py``'s decode floor)."""
from __future__ import annotations

import torch

from benchmarks.common import time_many


def bytes_lora(pt) -> int:
    """HBM traffic of the Triton LoRA op: x rows and y rows (read+write) once, each active slot's A/B rows."""
    elt = pt.x.element_size()
    n_tok = pt.meta.num_active_tokens
    r_total = sum(pt.ranks_host[s] for s in pt.meta.active_slots_host)
    n_in, n_out = pt.x.shape[1], pt.y.shape[1]
    return elt * (n_tok * n_in + 2 * n_tok * n_out + r_total * (n_in + n_out))


COPY_BYTES = 256 << 20  # per side: far above any L2/L3 here (EPYC L3 32 MB per CCX; H200 L2 60 MB)


def copy_bandwidth(res, dev, timing: dict | None = None) -> float:
    """GB/s of a large tensor copy on this device (bytes read + bytes written, per STREAM "copy"), timed with
    ``timing`` (``time_many``'s repeats and clock) and samples of at least 50 ms."""
    src = torch.empty(COPY_BYTES // 4, dtype=torch.float32, device=dev).fill_(1.0)  # [64M]
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    t = time_many({"copy": lambda: dst.copy_(src)}, device=dev, **{**(timing or {}), "min_sample_s": 0.05})["copy"]
    gbs = 2 * COPY_BYTES / (t["ms"] * 1e-3) / 1e9
    res.write({"point": "copy_bandwidth", "bytes_each_way": COPY_BYTES, "ms": t["ms"], "copy_gbs": gbs})
    print(f"copy bandwidth: {gbs:.1f} GB/s ({2 * COPY_BYTES >> 20} MB moved in {t['ms']:.2f} ms)", flush=True)
    return gbs


def with_floor(res, row: dict, pt, op_key: str, gbs: float) -> dict:
    """Add the byte floor of the point's delta work at ``gbs`` and achieved/floor to ``row`` (and a JSON line)."""
    nbytes = bytes_lora(pt)
    floor_ms = nbytes / (gbs * 1e9) * 1e3
    row.update(bytes=nbytes, floor_ms=floor_ms, floor_ratio=row[f"{op_key}_ms"] / floor_ms)
    res.write({"point": f"{row['point']}_floor", "bytes": nbytes, "copy_gbs": gbs, "floor_ms": floor_ms,
               f"{op_key}_ms": row[f"{op_key}_ms"], "floor_ratio": row["floor_ratio"]})
    print(f"  {row['point']}: {nbytes / 1e6:.2f} MB of delta traffic, floor {floor_ms:.4f} ms at {gbs:.1f} GB/s, "
          f"achieved {row[f'{op_key}_ms']:.4f} ms = x{row['floor_ratio']:.2f} of the floor", flush=True)
    return row
