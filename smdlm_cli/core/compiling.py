"""train.compile: torch.compile each transformer block's forward for training.

Each block's forward is compiled on its own: the blocks share one code object, so their graphs
serve them all (one with gradients, one without for SM's pass 1, one in eval mode for
validation); both passes of an SM step feed the blocks a hidden state of the same shape, so
binary and SM steps share them; and hooks on the block (FSDP's gather and reshard) stay outside
the graphs. The weights and their names do not change, so saving and loading are untouched.

Decoding is not compiled: with a KV cache the length a block sees changes at every step (prefix
and dual caches, blocks of different sizes), so a compiled graph would recompile or need padded
shape buckets throughout the samplers.
Not here: what is trained or how (trainer.py).
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from smdlm_cli.core.errors import UserError


def compile_blocks(backbone: nn.Module) -> None:
    """Replace each block's forward by its compiled version, in place."""
    from smdlm_cli.core.sharding import blocks

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        raise UserError("train.compile = true: no C compiler (cc) on this machine; torch.compile "
                        "needs one, so install it or set train.compile = false")
    for block in blocks(backbone):
        block.forward = torch.compile(block.forward)
