"""SoftMask against the paper's formula computed densely, its bounds, gradients and JSON formats."""

import json
import math

import pytest
import torch

from smdlm_cli.core.checkpoint import load_softmask, save_softmask
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.softmask import SoftMask

B, L, V, D, MASK = 3, 7, 50, 16, 49


def dense_reference(ids, logits, weight, k, scale, centre, steep, temp=1.0, keep_mask=False):
    """x = (1-lam) onehot(mask) + lam * topk-renormalised p, then x @ W: the paper, dense.

    p is the SUBS distribution: the [MASK] logit is removed before the softmax (unless keep_mask).
    k = None mixes the whole tempered p (the official mixinputs_with_temp).
    """
    logits = logits.double().clone()
    if not keep_mask:
        logits[..., MASK] = float("-inf")
    p = torch.softmax(logits / temp, -1)
    neg_h = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p)).sum(-1)
    lam = scale * torch.sigmoid(steep * (neg_h - centre))
    is_mask = ids == MASK
    lam = torch.where(is_mask, lam, torch.zeros_like(lam))
    if k is None:
        q = p
    else:
        top = p.topk(k, -1)
        q = torch.zeros_like(p).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    onehot = torch.nn.functional.one_hot(ids, V).double()
    x = (1 - lam[..., None]) * onehot + lam[..., None] * q
    return x @ weight.double(), lam


@pytest.mark.parametrize("k", [1, 3, 5])
def test_forward_equals_dense_formula(k):
    g = torch.Generator().manual_seed(k)
    ids = torch.randint(0, V - 1, (B, L), generator=g)
    ids[torch.rand(B, L, generator=g) < 0.5] = MASK
    logits = torch.randn(B, L, V, generator=g) * 3
    weight = torch.randn(V, D, generator=g)
    sm = SoftMask(k=k, scale=0.7, centre=-1.3, steepness=2.5)
    got = sm(ids, logits, weight, MASK)
    want, lam_want = dense_reference(ids, logits, weight, k, 0.7, -1.3, 2.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sm.feedback(logits, ids == MASK, mask_id=MASK)[0].double(), lam_want, rtol=1e-5, atol=1e-6)


def test_sampler_entropy_is_the_official_formula_within_its_epsilon():
    """The samplers pass log p and no gradient: H = -sum p log p, which differs from the official
    -sum p log(p + 1e-10) by at most V * 1e-10 (softmask._entropy_of_log_probs)."""
    vocab = 50_258
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, vocab, generator=g) * torch.tensor([0.1, 1, 3, 10, 30, 100])[:, None]
    logp = torch.log_softmax(logits, -1)
    sm = SoftMask(k=3, scale=0.5, centre=-4.0, steepness=2.0)
    p = logits.double().softmax(-1)
    official = -(p * torch.log(p + 1e-10)).sum(-1)
    with torch.no_grad():
        _, _, h = sm._scores_probs_entropy(logp, normalized=True)
    assert (h.double() - official).abs().max() <= vocab * 1e-10 + 1e-5  # + fp32 rounding of the sum
    assert h.min() >= 0 and h[0] > 10.0 and h[-1] < 1e-3  # near-uniform ... near one-hot rows
    with torch.no_grad():  # lambda as the training path computes it, from the raw logits
        lam_train = sm.feedback(logits, torch.ones(6, dtype=torch.bool))[0]
        lam_sampler = sm.feedback(logp, torch.ones(6, dtype=torch.bool), normalized=True)[0]
    torch.testing.assert_close(lam_sampler, lam_train, rtol=0, atol=1e-5)
    weight = torch.randn(vocab, 8, generator=g)
    kept = logp.clone()
    with torch.no_grad():  # a reused scratch (the CPU samplers') changes no bit, and not log p
        plain = sm.mixture(logp, weight, normalized=True)
        scratch = torch.full_like(logp, float("nan"))
        reused = sm.mixture(logp, weight, normalized=True, scratch=scratch)
    assert all(torch.equal(a, b) for a, b in zip(plain, reused))
    assert torch.equal(logp, kept) and not scratch.isnan().any()


