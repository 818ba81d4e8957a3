"""Why ω_s barely moves in a short SM run: its gradient against Adam's eps, at several scales.

λ = ω_s · σ(·), so ∂loss/∂raw_scale = ω_s (1 − ω_s) · ∂loss/∂ω_s is proportional to ω_s itself.
At the paper's initial ω_s = 1e-6 the gradient can sit below AdamW's eps (1e-8), and Adam's step,
lr · m/(√v + eps), is then a small fraction of lr. This loads a run (its backbone, and the SM
parameters if it has them), sets ω_s to each value in turn and prints the mean |∂loss/∂raw_scale|
of the two-pass training loss over validation batches, and the step Adam would take at the first
update (lr · |g| / (|g| + eps)).

    python benchmarks/omega_gradient.py runs/repro-cpu/sm-iso-update
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from smdlm_cli.core import rundir
from smdlm_cli.core import diffusion
from smdlm_cli.core.config import SoftMaskConfig
from smdlm_cli.core.data import build_corpus, cache_dir, valid_batches
from smdlm_cli.core.softmask import SoftMask
from smdlm_cli.core.twopass import TwoPass
from smdlm_cli.recipe import load_recipe

ADAM_EPS = 1e-8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--scales", default="1e-6,1e-4,1e-2,0.5")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    run = rundir.load(args.run)
    model, tok, softmask = run.model, run.tokenizer, run.softmask
    recipe = load_recipe(args.run / "recipe.toml")
    softmask = softmask or SoftMask(SoftMaskConfig().k)
    _, valid = build_corpus(recipe.data, tok, model.config.model_length, cache_dir())
    batches = valid_batches(valid, args.batch_size, args.batches)
    lr = recipe.softmask.lr
    print(f"{args.run}: ω_b {softmask.centre.item():.3g}, ω_a {softmask.steepness.item():.3g}, "
          f"k {softmask.k}; {args.batches} validation batches of {args.batch_size}; lr {lr:g}")
    print(f"{'ω_s':>8} {'mean |g|':>10} {'|g| / eps':>10} {'first Adam step':>16}")
    for scale in map(float, args.scales.split(",")):
        with torch.no_grad():
            softmask.raw_scale.fill_(math.log(scale) - math.log1p(-scale))
        two_pass = TwoPass(model, softmask)
        grads = []
        for i, x0 in enumerate(batches):
            g = torch.Generator().manual_seed(i)
            t = diffusion.sample_t(x0.shape[0], 1e-3, 1.0, True, generator=g)
            xt = diffusion.q_xt(x0, t, model.mask_id, u=torch.rand(x0.shape, generator=g))
            softmask.zero_grad()
            loss = diffusion.elbo_per_token(two_pass(xt, True), x0, xt, t, model.mask_id).mean()
            loss.backward()
            grads.append(abs(float(softmask.raw_scale.grad)))
        mean = sum(grads) / len(grads)
        print(f"{scale:>8.0e} {mean:>10.3g} {mean / ADAM_EPS:>10.3g} {lr * mean / (mean + ADAM_EPS):>16.3g}")


if __name__ == "__main__":
    main()
