"""Logits only where they are read: the row paths against the full-logit ones they replace.

Tolerances: float64 models and SoftMask, rtol 1e-12 / atol 1e-12 on losses and gradients (the
row paths do the same operations on fewer rows; only the order of some sums may differ). Sampler
outputs must be equal token for token (tests/test_rows_sampling.py).
"""

from __future__ import annotations

import pytest
import torch

from smdlm_cli.core import diffusion, objectives, rows
from smdlm_cli.core.config import TrainConfig
from smdlm_cli.core.distributed import Dist, batch_layout
from smdlm_cli.core.models.dit import build_dit
from smdlm_cli.core.softmask import SoftMask, _entropy
from smdlm_cli.core.twopass import TwoPass

from tests.dream_fixtures import random_dream
from tests.llada_fixtures import random_llada

TOL = dict(rtol=1e-12, atol=1e-12)


def dit(seed=0):
    torch.manual_seed(seed)
    model = build_dit("tiny", 97, 96, 32, hidden_dim=32, n_blocks=2, n_heads=4, dropout=0.0)
    for p in model.parameters():  # MDLM zero-initialises the head: give it something to predict
        torch.nn.init.normal_(p, std=0.2)
    return model.double()


MODELS = {"dit": dit, "dream": lambda: random_dream().double(),
          "llada": lambda: random_llada().double()}


def noised(model, seed=0, B=3, L=20):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randint(0, model.mask_id - 2, (B, L), generator=g)
    t = torch.tensor([0.2, 0.5, 0.9][:B], dtype=torch.float64)
    xt = torch.where(torch.rand(B, L, generator=g, dtype=torch.float64) < t[:, None],
                     model.mask_id, x0)
    return x0, xt, t


@pytest.mark.parametrize("name", MODELS)
def test_hidden_then_head_is_forward(name):
    model = MODELS[name]()
    x = torch.randint(0, 60, (2, 12))
    torch.testing.assert_close(model.head(model.hidden(input_ids=x)), model(input_ids=x), **TOL)
    emb = model.embedding_weight()[x]
    torch.testing.assert_close(model.head(model.hidden(inputs_embeds=emb)),
                               model(inputs_embeds=emb), **TOL)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("use_sm", [False, True])
@pytest.mark.parametrize("keep", [False, True])
def test_masked_nll_and_gradients_equal_the_full_logit_path(name, use_sm, keep):
    """TwoPass(nll_of=x0) equals masked_nll of the full logits: the NLL map, and the gradient of
    the loss for every weight and omega (SM: pass 1 feedback at the masks only)."""
    model = MODELS[name]()
    sm = SoftMask(k=3, scale=0.5, centre=-3.0, steepness=2.0).double()
    two = TwoPass(model, sm)
    x0, xt, t = noised(model)
    params = list(model.parameters()) + list(sm.parameters())
    full = diffusion.masked_nll(two(xt, use_sm), x0, xt, model.mask_id, keep)
    fast = two(xt, use_sm, nll_of=x0, keep_mask=keep)
    torch.testing.assert_close(fast, full, **TOL)
    assert (fast[xt != model.mask_id] == 0).all() and (fast[xt == model.mask_id] > 0).all()
    w = 1 / t[:, None]
    got = torch.autograd.grad((fast * w).sum(), params, allow_unused=True)
    want = torch.autograd.grad((full * w).sum(), params, allow_unused=True)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL)
    if use_sm:  # omega really is trained through the row path
        assert all(g.abs().sum() > 0 for g in got[-3:])


def test_temperature_variant_rows_equal_full():
    """The dense (temperature) mixture, whose entropy carries a gradient to the temperature."""
    model = dit()
    sm = SoftMask(k=3, scale=0.5, centre=-3.0, steepness=2.0, temperature=0.7).double()
    two = TwoPass(model, sm)
    x0, xt, _ = noised(model, seed=1)
    full = diffusion.masked_nll(two(xt, True), x0, xt, model.mask_id)
    fast = two(xt, True, nll_of=x0)
    torch.testing.assert_close(fast, full, **TOL)
    got = torch.autograd.grad(fast.sum(), [sm.raw_temperature, sm.raw_scale])
    want = torch.autograd.grad(full.sum(), [sm.raw_temperature, sm.raw_scale])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
        assert a.abs() > 0


