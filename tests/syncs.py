"""Counting host syncs on the CPU: a proxy for CUDA's sync debug mode, for the samplers' tests."""

from __future__ import annotations

import torch

SYNCS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__")


def count_syncs(monkeypatch) -> list[int]:
    """Patch every Tensor method that would wait for a device (and boolean-mask indexing) to count
    its calls; returns the one-element counter, live."""
    count = [0]

    def counting(original):
        def wrapper(*args, **kwargs):
            count[0] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", counting(torch.nonzero))
    monkeypatch.setattr(torch, "masked_select", counting(torch.masked_select))
    for name in ("__getitem__", "__setitem__"):
        original = getattr(torch.Tensor, name)

        def indexing(self, index, *rest, _original=original):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                count[0] += 1
            return _original(self, index, *rest)
        monkeypatch.setattr(torch.Tensor, name, indexing)
    return count
