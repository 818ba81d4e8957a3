"""What a training step optimises: noise, loss and validation of the three objectives.

- `Diffusion` (pretraining an MDLM): t per row, x_t ~ q(x_t | x_0), the 1/t-weighted ELBO term per
  token, averaged over the block. Times and mask noise are drawn for the whole global batch and
  sliced by the loader's layout (row j of micro-batch m on rank r is global row m*micro*W + j*W + r),
  so a step's samples do not depend on how the batch is split over ranks and accumulation steps.
- `Autoregressive` (the AR baseline): x_t is x_0, the loss is the next-token NLL.
- `SFT` (fine-tuning, the SM paper's objective): one t ~ U(t_min, t_max) per micro-batch, only the
  response is masked (never the prompt), with probability (1 - eps) t + eps, and the mean CE over
  the masked tokens is weighted by 1/t.

Each offers the same calls: `begin_step` (draw the step's noise), `micro` (noise one
micro-batch), `loss` (its share of the step's loss) and, for validation, `validation_input` /
`terms`. `validate` runs any of them on fixed batches with fixed times and masks. Validation
batches are global (the same for any number of ranks): a batch's times and masks are drawn for
all its rows, then each rank scores its rows r::W, so the validation numbers do not depend on the
number of ranks.

Not here: the loop and the optimizer (trainer.py), the forward of the two passes (twopass.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from smdlm_cli.core import diffusion, sharding
from smdlm_cli.core.config import TrainConfig
from smdlm_cli.core.distributed import BatchLayout, Dist, all_reduce_sum
from smdlm_cli.core.seeding import generator
from smdlm_cli.core.twopass import TwoPass, autocast

VALIDATION = 0x5EED  # a seed part that training steps never use


@dataclass
class Noised:
    x0: Tensor
    xt: Tensor
    t: Tensor
    attention: Tensor | None = None

    def shard(self, rank: int, world: int) -> "Noised":
        """This rank's rows r::W of a global batch (t too when it has one value per row)."""
        if world == 1:
            return self
        rows = slice(rank, None, world)
        return Noised(self.x0[rows], self.xt[rows], self.t[rows] if self.t.dim() else self.t,
                      None if self.attention is None else self.attention[rows])


class Diffusion:
    """The MDLM ELBO on packed blocks (B, L). With `prompt` P > 0 the first P tokens of every block
    are a condition (a Sudoku's [BOS] + givens): never masked, and the ELBO is per token of the
    rest, the part a model generates."""

    def __init__(self, cfg: TrainConfig, layout: BatchLayout, ctx: Dist, mask_id: int, length: int,
                 prompt: int = 0):
        self.cfg, self.layout, self.ctx = cfg, layout, ctx
        self.mask_id, self.length, self.prompt = mask_id, length, prompt
        self.times = self.noise = None

    def _q_xt(self, x0: Tensor, t: Tensor, **noise) -> Tensor:
        maskable = None
        if self.prompt:
            maskable = (torch.arange(x0.shape[1], device=x0.device) >= self.prompt).expand_as(x0)
        return diffusion.q_xt(x0, t, self.mask_id, maskable=maskable, **noise)

    def begin_step(self, step: int) -> None:
        cfg, lay, dev = self.cfg, self.layout, self.ctx.device
        g = generator(dev, cfg.seed, step, 2)
        times = diffusion.sample_t(cfg.batch_size, cfg.t_min, cfg.t_max, cfg.antithetic,
                                   generator=g, device=dev)
        times = times[torch.randperm(cfg.batch_size, generator=g, device=dev)]
        noise = torch.rand(cfg.batch_size, self.length, generator=g, device=dev)
        self.times = times.view(lay.accum, lay.micro, lay.world)
        self.noise = noise.view(lay.accum, lay.micro, lay.world, self.length)

    def micro(self, batch: Tensor, step: int, m: int) -> Noised:
        r = self.ctx.rank
        t = self.times[m, :, r]
        return Noised(batch, self._q_xt(batch, t, u=self.noise[m, :, r]), t)

    def targets(self, n: Noised) -> dict:
        """What the model needs to return the masked NLL itself (logits only at the masks)."""
        return {"nll_of": n.x0}

    def nll(self, logits: Tensor, n: Noised) -> Tensor:
        return masked(logits, n, self.mask_id) * diffusion.loss_weight(n.t).unsqueeze(-1)

    def loss(self, logits: Tensor, n: Noised) -> Tensor:
        return self.nll(logits, n).sum() / (self.layout.per_rank * (self.length - self.prompt))

    def validation_input(self, batch: Tensor, i: int, n_batches: int, seed: int) -> Noised:
        """Global batch i with its fixed times and masks (rank 0's seed, as a single process)."""
        g = generator(self.ctx.device, seed, VALIDATION, i, 0)
        t = diffusion.sample_t(batch.shape[0], generator=g, device=self.ctx.device)
        return Noised(batch, self._q_xt(batch, t, generator=g), t)

    def terms(self, logits: Tensor, n: Noised) -> Tensor:
        """(summed nll, tokens it is over) of this rank's rows of one validation batch."""
        nll = self.nll(logits, n).sum()
        scored = n.x0.shape[0] * (n.x0.shape[1] - self.prompt)
        return torch.stack([nll.double(), torch.tensor(scored, dtype=torch.float64, device=nll.device)])


