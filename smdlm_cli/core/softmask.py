"""The soft-masking (SM) operator of Hersche et al. (ICLR 2026) and its three trainable scalars.

A position that is still masked gets, instead of the plain [MASK] embedding,

    e = (1 - lam) * E[mask] + lam * sum_{i in top-k(p)} pi_i * E[v_i],   pi = p renormalised on the top-k
    lam = scale * sigmoid(steepness * (-H(p) - centre))

where p is the model's previous prediction for that position. The same object builds the input of
the second training pass and the feedback of every sampler.

Mixing is sparse: k + 1 embedding rows are gathered per position and summed, never a dense
(B, L, V) @ (V, D) product (at Dream's V = 152k that product costs as much as the LM head).
Parametrisation and initial values follow the official TransparencyHead: scale = sigmoid(raw),
centre = -softplus(raw) - 1e-6, steepness = softplus(raw) + 1e-6, so the bounds can never be left.

This is not a sampler or a trainer: it knows nothing of schedules, steps or losses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from smdlm_cli.core.diffusion import NEG_INF, at_least_fp32
from smdlm_cli.core.errors import UserError

_EPS = 1e-6  # the official code's margin that keeps centre < 0 and steepness, temperature > 0
_ENT_EPS = 1e-10  # inside the entropy's log, as the official heads
OFFICIAL_ALGS = ("mixinputs_with_topk", "mixinputs_with_temp")
# Keys of softmask.json and of the official file that hold numbers (so does every raw value).
_NUMERIC_KEYS = frozenset({"k", "scale", "centre", "steepness", "temperature", "mixinputs_k",
                           "transparency_scale", "transparency_centre", "transparency_steepness",
                           "mixture_temp"})


def _is_number(value, none_ok: bool = False, inf_ok: bool = False) -> bool:
    if value is None:
        return none_ok
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (math.isfinite(value) or (inf_ok and not math.isnan(value)))


def _softplus_inv(y: float) -> float:
    # log(expm1(y)), written to stay finite for large y
    return y + math.log(-math.expm1(-y))


def _logit(p: float) -> float:
    # scale = 0 maps to -inf on purpose: sigmoid(-inf) is exactly 0, so SM with scale 0 is binary
    # decoding bit for bit (the official logit clamps to 1e-6 and never switches off completely).
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def _top_k_blocked(z: Tensor, k: int, block: int = 128) -> tuple[Tensor, Tensor]:
    """z.topk(k, dim=-1), exact up to the order of ties, several times faster on wide rows.

    The k largest entries lie in the k blocks with the largest maxima (any other entry has k larger
    ones, those maxima, above it), so only those k blocks and the ragged tail are searched after
    one vectorised max per block.
    """
    V = z.shape[-1]
    n_blocks = V // block
    if n_blocks < 4 * k:
        return z.topk(k, dim=-1)
    flat = z.reshape(-1, V)
    main = flat[:, : n_blocks * block].unflatten(-1, (n_blocks, block))
    best = main.amax(-1).topk(k, dim=-1).indices                                   # (N, k)
    cand = main.gather(1, best[..., None].expand(-1, -1, block)).flatten(1)
    cand_idx = (best[..., None] * block + torch.arange(block, device=z.device)).flatten(1)
    if V > n_blocks * block:
        cand = torch.cat([cand, flat[:, n_blocks * block:]], 1)
        tail = torch.arange(n_blocks * block, V, device=z.device).expand(flat.shape[0], -1)
        cand_idx = torch.cat([cand_idx, tail], 1)
    values, j = cand.topk(k, dim=-1)
    return values.view(*z.shape[:-1], k), cand_idx.gather(1, j).view(*z.shape[:-1], k)


def _entropy(p: Tensor) -> Tensor:
    """-sum p log(p + 1e-10) over the last axis.

    Without a gradient to carry (no temperature to learn) the (N, V) work goes through one
    temporary written in place: the same operations in the same order as the expression below,
    so the same bits; the expression itself makes three.
    """
    if p.requires_grad and torch.is_grad_enabled():
        return -(p * torch.log(p + _ENT_EPS)).sum(-1)
    return -p.add(_ENT_EPS).log_().mul_(p).sum(-1)


def _entropy_of_log_probs(logp: Tensor, scratch: Tensor | None = None) -> Tensor:
    """-sum p log p over the last axis, from log p: p = exp(log p), one multiply and a sum over
    (N, V), where _entropy's log(p + 1e-10) costs a logarithm and two more passes (about twice the
    time at V = 50k on a CPU). Differs from the official formula by at most V * 1e-10 nats
    (p log(1 + 1e-10 / p) <= 1e-10 per entry): 5e-6 at V = 50k, 1.5e-5 at Dream's 152k; pinned by
    test_softmask.py. The samplers' feedback only (no gradient); training keeps the official one.

    scratch: an (N, V) fp32 buffer written over (p and p log p go through it, nothing else is
    allocated). The CPU samplers pass one they reuse: a fresh (N, V) temporary of a few MB is a
    fresh mapping, page-faulted in at every call (samplers/feedback.py gives the cost).
    """
    p = logp.exp() if scratch is None else torch.exp(logp, out=scratch)
    return -p.mul_(logp).sum(-1)


class SoftMask(nn.Module):
    """omega_s (scale), omega_b (centre), omega_a (steepness), optional temperature, and k."""

    def __init__(self, k: int = 3, scale: float = 1e-6, centre: float = -0.75,
                 steepness: float = 6.66, temperature: float | None = None):
        super().__init__()
        if k < 1:
            raise UserError(f"softmask k = {k}, expected an integer >= 1")
        if not 0.0 <= scale <= 1.0:
            raise UserError(f"softmask scale = {scale}, expected a number in [0, 1]")
        if centre >= 0.0:
            raise UserError(f"softmask centre = {centre}, expected a negative number")
        if steepness <= 0.0:
            raise UserError(f"softmask steepness = {steepness}, expected a positive number")
        if temperature is not None and temperature <= 0.0:
            raise UserError(f"softmask temperature = {temperature}, expected a positive number")
        self.k = int(k)
        f32 = dict(dtype=torch.float32)
        self.raw_scale = nn.Parameter(torch.tensor(_logit(scale), **f32))
        self.raw_centre = nn.Parameter(torch.tensor(_softplus_inv(max(-centre - _EPS, 1e-12)), **f32))
        self.raw_steepness = nn.Parameter(torch.tensor(_softplus_inv(max(steepness - _EPS, 1e-12)), **f32))
        self.raw_temperature = (nn.Parameter(torch.tensor(_softplus_inv(temperature - _EPS), **f32))
                                if temperature is not None else None)
        # (scale, centre, steepness, temperature or nan) when the values were read as numbers (an
        # official transparency_config.json): used exactly as written, not through the bounded
        # maps, whose float32 round trip moves them by an ulp. None: the parameters decide.
        self.register_buffer("fixed", None, persistent=False)

    def fix_values(self, scale: float, centre: float, steepness: float,
                   temperature: float | None) -> None:
        """Use these numbers as the omega values (inference with an official config)."""
        self.fixed = torch.tensor([scale, centre, steepness,
                                   math.nan if temperature is None else temperature],
                                  dtype=torch.float32, device=self.raw_scale.device)

    # --- the bounded values -------------------------------------------------------------------
    @property
    def scale(self) -> Tensor:
        return torch.sigmoid(self.raw_scale) if self.fixed is None else self.fixed[0]

    @property
    def centre(self) -> Tensor:
        return -F.softplus(self.raw_centre) - _EPS if self.fixed is None else self.fixed[1]

    @property
    def steepness(self) -> Tensor:
        return F.softplus(self.raw_steepness) + _EPS if self.fixed is None else self.fixed[2]

    @property
    def temperature(self) -> Tensor | None:
        if self.raw_temperature is None:
            return None
        return F.softplus(self.raw_temperature) + _EPS if self.fixed is None else self.fixed[3]

    # --- lambda and the top-k mixture ---------------------------------------------------------
    def _scores_probs_entropy(self, logits: Tensor, normalized: bool = False,
                              mask_id: int | None = None, scratch: Tensor | None = None
                              ) -> tuple[Tensor, Tensor | None, Tensor]:
        """(scores, p, H): p the distribution fed back, H its entropy, and scores whose order is
        p's and whose softmax over any subset is p renormalised on it (log p, or raw logits:
        both only shift each row), for the top k. p is None where nothing reads it (a sampler's
        log p without a temperature: only the top k of the scores is mixed); `scratch`, an
        (N, V) fp32 buffer, then holds its temporaries.

        Logits are constants here (the paper's second pass sees the first as data), in fp32.
        mask_id: raw logits whose [MASK] column is dropped (SUBS never predicts the mask).
        H = -sum p log(p + 1e-10), the official heads' formula (the 1e-10 moves H by up to
        V * 1e-10, 1.5e-5 at Dream's vocabulary), with p = softmax(logits) as they compute it.
        """
        z = at_least_fp32(logits.detach())
        if mask_id is not None and not normalized:
            z = z.masked_fill(torch.arange(z.shape[-1], device=z.device) == mask_id, NEG_INF)
        if self.raw_temperature is not None:  # a temperature reshapes even log p; it learns
            z = torch.log_softmax(z / self.temperature, dim=-1)
            p = z.exp()
        elif normalized and not torch.is_grad_enabled():  # a sampler's log p: no log pass
            return z, None, _entropy_of_log_probs(z, scratch)
        elif normalized:
            p = z.exp()
        else:  # raw logits: one softmax pass, no log p needed (the top k reads the logits)
            p = torch.softmax(z, dim=-1)
        return z, p, _entropy(p)

    def lam_from_entropy(self, entropy: Tensor) -> Tensor:
        """lambda(H) = scale * sigmoid(steepness * (-H - centre)), elementwise."""
        return self.scale * torch.sigmoid(self.steepness * (-entropy - self.centre))

    def feedback(self, logits: Tensor, is_mask: Tensor, normalized: bool = False,
                 mask_id: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """lambda (B, L), top-k ids (B, L, k) and their renormalised probabilities pi (B, L, k).

        lambda is 0 where `is_mask` is False. Entropy and softmax run in fp32 whatever the logits'
        dtype. Gradients reach the omega parameters (and the temperature, when present), never the
        logits. `normalized=True` says the input already is log-probabilities (the samplers pass
        SUBS log p): it skips the log_softmax (the temperature variant renormalises regardless).
        `mask_id` (raw logits only) drops the [MASK] column first. The top k is found by blocks:
        the same ids and values as torch.topk up to the order of ties, faster on wide rows.
        """
        scores, _, entropy = self._scores_probs_entropy(logits, normalized, mask_id)
        lam = self.lam_from_entropy(entropy) * is_mask.to(entropy.dtype)
        top_scores, top_idx = _top_k_blocked(scores, self.k)
        pi = torch.softmax(top_scores, dim=-1)  # = p_i / sum_{top-k} p_j
        return lam, top_idx, pi

    @property
    def dense(self) -> bool:
        """The temperature variant mixes the whole tempered distribution (all V tokens), as the
        official `mixinputs_with_temp`; the plain one the renormalised top k."""
        return self.raw_temperature is not None

    def mixture(self, logits: Tensor, weight: Tensor, normalized: bool = False,
                mask_id: int | None = None, scratch: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """(lambda (N,), mixed (N, D)) for logit rows (N, V) of masked positions only.

        mixed = sum_i pi_i E[v_i] over the top k, or with the temperature variant sum_v p_v E[v]
        over the whole vocabulary: one (N, V) @ (V, D) product, exact, but only at the N masks
        (never the official dense (B, L, V) one). Arguments as in `feedback`; `scratch`, an (N, V)
        fp32 buffer the caller reuses, takes the entropy's temporaries (used without gradients on
        log-probabilities, the samplers' case).
        """
        scores, p, entropy = self._scores_probs_entropy(logits, normalized, mask_id, scratch)
        lam = self.lam_from_entropy(entropy)
        if self.dense:
            return lam, p.to(weight.dtype) @ weight
        top_scores, top_idx = _top_k_blocked(scores, self.k)
        pi = torch.softmax(top_scores, dim=-1)
        return lam, torch.einsum("...k,...kd->...d", pi.to(weight.dtype), F.embedding(top_idx, weight))

    @staticmethod
    def combine(input_ids: Tensor, lam: Tensor, mixed: Tensor, embedding_weight: Tensor) -> Tensor:
        """(1 - lam) E[x] + lam * mixed: E[x] exactly wherever lam is 0; the embedding's dtype."""
        w = embedding_weight
        lam = lam.to(w.dtype).unsqueeze(-1)
        return (1 - lam) * F.embedding(input_ids, w) + lam * mixed.to(w.dtype)

    @staticmethod
    def mix(input_ids: Tensor, lam: Tensor, top_idx: Tensor, pi: Tensor,
            embedding_weight: Tensor) -> Tensor:
        """(1 - lam) E[x] + lam * sum_i pi_i E[v_i]: E[x] exactly wherever lam is 0.

        Gathers k + 1 rows per position. The result has the embedding's dtype.
        """
        w = embedding_weight
        mixed = torch.einsum("blk,blkd->bld", pi.to(w.dtype), F.embedding(top_idx, w))
        return SoftMask.combine(input_ids, lam, mixed, w)

    def forward(self, input_ids: Tensor, prev_logits: Tensor, embedding_weight: Tensor,
                mask_id: int, normalized: bool = False, keep_mask: bool = False) -> Tensor:
        """Input embeddings (B, L, D) for `input_ids`, soft-masked from `prev_logits` (B, L, V).

        Raw logits have their [MASK] column dropped (the SUBS distribution) unless keep_mask (a
        model with mask_logit "keep", as Dream in the official code); `normalized=True` says
        prev_logits already are log-probabilities, as the samplers pass them.
        """
        is_mask = input_ids == mask_id
        drop = None if keep_mask else mask_id
        if not self.dense:
            lam, top_idx, pi = self.feedback(prev_logits, is_mask, normalized, drop)
            return self.mix(input_ids, lam, top_idx, pi, embedding_weight)
        # the whole-vocabulary mixture only at masked rows (a training step, not a sampling loop:
        # boolean indexing is fine here)
        lam, mixed = self.mixture(prev_logits[is_mask], embedding_weight, normalized, drop)
        w = embedding_weight
        base = F.embedding(input_ids, w)
        soft = (1 - lam.to(w.dtype))[:, None] * base[is_mask] + lam.to(w.dtype)[:, None] * mixed
        return base.masked_scatter(is_mask[..., None], soft)

    def check_vocabulary(self, vocab_size: int, where: str) -> None:
        """k must leave the top-k within the vocabulary (the [MASK] column is never mixed in)."""
        if self.k > vocab_size - 1:
            raise UserError(f"{where}: softmask k = {self.k} exceeds the {vocab_size - 1} tokens a "
                            f"soft mask can mix; expected 1 to {vocab_size - 1}")

    # --- export / import ----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """softmask.json: the values, the raw parameters (exact), and k; values used as written
        (an official config's) are marked fixed and carry no raw parameters."""
        temp = self.temperature
        out = {
            "k": self.k,
            "scale": self.scale.item(),
            "centre": self.centre.item(),
            "steepness": self.steepness.item(),
            "temperature": None if temp is None else temp.item(),
        }
        if self.fixed is not None:
            return {**out, "fixed": True}
        return {**out, "raw": {name: p.item() for name, p in self.named_parameters()}}

    def to_official(self) -> dict:
        """transparency_config.json as the official code writes it (kwargs of its sampler): the
        values rounded to bfloat16, as its get_th_kwargs does, so the official sampler decodes with
        exactly what it would have exported; `precision` says so (softmask.json keeps the exact
        values). The official sampler ignores the extra key."""
        temp = self.temperature

        def bf16(v: Tensor) -> float:
            return v.detach().to(torch.bfloat16).item()
        return {
            "transparency_alg": "mixinputs_with_temp" if temp is not None else "mixinputs_with_topk",
            "transparency_scale": bf16(self.scale),
            "transparency_steepness": bf16(self.steepness),
            "transparency_centre": bf16(self.centre),
            "mixture_temp": 1.0 if temp is None else bf16(temp),
            "mixinputs_k": self.k,
            "transparency_scheduling": "none",
            "precision": "bfloat16",
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "softmask.json") -> "SoftMask":
        """Read softmask.json or an official transparency_config.json (told apart by their keys)."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: a JSON {type(d).__name__}; expected a JSON object")
        raw = d.get("raw")
        if raw is not None and not isinstance(raw, dict):
            raise UserError(f"{source}: raw = {raw!r}; expected an object of numbers")
        for key, value in d.items():
            if key in _NUMERIC_KEYS and not _is_number(value, none_ok=key == "temperature"):
                raise UserError(f"{source}: {key} = {value!r}; expected a finite number")
        for key, value in (raw or {}).items():  # ±inf is exact for a scale of 0 or 1
            if not _is_number(value, none_ok=True, inf_ok=True):
                raise UserError(f"{source}: raw {key} = {value!r}; expected a number")
            if key in ("k", "mixinputs_k") and value != int(value):
                raise UserError(f"{source}: {key} = {value!r}; expected an integer")
        try:
            if "transparency_alg" in d:
                alg = d["transparency_alg"]
                if alg not in OFFICIAL_ALGS:
                    raise UserError(f"{source}: transparency_alg = {alg!r} has no soft-masking; "
                                    f"expected one of {', '.join(OFFICIAL_ALGS)}")
                temp = float(d.get("mixture_temp", 1.0)) if alg == "mixinputs_with_temp" else None
                values = (float(d["transparency_scale"]), float(d["transparency_centre"]),
                          float(d["transparency_steepness"]), temp)
                sm = cls(k=int(d.get("mixinputs_k", 1)), scale=values[0], centre=values[1],
                         steepness=values[2], temperature=temp)
                sm.fix_values(*values)  # the official sampler's numbers, as written
                return sm
            sm = cls(k=int(d["k"]), scale=float(d["scale"]), centre=float(d["centre"]),
                     steepness=float(d["steepness"]), temperature=d.get("temperature"))
        except KeyError as e:
            raise UserError(f"{source}: missing key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: bad value ({e})") from None
        if d.get("fixed"):  # values read as written (an official config's), not parameters
            temp = d.get("temperature")
            sm.fix_values(float(d["scale"]), float(d["centre"]), float(d["steepness"]),
                          None if temp is None else float(temp))
        raw = d.get("raw")
        if raw:  # exact raw values survive a save/load even where the bounded maps lose precision
            with torch.no_grad():
                for name, p in sm.named_parameters():
                    if name in raw:
                        p.fill_(float(raw[name]))
        return sm
