"""Logits only at the rows that are read: a Denoiser's head applied to a subset of its positions.

Every backbone splits its forward into `hidden(...)` (B, W, D), the states the head reads, and
`head(rows)` (..., D) -> (..., V), a row-wise map: forward = head(hidden(...)). Training reads the
logits of the masked positions only (the SUBS loss is 0 elsewhere, the SM feedback is used only at
masks), so the head, the softmax and the cross-entropy run on those N rows instead of B * L, and
never as one fp32 (B, L, V) tensor: at OpenWebText shapes (V = 50k, L = 1024) that tensor is
several GB, and the head is a third of a 169M model's compute.

- `masked_index`: the flat indices of the masked positions of a training batch;
- `rows_nll`: the cross-entropy of N rows through the head, in chunks (each recomputed in the
  backward) when the rows are many;
- `chunk_rows`: how many rows of width V a loop over rows takes at once.

Not here: the two passes (twopass.py), the samplers' rows (samplers/rows.py), the losses' weights
(objectives.py).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from smdlm_cli.core.diffusion import NEG_INF, at_least_fp32

# (rows x V) elements of fp32 logits a chunk may hold: on the CPU a few MB, which stay in cache
# (a larger temporary is a fresh mmap, page-faulted in each time); on a GPU 1 GiB.
CPU_CHUNK = 1 << 21
GPU_CHUNK = 1 << 28
# Above this many logits the loss is chunked and each chunk's head recomputed in the backward: one
# more head forward on those rows, against (N, V) logits and their gradient held at once.
LOSS_CHUNK = 1 << 28


def splits(model) -> bool:
    """Whether `model` offers hidden() and head() (the three backbones, and wrappers of them)."""
    inner = getattr(model, "inner", None)  # a wrapper (guidance) splits iff what it wraps does
    return (callable(getattr(model, "hidden", None)) and callable(getattr(model, "head", None))
            and (inner is None or splits(inner)))


def chunk_rows(vocab: int, device: torch.device, budget: int | None = None) -> int:
    """Rows of width `vocab` per chunk of a loop over logit rows."""
    if budget is None:
        budget = CPU_CHUNK if device.type == "cpu" else GPU_CHUNK
    return max(1, budget // vocab)


def masked_index(is_mask: Tensor) -> Tensor:
    """Flat indices (N,) of the True entries of `is_mask` (B, L), in row-major order.

    Training only: N is data dependent, so this waits for the device once per micro-batch (a
    nonzero). A fixed-size gather would have to hold all B * L rows (the count is unknown before
    the noise is drawn), i.e. the very cost this avoids; outside a sampling loop one sync per
    micro-batch is small beside its forwards and backward. The samplers know their counts from
    the plan and never sync (samplers/rows.py).
    """
    return is_mask.reshape(-1).nonzero().squeeze(-1)


def _ce(logits: Tensor, labels: Tensor, mask_id: int, keep_mask: bool) -> Tensor:
    """Per-row CE in fp32 (float64 kept) of fresh head outputs; the [MASK] column out of the
    softmax unless keep_mask. Only that column is written, in place (N numbers, not a pass over
    N x V): a head ends in a linear map (or a LoRA/DoRA sum), whose backward never reads its output
    (autograd would refuse otherwise). A Python int index is a view, no host-to-device copy."""
    z = at_least_fp32(logits)
    if not keep_mask:
        z[:, mask_id] = NEG_INF
    return F.cross_entropy(z, labels, reduction="none")


def rows_nll(head: Callable[[Tensor], Tensor], h: Tensor, labels: Tensor, vocab: int,
             mask_id: int, keep_mask: bool = False, chunk: int | None = None) -> Tensor:
    """-log p(labels) of hidden rows h (N, D) through `head` (to `vocab` logits), per row (N,) fp32.

    The same numbers as diffusion.masked_nll at those rows. Where N * vocab exceeds LOSS_CHUNK
    (or `chunk` rows are asked for), the rows go through head + CE in chunks that keep no logits
    for the backward: each chunk is recomputed there (activation checkpointing of the head).
    """
    n = h.shape[0]
    if chunk is None:
        chunk = n if n * vocab <= LOSS_CHUNK else chunk_rows(vocab, h.device, LOSS_CHUNK)
    if chunk >= n:
        return _ce(head(h), labels, mask_id, keep_mask)

    def piece(hc: Tensor, lc: Tensor) -> Tensor:
        return _ce(head(hc), lc, mask_id, keep_mask)
    grad = torch.is_grad_enabled()
    parts = [checkpoint(piece, h[a:a + chunk], labels[a:a + chunk], use_reentrant=False)
             if grad else piece(h[a:a + chunk], labels[a:a + chunk]) for a in range(0, n, chunk)]
    return torch.cat(parts)
