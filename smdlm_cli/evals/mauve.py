"""MAUVE between samples and human reference text, through mauve-text on our own features.

mauve-text would featurise with gpt2-large itself; we compute the features (the featuriser's
last-layer hidden state at the last token of each text, truncated to its context, exactly what
mauve-text does) and hand them to `mauve.compute_mauve(p_features=..., q_features=...)`. So any HF
model or an smdlm AR run can featurise, offline, on the device we choose. The clustering keeps
mauve-text's defaults (num_buckets auto = n/10, PCA, k-means with 5 restarts, scaling 5, seed 25).

References come from a data split (by default the validation split of the checkpoint's recipe, as
the paper takes OWT's validation split): blocks shuffled with seed 1, the first N decoded with
special tokens kept.

Not here: generating samples, loading the featuriser (scorer.py).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from smdlm_cli.core.config import DataConfig
from smdlm_cli.core.errors import UserError
from smdlm_cli.evals.scorer import Scorer, pad_batch

MAUVE_SEED = 25  # mauve-text's default, kept so scores compare with published ones


def features(scorer: Scorer, texts: Sequence[str], batch_size: int = 8,
             on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """(N, D) float32: hidden state at each text's last token, texts truncated to the context."""
    seqs = [s[:scorer.context] or [scorer.eos_id] for s in scorer.encode(list(texts))]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = np.zeros((len(seqs), 0), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([seqs[i] for i in idx], scorer.eos_id, scorer.device)
        h = scorer.hidden(ids, mask)
        last = h[torch.arange(len(idx), device=h.device), mask.sum(-1) - 1].cpu().numpy()
        if out.shape[1] == 0:
            out = np.zeros((len(seqs), last.shape[1]), dtype=np.float32)
        out[idx] = last
        if on_batch is not None:
            on_batch(len(idx))
    return out


def mauve_score(p_features: np.ndarray, q_features: np.ndarray, seed: int = MAUVE_SEED,
                notes: list[str] | None = None) -> float:
    """MAUVE of samples (q) against references (p), mauve-text's defaults otherwise.

    faiss writes its warnings (too few points for the clusters: MAUVE is then coarse) straight
    to file descriptor 2, through any progress bar; they are caught and added to `notes`.
    """
    import mauve

    if len(p_features) < 2 or len(q_features) < 2:
        raise UserError(f"MAUVE needs at least 2 references and 2 samples, got {len(p_features)} "
                        f"and {len(q_features)}")
    with _fd2_captured() as said:
        result = mauve.compute_mauve(p_features=p_features, q_features=q_features, seed=seed,
                                     verbose=False)
    if notes is not None:
        notes += [f"faiss: {line.removeprefix('WARNING ')}" for line in said if line.strip()]
    return float(result.mauve)


@contextmanager
def _fd2_captured() -> Iterator[list[str]]:
    """Lines written to file descriptor 2 inside the block (C++ libraries bypass sys.stderr)."""
    said: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            said += tmp.read().decode(errors="replace").splitlines()


def reference_texts(cfg: DataConfig, tok, length: int, n: int, split: str = "valid",
                    seed: int = 1) -> list[str]:
    """n blocks of the split, shuffled with `seed`, decoded with special tokens kept."""
    from smdlm_cli.core.data import build_corpus, cache_dir

    train, valid = build_corpus(cfg, tok, length, cache_dir())
    blocks = valid if split == "valid" else train
    if blocks.shape[0] < n:
        raise UserError(f"--num-refs {n}: the {split} split of {cfg.source!r} has only "
                        f"{blocks.shape[0]} blocks of {length} tokens; expected at most that many")
    order = torch.randperm(blocks.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return tok.batch_decode(blocks[order].tolist(), skip_special_tokens=False)
