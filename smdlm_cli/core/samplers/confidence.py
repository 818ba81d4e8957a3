"""Dream/LLaDA-style confidence decoding: each step commits the k most confident masked positions.

Dream's `diffusion_generate` semantics: time grid linspace(1, 1e-3, steps + 1); at step i a row
with n masked positions commits k_i = int(n * (1 - s/t)) of them (float32 arithmetic, truncation),
all remaining ones at the last step, so steps = L gives 0, 1, ..., 1, 2 tokens per step. Candidate
tokens and confidences come from Dream's `sample_tokens` on the log-probabilities (SUBS, or with the
[MASK] column kept for a model with mask_logit "keep", as Dream's own code; a kept [MASK] weighs in
every confidence but is never the committed token): logits / T,
Hugging Face top-p, top-k, softmax; a float64 categorical draw if T > 0, else argmax. Confidence:
maskgit_plus = p(x0), topk_margin = p1 - p2, entropy = sum p log(p + 1e-10) (higher = surer);
'origin' commits each masked position with probability 1 - s/t whatever its confidence. With
alg_temp > 0 positions are drawn from softmax(conf / alg_temp) without replacement, by Gumbel-top-k.
LLaDA's semi-autoregressive blocks (`block_length`): the generation region of each row (from its
first masked position) is cut into blocks, steps are split evenly among them, positions outside the
current block are not candidates, and k uses the same formula on the block's masks and grid.

LLaDA's `generate` is alg = low_confidence (or random), transfer = even, block_length = its block:
transfer "even" is its get_num_transfer_tokens (a block's n masks split evenly over its steps, the
first n % steps steps one more; equivalently k = ceil(n_left / steps_left)); low_confidence draws
x0 like maskgit_plus (from the tempered, filtered p) but ranks by the UNtempered p(x0), as LLaDA's
softmax of the raw logits; random ranks by a uniform draw (LLaDA's random remasking), so which
positions are committed ignores the model. At temperature 0, maskgit_plus and low_confidence agree.
One deliberate difference: smdlm's p never predicts [MASK] (SUBS), LLaDA's softmax keeps its column;
a trained LLaDA gives it ~0 mass.

Deliberate deviation: Dream uses the batch-mean mask count for k (the same k for every row); here
k is per row, from the row's own count, so a row decodes the same in any batch and alone. For
batches of equal rows the two agree. Since k is a function of the counts only, the whole table is
computed on the host before the loop; committed tokens and the prompt never change. Where the
confidence ignores the sampled token (topk_margin, entropy) only the k committed positions draw a
token: the same distribution as Dream's draw at every candidate, k instead of n float64 races.

Not here: the model forward, SM feedback and step skipping (loop.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from smdlm_cli.core.samplers.common import (categorical_fp64, gumbels, nucleus_hf, positions,
                                            top_k_filter, uniforms, with_temperature)
from smdlm_cli.core.samplers.mdlm import MaskChain, gen_uniforms
from smdlm_cli.core.samplers.rows import RowLogProbs
from smdlm_cli.core.errors import UserError

GRID_EPS = 1e-3  # Dream's default eps
TOKEN_CONFIDENCE = ("maskgit_plus", "low_confidence")  # confidences that need the drawn token
ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy", "low_confidence", "random")
TRANSFERS = ("dream", "even")
# The paper's coding evaluation uses alg entropy; the rest are Dream's diffusion_generate defaults.
OPTIONS = {"alg": "entropy", "temperature": 0.0, "top_p": 1.0, "top_k": None, "alg_temp": 0.0,
           "block_length": None, "transfer": "dream",
           # Fast-dLLM (blockwise.py): KV cache, parallel decoding rules, mid-block refreshes
           "cache": "none", "threshold": None, "factor": None, "refresh_every": 0}


def filtered_probs(lp: Tensor, o: dict, mask_id: int, keep_mask: bool = False) -> Tensor:
    """Dream's candidate distribution on log-prob rows (N, V): / T, HF top-p, top-k, softmax.

    keep_mask: the [MASK] column stays in (mask_logit "keep", the official Dream code)."""
    logits = with_temperature(lp, o["temperature"])
    if not keep_mask:
        logits[:, mask_id] = torch.finfo(logits.dtype).min  # SUBS excludes it; keep it so after T
    return top_k_filter(nucleus_hf(logits, o["top_p"]), o["top_k"]).softmax(-1)


def _tokens_only(probs: Tensor, mask_id: int, keep_mask: bool) -> Tensor:
    """The distribution a token is chosen from: a kept [MASK] column weighs in every confidence
    but is never committed (a committed position is decoded; see docs/official-parity.md)."""
    if not keep_mask:
        return probs
    # an arange compared with a Python int, not a tensor built from [mask_id] (a host copy)
    return probs.masked_fill(torch.arange(probs.shape[-1], device=probs.device) == mask_id, 0.0)


def sample_tokens(lp: Tensor, generators: Sequence[torch.Generator], counts: Sequence[int],
                  o: dict, mask_id: int, draw: bool = True,
                  keep_mask: bool = False) -> tuple[Tensor, Tensor | None]:
    """Dream's sample_tokens on log-prob rows (N, V): (confidence (N,), candidate token (N,)).

    draw=False skips the categorical draw (candidate None) where the confidence does not depend on
    it (topk_margin, entropy, random): the caller then draws only at the positions it commits.
    """
    probs = filtered_probs(lp, o, mask_id, keep_mask)
    x0 = None
    if o["temperature"] == 0:
        x0 = _tokens_only(probs, mask_id, keep_mask).argmax(-1)
        conf = probs.gather(-1, x0[:, None]).squeeze(-1)
    elif draw or o["alg"] in TOKEN_CONFIDENCE:
        x0 = categorical_fp64(_tokens_only(probs, mask_id, keep_mask), generators, counts)
        conf = probs.gather(-1, x0[:, None]).squeeze(-1)
    if o["alg"] == "low_confidence":  # LLaDA: the untempered p of the drawn token
        conf = lp.gather(-1, x0[:, None]).squeeze(-1).exp()
    elif o["alg"] == "random":
        conf = uniforms(generators, counts, (), lp.device)
    elif o["alg"] == "topk_margin":
        top2 = probs.topk(2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    elif o["alg"] == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    return conf, x0


def step_fractions(steps: int) -> list[float]:
    """Dream's float32 1 - s/t per step of a grid with `steps` steps (the last one unused)."""
    grid = torch.linspace(1.0, GRID_EPS, steps + 1, dtype=torch.float32)
    return (1 - grid[1:] / grid[:-1]).tolist()


