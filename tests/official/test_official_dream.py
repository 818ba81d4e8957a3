"""smdlm's Dream decoding against the official loop with the SM patch (oracle_dream.py).

Tiny random Dream-layout models (dream_fixtures.py), greedy decoding (the official categorical draw
is a random stream nobody else shares), 20 seeds per setting: the tokens after every step must be
equal and every soft input embedding within 1e-6. The defaults are what is under test: no `exact`
flag is passed, the Dream model's own settings (forward at every step, [MASK] column kept) decide.
"""

import pytest
import torch

from dream_fixtures import random_dream
from oracle_dream import SMArgs, dream_generate, head_mixture, raw_logits, shifted
from smdlm_cli.core import objectives
from smdlm_cli.core.config import TrainConfig
from smdlm_cli.core.distributed import Dist, batch_layout
from smdlm_cli.core.twopass import TwoPass
from smdlm_cli.core.samplers import decode
from smdlm_cli.core.softmask import SoftMask

SEEDS = range(20)
PROMPT, GEN = 6, 10   # 16 positions: never equal to V = 96, so a broadcast bug cannot hide
# omega chosen so that lambda is large on a random model (entropies near log 96)
SCALE, CENTRE, STEEP, TEMP = 0.875, -4.0, 3.0, 0.75


def mask_heavy(model):
    """A head whose [MASK] logit sits 0.5 below each row's best token: much mass, never the argmax."""
    mask_id = model.mask_id

    def hook(module, inputs, out):
        others = torch.cat([out[..., :mask_id], out[..., mask_id + 1:]], -1)
        out = out.clone()
        out[..., mask_id] = others.max(-1).values - 0.5
        return out
    model.lm_head.register_forward_hook(hook)
    return model


def setup(seed, heavy=False, batch=1, **config):
    """A random model in float64 whose [MASK] logit is 0 (some mass, never a row's best: a random
    row's best logit is ~2.5 sd above 0), or with a [MASK]-heavy head. float64, because the two
    implementations round differently (softmax of logits vs of log-probabilities): in float32 two
    positions whose confidences agree to 1e-7 are a coin toss, not a rule."""
    model = random_dream(seed, **config).double()
    with torch.no_grad():
        model.lm_head.weight[model.mask_id] = 0.0
    if heavy:
        mask_heavy(model)
    g = torch.Generator().manual_seed(1000 + seed)
    prompt = torch.randint(0, 93, (batch, PROMPT), generator=g)
    x = torch.cat([prompt, torch.full((batch, GEN), model.mask_id)], 1)
    return model, x


def softmask(k, temperature=None):
    sm = SoftMask(k=k, scale=SCALE, centre=CENTRE, steepness=STEEP, temperature=temperature)
    sm.fix_values(SCALE, CENTRE, STEEP, temperature)  # the numbers an official config holds
    return sm


def sm_args(k, alg="mixinputs_with_topk", schedule="none"):
    return SMArgs(alg=alg, schedule=schedule, scale=SCALE, steepness=STEEP, offset=CENTRE, k=k,
                  temperature=TEMP)


def smdlm(model, x, steps, sm, alg="entropy", schedule="none", **kw):
    """(trace tokens (steps + 1, B, L), inputs_embeds of every forward (None: plain ids))."""
    embeds = []
    inner = model.hidden  # decoding runs hidden(), then the head at the masked rows only

    def hidden(*args, **kwargs):
        embeds.append(kwargs.get("inputs_embeds"))
        return inner(*args, **kwargs)
    model.hidden = hidden
    try:
        out = decode(model, x, sampler="confidence", steps=steps, softmask=sm,
                     generator_seeds=[0] * x.shape[0], sm_schedule=schedule, trace=True, alg=alg,
                     temperature=0.0, **kw)
    finally:
        del model.hidden
    return out, embeds


def assert_same(model, x, steps, sm, args, alg="entropy", schedule="none"):
    """Equal tokens after every step and soft inputs within 1e-6; returns the official run."""
    ref = dream_generate(model, x, model.mask_id, steps, alg=alg, sm=args, fix_zero_scale=True)
    assert not ref.committed_mask  # the comparison's premise: the official run never kept a mask
    out, embeds = smdlm(model, x, steps, sm, alg, schedule)
    if sm is not None:  # a forward at every step, as Dream's loop; binary decoding may skip a
        assert out.nfe == steps and out.skipped == 0  # step that commits nothing: same tokens
    assert torch.equal(out.tokens, ref.tokens)
    for i, h in enumerate(ref.history):
        assert torch.equal(out.trace["tokens"][i + 1], h), f"step {i}"
    if sm is None:
        assert all(e is None for e in embeds)
        return ref
    assert len(embeds) == len(ref.embeds)
    for i, (got, want) in enumerate(zip(embeds, ref.embeds)):
        assert (got is None) == (want is None), f"forward {i}"
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"forward {i}")
    return ref


