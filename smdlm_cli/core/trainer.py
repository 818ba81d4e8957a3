"""One training loop for binary and soft-masked (two-pass) masked diffusion, single process or DDP.

A step: for each micro-batch, the objective noises it (objectives.py), the model runs one pass or
two (twopass.py), the objective gives its share of the loss; then clip, optimizer step, EMA. With
probability p_sm a step is soft-masked (the same choice on every rank, drawn from the step's seed),
otherwise it is a plain step. The omega parameters sit in their own AdamW group with their own
learning rate; both groups follow the same warm-up/decay factor.

Everything random in a step is drawn from generators seeded by (seed, step, rank, micro-batch), and
the data loader's position is saved with the weights, so a run resumed from its last state ends
with exactly the weights of an uninterrupted run.

Not here: building the model, tokenizer or data (commands/), the objectives, the distributed
runtime (distributed.py), and anything about the command line (progress goes through a callback).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from smdlm_cli.core import checkpoint, compiling, objectives, sharding, validate
from smdlm_cli.core.config import SoftMaskConfig, TrainConfig
from smdlm_cli.core.distributed import Dist, all_reduce_sum, barrier, batch_layout, check_ranks_agree
from smdlm_cli.core.ema import EMA, ema_weights
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.models import save_model
from smdlm_cli.core.seeding import generator, mix
from smdlm_cli.core.softmask import SoftMask
from smdlm_cli.core.twopass import TwoPass, autocast


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over cfg.warmup steps, then constant or cosine down to 0 at cfg.steps."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / span)))
    return 1.0


@dataclass
class TrainResult:
    step: int
    forwards: int
    first_val: dict | None
    last_val: dict | None
    sm_steps: int = 0


@dataclass
class Counters:
    """What the loop counts; saved with every state so a resumed run continues the counts."""
    step: int = 0
    forwards: int = 0
    tokens: int = 0
    sm_steps: int = 0
    first_val: dict | None = None
    last_val: dict | None = None
    last_eval: int = -1
    best_val: float | None = None  # the lowest validation loss after step 0 (with on_best)


class _Run:
    """The pieces of one fit: model, optimizer, EMA, objective, and how to save, validate, log."""

    def __init__(self, backbone, softmask, cfg, sm_cfg, loader, valid, run_dir, ctx, objective,
                 on_step, publish, objective_options=None, on_best=None):
        self.cfg, self.sm_cfg, self.ctx, self.run_dir = cfg, sm_cfg, ctx, Path(run_dir)
        self.loader, self.valid, self.on_step, self.publish = loader, valid, on_step, publish
        self.on_best = on_best
        self.layout = batch_layout(cfg, ctx.world)
        self.use_sm_ever = softmask is not None and sm_cfg.prob > 0
        self.backbone, self.softmask = backbone, softmask
        self.model = TwoPass(backbone, softmask if self.use_sm_ever else None).to(ctx.device)
        self.model.train()
        backbone.gradient_checkpointing = cfg.grad_checkpointing
        # FSDP replaces the parameters by their shards: before the optimizer and EMA see them.
        self.fsdp = cfg.strategy == "fsdp" and ctx.world > 1
        self.skeleton = sharding.skeleton(backbone) if self.fsdp else None
        if cfg.compile:
            compiling.compile_blocks(backbone)
        if self.fsdp:
            sharding.shard(self.model, ctx, cfg)
        self.opt = torch.optim.AdamW(self._param_groups(), betas=tuple(cfg.betas), eps=1e-8)
        self.trainable = {k for k, p in self.model.named_parameters() if p.requires_grad}
        self.ema = (EMA({k: p for k, p in backbone.named_parameters() if p.requires_grad}, cfg.ema)
                    if cfg.ema > 0 else None)
        self.objective = objectives.build(objective, cfg, self.layout, ctx, backbone,
                                          objective_options)
        self.n = Counters()
        self.ddp = self.model
        self.sm_params = list(self.model.softmask.parameters()) if self.model.softmask else []

    def _param_groups(self) -> list[dict]:
        cfg = self.cfg
        groups = [{"params": [p for p in self.model.backbone.parameters() if p.requires_grad],
                   "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr}]
        if self.model.softmask is not None:
            groups.append({"params": list(self.model.softmask.parameters()), "lr": self.sm_cfg.lr,
                           "weight_decay": 0.0, "base_lr": self.sm_cfg.lr})
        return groups

    def restore(self) -> None:
        state_dir = checkpoint.latest_state(self.run_dir)
        if state_dir is None:
            raise UserError(f"--resume: {self.run_dir} has no saved training state")
        shards = validate.read_json(state_dir / "trainer.json").get("shards")
        if shards != (self.ctx.world if self.fsdp else None):
            saved = f"as {shards} FSDP shards" if shards else "unsharded"
            raise UserError(f"--resume: {state_dir} was saved {saved}; resume it with the "
                            f"strategy and number of processes it was saved with")
        st = checkpoint.load_state(state_dir, self.ctx.device,
                                   self.ctx.rank if self.fsdp else None)
        sharding.settle(self.model)
        if self.fsdp:  # the files hold local shards: lay them out as the parameters are
            st["weights"] = sharding.like(st["weights"], self.model.state_dict())
            st["optimizer"] = sharding.optimizer_like(st["optimizer"], self.opt)
            if st["ema"] is not None and self.ema is not None:
                st["ema"] = sharding.like(st["ema"], self.ema.shadow)
        result = self.model.load_state_dict(st["weights"], strict=False)
        missing = sorted(self.trainable & set(result.missing_keys))
        if missing or result.unexpected_keys:
            raise UserError(f"--resume: {state_dir} does not hold this model's trainable weights "
                            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        try:
            self.opt.load_state_dict(st["optimizer"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"--resume: {state_dir}: the optimizer state does not fit this model "
                            f"({e})") from None
        tr = st["trainer"]
        if self.ema is not None:
            if st["ema"] is None:
                raise UserError(f"--resume: {state_dir} has no EMA weights but train.ema = {self.cfg.ema}")
            self.ema.shadow = {k: v.float() for k, v in st["ema"].items()}
            self.ema.updates = tr["ema_updates"]
        self.n = Counters(step=tr["step"], forwards=tr["forwards"], tokens=tr["tokens"],
                          sm_steps=tr.get("sm_steps", 0), first_val=tr.get("first_val"),
                          best_val=tr.get("best_val"))
        try:
            self.loader.load_state_dict(tr["loader"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"--resume: {state_dir / 'trainer.json'}: loader position {e} is not "
                            f"this data's; expected the file a save writes") from None
        if self.ctx.main:
            checkpoint.truncate_metrics(self.run_dir, self.n.step)
        if not checkpoint.is_committed(self.run_dir, state_dir):
            self.publish_state(state_dir)  # the last process was killed before publishing it
        barrier()

    def wrap(self) -> None:
        if self.ctx.world > 1 and not self.fsdp:
            # Binary steps leave the omega parameters without gradients, so DDP must look for them.
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None,
                find_unused_parameters=self.use_sm_ever and self.sm_cfg.prob < 1)

    def save(self) -> None:
        n, ctx = self.n, self.ctx
        sharding.settle(self.model)
        weights = {k: v for k, v in self.model.state_dict().items() if k in self.trainable}
        state = {"forwards": n.forwards, "tokens": n.tokens, "sm_steps": n.sm_steps,
                 "loader": self.loader.state_dict(), "layout": self.layout.as_dict(),
                 "ema_updates": self.ema.updates if self.ema else 0, "first_val": n.first_val,
                 "best_val": n.best_val}
        ema = self.ema.shadow if self.ema else None
        # State, then the model, then the pointer: killed anywhere, the run resumes from its
        # newest complete state, and once a save has completed there is a model to sample.
        if self.fsdp:  # every rank writes its shards; trainer.json once all have
            state_dir = checkpoint.state_path(self.run_dir, n.step)
            if ctx.main:
                checkpoint.clear_state(state_dir)
            barrier()
            meta = checkpoint.save_tensors(state_dir, weights, self.opt, ema, shard=ctx.rank)
            barrier()
            if ctx.main:
                checkpoint.seal_state(state_dir, n.step, meta, {**state, "shards": ctx.world})
            self.publish_state(state_dir)
        elif ctx.main:
            self.publish_state(checkpoint.save_state(self.run_dir, n.step, weights, self.opt,
                                                     ema, state))
        barrier()

    def publish_state(self, state_dir: Path) -> None:
        """Publish the (EMA) model and ω, then commit `state_dir`. Under FSDP every rank calls it
        (the weights are gathered to rank 0); otherwise rank 0 alone."""
        with self.published() as module:
            if self.ctx.main:
                self.publish(module, self.run_dir)
        if self.ctx.main:
            if self.use_sm_ever:
                checkpoint.save_softmask(self.run_dir, self.softmask)
            checkpoint.commit_state(self.run_dir, state_dir)

    @contextmanager
    def published(self):
        """The backbone with its EMA weights in place, whole: the backbone itself, or under FSDP
        the skeleton filled with the gathered weights on rank 0 (None on the other ranks)."""
        sharding.settle(self.model)
        with ema_weights(self.backbone, self.ema):
            if not self.fsdp:
                yield self.backbone
                return
            full = sharding.full_weights(self.backbone, self.ctx.main)
        yield sharding.filled(self.skeleton, full) if self.ctx.main else None

    def validate(self) -> None:
        sharding.settle(self.model)
        with ema_weights(self.backbone, self.ema):
            val = objectives.validate(self.model, self.objective, self.valid, self.use_sm_ever,
                                      self.cfg.seed, self.cfg.precision)
        n = self.n
        n.first_val = n.first_val or val
        n.last_val, n.last_eval = val, n.step
        self.emit({"step": n.step, "forwards": n.forwards, "sm_steps": n.sm_steps,
                   "tokens": n.tokens, **val})
        loss = val.get("val_loss", val["val_nll"])
        if self.on_best is not None and n.step > 0 and (n.best_val is None or loss < n.best_val):
            n.best_val = loss  # the official load_best_model_at_end: lowest eval loss wins
            with self.published() as module:
                if self.ctx.main:
                    self.on_best(module, self.softmask if self.use_sm_ever else None)
            barrier()

    def emit(self, record: dict) -> None:
        if self.ctx.main:
            checkpoint.append_metrics(self.run_dir, record)
            if self.on_step is not None:
                self.on_step(record)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor | None, bool, float]:
        """One optimizer step: (summed micro-batch losses, grad norm or None, SM?, lr factor)."""
        cfg, ctx, n, lay = self.cfg, self.ctx, self.n, self.layout
        factor = lr_factor(n.step, cfg)
        for group in self.opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        coin = torch.rand(1, generator=generator(torch.device("cpu"), cfg.seed, n.step)).item()
        use_sm = self.use_sm_ever and coin < self.sm_cfg.prob
        torch.manual_seed(mix(cfg.seed, n.step, ctx.rank, 1))  # dropout: per step, so resumable
        self.objective.begin_step(n.step)
        loss_sum = torch.zeros((), device=ctx.device)
        for m in range(lay.accum):
            noised = self.objective.micro(self.loader.next_batch().to(ctx.device), n.step, m)
            last = m == lay.accum - 1
            if self.fsdp:  # reduce-scatter the gradients once, after the last micro-batch
                self.model.set_requires_gradient_sync(last)
            sync = self.ddp.no_sync() if (ctx.world > 1 and not last and not self.fsdp) \
                else nullcontext()
            with sync:
                with autocast(ctx.device, cfg.precision):
                    logits = self.ddp(noised.xt, use_sm, noised.attention,
                                      **self.objective.targets(noised))
                loss = self.objective.loss(logits, noised)
                loss.backward()
            loss_sum += loss.detach()
            n.tokens += noised.x0.numel() * ctx.world
        if self.fsdp:
            sharding.average_replicated(self.sm_params, ctx.world)
            grad_norm = (sharding.clip_grad_norm(list(self.model.parameters()), cfg.grad_clip,
                                                 ctx.device) if cfg.grad_clip > 0 else None)
        else:
            grad_norm = (nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                         if cfg.grad_clip > 0 else None)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(dict(self.backbone.named_parameters()))
        n.step += 1
        n.forwards += lay.accum * (2 if use_sm else 1)
        n.sm_steps += use_sm
        return loss_sum, grad_norm, use_sm, factor

    def log(self, loss_sum, grad_norm, use_sm: bool, factor: float, rate: float) -> None:
        n = self.n
        record = {"step": n.step, "loss": (all_reduce_sum(loss_sum.clone()) / self.ctx.world).item(),
                  "lr": self.cfg.lr * factor, "sm": use_sm, "sm_steps": n.sm_steps,
                  "forwards": n.forwards, "tokens": n.tokens, "tokens_per_s": rate}
        if grad_norm is not None:
            record["grad_norm"] = grad_norm.item()
        if self.use_sm_ever:
            sm = self.softmask
            record.update(scale=sm.scale.item(), centre=sm.centre.item(), steepness=sm.steepness.item())
        self.emit(record)


def fit(backbone: nn.Module, softmask: SoftMask | None, cfg: TrainConfig, sm_cfg: SoftMaskConfig,
        loader, valid_batches: list, run_dir: Path, ctx: Dist, resume: bool = False,
        on_step: Callable[[dict], None] | None = None, objective: str = "elbo",
        publish: Callable[[nn.Module, Path], None] = save_model,
        objective_options: dict | None = None,
        on_best: Callable[[nn.Module, SoftMask | None], None] | None = None) -> TrainResult:
    """Train `backbone` (+ `softmask`) for cfg.steps optimizer steps, saving into `run_dir`.

    `loader` yields per-rank micro-batches and has state_dict / load_state_dict: (B, L) ids for the
    "elbo" objective (pretraining; a causal backbone gets the AR loss), SFTBatch for "sft"
    (fine-tuning). `on_step` gets every metrics record (rank 0 only). Each save writes the
    resumable state (trainable parameters only, so a frozen 7B base is never copied), then
    `publish`es the weights (EMA ones if any) and softmask.json. Only parameters with
    requires_grad are trained (a PEFT-wrapped backbone trains its adapters). `objective_options`
    go to objectives.build (the SFT objective's official gradient scaling and validation).
    `on_best(backbone, softmask)` runs on rank 0 (EMA weights in place) after every validation
    past step 0 whose loss is the lowest so far (resumes remember it).
    """
    run = _Run(backbone, softmask, cfg, sm_cfg, loader, valid_batches, run_dir, ctx, objective,
               on_step, publish, objective_options, on_best)
    if ctx.main:
        run.run_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        run.restore()
    run.wrap()
    n = run.n
    if n.step == 0:
        run.validate()
    t0, tokens0 = time.perf_counter(), n.tokens

    def done() -> bool:  # the step budget, or the forward-pass budget (iso-compute runs)
        return n.step >= cfg.steps or bool(cfg.max_forward_passes and n.forwards >= cfg.max_forward_passes)
    while not done():
        loss_sum, grad_norm, use_sm, factor = run.train_step()
        if n.step % cfg.log_every == 0 or done():  # the last step is always logged
            rate = (n.tokens - tokens0) / max(time.perf_counter() - t0, 1e-9)
            run.log(loss_sum, grad_norm, use_sm, factor, rate)
        if n.step % cfg.eval_every == 0:
            run.validate()
        if n.step % cfg.save_every == 0:
            run.save()
    # The run may end off the eval/save grid (steps, or the forward-pass budget): finish both.
    if n.last_eval != n.step:
        run.validate()
    if n.step % cfg.save_every != 0 or n.step == 0:
        run.save()
    # under FSDP each rank holds other shards: only the replicated SoftMask must agree
    check_ranks_agree(run.sm_params if run.fsdp else list(run.model.parameters()), ctx)
    return TrainResult(step=n.step, forwards=n.forwards, first_val=n.first_val,
                       last_val=n.last_val, sm_steps=n.sm_steps)