@pytest.mark.parametrize("keep_mask", [False, True])
def test_temperature_variant_mixes_the_whole_tempered_distribution(keep_mask):
    # the official mixinputs_with_temp: all V tokens, whatever k; masked rows only get it
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V - 1, (B, L), generator=g)
    ids[torch.rand(B, L, generator=g) < 0.6] = MASK
    logits = torch.randn(B, L, V, generator=g)
    logits[..., MASK] += 2.0  # a [MASK] column with real mass
    weight = torch.randn(V, D, generator=g)
    sm = SoftMask(k=2, scale=0.5, centre=-2.0, steepness=3.0, temperature=0.5)
    want, _ = dense_reference(ids, logits, weight, None, 0.5, -2.0, 3.0, temp=0.5, keep_mask=keep_mask)
    got = sm(ids, logits, weight, MASK, keep_mask=keep_mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    got.sum().backward()  # the temperature learns through p, as the official head's does
    assert sm.raw_temperature.grad is not None and sm.raw_temperature.grad.abs() > 0


@pytest.mark.parametrize("k", [1, 3])
def test_keep_mask_leaves_the_mask_column_in_entropy_and_top_k(k):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V - 1, (B, L), generator=g)
    ids[torch.rand(B, L, generator=g) < 0.6] = MASK
    logits = torch.randn(B, L, V, generator=g) * 2
    logits[..., MASK] += 4.0  # often in the top k
    weight = torch.randn(V, D, generator=g)
    sm = SoftMask(k=k, scale=0.6, centre=-1.0, steepness=4.0)
    want, _ = dense_reference(ids, logits, weight, k, 0.6, -1.0, 4.0, keep_mask=True)
    torch.testing.assert_close(sm(ids, logits, weight, MASK, keep_mask=True).double(), want,
                               rtol=1e-5, atol=1e-5)
    drop, _ = dense_reference(ids, logits, weight, k, 0.6, -1.0, 4.0)
    assert (want - drop).abs().max() > 1e-2  # the setting matters on such a head


def test_lambda_bounds_and_zero_off_mask():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, L), generator=g)
    logits = torch.randn(B, L, V, generator=g) * 10
    for scale in (0.0, 1e-6, 0.3, 1.0):
        sm = SoftMask(scale=scale)
        lam = sm.feedback(logits, ids == MASK)[0]
        assert (lam >= 0).all() and (lam <= scale + 1e-7).all()
        assert (lam[ids != MASK] == 0).all()


def test_unmasked_positions_get_their_plain_embedding_exactly():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V - 1, (B, L), generator=g)
    ids[:, ::2] = MASK
    weight = torch.randn(V, D, generator=g)
    out = SoftMask(scale=0.9)(ids, torch.randn(B, L, V, generator=g), weight, MASK)
    assert torch.equal(out[ids != MASK], weight[ids[ids != MASK]])


def test_scale_zero_is_binary_bit_for_bit():
    g = torch.Generator().manual_seed(3)
    ids = torch.full((B, L), MASK)
    weight = torch.randn(V, D, generator=g)
    out = SoftMask(scale=0.0)(ids, torch.randn(B, L, V, generator=g), weight, MASK)
    assert torch.equal(out, weight[ids])


def test_initial_values_match_the_official_code():
    sm = SoftMask()
    assert sm.k == 3
    assert sm.scale.item() == pytest.approx(1e-6, rel=1e-4)
    assert sm.centre.item() == pytest.approx(-0.75, abs=1e-6)
    assert sm.steepness.item() == pytest.approx(6.66, abs=1e-5)
    # lambda/scale at H = 0, 0.75 and 2 as listed in the reference notes
    for h, ratio in [(0.0, 0.993), (0.75, 0.5), (2.0, 2.4e-4)]:
        assert (sm.lam_from_entropy(torch.tensor(h)) / sm.scale).item() == pytest.approx(ratio, rel=2e-2)


def test_gradients_reach_omega_and_embedding_not_logits():
    g = torch.Generator().manual_seed(4)
    ids = torch.full((B, L), MASK)
    logits = torch.randn(B, L, V, generator=g, requires_grad=True)
    weight = torch.randn(V, D, generator=g, requires_grad=True)
    sm = SoftMask(scale=0.5)
    sm(ids, logits, weight, MASK).square().sum().backward()
    assert logits.grad is None
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    for p in sm.parameters():
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad != 0


