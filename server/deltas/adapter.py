"""Bottleneck adapters of a DeltaLinear: their checks, rows, pages and the per-step apply; ResidualTap.

Placements (docs/DELTAS.md §3.4, §4.3; tests/fixtures/README.md "Semantic traps"), with ``h`` the residual stream
entering the sub-block and ``y`` the sub-block output (``o_proj``/``down_proj``/GPT-2 ``c_proj``)::

    "output"           BN(y)       Houlsby double_seq_bn, OpenDelta adapter / compacter / low-rank adapter
    "output+residual"  BN(h + y)   Pfeiffer seq_bn, Compacter++
    "residual"         BN(h)       par_bn (scale 4.0)
    "normed"           BN(norm(h)) OpenDelta parallel adapter: the sub-block's input (its pre-norm's output)

and the block adds ``h + y + BN(src)``. Each slot has one source per site, but one step may mix slots of
different sources, so the layer keeps a ``width``/``scale`` field per source (0 for slots of the other
sources) and runs one ``add_bottleneck`` per source present in the step.

Storage (D13): a width-m adapter is m rows of the layer's ``adapter`` arena, each row ``down[j] | up[:, j] |
down_bias[j]`` (columns 0, out_pad and 2 out_pad), and its up bias one row of ``vec_out``.
"""
from __future__ import annotations

import torch

import kernels
from delta_store.delta import ADAPTER_SOURCES, AdapterTerm
from delta_store.errors import DeltaError, DeltaServeError


class ResidualTap:
    """Carries ``h`` (the pre-norm's input) and ``normed`` (its output), by reference, from a site's DeltaNorm
    to its output DeltaLinear.

    A plain object, not an ``nn.Module``, so it adds nothing to ``named_modules()`` or the state dict.
    """

    __slots__ = ("h", "normed", "norm_path")

    def __init__(self, norm_path: str):
        self.norm_path = norm_path
        self.h: torch.Tensor | None = None  # [num_tokens, hidden], set by the norm, cleared by the reader
        self.normed: torch.Tensor | None = None  # [num_tokens, hidden], likewise


def check(path: str, term: AdapterTerm, hidden: int, max_bottleneck: int) -> None:
    m = term.width
    expected = {"down": (m, hidden), "down_bias": (m,), "up": (hidden, m), "up_bias": (hidden,)}
    if not 1 <= m <= max_bottleneck:
        raise DeltaError(f"{path}: adapter width {m} outside [1, max_bottleneck={max_bottleneck}]")
    for name, shape in expected.items():
        found = tuple(getattr(term, name).shape)
        if found != shape:
            raise DeltaError(f"{path}: adapter.{name} expected shape {shape}, found {found}")
    if term.activation not in kernels.ACT_CODES:
        raise DeltaError(f"{path}: adapter activation {term.activation!r} not one of {sorted(kernels.ACT_CODES)}")
    if term.source not in ADAPTER_SOURCES:
        raise DeltaError(f"{path}: adapter source {term.source!r} not one of {ADAPTER_SOURCES}")


def stage(term: AdapterTerm, w_out: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Host rows: "adapter" [m, 2 w_out + 1] (down | up column | down bias), "up_bias" [1, h]."""
    m, h = term.width, term.down.shape[1]
    rows = torch.empty(m, 2 * w_out + 1, dtype=dtype)
    rows[:, :h] = term.down
    rows[:, w_out:w_out + h] = term.up.t()  # up [h, m] -> columns as rows
    rows[:, 2 * w_out] = term.down_bias
    return {"adapter": rows, "up_bias": term.up_bias.to(dtype).reshape(1, h)}


def values(term: AdapterTerm) -> dict:
    i = ADAPTER_SOURCES.index(term.source)
    return {"ad_act": kernels.ACT_CODES[term.activation], f"ad_width{i}": term.width, f"ad_scale{i}": float(term.scale),
            "ad_source": i}


def pages(rows, hidden: int, w_out: int, source: int, max_width: int) -> kernels.AdapterPages:
    """The adapters of ``source`` at one layer (``rows``: its TermRows) as the kernels read them."""
    table, f = rows.arenas["adapter"].rows, rows.fields
    return kernels.AdapterPages(table[:, :hidden], table[:, w_out:w_out + hidden], table[:, 2 * w_out],
                                rows.arenas["vec_out"].rows[:, :hidden], f.view("ad_start"), f.view("ad_up_bias_row"),
                                f.view(f"ad_width{source}"), f.view(f"ad_scale{source}"), f.view("ad_act"), max_width,
                                host={"start": f.host["ad_start"], "up_bias_row": f.host["ad_up_bias_row"],
                                      "width": f.host[f"ad_width{source}"], "scale": f.host[f"ad_scale{source}"],
                                      "act": f.host["ad_act"]})


def apply(layer, y: torch.Tensor, sources: list[int], meta, ops=None) -> None:
    """``y[t] += BN_slot(src_t)`` for every token whose slot has an adapter of one of ``sources`` here;
    ``y`` [num_tokens, h], in place; ``ops``: the step's bound ops (``kernels.step_ops``) or None."""
    # Every source reads y *before* any adapter adds to it: with several sources a copy of y is their input; one
    # source reads y itself (the op's ``u`` may be its ``y``: both backends read a row before writing it), which
    # saves a [T, h] copy per adapter site per step.
    tap = layer.tap
    y_before = y.clone() if len(sources) > 1 else y  # [num_tokens, h]
    inputs = []
    for i in sources:
        src = ADAPTER_SOURCES[i]
        if src == "output":
            inputs.append(y_before)
            continue
        h = None if tap is None else (tap.normed if src == "normed" else tap.h)
        if h is None:
            raise DeltaServeError(f"{layer.path}: adapter source {src!r} needs the residual stream, but "
                                  f"{tap.norm_path if tap else 'no pre-norm'} did not record it this step")
        inputs.append(h + y_before if src == "output+residual" else h)
    for i, u in zip(sources, inputs):
        if ops is not None:
            ops.add_bottleneck(y, u, layer.adapter_pages(i))
        else:
            kernels.add_bottleneck(y, u, layer.adapter_pages(i), meta)
