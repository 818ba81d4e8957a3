"""One training loop for binary and soft-masked (two-pass) masked diffusion, single process or DDP.

A step: batch -> t -> x_t -> [pass 1 under no_grad -> SoftMask] -> pass 2 -> 1/t-weighted loss ->
optimizer step -> EMA. With probability p_sm a step is soft-masked (the same choice on every rank,
drawn from the step's seed), otherwise it is a plain MDLM step. The omega parameters sit in their
own AdamW group with their own learning rate; both groups follow the same warm-up/decay factor.

Everything random in a step is drawn from generators seeded by (seed, step, rank, micro-batch), and
the data loader's position is saved with the weights, so a run resumed from its last state ends
with exactly the weights of an uninterrupted run.

Not here: building the model, tokenizer or data (commands/pretrain.py), sampling, evaluation beyond
the validation ELBO, and anything about the command line (progress is reported through a callback).
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from smdlm_cli.core import checkpoint, diffusion
from smdlm_cli.core.config import SoftMaskConfig, TrainConfig
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.models import save_model
from smdlm_cli.core.softmask import SoftMask


# --- the model the optimizer sees ---------------------------------------------------------------
class TwoPass(nn.Module):
    """Backbone + SoftMask in one module, so DDP sees every parameter and both passes."""

    def __init__(self, backbone: nn.Module, softmask: SoftMask | None):
        super().__init__()
        self.backbone = backbone
        self.softmask = softmask

    def forward(self, xt: Tensor, use_sm: bool, attention_mask: Tensor | None = None) -> Tensor:
        if not use_sm:  # binary MDLM, or the AR baseline (xt is then x0)
            return self.backbone(input_ids=xt, attention_mask=attention_mask)
        # Pass 1 predicts p without a graph; its logits are constants for pass 2 (the paper's scheme).
        # SoftMask drops the [MASK] column itself, which gives the SUBS distribution the official
        # code feeds back at every masked position (the only ones soft-masked).
        with torch.no_grad():
            prev = self.backbone(input_ids=xt, attention_mask=attention_mask)
        embeds = self.softmask(xt, prev, self.backbone.embedding_weight(), self.backbone.mask_id)
        return self.backbone(inputs_embeds=embeds, attention_mask=attention_mask)


# --- distributed context ------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; NCCL on GPUs, gloo on CPU. Plain runs get world 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device == "auto":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if cuda else "cpu"
    elif device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device = {device!r}, but CUDA is not available here")
        torch.cuda.set_device(dev)
    return Dist(rank=rank, world=dist.get_world_size() if dist.is_initialized() else 1, device=dev)


@contextmanager
def distributed(device: str = "auto") -> Iterator[Dist]:
    """setup_distributed for the length of a command, then the process group is taken down.

    torch asks every process to destroy its group before it exits (with NCCL it warns of leaked
    resources otherwise). On success every rank first waits for the others; on an error there is no
    barrier, which could wait forever for a rank that has failed. A group the caller set up
    before is left to the caller.
    """
    existed = dist.is_initialized()
    ctx = setup_distributed(device)
    owned = dist.is_initialized() and not existed
    try:
        yield ctx
        if owned:
            dist.barrier()
    finally:
        if owned:
            dist.destroy_process_group()


def _all_reduce_sum(x: Tensor) -> Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# --- seeds, schedule, EMA -----------------------------------------------------------------------
def _seed(*parts: int) -> int:
    # A fixed mix of the parts (not Python's hash, which is salted per process).
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p + 0x632BE59BD9B4E019)) * 0xBF58476D1CE4E5B9 % (1 << 63)
    return h


def _generator(device: torch.device, *parts: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(*parts))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over cfg.warmup steps, then constant or cosine down to 0 at cfg.steps."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup) / span)))
    return 1.0


class EMA:
    """Exponential moving average of the backbone, with MDLM's warm-up: decay_n = min(d, (1+n)/(10+n))."""

    def __init__(self, params: dict[str, Tensor], decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, Tensor]) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [params[k].detach().float() for k in keys],
                             1 - d)
        self.updates += 1


