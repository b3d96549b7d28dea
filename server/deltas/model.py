"""wrap_model: turn a Hugging Face causal LM into a delta-aware one, in place, once at start-up (D1, D13).

Which modules are wrapped comes from the server's target list (``ServerConfig.target_modules``,
default every linear of the decoder layers), plus what residual adapters and BitFit need whatever
the list says: each residual site's output module and pre-norm (``SITES`` in
``delta_store/base_spec.py``), every LayerNorm (GPT-2 ``ln_1``/``ln_2``/``ln_f``), and the input embedding
and output head (trainable tokens: ``token_rows.py``). So any delta that validates against the base
loads later without re-wrapping. The model's ``forward`` is never edited; the wrappers keep the base
modules, so GPT-2's tied ``lm_head`` keeps sharing ``wte``. Wrapping allocates no delta memory: every
layer's arenas and slot table appear with its first term.

Usage (the residency owner, ``residency.py``, does the installs; tests and benchmarks may call set_delta)::

    dm = wrap_model(model, targets=config.target_modules, max_slots=64, max_rank=64, max_bottleneck=256)
    staged = dm.stage(delta)                     # a load thread: validate, convert to rows on the host
    dm.ensure_slots(4); dm.install([(3, staged)], room=budget - dm.capacity_bytes())   # the step loop
    dm.batch.prepare_sequences([3, -1], [5, 1], head_rows=[4, 5])  # once per step; the rows logits_to_keep keeps
    logits = dm.model(input_ids=...).logits       # the unchanged HF forward

A delta's prompt part (prompt / prefix tuning) is not a layer term: ``install`` keeps it whole per slot, on the
device in the model's dtype (its bytes are in the delta's footprint, so the residency budget counts them), and
the engine reads it (``prompt_of``) to compute the delta's shared KV prefix (``server/engine/prefix_cache.py``);
the module terms of the same delta apply as usual.
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
from .pages import NoRoom
from .shared_input import SharedInput, find_groups
from .terms import Staged
from .token_rows import DeltaEmbedding, DeltaHead

SLOT_GROWTH = 1.25
"""The per-slot tables grow by this factor (at least one slot) when the owner needs a new slot number."""


@dataclass(eq=False)
class StagedDelta:
    """A delta converted for this model's layers on the host: what an install copies."""

    modules: dict[str, Staged]  # served path -> rows per term
    footprint: int  # device bytes once placed (``DeltaModel.footprint``)
    real_bytes: int  # the delta's own bytes in the served dtype
    prompt: PromptPart | None = None  # on the host in the model's dtype; its tensors are its device bytes


