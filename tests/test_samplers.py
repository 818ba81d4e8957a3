"""Samplers: invariants of every transition, the decoding loop's bookkeeping, and no host sync.

A tiny deterministic mock Denoiser (embedding + position table + a bidirectional masked-mean mixing
layer + linear head) makes logits depend on the whole input, inputs_embeds included, and honours
the attention mask, so batch/alone, SM and padding properties are observable on the CPU in ms.
"""

import math

import pytest
import torch
from torch import nn

from syncs import count_syncs

from smdlm_cli.core.diffusion import subs_log_probs
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.samplers import SAMPLERS, decode, validate_sampler_args
from smdlm_cli.core.samplers import common, confidence, mdlm
from smdlm_cli.core.softmask import SoftMask

V, MASK, PAD = 50, 49, 0
ALL = [("mdlm", {}), ("remdm-cap", {}), ("remdm-loop", {}),
       ("confidence", {"alg": "entropy", "temperature": 0.5}),
       ("confidence", {"alg": "maskgit_plus", "temperature": 1.0, "top_p": 0.9}),
       ("confidence", {"alg": "topk_margin", "temperature": 0.0, "alg_temp": 0.5}),
       ("confidence", {"alg": "origin", "temperature": 1.0, "top_k": 5}),
       ("confidence", {"alg": "low_confidence", "transfer": "even", "temperature": 0.7,
                       "cfg_scale": 1.0}),
       ("confidence", {"alg": "random", "temperature": 0.5}),
       ("mdlm", {"cfg_scale": 0.5})]
IDS = [f"{s}-{kw.get('alg', '')}" + ("-cfg" if kw.get("cfg_scale") else "") for s, kw in ALL]


class Mock(nn.Module):
    """Denoiser interface; records every call (ids or embeddings) for the tests to inspect."""

    def __init__(self, vocab=V, dim=32, max_len=96, sharp=6.0, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.vocab_size, self.mask_id = vocab, vocab - 1
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim, generator=g))
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        with torch.no_grad():
            for p in (self.emb.weight, self.mix.weight, self.mix.bias, self.head.weight,
                      self.head.bias):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(dim))
        self.sharp, self.calls = sharp, []

    def embedding_weight(self):
        return self.emb.weight

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None):
        assert (input_ids is None) != (inputs_embeds is None)
        self.calls.append((input_ids, inputs_embeds))
        h = self.emb(input_ids) if inputs_embeds is None else inputs_embeds
        h = h + self.pos[: h.shape[1]]
        m = (h.new_ones(h.shape[:2]) if attention_mask is None else attention_mask.float())[..., None]
        ctx = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        return self.head(torch.tanh(h + self.mix(ctx))) * self.sharp


def sm(scale=0.9, k=3):
    return SoftMask(k=k, scale=scale, centre=-3.0, steepness=3.0)


def prompt_batch(lengths=(3, 6, 1), gen=12, seed=0):
    """Right-padded rows: prompt of its own length, then `gen` masks, then PAD up to the longest."""
    g = torch.Generator().manual_seed(seed)
    L = max(lengths) + gen
    x = torch.full((len(lengths), L), PAD)
    am = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randint(1, V - 1, (n,), generator=g)
        x[b, n:n + gen] = MASK
        am[b, : n + gen] = 1
    return x, am


def run(sampler, kw, x, steps, seeds=None, **extra):
    seeds = list(range(x.shape[0])) if seeds is None else seeds
    return decode(Mock(), x, sampler=sampler, steps=steps, generator_seeds=seeds, **kw, **extra)


