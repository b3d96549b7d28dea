"""OpenDelta (git 067eed2) ``compacter``, ``low_rank_adapter`` and ``parallel_adapter`` -> bottleneck adapters.

All three are bottlenecks ``up(act(down(src)))`` with scale 1 whose projections are expanded exactly
at import:

* ``compacter`` (``CompacterModel``): sequential on the OUTPUT ``o`` of the named module,
  ``o' = o + up(act(down(o)))`` (source "output"); each of ``compactor.{down,up}_sampler`` is a
  ``PHMLinear`` with its OWN ``phm_rule`` (OpenDelta asserts ``shared_phm_rule=False`` and
  ``shared_W_phm=False``), ``y = x @ sum_k kron(phm_rule[k], W_left[k] @ W_right[k]) + b`` (``phm.py``).
* ``low_rank_adapter`` (``LowRankAdapterModel``): the same placement; each of
  ``low_rank_adapter.{down,up}_sampler`` is ``LowRankLinear``: ``y = x @ (W_left * W_right) + b``, an
  elementwise product that broadcasts ``[in, 1] * [1, out]`` into the outer product, i.e. a rank-1
  matrix; for ``low_rank_rank`` > 1 the shapes ``[in, k] * [k, out]`` do not broadcast (the library
  fails), so only rank 1 exists.
* ``parallel_adapter`` (``ParallelAdapterModel``): ``modified_modules`` comes in pairs (start, end);
  the adapter reads the first positional INPUT of the start module and adds
  ``up_proj(act(down_proj(x)))`` to the OUTPUT of the end module (``scaled`` is never passed to the
  layer: scale 1). Served for the pairs that read a sub-block's input (its pre-norm's output) and
  write its output: source "normed" on the site's output module. Keys name only the start module.

``config.json`` is diff-only against the config classes' defaults (CompacterConfig: reduction_factor
16, non_linearity relu, hypercomplex_division 4, factorized_phm true, phm_rank 1, biases on;
LowRankAdapterConfig: reduction_factor 32, gelu_new, rank 1; ParallelAdapterConfig: bottleneck_dim 24,
gelu_new). Activations map as OpenDelta's ``Activations`` names them (``gelu_new`` = tanh approximation).
"""
from __future__ import annotations

import re

import torch

from ..base_spec import BaseSpec
from ..delta import AdapterTerm
from ..errors import DeltaError, UnsupportedDelta
from .adapterhub_config import map_activation
from .builder import DeltaBuilder
from .keys import KeyMapper
from .phm import bias_of, dense_weight, factor_of, rule_of

_COMPACTER_RE = re.compile(r"^(?P<mod>.+)\.compactor\.(?P<proj>down_sampler|up_sampler)\.(?P<leaf>[^.]+)$")
_LOW_RANK_RE = re.compile(r"^(?P<mod>.+)\.low_rank_adapter\.(?P<proj>down_sampler|up_sampler)\.(?P<leaf>[^.]+)$")
_PARALLEL_RE = re.compile(r"^(?P<mod>.+)\.parallel_adapter\.modulelist\.(?P<proj>down_proj|up_proj)\."
                          r"(?P<leaf>weight|bias)$")

# OpenDelta's GPT-2 "common structure" names (utils/structure_mapping.py) for the modules these kinds name.
_GPT2_COMMON = {"attn@": "attn", "attn@.proj@": "attn.c_proj", "ff@": "mlp", "ff@.w1@": "mlp.c_fc",
                "ff@.w2@": "mlp.c_proj"}
# Per architecture and residual site: the modules whose first positional input is the sub-block's input
# (its pre-norm's output) and those whose output is the sub-block's output. HF Llama calls self_attn and
# mlp with keyword arguments only, so OpenDelta cannot read their input (IndexError): leaves only there.
_SUB_BLOCK = {
    "gpt2": {"attn": ({"attn", "attn.c_attn"}, {"attn", "attn.c_proj"}),
             "ffn": ({"mlp", "mlp.c_fc"}, {"mlp", "mlp.c_proj"})},
    "llama": {"attn": ({"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"}, {"self_attn", "self_attn.o_proj"}),
              "ffn": ({"mlp.gate_proj", "mlp.up_proj"}, {"mlp", "mlp.down_proj"})},
}