@contextmanager
def ema_weights(backbone: nn.Module, ema: EMA | None) -> Iterator[None]:
    """Run the block with the EMA weights in `backbone` (the weights the paper evaluates), then restore."""
    if ema is None:
        yield
        return
    raw = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    backbone.load_state_dict({**raw, **{k: v.to(raw[k].dtype) for k, v in ema.shadow.items()}})
    try:
        yield
    finally:
        backbone.load_state_dict(raw)


# --- the loop -----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    step: int
    forwards: int
    first_val: dict | None
    last_val: dict | None


def _batch_layout(cfg: TrainConfig, world: int) -> tuple[int, int, int]:
    """(per-rank batch, micro-batch, accumulation steps), or a UserError naming the numbers."""
    if cfg.batch_size % world:
        raise UserError(f"train.batch_size = {cfg.batch_size} is not divisible by the {world} ranks")
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise UserError(f"train.micro_batch_size = {micro} does not divide the per-rank batch "
                        f"{per_rank} (train.batch_size {cfg.batch_size} over {world} ranks)")
    return per_rank, micro, per_rank // micro


def _autocast(device: torch.device, precision: str):
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def _noised(x0: Tensor, t: Tensor, mask_id: int, causal: bool, **noise) -> Tensor:
    """x_t of the diffusion models; the AR baseline reads x0 itself."""
    return x0 if causal else diffusion.q_xt(x0, t, mask_id, **noise)


def _nll(logits: Tensor, x0: Tensor, xt: Tensor, t: Tensor, mask_id: int, causal: bool) -> Tensor:
    """Per-position loss (B, L): the 1/t-weighted ELBO term, or the AR model's next-token NLL."""
    if causal:
        return diffusion.causal_nll(logits, x0)
    return diffusion.elbo_per_token(logits, x0, xt, t, mask_id)


def sft_noised(batch, t: Tensor, mask_id: int, g: torch.Generator) -> Tensor:
    """x_t of a fine-tuning batch: the SM paper's collator. Only `maskable` positions (never the
    prompt) are masked, each with p = (1 - 1e-3) t + 1e-3, and a row left without a mask gets its
    maskable position of lowest noise masked, so every row teaches something."""
    x0, maskable = batch.input_ids, batch.maskable
    u = torch.rand(x0.shape, generator=g, device=x0.device)
    is_mask = (u < (1 - 1e-3) * t + 1e-3) & maskable
    first = torch.where(maskable, u, 2.0).argmin(-1, keepdim=True)
    forced = torch.zeros_like(is_mask).scatter_(1, first, True) & maskable
    is_mask |= forced & ~is_mask.any(-1, keepdim=True)
    return torch.where(is_mask, torch.full_like(x0, mask_id), x0)


def sft_loss(logits: Tensor, x0: Tensor, xt: Tensor, t: Tensor, mask_id: int) -> tuple[Tensor, Tensor]:
    """(loss, summed nll): (1/t) times the mean CE over the batch's masked tokens, as the paper."""
    nll = diffusion.masked_nll(logits, x0, xt, mask_id).sum()
    return nll / (xt == mask_id).sum().clamp_min(1) / t, nll


def _sft_time(cfg: TrainConfig, g: torch.Generator, device: torch.device) -> Tensor:
    """One t ~ U(t_min, t_max) for the whole micro-batch."""
    return cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand((), generator=g, device=device)