# --- output invariants, every sampler -----------------------------------------------------------
@pytest.mark.parametrize("sampler,kw", ALL, ids=IDS)
@pytest.mark.parametrize("softmask", [None, sm()], ids=["binary", "sm"])
def test_no_mask_left_prompt_kept_and_nfe_accounting(sampler, kw, softmask):
    x, am = prompt_batch()
    given = x.clone()
    out = run(sampler, kw, x, 12, attention_mask=am, softmask=softmask, trace=True)
    assert torch.equal(x, given)                                   # the input is not written to
    real, prompt = am.bool(), am.bool() & (x != MASK)
    assert not (out.tokens[real] == MASK).any()
    assert torch.equal(out.tokens[~real], x[~real])               # pads untouched
    for state in out.trace["tokens"]:                              # the prompt, at every step
        assert torch.equal(state[prompt], x[prompt])
    assert torch.equal(out.tokens[prompt], x[prompt])
    removal, settle = out.trace["noise_removal"], out.trace["settle"]
    assert out.nfe == out.steps - out.skipped + int(removal) + int(settle)
    assert not settle or (softmask is not None and removal)
    assert out.skipped == out.trace["forward"].count(False)
    if sampler == "confidence":
        assert not removal


@pytest.mark.parametrize("sampler,kw", [a for a in ALL if a[0] in ("mdlm", "confidence")],
                         ids=[i for i, a in zip(IDS, ALL) if a[0] in ("mdlm", "confidence")])
def test_unmasked_tokens_never_change(sampler, kw):
    x = torch.full((2, 20), MASK)
    x[:, 5] = 7                                                    # fixed token inside (infilling)
    out = run(sampler, kw, x, 10, softmask=sm(), trace=True)
    states = out.trace["tokens"]
    for before, after in zip(states[:-1], states[1:]):
        known = before != MASK
        assert torch.equal(after[known], before[known])
    assert torch.equal(out.tokens[states[-1] != MASK], states[-1][states[-1] != MASK])


def test_mask_never_drawn_even_at_huge_temperature():
    g = torch.Generator().manual_seed(0)
    x = torch.full((64,), MASK)
    logp = subs_log_probs(torch.randn(64, V, generator=g), x, MASK)
    assert torch.equal(logp.exp()[:, MASK], torch.zeros(64))      # SUBS: p[mask] = 0
    gens = common.row_generators([1, 2], torch.device("cpu"))
    tokens = mdlm.mdlm_draw(1e9, 1.0, MASK)(logp, gens, [32, 32])  # near-uniform over the rest
    assert not (tokens == MASK).any() and tokens.unique().numel() > 30
    conf, x0 = confidence.sample_tokens(logp.clone(), gens, [32, 32], {
        **confidence.OPTIONS, "temperature": 1e9}, MASK)
    assert not (x0 == MASK).any()


# --- tokens per step ----------------------------------------------------------------------------
@pytest.mark.parametrize("steps,table", [(16, [0] + [1] * 14 + [2]), (8, [1] + [2] * 6 + [3])])
def test_confidence_tokens_per_step_table(steps, table):
    x = torch.cat([torch.full((2, 3), 5), torch.full((2, 16), MASK)], 1)
    out = run("confidence", {}, x, steps, trace=True)
    assert out.trace["unmasked"] == [[k, k] for k in table]
    assert out.trace["forward"] == [k > 0 for k in table]          # a step committing 0 is skipped


def test_confidence_blocks_stay_inside_the_current_block():
    x = torch.cat([torch.full((1, 2), 5), torch.full((1, 16), MASK)], 1)
    out = run("confidence", {"block_length": 4, "temperature": 1.0}, x, 8, trace=True)
    states = out.trace["tokens"]
    for i in range(8):                                             # 4 blocks, 2 steps each
        changed = (states[i + 1] != states[i])[0].nonzero().flatten()
        block = i // 2
        assert ((changed >= 2 + 4 * block) & (changed < 2 + 4 * (block + 1))).all()
    assert [u[0] for u in out.trace["unmasked"]] == [1, 3] * 4     # int(4 * 0.4995) = 1, rest
    with pytest.raises(UserError, match="multiple of the number of blocks 4"):
        run("confidence", {"block_length": 4}, x, 6)


def test_mdlm_unmask_rate_per_step_matches_the_schedule():
    steps, B, L = 8, 4, 4096
    gen = torch.ones(B, L, dtype=torch.bool)
    gens = common.row_generators(range(B), torch.device("cpu"))
    masked = mdlm.plan_mdlm(gen, [L] * B, gens, steps)
    grid = mdlm.time_grid(steps, mdlm.GRID_EPS)
    for i in range(steps):
        n = masked[i].sum().item()
        rate = (masked[i] & ~masked[i + 1]).sum().item() / n
        want = (grid[i] - grid[i + 1]) / grid[i]
        assert abs(rate - want) < 5 * math.sqrt(want * (1 - want) / n) + 1e-9
    assert not (~masked[:-1] & masked[1:]).any()                   # MDLM never remasks


