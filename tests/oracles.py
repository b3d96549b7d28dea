"""Test oracles shared by the format, model and engine tests: a Delta applied to an unwrapped HF model
with forward hooks, exactly as ``delta_store/delta.py`` defines the semantics, and the small factories
that make random PEFT adapters and hand-made bottleneck deltas. One copy, so the oracle every parity
test trusts is the same code everywhere."""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from delta_store import BaseSpec
from delta_store.delta import AdapterTerm, Delta, ModuleDelta

_ACT = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu}


def bottleneck(ad: AdapterTerm, src: torch.Tensor) -> torch.Tensor:
    hidden = _ACT[ad.activation](src @ ad.down.T.to(src.dtype) + ad.down_bias.to(src.dtype))
    return ad.scale * (hidden @ ad.up.T.to(src.dtype) + ad.up_bias.to(src.dtype))


def weight_out_in(mod: torch.nn.Module) -> torch.Tensor:
    """The base weight as ``[out, in]`` (GPT-2 ``Conv1D`` stores ``[in, out]``)."""
    return mod.weight.T if type(mod).__name__ == "Conv1D" else mod.weight


def dora_scale_dense(mod: torch.nn.Module, md: ModuleDelta) -> torch.Tensor:
    """``m / ||W + s B A||`` per output row, forming ``W + s B A`` as PEFT does (not delta_store/dora.py)."""
    w = weight_out_in(mod).detach().double()
    merged = w + md.lora.scale * (md.lora.b.double() @ md.lora.a.double())
    return (md.dora_magnitude.double() / torch.linalg.norm(merged, dim=1)).to(mod.weight.dtype)


def attach_delta(model: torch.nn.Module, delta: Delta, spec: BaseSpec) -> list:
    """Hook ``delta`` into ``model`` (weights untouched); returns the handles to remove."""
    modules = dict(model.named_modules())
    handles, residual, normed = [], {}, {}

    def capture(norm_path):
        def pre(_mod, args):
            residual[norm_path] = args[0]
        return pre

    def capture_output(norm_path):
        def post(_mod, _args, out):
            normed[norm_path] = out
        return post

    def rows_hook(md: ModuleDelta, head: bool):
        index, values = md.rows.index, md.rows.values

        def hook(mod, args, out):
            if head:  # logits of the replaced ids: h . row (PEFT's tied/targeted head layer has no bias)
                out = out.clone()
                out[..., index] = args[0] @ values.T.to(out.dtype)
                return out
            ids = args[0]  # [batch, seq]
            hit = (ids.unsqueeze(-1) == index).to(out.dtype)  # [batch, seq, n]: one-hot over the replaced ids
            keep = 1.0 - hit.sum(-1, keepdim=True)
            return out * keep + hit @ values.to(out.dtype)
        return hook

    def make_hook(md: ModuleDelta, norm_path: str | None):
        def hook(mod, args, out):
            x = args[0]
            y = type(mod).forward(mod, x * md.in_scale.to(x.dtype)) if md.in_scale is not None else out
            if md.out_scale is not None:
                y = y * md.out_scale.to(y.dtype)
            if md.lora is not None:
                y = y + md.lora.scale * ((x @ md.lora.a.T.to(x.dtype)) @ md.lora.b.T.to(x.dtype))
            if md.dora_magnitude is not None:  # g * (weight path) + b0: the base bias is not scaled
                b0 = mod.bias if getattr(mod, "bias", None) is not None else 0.0
                y = dora_scale_dense(mod, md) * (y - b0) + b0
            if md.bias is not None:
                y = y + md.bias.to(y.dtype)
            if md.adapter is not None:
                ad = md.adapter
                h = residual.get(norm_path) if norm_path else None
                src = {"output": y, "output+residual": None if h is None else y + h, "residual": h,
                       "normed": normed.get(norm_path)}[ad.source]
                y = y + bottleneck(ad, src)
            return y
        return hook

    for path, md in delta.modules.items():
        norm_path = None
        info = spec.modules[path]
        if md.rows is not None:
            handles.append(modules[path].register_forward_hook(rows_hook(md, head=path == spec.output_head)))
            continue
        if md.adapter is not None and md.adapter.source != "output":
            for norm_leaf, out_leaf in spec.sites().values():
                site = spec.find(info.layer, out_leaf)
                if site is not None and site.path == path:
                    norm_path = spec.find(info.layer, norm_leaf).path
                    hook = capture_output(norm_path) if md.adapter.source == "normed" else None
                    handles.append(modules[norm_path].register_forward_hook(hook) if hook else
                                   modules[norm_path].register_forward_pre_hook(capture(norm_path)))
        handles.append(modules[path].register_forward_hook(make_hook(md, norm_path)))
    return handles


