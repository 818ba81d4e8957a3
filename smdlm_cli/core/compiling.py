"""train.compile: torch.compile each transformer block's forward for training.

Each block's forward is compiled on its own: the blocks share one code object, so their graphs
serve them all (one with gradients, one without for SM's pass 1, one in eval mode for
validation); both passes of an SM step feed the blocks a hidden state of the same shape, so
binary and SM steps share them; and hooks on the block (FSDP's gather and reshard) stay outside
the graphs. The weights and their names do not change, so saving and loading are untouched.

Decoding (`--compile` of sample and evaluate) compiles the same blocks where every forward has
the same shapes: the full-sequence forwards of decoding without a KV cache (the head, which runs on
a different number of rows each step, stays eager). With a cache the window a block sees changes
length at every step (prefix and dual caches, blocks of different sizes), and the AR sampler's
sequence grows: those are refused rather than recompiled step after step.
Not here: what is trained or how (trainer.py).
"""

from __future__ import annotations

import shutil

import torch
from torch import nn

from smdlm_cli.core.errors import UserError


def compile_blocks(backbone: nn.Module, what: str = "train.compile = true",
                   instead: str = "set train.compile = false") -> None:
    """Replace each block's forward by its compiled version, in place (once: a block already
    compiled is left as it is, so a model decoded many times is compiled once)."""
    from smdlm_cli.core.sharding import blocks

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        raise UserError(f"{what}: no C compiler (cc) on this machine; torch.compile needs one, "
                        f"so install it or {instead}")
    for block in blocks(backbone):
        if not getattr(block, "smdlm_compiled", False):
            block.forward = torch.compile(block.forward)
            block.smdlm_compiled = True


def compile_for_decoding(model: nn.Module, sampler: str, options: dict) -> None:
    """--compile: the blocks compiled for decoding without a KV cache (see the module docstring)."""
    cache = options.get("cache", "none")
    if cache not in (None, "none"):
        raise UserError(f"--compile with cache = {cache}: the cached window changes length at "
                        f"every step; expected cache = none, or leave --compile out")
    if sampler == "ar":
        raise UserError("--compile with the ar sampler: its sequence grows at every step; "
                        "expected a diffusion sampler, or leave --compile out")
    compile_blocks(model, "--compile", "leave --compile out")