def test_mdlm_skips_steps_without_changes():
    x = torch.full((1, 8), MASK)
    out = run("mdlm", {}, x, 64, trace=True)
    assert out.skipped > 0 and out.nfe == 64 - out.skipped + int(out.trace["noise_removal"])
    assert not out.trace["settle"]  # binary decoding: no settling forward
    for ran, unmasked in zip(out.trace["forward"], out.trace["unmasked"]):
        assert ran == (unmasked[0] > 0)


@pytest.mark.parametrize("sampler", ["remdm-cap", "remdm-loop"])
def test_remdm_rates_follow_the_plan_probabilities(sampler):
    steps, B, L = 40, 2, 4096
    gen = torch.ones(B, L, dtype=torch.bool)
    gen[:, :100] = False                                           # a prompt: never remasked
    gens = common.row_generators(range(B), torch.device("cpu"))
    probs = (mdlm.remdm_cap_probs(steps, 0.04) if sampler == "remdm-cap"
             else mdlm.remdm_loop_probs(steps, 0.02, 0.55, 0.05, 0.9))
    masked = mdlm.plan_remdm(gen, gen.sum(-1).tolist(), gens, probs)
    assert not masked[:, ~gen].any()
    for i, (p_un, p_re) in enumerate(probs):
        m, u = masked[i], ~masked[i] & gen
        if m.sum() > 500:
            rate = (m & ~masked[i + 1]).sum().item() / m.sum().item()
            assert abs(rate - p_un) < 5 * math.sqrt(p_un * (1 - p_un) / m.sum().item()) + 1e-9
        if u.sum() > 500:
            rate = (u & masked[i + 1]).sum().item() / u.sum().item()
            assert abs(rate - p_re) < 5 * math.sqrt(p_re * (1 - p_re) / u.sum().item()) + 1e-9


def test_remdm_loop_phase_boundaries():
    assert mdlm.remdm_loop_phase(0.56, 0.55, 0.05) == "mdlm-on"
    assert mdlm.remdm_loop_phase(0.55, 0.55, 0.05) == "loop"       # t <= t_on: the loop
    assert mdlm.remdm_loop_phase(0.0501, 0.55, 0.05) == "loop"
    assert mdlm.remdm_loop_phase(0.05, 0.55, 0.05) == "mdlm-off"   # t <= t_off: MDLM again
    steps = 100
    grid = mdlm.time_grid(steps, mdlm.GRID_EPS)
    probs = mdlm.remdm_loop_probs(steps, 0.02, 0.55, 0.05, 0.9)
    for t, (p_un, p_re) in zip(grid, probs):
        phase = mdlm.remdm_loop_phase(t, 0.55, 0.05)
        assert (p_re > 0) == (phase == "loop")
        if phase == "loop":
            assert p_un == pytest.approx(0.18) and p_re == pytest.approx(0.02)
    # phase 1 brings the mask share from 1 to about 1 - alpha_on (its last step ends at a time just
    # below t_on, a little past), the loop pulls it to its fixed point eta / (eta + 0.18) = 0.1
    gen = torch.ones(2, 4096, dtype=torch.bool)
    gens = common.row_generators([0, 1], torch.device("cpu"))
    share = mdlm.plan_remdm(gen, [4096, 4096], gens, probs).float().mean((1, 2))
    loop = [i for i, t in enumerate(grid[:-1]) if mdlm.remdm_loop_phase(t, 0.55, 0.05) == "loop"]
    assert share[loop[0]] == pytest.approx(1 - (1 - grid[loop[0]]) * 0.9 / 0.45, abs=0.01)
    assert share[loop[-1] + 1] == pytest.approx(0.1, abs=0.01)
    assert share[-1] < 0.001


