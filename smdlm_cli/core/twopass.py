"""The model a training step runs: backbone + SoftMask, one pass (binary) or two (soft-masked).

Pass 1 predicts p without a graph; its logits are constants for pass 2, whose input at every
masked position is the soft-masked embedding (the paper's scheme). One module holds both, so DDP
sees every parameter and both passes. Used by the trainer, by validation and by `evaluate elbo`.

Not here: the noise and the loss (objectives.py), the loop (trainer.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from smdlm_cli.core.diffusion import keeps_mask
from smdlm_cli.core.softmask import SoftMask


class TwoPass(nn.Module):
    def __init__(self, backbone: nn.Module, softmask: SoftMask | None):
        super().__init__()
        self.backbone = backbone
        self.softmask = softmask

    def forward(self, xt: Tensor, use_sm: bool, attention_mask: Tensor | None = None) -> Tensor:
        if not use_sm:  # binary MDLM, or the AR baseline (xt is then x0)
            return self.backbone(input_ids=xt, attention_mask=attention_mask)
        # SoftMask drops the [MASK] column itself, which gives the SUBS distribution the official
        # MDLM code feeds back at every masked position (the only ones soft-masked); a model with
        # mask_logit "keep" (Dream) keeps it, as the official Dream fine-tuning does.
        with torch.no_grad():
            prev = self.backbone(input_ids=xt, attention_mask=attention_mask)
        embeds = self.softmask(xt, prev, self.backbone.embedding_weight(), self.backbone.mask_id,
                               keep_mask=keeps_mask(self.backbone))
        return self.backbone(inputs_embeds=embeds, attention_mask=attention_mask)


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked (or on CUDA with precision auto); fp32 otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