def load_kind(kind: str, cfg: dict, tensors: dict[str, torch.Tensor], spec: BaseSpec, keys: KeyMapper,
              builder: DeltaBuilder, where: str) -> None:
    key_re = {"compacter": _COMPACTER_RE, "low_rank_adapter": _LOW_RANK_RE, "parallel_adapter": _PARALLEL_RE}[kind]
    groups: dict[str, dict[str, dict[str, tuple[str, torch.Tensor]]]] = {}  # module -> proj -> leaf -> (key, t)
    for key, t in tensors.items():
        m = key_re.match(key)
        if m is None:
            if key.endswith(".weight"):
                raise UnsupportedDelta(f"{where}: tensor {key!r} is a full weight: a whole-model save "
                                       f"(freeze_module(set_state_dict=True) was not called) or unfrozen modules")
            raise DeltaError(f"{where}: unknown tensor {key!r} for delta_type {kind!r}")
        groups.setdefault(m.group("mod"), {}).setdefault(m.group("proj"), {})[m.group("leaf")] = (key, t)
    defaults = {"compacter": "relu", "low_rank_adapter": "gelu_new", "parallel_adapter": "gelu_new"}
    act = map_activation(cfg.get("non_linearity") or defaults[kind], where)
    for mod, projs in groups.items():
        key0 = next(iter(next(iter(projs.values())).values()))[0]
        if set(projs) != ({"down_proj", "up_proj"} if kind == "parallel_adapter" else {"down_sampler", "up_sampler"}):
            raise DeltaError(f"{where}: {mod}: expected both the down and the up projection, found {sorted(projs)}")
        if kind == "parallel_adapter":
            _parallel(cfg, mod, projs, act, spec, keys, builder, where, key0)
            continue
        info = keys.module(mod, key=key0)
        hidden = info.out_features  # the adapter reads and writes the module's output
        rf = cfg.get("reduction_factor") or (16 if kind == "compacter" else 32)
        width = hidden // int(rf)
        weights = []
        for proj, fin, fout in (("down_sampler", hidden, width), ("up_sampler", width, hidden)):
            leaves = {leaf: t for leaf, (_, t) in projs[proj].items()}
            at = f"{where} {mod}.{proj}"
            make = _phm_weight if kind == "compacter" else _rank1_weight
            w = make(cfg, leaves, fin, fout, at)
            use_bias = cfg.get("use_bias_down_sampler" if proj == "down_sampler" else "use_bias_up_sampler", True)
            if kind == "compacter" and bool(use_bias) != ("b" in leaves):
                raise DeltaError(f"{at}: use_bias={use_bias} but the projection {'has no' if use_bias else 'has a'} b")
            if kind == "low_rank_adapter" and "b" not in leaves:
                raise DeltaError(f"{at}: LowRankLinear always has a bias b, the file holds none")
            weights += [w, bias_of(leaves, fout, w.dtype, at)]
        down, down_bias, up, up_bias = weights
        builder.adapter(info, AdapterTerm(down, down_bias, up, up_bias, act, 1.0, "output"), key=key0)


def _phm_weight(cfg: dict, leaves: dict, fin: int, fout: int, at: str) -> torch.Tensor:
    if cfg.get("shared_phm_rule") or cfg.get("shared_W_phm"):
        raise UnsupportedDelta(f"{at}: shared_phm_rule / shared_W_phm, which OpenDelta itself asserts against")
    unknown = sorted(set(leaves) - {"phm_rule", "phm_rule_left", "phm_rule_right", "W_left", "W_right", "W", "b"})
    if unknown:
        raise DeltaError(f"{at}: unknown PHM tensor {unknown[0]!r}")
    n = int(cfg.get("hypercomplex_division") or 4)
    factorized = cfg.get("factorized_phm", True)
    if bool(factorized) != ("W_left" in leaves):
        raise DeltaError(f"{at}: factorized_phm={factorized} but the projection holds "
                         f"{sorted(k for k in leaves if k.startswith('W'))}")
    rank = int(cfg.get("phm_rank") or 1) if factorized else None
    return dense_weight(rule_of(leaves, n, at), factor_of(leaves, n, fin, fout, rank, at))


