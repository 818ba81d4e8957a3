"""MDLM ancestral sampling and ReMDM remasking (remdm-cap, remdm-loop) as planned mask-state chains.

In this family WHETHER a position changes state at a step never depends on the model: a masked
position unmasks with a probability that is a function of (t, s) only, an unmasked one is remasked
with a probability of (t, s, eta, alpha_on) only, and only WHICH token an unmasking position takes
comes from p. So the chain of mask states is drawn for all steps before the loop (`MaskChain.masked`,
state i = before step i), the loop learns on the host which steps change anything, and during the
loop the transition only draws tokens, at the positions the plan unmasks, from the filtered p.

Reference semantics (ReMDM / soft-masked MDLM `_ddpm_caching_update`): time grid
linspace(1, 1e-5, steps + 1), move chance = t. mdlm: P(v) = p(v)(t - s)/t, P(stay) = s/t.
remdm-cap: an unmasked token is remasked w.p. sigma = min(eta, (1 - alpha_s)/alpha_t); a masked one
unmasks w.p. (alpha_s - (1 - sigma) alpha_t)/(1 - alpha_t). remdm-loop: an MDLM phase with a remapped
schedule while t > t_on, a ReMDM loop at constant alpha_on (remask w.p. eta, unmask w.p.
eta alpha_on/(1 - alpha_on)) while t_off < t <= t_on, and an MDLM phase for t <= t_off. Prompt and
fixed positions are never remasked. Tokens come from the official nucleus (common.nucleus_official).

Not here: the model forward, SM feedback, skipping and NFE (loop.py); Dream-style samplers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from smdlm_cli.core.samplers.common import categorical_fp64, nucleus_official, positions, uniforms
from smdlm_cli.core.samplers.rows import RowLogProbs

GRID_EPS = 1e-5  # the official sampler's last time point

# Options of each sampler of this module with their defaults (the reference scripts' values).
OPTIONS = {
    "mdlm": {"top_p": 1.0, "temperature": 1.0},
    "remdm-cap": {"top_p": 1.0, "temperature": 1.0, "eta": 0.04},
    "remdm-loop": {"top_p": 1.0, "temperature": 1.0, "eta": 0.02, "t_on": 0.55, "t_off": 0.05,
                   "alpha_on": 0.9},
}

Draw = Callable[[Tensor, Sequence[torch.Generator], Sequence[int]], Tensor]


def time_grid(steps: int, eps: float) -> list[float]:
    """t_0 = 1 > t_1 > ... > t_steps = eps, evenly spaced (host floats)."""
    return [1.0 - (1.0 - eps) * i / steps for i in range(steps)] + [eps]


@dataclass
class MaskChain:
    """A transition whose mask states were drawn before the loop; the loop only asks it for tokens.

    `masked` (steps + 1, B, L) bool on the device: state i is the mask pattern before step i. The
    constructor makes the plan's one host transfer: per step and row, how many positions unmask,
    how many are remasked and how many masks are left after it (the last step's: noise removal).
    """

    masked: Tensor
    generators: Sequence[torch.Generator]
    draw: Draw
    mask_id: int
    unmasked: list[list[int]] = field(init=False)     # [step][row]
    remasked: list[list[int]] = field(init=False)     # [step][row]
    masks_left: list[list[int]] = field(init=False)   # [step][row], after the step
    changes: list[list[bool]] = field(init=False)     # [step][row]
    noise_removal: list[bool] = field(init=False)     # [row]

    def __post_init__(self):
        m = self.masked
        counts = torch.cat([(m[:-1] & ~m[1:]).sum(-1), (~m[:-1] & m[1:]).sum(-1), m[1:].sum(-1)])
        host = counts.cpu().tolist()  # the plan's one host transfer, before the loop
        steps = m.shape[0] - 1
        self.unmasked, self.remasked = host[:steps], host[steps:2 * steps]
        self.masks_left = host[2 * steps:]
        self.noise_removal = [n > 0 for n in self.masks_left[-1]]
        self.changes = [[u + r > 0 for u, r in zip(us, rs)]
                        for us, rs in zip(self.unmasked, self.remasked)]

    def reads(self, i: int) -> tuple[Tensor, list[int]]:
        """(positions (B, L), their count per row) where step i reads log p: the ones it unmasks.
        A binary loop runs the head there only; SM's feedback needs every mask."""
        return self.masked[i] & ~self.masked[i + 1], self.unmasked[i]

    def step(self, i: int, x: Tensor, logp: RowLogProbs, rows: Sequence[int]) -> Tensor:
        """x after step i: planned positions take a drawn token, planned remasks become mask.
        logp holds at least the masked positions of the listed rows (samplers/rows.py)."""
        counts = [self.unmasked[i][b] for b in rows]
        out = x
        if any(counts):
            idx = positions(self.masked[i] & ~self.masked[i + 1], rows, counts)
            lp = logp.take(idx)
            tokens = self.draw(lp, [self.generators[b] for b in rows], counts)
            out = out.reshape(-1).index_copy(0, idx, tokens).view_as(x)
        if any(self.remasked[i][b] for b in rows):
            out = out.masked_fill(~self.masked[i] & self.masked[i + 1], self.mask_id)
        return out


def mdlm_draw(temperature: float, top_p: float, mask_id: int) -> Draw:
    """Token draw of the MDLM family: p^(1/T), official nucleus, float64 race; never the mask."""
    def draw(lp: Tensor, generators: Sequence[torch.Generator], counts: Sequence[int]) -> Tensor:
        probs = lp.exp() if temperature == 1.0 else torch.softmax(lp / temperature, dim=-1)
        probs = nucleus_official(probs, top_p)
        probs[:, mask_id] = 0.0  # SUBS already gives 0; a huge temperature must not revive it
        return categorical_fp64(probs, generators, counts)
    return draw


def gen_uniforms(gen: Tensor, gen_counts: Sequence[int], generators: Sequence[torch.Generator],
                 width: int = 1, dtype: torch.dtype = torch.float64) -> Tensor:
    """(B, L, width): fresh uniforms at the positions to generate (1.0 elsewhere).

    Row b draws exactly gen_counts[b] * width numbers, so padding and prompt length never shift
    its random stream (a row decodes the same in any batch and alone).
    """
    B, L = gen.shape
    u = uniforms(generators, gen_counts, (width,), gen.device, dtype)
    idx = positions(gen, range(B), gen_counts)
    full = torch.ones(B * L, width, dtype=dtype, device=gen.device)
    return full.index_copy(0, idx, u).view(B, L, width)


def plan_mdlm(gen: Tensor, gen_counts: Sequence[int], generators: Sequence[torch.Generator],
              steps: int) -> Tensor:
    """Mask states of ancestral MDLM: U ~ U(0, 1) per position, masked before step i iff U <= t_i.

    A position then unmasks at the step i with t_{i+1} < U <= t_i: P(still masked at s | masked at t)
    = s/t, exactly the official sequential chain with P(stay) = s/t at every step.
    """
    grid = torch.linspace(1.0, GRID_EPS, steps + 1, dtype=torch.float64, device=gen.device)
    u = gen_uniforms(gen, gen_counts, generators)[..., 0]
    return (u[None] <= grid[:, None, None]) & gen[None]


def remdm_cap_probs(steps: int, eta: float) -> list[tuple[float, float]]:
    """(P(unmask | masked), P(remask | unmasked)) per step of remdm-cap."""
    grid = time_grid(steps, GRID_EPS)
    out = []
    for t, s in zip(grid[:-1], grid[1:]):
        alpha_t, alpha_s = 1.0 - t, 1.0 - s
        sigma = min(eta, (1.0 - alpha_s) / alpha_t) if alpha_t > 0 else eta
        out.append(((alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t), sigma))
    return out


def remdm_loop_phase(t: float, t_on: float, t_off: float) -> str:
    """'mdlm-on' while t > t_on, 'loop' while t_off < t <= t_on, 'mdlm-off' for t <= t_off."""
    return "mdlm-on" if t > t_on else ("mdlm-off" if t <= t_off else "loop")


def remdm_loop_probs(steps: int, eta: float, t_on: float, t_off: float,
                     alpha_on: float) -> list[tuple[float, float]]:
    """(P(unmask | masked), P(remask | unmasked)) per step of remdm-loop."""
    grid = time_grid(steps, GRID_EPS)
    out = []
    for t, s in zip(grid[:-1], grid[1:]):
        phase = remdm_loop_phase(t, t_on, t_off)
        if phase == "loop":
            out.append((eta * alpha_on / (1.0 - alpha_on), eta))
            continue
        if phase == "mdlm-on":  # remapped so that the mask share reaches 1 - alpha_on at t_on
            mc_t = 1.0 - (1.0 - t) * alpha_on / (1.0 - t_on)
            mc_s = 1.0 - (1.0 - s) * alpha_on / (1.0 - t_on)
        else:
            mc_t, mc_s = t * (1.0 - alpha_on) / t_off, s * (1.0 - alpha_on) / t_off
        # a coarse grid can step past t_on, where the official q would go negative: clamp to [0, 1]
        out.append((min(1.0, max(0.0, (mc_t - mc_s) / mc_t)), 0.0))
    return out


def plan_remdm(gen: Tensor, gen_counts: Sequence[int], generators: Sequence[torch.Generator],
               probs: Sequence[tuple[float, float]]) -> Tensor:
    """Mask states of a remasking chain: one uniform per generated position and step.

    Masked positions unmask if u < P(unmask), unmasked ones are remasked if u < P(remask); positions
    not to generate (prompt, fixed tokens, padding) are never masked.
    """
    # float32 (steps x positions of them): its 2^-24 grain is far below the smallest probability
    u = gen_uniforms(gen, gen_counts, generators, len(probs), torch.float32).permute(2, 0, 1)
    states = [gen]
    for (p_unmask, p_remask), u_i in zip(probs, u):
        cur = states[-1]
        states.append(torch.where(cur, u_i >= p_unmask, u_i < p_remask) & gen)
    return torch.stack(states)


def build(sampler: str, gen: Tensor, gen_counts: Sequence[int],
          generators: Sequence[torch.Generator], steps: int, mask_id: int,
          options: dict) -> MaskChain:
    """The planned transition of `sampler` (mdlm, remdm-cap, remdm-loop) for positions `gen`."""
    if sampler == "mdlm":
        masked = plan_mdlm(gen, gen_counts, generators, steps)
    elif sampler == "remdm-cap":
        masked = plan_remdm(gen, gen_counts, generators, remdm_cap_probs(steps, options["eta"]))
    else:
        probs = remdm_loop_probs(steps, options["eta"], options["t_on"], options["t_off"],
                                 options["alpha_on"])
        masked = plan_remdm(gen, gen_counts, generators, probs)
    return MaskChain(masked, generators, mdlm_draw(options["temperature"], options["top_p"], mask_id),
                     mask_id)


def check_options(sampler: str, o: dict) -> list[str]:
    """Problems with the options of an MDLM-family sampler, one line each."""
    bad = []
    if not 0.0 < o["top_p"] <= 1.0:
        bad.append(f"top_p = {o['top_p']}, expected a number in (0, 1]")
    if not o["temperature"] > 0.0:
        bad.append(f"temperature = {o['temperature']}, expected a positive number")
    if sampler != "mdlm" and not o["eta"] >= 0.0:
        bad.append(f"eta = {o['eta']}, expected a number >= 0")
    if sampler == "remdm-loop":
        if not 0.0 < o["t_off"] < o["t_on"] < 1.0:
            bad.append(f"t_off = {o['t_off']}, t_on = {o['t_on']}, expected 0 < t_off < t_on < 1")
        if not 0.0 < o["alpha_on"] < 1.0:
            bad.append(f"alpha_on = {o['alpha_on']}, expected a number in (0, 1)")
        elif o["eta"] * o["alpha_on"] > 1.0 - o["alpha_on"]:
            bad.append(f"eta = {o['eta']}, expected eta <= (1 - alpha_on) / alpha_on = "
                       f"{(1.0 - o['alpha_on']) / o['alpha_on']:g} (the loop's unmask "
                       "probability must stay <= 1)")
    return bad
