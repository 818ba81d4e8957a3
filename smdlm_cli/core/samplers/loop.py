"""The one decoding loop: model forwards, SM feedback, step skipping, NFE accounting, tracing.

A transition (mdlm.py, confidence.py) decides which positions change at a step and to what. Which
rows change at which step never depends on the model's predictions, so every transition knows it
before the loop: the MDLM family draws its whole mask-state chain up front, the confidence sampler
computes its per-row k table from the mask counts. The loop reads that plan once on the host and
then never waits for the device: Python branches only on plan data, never on tensor values (no
.item(), .tolist(), nonzero() or boolean-mask indexing inside the loop), so a GPU runs ahead.

Step skipping. A step where no row changes runs no forward and draws nothing. The official MDLM /
ReMDM sampler instead runs the forward at the first such step and reuses that p_x0 (and, under SM,
leaves the feedback untouched) until a step changes something. Its forward sees the same x and the
same feedback as ours, which runs at the next changing step instead: same p, same draws in
distribution, fewer forwards. Per row the same holds: a row's feedback is refreshed only by forwards
at steps where that row changes (or every forward with `exact`), so a row decodes the same in any
batch and alone. With SM, `exact=True` runs a forward at every step, so the feedback keeps refining
while x stands still; without SM it changes nothing. Dream's own loop does that, and its official
SM patch relies on it: at one token per step, step 0 commits nothing but its forward's feedback
feeds step 1. So `exact` defaults to the model's `forward_every_step` (True for Dream, False for
the MDLM DiT, whose official sampler reuses such steps as above): docs/official-parity.md.

Noise removal (MDLM family) under SM: the official sampler's last forward before it ran on the
final x (at the first step after the last change), so its feedback refined once more. A row whose
last change came before the last step therefore gets one settling forward on its final x, whose
feedback its noise-removal forward starts from: one more NFE, the official one.

Host transfers, all before the loop: the positions to generate, and for the MDLM family the plan.
The confidence sampler with a KV cache, threshold or factor (Fast-dLLM) decodes block by block in
blockwise.py instead: its windows and data-dependent step counts do not fit this plan.
Not here: the transitions' rules, model code, the CLI.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from smdlm_cli.core.diffusion import keeps_mask
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.samplers import ar, blockwise, confidence, mdlm
from smdlm_cli.core.samplers.common import positions, row_generators
from smdlm_cli.core.samplers.feedback import Feedback
from smdlm_cli.core.samplers.guidance import Guided
from smdlm_cli.core.samplers.rows import forward_rows
from smdlm_cli.core.softmask import SoftMask

SAMPLERS = ("mdlm", "remdm-cap", "remdm-loop", "confidence", "ar")
SM_SCHEDULES = ("none", "linear", "stepwise")
# Quantiles of the pooled fed-back entropies a trace reports: where lambda's switch can act
FED_BACK_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
# Options of every diffusion sampler: LLaDA's classifier-free guidance scale (guidance.py; 0 = off)
COMMON = {"cfg_scale": 0.0}


@dataclass
class DecodeResult:
    tokens: Tensor            # (B, L) long
    nfe: int                  # model forwards run, the noise-removal one included
    steps: int
    skipped: int              # steps without a forward
    trace: dict | None = None


def validate_sampler_args(sampler: str, **kwargs) -> dict:
    """The sampler's options with defaults filled in; UserError (one line) for a bad one."""
    if sampler not in SAMPLERS:
        raise UserError(f"sampler = {sampler!r}, expected one of {', '.join(SAMPLERS)}")
    steps = kwargs.pop("steps", 1)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise UserError(f"steps = {steps!r}, expected an integer >= 1")
    defaults = {"confidence": confidence.OPTIONS, "ar": ar.OPTIONS}.get(sampler) or mdlm.OPTIONS[sampler]
    if sampler != "ar":
        defaults = {**defaults, **COMMON}
    unknown = sorted(set(kwargs) - set(defaults))
    if unknown:
        raise UserError(f"sampler {sampler}: unknown option {unknown[0]!r}, expected one of "
                        f"{', '.join(defaults)}")
    options = {**defaults, **{k: v for k, v in kwargs.items() if v is not None}}
    for key, value in options.items():
        if isinstance(defaults[key], float) and (isinstance(value, bool)
                                                 or not isinstance(value, (int, float))):
            raise UserError(f"sampler {sampler}: {key} = {value!r}, expected a number")
    if sampler != "ar" and not options["cfg_scale"] >= 0:
        raise UserError(f"sampler {sampler}: cfg_scale = {options['cfg_scale']}, expected a number "
                        f">= 0 (0 = no guidance)")
    if sampler == "confidence":
        bad = confidence.check_options(options) + blockwise.check_options(options)
    elif sampler == "ar":
        bad = ar.check_options(options)
    else:
        bad = mdlm.check_options(sampler, options)
    if bad:
        raise UserError(f"sampler {sampler}: {bad[0]}")
    return options


