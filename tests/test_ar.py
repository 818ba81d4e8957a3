"""The AR baseline: causal DiT, next-token loss in the trainer, left-to-right sampling, recipe."""

import math

import pytest
import torch
import torch.nn.functional as F

from runs import make_run
from smdlm_cli.core import diffusion, objectives, trainer
from smdlm_cli.core.distributed import Dist, batch_layout
from smdlm_cli.core.twopass import TwoPass
from smdlm_cli.core.config import SoftMaskConfig, TrainConfig
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.models import load_model
from smdlm_cli.core.models.dit import build_dit
from smdlm_cli.core.samplers import decode
from smdlm_cli.recipe import load_recipe


def _model(causal=True, seed=0):
    torch.manual_seed(seed)
    m = build_dit("tiny", 50, 49, 16, hidden_dim=32, n_blocks=2, n_heads=2, cond_dim=16,
                  dropout=0.0, causal=causal).eval()
    for name, p in m.named_parameters():
        if "adaLN" in name or "output_layer.linear" in name:
            torch.nn.init.normal_(p, std=0.3)
    return m


def test_causal_rows_never_see_the_future():
    m = _model()
    x = torch.randint(0, 49, (2, 16))
    y = x.clone()
    y[:, 9:] = torch.randint(0, 49, (2, 7))
    a, b = m(input_ids=x), m(input_ids=y)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    # a padding mask combines with the causal one (SDPA takes one or the other)
    pad = torch.ones(2, 16, dtype=torch.long)
    pad[1, 12:] = 0
    torch.testing.assert_close(m(input_ids=x, attention_mask=pad)[:, :12], a[:, :12])
    bi = _model(causal=False)
    assert not torch.allclose(bi(input_ids=x)[:, :9], bi(input_ids=y)[:, :9])


def test_causal_nll_is_the_next_token_cross_entropy():
    logits = torch.randn(2, 5, 7)
    x0 = torch.randint(0, 7, (2, 5))
    nll = diffusion.causal_nll(logits, x0)
    assert nll.shape == (2, 5) and torch.all(nll[:, 0] == 0)
    direct = -logits.log_softmax(-1)[0, 2, x0[0, 3]]
    torch.testing.assert_close(nll[0, 3], direct)


def test_validation_of_an_ar_model_is_its_exact_nll():
    m = _model()
    x0 = torch.randint(0, 49, (3, 16))
    x0[:, 0] = 0
    ctx = Dist()
    objective = objectives.build("elbo", TrainConfig(batch_size=3), batch_layout(TrainConfig(batch_size=3), 1),
                                 ctx, m)
    assert isinstance(objective, objectives.Autoregressive)
    out = objectives.validate(TwoPass(m, None), objective, [x0], False, 0, "fp32")
    logits = m(input_ids=x0)
    direct = F.cross_entropy(logits[:, :-1].reshape(-1, 50), x0[:, 1:].reshape(-1), reduction="sum")
    assert math.isclose(out["val_nll"], direct.item() / x0.numel(), rel_tol=1e-5)
    assert math.isclose(out["val_bpd"], out["val_nll"] / math.log(2), rel_tol=1e-9)


def test_ar_training_lowers_the_loss(tmp_path):
    m = _model()
    data = torch.arange(16).repeat(8, 1) % 49  # one repeated sequence: easy to learn

    class Loader:
        def next_batch(self):
            return data

        def state_dict(self):
            return {}

        def load_state_dict(self, _):
            pass

    cfg = TrainConfig(steps=30, batch_size=8, lr=3e-3, warmup=0, ema=0.0, eval_every=30,
                      save_every=30, log_every=10, seed=0)
    result = trainer.fit(m, None, cfg, SoftMaskConfig(enabled=False), Loader(), [data], tmp_path,
                         Dist())
    assert result.last_val["val_nll"] < 0.5 * result.first_val["val_nll"]
    assert load_model(str(tmp_path)).config.causal


def test_ar_sampling_fills_left_to_right_and_rows_are_independent():
    m = _model()
    x = torch.full((3, 16), 49)
    x[:, 0] = 0
    x[1, 1:4] = torch.tensor([5, 6, 7])  # a prompt
    out = decode(m, x, sampler="ar", steps=1, generator_seeds=[1, 2, 3])
    assert out.nfe == 15 and not (out.tokens == 49).any()
    assert out.tokens[1, 1:4].tolist() == [5, 6, 7]
    alone = decode(m, x[1:2], sampler="ar", steps=1, generator_seeds=[2])
    assert torch.equal(alone.tokens[0], out.tokens[1])
    assert alone.nfe == 12
    # greedy-ish sampling follows the model's argmax
    cold = decode(m, x[:1], sampler="ar", steps=1, generator_seeds=[0], temperature=1e-4)
    t = cold.tokens[0]
    logits = m(input_ids=t[None])[0].clone()
    logits[:, 49] = -float("inf")
    assert torch.equal(logits[:-1].argmax(-1), t[1:])


def test_samplers_and_model_kinds_must_match():
    x = torch.full((1, 16), 49)
    x[:, 0] = 0
    with pytest.raises(UserError, match="decodes with sampler ar"):
        decode(_model(), x, sampler="mdlm", steps=4, generator_seeds=[0])
    with pytest.raises(UserError, match="needs an AR model"):
        decode(_model(causal=False), x, sampler="ar", steps=4, generator_seeds=[0])


def test_ar_recipe_loads_and_refuses_softmask(tmp_path):
    r = load_recipe("recipes/quickstart-ar.toml")
    q = load_recipe("recipes/quickstart.toml")
    assert r.model.causal and not r.softmask.enabled
    assert (r.data, r.model.length, r.model.preset) == (q.data, q.model.length, q.model.preset)
    with pytest.raises(UserError, match="model.causal = true trains an AR model.*softmask.enabled"):
        load_recipe("recipes/quickstart-ar.toml", ["softmask.enabled=true"])


def test_sample_command_picks_the_ar_sampler(tmp_path):
    from smdlm_cli.commands.sample import SampleSettings, generate

    run = make_run(tmp_path / "ar", causal=True)
    _, records, sidecar, trace = generate(SampleSettings(ckpt=str(run), nfe=4, num_samples=2))
    assert sidecar["settings"]["sampler"] == "ar" and trace is None
    assert all(r["nfe"] == 23 for r in records)
