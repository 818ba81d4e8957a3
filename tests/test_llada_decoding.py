"""LLaDA's decoding through smdlm's confidence sampler: low-confidence remasking with blocks (against
an independent rewrite of LLaDA's `generate` rule), random remasking, classifier-free guidance."""

import pytest
import torch

from dream_fixtures import random_dream
from llada_fixtures import random_llada
from smdlm_cli.core.samplers import decode
from smdlm_cli.core.samplers.guidance import Guided
from smdlm_cli.core.softmask import SoftMask

LLADA = dict(sampler="confidence", alg="low_confidence", transfer="even", temperature=0.0)


@torch.no_grad()
def llada_generate(model, prompt, steps, gen_length, block_length, cfg_scale=0.0):
    """LLaDA's generate at temperature 0, low_confidence remasking, written from its description:
    blocks after the prompt; a block's masks split evenly over its steps (the first n % steps get
    one more); each step commits the k masked positions of the current block whose argmax has the
    highest softmax probability. Guidance: un + (s + 1)(cond - un), un = prompt set to [MASK].
    smdlm never predicts [MASK], so its column is removed here as well."""
    mask_id = model.mask_id
    x = torch.cat([prompt, torch.full((1, gen_length), mask_id)], dim=1)
    P, per_block = prompt.shape[1], steps // (gen_length // block_length)
    for j in range(gen_length // block_length):
        lo, hi = P + j * block_length, P + (j + 1) * block_length
        n = int((x[0, lo:hi] == mask_id).sum())
        ks = [n // per_block + (i < n % per_block) for i in range(per_block)]
        for k in ks:
            logits = model(input_ids=x)
            if cfg_scale > 0:
                un = x.clone()
                un[0, :P] = mask_id
                u = model(input_ids=un)
                logits = u + (cfg_scale + 1) * (logits - u)
            logits[..., mask_id] = float("-inf")
            p = logits.double().softmax(-1)
            conf, x0 = p.max(-1)
            conf[0, hi:] = float("-inf")
            conf[x != mask_id] = float("-inf")
            chosen = conf[0].topk(k).indices
            x[0, chosen] = x0[0, chosen]
    return x


@pytest.mark.parametrize("gen, block, steps", [(12, 4, 6), (15, 5, 6), (8, 8, 8)])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_low_confidence_even_transfer_is_llada_generate(gen, block, steps, cfg_scale):
    model = random_llada().double()
    prompt = torch.randint(0, 89, (1, 5), generator=torch.Generator().manual_seed(gen))
    want = llada_generate(model, prompt, steps, gen, block, cfg_scale)
    x = torch.cat([prompt, torch.full((1, gen), model.mask_id)], dim=1)
    out = decode(model, x, steps=steps, generator_seeds=[0], block_length=block,
                 cfg_scale=cfg_scale, **LLADA)
    assert torch.equal(out.tokens, want)
    # at temperature 0 the untempered and tempered confidences are the same: maskgit_plus agrees
    same = decode(model, x, steps=steps, generator_seeds=[0], block_length=block,
                  cfg_scale=cfg_scale, **{**LLADA, "alg": "maskgit_plus"})
    assert torch.equal(same.tokens, want)


def test_even_transfer_commits_llada_s_counts_per_step():
    model = random_llada().double()
    x = torch.cat([torch.randint(0, 89, (2, 3)), torch.full((2, 10), model.mask_id)], dim=1)
    out = decode(model, x, steps=4, generator_seeds=[0, 1], block_length=5, trace=True,
                 **{**LLADA, "temperature": 0.7})
    # blocks of 5 masks over 2 steps each: 3 then 2, whatever the confidences
    assert out.trace["unmasked"] == [[3, 3], [2, 2], [3, 3], [2, 2]]


def test_random_remasking_ignores_the_model_and_picks_uniformly():
    a, b = random_llada(seed=0).double(), random_llada(seed=1).double()
    n = 400
    x = torch.cat([torch.full((n, 2), 7), torch.full((n, 8), a.mask_id)], dim=1)
    kw = dict(steps=4, generator_seeds=list(range(n)), block_length=8, trace=True,
              **{**LLADA, "alg": "random"})
    ta, tb = decode(a, x, **kw), decode(b, x, **kw)
    masks_a = ta.trace["tokens"] == a.mask_id
    masks_b = tb.trace["tokens"] == b.mask_id
    assert torch.equal(masks_a, masks_b)                  # which positions: the draw, not the model
    assert not torch.equal(ta.tokens, tb.tokens)          # what goes there: the model
    first = (masks_a[0] & ~masks_a[1])[:, 2:].sum(0)      # positions committed at step 1 (k = 2)
    assert int(first.sum()) == 2 * n
    assert first.min() > 60 and first.max() < 140         # ~ 100 each of 8 positions


def test_guided_model_combines_conditional_and_prompt_masked_logits():
    model = random_llada().double()
    x = torch.randint(0, 89, (2, 9))
    prompt = torch.zeros(2, 9, dtype=torch.bool)
    prompt[:, :4] = True
    guided = Guided(model, 2.0, prompt)
    with torch.no_grad():
        cond = model(input_ids=x)
        un = model(input_ids=x.masked_fill(prompt, model.mask_id))
        want = un + 3.0 * (cond - un)
        torch.testing.assert_close(guided(input_ids=x), want)
        # soft inputs: E[x] as embeddings gives the same, the prompt masked in the unconditional rows
        torch.testing.assert_close(guided(inputs_embeds=model.embedding_weight()[x]), want)
        cache = guided.empty_cache()
        guided(input_ids=x, cache=cache.window(0, 9))
        torch.testing.assert_close(guided(input_ids=x[:, 3:7], cache=cache.window(3, 7)), want[:, 3:7])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_guidance_with_cache_and_sm_refreshed_every_step_equals_uncached(cache):
    model = random_dream().double()
    x = torch.cat([torch.randint(1, 90, (2, 4)), torch.full((2, 12), model.mask_id)], dim=1)
    sm = SoftMask(k=2, scale=0.9, centre=-3.0, steepness=3.0).double()
    kw = dict(sampler="confidence", steps=6, generator_seeds=[3, 4], block_length=4,
              temperature=0.5, cfg_scale=1.0, softmask=sm)
    plain = decode(model, x, **kw)
    assert torch.equal(decode(model, x, cache=cache, refresh_every=1, **kw).tokens, plain.tokens)
    assert not torch.equal(decode(model, x, **{**kw, "cfg_scale": 0.0}).tokens, plain.tokens)
