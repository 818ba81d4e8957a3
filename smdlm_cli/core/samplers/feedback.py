"""SM feedback at inference: what each masked position carries into the next forward.

Shared by the planned loop (loop.py) and block-wise decoding (blockwise.py). A forward may cover a
window of columns [start, start + W) (the KV-cache windows); positions outside it keep what they had.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from smdlm_cli.core.samplers.common import positions
from smdlm_cli.core.samplers.rows import RowLogProbs
from smdlm_cli.core.softmask import SoftMask


class Feedback:
    """SM input of the next forward: lambda and the mixed embedding (the top-k mixture, or the
    whole tempered distribution's for the temperature variant) of each row's own last forward.

    Computed right after a transition step, from that forward's log p, only at masked positions:
    that is the whole cost of SM at inference, one pass over V per mask. On the CPU the rows go
    through SoftMask in chunks of a few MB: the temporaries then come from the allocator's heap and
    stay in cache, where a (masks, V) temporary would be a fresh mmap, page-faulted in at every step
    (several times slower).
    """

    CPU_CHUNK_BYTES = 8 << 20

    def __init__(self, softmask: SoftMask, weight: Tensor, real: Tensor, n_start: Tensor,
                 schedule: str, mask_id: int):
        B, L = real.shape
        self.softmask, self.weight, self.real, self.mask_id = softmask, weight, real, mask_id
        self.n_start, self.schedule = n_start.clamp_min(1), schedule
        # rows without a forward of their own yet get lam = 0, i.e. exactly E[x] (no feedback)
        self.lam = torch.zeros(B, L, device=real.device,
                               dtype=torch.promote_types(weight.dtype, torch.float32))
        self.mixed = torch.zeros(B, L, weight.shape[1], dtype=weight.dtype, device=real.device)

    def update(self, logp: RowLogProbs, x: Tensor, rows: Sequence[int], counts: Sequence[int],
               start: int = 0) -> None:
        """Refresh rows `rows` from a forward's logp over the columns [start, start + W) (at least
        at those rows' masks),
        at the masks of x (the whole (B, L) state), counts[j] of them in that window of rows[j].

        A position ReMDM just remasked gets the one-hot feedback of its carried-over token, as in
        the official code. Entries of other positions go stale harmlessly: `embeds` multiplies
        lambda by the current mask.
        """
        W, vocab = logp.width, logp.values.shape[-1]
        L = x.shape[1]
        n = sum(counts)
        window = ((x == self.mask_id) & self.real)[:, start:start + W]
        idx = positions(window, rows, counts)                    # flat into (B, W)
        store = idx + (idx // W) * (L - W) + start               # the same entries in (B, L)
        chunk = n if logp.values.is_cuda else max(1, self.CPU_CHUNK_BYTES // (4 * vocab))
        for first in range(0, n, chunk):
            j, s = idx[first:first + chunk], store[first:first + chunk]
            lam, mixed = self.softmask.mixture(logp.take(j), self.weight, normalized=True)
            self.lam.view(-1).index_copy_(0, s, lam)
            self.mixed.view(-1, self.mixed.shape[-1]).index_copy_(0, s, mixed)

    def embeds(self, x: Tensor, start: int = 0, end: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs_embeds, lam used, is_mask) of the columns [start, end) for the forward on x."""
        is_mask = (x == self.mask_id) & self.real
        lam = self.lam * is_mask
        if self.schedule != "none":
            t_dec = is_mask.sum(-1) / self.n_start  # share of the row's masks still to decode
            factor = t_dec if self.schedule == "linear" else (t_dec > 0.5).to(t_dec.dtype)
            lam = lam * factor[:, None]
        cols = slice(start, end)
        lam, is_mask = lam[:, cols], is_mask[:, cols]
        emb = SoftMask.combine(x[:, cols], lam, self.mixed[:, cols], self.weight)
        return emb, lam, is_mask
