"""The validation perplexity bound of a run: nll (nats/token), ppl and bpd on a data split.

Exactly the trainer's validation (core/objectives.validate) on the run's own data settings:
the saved weights (the EMA weights when the run used EMA, as the paper evaluates), SM models
two-pass as they were trained, fixed times and masks from `seed`, one antithetic time per row.
For an AR run it is the exact NLL, per token of the same blocks, so the rows compare.

Not here: the data pipeline or the ELBO itself (core/).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from smdlm_cli.core import objectives
from smdlm_cli.core.distributed import Dist, batch_layout, validation_batch
from smdlm_cli.core.data import build_corpus, cache_dir, prompt_length, valid_batches
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.twopass import TwoPass


def elbo(model, softmask, tok, recipe, device: torch.device, split: str = "valid",
         batch_size: int = 0, batches: int = 0, seed: int | None = None,
         on_batch: Callable[[], None] | None = None) -> dict:
    """{"nll", "ppl", "bpd", "tokens", "sm"} on the first `batches` batches of the split's blocks.

    0 / None take the run's own validation settings (micro-batch, train.eval_batches,
    train.seed), which reproduces the last validation line of its metrics.jsonl.
    """
    t = recipe.train
    batch_size = batch_size or validation_batch(t)
    batches = batches or t.eval_batches
    seed = t.seed if seed is None else seed
    train, valid = build_corpus(recipe.data, tok, model.config.model_length, cache_dir())
    blocks = valid if split == "valid" else train
    if blocks.shape[0] == 0:  # an NLL over 0 tokens is nan, not a result
        raise UserError(f"--split {split}: the run's {split} split holds no block to score; "
                        f"expected a run whose data has a {split} split")
    data = valid_batches(blocks, batch_size, batches)
    use_sm = softmask is not None
    ctx = Dist(device=device)
    prompt = prompt_length(recipe.data)
    objective = objectives.build("elbo", t, batch_layout(t, 1), ctx, model,
                                 {"prompt": prompt} if prompt else None)
    out = objectives.validate(TwoPass(model, softmask).to(device), objective, data, use_sm, seed,
                              t.precision, on_batch)
    return {"nll": out["val_nll"], "ppl": out["val_ppl"], "bpd": out["val_bpd"],
            "tokens": sum(x.numel() for x in data), "batches": len(data), "batch_size": batch_size,
            "seed": seed, "split": split, "sm": use_sm}