@contextlib.contextmanager
def apply_delta(model: torch.nn.Module, delta: Delta, spec: BaseSpec):
    """Within the block, ``model`` computes with ``delta`` active."""
    handles = attach_delta(model, delta, spec)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()


def hooked_copy(base: torch.nn.Module, delta: Delta, spec: BaseSpec) -> torch.nn.Module:
    """A copy of ``base`` with ``delta`` hooked in for good (usable inside ``generate()``)."""
    model = copy.deepcopy(base)
    attach_delta(model, delta, spec)
    return model


def randomise_peft(peft_model, seed: int, *, std: float = 0.1, ia3_std: float = 0.2, bias_std: float = 0.1) -> None:
    """Overwrite every trainable adapter parameter (PEFT zero-initialises lora_B, a no-op delta)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad:
                continue
            noise = torch.randn(p.shape, generator=g)
            if "ia3_l" in name:
                p.copy_(1 + ia3_std * noise)
            elif "lora_magnitude_vector" in name:  # DoRA: PEFT initialises it to ||W||; training moves it a little
                p.mul_(1 + ia3_std * noise)
            elif name.endswith("base_layer.bias"):  # bias="lora_only": absolute trained bias
                p.add_(bias_std * noise)
            else:
                p.copy_(std * noise)


def site_adapters(spec: BaseSpec, seed: int, sites: dict[str, tuple[str, str, float, int]], *,
                  std: float = 0.2) -> Delta:
    """Bottleneck adapters on every layer's residual sites: ``{"ffn"|"attn": (source, act, scale, width)}``."""
    g = torch.Generator().manual_seed(seed)
    h, mods = spec.hidden_size, {}
    for layer in range(spec.num_layers):
        for site, (source, act, scale, m) in sites.items():
            path = spec.find(layer, spec.sites()[site][1]).path
            mods[path] = ModuleDelta(adapter=AdapterTerm(
                std * torch.randn(m, h, generator=g), 0.1 * torch.randn(m, generator=g),
                std * torch.randn(h, m, generator=g), 0.1 * torch.randn(h, generator=g), act, scale, source))
    return Delta(mods)


def prompt_forward(model: torch.nn.Module, delta: Delta, spec: BaseSpec, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` at the real tokens of ``input_ids`` [B, T] with ``delta`` active, prompt part
    included, in one no-cache pass: what each library's eval forward computes (delta_store/prompt.py).

    Embeddings: ``inputs_embeds = cat(E, embed(ids))`` at positions 0..N+T-1, first N logits dropped. K/V:
    the prefix goes in as an HF cache of N slots (no RoPE on it), the real tokens at positions
    ``position_offset + t``, and every query sees all N slots (the mask has N ones in front).
    """
    pp = delta.prompt
    b, t = input_ids.shape
    with apply_delta(model, delta, spec):
        if pp is None:
            return model(input_ids=input_ids).logits
        n = pp.num_virtual_tokens
        mask = torch.ones(b, n + t, dtype=torch.long)
        if pp.form == "embeddings":
            tokens = model.get_input_embeddings()(input_ids)  # [B, T, hidden]
            virtual = pp.embeddings.to(tokens.dtype)[None].expand(b, -1, -1)  # [B, N, hidden]
            return model(inputs_embeds=torch.cat([virtual, tokens], 1), attention_mask=mask).logits[:, n:]
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        for layer in range(pp.keys.shape[0]):
            k = pp.keys[layer].permute(1, 0, 2)[None].expand(b, -1, -1, -1)  # [B, n_kv, N, head_dim]
            v = pp.values[layer].permute(1, 0, 2)[None].expand(b, -1, -1, -1)
            cache.update(k.contiguous(), v.contiguous(), layer)
        positions = (torch.arange(t) + pp.position_offset)[None].expand(b, -1)
        return model(input_ids=input_ids, cache=cache, position_ids=positions, attention_mask=mask).logits


def peft_greedy(peft_model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by PEFT's full-sequence ``forward()`` (no cache), one pass per new token.

    PEFT 0.21.2's ``generate()`` is wrong for every prompt-learning kind under transformers 5.24 (the
    prefix goes in as ``past_key_values`` where the model reads ``cache``; prompt tuning re-inserts the
    virtual tokens at every step), so the oracle is what its model computes on the whole sequence.
    Returns the new tokens and the logits ``[max_new_tokens, vocab]`` each was chosen from.
    """
    ids = list(prompt)
    rows = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            x = torch.tensor([ids])
            logits = peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1]
            rows.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt):], torch.stack(rows)


def prompt_greedy(model: torch.nn.Module, delta: Delta, spec: BaseSpec, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by :func:`prompt_forward` over the whole sequence each step (no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(prompt_forward(model, delta, spec, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]