def test_invalid_values_are_user_errors():
    for kwargs in ({"k": 0}, {"scale": 1.5}, {"centre": 0.1}, {"steepness": 0.0}, {"temperature": -1.0}):
        with pytest.raises(UserError):
            SoftMask(**kwargs)


def test_json_roundtrip_and_official_format(tmp_path):
    sm = SoftMask(k=1, scale=0.25, centre=-1.0, steepness=5.0)
    with torch.no_grad():
        for p in sm.parameters():
            p.add_(0.123)
    save_softmask(tmp_path, sm)
    back = load_softmask(tmp_path)
    assert back.k == 1
    for name, p in sm.named_parameters():
        assert dict(back.named_parameters())[name].item() == p.item()
    official = json.loads((tmp_path / "transparency_config.json").read_text())
    assert official["transparency_alg"] == "mixinputs_with_topk"
    assert official["mixinputs_k"] == 1
    # bfloat16, as the official get_th_kwargs exports, and it says so
    assert official["precision"] == "bfloat16"
    for key, value in (("transparency_scale", sm.scale), ("transparency_centre", sm.centre),
                       ("transparency_steepness", sm.steepness)):
        assert official[key] == value.detach().to(torch.bfloat16).item() != value.item()


def test_reads_an_official_transparency_config(tmp_path):
    # The README example of the official code.
    cfg = {"transparency_alg": "mixinputs_with_topk", "transparency_scale": 0.25,
           "transparency_centre": -1, "transparency_steepness": 5, "mixinputs_k": 1,
           "mixture_temp": 1.0, "transparency_scheduling": "none"}
    path = tmp_path / "transparency_config.json"
    path.write_text(json.dumps(cfg))
    sm = load_softmask(path)
    assert (sm.k, sm.temperature) == (1, None)
    # the numbers as written, bit for bit: the official sampler decodes with exactly these
    assert (sm.scale.item(), sm.centre.item(), sm.steepness.item()) == (0.25, -1.0, 5.0)
    bf16 = {**cfg, "transparency_alg": "mixinputs_with_temp", "transparency_scale": 0.2734375,
            "transparency_centre": -0.83984375, "transparency_steepness": 6.65625,
            "mixture_temp": 0.98828125}
    path.write_text(json.dumps(bf16))
    sm = load_softmask(path)
    assert (sm.scale.item(), sm.centre.item(), sm.steepness.item(), sm.temperature.item()) == \
        (0.2734375, -0.83984375, 6.65625, 0.98828125)
    h = torch.linspace(0, 4, 9)
    want = 0.2734375 * torch.sigmoid(6.65625 * (-h - -0.83984375))
    assert torch.equal(sm.lam_from_entropy(h), want)
    path.write_text(json.dumps({"transparency_alg": "none"}))
    assert load_softmask(path) is None
    path.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_softmask(path)
    path.write_text(json.dumps({"transparency_alg": "mixinputs_with_topk"}))
    with pytest.raises(UserError, match="transparency_scale"):
        load_softmask(path)


def test_half_point_of_the_curve_is_the_centre():
    sm = SoftMask(scale=0.8, centre=-1.2, steepness=4.0)
    assert sm.lam_from_entropy(torch.tensor(1.2)).item() == pytest.approx(0.4, rel=1e-5)
    assert math.isclose(sm.lam_from_entropy(torch.tensor(0.0)).item(),
                        0.8 / (1 + math.exp(-4.0 * 1.2)), rel_tol=1e-5)


def test_fixed_values_survive_softmask_json(tmp_path):
    # an official config's numbers, saved by smdlm (a sample's sidecar, a run) and read back
    official = {"transparency_alg": "mixinputs_with_topk", "transparency_scale": 0.2734375,
                "transparency_centre": -0.83984375, "transparency_steepness": 6.65625,
                "mixinputs_k": 1, "mixture_temp": 1.0, "transparency_scheduling": "none"}
    sm = SoftMask.from_dict(official)
    back = SoftMask.from_dict(json.loads(json.dumps(sm.to_dict())))
    assert sm.to_dict()["fixed"] and "raw" not in sm.to_dict()
    assert (back.scale.item(), back.centre.item(), back.steepness.item()) == \
        (0.2734375, -0.83984375, 6.65625)
