"""wrap_model: turn a Hugging Face causal LM into a delta-aware one, in place, once at start-up (D1, D2).

Which modules are wrapped comes from the server's target list (``ServerConfig.target_modules``,
default every linear of the decoder layers), plus what residual adapters and BitFit need whatever
the list says: each residual site's output module and pre-norm (``SITES`` in
``delta_store/base_spec.py``), every LayerNorm (GPT-2 ``ln_1``/``ln_2``/``ln_f``), and the input embedding
and output head (trainable tokens: ``token_rows.py``). So any delta that validates against the base
loads later without re-wrapping. The model's ``forward`` is never edited; the wrappers keep the base
modules, so GPT-2's tied ``lm_head`` keeps sharing ``wte``.

Usage (the model runner's step)::

    dm = wrap_model(model, targets=config.target_modules, max_slots=32, max_rank=64, max_bottleneck=256)
    dm.set_delta(3, delta)                       # load path: validate, copy into every pool
    dm.batch.prepare_sequences([3, -1], [5, 1], head_rows=[4, 5])  # once per step; the rows logits_to_keep keeps
    logits = dm.model(input_ids=...).logits       # the unchanged HF forward

A delta's prompt part (prompt / prefix tuning) is not a layer term: ``set_delta`` keeps it per slot, on the
device in the model's dtype, and the engine reads it (``prompt_of``) to compute the delta's shared KV
prefix (``server/engine/prefix_cache.py``); the module terms of the same delta apply as usual.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from delta_store.base_spec import BaseSpec
from delta_store.delta import Delta
from delta_store.errors import DeltaError, InvalidArgument
from delta_store.prompt import PromptPart
from delta_store.validate import Limits, validate

from ..config import DEFAULT_TARGETS
from .adapter import ResidualTap
from .batch import DeltaBatch
from .linear import DeltaLinear
from .norm import DeltaNorm
from .token_rows import DeltaEmbedding, DeltaHead


@dataclass(eq=False)
class DeltaModel:
    model: torch.nn.Module  # the same HF model object, target modules replaced in place
    spec: BaseSpec  # of the unwrapped base
    batch: DeltaBatch  # shared by every wrapper
    layers: dict[str, DeltaLinear | DeltaNorm | DeltaEmbedding | DeltaHead] = field(default_factory=dict)
    max_slots: int = 32
    max_rank: int = 64
    max_bottleneck: int = 256
    max_token_rows: int = 64
    prompts: dict[int, PromptPart] = field(default_factory=dict)  # slot -> prompt part (device, model dtype)
    layered: set[int] = field(default_factory=set)  # slots whose delta has module terms (not a prompt part alone)

    def check(self, delta: Delta) -> None:
        """Raise DeltaError/BaseMismatch for a delta these pools cannot serve; changes nothing."""
        # validate() checks the delta against the base (paths, shapes, dtypes, fingerprint, finiteness);
        # the wrappers then check what only the pools know (wrapped or not, sites, widths).
        validate(delta, self.spec, Limits(max_rank=self.max_rank, max_bottleneck=self.max_bottleneck,
                                          max_token_rows=self.max_token_rows))
        for path, md in delta.modules.items():
            layer = self.layers.get(path)
            if layer is None:
                raise DeltaError(self._unwrapped_reason(path))
            layer.check(md)

    def set_delta(self, slot: int, delta: Delta, *, checked: bool = False) -> None:
        """Validate ``delta`` and copy it into ``slot`` of every pool; modules it does not name get cleared.

        All checks run before the first copy, so a refused delta leaves the slot as it was.
        ``checked=True`` skips the checks for a delta that already passed :meth:`check` (the slot
        manager checks on its loader thread so the step loop only copies).
        """
        self._check_slot(slot)
        if not checked:
            self.check(delta)
        try:
            for path, layer in self.layers.items():
                md = delta.modules.get(path)
                if md is None:
                    layer.clear(slot)
                else:
                    layer.set_delta(slot, md)
        except BaseException:  # e.g. a DoRA norm of 0, found only against the base weight: no half-set slot
            self.clear(slot)
            raise
        self.prompts.pop(slot, None)
        self.layered.discard(slot)
        if delta.modules:
            self.layered.add(slot)
        if delta.prompt is not None:
            weight = next(self.model.parameters())
            pp = delta.prompt

            def dev(t):
                return None if t is None else t.to(weight.device, weight.dtype).contiguous()

            self.prompts[slot] = PromptPart(dev(pp.embeddings), dev(pp.keys), dev(pp.values), pp.positions)

    def clear(self, slot: int) -> None:
        self._check_slot(slot)
        for layer in self.layers.values():
            layer.clear(slot)
        self.prompts.pop(slot, None)
        self.layered.discard(slot)

    def prompt_of(self, slot: int) -> PromptPart | None:
        """The prompt part of the delta in ``slot`` (None: no delta there, or one without a prompt part)."""
        return self.prompts.get(slot)

    def layer_slot(self, slot: int) -> int:
        """The slot id the wrapped layers should see for ``slot``: -1 when its delta is a prompt part alone, so
        those tokens take the layers' no-delta path (a step of prompt-only deltas runs as fast as the base)."""
        return slot if slot in self.layered else -1

    def pool_bytes(self) -> int:
        """Device bytes held by every slot pool (LoRA/bias/(IA)3 from wrap time, adapters once allocated) and
        the resident prompt parts (their K/V also occupy KV blocks while computed: counted by the KV pool)."""
        prompts = sum(t.numel() * t.element_size() for pp in self.prompts.values() for t in pp.tensors().values())
        return sum(layer.nbytes() for layer in self.layers.values()) + prompts

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.max_slots:
            raise InvalidArgument(f"delta slot {slot!r} out of range [0, {self.max_slots})")

    def _unwrapped_reason(self, path: str) -> str:
        info = self.spec.modules.get(path)
        if info is None:
            return f"{path}: no such module in the served {self.spec.model_type} model"
        return (f"{path}: {info.kind} module is not wrapped for deltas (not in the server's target modules; "
                f"wrapped leaves: {', '.join(sorted({p.rsplit('.', 1)[-1] for p in self.layers}))})")


