"""Test oracle: the official Dream sampler loop with the SM patch, and the official transparency head.

Written for the tests from the described behaviour of Dream's `diffusion_generate` (`_sample`) and
of IBM/soft-masked-diffusion-language-models' coding/patches/dream_sm.patch and
coding/train/components/transparency_head.py (docs/official-parity.md lists the rules). It is kept
deliberately naive: dense (B, L, V) tensors, the model's raw next-token logits shifted here, a
forward at every step, batch-global counts, no planning. It shares no code with smdlm_cli beyond
the network it is handed, so a test comparing the two checks smdlm's rules, not itself.

Not a sampler to use: the official crash of the linear/stepwise schedules at scale 0 is kept (see
`lam_tensor`), only greedy candidate choice is supported (the categorical draw is a random stream
no other implementation shares), and there is no KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SMArgs:
    alg: str = "none"            # "none", "mixinputs_with_topk", "mixinputs_with_temp"
    schedule: str = "none"       # "none", "linear", "stepwise"
    scale: float = 0.0
    steepness: float = 0.0
    offset: float = 0.0          # the head's centre
    k: int = 1
    temperature: float = 1.0     # mixinputs_with_temp only


def raw_logits(model, **inputs) -> torch.Tensor:
    """The network's own next-token logits, lm_head of the final norm's output, captured before
    the adapter's shift (smdlm shifts the normed states, so lm_head's own output is shifted)."""
    seen = []
    handle = model.model.norm.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return model.lm_head(seen[-1])


def shifted(logits: torch.Tensor) -> torch.Tensor:
    """Row j then holds the prediction for token j (Dream is AR-initialised)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


# --- the SM patch's mixing (softmasking_utils) -------------------------------------------------
def neg_entropy_and_probs(logits, temperature=1.0):
    p = torch.softmax(logits / temperature, dim=-1)
    return (p * torch.log(p + 1e-10)).sum(-1), p


def lam_tensor(neg_entropy, is_mask, scale, steepness, offset, fix_zero_scale=False):
    """The official calculate_lambda_tensor. At scale 0 it returns (B, L) instead of (B, L, 1):
    the mixing then fails to broadcast (the official crash) unless fix_zero_scale."""
    if scale == 0.0:
        zeros = torch.zeros_like(neg_entropy)
        return zeros.unsqueeze(-1) if fix_zero_scale else zeros
    lam = scale * torch.sigmoid(steepness * (neg_entropy - offset))
    lam = torch.where(is_mask, lam, torch.zeros_like(lam))
    return lam.unsqueeze(-1)


def topk_probs_full(logits, k):
    top_logits, top_idx = torch.topk(logits, k=k, dim=-1)
    return torch.zeros_like(logits).scatter_(-1, top_idx, torch.softmax(top_logits, dim=-1))


def schedule_scale(max_gen_length, num_mask, scale, schedule):
    t = num_mask / max_gen_length if max_gen_length else 1.0
    if schedule == "none":
        return scale
    if schedule == "linear":
        return scale * t
    if schedule == "stepwise":
        return scale if t > 0.5 else 0
    raise ValueError(schedule)


def mixing_factors(x, logits, mask_id, max_gen_length, sm: SMArgs, fix_zero_scale=False):
    """p_sm (B, L, V): (1 - lam) onehot(x) + lam q, q the top-k softmax or the tempered p."""
    onehot = F.one_hot(x, num_classes=logits.shape[-1]).to(logits.dtype)
    temperature = sm.temperature if sm.alg == "mixinputs_with_temp" else 1.0
    neg_h, p = neg_entropy_and_probs(logits, temperature)
    scale = sm.scale
    if sm.schedule != "none":  # batch totals, counted on the updated x
        scale = schedule_scale(max_gen_length, int((x == mask_id).sum()), sm.scale, sm.schedule)
    lam = lam_tensor(neg_h, x == mask_id, scale, sm.steepness, sm.offset, fix_zero_scale)
    if sm.alg == "mixinputs_with_topk":
        p = topk_probs_full(logits, sm.k)
    return (1 - lam) * onehot + lam * p