@dataclass(eq=False)
class DeltaModel:
    model: torch.nn.Module  # the same HF model object, target modules replaced in place
    spec: BaseSpec  # of the unwrapped base
    batch: DeltaBatch  # shared by every wrapper
    layers: dict[str, DeltaLinear | DeltaNorm | DeltaEmbedding | DeltaHead] = field(default_factory=dict)
    max_slots: int = 32  # most distinct deltas in one step (sizes the step's index buffers)
    max_rank: int = 64  # validation limits, not storage sizes
    max_bottleneck: int = 256
    max_token_rows: int = 64
    slot_capacity: int = 0  # slot numbers [0, slot_capacity) have table entries in every layer with terms
    prompts: dict[int, PromptPart] = field(default_factory=dict)  # slot -> prompt part (device, model dtype)
    layered: set[int] = field(default_factory=set)  # slots whose delta has module terms (not a prompt part alone)
    _plan: tuple | None = field(default=None, repr=False)  # static_plan's cache; None after any write
    groups: list[SharedInput] = field(default_factory=list)  # siblings sharing one LoRA shrink (shared_input.py)

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def element_size(self) -> int:
        return next(self.model.parameters()).element_size()

    def footprint(self, delta: Delta) -> int:
        """Device bytes ``delta``'s cells hold once resident: its bucketed rows and the neutral rows of the arenas
        it uses (shapes only; the upload check and the owner's budget use it, with ``slot_bytes``)."""
        rows = {path: self.layers[path].term_rows(md) for path, md in delta.modules.items() if path in self.layers}
        for group in self.groups:  # members' LoRA rows as one stack on the leader
            group.term_rows(rows)
        total = sum(self.layers[path].rows.footprint(tr) for path, tr in rows.items())
        if delta.prompt is not None:  # kept whole, in the model's dtype: exactly its real bytes
            total += sum(t.numel() for t in delta.prompt.tensors().values()) * self.element_size
        return total

    @property
    def model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @staticmethod
    def prompt_bytes(part: PromptPart | None) -> int:
        """Device bytes of a prompt part held beside the layers (its K/V also occupy KV blocks once computed:
        the KV pool counts those)."""
        return 0 if part is None else sum(t.numel() * t.element_size() for t in part.tensors().values())

    def real_bytes(self, delta: Delta) -> int:
        """The delta's own bytes in the served dtype (what 1.25x is measured against)."""
        return delta.num_parameters() * self.element_size

    def capacity_bytes(self) -> int:
        """Device bytes of every arena and slot table (live cells, free cells and neutral rows) and the resident
        prompt parts."""
        return (sum(layer.rows.capacity_bytes for layer in self.layers.values())
                + sum(self.prompt_bytes(pp) for pp in self.prompts.values()))

    def held_bytes(self) -> int:
        """Device bytes of the live cells, the slot tables and the resident prompt parts."""
        return (sum(layer.rows.held_bytes for layer in self.layers.values())
                + sum(self.prompt_bytes(pp) for pp in self.prompts.values()))

    @property
    def slot_bytes(self) -> int:
        """Bytes one slot number costs in the per-slot tables if every layer had one (an upper bound: a layer
        gets its table with its first term): the owner budgets the tables by this."""
        return sum(layer.rows.fields.bytes_for(1) for layer in self.layers.values())

    # ---- load path (host only) -----------------------------------------------------------------
    def check(self, delta: Delta) -> None:
        """Raise DeltaError/BaseMismatch for a delta these layers cannot serve; changes nothing."""
        # validate() checks the delta against the base (paths, shapes, dtypes, fingerprint, finiteness);
        # the wrappers then check what only they know (wrapped or not, sites, widths).
        validate(delta, self.spec, Limits(max_rank=self.max_rank, max_bottleneck=self.max_bottleneck,
                                          max_token_rows=self.max_token_rows))
        for path, md in delta.modules.items():
            layer = self.layers.get(path)
            if layer is None:
                raise DeltaError(self._unwrapped_reason(path))
            layer.check(md)

    def stage(self, delta: Delta, *, checked: bool = False, pin: bool = False) -> StagedDelta:
        """Validate (unless ``checked``) and convert ``delta`` to host rows per layer; touches no device memory,
        so load threads run it while the step loop serves."""
        if not checked:
            self.check(delta)
        modules = {path: self.layers[path].stage(md, pin=pin) for path, md in delta.modules.items()}
        for group in self.groups:
            group.restage(modules)
        prompt = None
        if delta.prompt is not None:
            dt, pp = self.model_dtype, delta.prompt

            def host(x):
                if x is None:
                    return None
                x = x.to(dt).contiguous()
                return x.pin_memory() if pin else x

            prompt = PromptPart(host(pp.embeddings), host(pp.keys), host(pp.values), pp.positions)
        return StagedDelta(modules, self.footprint(delta), self.real_bytes(delta), prompt)

    # ---- the step loop's writes (between forwards) ---------------------------------------------
    @torch.inference_mode()
    def ensure_slots(self, n: int) -> None:
        """Slot numbers [0, n) usable; the tables grow by SLOT_GROWTH."""
        if n <= self.slot_capacity:
            return
        capacity = max(n, int(self.slot_capacity * SLOT_GROWTH) + 1)
        for layer in self.layers.values():
            if layer.rows.fields.allocated:
                layer.rows.ensure(capacity)
        self.slot_capacity = capacity
        self.batch.slot_capacity = capacity
        self._plan = None

    def next_slot_capacity(self, n: int) -> int:
        return self.slot_capacity if n <= self.slot_capacity else max(n, int(self.slot_capacity * SLOT_GROWTH) + 1)

    @torch.inference_mode()
    def install(self, items: list[tuple[int, StagedDelta]], room: int) -> int:
        """Place staged deltas into their slots (``ensure_slots`` first), growing arenas by at most ``room``
        bytes in all; NoRoom (nothing changed) if the exact growth does not fit. Returns the bytes added."""
        self._plan = None
        demands = self._demands(items)
        growth = {path: layer.rows.growth_bytes(demand) for path, (layer, demand) in demands.items()}
        exact = sum(growth.values())
        if exact > room:
            raise NoRoom(f"installing {len(items)} delta(s) needs {exact} more bytes of arenas, {room} left")
        spare, added = room - exact, 0
        for path, (layer, demand) in demands.items():
            if growth[path]:
                share = growth[path] + spare * growth[path] // max(exact, 1)
                added += layer.rows.grow(demand, share)
        try:
            for slot, staged in items:
                if not 0 <= slot < self.slot_capacity:
                    raise InvalidArgument(f"delta slot {slot!r} out of range [0, {self.slot_capacity}): "
                                          "ensure_slots first")
                for path, layer in self.layers.items():
                    st = staged.modules.get(path)
                    if st is None:
                        layer.clear(slot)
                    else:
                        layer.place(slot, st, self.slot_capacity)
                self._place_prompt(slot, staged)
        finally:  # the arenas may have moved even if a placement failed: members follow their stacks
            for group in self.groups:
                group.sync()
        return added

    def _place_prompt(self, slot: int, staged: StagedDelta) -> None:
        self.prompts.pop(slot, None)
        self.layered.discard(slot)
        if staged.modules:
            self.layered.add(slot)
        pp = staged.prompt
        if pp is not None:
            dev = next(self.model.parameters()).device

            def to_dev(t):
                return None if t is None else t.to(dev, non_blocking=True)

            self.prompts[slot] = PromptPart(to_dev(pp.embeddings), to_dev(pp.keys), to_dev(pp.values), pp.positions)

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        """Free ``slot``'s cells in every layer (no zeroing: nothing reads them again)."""
        self._plan = None
        for layer in self.layers.values():
            layer.clear(slot)
        for group in self.groups:
            group.sync()
        self.prompts.pop(slot, None)
        self.layered.discard(slot)

    def prompt_of(self, slot: int) -> PromptPart | None:
        """The prompt part of the delta in ``slot`` (None: no delta there, or one without a prompt part)."""
        return self.prompts.get(slot)

    def layer_slot(self, slot: int) -> int:
        """The slot id the wrapped layers should see for ``slot``: -1 when its delta is a prompt part alone, so
        those tokens take the layers' no-delta path (a step of prompt-only deltas runs as fast as the base)."""
        return slot if slot in self.layered else -1

    @torch.inference_mode()
    def compact(self) -> int:
        """Give every free cell back (arenas shrink to their live cells); returns the bytes freed."""
        self._plan = None
        freed = sum(layer.rows.compact() for layer in self.layers.values())
        for group in self.groups:
            group.sync()
        return freed

    def static_plan(self) -> tuple:
        """Every wrapped layer's graph-mode plan (``DeltaLinear.static_plan``): the term kinds each holds, their
        bounds and storage versions. A CUDA graph captured under one plan replays correctly while it holds; it
        changes only with installs, evictions, compaction and slot-table growth (recomputed after those, once)."""
        if self._plan is None:
            self._plan = tuple(layer.static_plan() for layer in self.layers.values())
        return self._plan

    def set_delta(self, slot: int, delta: Delta, *, checked: bool = False) -> None:
        """Stage and install ``delta`` into ``slot`` at once, without a budget (tests, benchmarks). All checks run
        before the first copy, so a refused delta leaves the slot as it was."""
        if not isinstance(slot, int) or slot < 0:
            raise InvalidArgument(f"delta slot {slot!r} must be an integer >= 0")
        staged = self.stage(delta, checked=checked)
        self.ensure_slots(slot + 1)
        self.install([(slot, staged)], room=1 << 62)

    def _demands(self, items: list[tuple[int, StagedDelta]]) -> dict[str, tuple]:
        """path -> (layer, rows per arena) of every cell the items need."""
        out: dict[str, tuple] = {}
        for _slot, staged in items:
            for path, st in staged.modules.items():
                layer = self.layers[path]
                demand = layer.rows.demand({term: rows.shape[0] for term, rows in st.rows.items()})
                merged = out.setdefault(path, (layer, {}))[1]
                for arena, sizes in demand.items():
                    merged.setdefault(arena, []).extend(sizes)
        return out

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
               max_token_rows: int = 64, fuse_siblings: bool = True) -> DeltaModel:
    """Replace the target modules of ``model`` by delta-aware wrappers sharing one DeltaBatch; returns a DeltaModel.

    ``max_slots``: the most distinct deltas one step may use (sizes the step's index buffers; the server passes
    ``max_running``); ``max_rank`` / ``max_bottleneck`` / ``max_token_rows``: validation limits. No delta memory
    is allocated here. ``fuse_siblings``: wrapped q/k/v (gate/up) of equal widths share one LoRA shrink
    (``shared_input.py``); off, every projection runs its own ``add_lora``.
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
            dm.layers[path] = DeltaLinear.from_layer(module, batch, path=path, max_rank=max_rank,
                                                     max_bottleneck=max_bottleneck)
        elif path in site_of_norm or info.kind == "layernorm":
            tap = None
            if path in site_of_norm:
                tap = taps[site_of_norm[path]] = ResidualTap(path)
            dm.layers[path] = DeltaNorm.from_layer(module, batch, path=path, tap=tap)
    for out_path, tap in taps.items():
        dm.layers[out_path].make_site(tap)
    rows = dict(batch=batch, max_rows=max_token_rows)
    if isinstance(model.get_submodule(spec.input_embedding) if spec.input_embedding else None, torch.nn.Embedding):
        dm.layers[spec.input_embedding] = DeltaEmbedding.from_layer(model.get_submodule(spec.input_embedding),
                                                                    path=spec.input_embedding, **rows)
    head = model.get_submodule(spec.output_head) if spec.output_head else None
    if type(head) is torch.nn.Linear:
        dm.layers[spec.output_head] = DeltaHead.from_layer(head, path=spec.output_head, **rows)
    for path, wrapper in dm.layers.items():
        _replace_submodule(model, path, wrapper)
    if fuse_siblings:
        dm.groups = find_groups(dm.layers)
    return dm
