"""Reading a run directory: find it, and load what decoding needs (model, tokenizer, SoftMask, and
the sampler defaults of sampler_defaults.py).

A run is what `smdlm pretrain` or `finetune` writes (or any MDLM / Dream model directory with a
tokenizer). `load` returns a `Run` that sample, evaluate, sweep, inspect-lambda, the lm-eval
adapter and the Python API all decode from.

Not here: writing runs (checkpoint.py, trainer.py), the recipe (smdlm_cli/recipe.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from smdlm_cli.core import checkpoint, sampler_defaults
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.models import load_model
from smdlm_cli.core.softmask import SoftMask
from smdlm_cli.core.tokenizer import load_tokenizer


@dataclass
class Run:
    path: Path
    model: torch.nn.Module
    tokenizer: object
    softmask: SoftMask | None
    decoding: dict = field(default_factory=dict)  # sampler.json, or the model's built-in defaults

    @property
    def default_sampler(self) -> str:
        if self.decoding:
            return self.decoding["sampler"]
        return "ar" if getattr(self.model.config, "causal", False) else "mdlm"


def resolve(ckpt: str | Path | None, announce=None) -> Path:
    """--ckpt DIR, or the newest run under ./runs (said through `announce`, if given)."""
    if ckpt is None:
        run_dir = checkpoint.find_latest_run("runs")
        if announce is not None:
            announce(f"sampling from {run_dir} (the newest run under runs/; --ckpt picks another)")
        return run_dir
    if not Path(ckpt).is_dir():
        raise UserError(f"--ckpt {ckpt}: no such run directory")
    return Path(ckpt)


def load(run_dir: str | Path, device: torch.device | str = "cpu") -> Run:
    """The run's model (eval mode, on `device`), tokenizer and SoftMask (None for binary runs)."""
    run_dir = Path(run_dir)
    if not any((run_dir / name).exists() for name in ("config.json", "adapter", "state")):
        raise UserError(f"{run_dir}: not a run directory (no config.json, adapter/ or state/); "
                        f"expected one written by smdlm pretrain or finetune, or a model directory")
    tok_dir = run_dir / "tokenizer"
    tok = load_tokenizer(str(tok_dir if tok_dir.is_dir() else run_dir))
    model = load_model(str(run_dir), device=torch.device(device)).eval()
    if len(tok) > model.vocab_size or tok.mask_token_id != model.mask_id:
        raise UserError(f"{run_dir}: tokenizer ({len(tok)} ids, mask {tok.mask_token_id}) does not "
                        f"match the model ({model.vocab_size} ids, mask {model.mask_id})")
    softmask = checkpoint.load_softmask(run_dir)
    if softmask is not None:
        softmask.check_vocabulary(model.vocab_size, str(run_dir))
    return Run(run_dir, model, tok, softmask, sampler_defaults.read(run_dir, model))
