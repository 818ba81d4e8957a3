"""smdlm's MDLM side against the official language code (oracle_language.py): the MDLM / ReMDM
samplers with SM at batch size 1, and the two-pass training step, on tiny random float64 DiTs."""

import pytest
import torch

from oracle_language import mdlm_generate, two_pass_loss
from smdlm_cli.core import diffusion
from smdlm_cli.core.models.dit import build_dit
from smdlm_cli.core.samplers import decode, mdlm
from smdlm_cli.core.softmask import SoftMask
from smdlm_cli.core.twopass import TwoPass

V, L = 64, 16
MASK = V - 1


def random_dit(seed):
    torch.manual_seed(seed)
    model = build_dit("tiny", V, MASK, L, hidden_dim=32, n_blocks=2, n_heads=2, cond_dim=16,
                      dropout=0.0).double().eval()
    with torch.no_grad():  # MDLM zero-initialises the output: give the random model opinions
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def softmask(seed, k):
    g = torch.Generator().manual_seed(seed)
    sm = SoftMask(k=k, scale=0.8, centre=-3.0, steepness=3.0).double()
    with torch.no_grad():
        for p in sm.parameters():
            p.add_(0.2 * torch.randn((), generator=g, dtype=torch.float64))
    return sm


def raw_of(sm):
    """The official head's raw scalars (its temperature is unused by mixinputs_with_topk)."""
    return (sm.raw_scale, sm.raw_centre, sm.raw_steepness,
            torch.tensor(0.5413, dtype=torch.float64))


SAMPLERS = [("mdlm", {}), ("remdm-cap", {"eta": 0.04}), ("remdm-loop", {"eta": 0.02})]


@pytest.mark.parametrize("eps", [1e-5, 0.3], ids=["eps-1e-5", "eps-0.3"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("sampler,kw", SAMPLERS, ids=[s for s, _ in SAMPLERS])
def test_mdlm_family_with_sm_is_the_official_sampler_at_batch_1(sampler, kw, k, eps, monkeypatch):
    """eps 0.3 ends the time grid early, so masks are left for noise removal and a row's last
    change often comes before the last step: then the official noise removal starts from the
    feedback of one more forward on the final x, which smdlm's settling forward reproduces."""
    monkeypatch.setattr(mdlm, "GRID_EPS", eps)
    steps, settled = 24, 0
    for seed in range(10):
        model, sm = random_dit(seed), softmask(seed, k)
        embeds, inner = [], model.hidden  # decoding runs hidden(), then the head at the masks
        model.hidden = lambda **kwargs: (embeds.append(kwargs.get("inputs_embeds")),
                                         inner(**kwargs))[1]
        out = decode(model, torch.full((1, L), MASK), sampler=sampler, steps=steps, softmask=sm,
                     generator_seeds=[seed], trace=True, top_p=1e-9, **kw)
        del model.hidden
        path = out.trace["tokens"] == MASK
        history, final, ref_embeds = mdlm_generate(model, MASK, path, sampler, raw=raw_of(sm), k=k,
                                                   eps=eps, **kw)
        settled += out.trace["settle"]
        for i, h in enumerate(history):
            assert torch.equal(out.trace["tokens"][i + 1], h), (seed, i)
        assert torch.equal(out.tokens, final), seed  # noise removal included
        assert len(embeds) == out.nfe, seed
        if not out.trace["noise_removal"]:
            # nothing left to decode: the official loop still runs its forward after the last
            # change and the noise-removal one (tokens unchanged); smdlm runs neither
            ref_embeds = ref_embeds[:len(embeds)]
        assert len(ref_embeds) == len(embeds), seed
        # k = 1 is float64 throughout, but the sampler's entropy is -sum p log p where the official
        # code has log(p + 1e-10): |dH| <= V * 1e-10 (softmask.py), which moves lambda by at most
        # steepness / 4 * |dH| and an input embedding by that times |mixed - E[MASK]| <= 2 max |E|
        # per forward; the next forwards' logits carry it on (measured up to 2.2x that with ReMDM),
        # so the tolerance is 4x that bound
        steep, top = float(sm.steepness.detach()), float(model.embedding_weight().detach().abs().max())
        bound = 4 * (steep / 4 * V * 1e-10 * 2 * top)
        for got, want in zip(embeds, ref_embeds):
            assert (got is None) == (want is None)
            if want is not None:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6 if k == 3 else bound)
    assert eps < 0.1 or settled >= 3  # the settling forward was exercised


@pytest.mark.parametrize("k", [1, 3])
def test_two_pass_training_step_is_the_official_one(k):
    for seed in range(5):
        model, sm = random_dit(seed), softmask(seed, k)
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randint(0, MASK, (3, L), generator=g)
        t = torch.rand(3, generator=g, dtype=torch.float64) * 0.9 + 0.05
        xt = diffusion.q_xt(x0, t, MASK, generator=g)
        two_pass = TwoPass(model, sm)
        loss = diffusion.elbo_per_token(two_pass(xt, use_sm=True), x0, xt, t, MASK).sum() / x0.numel()
        params = list(model.parameters()) + [sm.raw_scale, sm.raw_centre, sm.raw_steepness]
        got = torch.autograd.grad(loss, params)
        # in float64 throughout (the official head's float32 top-k softmax only rounds, and at
        # k = 1 it is exactly 1): loss and every gradient to float64 precision
        want_loss = two_pass_loss(model, x0, xt, t, MASK, raw_of(sm), k, fp32_topk=False)
        want = torch.autograd.grad(want_loss, params)
        tol = dict(rtol=1e-11, atol=1e-14)
        torch.testing.assert_close(loss, want_loss, **tol)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol)
        assert all(g.abs().sum() > 0 for g in got[-3:])  # omega really learns from this step
