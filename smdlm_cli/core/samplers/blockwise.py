"""Block-wise confidence decoding with Fast-dLLM's KV cache and parallel decoding, SM included.

The confidence sampler's semi-autoregressive blocks (confidence.py), decoded block after block:

- cache "prefix" / "dual": the first forward of a block is a full one that refreshes the KV cache
  (models/cache.py); the block's later forwards compute only a window: [block start - 1, L) for
  the prefix cache, [block start - 1, block end) for the dual cache (suffix keys reused from the
  refresh). The window starts one column early so that a model with shifted logits (Dream) has
  the row before the block: no special case for the block's first token, unlike Fast-dLLM's Dream
  code, which commits it from the refresh forward whatever its confidence. `refresh_every` R > 0
  makes every R-th forward of a block a full one too (R = 1: every forward, i.e. no reuse).
- threshold / factor (parallel decoding): a step commits at least the tokens the k schedule asks
  for, and more where the model is sure: with `threshold`, every candidate whose p(x0) >= it (the
  most confident one always); with `factor`, the longest run of the sorted confidences
  c_1 >= c_2 >= ... with c_n >= 1 - factor / (n + 1) (n = 1 always). A block ends when it has no
  masks left, so `steps` is a budget that confident models do not use up. Candidates are ranked by
  p(x0) here (Fast-dLLM's confidence), whatever `alg`.
- SM: masks enter every forward with their feedback, as in the planned loop; a window forward
  updates the feedback of the masks in its window, the rest keep theirs. With the dual cache the
  suffix keys therefore reflect the soft inputs of the last refresh.

Batches. Rows whose generation starts at different columns (prompts of different lengths) are
moved right by left padding so that every row's blocks are the same columns, windows are slices,
and the padding is invisible to the model (attention mask, RoPE positions from the real tokens):
a row decodes exactly as it does alone. Fast-dLLM's own code is correct for batch size 1 only.

Host syncs: none with the k schedule (the plan is made before the loop); threshold and factor
decoding wait for the device once per step, to read how many masks each row's block still has
(the commit count depends on the model's confidences, so no plan can know it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from smdlm_cli.core.errors import UserError
from smdlm_cli.core.samplers import confidence
from smdlm_cli.core.samplers.feedback import Feedback
from smdlm_cli.core.samplers.guidance import Guided
from smdlm_cli.core.samplers.rows import RowLogProbs, forward_rows
from smdlm_cli.core.softmask import SoftMask

CACHES = ("none", "prefix", "dual")
DEFAULT_BLOCK = 32  # Fast-dLLM's block length, used when a cache is on and block_length is unset


def wanted(options: dict) -> bool:
    """Whether the confidence options ask for block-wise decoding (a cache or a parallel rule)."""
    return options["cache"] != "none" or options["threshold"] is not None or \
        options["factor"] is not None


def check_options(o: dict) -> list[str]:
    bad = []
    if o["cache"] not in CACHES:
        bad.append(f"cache = {o['cache']!r}, expected one of {', '.join(CACHES)}")
    t, f = o["threshold"], o["factor"]
    if t is not None and not (_number(t) and 0.0 < t <= 1.0):
        bad.append(f"threshold = {t!r}, expected a confidence in (0, 1] or None")
    if f is not None and not (_number(f) and f > 0.0):
        bad.append(f"factor = {f!r}, expected a number > 0 or None")
    if t is not None and f is not None:
        bad.append("threshold and factor are both set; expected one parallel-decoding rule")
    r = o["refresh_every"]
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        bad.append(f"refresh_every = {r!r}, expected an integer >= 0 (0 = at block starts only)")
    if wanted(o) and o["alg"] == "origin":
        bad.append("alg origin has no confidences; expected maskgit_plus, topk_margin or entropy "
                   "with a cache, threshold or factor")
    if wanted(o) and o["alg_temp"] > 0:
        bad.append(f"alg_temp = {o['alg_temp']}, expected 0 with a cache, threshold or factor")
    return bad


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rule(o: dict):
    """k on the device from each row's confidences sorted in decreasing order (-inf: no candidate)."""
    if o["threshold"] is not None:
        threshold = o["threshold"]

        def rule(ranked: Tensor) -> Tensor:
            above = (ranked[:, 1:] >= threshold).sum(-1)
            return torch.where(torch.isfinite(ranked[:, 0]), 1 + above, 0)
        return rule
    if o["factor"] is not None:
        factor = o["factor"]

        def rule(ranked: Tensor) -> Tensor:
            n = torch.arange(1, ranked.shape[1] + 1, device=ranked.device)
            ok = ranked >= 1 - factor / (n + 1)
            ok[:, 0] = torch.isfinite(ranked[:, 0])
            return ok.long().cumprod(-1).sum(-1)
        return rule
    return None


def _align(x: Tensor, real: Tensor, shift: list[int], pad: int):
    """Move row b right by shift[b] columns (left padding): (x, real, position ids or None)."""
    if not any(shift):
        return x, real, None
    B, L = x.shape
    cols = torch.arange(L, device=x.device)[None] + torch.tensor(shift, device=x.device)[:, None]
    width = L + max(shift)
    xa = torch.full((B, width), pad, dtype=x.dtype, device=x.device).scatter_(1, cols, x)
    ra = torch.zeros((B, width), dtype=torch.bool, device=x.device).scatter_(1, cols, real)
    return xa, ra, (ra.long().cumsum(-1) - 1).clamp_min(0)