def step_k(left: list[int], local: int, steps_per_block: int, frac: list[float],
           transfer: str) -> list[int]:
    """Tokens each row commits at local step `local` of a block, from its masks left in the block.

    dream: int(n_left * (1 - s/t)) in float32; even: ceil(n_left / steps left), which splits a
    block's n masks as LLaDA does (n // steps each, the first n % steps steps one more). Both
    commit every remaining mask at the block's last step.
    """
    if local == steps_per_block - 1:
        return list(left)
    if transfer == "even":
        return [-(-n // (steps_per_block - local)) for n in left]
    return [int(torch.tensor(n, dtype=torch.float32) * frac[local]) for n in left]


def transfer_table(block_counts: list[list[int]], steps_per_block: int,
                   transfer: str = "dream") -> list[list[int]]:
    """k[step][row]: tokens committed per step, from n[row][block] masks per block (see step_k)."""
    frac = step_fractions(steps_per_block)
    table = []
    n_blocks = len(block_counts[0]) if block_counts else 0
    for j in range(n_blocks):
        left = [row[j] for row in block_counts]
        for local in range(steps_per_block):
            k = step_k(left, local, steps_per_block, frac, transfer)
            table.append(k)
            left = [n - kk for n, kk in zip(left, k)]
    return table


@dataclass
class ConfidenceTransition:
    """Commits k[i][b] positions of row b at step i, chosen by confidence within the current block."""

    k: list[list[int]]              # [step][row], host
    candidates: list[list[int]]     # [step][row]: masks in the row's current block before the step
    masks_left: list[list[int]]     # [step][row]: all masks of the row after the step
    k_dev: Tensor                   # (steps, B) long on the device
    in_block: Tensor                # (n_blocks, B, L) bool on the device
    steps_per_block: int
    generators: Sequence[torch.Generator]
    options: dict
    mask_id: int
    keep_mask: bool = False

    @property
    def changes(self) -> list[list[bool]]:
        return [[k > 0 for k in row] for row in self.k]

    @property
    def noise_removal(self) -> list[bool]:
        return [False] * self.k_dev.shape[1]  # the last step of every block commits all its masks

    def step(self, i: int, x: Tensor, logp: RowLogProbs, rows: Sequence[int],
             start: int = 0) -> Tensor:
        """x after step i: each listed row commits its k most confident candidates. logp covers
        the columns [start, start + W) of x (a KV-cache window; by default all of them), at least
        at the listed rows' masks (samplers/rows.py)."""
        cols = slice(start, start + logp.width)
        cand = (x[:, cols] == self.mask_id) & self.in_block[i // self.steps_per_block][:, cols]
        counts = [self.candidates[i][b] for b in rows]
        new = commit(x[:, cols], logp, cand, rows, counts, [self.k[i][b] for b in rows],
                     self.k_dev[i], self.generators, self.options, self.mask_id,
                     keep_mask=self.keep_mask)
        if new.shape == x.shape:
            return new
        out = x.clone()
        out[:, cols] = new
        return out


def commit(x: Tensor, logp: RowLogProbs, cand: Tensor, rows: Sequence[int],
           counts: Sequence[int], ks: Sequence[int] | None, k: Tensor, generators: Sequence[torch.Generator], o: dict,
           mask_id: int, rule=None, keep_mask: bool = False) -> Tensor:
    """x (B, W) after each listed row commits its k[b] most confident candidates.

    logp over the same columns (at least at the candidates); cand (B, W) the candidates,
    counts[j] of them in row rows[j]; ks[j] = k[rows[j]] on the host, or None when a `rule`
    (threshold or factor) raises k on the device from each row's confidences sorted in
    decreasing order.
    """
    B, W = x.shape
    gens = [generators[b] for b in rows]
    idx = positions(cand, rows, counts)
    # a confidence that ignores the sampled token lets us draw only the k committed tokens
    late = o["temperature"] > 0 and o["alg"] not in TOKEN_CONFIDENCE
    conf, x0 = sample_tokens(logp.take(idx), gens, counts, o, mask_id, draw=not late,
                             keep_mask=keep_mask)
    if o["alg_temp"] > 0:  # Gumbel-top-k = sampling softmax(conf/T) w/o replacement (fp64)
        conf = conf.double() / o["alg_temp"] + gumbels(gens, counts, x.device)
    full = torch.full((B * W,), float("-inf"), dtype=conf.dtype, device=x.device)
    full = full.index_copy(0, idx, conf).view(B, W)
    # a stable sort, not topk: ties break by position whatever k, so rows do not interact
    ranked = full.sort(dim=-1, descending=True, stable=True)
    if rule is not None:
        k = torch.maximum(k, rule(ranked.values))
    k_max = max(ks) if ks is not None else max(counts)
    keep = torch.arange(k_max, device=x.device)[None] < k[:, None]
    chosen = torch.zeros_like(cand).scatter_(1, ranked.indices[:, :k_max], keep)
    if late:
        committed = positions(chosen, rows, ks)
        probs = filtered_probs(logp.take(committed), o, mask_id, keep_mask)
        tokens = categorical_fp64(_tokens_only(probs, mask_id, keep_mask), gens, ks)
        return x.reshape(-1).index_copy(0, committed, tokens).view_as(x)
    proposal = x.reshape(-1).index_copy(0, idx, x0).view_as(x)
    return torch.where(chosen, proposal, x)


def _blocks(gen_host: Tensor, block_length: int | None) -> Tensor:
    """Block index (B, L) of every position to generate (-1 elsewhere), from each row's first mask."""
    B, L = gen_host.shape
    pos = torch.arange(L).expand(B, L)
    first = torch.where(gen_host, pos, L).min(-1, keepdim=True).values
    block = (pos - first) // block_length if block_length else torch.zeros_like(pos)
    return torch.where(gen_host, block, -1)


def build(gen: Tensor, gen_host: Tensor, generators: Sequence[torch.Generator], steps: int,
          mask_id: int, options: dict, keep_mask: bool = False):
    """The confidence transition (or, for alg 'origin', its planned mask chain) for positions `gen`."""
    block = _blocks(gen_host, options["block_length"])
    n_blocks = max(int(block.max()) + 1, 1)
    if steps % n_blocks:
        raise UserError(f"steps = {steps}, expected a multiple of the number of blocks {n_blocks} "
                        f"(generation length / block_length {options['block_length']})")
    spb = steps // n_blocks
    device = gen.device
    block_dev = block.to(device)
    if options["alg"] == "origin":
        return MaskChain(_plan_origin(gen, gen_host, block_dev, generators, steps, spb), generators,
                         _origin_draw(options, mask_id, keep_mask), mask_id)
    counts = [[int((row == j).sum()) for j in range(n_blocks)] for row in block]
    k = transfer_table(counts, spb, options["transfer"])
    # masks left in the current block before each step: the block's count minus what was committed
    candidates, left = [], None
    for i, ks in enumerate(k):
        if i % spb == 0:
            left = [row[i // spb] for row in counts]
        candidates.append(left)
        left = [n - kk for n, kk in zip(left, ks)]
    masks_left, left = [], [sum(row) for row in counts]
    for ks in k:
        left = [n - kk for n, kk in zip(left, ks)]
        masks_left.append(left)
    in_block = torch.stack([block_dev == j for j in range(n_blocks)])
    return ConfidenceTransition(k, candidates, masks_left,
                                torch.tensor(k, dtype=torch.long, device=device), in_block, spb,
                                generators, options, mask_id, keep_mask)


def _plan_origin(gen: Tensor, gen_host: Tensor, block: Tensor,
                 generators: Sequence[torch.Generator], steps: int, spb: int) -> Tensor:
    """Dream 'origin' as a mask chain: within its block a position unmasks w.p. 1 - s/t per step
    (U <= t_local keeps it masked) and surely at the block's last step."""
    grid = torch.linspace(1.0, GRID_EPS, spb + 1, dtype=torch.float64, device=gen.device)
    grid[-1] = -1.0  # the last local state: nothing stays masked
    u = gen_uniforms(gen, gen_host.sum(-1).tolist(), generators)[..., 0]
    state = torch.arange(steps + 1, device=gen.device)[:, None, None]
    local = (state - block.clamp_min(0)[None] * spb).clamp(0, spb)
    return (u[None] <= grid[local]) & gen[None]


def _origin_draw(options: dict, mask_id: int, keep_mask: bool):
    def draw(lp: Tensor, generators: Sequence[torch.Generator], counts: Sequence[int]) -> Tensor:
        return sample_tokens(lp, generators, counts, options, mask_id, keep_mask=keep_mask)[1]
    return draw


def check_options(o: dict) -> list[str]:
    """Problems with the confidence sampler's options, one line each."""
    bad = []
    if o["alg"] not in ALGS:
        bad.append(f"alg = {o['alg']!r}, expected one of {', '.join(ALGS)}")
    if not o["temperature"] >= 0.0:
        bad.append(f"temperature = {o['temperature']}, expected a number >= 0 (0 = argmax)")
    if not 0.0 < o["top_p"] <= 1.0:
        bad.append(f"top_p = {o['top_p']}, expected a number in (0, 1]")
    if o["top_k"] is not None and not (isinstance(o["top_k"], int) and o["top_k"] >= 1):
        bad.append(f"top_k = {o['top_k']}, expected an integer >= 1 or None")
    if not o["alg_temp"] >= 0.0:
        bad.append(f"alg_temp = {o['alg_temp']}, expected a number >= 0 (0 = top-k)")
    if o["transfer"] not in TRANSFERS:
        bad.append(f"transfer = {o['transfer']!r}, expected one of {', '.join(TRANSFERS)}")
    elif o["transfer"] != "dream" and o["alg"] == "origin":
        bad.append("transfer = even: alg origin unmasks each position by its own chance; expected "
                   "another alg with a transfer schedule")
    bl = o["block_length"]
    if bl is not None and not (isinstance(bl, int) and bl >= 1):
        bad.append(f"block_length = {bl}, expected an integer >= 1 or None")
    return bad
