"""Decoding speed of every sampler, binary against soft-masked: same model, same seeds, same NFE.

    python benchmarks/sample_speed.py [--vocab 32768] [--hidden 256] [--blocks 4] [--heads 4]
                                      [--length 256] [--batch 8] [--steps 16] [--repeats 3]
                                      [--samplers mdlm,remdm-cap,remdm-loop,confidence]
                                      [--sm-k 3] [--device auto] [--compile]

Unconditional generation of batch x length tokens. The mask plan and the k table never depend on
the model's predictions, so binary and SM runs with the same seeds run exactly the same forwards
(the NFE column checks it). Binary and SM runs alternate, so machine noise hits both alike; medians
are reported. Step time = wall time / forwards, which is what SM can add to (its feedback needs no
extra forward). Uses the project's DiT when smdlm_cli.core.models.dit is importable, else a stand-in
of the same shape (embedding, pre-norm bidirectional transformer blocks, untied head).
Ends with the line `sm/binary step time ratio: X` for the mdlm sampler.

Binary decoding of the MDLM family runs the head and the log-softmax only at the positions a step
unmasks; SM needs them at every mask (its feedback reads each mask's distribution). So SM/binary
for mdlm / remdm is that head work plus the feedback itself: the `feedback ms/fwd` column times
the feedback alone (Feedback.update, on the CPU clock; on CUDA after a synchronize, so read it as
an upper bound there) and `share` its part of the SM step. The confidence sampler reads every mask
either way.

--compile: the blocks through torch.compile (as `smdlm sample --compile`), compiled during the
warm-up decode; the head and the sampling stay eager.

This is not a quality benchmark: the model is untrained.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from smdlm_cli.core.compiling import compile_blocks
from smdlm_cli.core.models.dit import build_dit
from smdlm_cli.core.samplers import SAMPLERS, decode
from smdlm_cli.core.samplers.feedback import Feedback
from smdlm_cli.core.softmask import SoftMask


def timed_feedback(clock) -> list[float]:
    """Wrap Feedback.update so its time accumulates in the returned one-element list."""
    spent, update = [0.0], Feedback.update

    def wrapped(self, logp, *args, **kwargs):
        if logp.values.is_cuda:
            torch.cuda.synchronize()
        start = clock()
        update(self, logp, *args, **kwargs)
        if logp.values.is_cuda:
            torch.cuda.synchronize()
        spent[0] += clock() - start

    Feedback.update = wrapped
    return spent


def build_model(args, device):
    torch.manual_seed(0)
    model = build_dit("tiny", args.vocab, args.vocab - 1, args.length, hidden_dim=args.hidden,
                      n_blocks=args.blocks, n_heads=args.heads, dropout=0.0)
    return model.to(device), "DiT"


def time_decodes(model, x, sampler: str, steps: int, softmask: SoftMask, repeats: int,
                 clock=time.perf_counter, **options) -> tuple[dict, dict]:
    """({"binary": [s, ...], "sm": [...]}, {"binary": NFE, "sm": NFE}): `repeats` decodes of `x`
    each way, alternating, after one binary warm-up (also used by gpu_check.py)."""
    device = x.device
    seeds = list(range(x.shape[0]))

    def run(sm: SoftMask | None) -> tuple[float, int]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        out = decode(model, x, sampler=sampler, steps=steps, softmask=sm, generator_seeds=seeds,
                     **options)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return clock() - start, out.nfe

    run(None)  # warm-up: allocator, kernels
    times, nfe = {"binary": [], "sm": []}, {}
    for _ in range(repeats):
        for mode, sm in (("binary", None), ("sm", softmask)):
            wall, nfe[mode] = run(sm)
            times[mode].append(wall)
    return times, nfe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samplers", default=",".join(SAMPLERS))
    ap.add_argument("--sm-k", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks")
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="process: this process's CPU time (stable on a shared CPU machine)")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    model, kind = build_model(args, device)
    if args.compile:
        compile_blocks(model, "--compile", "leave --compile out")
        kind += " (blocks compiled)"
    # mid-range omegas so lambda is neither 0 nor saturated: the feedback does its full work
    softmask = SoftMask(k=args.sm_k, scale=0.5, centre=-4.0, steepness=2.0).to(device)
    x = torch.full((args.batch, args.length), model.mask_id, dtype=torch.long, device=device)
    extra = {"confidence": {"temperature": 1.0}}

    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {device}, {kind} {n_params / 1e6:.1f}M parameters, vocab {args.vocab}, "
          f"batch {args.batch} x {args.length}, {args.steps} steps, median of {args.repeats}, "
          f"{args.clock} clock")
    print(f"{'sampler':<11} {'NFE':>4} {'binary tok/s':>13} {'SM tok/s':>9} "
          f"{'binary ms/fwd':>14} {'SM ms/fwd':>10} {'feedback ms/fwd':>16} {'share':>6} "
          f"{'SM/binary':>10}")
    ratios = {}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    spent = timed_feedback(clock)
    for sampler in args.samplers.split(","):
        spent[0] = 0.0
        times, nfe = time_decodes(model, x, sampler, args.steps, softmask, args.repeats, clock,
                                  **extra.get(sampler, {}))
        feedback = spent[0] / args.repeats / nfe["sm"]
        if nfe["binary"] != nfe["sm"]:
            raise SystemExit(f"{sampler}: NFE differs, binary {nfe['binary']} vs SM {nfe['sm']}")
        b, s = statistics.median(times["binary"]), statistics.median(times["sm"])
        tokens = args.batch * args.length
        ratios[sampler] = s / b
        print(f"{sampler:<11} {nfe['sm']:>4} {tokens / b:>13,.0f} {tokens / s:>9,.0f} "
              f"{b / nfe['binary'] * 1e3:>14.1f} {s / nfe['sm'] * 1e3:>10.1f} "
              f"{feedback * 1e3:>16.1f} {feedback * nfe['sm'] / s:>6.1%} {s / b:>10.3f}")
    if "mdlm" in ratios:
        print(f"sm/binary step time ratio: {ratios['mdlm']:.3f}")


if __name__ == "__main__":
    main()