class Autoregressive(Diffusion):
    """The AR baseline on the same blocks: x_t = x_0; the exact NLL per token of the block."""

    def begin_step(self, step: int) -> None:
        pass

    def targets(self, n: Noised) -> dict:
        return {}  # every row is scored: the next-token loss reads the full logits

    def micro(self, batch: Tensor, step: int, m: int) -> Noised:
        return Noised(batch, batch, torch.ones(batch.shape[0], device=batch.device))

    def nll(self, logits: Tensor, n: Noised) -> Tensor:
        return diffusion.causal_nll(logits, n.x0)

    def validation_input(self, batch: Tensor, i: int, n_batches: int, seed: int) -> Noised:
        return self.micro(batch, 0, i)


def sft_noised(batch, t: Tensor, mask_id: int, g: torch.Generator) -> Tensor:
    """x_t of a fine-tuning batch, as the SM paper's collator: only `maskable` positions (never the
    prompt) are masked, each with p = (1 - eps) t + eps, and a row left without a mask gets its
    maskable position of lowest noise masked, so every row teaches something."""
    x0, maskable = batch.input_ids, batch.maskable
    u = torch.rand(x0.shape, generator=g, device=x0.device)
    xt = diffusion.q_xt(x0, t, mask_id, maskable=maskable, u=u, floor=diffusion.EPS)
    is_mask = xt == mask_id
    first = torch.where(maskable, u, 2.0).argmin(-1, keepdim=True)
    forced = torch.zeros_like(is_mask).scatter_(1, first, True) & maskable & ~is_mask.any(-1, keepdim=True)
    return torch.where(forced, torch.full_like(x0, mask_id), xt)


def masked(out: Tensor, n: Noised, mask_id: int, keep_mask: bool = False) -> Tensor:
    """-log p(x_0 | x_t) (B, L), 0 at unmasked positions: `out` is either the model's logits
    (B, L, V) or that map already, computed by the model at the masked rows only (nll_of)."""
    if out.dim() == n.xt.dim():
        return out
    return diffusion.masked_nll(out, n.x0, n.xt, mask_id, keep_mask)


def sft_loss(logits: Tensor, x0: Tensor, xt: Tensor, t: Tensor, mask_id: int,
             keep_mask: bool = False) -> tuple[Tensor, Tensor]:
    """(loss, summed nll): (1/t) times the mean CE over the batch's masked tokens, as the paper;
    a full-vocabulary CE with keep_mask (the official Dream fine-tuning's HF loss). `logits` may
    be the masked NLL map the model computed (see `masked`)."""
    nll = masked(logits, Noised(x0, xt, t), mask_id, keep_mask).sum()
    return nll / (xt == mask_id).sum().clamp_min(1) / t, nll