def _build(sampler: str, gen: Tensor, gen_host: Tensor, generators, steps: int, mask_id: int,
           options: dict, keep_mask: bool):
    if sampler == "confidence":
        return confidence.build(gen, gen_host, generators, steps, mask_id, options, keep_mask)
    return mdlm.build(sampler, gen, gen_host.sum(-1).tolist(), generators, steps, mask_id, options)


def decode(model, x: Tensor, *, sampler: str, steps: int, softmask: SoftMask | None = None,
           generator_seeds: Sequence[int], attention_mask: Tensor | None = None,
           sm_schedule: str = "none", exact: bool | None = None, trace: bool = False,
           **sampler_kwargs) -> DecodeResult:
    """Decode the masked positions of x (B, L) with `sampler`; see the module docstring.

    exact=None takes the model's default (`forward_every_step`: True for Dream, whose own loop
    runs a forward at every step, False for the MDLM DiT, whose official sampler reuses steps).

    x holds the prompt / fixed tokens and model.mask_id where tokens are to be generated (anywhere:
    infilling works). attention_mask (B, L) marks real positions (right padding): pads are never
    attended and returned unchanged. Row b draws every random number from a generator seeded with
    generator_seeds[b]. `softmask` on the model's device, None for binary decoding.
    """
    options = validate_sampler_args(sampler, steps=steps, **sampler_kwargs)
    if sm_schedule not in SM_SCHEDULES:
        raise UserError(f"sm_schedule = {sm_schedule!r}, expected one of {', '.join(SM_SCHEDULES)}")
    if x.dim() != 2:
        raise UserError(f"x has shape {tuple(x.shape)}, expected (batch, length)")
    if len(generator_seeds) != x.shape[0]:
        raise UserError(f"{len(generator_seeds)} generator seeds for a batch of {x.shape[0]} rows, "
                        "expected one seed per row")
    mask_id, weight = model.mask_id, model.embedding_weight()
    device = weight.device
    x = x.to(device)
    real = (torch.ones_like(x, dtype=torch.bool) if attention_mask is None
            else attention_mask.to(device).bool())
    causal = getattr(getattr(model, "config", None), "causal", False)  # the AR baseline's DiT
    if causal != (sampler == "ar"):
        raise UserError(f"sampler {sampler}: " + ("an AR (causal) model decodes with sampler ar"
                                                  if causal else "sampler ar needs an AR model"))
    if causal:
        if softmask is not None:
            raise UserError("an AR (causal) model has no masks to soften; expected binary decoding")
        was_training = model.training
        model.eval()
        try:
            tokens, nfe = ar.decode(model, x, generator_seeds, real, options)
        finally:
            model.train(was_training)
        return DecodeResult(tokens, nfe, nfe, 0, None)
    if sampler == "confidence" and blockwise.wanted(options):
        if trace or exact:  # an explicit exact only: the model's default does not apply here
            raise UserError("trace and exact apply to the planned loop; expected neither with a "
                            "cache, threshold or factor")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                tokens, nfe = blockwise.decode(model, x, real, attention_mask is not None,
                                               row_generators(generator_seeds, device), steps,
                                               softmask, sm_schedule, options, keeps_mask(model))
        finally:
            model.train(was_training)
        return DecodeResult(tokens, nfe, steps, steps - nfe, None)
    model_mask = None if attention_mask is None else attention_mask.to(device)
    gen = (x == mask_id) & real
    if options["cfg_scale"] > 0:
        model = Guided(model, options["cfg_scale"], real & ~gen)
    gen_host = gen.cpu()  # host transfer: the positions to generate (counts, blocks)
    generators = row_generators(generator_seeds, device)
    keep = keeps_mask(model)
    transition = _build(sampler, gen, gen_host, generators, steps, mask_id, options, keep)
    if exact is None:
        exact = bool(getattr(model, "forward_every_step", False))

    changes = transition.changes
    refresh_all = exact and softmask is not None
    run = [refresh_all or any(c) for c in changes]
    final = any(transition.noise_removal)
    # Rows whose noise removal must first see a forward on their final x (module docstring)
    settle = ([b for b in range(x.shape[0]) if transition.noise_removal[b] and not changes[-1][b]]
              if softmask is not None and not refresh_all else [])
    forward_steps = ([i for i in range(steps) if run[i]] + ([steps] if settle else [])
                     + ([steps + 1] if final else []))
    left = transition.masks_left
    # feedback rows: a row takes a forward's feedback only at steps where it changes (or all, exact)
    fb_rows = [list(range(len(c))) if refresh_all else [b for b, ch in enumerate(c) if ch]
               for c in changes]
    fb_counts = [[left[i][b] for b in fb_rows[i]] for i in range(steps)]
    fb = (Feedback(softmask, weight, real, gen.sum(-1), sm_schedule, mask_id)
          if softmask is not None else None)

    B, gen_counts = x.shape[0], gen_host.sum(-1).tolist()

    remasked = getattr(transition, "remasked", None)  # ReMDM: feedback at remasked positions
    # Binary decoding of the MDLM family reads log p only where its plan unmasks (a trace reads
    # the entropy at every mask, SM's feedback every mask's distribution): the head and the
    # log-softmax run on those rows alone, one in (masks left / steps left) of the masks.
    narrow = fb is None and not trace and hasattr(transition, "reads")

    def forward(x: Tensor, first: bool, i: int, rows: list[int]):
        """log p at the masks of `rows` (the rows something reads at step i; samplers/rows.py),
        lambda and the masks this forward's input had. Positions the step remasks get SUBS's
        carry-over rows: their feedback is the one-hot of the token they held (Feedback.update)."""
        before = gen_counts if i == 0 else left[min(i, steps) - 1]  # masks before step i
        masks = (x == mask_id) & real
        if fb is None or first:
            inputs = {"input_ids": x}
            # the first SM forward has no feedback yet: lambda is 0 at every mask
            is_mask = None if fb is None else masks
            lam = None if fb is None else torch.zeros_like(x, dtype=torch.float32)
        else:
            emb, lam, is_mask = fb.embeds(x)
            inputs = {"inputs_embeds": emb}
        carry = None
        if fb is not None and remasked is not None and i < steps and \
                any(remasked[i][b] for b in fb_rows[i]):
            chain = transition.masked
            flat = positions(~chain[i] & chain[i + 1], fb_rows[i], [remasked[i][b] for b in fb_rows[i]])
            carry = (flat, x.reshape(-1).index_select(0, flat))
        if narrow and i < steps:  # binary MDLM family: only the positions step i unmasks
            where, counts = transition.reads(i)
            logp = forward_rows(model, where, rows, [counts[b] for b in rows], mask_id, keep,
                                attention_mask=model_mask, **inputs)
        else:
            logp = forward_rows(model, masks, rows, [before[b] for b in rows], mask_id, keep, carry,
                                attention_mask=model_mask, **inputs)
        return logp, lam, is_mask

    snapshots, lam_log, ent_log = [x], [], []  # filled only with trace=True

    def record(x: Tensor, lam_entry, ent: Tensor | None = None) -> None:
        if trace:
            snapshots.append(x)
            lam_log.append(lam_entry)
            ent_log.append(ent)

    done = 0  # steps finished
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for n, i in enumerate(forward_steps):
                for _ in range(done, min(i, steps)):  # steps without a forward: nothing changes
                    record(x, None)
                done = min(i, steps)
                if i >= steps:  # settle, then noise removal: the rows that have masks left
                    rows = settle if i == steps else [b for b in range(B) if left[-1][b]]
                else:
                    rows = [b for b, c in enumerate(changes[i]) if c]
                    read = sorted(set(rows) | set(fb_rows[i] if fb is not None else ()))
                    if trace:  # the trace's entropies are read at every row's masks
                        read = list(range(B))
                logp, lam, is_mask = forward(x, n == 0, i, rows if i >= steps else read)
                if i == steps:  # settle: the feedback noise removal starts from
                    fb.update(logp)  # the forward read exactly the settling rows' masks
                    continue
                if i == steps + 1:  # noise removal: argmax of the unfiltered p at the masks left
                    if keep:  # a kept [MASK] column is never a token to decode to
                        logp.values[:, mask_id] = float("-inf")
                    idx = positions((x == mask_id) & real, rows, [left[-1][b] for b in rows])
                    x = x.reshape(-1).index_copy(0, idx, logp.take(idx).argmax(-1)).view_as(x)
                    break
                if rows:
                    x = transition.step(i, x, logp, rows)
                if fb is not None and n + 1 < len(forward_steps):
                    if read == fb_rows[i]:  # the forward read exactly the rows to refresh
                        fb.update(logp)
                    else:  # a trace reads every row; only fb_rows[i] take this feedback
                        fb.update(logp, x, fb_rows[i], fb_counts[i])
                # H(p) where a later forward reads the prediction back (SM) or forgets it (binary);
                # 0 at positions without a row (unmasked: SUBS's one-hot carry-over has H = 0)
                ent = (x.new_zeros(x.numel(), dtype=logp.values.dtype).index_copy(
                    0, logp.index, torch.special.entr(logp.values.exp()).sum(-1)).view(x.shape)
                       if trace and n + 1 < len(forward_steps) else None)
                record(x, (lam, is_mask), ent)
                done = i + 1
            for _ in range(done, steps):
                record(x, None)
    finally:
        model.train(was_training)

    skipped = steps - sum(run)
    info = (_trace(snapshots, lam_log, ent_log, run, final, bool(settle), mask_id, real)
            if trace else None)
    return DecodeResult(x, len(forward_steps), steps, skipped, info)