@pytest.mark.parametrize("heavy", [False, True], ids=["plain-head", "mask-heavy-head"])
@pytest.mark.parametrize("per_step", [1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_default_dream_sm_decoding_is_the_official_loop(k, per_step, heavy):
    for seed in SEEDS:
        model, x = setup(seed, heavy)
        assert_same(model, x, GEN // per_step, softmask(k), sm_args(k))


def test_binary_decoding_and_other_confidences_are_the_official_loop():
    for seed in SEEDS:
        model, x = setup(seed, heavy=seed % 2 == 1)
        assert_same(model, x, GEN, None, None)
        for alg in ("maskgit_plus", "topk_margin"):
            assert_same(model, x, GEN, softmask(1), sm_args(1), alg=alg)


def test_temperature_variant_is_the_official_mixinputs_with_temp():
    for seed in SEEDS:
        model, x = setup(seed, heavy=seed % 2 == 1)
        assert_same(model, x, GEN, softmask(3, TEMP), sm_args(3, "mixinputs_with_temp"))


@pytest.mark.parametrize("schedule", ["linear", "stepwise"])
def test_sm_schedules_match_the_official_ones_where_they_do_not_crash(schedule):
    for seed in SEEDS[:10]:
        model, x = setup(seed)
        assert_same(model, x, GEN, softmask(1), sm_args(1, schedule=schedule), schedule=schedule)
    # The official calculate_lambda_tensor returns lambda without its last axis at scale 0, which
    # no longer broadcasts against the one-hot inputs: its linear schedule fails at the last step
    # (no mask left), its stepwise one once half the masks are decoded. smdlm's lambda is 0 there.
    model, x = setup(0)
    with pytest.raises(RuntimeError):
        dream_generate(model, x, model.mask_id, GEN, sm=sm_args(1, schedule=schedule))


def test_a_batch_of_equal_length_rows_matches_the_official_batch():
    # the official k and schedule use batch totals, smdlm's the row's own counts: with rows of
    # equal generation length every row has the same counts at every step, so the two agree
    for seed in SEEDS[:10]:
        model, x = setup(seed, heavy=True, batch=2)
        assert_same(model, x, GEN, softmask(3), sm_args(3))


def test_the_defaults_matter():
    """The checks above have power: skipping step 0 (the old default) or dropping the [MASK]
    column on a [MASK]-heavy head decodes differently from the official loop in some seeds."""
    skipped = dropped = 0
    for seed in SEEDS:
        model, x = setup(seed)
        ref = dream_generate(model, x, model.mask_id, GEN, sm=sm_args(1))
        out, _ = smdlm(model, x, GEN, softmask(1), exact=False)
        skipped += not torch.equal(out.tokens, ref.tokens)
        model, x = setup(seed, heavy=True, mask_logit="drop")
        ref = dream_generate(model, x, model.mask_id, GEN, sm=sm_args(3))
        out, _ = smdlm(model, x, GEN, softmask(3))
        dropped += not torch.equal(out.tokens, ref.tokens)
    assert skipped >= 3 and dropped >= 3, (skipped, dropped)


def official_sft_loss(model, x0, xt, t, raw, alg, k):
    """The official dLLMTrainer.compute_loss on a soft-masked batch: pass 1 without gradients,
    TransparencyHead p_sm @ W, pass 2 with labels = x0 at masks (-100 elsewhere) under HF's
    ForCausalLMLoss (labels shifted left against the raw logits; full-vocabulary CE, mean over
    the labelled tokens), times dsigma = 1/t."""
    mask_id = model.mask_id
    with torch.no_grad():
        prelim = shifted(raw_logits(model, input_ids=xt))
    p_sm = head_mixture(xt, prelim, mask_id, raw, alg, k)
    logits = raw_logits(model, inputs_embeds=p_sm @ model.model.embed_tokens.weight)
    labels = torch.where(xt == mask_id, x0, torch.full_like(x0, -100))
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                           ignore_index=-100)
    return ce / t


@pytest.mark.parametrize("alg,k", [("mixinputs_with_topk", 1), ("mixinputs_with_topk", 3),
                                   ("mixinputs_with_temp", 1)])
def test_fine_tuning_step_is_the_official_one(alg, k):
    """smdlm's two-pass fine-tuning loss on a Dream model (the [MASK] column kept) against the
    official trainer's, in float64: loss and every gradient (adapters' stand-in: all weights; and
    omega, the temperature included) to float64 precision."""
    for seed in range(5):
        model, _ = setup(seed, heavy=True)
        temp = TEMP if alg == "mixinputs_with_temp" else None
        sm = SoftMask(k=k, scale=0.5, centre=-3.0, steepness=2.0, temperature=temp).double()
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randint(0, 93, (1, 24), generator=g)
        t = torch.tensor(0.2 + 0.6 * torch.rand((), generator=g).item(), dtype=torch.float64)
        maskable = torch.arange(24) >= 8  # the prompt is never masked
        xt = torch.where((torch.rand(1, 24, generator=g) < t) & maskable, model.mask_id, x0)
        logits = TwoPass(model, sm)(xt, use_sm=True)
        cfg = TrainConfig(batch_size=1)
        sft = objectives.build("sft", cfg, batch_layout(cfg, 1), Dist(), model)
        loss = sft.loss(logits, objectives.Noised(x0, xt, t))  # one micro-batch: accum 1
        raw_t = sm.raw_temperature if temp else torch.tensor(0.5413, dtype=torch.float64)
        raw = (sm.raw_scale, sm.raw_centre, sm.raw_steepness, raw_t)
        want_loss = official_sft_loss(model, x0, xt, t, raw, alg, k)
        params = list(model.parameters()) + list(sm.parameters())
        got, want = torch.autograd.grad(loss, params), torch.autograd.grad(want_loss, params)
        torch.testing.assert_close(loss, want_loss, rtol=1e-11, atol=1e-14)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
        assert all(g.abs().sum() > 0 for g in got[-len(list(sm.parameters())):])
        # power: the SUBS loss (the [MASK] column dropped) is another number on this head
        subs = objectives.sft_loss(logits, x0, xt, t, model.mask_id, keep_mask=False)[0]
        assert abs(subs - loss) > 1e-3