@torch.no_grad()
def validation_sft(model: TwoPass, batches: list, use_sm: bool, seed: int, ctx: Dist,
                   precision: str, t_min: float, t_max: float) -> dict:
    """Fine-tuning validation with fixed times (evenly spread over [t_min, t_max]) and masks:
    val_nll = nats per masked response token, val_loss = the mean training objective."""
    was_training = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    mask_id = model.backbone.mask_id
    for i, batch in enumerate(batches):
        batch = batch.to(ctx.device)
        t = torch.tensor(t_min + (t_max - t_min) * (i + 0.5) / len(batches), device=ctx.device)
        xt = sft_noised(batch, t, mask_id, _generator(ctx.device, seed, 0x5EED, i, ctx.rank))
        with _autocast(ctx.device, precision):
            logits = model(xt, use_sm=use_sm, attention_mask=batch.attention_mask)
        loss, nll = sft_loss(logits, batch.input_ids, xt, t, mask_id)
        total += torch.stack([nll.double(), (xt == mask_id).sum().double(), loss.double()])
    _all_reduce_sum(total)
    model.train(was_training)
    nll = (total[0] / total[1]).item()
    return {"val_nll": nll, "val_ppl": math.exp(min(nll, 700.0)), "val_bpd": nll / math.log(2),
            "val_loss": (total[2] / (len(batches) * ctx.world)).item()}


