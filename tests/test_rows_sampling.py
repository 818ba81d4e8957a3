"""Decoding with log p only at the masked rows (samplers/rows.py) against the full-logit path.

The full-logit path is the same model behind a wrapper that offers only forward(): the loop then
computes every row's logits and gathers the masked ones. Tokens must be equal, token for token, for
every sampler, binary and SM (float64 models, so no near-tie is decided by rounding).
"""

from __future__ import annotations

import pytest
import torch

from smdlm_cli.core.diffusion import subs_log_probs
from smdlm_cli.core.models.dit import build_dit
from smdlm_cli.core.samplers import decode
from smdlm_cli.core.samplers.rows import forward_rows, masked_log_probs
from smdlm_cli.core.softmask import SoftMask

from tests.dream_fixtures import random_dream
from tests.syncs import count_syncs

L, PROMPT = 24, 4
SAMPLERS = [("mdlm", {}), ("remdm-cap", {"eta": 0.3}), ("remdm-loop", {"eta": 0.1}),
            ("confidence", {"temperature": 1.0, "alg": "topk_margin"}),
            ("confidence", {"alg": "entropy", "block_length": 10}),
            ("confidence", {"cache": "dual", "block_length": 10}),
            ("confidence", {"threshold": 0.2, "block_length": 10}),
            ("mdlm", {"cfg_scale": 0.5})]
IDS = ["mdlm", "remdm-cap", "remdm-loop", "conf-margin", "conf-blocks", "dual", "threshold", "cfg"]


