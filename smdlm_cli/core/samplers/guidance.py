"""Classifier-free guidance without a classifier, as LLaDA's `cfg_scale`, for every Denoiser.

LLaDA's unsupervised guidance: the unconditional input is the same sequence with the prompt
replaced by mask tokens, and the logits used are un + (scale + 1) (cond - un). `Guided` wraps a
model so that every forward runs both inputs as one batch of 2B rows and returns the guided logits;
the samplers, SM feedback and the KV cache (which then simply holds 2B rows) see a Denoiser like
any other. With soft-masked inputs the unconditional rows take E[mask] at the prompt positions and
the same soft embeddings elsewhere. Scale 0 is no guidance (the wrapper is not used).

Cost: each forward computes twice the rows. Not here: which positions are the prompt (the caller
passes them: the real positions not to generate).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Guided(nn.Module):
    """`model` with LLaDA's guidance at `scale` for a batch whose prompt positions are `prompt`."""

    def __init__(self, model: nn.Module, scale: float, prompt: Tensor):
        super().__init__()
        self.inner, self.scale, self.prompt = model, scale, prompt
        self.mask_id, self.vocab_size = model.mask_id, model.vocab_size
        self.config = getattr(model, "config", None)
        self.train(model.training)  # the loop restores the mode it finds: the inner model's

    def embedding_weight(self) -> Tensor:
        return self.inner.embedding_weight()

    def empty_cache(self):
        return self.inner.empty_cache()

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None, cache=None,
                position_ids: Tensor | None = None) -> Tensor:
        cond, un = self.inner(**self._both(input_ids, inputs_embeds, attention_mask, cache,
                                           position_ids)).chunk(2)
        return un + (self.scale + 1) * (cond - un)

    def hidden(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
               attention_mask: Tensor | None = None, cache=None,
               position_ids: Tensor | None = None) -> Tensor:
        """(B, W, 2D): each row's conditional and unconditional states side by side, so that any
        subset of rows goes through `head` with both halves (used only if the inner model splits)."""
        cond, un = self.inner.hidden(**self._both(input_ids, inputs_embeds, attention_mask, cache,
                                                  position_ids)).chunk(2)
        return torch.cat((cond, un), dim=-1)

    def head(self, h: Tensor) -> Tensor:
        """Guided logits of rows (..., 2D) from `hidden`: the same operations as `forward`."""
        cond, un = (self.inner.head(part) for part in h.chunk(2, dim=-1))
        return un + (self.scale + 1) * (cond - un)

    def _both(self, input_ids, inputs_embeds, attention_mask, cache, position_ids) -> dict:
        """The inner model's inputs: the conditional rows, then the unconditional ones."""
        width = (input_ids if inputs_embeds is None else inputs_embeds).shape[1]
        # a window forward computes the columns [start, end) of the sequence (models/cache.py)
        start = cache.start if cache is not None and cache.filled else 0
        prompt = self.prompt[:, start:start + width]
        if inputs_embeds is None:
            both = {"input_ids": torch.cat((input_ids, input_ids.masked_fill(prompt, self.mask_id)))}
        else:
            masked = self.embedding_weight()[self.mask_id].to(inputs_embeds.dtype)
            un = torch.where(prompt[..., None], masked, inputs_embeds)
            both = {"inputs_embeds": torch.cat((inputs_embeds, un))}
        if attention_mask is not None:
            both["attention_mask"] = torch.cat((attention_mask, attention_mask))
        if position_ids is not None:
            both["position_ids"] = (torch.cat((position_ids, position_ids))
                                    if position_ids.dim() == 2 else position_ids)
        if cache is not None:
            both["cache"] = cache
        return both
