"""The decoder stack the rotary models share (Dream's Qwen2 layout, LLaDA): RoPE tables for the
positions of the given tokens, a key-padding mask, then each block in turn, with activation
checkpointing while training when asked.

Not here: the blocks themselves, embeddings or heads (dream.py, llada.py).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from smdlm_cli.core.models.cache import KVCache


def run_blocks(blocks: nn.ModuleList, h: Tensor, rope: Callable, head_dim: int, theta: float,
               attention_mask: Tensor | None, cache: KVCache | None, position_ids: Tensor | None,
               checkpointing: bool) -> Tensor:
    """attention_mask (B, L_total) marks real key positions (padding anywhere); position_ids
    (B, W) the RoPE positions of the given tokens (default: their columns, or the cache's)."""
    W = h.shape[1]
    if position_ids is None:
        position_ids = (cache.positions(W, h.device) if cache is not None
                        else torch.arange(W, device=h.device))
    cos, sin = rope(position_ids, head_dim, theta, h.dtype)
    # key padding only (B, 1, 1, L): pad queries still attend, so no row is all -inf (NaN)
    mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    for i, block in enumerate(blocks):
        if checkpointing:
            h = checkpoint(block, h, cos, sin, mask, cache, i, use_reentrant=False)
        else:
            h = block(h, cos, sin, mask, cache, i)
    return h