# --- Dream's sample_tokens and _sample ---------------------------------------------------------
def sample_tokens_greedy(logits, alg):
    """(confidence, x0) at temperature 0, no top-p / top-k: argmax over the whole vocabulary."""
    probs = torch.softmax(logits, dim=-1)
    conf, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        conf = top2[..., 0] - top2[..., 1]
    elif alg == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    return conf, x0


@dataclass
class Run:
    tokens: torch.Tensor          # the final x
    history: list                 # x after every step
    embeds: list                  # inputs_embeds fed to forwards 1 .. steps-1 (None: plain ids)
    committed_mask: bool          # whether a step ever "committed" the [MASK] token


@torch.no_grad()
def dream_generate(model, x, mask_id, steps, alg="entropy", eps=1e-3, sm: SMArgs | None = None,
                   fix_zero_scale=False) -> Run:
    """The official loop at batch size len(x), no padding ("full" attention), greedy."""
    x = x.clone()
    sm = sm or SMArgs()
    timesteps = torch.linspace(1, eps, steps + 1, device=x.device)
    W = model.model.embed_tokens.weight
    inputs_embeds, history, embeds, committed_mask = None, [], [], False
    max_gen_length = int((x == mask_id).sum())
    for i in range(steps):
        mask_index = x == mask_id
        if inputs_embeds is None:
            logits = raw_logits(model, input_ids=x)
        else:
            logits = raw_logits(model, inputs_embeds=inputs_embeds)
        embeds.append(inputs_embeds)
        logits = shifted(logits)
        conf, x0 = sample_tokens_greedy(logits[mask_index], alg)
        t, s = timesteps[i], timesteps[i + 1]
        n_mask = mask_index.sum() / mask_index.shape[0]
        n_transfer = int(n_mask * (1 - s / t)) if i < steps - 1 else int(n_mask)
        full_conf = torch.full_like(x, -torch.inf, dtype=logits.dtype)
        full_conf[mask_index] = conf
        if n_transfer > 0:
            _, transfer = torch.topk(full_conf, n_transfer)
            proposal = torch.full_like(x, mask_id)
            proposal[mask_index] = x0
            rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1).expand_as(transfer)
            committed_mask |= bool((proposal[rows, transfer] == mask_id).any())
            x[rows, transfer] = proposal[rows, transfer]
        if sm.alg != "none":
            p_sm = mixing_factors(x, logits, mask_id, max_gen_length, sm, fix_zero_scale)
            inputs_embeds = p_sm @ W
        history.append(x.clone())
    return Run(x, history, embeds, committed_mask)


# --- the coding transparency head, for the fine-tuning step ------------------------------------
def head_values(raw_scale, raw_centre_neg, raw_steep, raw_temperature):
    eps = 1e-6
    return (torch.sigmoid(raw_scale), -F.softplus(raw_centre_neg) - eps,
            F.softplus(raw_steep) + eps, F.softplus(raw_temperature) + eps)


def head_mixture(x, prev_logits, mask_id, raw, alg="mixinputs_with_topk", k=1):
    """TransparencyHead.forward: p_sm (B, L, V), gradients reaching the raw scalars through lam
    (and through p for the temperature variant)."""
    scale, centre, steep, temperature = head_values(*raw)
    onehot = F.one_hot(x, num_classes=prev_logits.shape[-1]).to(prev_logits.dtype)
    neg_h, p = neg_entropy_and_probs(prev_logits, temperature if alg == "mixinputs_with_temp" else 1.0)
    lam = scale * torch.sigmoid(steep * (neg_h - centre))
    lam = torch.where(x == mask_id, lam, torch.zeros_like(lam)).unsqueeze(-1)
    if alg == "mixinputs_with_topk":
        p = topk_probs_full(prev_logits, k)
    return (1 - lam) * onehot + lam * p
