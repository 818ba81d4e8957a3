"""SUBS log p at the masked positions only: the rows every transition and the SM feedback read.

A decoding step reads log p at masked positions and nowhere else: the MDLM family draws tokens at
the positions its plan unmasks, the confidence sampler ranks its candidates, the SM feedback mixes
at the masks, noise removal takes an argmax at the masks left. So the head, the log-softmax and the
[MASK] column's fill run on those N rows (rows.py of core), not on every (B, W) position: with
most of a sequence decoded, most rows would be computed for nothing.

N is known on the host before the step (the plan's counts, or the block-wise loop's counts), and
the rows are picked with `common.positions` (a stable sort, no nonzero): no host sync, so a GPU
runs ahead. The shapes change from step to step with the plan's counts, never with the model's
output. The rows are masked positions, whose SUBS log p is the log-softmax, except the `carry`
rows: unmasked positions (ReMDM's, about to be remasked) whose feedback is SUBS's carry-over.

Not here: which positions a transition reads (mdlm.py, confidence.py), the loop (loop.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from smdlm_cli.core.diffusion import NEG_INF, at_least_fp32
from smdlm_cli.core.rows import splits
from smdlm_cli.core.samplers.common import positions


@dataclass
class RowLogProbs:
    """log p (N, V) at the N flat positions `index` of a (B, W) window; `slot` (B * W,) maps a
    flat position to its row (positions without a row map to row 0: callers only ask for positions
    they listed)."""

    values: Tensor
    index: Tensor
    slot: Tensor
    batch: int
    width: int

    def take(self, flat: Tensor, out: Tensor | None = None) -> Tensor:
        """The rows of the flat positions `flat` (into the (B, W) window), in their order; into
        `out` (len(flat), V) when given."""
        slots = self.slot.index_select(0, flat)
        if out is None:
            return self.values.index_select(0, slots)
        return torch.index_select(self.values, 0, slots, out=out)


def masked_log_probs(logits: Tensor, mask_id: int, keep_mask: bool) -> Tensor:
    """SUBS log p of rows at masked positions (N, V), in fp32 (float64 kept): the [MASK] column
    at NEG_INF (unless keep_mask), then log-softmax. The same numbers as diffusion.subs_log_probs
    at those rows. `logits` is fresh (the head's rows, or a gather): only the [MASK] column is
    written, in place, through a Python int index (a view: no host-to-device copy, no sync)."""
    z = at_least_fp32(logits)
    if not keep_mask:
        z[:, mask_id] = NEG_INF
    return torch.log_softmax(z, dim=-1)


def forward_rows(model, masks: Tensor, rows: Sequence[int], counts: Sequence[int], mask_id: int,
                 keep_mask: bool, carry: tuple[Tensor, Tensor] | None = None,
                 **inputs) -> RowLogProbs:
    """One forward of `model` on `inputs` (a (B, W) window), log p at the masks of rows `rows`.

    `masks` (B, W) marks the masked positions; counts[j] of them in row rows[j] (from the plan).
    `carry` (flat positions, their tokens): unmasked positions whose rows are SUBS's carry-over,
    log p = 0 at the token and NEG_INF elsewhere (what subs_log_probs gives there). A model that
    splits (hidden + head) runs its head on the rows only; any other Denoiser runs its forward and
    the rows are gathered from its logits.
    """
    B, W = masks.shape
    idx = positions(masks, rows, counts)
    n = idx.shape[0]
    if carry is not None:
        idx = torch.cat((idx, carry[0]))
    if splits(model):
        h = model.hidden(**inputs)
        logits = model.head(h.reshape(B * W, -1).index_select(0, idx))
    else:
        out = model(**inputs)
        logits = out.reshape(B * W, out.shape[-1]).index_select(0, idx)
    values = masked_log_probs(logits, mask_id, keep_mask)
    if carry is not None:  # the carried-over rows: the head's numbers there are overwritten
        values[n:] = NEG_INF
        values[n:].scatter_(1, carry[1][:, None], 0.0)
    slot = torch.zeros(B * W, dtype=torch.long, device=idx.device)
    slot.index_copy_(0, idx, torch.arange(idx.shape[0], device=idx.device))
    return RowLogProbs(values, idx, slot, B, W)
