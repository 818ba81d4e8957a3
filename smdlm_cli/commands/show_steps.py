"""`smdlm sample --show-steps`: replay the denoising of the first sample in the terminal.

Decoding runs first, at full speed and without host syncs; its trace (tokens and λ per step) is
replayed afterwards, one frame per step. Decoded tokens print as text; a mask prints as a block
whose shade says how much of its prediction the next forward sees: dim grey at λ = 0 (a plain
mask), bright yellow as λ approaches 1.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.text import Text

BLOCK = "█"


def frame(tokens: list[int], lam: list[float], tok, mask_id: int, step: int, steps: int) -> Text:
    text = Text(f"step {step}/{steps}\n", style="bold")
    for token, weight in zip(tokens, lam):
        if token == mask_id:
            level = min(max(weight, 0.0), 1.0)
            grey = int(80 + 175 * level)
            text.append(BLOCK, style=f"rgb({grey},{grey},{int(80 * (1 - level))})")
        elif token not in tok.all_special_ids:
            text.append(tok.decode([token]))
    return text


def replay(trace: dict, tok, console: Console, seconds_per_frame: float = 0.05) -> None:
    tokens, lam = trace["tokens"][:, 0], trace["lam"][:, 0]  # the first sample
    steps = lam.shape[0]
    mask_id = tok.mask_token_id
    with Live(console=console, refresh_per_second=30, transient=False) as live:
        for i in range(steps + 1):
            weights = lam[i].tolist() if i < steps else [0.0] * tokens.shape[1]
            live.update(frame(tokens[i].tolist(), weights, tok, mask_id, i, steps))
            if console.is_terminal:
                time.sleep(seconds_per_frame)