# --- batch, seeds, SM ---------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,kw", ALL[:4] + [ALL[6]], ids=IDS[:4] + [IDS[6]])
@pytest.mark.parametrize("softmask", [None, sm()], ids=["binary", "sm"])
def test_batch_row_equals_row_decoded_alone(sampler, kw, softmask):
    x, am = prompt_batch(lengths=(3, 6, 1), gen=10)
    seeds, steps = [11, 22, 33], 24  # steps > masks: rows change at different steps
    model = Mock()
    batch = decode(model, x, sampler=sampler, steps=steps, generator_seeds=seeds,
                   attention_mask=am, softmask=softmask, trace=True, **kw)
    batch_inputs = dict(zip(_forward_steps(batch), model.calls))
    for b in range(3):
        n = int(am[b].sum())
        alone_model = Mock()
        alone = decode(alone_model, x[b:b + 1, :n], sampler=sampler, steps=steps,
                       generator_seeds=[seeds[b]], softmask=softmask, trace=True, **kw)
        assert torch.equal(batch.tokens[b, :n], alone.tokens[0])
        if softmask is None:
            continue
        # the row's own forwards see the same SM input in the batch: feedback is per row
        for i, (_, emb) in zip(_forward_steps(alone)[1:], alone_model.calls[1:]):
            torch.testing.assert_close(batch_inputs[i][1][b, :n], emb[0], atol=1e-5, rtol=0)


def _forward_steps(out):
    steps = [i for i, ran in enumerate(out.trace["forward"]) if ran]
    end = len(out.trace["forward"])
    return steps + [end] * (int(out.trace["settle"]) + int(out.trace["noise_removal"]))


@pytest.mark.parametrize("sampler,kw", ALL, ids=IDS)
def test_seeds_reproduce_and_matter(sampler, kw):
    x = torch.full((2, 24), MASK)
    a = run(sampler, kw, x, 12, seeds=[1, 2], softmask=sm(), trace=True)
    b = run(sampler, kw, x, 12, seeds=[1, 2], softmask=sm(), trace=True)
    c = run(sampler, kw, x, 12, seeds=[3, 4], softmask=sm(), trace=True)
    assert torch.equal(a.trace["tokens"], b.trace["tokens"]) and a.nfe == b.nfe
    # the whole decoding path: with argmax tokens (T = 0) only the order is random
    assert not torch.equal(a.trace["tokens"], c.trace["tokens"])


@pytest.mark.parametrize("sampler,kw", ALL, ids=IDS)
@pytest.mark.parametrize("exact", [False, True])
def test_softmask_scale_zero_is_binary_bit_for_bit(sampler, kw, exact):
    x, am = prompt_batch()
    binary = run(sampler, kw, x, 12, attention_mask=am)
    zero = run(sampler, kw, x, 12, attention_mask=am, softmask=sm(scale=0.0), exact=exact,
               trace=True)
    assert torch.equal(binary.tokens, zero.tokens)
    if not exact:  # SM's only extra forward: the settling one before noise removal
        assert zero.nfe == binary.nfe + int(zero.trace["settle"])


def test_softmask_changes_the_samples():
    x = torch.full((2, 24), MASK)  # guards the test above against a mock on which SM does nothing
    assert not torch.equal(run("mdlm", {}, x, 12).tokens, run("mdlm", {}, x, 12, softmask=sm()).tokens)


@pytest.mark.parametrize("sampler,kw", ALL[:4], ids=IDS[:4])
def test_sm_input_is_plain_embedding_off_mask_and_lambda_stats(sampler, kw):
    x, am = prompt_batch()
    model = Mock()
    out = decode(model, x, sampler=sampler, steps=10, softmask=sm(), generator_seeds=[0, 1, 2],
                 attention_mask=am, trace=True, **kw)
    states = out.trace["tokens"]
    forward_steps = [i for i, ran in enumerate(out.trace["forward"]) if ran]
    forward_steps += [len(states) - 1] * (int(out.trace["settle"]) + int(out.trace["noise_removal"]))
    assert len(model.calls) == out.nfe == len(forward_steps)
    assert model.calls[0][0] is not None                           # the first forward: no feedback
    weight = model.embedding_weight()
    for (ids, emb), i in zip(model.calls[1:], forward_steps[1:]):
        known = states[i] != MASK
        assert ids is None and torch.equal(emb[known], weight[states[i][known]])
        if (~known).any():  # a ReMDM step may start with nothing masked, and only remask
            assert not torch.allclose(emb[~known], weight[MASK].expand_as(emb[~known]))
    lam_mean = [v for v, ran in zip(out.trace["lam_mean"], out.trace["forward"]) if ran]
    assert lam_mean[0] == 0.0                                      # NaN: nothing was masked
    assert all(math.isnan(v) or 0.0 < v <= 0.9 for v in lam_mean[1:])
    for q10, q50, q90 in zip(out.trace["lam_q10"], out.trace["lam_q50"], out.trace["lam_q90"]):
        assert math.isnan(q10) or q10 <= q50 <= q90


