"""The canonical in-memory delta: what every importer produces and every consumer reads.

A delta is a set of per-module terms keyed by the *served* model's module path (the dotted
``named_modules()`` name inside the ``*ForCausalLM`` object, e.g. ``model.layers.0.self_attn.q_proj``
or ``transformer.h.1.mlp.c_proj``). Importers (``delta_store/formats/``) resolve every
library-specific rule before building one (``docs/DELTAS.md`` records each library's rules):

* LoRA scale is already ``alpha/r`` or ``alpha/sqrt(r)`` per module (rank/alpha patterns, rsLoRA,
  AdapterHub's pre-1.1 rule); a ``lora_B`` bias is already multiplied by that scale and folded
  into :attr:`ModuleDelta.bias`.
* Biases are *additive deltas*: absolute trained biases (PEFT ``bias="all"/"lora_only"``,
  OpenDelta BitFit) have had the base bias subtracted.
* Conv1D targets use the same ``A [r, in]`` / ``B [out, r]`` orientation as ``nn.Linear``.
* Kinds that are exactly another kind once expanded arrive expanded: VeRA as LoRA
  (``A' = diag(d) A``, ``B' = B diag(b)``), Compacter / low-rank adapters as bottleneck adapters
  (their Kronecker or rank-1 products multiplied out), OpenDelta parallel adapters as adapters
  reading ``"normed"``.

Semantics of one module with every term present (tokens of this delta only)::

    x_in = x * in_scale                      # (IA)3 on the input (PEFT feed-forward modules)
    y    = base(x_in) * out_scale            # (IA)3 on the output (bias scaled too)
    y   += lora.scale * (x @ A.T) @ B.T      # LoRA
    y    = g * (y - b0) + b0                 # DoRA (only with lora): the scale g multiplies the weight
                                             #   path, not the base bias b0; g = dora_magnitude /
                                             #   ||W + lora.scale * B @ A|| (row norms of the [out, in]
                                             #   weight, computed where W lives: dora.py)
    y   += bias                              # BitFit / BEFT / lora_B bias / bias="all" deltas
    y   += adapter(src)                      # bottleneck adapter, last, reading `src`:
                                             #   "output":   src = y          (Houlsby, OpenDelta)
                                             #   "output+residual": src = h + y (Pfeiffer)
                                             #   "residual": src = h          (parallel)
                                             #   "normed":   src = norm(h), the sub-block's input
                                             #               (OpenDelta parallel adapter)

where ``h`` is the residual stream entering the sub-block whose output this module produces
(the input of that sub-block's pre-norm). Norm modules (GPT-2 ``ln_1``/``ln_2``/``ln_f``) only
carry ``bias``. The input embedding and the output head carry only ``rows`` (trainable tokens):
``rows.values[j]`` *replaces* row ``rows.index[j]`` of the module's ``[vocab, hidden]`` weight, so a
token id in ``rows.index`` embeds to its new row and, on the head, its logit is ``h . values[j]``.

A delta may also carry a :class:`~delta_store.prompt.PromptPart` (prompt tuning, P-tuning, prefix
tuning): virtual tokens in front of every request, served as a shared KV prefix. It combines freely
with the module terms above (AdapterHub MAM = prefix + parallel adapter): both apply in one forward,
and an embeddings-form prompt runs through the model with the module terms active.

This module knows nothing of devices or slots: tensors here are CPU, contiguous, and of the
dtype they were imported with (fp32 unless the file said otherwise; ``rows.index`` is int64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import DeltaError
from .prompt import PromptPart

ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")
"""Bottleneck activations: relu, exact erf GELU, tanh-approximate GELU (``gelu_new``), SiLU/swish."""

ADAPTER_SOURCES = ("output", "output+residual", "residual", "normed")
"""Which tensor a bottleneck adapter reads; see the module docstring."""

KINDS = ("lora", "bottleneck", "bitfit", "ia3", "dora", "tokens", "prompt", "prefix")
"""Module kinds, then the prompt part's: "prompt" (virtual input embeddings), "prefix" (finished per-layer K/V)."""


@dataclass(slots=True)
class LoraTerm:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # alpha/r (or alpha/sqrt(r)); already resolved per module

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(slots=True)
class AdapterTerm:
    down: torch.Tensor  # [m, h]
    down_bias: torch.Tensor  # [m]
    up: torch.Tensor  # [h, m]
    up_bias: torch.Tensor  # [h]
    activation: str  # one of ACTIVATIONS
    scale: float = 1.0  # multiplies the whole bottleneck output (bias included), par_bn: 4.0
    source: str = "output"  # one of ADAPTER_SOURCES

    @property
    def width(self) -> int:
        return int(self.down.shape[0])


@dataclass(slots=True)
class RowsTerm:
    """Replacement rows of an embedding table or output head (PEFT trainable tokens)."""

    index: torch.Tensor  # [n] int64, distinct token ids < vocab
    values: torch.Tensor  # [n, hidden]

    @property
    def count(self) -> int:
        return int(self.index.shape[0])


