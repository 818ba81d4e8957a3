"""log p(target | context) of a masked diffusion LM, estimated by LLaDA's Monte-Carlo ELBO.

A diffusion LM has no exact likelihood; LLaDA scores multiple-choice answers (and perplexity) with
its lower bound, in the low-variance form of its paper (Eq. 14, get_log_likelihood.py):

    log p(y | c) >= E_k [ (T / k) * sum over the k masked positions i of log p(y_i | c, y_masked) ]

with T = len(y), k uniform on {1..T} and the k masked positions a uniformly random subset of y
(the context is never masked). `n` Monte-Carlo samples estimate it; their k are stratified as
LLaDA's (k_1 uniform, then evenly spaced by T / n around {1..T}), which lowers the variance. Each
sample is one forward (two with SM: pass 1 on x_t without a graph, its SoftMask feedback into pass
2, exactly as the model was trained; see core/twopass.py). The cost of one score is therefore n
forwards (2n with SM) of a sequence of len(c) + T tokens, in batches of `batch_size` samples:
LLaDA uses n = 128 in general and n = 1 for single-token answers. log p excludes [MASK] (SUBS).

`greedy`: whether every target token is the argmax of one forward with the whole target masked
(what lm-eval's is_greedy asks of an AR model's teacher-forced argmax).

Not here: lm-eval's request handling (lmeval.py), tokenisation.
"""

from __future__ import annotations

import torch

from smdlm_cli.core.softmask import SoftMask
from smdlm_cli.core.twopass import TwoPass


def mask_counts(T: int, n: int, g: torch.Generator) -> list[int]:
    """n stratified mask counts in {1..T}: k_1 ~ U{1..T}, then k_1 + j T / n, wrapped into range."""
    k1 = int(torch.randint(1, T + 1, (), generator=g))
    return [int((round(k1 + j * T / n) - 1) % T) + 1 for j in range(n)]


@torch.no_grad()
def elbo_loglikelihood(model, softmask: SoftMask | None, context: list[int], target: list[int],
                       n: int, batch_size: int, g: torch.Generator) -> tuple[float, bool]:
    """(ELBO estimate of log p(target | context) in nats, greedy): see the module docstring.

    `g` (a CPU generator) draws the mask counts and positions, so a score depends only on it."""
    device = model.embedding_weight().device
    twopass = TwoPass(model, softmask)
    C, T = len(context), len(target)
    x0 = torch.tensor(context + target, device=device)[None]
    counts = mask_counts(T, n, g)
    total = 0.0
    for first in range(0, n, batch_size):
        ks = counts[first:first + batch_size]
        order = torch.stack([torch.randperm(T, generator=g) for _ in ks])
        masked = order < torch.tensor(ks)[:, None]              # k random target positions per row
        is_mask = torch.cat((torch.zeros(len(ks), C, dtype=torch.bool), masked), 1).to(device)
        xt = torch.where(is_mask, model.mask_id, x0.expand(len(ks), -1))
        # the masked NLL computed at the masked rows only (core/rows.py), as masked_nll of the logits
        nll = twopass(xt, use_sm=softmask is not None, nll_of=x0.expand(len(ks), -1)).sum(-1)
        total += float((nll.double() * T / torch.tensor(ks, device=device)).sum())
    xt = x0.clone()
    xt[:, C:] = model.mask_id
    argmax = twopass(xt, use_sm=softmask is not None)[0, C:].float()
    argmax[:, model.mask_id] = float("-inf")
    greedy = bool((argmax.argmax(-1) == x0[0, C:]).all())
    return -total / n, greedy
