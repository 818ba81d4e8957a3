"""Block-wise decoding (Fast-dLLM): KV cache windows, threshold and factor rules, SM, batches.

Dream models in float64, so that "equal" can mean equal tokens where batching or windows change
the order of a reduction (the DiT keeps its fp32 LayerNorms: float32, compared where the
computation is the same).
"""

import pytest
import torch

from dream_fixtures import random_dream
from syncs import count_syncs
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.models.cache import KVCache
from smdlm_cli.core.models.dit import build_dit
from smdlm_cli.core.samplers import decode
from smdlm_cli.core.softmask import SoftMask

GEN, BLOCK = 24, 8
LENGTHS = (5, 9, 3)


def dit():
    torch.manual_seed(0)
    model = build_dit("tiny", 96, 95, 64, hidden_dim=32, n_blocks=2, n_heads=4, cond_dim=16).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


MODELS = {"dream": lambda: random_dream().double(), "dit": dit}


def batch(model, lengths=LENGTHS, gen=GEN, seed=0):
    """Right-padded rows: a prompt of its own length, `gen` masks, padding up to the longest."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths) + gen
    x = torch.zeros(len(lengths), L, dtype=torch.long)
    am = torch.zeros_like(x)
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randint(1, 90, (n,), generator=g)
        x[b, n:n + gen] = model.mask_id
        am[b, :n + gen] = 1
    return x, am


def sm(model=None):
    dtype = torch.float64 if model is None else model.embedding_weight().dtype
    return SoftMask(k=2, scale=0.9, centre=-3.0, steepness=3.0).to(dtype)


def run(model, x, am, steps=12, softmask=None, seeds=(0, 1, 2), **kw):
    return decode(model, x, sampler="confidence", steps=steps, generator_seeds=list(seeds),
                  attention_mask=am, block_length=BLOCK, softmask=softmask, temperature=0.5, **kw)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("use_sm", [False, True], ids=["binary", "sm"])
def test_cache_refreshed_every_step_equals_uncached(name, cache, use_sm):
    model = MODELS[name]()
    x, am = batch(model)
    softmask = sm(model) if use_sm else None
    plain = run(model, x, am, softmask=softmask)
    cached = run(model, x, am, softmask=softmask, cache=cache, refresh_every=1)
    assert torch.equal(cached.tokens, plain.tokens) and cached.nfe == plain.nfe == 12
    assert not (cached.tokens == model.mask_id).any()


class Recorder(torch.nn.Module):
    """Wraps a model and records, per forward, how many columns it computed and the cache state."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.mask_id, self.vocab_size = model, model.mask_id, model.vocab_size
        self.config, self.calls = model.config, []

    def embedding_weight(self):
        return self.inner.embedding_weight()

    def empty_cache(self):
        return self.inner.empty_cache()

    def forward(self, input_ids=None, inputs_embeds=None, **kw):
        h = input_ids if input_ids is not None else inputs_embeds
        cache = kw.get("cache")
        self.calls.append((h.shape[1], cache.filled if cache is not None else None,
                           None if input_ids is None else input_ids.clone()))
        return self.inner(input_ids=input_ids, inputs_embeds=inputs_embeds, **kw)


