"""Test oracle: the official MDLM-SM sampler (MDLM / ReMDM, `_ddpm_caching_update`) and the
official two-pass training step, as IBM/soft-masked-diffusion-language-models' language/ code
behaves (algo.py MDLM_SM, transparency_head.py, the DiT patch's sparse input).

Written for the tests from the described behaviour; it shares no code with smdlm_cli beyond the
network it is handed (smdlm's DiT, whose time conditioning is off as in the official config).
The sampler does not draw: which positions unmask or are remasked at each step is given (a
realisation of the official categorical draw), and the token an unmasking position takes must be
the one the official q_xs allows; with a nucleus p -> 0 (one-hot p_x0) there is exactly one. So a
test compares the official forwards, caching, feedback timing and noise removal with smdlm's.

Not a sampler to use: batch size 1 only, dense tensors, no draw of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from oracle_dream import head_values, neg_entropy_and_probs

NEG_INF = -1000000.0


def subs(model_output, xt, mask_id):
    """_process_model_output: [MASK] never predicted, normalised, unmasked tokens carried over."""
    out = model_output.clone()
    out[:, :, mask_id] += NEG_INF
    out = out - torch.logsumexp(out, dim=-1, keepdim=True)
    unmasked = xt != mask_id
    out[unmasked] = NEG_INF
    out[unmasked, xt[unmasked]] = 0
    return out


def head_sparse(xt, log_p, mask_id, raw, k, alg="mixinputs_with_topk", fp32_topk=True):
    """The language TransparencyHead: (indices, probs) (B, L, k + 1) of the sparse mixture, or the
    dense p_out (B, L, V) for the temperature variant. The official head takes the top-k softmax
    in float32 whatever the logits' dtype (fp32_topk=False: in theirs, for float64 comparisons)."""
    scale, centre, steep, temperature = head_values(*raw)
    neg_h, p_full = neg_entropy_and_probs(log_p, temperature if alg == "mixinputs_with_temp" else 1.0)
    is_mask = xt == mask_id
    lam = scale * torch.sigmoid(steep * (neg_h - centre))
    lam = torch.where(is_mask, lam, torch.zeros_like(lam)).unsqueeze(-1)
    if alg != "mixinputs_with_topk":
        onehot = F.one_hot(xt, num_classes=log_p.shape[-1]).to(log_p.dtype)
        return (1 - lam) * onehot + lam * p_full
    B, L = xt.shape
    top_idx = torch.zeros(B, L, k, dtype=torch.long, device=xt.device)
    top_p = torch.zeros(B, L, k, dtype=log_p.dtype, device=xt.device)
    if is_mask.any():
        values, idx = torch.topk(log_p[is_mask], k=k, dim=-1)
        top_idx[is_mask] = idx
        top_p[is_mask] = torch.softmax(values.to(torch.float32) if fp32_topk else values,
                                       dim=-1).to(log_p.dtype)
    return torch.cat([xt.unsqueeze(-1), top_idx], -1), torch.cat([1.0 - lam, lam * top_p], -1)


def embed(model, mixture):
    """The patched DiT embedding: sum_j probs_j W[indices_j] (sparse) or p @ W (dense)."""
    W = model.embedding_weight()
    if isinstance(mixture, tuple):
        indices, probs = mixture
        return (W[indices] * probs.unsqueeze(-1)).sum(2)
    return torch.einsum("blv,ve->ble", mixture, W)


def forward(model, xt, mask_id, log_p_prev=None, raw=None, k=1, alg="mixinputs_with_topk",
            fp32_topk=True):
    """MDLM_SM.forward: SUBS log-probs, soft-masked from log_p_prev when given."""
    if log_p_prev is None:
        return subs(model(input_ids=xt), xt, mask_id), None
    emb = embed(model, head_sparse(xt, log_p_prev, mask_id, raw, k, alg, fp32_topk))
    return subs(model(inputs_embeds=emb), xt, mask_id), emb


def nucleus(p, top_p):
    sorted_p, order = torch.sort(p, descending=True, dim=-1)
    keep = torch.cumsum(sorted_p, dim=-1) <= top_p
    keep[..., 0] = True
    sorted_p = sorted_p * keep
    sorted_p = sorted_p / sorted_p.sum(dim=-1, keepdim=True)
    return torch.zeros_like(p).scatter_(-1, order, sorted_p)


