"""`smdlm evaluate sudoku`: solve the held-out puzzles of a run's sudoku data and score them.

Each puzzle's givens are the prompt ([BOS] + 81 givens, never masked) and the model fills the 81
solution cells in `nfe` steps. An answer is *solved* when it is the puzzle's unique solution
(core/sudoku.py checks the rules and the givens independently: `valid`); *cells* is the share of
the blank cells filled correctly, givens excluded. Every NFE and sampling seed is one decoding of
all the test puzzles; seed r decodes puzzle j with seed `seed + r * n + j`.

The first batch of each NFE at the first seed is traced: the median entropy of the predictions at
the masks left after a step (what soft-masking feeds back, and binary decoding forgets) and the
λ statistics, so the report says how sure the model was where SM could act.
"""

from __future__ import annotations

import math
from statistics import mean, stdev
from typing import Callable

import torch
from torch import Tensor

from smdlm_cli.core import sudoku
from smdlm_cli.core.data import SUDOKU, sudoku_split
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.generate import generate

LENGTH = 1 + 2 * sudoku.CELLS  # [BOS] + givens + solution


def test_puzzles(recipe, limit: int) -> list[tuple[str, str]]:
    """The run's held-out puzzles (data.sudoku_test of them, or the first `limit`)."""
    if recipe.data.source != SUDOKU:
        raise UserError(f"data.source = {recipe.data.source!r}: expected a run trained on "
                        f"data.source = \"sudoku\"")
    if limit < 0:
        raise UserError(f"--limit {limit}: expected 0 (all test puzzles) or a positive count")
    puzzles = sudoku_split(recipe.data, "test")
    return puzzles[:limit or None]


def _se(xs: list[float]) -> float:
    return stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")


def _clean(v: float) -> float | None:
    return None if v is None or math.isnan(v) else v


def _blank_entropies(entropy: Tensor, givens: list[str], starts: list[int]) -> Tensor:
    """The fed-back entropies (trace["entropy"], (steps, B, L), NaN where nothing was fed back)
    at the blank cells of the traced rows: the cells a solver must find, without the solution
    cells that only copy a given (near-certain, about half of all fed-back predictions)."""
    blank = torch.zeros(entropy.shape[1:], dtype=torch.bool)
    for j in range(entropy.shape[1]):
        for c, ch in enumerate(givens[j]):
            blank[j, starts[j] + c] = ch == sudoku.BLANK
    h = entropy[:, blank].flatten()
    return h[~h.isnan()]


def solve(model, tok, puzzles: list[tuple[str, str]], nfe: int, seeds: int, decode: dict,
          on_batch: Callable[[int], None] | None = None) -> dict:
    """Decode every puzzle `seeds` times at `nfe` steps; per-seed scores, mean and standard error."""
    if model.config.model_length != LENGTH:
        raise UserError(f"model length {model.config.model_length}: expected {LENGTH} ([BOS], 81 "
                        f"givens, 81 cells), a model trained on data.source = \"sudoku\"")
    runs, trace, starts = [], None, []  # the first seed's trace and its rows' start columns
    for r in range(seeds):
        gen = generate(model, tok, [g for g, _ in puzzles], length=LENGTH, nfe=nfe,
                       seed=decode["seed"] + r * len(puzzles), trace=r == 0,
                       on_batch=on_batch, **{k: v for k, v in decode.items() if k != "seed"})
        if r == 0:
            trace, starts = gen.trace, gen.start
        scores = [sudoku.score(g, s, tok.decode(gen.tokens[j][gen.start[j]:]))
                  for j, (g, s) in enumerate(puzzles)]
        runs.append({"seed": decode["seed"] + r * len(puzzles),
                     "solved": sum(x["solved"] for x in scores) / len(scores),
                     "cells": sum(x["cells_right"] for x in scores) / sum(x["blanks"] for x in scores),
                     "valid": sum(x["valid"] for x in scores) / len(scores),
                     "seconds": gen.seconds, "nfe": gen.nfe})
    out = {"nfe": nfe, "seeds": runs}
    for key in ("solved", "cells", "valid"):
        xs = [x[key] for x in runs]
        out[key], out[f"{key}_se"] = mean(xs), _clean(_se(xs))
    if trace is not None and "entropy_fed_back_median" in trace:
        lam = [v for v in trace["lam_mean"] if not math.isnan(v)]
        blanks = _blank_entropies(trace["entropy"], [g for g, _ in puzzles], starts)
        out["fed_back"] = {"entropy_median": _clean(trace["entropy_fed_back_median"]),
                           "count": trace["entropy_fed_back_count"],
                           "entropy_median_blanks":
                               float(blanks.median()) if blanks.numel() else None,
                           "count_blanks": int(blanks.numel()),
                           "lam_mean": mean(lam) if lam else None}
    return out
