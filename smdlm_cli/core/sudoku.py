"""Sudoku: an exact solver, a generator of 9×9 puzzles with a unique solution, and the text form
the `sudoku` data source trains on.

A grid is 81 ints in row-major order, 0 for a blank. A puzzle is written as two 81-character
strings: the givens ("." for a blank) and the full solution (digits). The data source makes one
block per puzzle, [BOS] + givens + solution: the givens are the prompt (never masked, in training
or decoding) and the 81 solution cells are what a model generates.

Generation, per puzzle and from its own seed (so any puzzle is reproducible alone, and the
train / valid / test splits are disjoint streams): a random full grid (random diagonal boxes, the
rest by search in random candidate order), then all but `givens` cells are blanked in random order; while the puzzle
has a second solution, the cell where that solution first differs from ours is given back. A
puzzle therefore has at least `givens` givens (a few more when uniqueness needed them) and exactly
one solution, which the tests check with the solver.

The solver is a depth-first search over the blank with the fewest candidates (bitmasks per row,
column and box); `solutions(grid, limit=2)` is the uniqueness test.
"""

from __future__ import annotations

import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor

BLANK = "."
CELLS = 81
ALL = 0x3FE  # candidates 1..9 as bits 1..9
ROW = [i // 9 for i in range(CELLS)]
COL = [i % 9 for i in range(CELLS)]
BOX = [(i // 27) * 3 + (i % 9) // 3 for i in range(CELLS)]
DIGITS = [[d for d in range(1, 10) if m >> d & 1] for m in range(1 << 10)]


def _masks(grid: list[int]) -> tuple[list[int], list[int], list[int]] | None:
    """Used digits per row, column and box; None when a given repeats in one of them."""
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    for i, v in enumerate(grid):
        if v:
            bit = 1 << v
            if (rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]]) & bit:
                return None
            rows[ROW[i]] |= bit
            cols[COL[i]] |= bit
            boxes[BOX[i]] |= bit
    return rows, cols, boxes


def solutions(grid: list[int], limit: int = 2, rng: random.Random | None = None) -> list[list[int]]:
    """Up to `limit` solutions of `grid` (in candidate order, or shuffled by `rng`)."""
    masks = _masks(grid)
    if masks is None:
        return []
    rows, cols, boxes = masks
    grid = list(grid)
    blanks = [i for i, v in enumerate(grid) if not v]
    found: list[list[int]] = []

    def search(left: list[int]) -> None:
        if not left:
            found.append(list(grid))
            return
        best, best_cands, best_n = -1, 0, 10
        for j, i in enumerate(left):  # the most constrained blank first
            cands = ALL & ~(rows[ROW[i]] | cols[COL[i]] | boxes[BOX[i]])
            n = len(DIGITS[cands])
            if n < best_n:
                best, best_cands, best_n = j, cands, n
                if n <= 1:
                    break
        if best_n == 0:
            return
        i = left[best]
        rest = left[:best] + left[best + 1:]
        digits = DIGITS[best_cands]
        if rng is not None:
            digits = rng.sample(digits, len(digits))
        r, c, b = ROW[i], COL[i], BOX[i]
        for d in digits:
            bit = 1 << d
            rows[r] |= bit
            cols[c] |= bit
            boxes[b] |= bit
            grid[i] = d
            search(rest)
            rows[r] ^= bit
            cols[c] ^= bit
            boxes[b] ^= bit
            grid[i] = 0
            if len(found) >= limit:
                return

    search(blanks)
    return found


def full_grid(rng: random.Random) -> list[int]:
    """A random complete grid: the three diagonal boxes are independent (any shuffles of 1-9),
    the search fills the rest in random order; 5× faster than searching from an empty grid."""
    grid = [0] * CELLS
    for box in (0, 4, 8):
        cells = [i for i in range(CELLS) if BOX[i] == box]
        for i, d in zip(cells, rng.sample(range(1, 10), 9)):
            grid[i] = d
    return solutions(grid, limit=1, rng=rng)[0]


def puzzle(seed: str, givens: int) -> tuple[list[int], list[int]]:
    """(puzzle, solution) from `seed`: at least `givens` givens and exactly one solution."""
    if not 17 <= givens <= CELLS:
        raise ValueError(f"givens = {givens}, expected 17 to 81")
    rng = random.Random(seed)
    solution = full_grid(rng)
    order = rng.sample(range(CELLS), CELLS)
    grid = list(solution)
    for i in order[givens:]:
        grid[i] = 0
    while True:
        found = solutions(grid, limit=2)
        other = next((s for s in found if s != solution), None)
        if other is None:
            return grid, solution
        i = next(i for i in range(CELLS) if other[i] != solution[i])
        grid[i] = solution[i]


def text(grid: list[int]) -> str:
    return "".join(str(v) if v else BLANK for v in grid)


def parse(s: str) -> list[int] | None:
    """A grid from 81 characters of digits 1-9 and blanks; None for anything else."""
    if len(s) != CELLS:
        return None
    out = []
    for ch in s:
        if ch == BLANK or ch == "0":
            out.append(0)
        elif "1" <= ch <= "9":
            out.append(int(ch))
        else:
            return None
    return out


def valid(grid: list[int]) -> bool:
    """A complete grid that keeps the rules: every row, column and box holds 1-9 once."""
    return all(grid) and _masks(grid) is not None


def puzzles(split: str, start: int, stop: int, givens: int) -> list[tuple[str, str]]:
    """Puzzles start..stop-1 of a split ("train", "valid" or "test") as (givens, solution)."""
    out = []
    for i in range(start, stop):
        grid, solution = puzzle(f"sudoku/{givens}/{split}/{i}", givens)
        out.append((text(grid), text(solution)))
    return out


def generate(split: str, n: int, givens: int, workers: int | None = None,
             pool_from: int = 2_000) -> list[tuple[str, str]]:
    """The first n puzzles of a split, over the CPU's cores from `pool_from` puzzles on (each
    puzzle has its own seed, so the result does not depend on the number of workers)."""
    workers = workers or min(os.cpu_count() or 1, 16)
    if workers == 1 or n < pool_from:
        return puzzles(split, 0, n, givens)
    chunk = -(-n // (workers * 8))
    spans = [(split, a, min(a + chunk, n), givens) for a in range(0, n, chunk)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [p for part in pool.map(_puzzles, spans) for p in part]


def _puzzles(span: tuple) -> list[tuple[str, str]]:
    return puzzles(*span)


def score(givens: str, solution: str, answer: str) -> dict:
    """One answer against its puzzle: solved (the unique solution, so it also keeps the rules and
    the givens), the blanks filled correctly, and whether it keeps the rules at all."""
    grid = parse(answer)
    blanks = [i for i, ch in enumerate(givens) if ch == BLANK]
    right = sum(1 for i in blanks if grid is not None and grid[i] == int(solution[i]))
    return {"solved": answer == solution, "cells_right": right, "blanks": len(blanks),
            "valid": grid is not None and valid(grid)
            and all(grid[i] == int(ch) for i, ch in enumerate(givens) if ch != BLANK)}
