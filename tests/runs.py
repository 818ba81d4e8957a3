"""A tiny run directory, as `smdlm pretrain` leaves one, for the sampling and inspection tests."""

from __future__ import annotations

from pathlib import Path

import torch

from smdlm_cli.core import checkpoint
from smdlm_cli.core.data import stdlib_files
from smdlm_cli.core.models import save_model
from smdlm_cli.core.models.dit import build_dit
from smdlm_cli.core.softmask import SoftMask
from smdlm_cli.core.tokenizer import train_bpe

LENGTH = 24
_TOKENIZER = {}


def tokenizer():
    if "tok" not in _TOKENIZER:  # trained once per session: it is the slow part
        _TOKENIZER["tok"] = train_bpe((p.read_text(errors="replace") for p in stdlib_files()[:15]), 300)
    return _TOKENIZER["tok"]


def make_run(path: Path, softmask: SoftMask | None = None, seed: int = 0, causal: bool = False) -> Path:
    """Random tiny DiT (non-zero output layer, so samples depend on the input) + BPE + SoftMask;
    with `causal`, the AR baseline's layout."""
    tok = tokenizer()
    torch.manual_seed(seed)
    model = build_dit("tiny", len(tok), tok.mask_token_id, LENGTH, hidden_dim=32, n_blocks=2,
                      n_heads=2, cond_dim=16, dropout=0.0, causal=causal)
    for name, p in model.named_parameters():
        if "adaLN" in name or "output_layer.linear" in name:
            torch.nn.init.normal_(p, std=0.3)
    save_model(model, path)
    tok.save_pretrained(path / "tokenizer")
    if softmask is not None:
        checkpoint.save_softmask(path, softmask)
    return path
