"""From prompts to decoded rows: the one path that sample, evaluate, sweep, inspect-lambda, the
lm-eval adapter, the Python API and the benchmarks share.

A row is [BOS] (for models trained on BOS blocks) + the prompt's tokens + masks, and the sampler
fills the masks. The masks run either to a fixed `length` (unconditional text, `smdlm sample`) or
for `max_new_tokens` after each prompt (completions; rows are then right-padded to the longest of
their batch, with an attention mask). Job j draws all its randomness from seed + j, whatever the
batching, so any row can be reproduced alone.

Not here: the decoding loop and its samplers (samplers/), loading a run (rundir.py), files.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from smdlm_cli.core import validate
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.samplers import decode
from smdlm_cli.core.softmask import SoftMask


@dataclass
class Generation:
    """tokens[j]: row j without padding; start[j]: where its generated part begins."""
    prompts: list[str]
    tokens: list[list[int]]
    start: list[int]
    seeds: list[int]
    nfe: int
    seconds: float
    generated: int
    prompts_cut: int = 0
    trace: object = None
    row_seconds: list[float] = field(default_factory=list)


def choose_softmask(softmask: SoftMask | None, k: int | None) -> SoftMask | None:
    """k None keeps the run's SoftMask; 0 decodes with binary masks; N > 0 sets its top-k."""
    if k is None or k == 0:
        return None if k == 0 else softmask
    if k < 0:
        raise UserError(f"--k {k}: expected 0 (binary decoding) or a positive top-k size")
    if softmask is None:
        raise UserError(f"--k {k}: the run has no soft-masking parameters (a binary run); "
                        f"use --k 0 or train with [softmask] enabled = true")
    softmask = copy.deepcopy(softmask)  # the caller's (perhaps shared) SoftMask keeps its k
    softmask.k = k
    return softmask


def _encode(tok, prompts: list[str], bos: list[int], model_length: int, length: int | None,
            max_new: int | None, cut: bool) -> tuple[list[list[int]], int]:
    """Prompt ids per job, cut from the left to fit when `cut` (as Dream's evaluation)."""
    encoded, n_cut = [], 0
    for text in prompts:
        ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
        room = (length if length is not None else model_length - max_new) - len(bos)
        if len(ids) >= room + (max_new is not None):
            if not cut:
                what = f"--length {length}" if length is not None else f"--max-new-tokens {max_new}"
                raise UserError(f"{what}: prompt {text[:40]!r} takes {len(ids)} tokens; expected "
                                f"room for it and at least one generated token within the model's "
                                f"{model_length}")
            ids, n_cut = ids[len(ids) - room:] if room > 0 else [], n_cut + 1
        encoded.append(ids)
    return encoded, n_cut


def generate(model, tok, prompts: list[str], *, sampler: str, nfe: int,
             softmask: SoftMask | None = None, length: int | None = None,
             max_new_tokens: int | None = None, seed: int = 0, batch_size: int = 8,
             cut_prompts: bool = False, sm_schedule: str = "none", exact: bool | None = None,
             options: dict | None = None, trace: bool = False,
             on_batch: Callable[[int], None] | None = None) -> Generation:
    """Decode one row per entry of `prompts` (repeat a prompt to draw several samples of it).

    Exactly one of `length` (rows of that many tokens) and `max_new_tokens` is given.
    `softmask` is moved to the model's device; None decodes with binary masks.
    """
    if (length is None) == (max_new_tokens is None):
        raise ValueError("generate: give exactly one of length and max_new_tokens")
    model_length = model.config.model_length
    if max_new_tokens is not None and not 1 <= max_new_tokens <= model_length - 2:
        raise UserError(f"--max-new-tokens {max_new_tokens}: the model holds {model_length} tokens; "
                        f"expected 1 to {model_length - 2}")
    if length is not None and not 2 <= length <= model_length:
        raise UserError(f"--length {length}: expected 2 to {model_length} (the model's length)")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: expected an integer >= 1")
    validate.seed(seed, rows=len(prompts))
    if softmask is not None:
        softmask.check_vocabulary(model.vocab_size, "--k")
    device = model.embedding_weight().device
    softmask = softmask.to(device) if softmask is not None else None
    bos = [tok.bos_token_id] if getattr(model, "wants_bos", True) else []
    encoded, n_cut = _encode(tok, prompts, bos, model_length, length, max_new_tokens, cut_prompts)
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
    gen = Generation(prompts=list(prompts), tokens=[], start=[], seeds=[], nfe=0, seconds=0.0,
                     generated=0, prompts_cut=n_cut)
    for first in range(0, len(prompts), batch_size):
        rows = [bos + ids + [model.mask_id] * (max_new_tokens if length is None
                                               else length - len(bos) - len(ids))
                for ids in encoded[first:first + batch_size]]
        width = max(len(r) for r in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        for b, r in enumerate(rows):
            x[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        attention = None
        if any(len(r) < width for r in rows):
            attention = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
        seeds = [seed + first + b for b in range(len(rows))]
        began = time.perf_counter()
        out = decode(model, x, sampler=sampler, steps=nfe, softmask=softmask,
                     attention_mask=attention, generator_seeds=seeds, sm_schedule=sm_schedule,
                     exact=exact, trace=trace and first == 0, **(options or {}))
        tokens = out.tokens.cpu().tolist()  # waits for the device: the timing below is the real one
        seconds = time.perf_counter() - began
        gen.seconds += seconds
        gen.nfe = out.nfe
        gen.trace = gen.trace if first else out.trace
        for b, r in enumerate(rows):
            gen.tokens.append(tokens[b][:len(r)])
            gen.start.append(len(bos) + len(encoded[first + b]))
            gen.generated += len(r) - gen.start[-1]
            gen.row_seconds.append(seconds / len(rows))
        gen.seeds += seeds
        if on_batch is not None:
            on_batch(len(rows))
    return gen


def completion(tok, gen: Generation, j: int) -> str:
    """Row j's generated text, special tokens kept, cut at the first EOS."""
    text = tok.decode(gen.tokens[j][gen.start[j]:], skip_special_tokens=False)
    eos = tok.eos_token or ""
    return text.split(eos)[0] if eos else text