@torch.no_grad()
def validation_elbo(model: TwoPass, batches: list[Tensor], use_sm: bool, seed: int,
                    ctx: Dist, precision: str, on_batch: Callable[[], None] | None = None) -> dict:
    """ELBO bound on fixed validation batches with fixed times and masks: nll, ppl, bpd (nats/token).

    SM models are scored two-pass, as trained: the feedback is a deterministic function of x_t, so
    this is still a valid bound. For the AR baseline it is the exact NLL, per token of the block.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    mask_id, causal = model.backbone.mask_id, getattr(model.backbone.config, "causal", False)
    for i, x0 in enumerate(batches):
        x0 = x0.to(ctx.device)
        g = _generator(ctx.device, seed, 0x5EED, i, ctx.rank)
        t = diffusion.sample_t(x0.shape[0], generator=g, device=ctx.device)
        xt = _noised(x0, t, mask_id, causal, generator=g)
        with _autocast(ctx.device, precision):
            logits = model(xt, use_sm=use_sm)
        total[0] += _nll(logits, x0, xt, t, mask_id, causal).sum().double()
        total[1] += x0.numel()
        if on_batch is not None:
            on_batch()
    _all_reduce_sum(total)
    model.train(was_training)
    nll = (total[0] / total[1]).item()
    return {"val_nll": nll, "val_ppl": math.exp(min(nll, 700.0)), "val_bpd": nll / math.log(2)}


def _param_groups(model: TwoPass, cfg: TrainConfig, sm_cfg: SoftMaskConfig) -> list[dict]:
    groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad],
               "lr": cfg.lr, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr}]
    if model.softmask is not None:
        groups.append({"params": list(model.softmask.parameters()), "lr": sm_cfg.lr,
                       "weight_decay": 0.0, "base_lr": sm_cfg.lr})
    return groups


def fit(backbone: nn.Module, softmask: SoftMask | None, cfg: TrainConfig, sm_cfg: SoftMaskConfig,
        loader, valid_batches: list, run_dir: Path, ctx: Dist, resume: bool = False,
        on_step: Callable[[dict], None] | None = None, objective: str = "elbo",
        publish: Callable[[nn.Module, Path], None] = save_model) -> TrainResult:
    """Train `backbone` (+ `softmask`) for cfg.steps optimizer steps, saving into `run_dir`.

    `loader` yields per-rank batches and has state_dict / load_state_dict: (B, L) ids for the
    "elbo" objective (pretraining), SFTBatch for "sft" (fine-tuning: prompt never masked, one t per
    micro-batch in [t_min, t_max], (1/t)-weighted mean CE). `on_step` gets every metrics record
    (rank 0 only). Each save writes the resumable state (trainable parameters only, so a frozen
    7B base is never copied), then `publish`es the weights (EMA ones if any) and softmask.json.
    Only parameters with requires_grad are trained (a PEFT-wrapped backbone trains its adapters).
    """
    per_rank, micro, accum = _batch_layout(cfg, ctx.world)
    if ctx.main:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    use_sm_ever = softmask is not None and sm_cfg.prob > 0
    model = TwoPass(backbone, softmask if use_sm_ever else None).to(ctx.device)
    model.train()
    backbone.gradient_checkpointing = cfg.grad_checkpointing
    opt = torch.optim.AdamW(_param_groups(model, cfg, sm_cfg), betas=tuple(cfg.betas), eps=1e-8)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    ema = (EMA({k: p for k, p in backbone.named_parameters() if p.requires_grad}, cfg.ema)
           if cfg.ema > 0 else None)
    sft = objective == "sft"

    step, forwards, tokens = 0, 0, 0
    first_val = last_val = None
    last_eval = -1
    if resume:
        state_dir = checkpoint.latest_state(run_dir)
        if state_dir is None:
            raise UserError(f"--resume: {run_dir} has no saved training state")
        st = checkpoint.load_state(state_dir, ctx.device)
        result = model.load_state_dict(st["weights"], strict=False)
        missing = sorted(trainable & set(result.missing_keys))
        if missing or result.unexpected_keys:
            raise UserError(f"--resume: {state_dir} does not hold this model's trainable weights "
                            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        opt.load_state_dict(st["optimizer"])
        if ema is not None:
            if st["ema"] is None:
                raise UserError(f"--resume: {state_dir} has no EMA weights but train.ema = {cfg.ema}")
            ema.shadow = {k: v.float() for k, v in st["ema"].items()}
            ema.updates = st["trainer"]["ema_updates"]
        tr = st["trainer"]
        step, forwards, tokens = tr["step"], tr["forwards"], tr["tokens"]
        first_val = tr.get("first_val")
        loader.load_state_dict(tr["loader"])
        if ctx.main:
            checkpoint.truncate_metrics(run_dir, step)

    ddp = model
    if ctx.world > 1:
        # Binary steps leave the omega parameters without gradients, so DDP must look for them.
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=use_sm_ever and sm_cfg.prob < 1)
    mask_id, causal = backbone.mask_id, getattr(backbone.config, "causal", False)
    length = backbone.config.model_length

    def save():
        if ctx.main:
            weights = {k: v for k, v in model.state_dict().items() if k in trainable}
            trainer_state = {"forwards": forwards, "tokens": tokens, "loader": loader.state_dict(),
                             "ema_updates": ema.updates if ema else 0, "first_val": first_val}
            checkpoint.save_state(run_dir, step, weights, opt, ema.shadow if ema else None,
                                  trainer_state)
            with ema_weights(backbone, ema):
                publish(backbone, run_dir)
            if use_sm_ever:
                checkpoint.save_softmask(run_dir, softmask)
        if dist.is_initialized():
            dist.barrier()

    def evaluate() -> dict:
        with ema_weights(backbone, ema):
            if sft:
                return validation_sft(model, valid_batches, use_sm_ever, cfg.seed, ctx,
                                      cfg.precision, cfg.t_min, cfg.t_max)
            return validation_elbo(model, valid_batches, use_sm_ever, cfg.seed, ctx, cfg.precision)

    def emit(record: dict) -> None:
        if ctx.main:
            checkpoint.append_metrics(run_dir, record)
            if on_step is not None:
                on_step(record)

    if step == 0:
        first_val, last_eval = evaluate(), 0
        emit({"step": 0, "forwards": 0, **first_val})
    t0, tokens0 = time.perf_counter(), tokens
    while step < cfg.steps and not (cfg.max_forward_passes and forwards >= cfg.max_forward_passes):
        factor = lr_factor(step, cfg)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * factor
        coin = torch.rand(1, generator=_generator(torch.device("cpu"), cfg.seed, step)).item()
        use_sm = use_sm_ever and coin < sm_cfg.prob
        torch.manual_seed(_seed(cfg.seed, step, ctx.rank, 1))  # dropout: per step, so resumable
        # Times and mask noise are drawn for the whole global batch and sliced by the loader's
        # layout (row j of micro-batch m on rank r is global row m*micro*W + j*W + r), so the
        # samples do not depend on how the batch is split over ranks and accumulation steps.
        if not sft:  # fine-tuning batches draw their own noise (their length varies)
            g = _generator(ctx.device, cfg.seed, step, 2)
            times = diffusion.sample_t(cfg.batch_size, cfg.t_min, cfg.t_max, cfg.antithetic,
                                       generator=g, device=ctx.device)
            times = times[torch.randperm(cfg.batch_size, generator=g, device=ctx.device)]
            noise = torch.rand(cfg.batch_size, length, generator=g, device=ctx.device)
            times = times.view(accum, micro, ctx.world)
            noise = noise.view(accum, micro, ctx.world, length)
        loss_sum = torch.zeros((), device=ctx.device)
        for m in range(accum):
            batch, attention = loader.next_batch().to(ctx.device), None
            if sft:
                g_m = _generator(ctx.device, cfg.seed, step, 3, m, ctx.rank)
                t = _sft_time(cfg, g_m, ctx.device)
                x0, attention = batch.input_ids, batch.attention_mask
                xt = sft_noised(batch, t, mask_id, g_m)
            else:
                x0, t = batch, times[m, :, ctx.rank]
                xt = _noised(x0, t, mask_id, causal, u=noise[m, :, ctx.rank])
            sync = ddp.no_sync() if (ctx.world > 1 and m < accum - 1) else nullcontext()
            with sync:
                with _autocast(ctx.device, cfg.precision):
                    logits = ddp(xt, use_sm, attention)
                if sft:
                    loss = sft_loss(logits, x0, xt, t, mask_id)[0] / accum
                else:
                    loss = _nll(logits, x0, xt, t, mask_id, causal).sum() / (per_rank * length)
                loss.backward()
            loss_sum += loss.detach()
            tokens += x0.numel() * ctx.world
        grad_norm = (nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0
                     else None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(dict(backbone.named_parameters()))
        step += 1
        forwards += accum * (2 if use_sm else 1)

        if step % cfg.log_every == 0 or step == cfg.steps:
            loss_all = _all_reduce_sum(loss_sum.clone()) / ctx.world
            elapsed = time.perf_counter() - t0
            record = {"step": step, "loss": loss_all.item(), "lr": cfg.lr * factor, "sm": use_sm,
                      "forwards": forwards, "tokens": tokens,
                      "tokens_per_s": (tokens - tokens0) / max(elapsed, 1e-9)}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm.item()
            if use_sm_ever:
                record.update(scale=softmask.scale.item(), centre=softmask.centre.item(),
                              steepness=softmask.steepness.item())
            emit(record)
        if step % cfg.eval_every == 0:
            last_val, last_eval = evaluate(), step
            emit({"step": step, "forwards": forwards, **last_val})
        if step % cfg.save_every == 0:
            save()
    # The run may end off the eval/save grid (steps, or the forward-pass budget): finish both.
    if last_eval != step:
        last_val = evaluate()
        emit({"step": step, "forwards": forwards, **last_val})
    if step % cfg.save_every != 0 or step == 0:
        save()
    _check_ranks_agree(model, ctx)
    return TrainResult(step=step, forwards=forwards, first_val=first_val, last_val=last_val)


def _check_ranks_agree(model: nn.Module, ctx: Dist) -> None:
    """DDP keeps replicas identical; a cheap checksum comparison catches it if anything broke that."""
    if ctx.world == 1:
        return
    local = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().view(1)
    gathered = [torch.zeros_like(local) for _ in range(ctx.world)]
    dist.all_gather(gathered, local)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"ranks hold different weights after training: {[g.item() for g in gathered]}")
