"""FSDP2 for training (train.strategy = "fsdp"): what is sharded, with which policies, and the few
operations the trainer needs on sharded parameters.

Every transformer block (each element of the backbone's ModuleLists) is one FSDP unit; the TwoPass
root holds the rest (embeddings, head, norms). The SoftMask's three scalars are left unsharded
(ignored_params): they stay replicated as under DDP and their gradients are averaged here, so
reading ω (logs, softmask.json) is never a collective. A sharded parameter is a DTensor whose local
shard is all this rank stores; the EMA built over them is sharded the same way.

torch's FSDP modules are imported only when a run shards (they take over a second to import).
Not here: the loop (trainer.py), the files a save writes (checkpoint.py).
"""

from __future__ import annotations

import copy
import itertools
import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn

from smdlm_cli.core.config import TrainConfig
from smdlm_cli.core.distributed import Dist


def blocks(backbone: nn.Module) -> list[nn.Module]:
    """The transformer blocks: elements of the outermost ModuleLists (DiT's blocks, Dream's
    layers, LLaDA's blocks, under a PEFT wrapper too)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in backbone.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            found.extend(module)
            inside.update(id(m) for block in module for m in block.modules())
    return found


def skeleton(backbone: nn.Module) -> nn.Module:
    """A copy of `backbone` whose weights are on the meta device (no memory): what `filled`
    copies to publish gathered weights through the ordinary (unsharded) save functions."""
    memo = {}
    for t in itertools.chain(backbone.parameters(), backbone.buffers()):
        meta = t.detach().to("meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(backbone, memo)


def shard(model: nn.Module, ctx: Dist, cfg: TrainConfig) -> None:
    """fully_shard each block of model.backbone, then `model` (a TwoPass) itself, in place.

    On CUDA the weights are all-gathered in bf16 and gradients reduced in fp32 (unless
    train.precision = fp32); train.fsdp_offload keeps shards and optimizer state on the CPU.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                        fully_shard)

    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    bf16 = ctx.device.type == "cuda" and cfg.precision != "fp32"
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    offload = (CPUOffloadPolicy(pin_memory=ctx.device.type == "cuda") if cfg.fsdp_offload
               else OffloadPolicy())
    for block in blocks(model.backbone):
        fully_shard(block, mesh=mesh, mp_policy=mp, offload_policy=offload)
    ignored = set(model.softmask.parameters()) if model.softmask is not None else None
    fully_shard(model, mesh=mesh, mp_policy=mp, offload_policy=offload, ignored_params=ignored)


def is_sharded(model: nn.Module) -> bool:
    if "torch.distributed.fsdp" not in sys.modules:  # then nothing was sharded
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def settle(model: nn.Module) -> None:
    """Put the root's weights back in their shards. FSDP2 keeps the root gathered after a
    forward (backward would gather it again); anything that reads or writes parameters outside
    a step (EMA swap, saving, loading) must see the sharded ones, which are what persists."""
    if is_sharded(model):
        model.reshard()


def is_dtensor(t: Tensor) -> bool:
    return hasattr(t, "to_local")


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a plain tensor is its own)."""
    return t.to_local() if is_dtensor(t) else t


def like(tensors: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, Tensor]:
    """Local shards read from a file, as DTensors laid out like `ref`'s (plain ones stay plain)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for k, v in tensors.items():
        r = ref.get(k)
        if isinstance(r, DTensor):
            v = DTensor.from_local(v.to(local(r).device), r.device_mesh, r.placements,
                                   run_check=False, shape=r.shape, stride=r.stride())
        out[k] = v
    return out


def optimizer_like(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """An optimizer state_dict read from a rank's file, its per-parameter tensors (exp_avg, ...)
    made DTensors like the parameters they belong to; step counters stay plain."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for idx, st in state["state"].items():
        p = params[idx]
        out[idx] = {k: (like({"v": v}, {"v": p})["v"]
                        if torch.is_tensor(v) and v.dim() and v.shape == local(p).shape else v)
                    for k, v in st.items()}
    return {"state": out, "param_groups": state["param_groups"]}


def filled(skeleton_: nn.Module, weights: dict[str, Tensor]) -> nn.Module:
    """A copy of the skeleton holding `weights` (the rest stays on meta); dropping it frees them."""
    twin = copy.deepcopy(skeleton_)
    twin.load_state_dict(weights, strict=False, assign=True)
    return twin


def full_weights(module: nn.Module, main: bool) -> dict[str, Tensor] | None:
    """The trained parameters and the buffers of `module`, gathered whole on the CPU of rank 0
    (None elsewhere). Every rank must call it (each DTensor is all-gathered). Frozen parameters
    (a fine-tune's base) are not gathered: the skeleton keeps them on meta and an adapter's
    publish never reads them."""
    wanted = {k for k, p in module.named_parameters() if p.requires_grad}
    wanted |= {k for k, _ in module.named_buffers()}
    out = {}
    for k, v in module.state_dict().items():
        if k not in wanted:
            continue
        v = v.full_tensor() if is_dtensor(v) else v
        if main:
            out[k] = v.detach().cpu()
    return out if main else None


def average_replicated(params: list[nn.Parameter], world: int) -> None:
    """Average the gradients of the unsharded parameters (the SoftMask) over ranks, as DDP would.
    A step that did not use them leaves them None on every rank alike (the SM coin is shared)."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads and world > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float, device: torch.device) -> Tensor:
    """clip_grad_norm_ over sharded and replicated gradients: the global 2-norm is the sum over
    ranks of the shards' squared norms plus the replicated gradients' (counted once).

    torch's clip_grad_norm_ gets the same number in torch 2.13, but only by turning the SoftMask's
    plain gradients into replicated DTensors implicitly, with a warning at every step, and it
    returns a DTensor; this says what it does and returns a plain tensor for the logs."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [local(g) for g in grads if is_dtensor(g)]
    replicated = [g for g in grads if not is_dtensor(g)]

    def squares(ts: list[Tensor]) -> Tensor:
        if not ts:
            return torch.zeros((), device=device)
        return torch.stack([n.to(device) for n in torch._foreach_norm(ts)]).float().square().sum()

    total = squares(sharded)
    dist.all_reduce(total)
    total = (total + squares(replicated)).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for group in (sharded, replicated):
        if group:
            torch._foreach_mul_(group, coef.to(group[0].device))
    return total