def dit(seed=0):
    torch.manual_seed(seed)
    model = build_dit("tiny", 97, 96, L, hidden_dim=32, n_blocks=2, n_heads=4, dropout=0.0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.double().eval()


class FullLogits(torch.nn.Module):
    """The model with forward() only: the loop computes every row and gathers the masked ones."""

    def __init__(self, model):
        super().__init__()
        self.model, self.mask_id, self.vocab_size = model, model.mask_id, model.vocab_size
        self.config, self.mask_logit = model.config, getattr(model, "mask_logit", "drop")
        self.forward_every_step = getattr(model, "forward_every_step", False)

    def embedding_weight(self):
        return self.model.embedding_weight()

    def empty_cache(self):
        return self.model.empty_cache()

    def forward(self, **kw):
        return self.model(**kw)


def batch(model, B=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 90, (B, L), generator=g)
    x[:, PROMPT:] = model.mask_id
    x[1, PROMPT + 3:PROMPT + 6] = 7  # fixed tokens inside the generation (infilling)
    return x


def sm():
    return SoftMask(k=3, scale=0.8, centre=-3.0, steepness=2.0).double()


@pytest.mark.parametrize("make", [dit, lambda: random_dream().double()], ids=["dit", "dream"])
@pytest.mark.parametrize("softmask", [None, sm], ids=["binary", "sm"])
@pytest.mark.parametrize("sampler,kw", SAMPLERS, ids=IDS)
def test_rows_decode_the_same_tokens_as_full_logits(make, softmask, sampler, kw):
    model = make()
    x = batch(model)
    args = dict(sampler=sampler, steps=10, generator_seeds=[0, 1, 2], **kw)
    fast = decode(model, x, softmask=softmask and softmask(), **args)
    full = decode(FullLogits(model), x, softmask=softmask and softmask(), **args)
    assert torch.equal(fast.tokens, full.tokens) and fast.nfe == full.nfe
    assert not (fast.tokens == model.mask_id).any()


def test_head_runs_only_at_the_masks_of_each_step():
    """Rows through the head per forward = masks before that step (the plan's counts), whereas
    the full path puts all B * L rows through it at every forward."""
    model = dit()
    seen = []
    model.output_layer.linear.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    x = batch(model)
    out = decode(model, x, sampler="confidence", steps=10, softmask=sm(), generator_seeds=[0, 1, 2],
                 alg="entropy", trace=True)
    masks = (out.trace["tokens"] == model.mask_id).sum((1, 2)).tolist()  # before each step
    assert seen == masks[:len(seen)] and len(seen) == out.nfe == 10
    assert sum(seen) < out.nfe * x.numel() / 2


@pytest.mark.parametrize("sampler,kw", SAMPLERS[:3], ids=IDS[:3])
def test_binary_mdlm_family_runs_the_head_only_where_it_unmasks(sampler, kw):
    """Binary: rows through the head per forward = positions that step unmasks (the plan), then
    the masks left for noise removal; the tokens are those of the full path (test above)."""
    model = dit()
    seen = []
    model.output_layer.linear.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    x = batch(model)
    out = decode(model, x, sampler=sampler, steps=10, softmask=None, generator_seeds=[0, 1, 2], **kw)
    traced = decode(model, x, sampler=sampler, steps=10, softmask=None, generator_seeds=[0, 1, 2],
                    trace=True, **kw)
    assert torch.equal(out.tokens, traced.tokens) and out.nfe == traced.nfe
    seen = seen[:out.nfe]  # the traced decode's forwards came after
    unmasked = [sum(u) for u, f in zip(traced.trace["unmasked"], traced.trace["forward"]) if f]
    left = sum(traced.trace["masks_left"][-1])
    assert seen == unmasked + ([left] if traced.trace["noise_removal"] else [])
    if sampler == "mdlm":  # no remasking: every generated position is read exactly once
        assert sum(seen) == int((x == model.mask_id).sum())


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_binary_blockwise_decoding_runs_the_head_only_at_the_block(cache):
    """Block-wise decoding reads the block's candidates; the window of a prefix cache (or no
    cache) also holds the later blocks' masks, which only SM's feedback reads."""
    model = dit()
    x = batch(model)
    seen = {}
    for name, softmask in (("binary", None), ("sm", sm())):
        rows = seen[name] = []
        hook = model.output_layer.linear.register_forward_hook(
            lambda m, a, o, rows=rows: rows.append(a[0].shape[0]))
        decode(model, x, sampler="confidence", steps=10, softmask=softmask, block_length=10,
               cache=cache, threshold=0.2, generator_seeds=[0, 1, 2])
        hook.remove()
    block_masks = 3 * 10  # batch 3, blocks of 10 generated columns
    assert max(seen["binary"]) <= block_masks < max(seen["sm"])


def test_row_log_probs_are_subs_log_probs_at_those_rows():
    model = dit()
    x = batch(model)
    masks = x == model.mask_id
    rows, counts = [0, 2], masks.sum(-1)[[0, 2]].tolist()
    got = forward_rows(model, masks, rows, counts, model.mask_id, False, input_ids=x)
    want = subs_log_probs(model(input_ids=x), x, model.mask_id)
    flat = torch.cat([torch.nonzero(masks[r]).squeeze(-1) + r * L for r in rows])
    assert got.values.shape[0] == sum(counts)
    assert torch.equal(got.take(flat), want.flatten(0, 1)[flat])
    logits = torch.randn(5, 97, dtype=torch.float64)
    torch.testing.assert_close(masked_log_probs(logits.clone(), 96, True),
                               torch.log_softmax(logits, -1), rtol=0, atol=0)


PLANNED = [(s, kw) for s, kw in SAMPLERS if "threshold" not in kw]  # it syncs once a step


@pytest.mark.parametrize("sampler,kw", PLANNED, ids=[i for i in IDS if i != "threshold"])
def test_no_host_sync_inside_the_loop_with_row_logits(sampler, kw, monkeypatch):
    """tests/syncs.py's CPU proxy on a model that splits (the Mock of test_samplers does not):
    every forward sees the sync count of the first one."""
    model, seen = dit(), []
    inner = model.hidden
    count = count_syncs(monkeypatch)
    model.hidden = lambda *a, **k: (seen.append(count[0]), inner(*a, **k))[1]
    decode(model, batch(model), sampler=sampler, steps=10, softmask=sm(),
           generator_seeds=[0, 1, 2], **kw)
    assert len(seen) > 2 and set(seen) == {seen[0]} and count[0] == seen[0]


@pytest.mark.parametrize("sampler,kw", [("mdlm", {}), ("remdm-cap", {"eta": 0.3}),
                                        ("confidence", {"alg": "entropy"}),
                                        ("confidence", {"cache": "prefix", "block_length": 10})])
def test_feedback_in_small_cpu_chunks_is_the_feedback_in_one(sampler, kw, monkeypatch):
    """The CPU feedback goes through reused buffers in chunks: chunks of 10 rows (a ragged last
    one at most steps) give the same tokens and lambda as one chunk, and so do the two ways rows
    reach it: straight from the forward's rows (decoding) and gathered at the masks left (a
    trace, which reads every row)."""
    from smdlm_cli.core.samplers.feedback import Feedback

    model = dit()
    x = batch(model)
    args = dict(sampler=sampler, steps=10, softmask=sm(), generator_seeds=[0, 1, 2], **kw)
    planned = "cache" not in kw  # block-wise decoding has no trace

    def both():
        return decode(model, x, **args), decode(model, x, trace=True, **args) if planned else None
    monkeypatch.setattr(Feedback, "CPU_CHUNK_BYTES", 1 << 40)
    whole, traced = both()
    monkeypatch.setattr(Feedback, "CPU_CHUNK_BYTES", 10 * 4 * 97)  # 10 rows of V = 97
    chunked, traced_chunked = both()
    for out in (chunked,) + ((traced, traced_chunked) if planned else ()):
        assert torch.equal(out.tokens, whole.tokens) and out.nfe == whole.nfe
    if planned:
        assert torch.equal(traced_chunked.trace["lam"], traced.trace["lam"])
        assert traced.trace["lam"].max() > 0.1
