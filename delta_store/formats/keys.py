"""Map a foreign tensor key's module path onto the served model's module path.

Tools prefix module paths with whatever class they wrapped (docs/DELTAS.md §1, §6.12): PEFT writes
``base_model.model.model.layers.0.self_attn.q_proj`` for a ``LlamaForCausalLM`` but
``base_model.model.layers.0...`` for a bare ``LlamaModel``; VLM text towers add
``language_model.``. So a path is never matched by prefix. Inside the decoder layers it is
anchored on the layer index (``layers.{i}.`` / ``h.{i}.``) plus the part after it
(``self_attn.q_proj``); outside them (``transformer.ln_f``, ``lm_head``) on the longest dot-bounded
suffix that names exactly one served module.
"""
from __future__ import annotations

import re

from ..base_spec import BaseSpec, ModuleInfo
from ..errors import DeltaError

_ANCHOR_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+)$")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_of(foreign_path: str) -> int | None:
    """Layer index of a module path (its first ``layers.{i}.``-style segment), or None."""
    m = _LAYER_RE.search(foreign_path)
    return int(m.group(1)) if m else None


class KeyMapper:
    """Resolves foreign module paths against one served base. Build one per import."""

    def __init__(self, spec: BaseSpec, source: str):
        self.spec = spec
        self.source = source  # names the importer in error messages ("peft", "adapterhub", ...)
        # (layer, path after "layers.{i}.") -> module; e.g. (0, "self_attn.q_proj")
        self._in_layers: dict[tuple[int, str], ModuleInfo] = {}
        self._outside: list[ModuleInfo] = []
        for info in spec.modules.values():
            m = _ANCHOR_RE.search(info.path)
            if m is not None:
                self._in_layers[(int(m.group(1)), m.group(2))] = info
            else:
                self._outside.append(info)

    def find(self, foreign_path: str) -> ModuleInfo | None:
        """The served module a foreign module path names, or None."""
        m = _ANCHOR_RE.search(foreign_path)
        if m is not None:
            return self._in_layers.get((int(m.group(1)), m.group(2)))
        parts = foreign_path.split(".")
        for start in range(len(parts)):  # longest suffix first
            suffix = ".".join(parts[start:])
            hits = [info for info in self._outside if info.path == suffix or info.path.endswith("." + suffix)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                return None  # ambiguous; a shorter suffix would only be more ambiguous
        return None

    def module(self, foreign_path: str, *, key: str) -> ModuleInfo:
        """Like :meth:`find` but raises a :class:`DeltaError` naming the tensor key when nothing matches."""
        info = self.find(foreign_path)
        if info is not None:
            return info
        layer = layer_of(foreign_path)
        if layer is not None and layer >= self.spec.num_layers:
            raise DeltaError(f"{self.source}: tensor {key!r} names layer {layer}, but the served base has "
                             f"{self.spec.num_layers} layers")
        raise DeltaError(f"{self.source}: tensor {key!r} names module {foreign_path!r}, which the served "
                         f"{self.spec.model_type} base does not have")

    def site_module(self, layer: int, site: str, *, key: str) -> ModuleInfo:
        """The output module of residual site ``site`` ("attn" | "ffn") in decoder layer ``layer``."""
        sites = self.spec.sites()
        info = self._in_layers.get((layer, sites[site][1]))
        if info is None:
            raise DeltaError(f"{self.source}: tensor {key!r} names the {site} site of layer {layer}, but the served "
                             f"base has no module {sites[site][1]!r} there ({self.spec.num_layers} layers)")
        return info
