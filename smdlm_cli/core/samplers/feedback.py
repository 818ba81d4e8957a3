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
    that is the whole cost of SM at inference, a few passes over V per mask. On the CPU the rows
    go through SoftMask in chunks of a few MB, gathered into one buffer and with the entropy's
    temporaries in another, both allocated once per decode: a fresh (chunk, V) temporary is a
    fresh mapping, page-faulted in at every chunk, and that cost four times the arithmetic
    (0.51 against 0.125 ms per row at V = 50k, one thread). On CUDA all rows go at once through
    the caching allocator.
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
        self.buffers: tuple[Tensor, Tensor] | None = None  # CPU: (rows, scratch), (<= chunk, V)

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
            rows, scratch = self._buffers(logp.values, len(j))
            lam, mixed = self.softmask.mixture(logp.take(j, out=rows), self.weight,
                                               normalized=True, scratch=scratch)
            self.lam.view(-1).index_copy_(0, s, lam)
            self.mixed.view(-1, self.mixed.shape[-1]).index_copy_(0, s, mixed)

    def _buffers(self, values: Tensor, m: int) -> tuple[Tensor | None, Tensor | None]:
        """(rows, scratch): m-row views of two buffers like `values`, kept across steps on the
        CPU (grown when a step needs more rows: the first usually has the most masks); (None,
        None) on CUDA (fresh tensors from the caching allocator)."""
        if values.is_cuda:
            return None, None
        have = self.buffers
        if have is None or have[0].shape[0] < m or have[0].shape[1:] != values.shape[1:] \
                or have[0].dtype != values.dtype:
            self.buffers = have = (values.new_empty(m, values.shape[1]),
                                   values.new_empty(m, values.shape[1]))
        return have[0][:m], have[1][:m]

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
