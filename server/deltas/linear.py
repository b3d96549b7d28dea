"""DeltaLinear: an ``nn.Linear`` / GPT-2 ``Conv1D`` that adds each token's delta terms after the base (D1, D13).

Same call signature as the wrapped layer (vLLM ``vllm/lora/layers/base_linear.py``; gpt-fast
``quantize.py``): ``y = base(x)``, then, in the order of ``delta_store/delta.py``::

    x_in = x * in_scale[slot]           # (IA)3, PEFT feed-forward modules; on a copy of x
    y    = base(x_in) * out_scale[slot] # (IA)3 output scaling (base bias scaled too)
    y   += lora(x)                      # LoRA, rank read per slot (D3)
    y    = y * g[slot] + shift[slot]    # DoRA slots only: g = m / ||W + sBA||, shift = (1 - g) b0 (dora.py)
    y   += bias[slot]                   # BitFit / BEFT / lora_B bias / bias="all" deltas
    y   += adapter(src)                 # bottleneck adapter (adapter.py), residual sources on site outputs

Storage is paged by real size (D13, ``pages.py``): four row arenas, none allocated until a delta uses it::

    lora      [*, in_pad + out]     a rank-r LoRA = r rows: A row | B column (B transposed)
    vec_out   [*, out]              one row per bias / out_scale / adapter up bias, + neutral rows 0 and 1
    vec_in    [*, in]               one row per in_scale, + a neutral row of ones
    adapter   [*, 2 out_pad + pad]  a width-m adapter = m rows: down row | up column | down bias
    dora      fp32 [*, 2 out_pad]   a DoRA term = 1 row: g | (1 - g) b0 (``dora.py``; fp32 whatever the model)

and a per-slot table (``slot_fields.py``) with each slot's rank, scale and first rows. Siblings on one input of
equal widths (q/k/v, gate/up: ``shared_input.py``) keep their LoRA rows as one stack per slot in the first
member's ``lora`` arena and share one shrink. A resident rank-16
LoRA on a 4096 x 4096 fp16 projection holds 16 * 8192 * 2 = 256 KiB here, a rank-4 one 64 KiB: its own size.

Each kind runs only when a slot active in this step has it at this layer, decided from host-side sets (no
device sync). Neutral rows (rank 0, bias 0, scale 1) make every other token exact: ``y + 0.0 == y`` and
``y * 1.0 == y`` in IEEE arithmetic, so base-only tokens match the bare model bit for bit even in a mixed step.
The one-row terms (bias, (IA)3) run on the step's meta restricted to the slots that have them here
(``meta.restrict``, shared by every layer with the same set): a bias of 3 of a step's 32 deltas adds 3 slots'
rows, not 29 zero rows besides. At decode on the CPU the step's ops are bound once (``kernels.step_ops``) and skip
the tokens on the pages' neutral row themselves, so the step's meta serves as is there, and the output scale, LoRA,
DoRA and bias terms go in one call (``step_terms``, ``bound_terms.py``).
"""
from __future__ import annotations

from collections import Counter

import torch
from transformers.pytorch_utils import Conv1D

import kernels
from delta_store.delta import ADAPTER_SOURCES, ModuleDelta
from delta_store.errors import DeltaError

from . import adapter as adapters
from .adapter import ResidualTap
from .batch import DeltaBatch
from .bound_terms import BoundTerms
from . import dora as doras
from .pages import RowArena
from .slot_fields import SlotFields
from .step_plan import ALL, StepPlan
from .terms import Staged, TermRows, TermSpec, align

TERMS = {
    "lora": TermSpec("lora", "lora_start"),
    "bias": TermSpec("vec_out", "bias_row", 0.0),
    "out_scale": TermSpec("vec_out", "out_scale_row", 1.0),
    "in_scale": TermSpec("vec_in", "in_scale_row", 1.0),
    "adapter": TermSpec("adapter", "ad_start"),
    "up_bias": TermSpec("vec_out", "ad_up_bias_row"),
    "dora": TermSpec("dora", "dora_row"),
}
# lora_stack / lora_offset: a SharedInput group's stack rows (its leader) and a member's row in it (shared_input.py)
INT_FIELDS = {"lora_start": 0, "lora_rank": 0, "lora_stack": 0, "lora_offset": 0, "bias_row": 0, "out_scale_row": 0,
              "in_scale_row": 0, "ad_start": 0, "ad_up_bias_row": 0, "ad_act": 0,
              "dora_row": 0, "dora_flag": 0, **{f"ad_width{i}": 0 for i in range(len(ADAPTER_SOURCES))}}
