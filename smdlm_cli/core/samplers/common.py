"""What every transition shares: per-row random draws, the float64 categorical draw, logit filters.

Per-row draws: every random number of row b comes from the row's own torch.Generator, drawn in a
shape that depends only on that row (its own counts), so a row decoded in a batch draws exactly what
it would draw decoded alone. Draws are concatenated row after row in the order of `generators`.

Two nucleus (top-p) filters on purpose: the official MDLM/ReMDM one (`nucleus_official`, on
probabilities, keeps cumulative <= p, always keeps rank 0 and so DROPS the token that crosses p) and
the Hugging Face one Dream uses (`nucleus_hf`, on logits, KEEPS the crossing token).

Not here: which positions change (mdlm.py, confidence.py) or the decoding loop (loop.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_TINY64 = torch.finfo(torch.float64).tiny


def row_generators(seeds: Sequence[int], device: torch.device) -> list[torch.Generator]:
    """One generator per row, seeded with its seed, on the model's device."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def uniforms(generators: Sequence[torch.Generator], counts: Sequence[int], tail: tuple[int, ...],
             device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
    """U[0, 1) of shape (sum(counts), *tail): counts[j] leading rows from generators[j]."""
    parts = [torch.rand((n, *tail), generator=g, device=device, dtype=dtype)
             for g, n in zip(generators, counts) if n > 0]
    if not parts:
        return torch.empty((0, *tail), device=device, dtype=dtype)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def exponentials(generators: Sequence[torch.Generator], counts: Sequence[int],
                 tail: tuple[int, ...], device: torch.device) -> Tensor:
    """Exp(1) in float64, shaped like `uniforms`; floored at the smallest normal so p / E is finite."""
    parts = [torch.empty((n, *tail), device=device, dtype=torch.float64)
             .exponential_(generator=g).clamp_min_(_TINY64)
             for g, n in zip(generators, counts) if n > 0]
    if not parts:
        return torch.empty((0, *tail), device=device, dtype=torch.float64)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def categorical_fp64(probs: Tensor, generators: Sequence[torch.Generator],
                     counts: Sequence[int] | None = None) -> Tensor:
    """One draw per distribution in `probs` (N, ..., V), unnormalised allowed: argmax(p / E).

    The leading rows are split among the generators by `counts` (sum(counts) = N); by default one
    row per generator (probs (B, ..., V) of a batch). E ~ Exp(1) in float64, as ReMDM's fix of
    MDLM's float32 Gumbel draw, whose truncated noise lowers the effective temperature. A zero
    probability can never win (0 / E = 0 < p / E for any p > 0).
    """
    counts = [1] * len(generators) if counts is None else counts
    e = exponentials(generators, counts, tuple(probs.shape[1:]), probs.device)
    return (probs.double() / e).argmax(-1)


def gumbels(generators: Sequence[torch.Generator], counts: Sequence[int],
            device: torch.device) -> Tensor:
    """Standard Gumbel noise (sum(counts),) in float64: -log E, E ~ Exp(1)."""
    return -exponentials(generators, counts, (), device).log()


def with_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / T; T = 1 and T = 0 (argmax decoding) leave them unchanged."""
    if temperature in (0.0, 1.0):
        return logits
    return logits / temperature


def nucleus_official(probs: Tensor, top_p: float) -> Tensor:
    """MDLM/ReMDM top-p on probabilities: keep sorted cumulative <= p and rank 0, renormalise.

    The token whose cumulative mass first exceeds p is dropped (unlike Hugging Face).
    """
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) <= top_p
    keep[..., 0] = True
    sorted_p = sorted_p * keep
    sorted_p = sorted_p / sorted_p.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def nucleus_hf(logits: Tensor, top_p: float) -> Tensor:
    """Hugging Face / Dream top-p on logits: drop tokens after the cumulative mass passes p.

    The crossing token is kept; dropped logits become the dtype's lowest finite value, as in Dream.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # shift right: the token that crosses p stays
    drop[..., 0] = False
    drop = torch.zeros_like(drop).scatter_(-1, order, drop)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def top_k_filter(logits: Tensor, top_k: int | None) -> Tensor:
    """Keep the k largest logits (ties with the k-th kept, as in Dream); the rest to the lowest value."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def positions(indicator: Tensor, rows: Sequence[int], counts: Sequence[int]) -> Tensor:
    """Flat indices (into indicator.view(-1)) of the True entries of the listed rows, without a sync.

    `counts[j]` must be the number of True entries of row rows[j], known on the host from the plan:
    a stable sort puts each row's True positions first, in increasing position order, and the host
    counts cut them, so no nonzero() (which would wait for the device) is needed.
    """
    length = indicator.shape[-1]
    order = torch.sort((~indicator).to(torch.uint8), dim=-1, stable=True).indices
    parts = [order[b, :n] + b * length for b, n in zip(rows, counts) if n > 0]
    if not parts:
        return torch.empty(0, dtype=torch.long, device=indicator.device)
    return torch.cat(parts) if len(parts) > 1 else parts[0]
