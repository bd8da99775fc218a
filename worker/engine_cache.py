"""The batch's KV cache: one preallocated slab per layer that rows can join and leave.

Rows are left-padded to a common length, so every row's newest token sits in the same column and
one decode step appends one column for all. A slab has spare capacity, so a step writes its
column in place instead of re-concatenating the whole cache as transformers' DynamicCache does.
Joining (`merge`) pads the shorter side on the left; leaving (`select`) keeps some rows and drops
columns that have become padding for every remaining row. Padding is zero-filled: masked
attention gives it weight 0, and 0 * garbage could be NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

_GRAIN = 64  # capacity grows in whole multiples of this many columns


def _capacity(need: int) -> int:
    return -(-need // _GRAIN) * _GRAIN


class SlabLayer(DynamicLayer):
    """One layer's keys and values in a [rows, heads, capacity, head_dim] buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.kbuf: torch.Tensor | None = None
        self.vbuf: torch.Tensor | None = None

    @classmethod
    def of(cls, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int) -> SlabLayer:
        layer = cls()
        layer.dtype, layer.device = kbuf.dtype, kbuf.device
        layer.is_initialized = True
        layer.kbuf, layer.vbuf, layer.length = kbuf, vbuf, length
        layer._expose()
        return layer

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True
        n = key_states.shape[-2]
        self._reserve(self.length + n, key_states, value_states)
        assert self.kbuf is not None and self.vbuf is not None
        self.kbuf[:, :, self.length : self.length + n] = key_states
        self.vbuf[:, :, self.length : self.length + n] = value_states
        self.length += n
        return self._expose()

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def reset(self) -> None:
        self.kbuf = self.vbuf = None
        self.length = 0
        super().reset()

    def _reserve(self, need: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        old_cap = self.kbuf.shape[2] if self.kbuf is not None else 0
        if need <= old_cap:
            return
        cap = _capacity(max(need, 2 * old_cap))
        kbuf = keys.new_zeros(keys.shape[0], keys.shape[1], cap, keys.shape[3])
        vbuf = values.new_zeros(values.shape[0], values.shape[1], cap, values.shape[3])
        if self.kbuf is not None and self.vbuf is not None:
            kbuf[:, :, : self.length] = self.kbuf[:, :, : self.length]
            vbuf[:, :, : self.length] = self.vbuf[:, :, : self.length]
        self.kbuf, self.vbuf = kbuf, vbuf

    def _expose(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.kbuf is not None and self.vbuf is not None
        keys, values = self.kbuf[:, :, : self.length], self.vbuf[:, :, : self.length]
        self.keys, self.values = keys, values
        return keys, values


class SlabCache(DynamicCache):
    """A DynamicCache (so models treat it as one) made of `SlabLayer`s."""

    def __init__(self, layers: list[SlabLayer] | None = None) -> None:
        if layers is None:
            Cache.__init__(self, layer_class_to_replicate=SlabLayer)
        else:
            Cache.__init__(self, layers=list(layers))

    @property
    def slabs(self) -> list[SlabLayer]:
        return [layer for layer in self.layers if isinstance(layer, SlabLayer)]

    @property
    def length(self) -> int:
        return self.slabs[0].length if self.layers else 0


def merge(parts: Sequence[SlabCache], *, spare: int = _GRAIN) -> SlabCache:
    """Stack caches along the batch dim, left-padding each to the longest."""
    length = max(p.length for p in parts)
    layers: list[SlabLayer] = []
    for per_layer in zip(*(p.slabs for p in parts)):
        rows = sum(layer.kbuf.shape[0] for layer in per_layer if layer.kbuf is not None)
        first = per_layer[0]
        assert first.kbuf is not None and first.vbuf is not None
        _, heads, _, kdim = first.kbuf.shape
        vdim = first.vbuf.shape[-1]
        cap = _capacity(length + spare)
        kbuf = first.kbuf.new_zeros(rows, heads, cap, kdim)
        vbuf = first.vbuf.new_zeros(rows, heads, cap, vdim)
        row = 0
        for layer in per_layer:
            assert layer.kbuf is not None and layer.vbuf is not None
            n, pad = layer.kbuf.shape[0], length - layer.length
            kbuf[row : row + n, :, pad:length] = layer.kbuf[:, :, : layer.length]
            vbuf[row : row + n, :, pad:length] = layer.vbuf[:, :, : layer.length]
            row += n
        layers.append(SlabLayer.of(kbuf, vbuf, length))
    return SlabCache(layers)


def select(cache: SlabCache, rows: torch.Tensor, *, drop_left: int = 0, spare: int = _GRAIN) -> SlabCache:
    """Keep only `rows` (indices), dropping the first `drop_left` columns of every layer."""
    length = cache.length - drop_left
    layers: list[SlabLayer] = []
    for layer in cache.slabs:
        assert layer.kbuf is not None and layer.vbuf is not None
        rows_on = rows.to(layer.kbuf.device)
        kbuf = layer.kbuf.new_zeros(len(rows), layer.kbuf.shape[1], _capacity(length + spare), layer.kbuf.shape[3])
        vbuf = layer.vbuf.new_zeros(len(rows), layer.vbuf.shape[1], kbuf.shape[2], layer.vbuf.shape[3])
        kbuf[:, :, :length] = layer.kbuf[:, :, drop_left : layer.length].index_select(0, rows_on)
        vbuf[:, :, :length] = layer.vbuf[:, :, drop_left : layer.length].index_select(0, rows_on)
        layers.append(SlabLayer.of(kbuf, vbuf, length))
    return SlabCache(layers)


def repeat(cache: SlabCache, rows: int, *, room: int = _GRAIN) -> SlabCache:
    """A new cache holding `rows` copies of a one-row cache, with `room` free columns after it."""
    layers: list[SlabLayer] = []
    for layer in cache.slabs:
        assert layer.kbuf is not None and layer.vbuf is not None
        cap = _capacity(layer.length + room)
        kbuf = layer.kbuf.new_zeros(rows, layer.kbuf.shape[1], cap, layer.kbuf.shape[3])
        vbuf = layer.vbuf.new_zeros(rows, layer.vbuf.shape[1], cap, layer.vbuf.shape[3])
        kbuf[:, :, : layer.length] = layer.kbuf[:1, :, : layer.length]
        vbuf[:, :, : layer.length] = layer.vbuf[:1, :, : layer.length]
        layers.append(SlabLayer.of(kbuf, vbuf, layer.length))
    return SlabCache(layers)