class SFT:
    """The fine-tuning objective on SFTBatch (input_ids, attention_mask, maskable)."""

    def __init__(self, cfg: TrainConfig, layout: BatchLayout, ctx: Dist, mask_id: int, length: int,
                 keep_mask: bool = False, sum_micro_batches: bool = False,
                 validation_sm_share: float = 1.0):
        self.cfg, self.layout, self.ctx, self.mask_id = cfg, layout, ctx, mask_id
        self.keep_mask = keep_mask  # the backbone's mask_logit is "keep" (Dream)
        # the official HF Trainer's effective scaling: micro-batch losses summed, not averaged
        self.sum_micro_batches = sum_micro_batches
        # share of the validation batches soft-masked (seeded per batch), 1 = all of them
        self.validation_sm_share = validation_sm_share

    def begin_step(self, step: int) -> None:
        pass  # each micro-batch draws its own noise: their lengths differ

    def micro(self, batch, step: int, m: int) -> Noised:
        g = generator(self.ctx.device, self.cfg.seed, step, 3, m, self.ctx.rank)
        cfg = self.cfg
        t = cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand((), generator=g, device=self.ctx.device)
        return Noised(batch.input_ids, sft_noised(batch, t, self.mask_id, g), t, batch.attention_mask)

    def targets(self, n: Noised) -> dict:
        return {"nll_of": n.x0, "keep_mask": self.keep_mask}

    def loss(self, logits: Tensor, n: Noised) -> Tensor:
        loss = sft_loss(logits, n.x0, n.xt, n.t, self.mask_id, self.keep_mask)[0]
        return loss if self.sum_micro_batches else loss / self.layout.accum

    def validation_input(self, batch, i: int, n_batches: int, seed: int) -> Noised:
        cfg = self.cfg  # fixed times, evenly spread over [t_min, t_max]
        t = torch.tensor(cfg.t_min + (cfg.t_max - cfg.t_min) * (i + 0.5) / n_batches,
                         device=self.ctx.device)
        g = generator(self.ctx.device, seed, VALIDATION, i, 0)
        return Noised(batch.input_ids, sft_noised(batch, t, self.mask_id, g), t, batch.attention_mask)

    def terms(self, logits: Tensor, n: Noised) -> Tensor:
        nll = masked(logits, n, self.mask_id, self.keep_mask).sum()
        return torch.stack([nll.double(), (n.xt == self.mask_id).sum().double()])


OBJECTIVES = {"elbo": Diffusion, "ar": Autoregressive, "sft": SFT}


def build(name: str, cfg: TrainConfig, layout: BatchLayout, ctx: Dist, backbone,
          options: dict | None = None) -> Diffusion | SFT:
    """The objective `name` for this backbone; "elbo" means the AR loss for a causal model.
    `options`: keyword arguments of the SFT objective (sum_micro_batches, validation_sm_share), or
    of the ELBO (prompt)."""
    if name == "elbo" and getattr(backbone.config, "causal", False):
        name = "ar"
    if name == "sft":
        return SFT(cfg, layout, ctx, backbone.mask_id, backbone.config.model_length,
                   diffusion.keeps_mask(backbone), **(options or {}))
    return OBJECTIVES[name](cfg, layout, ctx, backbone.mask_id, backbone.config.model_length,
                            **(options or {}))


@torch.no_grad()
def validate(model: TwoPass, objective, batches: list, use_sm: bool, seed: int, precision: str,
             on_batch: Callable[[], None] | None = None) -> dict:
    """The objective on fixed validation batches with fixed times and masks, summed over ranks.

    val_nll is nats per scored token: per token of the block for the ELBO (a bound; SM models are
    scored two-pass, as trained, and the feedback is a deterministic function of x_t, so it stays
    a bound) and the exact NLL for the AR baseline; per masked response token for SFT, which also
    reports val_loss, the mean training objective.
    """
    ctx = objective.ctx
    was_training = model.training
    model.eval()
    per_batch = torch.zeros(len(batches), 2, dtype=torch.float64, device=ctx.device)
    times = []
    try:
        share = getattr(objective, "validation_sm_share", 1.0)
        for i, batch in enumerate(batches):
            n = objective.validation_input(batch.to(ctx.device), i, len(batches), seed)
            times.append(n.t)
            whole, n = n, n.shard(ctx.rank, ctx.world)
            # the official validation soft-masks a seeded share of the batches: batch i's coin
            # is the same on every rank and in every validation of the run
            coin = torch.rand((), generator=generator(torch.device("cpu"), seed, VALIDATION, i, 1))
            sm_i = use_sm and (share >= 1.0 or coin.item() < share)
            if n.x0.shape[0]:  # a short last batch may leave a rank without rows
                with autocast(ctx.device, precision):
                    logits = model(n.xt, use_sm=sm_i, attention_mask=n.attention,
                                   **objective.targets(n))
                per_batch[i] = objective.terms(logits, n)
            elif sharding.is_sharded(model):  # FSDP gathers each block's weights with every
                # rank: this rank runs the forward the others run, on one row it then ignores
                one = None if whole.attention is None else whole.attention[:1]
                with autocast(ctx.device, precision):
                    model(whole.xt[:1], use_sm=sm_i, attention_mask=one)
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    all_reduce_sum(per_batch)
    nll = (per_batch[:, 0].sum() / per_batch[:, 1].sum()).item()
    out = {"val_nll": nll, "val_ppl": math.exp(min(nll, 700.0)), "val_bpd": nll / math.log(2)}
    if isinstance(objective, SFT):  # the training objective: (1/t) x mean CE of each batch
        t = torch.stack([x.double() for x in times])
        out["val_loss"] = (per_batch[:, 0] / per_batch[:, 1].clamp_min(1) / t).mean().item()
    return out