def _trace(snapshots: list[Tensor], lam_log: list, ent_log: list, run: list[bool], final: bool,
           settle: bool, mask_id: int, real: Tensor) -> dict:
    """Per-step decoding record, computed after the loop (the loop only kept device tensors).

    tokens (steps + 1, B, L) on the CPU (state before each step, then the result before noise
    removal); lam (steps, B, L): the lambda each position entered the step's forward with (0 where
    not masked or without a forward); per step and row: unmasked, remasked, masks_left (after the
    step); per step: forward, and the lambda statistics over the positions masked in that forward's input (NaN when no forward
    ran or decoding was binary): mean, q10, q50, q90, share > 0.1.
    """
    tokens = torch.stack(snapshots).cpu()
    masked = (tokens == mask_id) & real.cpu()[None]
    out = {
        "forward": list(run),
        "noise_removal": final,
        "settle": settle,         # a settling forward ran before noise removal (SM)
        "tokens": tokens,
        "unmasked": (masked[:-1] & ~masked[1:]).sum(-1).tolist(),
        "remasked": (~masked[:-1] & masked[1:]).sum(-1).tolist(),
        "masks_left": masked[1:].sum(-1).tolist(),
    }
    stats = {key: [] for key in ("lam_mean", "lam_q10", "lam_q50", "lam_q90", "lam_share_gt_0.1")}
    nan = float("nan")
    lam_maps = []  # per step, the lambda each position entered the step's forward with
    for entry in lam_log:
        if entry is None or entry[1] is None:
            lam_maps.append(torch.zeros(tokens.shape[1:]))
            for v in stats.values():
                v.append(nan)
            continue
        lam, is_mask = (t.float().cpu() for t in entry)
        lam_maps.append(lam * is_mask)
        vals = torch.where(is_mask.bool(), lam, torch.full_like(lam, nan)).flatten()
        has = bool(is_mask.any())
        stats["lam_mean"].append(float(vals.nanmean()) if has else nan)
        for q, key in ((0.1, "lam_q10"), (0.5, "lam_q50"), (0.9, "lam_q90")):
            stats[key].append(float(vals.nanquantile(q)) if has else nan)
        stats["lam_share_gt_0.1"].append(float((vals > 0.1).sum() / is_mask.sum()) if has else nan)
    out.update(stats)
    out.update(_fed_back_entropy(ent_log, masked[1:]))
    out["lam"] = torch.stack(lam_maps) if lam_maps else torch.zeros(0, *tokens.shape[1:])
    return out


