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
    go through SoftMask in chunks (a bound on memory), gathered into one buffer and with the
    entropy's temporaries in another, both allocated once per decode: a fresh (chunk, V)
    temporary is a fresh mapping, page-faulted in at every chunk. This update for 64 masks at
    V = 50k, one thread: 9.1 ms with fresh tensors, 6.6 ms with the buffers, 4.9 ms straight from
    the forward's rows. Chunks of 8 MB: in decoding at batch 8, 32 MB chunks took 75-81 ms a
    forward against 57-72 ms (one run, same process, alternating). On CUDA all rows go at once
    through the caching allocator.
    """

    CPU_CHUNK_BYTES = 8 << 20  # of one fp32 buffer: 41 rows at V = 50k, 13 at Dream's 152k

    def __init__(self, softmask: SoftMask, weight: Tensor, real: Tensor, n_start: Tensor,
                 schedule: str, mask_id: int):
        B, L = real.shape
        self.softmask, self.weight, self.real, self.mask_id = softmask, weight, real, mask_id
        self.n_start, self.schedule = n_start.clamp_min(1), schedule
        # rows without a forward of their own yet get lam = 0, i.e. exactly E[x] (no feedback)
        self.lam = torch.zeros(B, L, device=real.device,
                               dtype=torch.promote_types(weight.dtype, torch.float32))
        self.mixed = torch.zeros(B, L, weight.shape[1], dtype=weight.dtype, device=real.device)
        self.buffers: tuple[Tensor | None, Tensor] | None = None  # CPU: (gathered, scratch)

    def update(self, logp: RowLogProbs, x: Tensor | None = None, rows: Sequence[int] = (),
               counts: Sequence[int] = (), start: int = 0) -> None:
        """Refresh positions from a forward's logp over the columns [start, start + W).

        x None: every position logp holds, read straight from its rows (no gather). For a caller
        whose forward read exactly the rows it refreshes: the masks before the step, some of which
        the step just unmasked. Their entries go stale harmlessly (`embeds` multiplies lambda by
        the current mask) and cost less than a gather of the others (about a tenth of the rows
        over a 16-step decode, against a copy of every row). Otherwise: rows `rows` at the masks
        of x (the whole (B, L) state), counts[j] of them in that window of rows[j], gathered.

        A position ReMDM just remasked gets the one-hot feedback of its carried-over token (its
        carry row of logp), as in the official code.
        """
        W, vocab = logp.width, logp.values.shape[-1]
        L = self.lam.shape[1]
        idx = logp.index if x is None else positions(  # flat into (B, W)
            ((x == self.mask_id) & self.real)[:, start:start + W], rows, counts)
        store = idx + (idx // W) * (L - W) + start               # the same entries in (B, L)
        n = idx.shape[0] if x is None else sum(counts)
        chunk = n if logp.values.is_cuda else max(1, self.CPU_CHUNK_BYTES // (4 * vocab))
        for first in range(0, n, chunk):
            part = slice(first, first + chunk)
            gathered, scratch = self._buffers(logp.values, min(chunk, n - first), x is not None)
            z = logp.values[part] if x is None else logp.take(idx[part], out=gathered)
            lam, mixed = self.softmask.mixture(z, self.weight, normalized=True, scratch=scratch)
            self.lam.view(-1).index_copy_(0, store[part], lam)
            self.mixed.view(-1, self.mixed.shape[-1]).index_copy_(0, store[part], mixed)

    def _buffers(self, values: Tensor, m: int, gather: bool) -> tuple[Tensor | None, Tensor | None]:
        """(gathered rows or None, scratch): m-row views of buffers like `values`, kept across
        steps on the CPU (grown when a step needs more rows: the first usually has the most
        masks); (None, None) on CUDA (fresh tensors from the caching allocator)."""
        if values.is_cuda:
            return None, None
        have = self.buffers
        if have is None or have[1].shape[0] < m or have[1].shape[1:] != values.shape[1:] \
                or have[1].dtype != values.dtype or (gather and have[0] is None):
            self.buffers = have = (values.new_empty(m, values.shape[1]) if gather else None,
                                   values.new_empty(m, values.shape[1]))
        return (have[0][:m] if gather else None), have[1][:m]

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