def decode(model, x: Tensor, real: Tensor, has_mask: bool, generators: Sequence[torch.Generator],
           steps: int, softmask: SoftMask | None, sm_schedule: str, options: dict,
           keep_mask: bool = False) -> tuple[Tensor, int]:
    """(tokens (B, L), forwards run): see the module docstring. `has_mask`: whether the caller
    passed an attention mask (else the model gets none, as in the planned loop); `keep_mask`:
    the model's [MASK] logit stays in the softmax (diffusion.keeps_mask)."""
    mask_id, weight = model.mask_id, model.embedding_weight()
    o = dict(options)
    caching = o["cache"] != "none"
    if caching:
        if not hasattr(model, "empty_cache"):
            raise UserError(f"cache = {o['cache']}: {type(model).__name__} has no KV cache; "
                            f"expected cache = none")
        o["block_length"] = o["block_length"] or DEFAULT_BLOCK
    rule = _rule(o)
    if rule is not None:
        o["alg"] = "maskgit_plus"  # ranked and thresholded by p(x0), as Fast-dLLM

    B, L = x.shape
    gen_host = ((x == mask_id) & real).cpu()  # host transfer before the loop: what to generate
    cols = torch.arange(L)
    first = torch.where(gen_host, cols, L).min(-1).values.tolist()
    start = max((f for f in first if f < L), default=L)
    shift = [start - f if f < L else 0 for f in first]
    x, real, position_ids = _align(x, real, shift, pad=0)
    gen = (x == mask_id) & real
    if o["cfg_scale"] > 0:
        model = Guided(model, o["cfg_scale"], real & ~gen)
    gen_host = gen.cpu()
    width = x.shape[1]
    plan = confidence.build(gen, gen_host, generators, steps, mask_id, o, keep_mask)
    spb, bl = plan.steps_per_block, o["block_length"]
    n_blocks = steps // spb
    block_counts = [[int(n) for n in row] for row in torch.stack(
        [(plan.in_block[j].cpu() & gen_host).sum(-1) for j in range(n_blocks)], -1)]
    frac = confidence.step_fractions(spb)
    attention = real if (has_mask or any(shift)) else None
    fb = (Feedback(softmask, weight, real, gen.sum(-1), sm_schedule, mask_id)
          if softmask is not None else None)
    nfe = 0

    def forward(x: Tensor, a: int, b: int, cache, rows: list[int], counts: list[int],
                where: Tensor | None) -> RowLogProbs:
        """log p over the window [a, b) at the masks of `rows` (those inside `where` (B, width)
        if given), counts[j] of them in rows[j]."""
        kwargs = {"attention_mask": attention}
        if caching:
            kwargs["cache"] = cache.window(a, b)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids[:, a:b]
        if fb is None or nfe == 0:  # the first forward has no feedback yet: lambda 0, plain ids
            kwargs["input_ids"] = x[:, a:b]
        else:
            kwargs["inputs_embeds"] = fb.embeds(x, a, b)[0]
        masks = (x[:, a:b] == mask_id) & real[:, a:b]
        if where is not None:
            masks = masks & where[:, a:b]
        return forward_rows(model, masks, rows, counts, mask_id, keep_mask, **kwargs)

    for j in range(n_blocks):
        s = start + j * bl if bl else start
        e = min(s + bl, width) if bl else width
        win_a, win_b = (max(s - 1, 0), width if o["cache"] == "prefix" else e)
        later = [sum(row[j + 1:]) for row in block_counts]  # masks after the block, per row
        cache, since_refresh = None, 0
        left = [row[j] for row in block_counts]
        for local in range(spb):
            i = j * spb + local
            if rule is not None:
                if local > 0:  # the one host sync per step of parallel decoding
                    left = ((x[:, s:e] == mask_id) & real[:, s:e]).sum(-1).tolist()
                if not any(left):
                    break
                rows = [r for r in range(B) if left[r] > 0]
                # the k schedule (transfer) on the current counts, raised by the rule
                k = torch.tensor(confidence.step_k(left, local, spb, frac, o["transfer"]),
                                 device=x.device)
            else:
                left, rows = plan.candidates[i], [r for r in range(B) if plan.k[i][r] > 0]
                if not rows:
                    continue  # nothing changes at this step: no forward
                k = plan.k_dev[i]
            full = (not caching or cache is None
                    or (o["refresh_every"] and since_refresh % o["refresh_every"] == 0))
            if caching and full:
                cache, since_refresh = model.empty_cache(), 0
            a, b = (0, width) if full else (win_a, win_b)
            if fb is None:  # binary decoding reads the block's candidates only
                logp = forward(x, a, b, cache, rows, [left[r] for r in rows], plan.in_block[j])
            else:  # SM's feedback reads every mask of the window: the block's, and the later
                # blocks' when the window reaches the end
                in_window = [left[r] + (later[r] if b == width else 0) for r in rows]
                logp = forward(x, a, b, cache, rows, in_window, None)
            nfe += 1
            since_refresh += 1
            w = slice(a, b)
            cand = (x[:, w] == mask_id) & plan.in_block[j][:, w]
            counts = [left[r] for r in rows]
            ks_rows = None if rule is not None else [plan.k[i][r] for r in rows]
            new = confidence.commit(x[:, w], logp, cand, rows, counts, ks_rows, k, generators, o,
                                    mask_id, rule, keep_mask)
            if fb is not None:  # at every mask the forward read (committed ones go unused)
                fb.update(logp, start=a)
            x = new if b - a == width else torch.cat((x[:, :a], new, x[:, b:]), dim=1)

    if any(shift):  # back to the caller's columns
        back = torch.arange(L, device=x.device)[None] + torch.tensor(shift, device=x.device)[:, None]
        x = x.gather(1, back)
    return x, nfe
