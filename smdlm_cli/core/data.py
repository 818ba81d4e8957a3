"""Corpora, MDLM packing into fixed-length blocks, and the resumable, rank-sharded block loader.

Sources: `python-stdlib` (the running interpreter's own .py files: a real code corpus on every
machine, validation split by file), local .txt / .jsonl / .parquet files or directories, and HF
dataset names through `datasets` (streaming allowed). Packing follows MDLM's wrapping: documents
tokenized without special tokens, each followed by EOS, concatenated, cut into chunks of L − 2,
each block [BOS] + chunk + [EOS]; the tail is dropped. Packed corpora are cached as safetensors.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor

from smdlm_cli.core import hub
from smdlm_cli.core.config import DataConfig
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from smdlm_cli.core.loader import ShardedLoader, validation_chunks

STDLIB = "python-stdlib"
SUDOKU = "sudoku"
SUDOKU_VALID = 512  # validation puzzles: a stream of their own, disjoint from train and test
_BUCKETS = 10_000


def stdlib_files() -> list[Path]:
    """The .py files of this interpreter's standard library, site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts))


def _is_valid(key: str, fraction: float) -> bool:
    """A stable split: a document goes to validation by a hash of its key, never by its order."""
    digest = hashlib.md5(key.encode(), usedforsecurity=False).hexdigest()
    return int(digest, 16) % _BUCKETS < fraction * _BUCKETS


def _split(items: Iterable[tuple[str, str | Path]], cfg: DataConfig, split: str) -> Iterator[str]:
    """Texts of (key, text or file) pairs that fall into `split`, at most cfg.max_docs of them.

    Files are read only once kept, so the small validation split does not read the whole corpus.
    """
    want_valid = split == "valid"
    kept = (doc for key, doc in items if _is_valid(key, cfg.valid_fraction) == want_valid)
    texts = (doc.read_text(errors="replace") if isinstance(doc, Path) else doc for doc in kept)
    return itertools.islice(texts, cfg.max_docs or None)


def _local(path: Path, cfg: DataConfig) -> Iterator[tuple[str, str | Path]]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        # Keys relative to the source: the split does not change when the corpus is moved.
        f_key = str(f.relative_to(path)) if path.is_dir() else f.name
        if f.suffix == ".txt":
            yield f_key, f
        elif f.suffix == ".jsonl":
            with open(f, encoding="utf-8") as lines:
                for n, line in enumerate(lines):
                    if line.strip():
                        yield f"{f_key}:{n}", _field(json.loads(line), cfg, f"{f}:{n + 1}")
        elif f.suffix == ".parquet":
            import pyarrow.parquet as pq

            for n, row in enumerate(pq.read_table(f, columns=[cfg.text_field]).to_pylist()):
                yield f"{f_key}:{n}", _field(row, cfg, f"{f} row {n}")
        elif not path.is_dir():
            raise UserError(f"data.source = {str(path)!r}: expected a .txt, .jsonl or .parquet file")


def _field(record: dict, cfg: DataConfig, where: str) -> str:
    text = record.get(cfg.text_field)
    if not isinstance(text, str):
        raise UserError(f"{where}: no string field {cfg.text_field!r} (data.text_field)")
    return text


def _hub(cfg: DataConfig, split: str) -> Iterator[str]:
    hf_split = cfg.valid_split if split == "valid" and cfg.valid_split else cfg.split
    ds = hub.load_dataset("data.source", cfg.source, cfg.subset or None, split=hf_split,
                          streaming=cfg.streaming, expected="a local file or directory, "
                          "python-stdlib, or a cached dataset name")
    rows = ((str(n), _field(row, cfg, f"{cfg.source} row {n}")) for n, row in enumerate(ds))
    if cfg.valid_split:  # a separate validation split: no hashing, every document of each split
        return itertools.islice((text for _, text in rows), cfg.max_docs or None)
    return _split(rows, cfg, split)


def iter_documents(cfg: DataConfig, split: str) -> Iterator[str]:
    """The documents (strings) of the "train" or "valid" split of cfg.source."""
    if cfg.source == SUDOKU:
        return (g + s for g, s in sudoku_split(cfg, split))
    if cfg.source == STDLIB:
        root = Path(sysconfig.get_paths()["stdlib"])
        return _split(((str(p.relative_to(root)), p) for p in stdlib_files()), cfg, split)
    path = Path(cfg.source)
    if path.exists():
        return _split(_local(path, cfg), cfg, split)
    return _hub(cfg, split)