def test_chunked_loss_equals_one_shot_with_gradients():
    """rows_nll in chunks (each head recomputed in the backward) gives the one-shot numbers."""
    model = dit()
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 32, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 96, (37,), generator=g)
    one = rows.rows_nll(model.head, h, labels, model.vocab_size, model.mask_id)
    split = rows.rows_nll(model.head, h, labels, model.vocab_size, model.mask_id, chunk=5)
    torch.testing.assert_close(split, one, **TOL)
    params = [h, model.output_layer.linear.weight, model.output_layer.linear.bias]
    for a, b in zip(torch.autograd.grad(split.sum(), params), torch.autograd.grad(one.sum(), params)):
        torch.testing.assert_close(a, b, **TOL)
    logits = model.head(h).detach()
    want = diffusion.masked_nll(logits[None], labels[None], torch.full_like(labels, 96)[None], 96)
    torch.testing.assert_close(one.detach(), want[0], **TOL)


class CountRows:
    """Counts the rows that go through a module (a forward hook on the head's linear map)."""

    def __init__(self, module):
        self.rows = []
        module.register_forward_hook(lambda m, args, out: self.rows.append(args[0].shape[:-1].numel()))


@pytest.mark.parametrize("use_sm", [False, True])
def test_head_runs_only_at_masked_rows(use_sm):
    model = dit()
    sm = SoftMask(k=3, scale=0.5, centre=-3.0, steepness=2.0).double()
    count = CountRows(model.output_layer.linear)
    x0, xt, _ = noised(model)
    TwoPass(model, sm)(xt, use_sm, nll_of=x0)
    n = int((xt == model.mask_id).sum())
    assert 0 < n < xt.numel()
    assert sum(count.rows) == n * (2 if use_sm else 1)
    count.rows.clear()
    TwoPass(model, sm)(xt, use_sm)  # the full-logit path: every row, every pass
    assert sum(count.rows) == xt.numel() * (2 if use_sm else 1)


def test_pass_one_runs_the_head_in_chunks(monkeypatch):
    """Pass 1 puts the masked rows through the head a chunk at a time (cache-sized on the CPU)."""
    model = dit()
    sm = SoftMask(k=2, scale=0.5, centre=-3.0, steepness=2.0).double()
    count = CountRows(model.output_layer.linear)
    x0, xt, _ = noised(model)
    full = TwoPass(model, sm)(xt, True, nll_of=x0)
    monkeypatch.setattr(rows, "CPU_CHUNK", 97 * 4)  # 4 rows a chunk
    count.rows.clear()
    chunked = TwoPass(model, sm)(xt, True, nll_of=x0)
    n = int((xt == model.mask_id).sum())
    assert count.rows[:-1] == [4] * (-(-n // 4) - 1) + [n - 4 * (-(-n // 4) - 1)]
    torch.testing.assert_close(chunked, full, **TOL)


@pytest.mark.parametrize("kind", ["elbo", "sft"])
def test_objective_losses_take_the_row_map(kind):
    """Each objective's loss and validation terms are the same from full logits and from the
    masked NLL the model computed at the masked rows (the trainer's and validate's path)."""
    model = random_dream().double() if kind == "sft" else dit()
    cfg = TrainConfig(batch_size=3)
    if kind == "elbo":
        model.config.model_length = 20
    obj = objectives.build(kind, cfg, batch_layout(cfg, 1), Dist(), model)
    x0, xt, t = noised(model)
    n = objectives.Noised(x0, xt, t if kind == "elbo" else t[1])
    two = TwoPass(model, None)
    logits, nll = two(xt, False), two(xt, False, **obj.targets(n))
    torch.testing.assert_close(obj.loss(nll, n), obj.loss(logits, n), **TOL)
    torch.testing.assert_close(obj.terms(nll, n), obj.terms(logits, n), **TOL)


def test_entropy_in_place_is_the_expression_bit_for_bit():
    """The in-place entropy (no gradient to carry) is the official expression to the last bit."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        logp = torch.log_softmax(torch.randn(50, 1000, generator=g, dtype=dtype) * 4, -1)
        p = logp.exp()
        want = -(p * torch.log(p + 1e-10)).sum(-1)
        assert torch.equal(_entropy(p), want)
