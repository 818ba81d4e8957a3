"""Seeds derived from (seed, step, rank, ...) tuples, so every draw of a run can be replayed.

A resumed run, a rank of a multi-process run and a validation pass each get their randomness from
a fixed mix of integers, never from a global stream that depends on what ran before.
"""

from __future__ import annotations

import torch


def mix(*parts: int) -> int:
    """A fixed 63-bit mix of the parts (not Python's hash, which is salted per process)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9 % (1 << 63)
    return h


def generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(mix(*parts))
