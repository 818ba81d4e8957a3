"""Dream decoding speed: {no cache, prefix, dual} x {binary, SM} x {threshold off, on}.

    python benchmarks/dream_decode.py [--shape small|7b] [--batch 2] [--prompt 64] [--gen 256]
                                      [--block 32] [--threshold 0.9] [--head-scale 60]
                                      [--repeats 2] [--device auto]

A Dream-layout model with random weights (small: 4 layers x 256, vocab 8192, for the CPU; 7b: the
real Dream-7B shapes, vocab 152064, hidden 3584, 28 layers, bf16, for a GPU). The confidence
sampler (alg entropy, T = 0) with NFE = generated tokens, blocks of --block. Threshold decoding
commits as many tokens per forward as the model is sure of, so its speed depends on the weights:
random weights give near-uniform predictions, and --head-scale multiplies the LM head to make
them confident (reported: tokens per forward). Binary and SM runs alternate (machine noise hits
both alike); medians are reported. Step time = wall time / forwards: what SM can add to.

Ends with `sm/binary step time ratio: X` (no cache, threshold off: identical forwards).
This is not a quality benchmark.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from smdlm_cli.core.models.dream import Dream, DreamConfig
from smdlm_cli.core.samplers import decode
from smdlm_cli.core.softmask import SoftMask

SHAPES = {
    "small": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4),
}


def build(shape: str, head_scale: float, device: torch.device, dtype: torch.dtype,
          **overrides) -> Dream:
    """Random weights in a SHAPES shape (`overrides` change its keys: fewer layers, say)."""
    torch.manual_seed(0)
    c = {**SHAPES[shape], **overrides}
    with torch.device(device):
        model = Dream(DreamConfig(**c, mask_token_id=c["vocab_size"] - 1)).to(dtype).eval()
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        with torch.no_grad():
            for layer in model.model.layers:  # RMSNorm weights of 1, as trained models start
                layer.input_layernorm.weight.fill_(1.0)
                layer.post_attention_layernorm.weight.fill_(1.0)
            model.model.norm.weight.fill_(1.0)
            model.lm_head.weight.mul_(head_scale)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=256)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--head-scale", type=float, default=60.0)
    ap.add_argument("--sm-k", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build(args.shape, args.head_scale, device, dtype)
    # mid-range omegas so lambda is neither 0 nor saturated: the feedback does its full work
    softmask = SoftMask(k=args.sm_k, scale=0.5, centre=-4.0, steepness=2.0).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randint(0, model.vocab_size - 1, (args.batch, args.prompt), generator=g),
                   torch.full((args.batch, args.gen), model.mask_id)], dim=1).to(device)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"device {device} ({dtype}), Dream {args.shape} {n_params / 1e6:.0f}M parameters, "
          f"vocab {model.vocab_size}, hidden {model.config.hidden_size}; batch {args.batch} x "
          f"(prompt {args.prompt} + gen {args.gen}), block {args.block}, NFE budget {args.gen}, "
          f"median of {args.repeats}")
    print(f"{'cache':<7} {'threshold':>9} {'mode':>6} {'NFE':>5} {'tok/fwd':>8} {'tok/s':>9} "
          f"{'ms/fwd':>8} {'speed-up':>9}")
    results = time_settings(model, x, softmask, args.gen, args.block, args.threshold, args.repeats)
    base = results[0]["wall"]
    for r in results:
        tokens = args.batch * args.gen
        print(f"{r['cache']:<7} {str(r['threshold'] or 'off'):>9} {r['mode']:>6} {r['nfe']:>5} "
              f"{args.gen / r['nfe']:>8.2f} {tokens / r['wall']:>9,.1f} "
              f"{r['wall'] / r['nfe'] * 1e3:>8.1f} {base / r['wall']:>8.2f}x")
    print(f"sm/binary step time ratio: {step_ratio(results):.3f}")


def time_settings(model, x, softmask, gen: int, block: int, threshold: float,
                  repeats: int) -> list[dict]:
    """{cache, threshold, mode, nfe, wall (median s)} for {none, prefix, dual} x {off, threshold}
    x {binary, SM}: binary and SM decodes alternate after a warm-up (also used by gpu_check.py)."""
    device = x.device
    seeds = list(range(x.shape[0]))

    def run(cache: str, threshold: float | None, sm) -> tuple[float, int]:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = decode(model, x, sampler="confidence", steps=gen, softmask=sm,
                     generator_seeds=seeds, block_length=block, cache=cache, threshold=threshold)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out.nfe

    results = []
    for cache in ("none", "prefix", "dual"):
        for thr in (None, threshold):
            run(cache, thr, None)  # warm-up: allocator, kernels
            times, nfe = {"binary": [], "SM": []}, {}
            for _ in range(repeats):
                for mode, sm in (("binary", None), ("SM", softmask)):
                    wall, nfe[mode] = run(cache, thr, sm)
                    times[mode].append(wall)
            results += [{"cache": cache, "threshold": thr, "mode": mode, "nfe": nfe[mode],
                         "wall": statistics.median(times[mode])} for mode in ("binary", "SM")]
    return results


def step_ratio(results: list[dict]) -> float:
    """SM/binary time per forward without a cache or threshold (identical forwards)."""
    step = {r["mode"]: r["wall"] / r["nfe"] for r in results
            if r["cache"] == "none" and r["threshold"] is None}
    return step["SM"] / step["binary"]

if __name__ == "__main__":
    main()