def test_sm_schedule_stepwise_turns_feedback_off_after_half():
    x = torch.full((1, 32), MASK)
    out = run("confidence", {}, x, 16, softmask=sm(), sm_schedule="stepwise", trace=True)
    left = [32] + [row[0] for row in out.trace["masks_left"]]
    for i, (ran, lam) in enumerate(zip(out.trace["forward"], out.trace["lam_mean"])):
        if ran and i > 0:
            assert (lam > 0) == (left[i] / 32 > 0.5)
    linear = run("confidence", {}, x, 16, softmask=sm(), sm_schedule="linear", trace=True)
    none = run("confidence", {}, x, 16, softmask=sm(), trace=True)
    assert linear.trace["lam_mean"][1] < none.trace["lam_mean"][1]


def test_exact_runs_a_forward_every_step_under_sm_only():
    x = torch.full((1, 8), MASK)
    plain = run("mdlm", {}, x, 32)
    assert plain.skipped > 0
    exact_binary = run("mdlm", {}, x, 32, exact=True)
    assert torch.equal(exact_binary.tokens, plain.tokens) and exact_binary.nfe == plain.nfe
    exact_sm = run("mdlm", {}, x, 32, softmask=sm(), exact=True, trace=True)
    assert exact_sm.skipped == 0 and exact_sm.nfe == 32 + int(exact_sm.trace["noise_removal"])


# --- filters ------------------------------------------------------------------------------------
def test_official_nucleus_keeps_rank0_and_drops_the_crossing_token():
    p = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    torch.testing.assert_close(common.nucleus_official(p, 0.85), torch.tensor([[0, .625, 0, .375]]))
    torch.testing.assert_close(common.nucleus_official(p, 0.7), torch.tensor([[0., 1, 0, 0]]))
    torch.testing.assert_close(common.nucleus_official(p, 0.4), torch.tensor([[0., 1, 0, 0]]))
    assert torch.equal(common.nucleus_official(p, 1.0), p)


def test_hf_nucleus_keeps_the_crossing_token_and_top_k():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    kept = common.nucleus_hf(logits, 0.7).softmax(-1)
    torch.testing.assert_close(kept, torch.tensor([[0, .625, 0, .375]]))
    kept = common.top_k_filter(logits, 1).softmax(-1)
    torch.testing.assert_close(kept, torch.tensor([[0., 1, 0, 0]]))


def test_categorical_fp64_frequencies_and_per_row_streams():
    p = torch.tensor([0.1, 0.0, 0.6, 0.3]).expand(20000, 4)
    gens = common.row_generators([5, 6], torch.device("cpu"))
    draws = common.categorical_fp64(p, gens, [10000, 10000])
    freq = torch.bincount(draws, minlength=4).double() / 20000
    assert freq[1] == 0
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64),
                               atol=0.015, rtol=0)
    batch = common.categorical_fp64(p.reshape(2, 10000, 4),  # one row per generator
                                    common.row_generators([5, 6], torch.device("cpu")))
    assert torch.equal(batch.flatten(), draws)


@pytest.mark.parametrize("vocab", [V, 2000, 4096])  # blocked top-k: with and without a ragged tail
@pytest.mark.parametrize("k", [1, 3])
def test_softmask_feedback_on_log_probs_equals_feedback_on_logits(vocab, k):
    g = torch.Generator().manual_seed(vocab + k)
    logits = torch.randn(3, 5, vocab, generator=g) * 4
    logits[0, 0, -3:] = torch.tensor([30.0, 32.0, 31.0])           # the top k in the tail
    is_mask = torch.rand(3, 5, generator=g) < 0.6
    s = sm(k=k)
    a = s.feedback(logits, is_mask)
    b = s.feedback(torch.log_softmax(logits, -1), is_mask, normalized=True)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2])


