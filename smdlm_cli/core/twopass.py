"""The model a training step runs: backbone + SoftMask, one pass (binary) or two (soft-masked).

Pass 1 predicts p without a graph; its logits are constants for pass 2, whose input at every
masked position is the soft-masked embedding (the paper's scheme). One module holds both, so DDP
sees every parameter and both passes. Used by the trainer, by validation and by `evaluate elbo`.

Given `nll_of` (x_0), the module returns the masked NLL (B, L) instead of logits, and computes
logits only where they are read (rows.py): pass 1 at the masked positions (the only ones whose
feedback is used), pass 2 at the masked positions (the only ones the SUBS loss scores), each
through the head in row chunks, never as a (B, L, V) tensor. The loss stays inside this forward,
so DDP (and a sharded model) sees the head used in its forward like every other parameter.

Not here: the noise and the loss (objectives.py), the loop (trainer.py).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smdlm_cli.core import rows
from smdlm_cli.core.diffusion import NEG_INF, keeps_mask, masked_nll
from smdlm_cli.core.softmask import SoftMask


class TwoPass(nn.Module):
    def __init__(self, backbone: nn.Module, softmask: SoftMask | None):
        super().__init__()
        self.backbone = backbone
        self.softmask = softmask

    def forward(self, xt: Tensor, use_sm: bool, attention_mask: Tensor | None = None,
                nll_of: Tensor | None = None, keep_mask: bool = False) -> Tensor:
        """Logits (B, L, V) of the last pass; or, given nll_of = x_0, -log p(x_0 | x_t) (B, L)
        in fp32 at the masked positions (0 elsewhere), as diffusion.masked_nll of those logits
        (keep_mask: the [MASK] column stays in the softmax)."""
        if nll_of is not None:
            return self._masked_nll(xt, use_sm, attention_mask, nll_of, keep_mask)
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

    def _masked_nll(self, xt: Tensor, use_sm: bool, attention_mask: Tensor | None, x0: Tensor,
                    keep_mask: bool) -> Tensor:
        bb = self.backbone
        if not rows.splits(bb):  # a Denoiser without hidden()/head(): score its full logits
            return masked_nll(self(xt, use_sm, attention_mask), x0, xt, bb.mask_id, keep_mask)
        idx = rows.masked_index(xt == bb.mask_id)
        if use_sm:
            with torch.no_grad():
                h = bb.hidden(input_ids=xt, attention_mask=attention_mask)
            embeds = self._soft_inputs(xt, h.flatten(0, 1).index_select(0, idx), idx)
            h = bb.hidden(inputs_embeds=embeds, attention_mask=attention_mask)
        else:
            h = bb.hidden(input_ids=xt, attention_mask=attention_mask)
        nll = rows.rows_nll(bb.head, h.flatten(0, 1).index_select(0, idx),
                            x0.reshape(-1).index_select(0, idx), bb.vocab_size, bb.mask_id,
                            keep_mask)
        return nll.new_zeros(xt.numel()).index_copy(0, idx, nll).view_as(xt)

    def _soft_inputs(self, xt: Tensor, h_rows: Tensor, idx: Tensor) -> Tensor:
        """Pass 2's input: SoftMask at the masked rows from pass 1's hidden rows h_rows (N, D),
        through the head a chunk at a time (no graph: the logits are data for pass 2)."""
        bb, sm = self.backbone, self.softmask
        weight = bb.embedding_weight()
        keep = keeps_mask(bb)
        step = rows.chunk_rows(bb.vocab_size, h_rows.device)
        lams, mixes = [], []
        for a in range(0, h_rows.shape[0], step):
            with torch.no_grad():
                logits = bb.head(h_rows[a:a + step])
                if not keep:  # SUBS: the [MASK] column out, in place (SoftMask would copy)
                    logits[:, bb.mask_id] = NEG_INF
            lam, mixed = sm.mixture(logits, weight)  # gradients to omega and E
            lams.append(lam)
            mixes.append(mixed)
        base = F.embedding(xt, weight)  # E[x], exactly, wherever nothing is masked
        if not lams:
            return base
        soft = SoftMask.combine(xt.reshape(-1).index_select(0, idx), torch.cat(lams),
                                torch.cat(mixes), weight)  # (1 - lam) E[mask] + lam mixed
        return base.reshape(-1, base.shape[-1]).index_copy(0, idx, soft).view_as(base)


def autocast(device: torch.device, precision: str):
    """bf16 autocast where asked (or on CUDA with precision auto); fp32 otherwise."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()
