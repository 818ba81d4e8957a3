"""Left-to-right sampling from the AR baseline (a causal DiT): the reference row of the sweep.

Each masked column is filled in order, one forward per column that any row generates (NFE = that
number of columns), from the next-token logits of the prefix: p^(1/T), the official nucleus and the
float64 race of the MDLM sampler, [MASK] never drawn. A row draws only at its own masked columns, so
it decodes the same in any batch and alone. No KV cache: the forward re-reads the prefix, which is
fine for the short blocks the baseline is trained on.

Not here: the diffusion samplers and SM (an AR model has no masks to soften); loop.py dispatches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from smdlm_cli.core.samplers.common import row_generators
from smdlm_cli.core.samplers.mdlm import mdlm_draw

OPTIONS = {"top_p": 1.0, "temperature": 1.0}


def check_options(o: dict) -> list[str]:
    """Problems with the AR sampler's options, one line each."""
    bad = []
    if not 0.0 < o["top_p"] <= 1.0:
        bad.append(f"top_p = {o['top_p']}, expected a number in (0, 1]")
    if not o["temperature"] > 0.0:
        bad.append(f"temperature = {o['temperature']}, expected a positive number")
    return bad


@torch.no_grad()
def decode(model, x: Tensor, generator_seeds: Sequence[int], real: Tensor, options: dict):
    """(tokens, nfe): x's masked real positions (never column 0) filled left to right."""
    mask_id = model.mask_id
    gen = (x == mask_id) & real
    gen_host = gen.cpu()  # host transfer, before the loop: which rows generate at which column
    generators = row_generators(generator_seeds, x.device)
    draw = mdlm_draw(options["temperature"], options["top_p"], mask_id)
    columns = [c for c in range(1, x.shape[1]) if gen_host[:, c].any()]
    rows = {c: [b for b in range(x.shape[0]) if gen_host[b, c]] for c in columns}
    index = {c: torch.tensor(r, device=x.device) for c, r in rows.items()}  # copied before the loop
    for c in columns:
        logits = model(input_ids=x[:, :c])[:, -1].float()
        logits[:, mask_id] = float("-inf")
        tokens = draw(logits[index[c]].log_softmax(-1), [generators[b] for b in rows[c]],
                      [1] * len(rows[c]))
        x = x.index_put((index[c], torch.full_like(index[c], c)), tokens)
    return x, len(columns)
