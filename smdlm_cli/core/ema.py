"""Exponential moving average of the trained weights, and a context that swaps them in.

MDLM's warm-up: decay_n = min(d, (1 + n) / (10 + n)). The EMA weights are what a run publishes
and validates (the paper evaluates them); the raw weights keep training.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, params: dict[str, Tensor], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, Tensor]) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [params[k].detach().float() for k in keys],
                             1 - d)
        self.updates += 1


@contextmanager
def ema_weights(backbone: nn.Module, ema: EMA | None) -> Iterator[None]:
    """Run the block with the EMA weights in `backbone`, then restore the raw ones."""
    if ema is None:
        yield
        return
    raw = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    backbone.load_state_dict({**raw, **{k: v.to(raw[k].dtype) for k, v in ema.shadow.items()}})
    try:
        yield
    finally:
        backbone.load_state_dict(raw)