def _rank1_weight(cfg: dict, leaves: dict, fin: int, fout: int, at: str) -> torch.Tensor:
    rank = int(cfg.get("low_rank_rank") or 1)
    if rank != 1:
        raise UnsupportedDelta(f"{at}: low_rank_rank={rank}: OpenDelta's LowRankLinear multiplies W_left [in, k] and "
                               f"W_right [k, out] elementwise, which broadcasts (to the outer product) only for k = 1")
    unknown = sorted(set(leaves) - {"W_left", "W_right", "b"})
    if unknown or "W_left" not in leaves or "W_right" not in leaves:
        raise DeltaError(f"{at}: expected W_left, W_right and b, found {sorted(leaves)}")
    left, right = leaves["W_left"], leaves["W_right"]
    if tuple(left.shape) != (fin, 1) or tuple(right.shape) != (1, fout):
        raise DeltaError(f"{at}: W_left {tuple(left.shape)} and W_right {tuple(right.shape)} are not ({fin}, 1) and "
                         f"(1, {fout})")
    dt = torch.promote_types(torch.promote_types(left.dtype, right.dtype), torch.float32)
    return (left.to(dt) * right.to(dt)).T.contiguous()  # [in, out] outer product -> Linear weight [out, in]


def _resolve(name: str, arch: str, where: str) -> str:
    if "@" not in name:
        return name
    if arch == "gpt2" and name in _GPT2_COMMON:
        return _GPT2_COMMON[name]
    raise UnsupportedDelta(f"{where}: common-structure name {name!r} is not known for {arch}")


def _names(path: str, name: str) -> bool:
    """OpenDelta's dot-bounded suffix match (``find_key``)."""
    return path == name or path.endswith("." + name)


def _parallel(cfg: dict, mod: str, projs: dict, act: str, spec: BaseSpec, keys: KeyMapper, builder: DeltaBuilder,
              where: str, key0: str) -> None:
    pairs = cfg.get("modified_modules") or ["attn@", "attn@", "ff@.w1@", "ff@.w2@"]
    if len(pairs) % 2:
        raise DeltaError(f"{where}: parallel_adapter modified_modules must come in (start, end) pairs, found {pairs}")
    hits = [(pairs[i], pairs[i + 1]) for i in range(0, len(pairs), 2)
            if _names(mod, _resolve(pairs[i], spec.arch, where))]
    if len(hits) != 1:
        raise DeltaError(f"{where}: {key0!r}: module {mod!r} starts {len(hits)} of the pairs {pairs}, expected one")
    start, end = (_resolve(n, spec.arch, where) for n in hits[0])
    anchor = re.search(r"(?:^|\.)(?:layers|h)\.(\d+)\.(.+)$", mod)
    if anchor is None:
        raise DeltaError(f"{where}: {key0!r}: module {mod!r} is not inside a decoder layer")
    layer, rel = int(anchor.group(1)), anchor.group(2)
    site = _site(spec.arch, rel, end, where, mod)
    info = keys.site_module(layer, site, key=key0)
    down, down_bias = _linear(projs["down_proj"], where)
    up, up_bias = _linear(projs["up_proj"], where)
    width = int(cfg.get("bottleneck_dim") or 24)
    if down.shape[0] != width or down.shape[1] != spec.hidden_size or tuple(up.shape) != (spec.hidden_size, width):
        raise DeltaError(f"{where}: {key0!r}: bottleneck_dim {width} on hidden {spec.hidden_size} needs down "
                         f"({width}, {spec.hidden_size}) and up ({spec.hidden_size}, {width}), found "
                         f"{tuple(down.shape)} and {tuple(up.shape)}")
    builder.adapter(info, AdapterTerm(down, down_bias, up, up_bias, act, 1.0, "normed"), key=key0)


def _site(arch: str, start_rel: str, end: str, where: str, mod: str) -> str:
    """The residual site whose input the start module reads and whose output the end module names."""
    for site, (inputs, outputs) in _SUB_BLOCK["gpt2" if arch == "gpt2" else "llama"].items():
        if start_rel in inputs and any(_names(o, end) or o == end for o in outputs):
            return site
    raise UnsupportedDelta(f"{where}: parallel adapter from the input of {mod!r} to the output of {end!r}: only pairs "
                           f"from a sub-block's input (attention or MLP input projection) to that sub-block's output "
                           f"are served")


def _linear(leaves: dict, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    if set(leaves) != {"weight", "bias"}:
        raise DeltaError(f"{where}: expected modulelist.*.weight and .bias, found {sorted(leaves)}")
    w, b = leaves["weight"][1], leaves["bias"][1]
    if w.dim() != 2 or tuple(b.shape) != (w.shape[0],):
        raise DeltaError(f"{where}: {leaves['weight'][0]!r}: weight {tuple(w.shape)} and bias {tuple(b.shape)} "
                         f"are not [out, in] and [out]")
    return w.contiguous(), b.contiguous()