def _fed_back_entropy(ent_log: list, masked_after: Tensor) -> dict:
    """Per step and pooled statistics of H(p) at the masks a step leaves for a later forward, and
    the map itself: `entropy` (steps, B, L), NaN where nothing was fed back (a caller can pool
    over the positions it cares about, e.g. Sudoku's blank cells)."""
    per_step, pooled = [], []
    maps = torch.full(masked_after.shape, float("nan"))
    for i, (ent, left) in enumerate(zip(ent_log, masked_after)):
        h = ent.float().cpu()[left] if ent is not None else torch.zeros(0)
        if ent is not None:
            maps[i][left] = h
        per_step.append(float(h.median()) if h.numel() else float("nan"))
        pooled.append(h)
    pooled = torch.cat(pooled) if pooled else torch.zeros(0)
    qs = (pooled.quantile(torch.tensor(FED_BACK_QUANTILES)).tolist() if pooled.numel()
          else [float("nan")] * len(FED_BACK_QUANTILES))
    return {"entropy_q50": per_step, "entropy_fed_back_median":
            float(pooled.median()) if pooled.numel() else float("nan"),
            "entropy_fed_back_quantiles": dict(zip(map(str, FED_BACK_QUANTILES), qs)),
            "entropy_fed_back_count": int(pooled.numel()), "entropy": maps}