FLOAT_FIELDS = {"lora_scale": 0.0, **{f"ad_scale{i}": 0.0 for i in range(len(ADAPTER_SOURCES))}}


def linear_features(layer: torch.nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (weight ``[in, out]``)."""
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, Conv1D):
        return int(layer.weight.shape[0]), int(layer.weight.shape[1])
    raise TypeError(f"DeltaLinear wraps nn.Linear or Conv1D, got {type(layer).__name__}")


class DeltaLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, batch: DeltaBatch, *, path: str, max_rank: int = 64,
                 max_bottleneck: int = 256):
        super().__init__()
        self.base = base
        self.batch = batch
        self.path = path
        self.in_features, self.out_features = linear_features(base)
        self.max_rank, self.max_bottleneck = max_rank, max_bottleneck  # validation limits, not storage sizes
        dev, dt = base.weight.device, base.weight.dtype
        self.w_in, self.w_out = align(self.in_features, dt), align(self.out_features, dt)
        arenas = {"lora": RowArena(self.w_in + self.w_out, dt, dev), "vec_out": RowArena(self.w_out, dt, dev),
                  "vec_in": RowArena(self.w_in, dt, dev), "adapter": RowArena(2 * self.w_out + align(1, dt), dt, dev),
                  "dora": RowArena(2 * align(self.out_features, torch.float32), torch.float32, dev)}
        self.rows = TermRows(arenas, TERMS, SlotFields(INT_FIELDS, FLOAT_FIELDS, dev))
        # Host sets of "slot s has this kind here": the per-step skip test reads these, never the device.
        self.has = {k: set() for k in ("lora", "bias", "out_scale", "in_scale", "dora")}
        self.has_adapter: list[set[int]] = [set() for _ in ADAPTER_SOURCES]  # per source
        self._ranks: Counter = Counter()
        self._widths: Counter = Counter()
        self._pages: dict[str, tuple] = {}  # kind -> (key, pages) rebuilt when arenas or fields move
        self._dora_base_sq: torch.Tensor | None = None  # ||W_o||^2 [out], on the first DoRA delta
        self._terms_version = 0  # bumped by place/clear: step plans decided before are stale
        self._plan: tuple | None = None  # (active slots, terms version, StepPlan or None) of the last step
        self._bound = BoundTerms()  # the terms the step's bound ops run in one call (step_terms)
        self.tap: ResidualTap | None = None  # set on residual-site output modules
        self.shared = None  # a shared_input.SharedInput when siblings on the same input share the LoRA shrink

    @classmethod
    def can_replace(cls, layer: torch.nn.Module) -> bool:
        return isinstance(layer, (torch.nn.Linear, Conv1D))

    @classmethod
    def from_layer(cls, layer: torch.nn.Module, batch: DeltaBatch, *, path: str, max_rank: int = 64,
                   max_bottleneck: int = 256) -> "DeltaLinear":
        return cls(layer, batch, path=path, max_rank=max_rank, max_bottleneck=max_bottleneck)

    def make_site(self, tap: ResidualTap) -> None:
        """Mark this module as a residual site's output: its adapters may then read ``h`` from ``tap``."""
        self.tap = tap

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base")
            if base is None:  # not constructed yet: nothing to forward to
                raise
            return getattr(base, name)

    def nbytes(self) -> int:
        """Device bytes of this layer's delta storage (arenas and slot table)."""
        return self.rows.capacity_bytes

    # ---- load path (a worker thread: host work only) ----------------------------------------
    def check(self, md: ModuleDelta) -> None:
        """Raise DeltaError naming this module, the expected and the found shape; changes nothing."""
        fin, fout, p = self.in_features, self.out_features, self.path
        if md.lora is not None:
            r = md.lora.rank
            if not 1 <= r <= self.max_rank:
                raise DeltaError(f"{p}: LoRA rank {r} outside [1, max_rank={self.max_rank}]")
            for name, shape in (("a", (r, fin)), ("b", (fout, r))):
                found = tuple(getattr(md.lora, name).shape)
                if found != shape:
                    raise DeltaError(f"{p}: lora.{name} expected shape {shape}, found {found}")
        for name, n in (("bias", fout), ("out_scale", fout), ("in_scale", fin)):
            t = getattr(md, name)
            if t is not None and tuple(t.shape) != (n,):
                raise DeltaError(f"{p}: {name} expected shape ({n},), found {tuple(t.shape)}")
        if md.dora_magnitude is not None:
            doras.check(md, fout, p)
        if md.adapter is not None:
            # An adapter on the module output (OpenDelta) fits any wrapped module; one reading the
            # residual stream needs the site's pre-norm tap.
            if self.tap is None and md.adapter.source != "output":
                raise DeltaError(f"{p}: an adapter reading {md.adapter.source!r} attaches only to residual-site "
                                 f"output modules (o_proj/down_proj, GPT-2 attn.c_proj/mlp.c_proj)")
            adapters.check(p, md.adapter, self.out_features, self.max_bottleneck)

    @staticmethod
    def term_rows(md: ModuleDelta) -> dict[str, int]:
        """Rows of each term of ``md`` (shapes only): what its cells and the budget are sized by."""
        rows = {name: 1 for name in ("bias", "out_scale", "in_scale") if getattr(md, name) is not None}
        if md.lora is not None:
            rows["lora"] = md.lora.rank
        if md.adapter is not None:
            rows["adapter"], rows["up_bias"] = md.adapter.width, 1
        if md.dora_magnitude is not None:
            rows["dora"] = 1
        return rows

    def stage(self, md: ModuleDelta, pin: bool = False) -> Staged:
        """The module's terms as rows in the served dtype, on the host (pinned when ``pin``)."""
        self.check(md)
        dt = self.base.weight.dtype
        rows: dict[str, torch.Tensor] = {}
        values: dict = {}
        kinds: set[str] = set()
        if md.lora is not None:
            r = md.lora.rank
            t = torch.empty(r, self.w_in + self.out_features, dtype=dt)  # [r, in_pad + out]
            t[:, :self.in_features] = md.lora.a
            t[:, self.w_in:] = md.lora.b.t()  # b [out, r] -> columns of B as rows
            rows["lora"] = t
            values.update(lora_rank=r, lora_scale=float(md.lora.scale))
            kinds.add("lora")
        for name in ("bias", "out_scale", "in_scale"):
            t = getattr(md, name)
            if t is not None:
                rows[name] = t.to(dt).reshape(1, -1)
                kinds.add(name)
        if md.adapter is not None:
            rows.update(adapters.stage(md.adapter, self.w_out, dt))
            values.update(adapters.values(md.adapter))
            kinds.add("adapter")
        if md.dora_magnitude is not None:
            w = self.base.weight
            rows["dora"], self._dora_base_sq = doras.stage(w.t() if isinstance(self.base, Conv1D) else w,
                                                           getattr(self.base, "bias", None), md, self.path,
                                                           align(self.out_features, torch.float32), self._dora_base_sq)
            values["dora_flag"] = 1
            kinds.add("dora")
        if pin:
            rows = {k: v.pin_memory() for k, v in rows.items()}
        return Staged(rows, values, kinds)

    # ---- the step loop's writes (between forwards) -------------------------------------------
    def place(self, slot: int, staged: Staged, capacity: int) -> None:
        self.clear(slot, keep_neutrals=True)
        self._terms_version += 1  # the install's demand counted on this layer's neutral rows
        values = {k: v for k, v in staged.values.items() if k != "ad_source"}
        self.rows.place(slot, staged.rows, capacity, **values)
        for kind in ("lora", "bias", "out_scale", "in_scale", "dora"):
            if kind in staged.kinds:
                self.has[kind].add(slot)
        if "lora" in staged.kinds:
            self._ranks[staged.values["lora_rank"]] += 1
        if "adapter" in staged.kinds:
            i = staged.values["ad_source"]
            self.has_adapter[i].add(slot)
            self._widths[staged.values[f"ad_width{i}"]] += 1

    def clear(self, slot: int, *, keep_neutrals: bool = False) -> None:
        if slot not in self.rows.cells:
            return
        self._terms_version += 1
        host = self.rows.fields.host
        if slot in self.has["lora"]:
            self._drop(self._ranks, host["lora_rank"][slot])
        for i, has in enumerate(self.has_adapter):
            if slot in has:
                has.discard(slot)
                self._drop(self._widths, host[f"ad_width{i}"][slot])
        for has in self.has.values():
            has.discard(slot)
        self.rows.clear(slot, keep_neutrals=keep_neutrals)

    @staticmethod
    def _drop(counter: Counter, value: int) -> None:
        counter[value] -= 1
        if counter[value] <= 0:
            del counter[value]

    # ---- step path ---------------------------------------------------------------------------
    def _cached(self, name: str, arenas: tuple[str, ...], bound: int, build):
        """The pages object ``name``, rebuilt when one of its ``arenas`` relayouts, the slot table grows or the
        host bound on its ranks (widths) changes; otherwise the same object every step."""
        r = self.rows
        ar = r.arenas
        key = (ar[arenas[0]].version, ar[arenas[1]].version if len(arenas) > 1 else -1, r.fields.version, bound)
        hit = self._pages.get(name)
        if hit is None or hit[0] != key:
            hit = self._pages[name] = (key, build())
        return hit[1]

    def lora_pages(self) -> kernels.LoraPages:
        # A member of a SharedInput group reads its rows in the leader's arena (its run of each slot's stack).
        arena = self.rows.arenas["lora"] if self.shared is None else self.shared.arena

        def build():
            rows, f = arena.rows, self.rows.fields
            return kernels.LoraPages(rows[:, :self.in_features], rows[:, self.w_in:self.w_in + self.out_features],
                                     f.view("lora_start"), f.view("lora_rank"), f.view("lora_scale"),
                                     max(self._ranks, default=0),
                                     host={"start": f.host["lora_start"], "rank": f.host["lora_rank"],
                                           "scale": f.host["lora_scale"]})
        return self._cached("lora", ("lora",), (max(self._ranks, default=0), arena.version), build)

    def row_pages(self, kind: str) -> kernels.RowPages:
        spec = TERMS[kind]
        neutral = self.rows.neutral_row(spec)  # a key of the pages too: it may come and go with the arena's terms

        def build():
            rows = self.rows.arenas[spec.arena].rows
            n = self.in_features if spec.arena == "vec_in" else self.out_features
            return kernels.RowPages(rows[:, :n], self.rows.fields.view(spec.field),
                                    host={"row": self.rows.fields.host[spec.field]}, neutral=neutral)
        return self._cached(kind, (spec.arena,), neutral, build)

    def adapter_pages(self, source: int) -> kernels.AdapterPages:
        def build():
            return adapters.pages(self.rows, self.out_features, self.w_out, source, max(self._widths, default=0))
        return self._cached(f"adapter{source}", ("adapter", "vec_out"), max(self._widths, default=0), build)

    def dora_pages(self) -> kernels.ScaleShiftPages:
        def build():
            rows, w = self.rows.arenas["dora"].rows, align(self.out_features, torch.float32)
            f = self.rows.fields
            return kernels.ScaleShiftPages(rows[:, :self.out_features], rows[:, w:w + self.out_features],
                                           f.view("dora_row"), f.view("dora_flag"))
        return self._cached("dora", ("dora",), 0, build)

    def step_plan(self, meta: kernels.DeltaKernelMeta) -> StepPlan | None:
        """This layer's plan for the step's active slots (None: no active slot has a term here), kept while the
        active slots and the layer's terms stay the same."""
        key = meta.active_key
        hit = self._plan
        if hit is not None and hit[1] == self._terms_version and hit[0] == key:
            return hit[2]
        plan = StepPlan(self, meta.active_slots_host)
        plan = None if plan.empty else plan
        self._plan = (key, self._terms_version, plan)
        return plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.batch
        if batch.static:  # graph mode: a fixed op sequence (forward_static)
            return self.forward_static(x)
        meta = batch.meta
        plan = None if meta.no_delta else self.step_plan(meta)
        if plan is None:  # no token of this step has a term here: the bare layer
            if self.tap is not None:
                self.tap.h = self.tap.normed = None
            return self.base(x)
        x2 = x.reshape(-1, self.in_features)  # [num_tokens, in]
        batch.check_tokens(x2.shape[0], self.path)
        # The step's ops bound to its meta where the CPU native plan serves it whole (fp32 decode): each call then
        # checks only its activations (kernels/cpu/native_step.py); None: the public ops, which decide per call.
        ops = kernels.step_ops(meta, x2)
        if plan.in_scale is not None:
            x_in = x2.clone()  # the shared input feeds q/k/v too: never scale it in place
            self._row_term("in_scale", x_in, plan.in_scale, meta, ops)
            y = self.base(x_in.view(x.shape))
        else:
            y = self.base(x)
        y2 = y.view(-1, self.out_features)  # [num_tokens, out]; base outputs are fresh, contiguous tensors
        terms = None if ops is None else self.step_terms(plan)
        if terms is not None:  # out_scale, LoRA, DoRA and bias in one bound call
            ops.apply_terms(y2, x2, terms)
        else:
            self._terms_one_by_one(plan, y2, x, x2, meta, ops)
        if plan.sources:
            adapters.apply(self, y2, list(plan.sources), meta, ops)
        if self.tap is not None:  # drop the references: one residual per site alive would cost 2*L*T*h
            self.tap.h = self.tap.normed = None
        return y

    def step_terms(self, plan: StepPlan) -> kernels.ModuleTerms | None:
        """The plan's out_scale, LoRA, DoRA and bias terms here as one ``kernels.ModuleTerms`` for the step's bound
        ops, or None: one by one (``bound_terms.py``)."""
        return self._bound.get(self, plan)

    def _terms_one_by_one(self, plan: StepPlan, y2, x, x2, meta, ops) -> None:
        """out_scale, LoRA, DoRA and bias on ``y2`` one op each (no bound ops for this step, or a restricted term)."""
        if plan.out_scale is not None:
            self._row_term("out_scale", y2, plan.out_scale, meta, ops)
        if plan.lora:
            if ops is not None:  # one loop per member: no shared shrink to build at decode (shared_input.py)
                ops.add_lora(y2, x2, self.lora_pages())
            elif self.shared is not None:  # siblings on this same x share one shrink (shared_input.py)
                self.shared.add_lora(self, y2, x, x2, meta)
            else:
                kernels.add_lora(y2, x2.contiguous(), self.lora_pages(), meta)
        if plan.dora:  # after the LoRA add, before the bias deltas
            if ops is not None:
                ops.scale_shift_rows(y2, self.dora_pages())
            else:
                kernels.scale_shift_rows(y2, self.dora_pages(), meta)
        if plan.bias is not None:
            self._row_term("bias", y2, plan.bias, meta, ops)

    def _row_term(self, kind: str, t: torch.Tensor, which, meta, ops) -> None:
        """A one-row term on ``t`` in place (``bias`` adds, the (IA)3 scales multiply) for the ``which`` slots of the
        step (``StepPlan``): through the step's bound ops when it has them (they skip the tokens on the neutral
        row, so the whole step's meta serves), else the public op on the step's meta or one restricted to ``which``."""
        pages = self.row_pages(kind)
        if ops is not None and (which is ALL or pages.neutral >= 0):
            (ops.add_bias if kind == "bias" else ops.mul_rows)(t, pages)
            return
        op = kernels.add_bias if kind == "bias" else kernels.mul_rows
        op(t, pages, StepPlan.meta_for(meta, which, pages, t))

    # ---- graph mode (DeltaBatch.prepare_static; server/engine/graphs.py) --------------------------
    def static_plan(self) -> tuple:
        """What fixes this layer's op sequence and the addresses it reads in graph mode: the kinds it holds, their
        host bounds and the storage versions. A captured graph is valid while every layer's plan is unchanged."""
        kinds = tuple(k for k in ("in_scale", "out_scale", "lora", "dora", "bias") if self.has[k])
        sources = tuple(i for i, h in enumerate(self.has_adapter) if h)
        r = self.rows
        return (kinds, sources, max(self._ranks, default=0), max(self._widths, default=0),
                tuple(a.version for a in r.arenas.values()), r.fields.version)

    def forward_static(self, x: torch.Tensor) -> torch.Tensor:
        """The graph-mode step: every kind this layer holds runs over all of the step's tokens through the
        batch's capacity meta, whichever slots are active (no host-set skips, no ``meta.restrict``). Exact for
        every token: a slot without a kind here points at its neutral row (scale 1, bias 0) or has rank, width
        or flag 0, and -1 tokens (the bucket's padding included) are never touched."""
        batch = self.batch
        meta = batch.meta
        x2 = x.reshape(-1, self.in_features)  # [bucket, in]
        batch.check_tokens(x2.shape[0], self.path)
        has = self.has
        if has["in_scale"]:
            x_in = x2.clone()  # the shared input feeds q/k/v too: never scale it in place
            kernels.mul_rows(x_in, self.row_pages("in_scale"), meta)
            y = self.base(x_in.view(x.shape))
        else:
            y = self.base(x)
        y2 = y.view(-1, self.out_features)  # [bucket, out]
        if has["out_scale"]:
            kernels.mul_rows(y2, self.row_pages("out_scale"), meta)
        if has["lora"]:
            kernels.add_lora(y2, x2.contiguous(), self.lora_pages(), meta)
        if has["dora"]:
            kernels.scale_shift_rows(y2, self.dora_pages(), meta)
        if has["bias"]:
            kernels.add_bias(y2, self.row_pages("bias"), meta)
        sources = [i for i, has_i in enumerate(self.has_adapter) if has_i]
        if sources:
            adapters.apply(self, y2, sources, meta)
        if self.tap is not None:
            self.tap.h = self.tap.normed = None
        return y

    def extra_repr(self) -> str:
        site = ", site" if self.tap is not None else ""
        return f"in={self.in_features}, out={self.out_features}, max_rank={self.max_rank}{site}"