def realise(q_xs, x, masked_after, mask_id):
    """One realisation of sample_categorical(q_xs): mask where the given path is masked, else the
    one token with positive probability besides the mask (asserting the path is possible)."""
    tokens = q_xs.clone()
    tokens[..., mask_id] = 0
    support = tokens > 0
    assert (support.sum(-1)[~masked_after] == 1).all(), "p_x0 is not one-hot: use a tiny top_p"
    assert (q_xs[..., mask_id][masked_after] > 0).all(), "the path masks where q_xs cannot"
    return torch.where(masked_after, torch.full_like(x, mask_id), tokens.argmax(-1))


@torch.no_grad()
def mdlm_generate(model, mask_id, masked_path, sampler="mdlm", top_p=1e-9, eta=0.04, t_on=0.55,
                  t_off=0.05, alpha_on=0.9, raw=None, k=1, eps=1e-5):
    """The official generate_samples (ddpm_cache, noise removal) at batch 1 along `masked_path`
    (steps + 1, 1, L) bool. Returns (x after every step, final x, inputs_embeds per forward)."""
    steps = masked_path.shape[0] - 1
    x = torch.full(masked_path.shape[1:], mask_id, dtype=torch.long)
    timesteps = torch.linspace(1, eps, steps + 1)
    dt = (1 - eps) / steps
    p_x0_cache, log_p_sm, history, embeds = None, None, [], []
    for i in range(steps):
        t = timesteps[i].item()
        if p_x0_cache is None:
            log_p_sm, emb = forward(model, x, mask_id, log_p_sm if raw is not None else None, raw, k)
            embeds.append(emb)
            p_x0 = nucleus(log_p_sm.exp(), top_p) if top_p < 1 else log_p_sm.exp()
        else:
            p_x0 = p_x0_cache
        mc_t, mc_s = t, t - dt
        if sampler == "remdm-loop" and not (t > t_on or t <= t_off):
            sigma = eta
            q_keep = p_x0 * (1 - sigma)
            q_keep[..., mask_id] = sigma
            q_unmask = p_x0 * (alpha_on - (1 - sigma) * alpha_on) / (1 - alpha_on)
            q_unmask[..., mask_id] = (1 - alpha_on - alpha_on * sigma) / (1 - alpha_on)
            q = torch.where((x != mask_id).unsqueeze(-1), q_keep, q_unmask)
        elif sampler == "remdm-cap":
            alpha_t, alpha_s = 1 - mc_t, 1 - mc_s
            sigma = min(eta, (1 - alpha_s) / alpha_t) if alpha_t > 0 else eta
            q_keep = p_x0 * (1 - sigma)
            q_keep[..., mask_id] = sigma
            q_unmask = p_x0 * ((alpha_s - (1 - sigma) * alpha_t) / (1 - alpha_t))
            q_unmask[..., mask_id] = (1 - alpha_s - sigma * alpha_t) / (1 - alpha_t)
            q = torch.where((x != mask_id).unsqueeze(-1), q_keep, q_unmask)
        else:  # mdlm, and remdm-loop's MDLM phases on their remapped schedule
            if sampler == "remdm-loop" and t > t_on:
                mc_t = 1 - (1 - t) * alpha_on / (1 - t_on)
                mc_s = 1 - (1 - t + dt) * alpha_on / (1 - t_on)
            elif sampler == "remdm-loop":
                mc_t, mc_s = t * (1 - alpha_on) / t_off, (t - dt) * (1 - alpha_on) / t_off
            q = p_x0 * (mc_t - mc_s)
            q[:, :, mask_id] = mc_s
            carried = x != mask_id
            q[carried] = F.one_hot(x[carried], q.shape[-1]).to(q.dtype)  # the copy flag
        xs = realise(q, x, masked_path[i + 1], mask_id)
        p_x0_cache = p_x0 if torch.equal(xs, x) else None
        x = xs
        history.append(x.clone())
    final, emb = forward(model, x, mask_id, log_p_sm if raw is not None else None, raw, k)
    embeds.append(emb)
    return history, final.argmax(-1), embeds


def two_pass_loss(model, x0, xt, t, mask_id, raw, k=1, alg="mixinputs_with_topk", fp32_topk=True):
    """MDLM_SM.nll on a soft-masked batch, averaged over all tokens as the official loss:
    pass 1 without gradients, pass 2 from its feedback, -log p(x0) * (1 - eps) / ((1 - eps) t)."""
    with torch.no_grad():
        log_p1, _ = forward(model, xt, mask_id)
    log_p2, _ = forward(model, xt, mask_id, log_p1.detach(), raw, k, alg, fp32_topk)
    log_p = log_p2.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    eps = 1e-3
    dalpha, alpha_t = -(1 - eps), 1 - (1 - eps) * t
    return (log_p * dalpha / (1 - alpha_t)[:, None]).mean()
