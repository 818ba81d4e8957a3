"""Masked (absorbing-state) diffusion maths of MDLM: schedule, forward process, time sampling, SUBS, ELBO.

Log-linear schedule alpha_t = 1 - (1 - eps) t with eps = 1e-3, as the official code hard-codes it:
a token is masked at time t with probability 1 - alpha_t, and the continuous-time ELBO weight
-alpha'_t / (1 - alpha_t) is exactly 1/t. The SUBS parameterisation never predicts [MASK] and carries
unmasked tokens over, so only masked positions contribute to the loss.

The [MASK] column is a model-level setting, `model.mask_logit` (MASK_LOGIT): "drop" is SUBS, the
MDLM DiT's; "keep" leaves the model's [MASK] logit in every softmax, as the official Dream code
does (its fine-tuning loss is a full-vocabulary cross-entropy, its SM entropy, top-k and sampler
candidates see the [MASK] column). Both carry unmasked tokens over.

Not here: models, soft-masking, samplers (which use `subs_log_probs`), the training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-3
NEG_INF = -1e6  # the official code's "minus infinity": finite, so 0 * logp stays 0 in entropies
MASK_LOGIT = ("drop", "keep")


def at_least_fp32(x: Tensor) -> Tensor:
    """fp32 for half-precision logits, float64 kept (tests compare rules in float64, where
    float32 roundoff cannot decide a near-tie between two confidences)."""
    return x if x.dtype == torch.float64 else x.float()


def keeps_mask(model) -> bool:
    """Whether `model` keeps its [MASK] logit in the softmax (Dream layout) or drops it (SUBS).

    Read through wrappers (peft forwards unknown attributes to the base model)."""
    return getattr(model, "mask_logit", "drop") == "keep"


def alpha(t: Tensor) -> Tensor:
    """Share of tokens still clean at time t."""
    return 1 - (1 - EPS) * t


def mask_prob(t: Tensor) -> Tensor:
    """Probability that a token is masked at time t: 1 - alpha_t."""
    return (1 - EPS) * t


def loss_weight(t: Tensor) -> Tensor:
    """-alpha'_t / (1 - alpha_t) = 1/t: the ELBO weight of a masked token's cross-entropy."""
    return 1.0 / t


def sample_t(n: int, t_min: float = EPS, t_max: float = 1.0, antithetic: bool = True,
             generator: torch.Generator | None = None, device=None) -> Tensor:
    """n diffusion times in [t_min, t_max]; antithetic = one per stratum of [0, 1) (lower variance)."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    if antithetic:
        u = (u / n + torch.arange(n, device=device, dtype=torch.float64) / n) % 1
    return (t_min + (t_max - t_min) * u).float()


def q_xt(x0: Tensor, t: Tensor, mask_id: int, generator: torch.Generator | None = None,
         maskable: Tensor | None = None, u: Tensor | None = None, floor: float = 0.0) -> Tensor:
    """Sample x_t ~ q(x_t | x_0): each token independently masked with probability 1 - alpha_t.

    t has one value per row (or one for all). `maskable` (B, L) bool restricts masking (fine-tuning
    never masks the prompt). `u` (B, L) uniform noise may be given instead of a generator. `floor`
    is added to the probability: the SM paper's fine-tuning collator masks with (1 - eps) t + eps.
    """
    if u is None:
        u = torch.rand(x0.shape, generator=generator, device=x0.device)
    p = mask_prob(t) + floor if floor else mask_prob(t)
    is_mask = u < p.to(x0.device).unsqueeze(-1)
    if maskable is not None:
        is_mask &= maskable
    return torch.where(is_mask, torch.full_like(x0, mask_id), x0)


def _without_mask(logits: Tensor, mask_id: int) -> Tensor:
    """fp32 logits with the [MASK] column at NEG_INF (a new tensor; the model's output is untouched).

    The column is selected by comparing an arange with a Python int, not by indexing with a tensor
    built from [mask_id]: that would be a host-to-device copy, a sync on every sampling step.
    """
    column = torch.arange(logits.shape[-1], device=logits.device) == mask_id
    return at_least_fp32(logits).masked_fill(column, NEG_INF)


def subs_log_probs(logits: Tensor, xt: Tensor, mask_id: int, keep_mask: bool = False) -> Tensor:
    """SUBS: log p_theta(x_0 | x_t) in fp32 (float64 kept) with [MASK] never predicted and unmasked tokens carried over.

    keep_mask=True leaves the [MASK] column in the softmax (mask_logit "keep"); the carry-over is
    the same. For decoding (no autograd): the carry-over is written in place into the log-softmax
    output, so a step allocates two (B, L, V) tensors rather than four.
    """
    logp = torch.log_softmax(at_least_fp32(logits) if keep_mask else _without_mask(logits, mask_id),
                             dim=-1)
    keep = (xt != mask_id).unsqueeze(-1)
    logp.masked_fill_(keep, NEG_INF)
    index = xt.unsqueeze(-1)
    # Unmasked rows get 0 at their own token; masked rows write back what is already there.
    return logp.scatter_(-1, index, torch.where(keep, 0.0, logp.gather(-1, index)))


def masked_nll(logits: Tensor, x0: Tensor, xt: Tensor, mask_id: int,
               keep_mask: bool = False) -> Tensor:
    """-log p_theta(x_0 | x_t) per position (B, L) in fp32; 0 at unmasked positions (SUBS carry-over).

    The [MASK] logit is excluded from the softmax, as SUBS does, unless keep_mask (the official
    Dream fine-tuning's full-vocabulary cross-entropy).
    """
    logits = at_least_fp32(logits) if keep_mask else _without_mask(logits, mask_id)
    labels = torch.where(xt == mask_id, x0, torch.full_like(x0, -100))
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
    return nll.view_as(x0)


def elbo_per_token(logits: Tensor, x0: Tensor, xt: Tensor, t: Tensor, mask_id: int) -> Tensor:
    """The MDLM continuous-time ELBO term of each position: masked_nll / t (B, L)."""
    return masked_nll(logits, x0, xt, mask_id) * loss_weight(t).unsqueeze(-1)


def causal_nll(logits: Tensor, x0: Tensor) -> Tensor:
    """The AR baseline's loss per position (B, L): -log p(x_l | x_<l) from row l - 1 of next-token
    logits; 0 at position 0 (BOS is given). Summed over a block it is the exact NLL of the block, so
    divided by L it compares with the ELBO per token of the diffusion models."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), x0[:, 1:].flatten(), reduction="none")
    return F.pad(nll.view(x0.shape[0], -1), (1, 0))