@dataclass(slots=True)
class ModuleDelta:
    lora: LoraTerm | None = None
    bias: torch.Tensor | None = None  # [out] additive
    out_scale: torch.Tensor | None = None  # [out]   (IA)3 output scaling
    in_scale: torch.Tensor | None = None  # [in]    (IA)3 input scaling
    adapter: AdapterTerm | None = None
    # DoRA magnitude [out] (PEFT use_dora=True), only beside `lora`. The column norm it is divided by needs
    # the base weight, so it is computed where the weight lives (delta_store/dora.py), never stored.
    dora_magnitude: torch.Tensor | None = None
    rows: RowsTerm | None = None

    def kinds(self) -> set[str]:
        found = set()
        if self.lora is not None:
            found.add("lora")
        if self.adapter is not None:
            found.add("bottleneck")
        if self.bias is not None:
            found.add("bitfit")
        if self.out_scale is not None or self.in_scale is not None:
            found.add("ia3")
        if self.dora_magnitude is not None:
            found.add("dora")
        if self.rows is not None:
            found.add("tokens")
        return found

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{suffix: tensor}`` view, used by the native format and digests."""
        out: dict[str, torch.Tensor] = {}
        if self.lora is not None:
            out["lora.a"], out["lora.b"] = self.lora.a, self.lora.b
        if self.bias is not None:
            out["bias"] = self.bias
        if self.out_scale is not None:
            out["out_scale"] = self.out_scale
        if self.in_scale is not None:
            out["in_scale"] = self.in_scale
        if self.adapter is not None:
            ad = self.adapter
            out["adapter.down"], out["adapter.down_bias"] = ad.down, ad.down_bias
            out["adapter.up"], out["adapter.up_bias"] = ad.up, ad.up_bias
        if self.dora_magnitude is not None:
            out["dora.magnitude"] = self.dora_magnitude
        if self.rows is not None:
            out["rows.index"], out["rows.values"] = self.rows.index, self.rows.values
        return out


@dataclass(slots=True)
class Delta:
    """A tenant's delta, canonical form. ``modules`` maps served module path -> terms."""

    modules: dict[str, ModuleDelta] = field(default_factory=dict)
    source_format: str = "native"  # peft | adapterhub | opendelta | bitfit | native
    base_fingerprint: str = ""  # of the base the delta was validated against ("" = unknown)
    description: str = ""
    prompt: PromptPart | None = None  # virtual tokens in front of every request (prompt/P/prefix tuning)

    def kinds(self) -> set[str]:
        found: set[str] = set()
        for md in self.modules.values():
            found |= md.kinds()
        if self.prompt is not None:
            found.add(self.prompt.kind)
        return found

    @property
    def num_virtual_tokens(self) -> int:
        """KV slots the prompt part puts in front of every request (0 without one)."""
        return 0 if self.prompt is None else self.prompt.num_virtual_tokens

    def _all_tensors(self):
        for md in self.modules.values():
            yield from md.tensors().values()
        if self.prompt is not None:
            yield from self.prompt.tensors().values()

    @property
    def max_rank(self) -> int:
        return max((md.lora.rank for md in self.modules.values() if md.lora is not None), default=0)

    @property
    def max_width(self) -> int:
        return max((md.adapter.width for md in self.modules.values() if md.adapter is not None), default=0)

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self._all_tensors())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._all_tensors())

    def check_finite(self) -> None:
        """Raise :class:`DeltaError` naming the first module/tensor holding NaN or Inf."""
        for path, md in self.modules.items():
            for name, t in md.tensors().items():
                if not torch.isfinite(t).all():
                    raise DeltaError(f"{path}.{name}: tensor holds NaN or Inf values")
            for name, v in (("lora.scale", md.lora.scale if md.lora else 0.0),
                            ("adapter.scale", md.adapter.scale if md.adapter else 0.0)):
                if not math.isfinite(v):
                    raise DeltaError(f"{path}.{name}: scale {v} is not finite")
        if self.prompt is not None:
            for name, t in self.prompt.tensors().items():
                if not torch.isfinite(t).all():
                    raise DeltaError(f"prompt.{name} {tuple(t.shape)}: tensor holds NaN or Inf values")

    def to(self, dtype: torch.dtype) -> "Delta":
        """A copy with every tensor cast to ``dtype`` (scales stay Python floats)."""
        def cast(t):
            return None if t is None else t.to(dtype).contiguous()

        mods = {}
        for path, md in self.modules.items():
            lora = None if md.lora is None else LoraTerm(cast(md.lora.a), cast(md.lora.b), md.lora.scale)
            ad = md.adapter
            adapter = None if ad is None else AdapterTerm(cast(ad.down), cast(ad.down_bias), cast(ad.up),
                                                          cast(ad.up_bias), ad.activation, ad.scale, ad.source)
            rows = None if md.rows is None else RowsTerm(md.rows.index, cast(md.rows.values))  # ids stay int64
            mods[path] = ModuleDelta(lora, cast(md.bias), cast(md.out_scale), cast(md.in_scale), adapter,
                                     cast(md.dora_magnitude), rows)
        prompt = None if self.prompt is None else self.prompt.to(dtype)
        return Delta(mods, self.source_format, self.base_fingerprint, self.description, prompt)
