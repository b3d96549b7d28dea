"""SlotFields: one wrapped layer's per-slot table (ranks, scales, first rows of each slot's runs).

A *slot* is a resident delta's number, handed out by the residency owner (``residency.py``); the kernels
index these tables by slot (``kernels.LoraPages.start[slot]`` ...). Each field is one contiguous row of one
int32 or fp32 tensor, ``[fields, capacity]``, allocated on the layer's first term (a layer no delta uses
holds none) and grown by the owner, like the arenas, between forwards. A host mirror of every value saves
the layer from reading the device back.
"""
from __future__ import annotations

import struct

import torch


def _fp32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


class SlotFields:
    def __init__(self, ints: dict[str, int], floats: dict[str, float], device: torch.device):
        """``ints`` / ``floats``: field name -> the value of a slot without this layer's term."""
        self.int_names, self.float_names = tuple(ints), tuple(floats)
        self.defaults = {**ints, **floats}
        self.device = device
        self.capacity = 0
        self.version = 0  # bumped when the tensors are reallocated: views taken before are stale
        self._ints: torch.Tensor | None = None  # int32 [len(ints), capacity]
        self._floats: torch.Tensor | None = None  # fp32 [len(floats), capacity]
        self.host: dict[str, list] = {name: [] for name in self.defaults}

    @property
    def nbytes(self) -> int:
        return 4 * self.capacity * len(self.defaults) if self._ints is not None else 0

    def bytes_for(self, capacity: int) -> int:
        return 4 * capacity * len(self.defaults)

    def ensure(self, capacity: int, defaults: dict | None = None) -> None:
        """Room for slots [0, capacity), new ones holding ``defaults`` (the fields' own by default; the layer
        passes its neutral rows' positions). Called on the first term and by growth."""
        if capacity <= self.capacity and self._ints is not None:
            return
        capacity = max(capacity, self.capacity)
        defaults = defaults or self.defaults
        for name in self.defaults:
            self.host[name].extend([defaults[name]] * (capacity - len(self.host[name])))
        ints = torch.tensor([self.host[n] for n in self.int_names], dtype=torch.int32).reshape(-1, capacity)
        floats = torch.tensor([self.host[n] for n in self.float_names], dtype=torch.float32).reshape(-1, capacity)
        self._ints, self._floats = ints.to(self.device), floats.to(self.device)
        self.capacity = capacity
        self.version += 1

    @property
    def allocated(self) -> bool:
        return self._ints is not None

    def view(self, name: str) -> torch.Tensor:
        """The device row of field ``name`` [capacity] (valid until ``version`` changes)."""
        if name in self.int_names:
            return self._ints[self.int_names.index(name)]
        return self._floats[self.float_names.index(name)]

    def set(self, slot: int, **values) -> None:
        """Write fields of one slot: the host mirror, then the slot's column of each tensor in one copy."""
        for name, value in values.items():
            # The mirror holds what the device holds: fp32 fields rounded to fp32 (kernels.pages.HOST_MIRRORS).
            self.host[name][slot] = _fp32(value) if name in self.float_names else value
        if any(n in values for n in self.int_names):
            self._ints[:, slot].copy_(torch.tensor([self.host[n][slot] for n in self.int_names], dtype=torch.int32))
        if any(n in values for n in self.float_names):
            self._floats[:, slot].copy_(torch.tensor([self.host[n][slot] for n in self.float_names],
                                                     dtype=torch.float32))

    def reset(self, slot: int) -> None:
        self.set(slot, **self.defaults)

    def refresh(self, name: str) -> None:
        """Copy the host mirror of ``name`` to the device in one write (after a relayout moved many rows). Callers
        change the mirror in place (``host[name][:] = ...``): pages hand its list object to the kernels."""
        dtype = torch.int32 if name in self.int_names else torch.float32
        self.view(name).copy_(torch.tensor(self.host[name], dtype=dtype))