@pytest.mark.parametrize("name", MODELS)
def test_cache_computes_only_windows_after_each_refresh(name):
    model = Recorder(MODELS[name]())
    x, am = batch(model.inner, lengths=(4, 4))
    L, s0 = x.shape[1], 4
    for cache, width in (("dual", lambda s: BLOCK + 1), ("prefix", lambda s: L - s + 1)):
        model.calls.clear()
        run(model, x, am, steps=GEN, seeds=(0, 1), cache=cache)
        assert len(model.calls) == GEN - 3  # Dream's schedule commits nothing at a block's step 0
        for j in range(GEN // BLOCK):
            block = model.calls[j * 7:(j + 1) * 7]
            assert block[0][:2] == (L, False)                                  # the refresh
            assert all(c[:2] == (width(s0 + j * BLOCK), True) for c in block[1:])


@pytest.mark.parametrize("name", MODELS)
def test_window_forwards_on_a_fresh_cache_equal_the_full_forward(name):
    model = MODELS[name]()
    x = torch.randint(0, 90, (2, 20))
    pos = torch.tensor([[0] * 3 + list(range(17)), list(range(20))])  # row 0 left-padded by 3
    am = torch.ones_like(x)
    am[0, :3] = 0
    with torch.no_grad():
        full = model(input_ids=x, attention_mask=am, position_ids=pos)
        cache = model.empty_cache()
        torch.testing.assert_close(model(input_ids=x, attention_mask=am, position_ids=pos,
                                         cache=cache), full)
        for a, b in ((7, 20), (7, 12)):  # prefix and dual windows
            out = model(input_ids=x[:, a:b], attention_mask=am, position_ids=pos[:, a:b],
                        cache=cache.window(a, b))
            torch.testing.assert_close(out[:, 1:], full[:, a + 1:b])
        # left padding with positions from the real tokens equals the row without it
        alone = model(input_ids=x[:1, 3:])
        torch.testing.assert_close(full[0, 4:], alone[0, 1:])


def sharp_dream():
    model = random_dream().double()
    with torch.no_grad():
        model.lm_head.weight.mul_(60.0)  # confident predictions, so thresholds pass often
    return model


@pytest.mark.parametrize("rule", [{"threshold": 0.9}, {"factor": 1.0}])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_parallel_rules_commit_at_least_one_token_per_step_and_save_forwards(rule, cache):
    model = Recorder(sharp_dream())
    x, am = batch(model.inner, lengths=(4, 4))
    out = run(model, x, am, steps=GEN, seeds=(0, 1), cache=cache, **rule)
    assert not (out.tokens == model.mask_id).any()
    assert out.nfe == len(model.calls) < GEN                      # confident: fewer forwards
    if cache == "none":  # every forward sees the whole sequence: masks per row and block before it
        states = [ids for _, _, ids in model.calls] + [out.tokens]
        per_block = torch.stack([(ids[:, 4:] == model.mask_id).view(2, GEN // BLOCK, BLOCK).sum(-1)
                                 for ids in states])                       # (F + 1, B, blocks)
        several = False
        for f in range(len(model.calls)):
            j = int((per_block[f].sum(0) > 0).long().argmax())             # the block being decoded
            drop = per_block[f, :, j] - per_block[f + 1, :, j]
            assert ((drop >= 1) | (per_block[f, :, j] == 0)).all()   # >= 1 per row with masks in it
            several |= bool((drop > 1).any())
        assert several                                                # and several where it is sure


def test_threshold_one_follows_the_schedule_with_at_least_one_token():
    model = sharp_dream()
    x, am = batch(model)
    strict = run(model, x, am, steps=GEN, threshold=1.0)
    assert strict.nfe == GEN and not (strict.tokens == model.mask_id).any()


@pytest.mark.parametrize("kw", [{"cache": "prefix"}, {"cache": "dual", "threshold": 0.5},
                                {"cache": "dual", "factor": 1.0}, {"threshold": 0.5},
                                {"cache": "prefix", "refresh_every": 3}])
@pytest.mark.parametrize("use_sm", [False, True], ids=["binary", "sm"])
def test_batch_rows_equal_single_decodes(kw, use_sm):
    model = sharp_dream()
    x, am = batch(model)
    softmask = sm() if use_sm else None
    out = run(model, x, am, steps=GEN, softmask=softmask, **kw)
    for b, n in enumerate(LENGTHS):
        alone = run(model, x[b:b + 1, :n + GEN], None, steps=GEN, softmask=softmask, seeds=(b,), **kw)
        assert torch.equal(out.tokens[b, :n + GEN], alone.tokens[0])
        assert torch.equal(out.tokens[b, :n], x[b, :n])            # the prompt never changes
        assert torch.equal(out.tokens[b, n + GEN:], x[b, n + GEN:])  # nor the padding


def test_sm_changes_cached_decoding():
    model = sharp_dream()
    x, am = batch(model)
    binary = run(model, x, am, steps=GEN, cache="dual")
    soft = run(model, x, am, steps=GEN, cache="dual", softmask=sm())
    assert not torch.equal(binary.tokens, soft.tokens)


@pytest.mark.parametrize("name", MODELS)
def test_k_schedule_with_a_cache_never_waits_for_the_device(name, monkeypatch):
    model = MODELS[name]()
    x, am = batch(model)
    seen = []
    inner = model.hidden  # the backbones split: decoding runs hidden(), then the head at masks
    count = count_syncs(monkeypatch)
    model.hidden = lambda *a, **k: (seen.append(count[0]), inner(*a, **k))[1]
    run(model, x, am, steps=GEN, softmask=sm(model), cache="dual")
    assert len(seen) > 3 and set(seen) == {seen[0]} and count[0] == seen[0]


@pytest.mark.parametrize("kw, match", [
    ({"cache": "disk"}, "cache = 'disk', expected one of none, prefix, dual"),
    ({"threshold": 1.5}, r"threshold = 1.5, expected a confidence in \(0, 1\]"),
    ({"threshold": 0.9, "factor": 1.0}, "expected one parallel-decoding rule"),
    ({"factor": 0}, "factor = 0, expected a number > 0"),
    ({"cache": "dual", "alg": "origin"}, "alg origin has no confidences"),
    ({"refresh_every": -1}, "refresh_every = -1, expected an integer >= 0"),
])
def test_bad_block_options_are_one_line_errors(kw, match):
    model = random_dream()
    x, am = batch(model)
    with pytest.raises(UserError, match=match):
        decode(model, x, sampler="confidence", steps=GEN, generator_seeds=[0, 1, 2], **kw)


def test_cache_needs_a_model_with_one_and_no_trace():
    model = random_dream()
    x, _ = batch(model)
    with pytest.raises(UserError, match="trace and exact apply to the planned loop"):
        decode(model, x, sampler="confidence", steps=GEN, generator_seeds=[0, 1, 2], cache="dual",
               trace=True)

    class NoCache(torch.nn.Module):
        mask_id, vocab_size = model.mask_id, model.vocab_size

        def embedding_weight(self):
            return model.embedding_weight()

    with pytest.raises(UserError, match="NoCache has no KV cache"):
        decode(NoCache(), x, sampler="confidence", steps=GEN, generator_seeds=[0, 1, 2],
               cache="prefix")
    assert isinstance(model.empty_cache(), KVCache)
