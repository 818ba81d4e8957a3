"""Generative perplexity and unigram entropy of samples: the paper's quality/diversity pair.

Gen-PPL follows the SM / DUO evaluation code (reference/mdlm-sm-language.md §5.1): samples are
decoded with their special tokens kept ("<|endoftext|>" as text), retokenised by the scorer's
tokenizer, right-padded with EOS, and scored by the causal LM. Targets count when they are not EOS,
or are the first EOS of the window (so a leading BOS = EOS is never a target, and the first pad of
a sample without EOS is). Gen-PPL = exp(Σ nll / Σ counted targets) over all samples: token-weighted,
not a mean of per-sample perplexities. A text longer than the scorer's context is scored in
consecutive windows (the paper's texts fit one 1024-token window).

Entropy: per sample, the unigram entropy in nats of the generated token ids (BOS included, as the
paper), then the mean over samples: low entropy flags repetitive, degenerate text.

Not here: generating the samples (commands/evaluate.py) or loading the scorer (scorer.py).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from smdlm_cli.evals.scorer import Scorer, pad_batch, windows


def gen_ppl(scorer: Scorer, texts: Sequence[str], batch_size: int = 8,
            on_batch: Callable[[int], None] | None = None,
            on_total: Callable[[int], None] | None = None) -> dict:
    """{"gen_ppl", "nll", "tokens", "samples", "windows"}: token-weighted over every window of
    every text. on_total(n) is told the number of windows, on_batch(k) each batch's count."""
    seqs = windows(scorer.encode(list(texts)), scorer.context)
    seqs = sorted((s for s in seqs if len(s) > 1), key=len)  # similar lengths share a batch
    if on_total is not None:
        on_total(len(seqs))
    total = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(seqs), batch_size):
        batch = seqs[start:start + batch_size]
        ids, mask = pad_batch(batch, scorer.eos_id, scorer.device)
        logits = scorer.logits(ids, mask)
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        is_eos = ids == scorer.eos_id
        first_eos = is_eos & (is_eos.cumsum(-1) == 1)
        counted = (first_eos | ~is_eos)[:, 1:]
        total += torch.stack([(nll * counted).sum().double().cpu(), counted.sum().double().cpu()])
        if on_batch is not None:
            on_batch(len(batch))
    nll = (total[0] / total[1].clamp_min(1)).item()
    return {"gen_ppl": math.exp(min(nll, 700.0)), "nll": nll, "tokens": int(total[1]),
            "samples": len(texts), "windows": len(seqs)}


def unigram_entropy(ids: Sequence[int]) -> float:
    """Entropy in nats of the token frequencies of one sample."""
    n = len(ids)
    return -sum(c / n * math.log(c / n) for c in Counter(ids).values()) if n else 0.0


def mean_entropy(samples: Sequence[Sequence[int]]) -> dict:
    values = [unigram_entropy(s) for s in samples]
    return {"entropy": sum(values) / len(values), "entropy_per_sample": values}