def pack_blocks(docs: Iterable[str], tok, length: int, batch: int = 256) -> Tensor:
    """int32 (N, length) blocks: [BOS] + length − 2 tokens of the EOS-joined stream + [EOS]."""
    if length < 3:
        raise UserError(f"model.length = {length}: expected at least 3 (BOS, a token, EOS)")
    bos, eos, chunk = tok.bos_token_id, tok.eos_token_id, length - 2
    stream: list[int] = []
    blocks: list[Tensor] = []
    docs = iter(docs)
    while texts := list(itertools.islice(docs, batch)):
        # The Rust backend directly: no Python overhead, and no "longer than the model's maximum
        # length" warning, which is wrong here since packing cuts the stream into blocks anyway.
        for enc in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
            stream.extend(enc.ids)
            stream.append(eos)
        n = len(stream) // chunk
        if n:
            body = torch.tensor(stream[: n * chunk], dtype=torch.int32).view(n, chunk)
            ends = torch.tensor([[bos], [eos]], dtype=torch.int32).T.expand(n, 2)
            blocks.append(torch.cat([ends[:, :1], body, ends[:, 1:]], dim=1))
            del stream[: n * chunk]
    return torch.cat(blocks) if blocks else torch.empty(0, length, dtype=torch.int32)


def _cache_key(cfg: DataConfig, tok, length: int) -> str:
    h = hashlib.sha256()
    # "split-2": local sources are split by paths relative to the source (older caches are stale).
    for part in ("split-2", cfg.source, cfg.subset, cfg.split, cfg.valid_split, cfg.valid_fraction,
                 cfg.text_field, cfg.max_docs, length, tok.backend_tokenizer.to_str(),
                 *((cfg.sudoku_givens, cfg.sudoku_train) if cfg.source == SUDOKU else ())):
        h.update(repr(part).encode() + b"\0")
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    """Where packed corpora are cached: $SMDLM_CACHE/data, by default ~/.cache/smdlm/data."""
    return Path(os.environ.get("SMDLM_CACHE", Path.home() / ".cache" / "smdlm")) / "data"


def sudoku_split(cfg: DataConfig, split: str) -> list[tuple[str, str]]:
    """(givens, solution) strings of a sudoku split, generated once and cached as JSON."""
    n = {"train": cfg.sudoku_train, "valid": SUDOKU_VALID, "test": cfg.sudoku_test}[split]
    file = cache_dir() / f"sudoku-{cfg.sudoku_givens}-{split}-{n}.json"
    if file.exists():
        return [tuple(p) for p in read_json(file)]
    from smdlm_cli.core import sudoku

    out = sudoku.generate(split, n, cfg.sudoku_givens)
    atomic_write_json(file, out)
    return out


def prompt_length(cfg: DataConfig) -> int:
    """Tokens at the start of every block that are a prompt, never masked: [BOS] + the givens."""
    return 1 + 81 if cfg.source == SUDOKU else 0


def sudoku_blocks(cfg: DataConfig, tok, length: int, split: str) -> Tensor:
    """int32 (N, 163): [BOS] + givens + solution, one puzzle a block, one token a cell."""
    if length != 163:
        raise UserError(f"model.length = {length}: a sudoku block is 163 tokens ([BOS], 81 givens, "
                        f"81 solution cells); expected model.length = 163")
    rows = []
    for givens, solution in sudoku_split(cfg, split):
        ids = [tok.bos_token_id] + _ids(tok, givens) + _ids(tok, solution)
        if len(ids) != length:
            raise UserError(f"data.tokenizer = {cfg.tokenizer!r}: a sudoku cell must be one token; "
                            f"expected a plain byte tokenizer (data.tokenizer = \"bpe\", "
                            f"data.vocab_size = 258)")
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.int32)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def build_corpus(cfg: DataConfig, tok, length: int, cache_dir: Path) -> tuple[Tensor, Tensor]:
    """(train, valid) int32 blocks, packed once and then read from cache_dir."""
    file = Path(cache_dir) / f"blocks-{_cache_key(cfg, tok, length)}.safetensors"
    if file.exists():
        cached = load_tensors(file)
        return cached["train"], cached["valid"]
    if cfg.source == SUDOKU:
        out = {split: sudoku_blocks(cfg, tok, length, split) for split in ("train", "valid")}
    else:
        out = {split: pack_blocks(iter_documents(cfg, split), tok, length)
               for split in ("train", "valid")}
    for split, blocks in out.items():
        if blocks.shape[0] == 0:
            name = "validation" if split == "valid" else "training"
            raise UserError(f"data.source = {cfg.source!r}: too little {name} text for one block of "
                            f"{length} tokens; expected more documents (data.max_docs, "
                            f"data.valid_fraction) or a shorter model.length")
    atomic_save_tensors(file, out)
    return out["train"], out["valid"]


class BlockLoader(ShardedLoader):
    """Endless shuffled (B, L) batches of packed blocks, rank-sharded and resumable (loader.py)."""

    what = "training blocks"

    def __init__(self, blocks: Tensor, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.blocks = blocks
        super().__init__(blocks.shape[0], batch_size, seed, rank, world)

    def fetch(self, rows: list[int]) -> Tensor:
        return self.blocks[rows].long()


def valid_batches(blocks: Tensor, batch_size: int, n_batches: int) -> list[Tensor]:
    """The first n_batches batches of the validation blocks, in order (loader.validation_chunks)."""
    return [blocks[c.start:c.stop].long() for c in validation_chunks(blocks.shape[0], batch_size,
                                                                      n_batches)]