def _matches(path: str, targets: Iterable[str]) -> bool:
    # PEFT list rule (docs/DELTAS.md §2.3): exact path, or a suffix at a dot boundary ("c_proj", "mlp.c_proj").
    return any(path == t or path.endswith("." + t) for t in targets)


def _replace_submodule(model: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def wrap_model(model: torch.nn.Module, targets: Iterable[str] = DEFAULT_TARGETS, max_slots: int = 32,
               max_rank: int = 64, max_bottleneck: int = 256, *, max_tokens: int = 4096,
               max_token_rows: int = 64) -> DeltaModel:
    """Replace the target modules of ``model`` by delta-aware wrappers sharing one DeltaBatch; returns a DeltaModel.

    Pools for LoRA (``[S, R, in]`` + ``[S, out, R]``), bias and (IA)3 are allocated here (see
    ``DeltaLinear`` for the bytes); bottleneck, DoRA and token-row pools on the first delta that needs them.
    """
    targets = tuple(targets)
    if not targets:
        raise InvalidArgument("wrap_model: empty target module list")
    for name, value, lo in (("max_slots", max_slots, 1), ("max_rank", max_rank, 1),
                            ("max_bottleneck", max_bottleneck, 1), ("max_tokens", max_tokens, 1),
                            ("max_token_rows", max_token_rows, 1)):
        if not isinstance(value, int) or value < lo:
            raise InvalidArgument(f"wrap_model: {name} must be an integer >= {lo}, got {value!r}")
    if any(isinstance(m, (DeltaLinear, DeltaNorm, DeltaEmbedding, DeltaHead)) for m in model.modules()):
        raise InvalidArgument("wrap_model: model is already wrapped")

    spec = BaseSpec.from_model(model)
    weight = next(model.parameters())
    batch = DeltaBatch(max_slots, weight.device, max_tokens)
    dm = DeltaModel(model, spec, batch, max_slots=max_slots, max_rank=max_rank, max_bottleneck=max_bottleneck,
                    max_token_rows=max_token_rows)

    # Residual sites: pre-norm path -> output-module path, per decoder layer.
    site_of_norm: dict[str, str] = {}
    for layer in range(spec.num_layers):
        for norm_leaf, out_leaf in spec.sites().values():
            norm, out = spec.find(layer, norm_leaf), spec.find(layer, out_leaf)
            if norm is not None and out is not None:
                site_of_norm[norm.path] = out.path
    site_outputs = set(site_of_norm.values())

    taps: dict[str, ResidualTap] = {}
    for path, info in spec.modules.items():
        module = model.get_submodule(path)
        if info.kind in ("linear", "conv1d"):
            if info.layer is None or not (_matches(path, targets) or path in site_outputs):
                continue
            dm.layers[path] = DeltaLinear.from_layer(module, batch, path=path, max_slots=max_slots, max_rank=max_rank,
                                                     max_bottleneck=max_bottleneck)
        elif path in site_of_norm or info.kind == "layernorm":
            tap = None
            if path in site_of_norm:
                tap = taps[site_of_norm[path]] = ResidualTap(path)
            dm.layers[path] = DeltaNorm.from_layer(module, batch, path=path, max_slots=max_slots, tap=tap)
    for out_path, tap in taps.items():
        dm.layers[out_path].make_site(tap)
    rows = dict(batch=batch, max_slots=max_slots, max_rows=max_token_rows)
    if isinstance(model.get_submodule(spec.input_embedding) if spec.input_embedding else None, torch.nn.Embedding):
        dm.layers[spec.input_embedding] = DeltaEmbedding.from_layer(model.get_submodule(spec.input_embedding),
                                                                    path=spec.input_embedding, **rows)
    head = model.get_submodule(spec.output_head) if spec.output_head else None
    if type(head) is torch.nn.Linear:
        dm.layers[spec.output_head] = DeltaHead.from_layer(head, path=spec.output_head, **rows)
    for path, wrapper in dm.layers.items():
        _replace_submodule(model, path, wrapper)
    return dm
