"""Time a soft-masked training step against a binary one: same model, same batch, one run.

    python benchmarks/train_step.py [--preset tiny] [--hidden 256] [--blocks 4] [--length 256]
                                    [--batch 8] [--vocab 4096] [--iters 10] [--device auto]
                                    [--quickstart] [--clock wall|process]

A step is the whole optimizer step: forward(s), loss, backward, AdamW, as the trainer runs it (the
model computes the loss at the masked rows only, core/rows.py). The SM step adds a pass-1 forward
under no_grad and the sparse top-k mixing, so its ideal cost is about 4/3 of a binary step (a
backward costs about two forwards). SM and binary steps alternate, so machine noise hits both
alike; the medians are compared. `--quickstart` takes recipes/quickstart.toml's shapes (tiny
preset: 128 wide, 4 blocks, 4 heads; length 128, batch 16, vocabulary 4096, no dropout). Ends with
the line `sm/binary step time ratio: X`. `--clock process` times the process's own CPU time
instead of the wall clock: on a shared CPU machine, other processes then barely move the figures
(meaningless on a GPU, where the work is not the process's CPU time).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from smdlm_cli.core import diffusion
from smdlm_cli.core.models.dit import build_dit
from smdlm_cli.core.softmask import SoftMask
from smdlm_cli.core.twopass import TwoPass, autocast as _autocast


def make_step(model: TwoPass, opt, x0, xt, t, clock=time.perf_counter):
    """step(use_sm) -> seconds of one whole optimizer step on the batch (x0, xt, t)."""
    device = x0.device

    def step(use_sm: bool) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        with _autocast(device, "auto"):
            nll = model(xt, use_sm, nll_of=x0)  # the trainer's call (objectives.Diffusion)
        loss = (nll * diffusion.loss_weight(t)[:, None]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start
    return step


def time_steps(model: TwoPass, opt, x0, xt, t, iters: int,
               clock=time.perf_counter) -> tuple[list[float], list[float]]:
    """Seconds of `iters` binary and `iters` SM optimizer steps, alternating, after 2 warm-ups
    of each (also used by gpu_check.py)."""
    step = make_step(model, opt, x0, xt, t, clock)
    for _ in range(2):  # warm-up: allocator, kernels
        step(False)
        step(True)
    binary, sm = [], []
    for _ in range(iters):
        binary.append(step(False))
        sm.append(step(True))
    return binary, sm


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall")
    ap.add_argument("--quickstart", action="store_true",
                    help="recipes/quickstart.toml's shapes (overrides the sizes above)")
    args = ap.parse_args()
    dropout = 0.1
    if args.quickstart:
        args.hidden, args.blocks, args.heads, args.length, args.batch, args.vocab = \
            128, 4, 4, 128, 16, 4096
        dropout = 0.0
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(0)
    mask_id = args.vocab - 1
    backbone = build_dit(args.preset, args.vocab, mask_id, args.length, hidden_dim=args.hidden,
                         n_blocks=args.blocks, n_heads=args.heads, dropout=dropout)
    model = TwoPass(backbone, SoftMask(k=3, scale=0.5)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x0 = torch.randint(0, mask_id, (args.batch, args.length), device=device)
    t = diffusion.sample_t(args.batch, device=device)
    xt = diffusion.q_xt(x0, t, mask_id)

    binary, sm = time_steps(model, opt, x0, xt, t, args.iters, clock)
    b, s = statistics.median(binary), statistics.median(sm)
    n_params = sum(p.numel() for p in backbone.parameters())
    tokens = args.batch * args.length
    print(f"device {device}, {n_params / 1e6:.2f}M parameters, batch {args.batch} x {args.length}, "
          f"vocab {args.vocab}, {args.iters} steps each, {args.clock} clock")
    print(f"binary step: {b * 1e3:8.1f} ms  ({tokens / b:,.0f} tokens/s)")
    print(f"SM step:     {s * 1e3:8.1f} ms  ({tokens / s:,.0f} tokens/s)")
    print(f"sm/binary step time ratio: {s / b:.3f}")


if __name__ == "__main__":
    main()
