"""Schedule, forward masking, time sampling, SUBS and the ELBO weights."""

import math

import torch

from smdlm_cli.core import diffusion

MASK = 9


def test_mask_rate_follows_the_schedule():
    x0 = torch.zeros(4, 20000, dtype=torch.long)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0])
    xt = diffusion.q_xt(x0, t, MASK, generator=torch.Generator().manual_seed(0))
    rate = (xt == MASK).float().mean(-1)
    torch.testing.assert_close(rate, (1 - diffusion.EPS) * t, atol=0.01, rtol=0)
    assert set(xt.unique().tolist()) <= {0, MASK}


def test_maskable_restricts_masking():
    x0 = torch.arange(40).view(2, 20) % 7
    maskable = torch.zeros(2, 20, dtype=torch.bool)
    maskable[:, 10:] = True
    xt = diffusion.q_xt(x0, torch.ones(2), MASK, generator=torch.Generator().manual_seed(0),
                        maskable=maskable)
    assert torch.equal(xt[:, :10], x0[:, :10])
    assert (xt[:, 10:] == MASK).float().mean() > 0.95


def test_antithetic_times_cover_one_stratum_each():
    t = diffusion.sample_t(8, 1e-3, 1.0, antithetic=True, generator=torch.Generator().manual_seed(0))
    u = (t - 1e-3) / (1 - 1e-3)
    strata = torch.floor(u * 8).long().sort().values
    assert torch.equal(strata, torch.arange(8))
    assert ((t >= 1e-3) & (t <= 1.0)).all()
    t = diffusion.sample_t(1000, 0.2, 0.8, antithetic=False, generator=torch.Generator().manual_seed(1))
    assert t.min() >= 0.2 and t.max() <= 0.8


def test_elbo_weight_is_one_over_t():
    # -alpha'(t) / (1 - alpha(t)) computed from the schedule by finite differences.
    for t in (0.01, 0.3, 0.9):
        h = 1e-6
        d_alpha = (diffusion.alpha(torch.tensor(t + h, dtype=torch.float64))
                   - diffusion.alpha(torch.tensor(t - h, dtype=torch.float64))) / (2 * h)
        weight = -d_alpha / (1 - diffusion.alpha(torch.tensor(t, dtype=torch.float64)))
        assert math.isclose(weight.item(), diffusion.loss_weight(torch.tensor(t)).item(), rel_tol=1e-5)


def test_subs_never_predicts_mask_and_carries_tokens_over():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 10, generator=g)
    logits[..., MASK] = 100.0  # even a model that loves [MASK] must not predict it
    xt = torch.tensor([[MASK, 3, MASK, 4, 5, MASK], [1, MASK, 2, MASK, MASK, 0]])
    logp = diffusion.subs_log_probs(logits, xt, MASK)
    p = logp.exp()
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 6))
    assert (p[..., MASK] == 0).all()
    unmasked = xt != MASK
    assert torch.equal(p[unmasked].argmax(-1), xt[unmasked])
    assert (p[unmasked].max(-1).values == 1).all()


def test_elbo_only_counts_masked_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 5, 10, generator=g)
    x0 = torch.tensor([[1, 2, 3, 4, 5]])
    xt = torch.tensor([[MASK, 2, MASK, 4, 5]])
    t = torch.tensor([0.5])
    loss = diffusion.elbo_per_token(logits, x0, xt, t, MASK)
    logits_nomask = logits.clone()
    logits_nomask[..., MASK] = -math.inf
    ref = -torch.log_softmax(logits_nomask, -1)[0, [0, 2], [1, 3]] / 0.5
    torch.testing.assert_close(loss[0, [0, 2]], ref)
    assert (loss[0, [1, 3, 4]] == 0).all()