# --- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler,kwargs,match", [
    ("mdlm", {"top_p": 0.0}, "top_p = 0.0, expected a number in \\(0, 1\\]"),
    ("mdlm", {"steps": 0}, "steps = 0, expected an integer >= 1"),
    ("mdlm", {"eta": 0.1}, "unknown option 'eta'"),
    ("remdm-cap", {"eta": -1.0}, "eta = -1.0, expected a number >= 0"),
    ("remdm-loop", {"t_on": 0.05, "t_off": 0.5}, "expected 0 < t_off < t_on < 1"),
    ("remdm-loop", {"alpha_on": 0.99}, "eta <= \\(1 - alpha_on\\) / alpha_on"),
    ("confidence", {"alg": "rand"}, "alg = 'rand', expected one of origin"),
    ("confidence", {"transfer": "uneven"}, "transfer = 'uneven', expected one of dream, even"),
    ("confidence", {"transfer": "even", "alg": "origin"}, "alg origin unmasks each position"),
    ("mdlm", {"cfg_scale": -1.0}, "cfg_scale = -1.0, expected a number >= 0"),
    ("confidence", {"top_k": 0}, "top_k = 0, expected an integer >= 1"),
    ("confidence", {"temperature": "hot"}, "temperature = 'hot', expected a number"),
    ("beam", {}, "sampler = 'beam', expected one of mdlm"),
])
def test_bad_options_are_one_line_user_errors(sampler, kwargs, match):
    with pytest.raises(UserError, match=match) as err:
        validate_sampler_args(sampler, **kwargs)
    assert "\n" not in str(err.value)


def test_defaults_and_decode_argument_errors():
    assert validate_sampler_args("remdm-loop")["t_on"] == 0.55
    assert validate_sampler_args("remdm-cap")["eta"] == 0.04
    assert set(SAMPLERS) == {"mdlm", "remdm-cap", "remdm-loop", "confidence", "ar"}
    x = torch.full((2, 4), MASK)
    with pytest.raises(UserError, match="2 rows, expected one seed per row"):
        run("mdlm", {}, x, 4, seeds=[1])
    with pytest.raises(UserError, match="sm_schedule = 'cosine'"):
        run("mdlm", {}, x, 4, sm_schedule="cosine")


# --- no host synchronisation inside the loop ----------------------------------------------------
@pytest.mark.parametrize("sampler,kw", ALL, ids=IDS)
def test_no_host_sync_inside_the_loop_cpu(sampler, kw, monkeypatch):
    """CPU proxy for the CUDA check below (see syncs.py). The count seen by every forward, and at
    the end, must equal the count at the first forward: all syncs happen while planning."""
    count = count_syncs(monkeypatch)
    model, seen = Mock(), []
    original_forward = model.forward
    model.forward = lambda *a, **k: (seen.append(count[0]), original_forward(*a, **k))[1]
    x, am = prompt_batch()
    decode(model, x, sampler=sampler, steps=16, softmask=sm(), generator_seeds=[0, 1, 2],
           attention_mask=am, sm_schedule="linear", **kw)
    assert len(seen) > 2 and seen[0] > 0                           # planning did sync, up front
    assert set(seen) == {seen[0]} and count[0] == seen[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sampler,kw", ALL, ids=IDS)
def test_no_host_sync_inside_the_loop_cuda(sampler, kw):
    model, (x, am), calls = Mock().cuda(), prompt_batch(), []
    inner = model.forward

    def forward(*a, **k):  # errors on any synchronising call between the first forward and the end
        torch.cuda.set_sync_debug_mode("error")
        calls.append(1)
        return inner(*a, **k)
    model.forward = forward
    try:
        decode(model, x.cuda(), sampler=sampler, steps=16, softmask=sm().cuda(),
               generator_seeds=[0, 1, 2], attention_mask=am.cuda(), **kw)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(calls) > 2
