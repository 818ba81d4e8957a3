"""The window KV cache of block-wise decoding (Fast-dLLM), shared by every backbone.

A `KVCache` holds each layer's keys (after RoPE) and values for the whole sequence:
(B, H_kv, L, head_dim). A forward with a cache computes the queries of one window [start, end)
only: an empty cache (a refresh) takes the window [0, L) and stores every key; afterwards a window
forward writes its fresh keys and values over the window's old ones, in place, and attends over
all of them. The prefix cache is the window [block start, L) (everything before it reused); the
dual cache is [block start, block end) (the suffix's keys reused too, from the last refresh).

The windows are the same columns in every row (decoding aligns the rows' blocks, see
samplers/blockwise.py), so a window is a slice and the writes are plain slice assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class KVCache:
    keys: list[Tensor | None]
    values: list[Tensor | None]
    start: int = 0          # the window the next forward computes: positions [start, end)
    end: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> "KVCache":
        return cls([None] * n_layers, [None] * n_layers)

    @property
    def filled(self) -> bool:
        return self.keys[0] is not None

    def window(self, start: int, end: int) -> "KVCache":
        self.start, self.end = start, end
        return self

    def positions(self, width: int, device: torch.device) -> Tensor:
        """Default positions of the window's tokens: [start, start + width), or [0, width) to fill."""
        first = self.start if self.filled else 0
        return torch.arange(first, first + width, device=device)

    def attend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the window's keys and values; return the keys and values to attend over."""
        if self.keys[layer] is None:  # a refresh: the window is the whole sequence
            self.keys[layer], self.values[layer] = k, v
            return k, v
        self.keys[layer][:, :, self.start:self.end] = k
        self.values[layer][:, :, self.start:self.end] = v
        return self.keys[layer], self.values[layer]
