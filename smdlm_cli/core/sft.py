"""Supervised fine-tuning data: chat or prompt/response examples -> (ids, prompt length) -> batches.

Sources: a local JSONL (objects with `messages` [{role, content}, ...], or `prompt` and
`response`), an HF dataset name (same fields; Ling-Coder-SFT's HUMAN/ASSISTANT roles are mapped to
user/assistant), or `python-functions`: an SFT set built offline from the functions of the Python
standard library that have a docstring (prompt: the signature and the docstring's first paragraph;
response: the function in a ```python block).
Tokenisation as the SM paper's preprocessing: the chat template over the whole conversation gives
the ids; the template over the prompt turns with the generation prompt gives the prompt length.
Examples longer than `max_length`, with fewer than `min_response_tokens` response tokens, or
holding a token of `finetune.drop_token_ids` are dropped; `finetune.mix` adds more datasets (the
paper's Dream-7B run: tulu-3-sft-mixture with smoltalk). A batch is right-padded with EOS to its longest example plus a random 0..pad_jitter-1
tokens, rounded up to a multiple of 8, as the paper's collator (so the model learns to end
answers with EOS); `maskable` marks the response (and the padding when it is supervised).

Not here: the noise and the loss (core/trainer.py), pretraining corpora (data.py).
"""

from __future__ import annotations

import ast
import io
import itertools
import json
import random
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from smdlm_cli.core import hub
from smdlm_cli.core.config import DataConfig
from smdlm_cli.core.data import _is_valid, cache_dir, stdlib_files
from smdlm_cli.core.io import atomic_write_json, read_json
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.loader import ShardedLoader, validation_chunks

BUILTIN = "python-functions"
ROLES = {"human": "user", "assistant": "assistant", "user": "user", "system": "system",
         "gpt": "assistant"}


def source_segment(lines: list[str], node: ast.AST) -> str:
    """ast.get_source_segment(source, node) for the file's lines split once: that function
    re-splits the whole file on every call, which made the python-functions set take minutes."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first].encode()[node.col_offset:node.end_col_offset].decode()
    head = lines[first].encode()[node.col_offset:].decode()
    tail = lines[last].encode()[:node.end_col_offset].decode()
    return "".join([head, *lines[first + 1:last], tail])


def _functions() -> list[tuple[str, dict]]:
    """(key, {prompt, response}) for stdlib functions with a docstring and a short body; built
    once per Python version and cached as JSON beside the packed corpora (parsing the 1,800
    standard-library files takes about 18 s on one core)."""
    file = cache_dir() / f"python-functions-{sys.version.split()[0]}-{_SET_VERSION}.json"
    if file.is_file():
        try:
            return [(key, row) for key, row in read_json(file)]
        except (ValueError, TypeError):  # a damaged cache is rebuilt, never trusted
            pass
    rows = list(_scan_functions())
    atomic_write_json(file, rows)
    return rows


_SET_VERSION = 1  # bump when _scan_functions changes what it yields


def _scan_functions() -> Iterator[tuple[str, dict]]:
    for path in stdlib_files():
        try:
            source = path.read_text(errors="replace")
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = io.StringIO(source, newline="").readlines()  # split once, not per function
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            code = source_segment(lines, node)
            if not doc or not code or len(code) > 1500:
                continue
            summary = doc.strip().split("\n\n")[0].replace("\n", " ")
            signature = f"{node.name}({ast.unparse(node.args)})"
            yield (f"{path.name}:{node.name}",
                   {"prompt": f"Write a Python function `{signature}`: {summary}",
                    "response": f"```python\n{code}\n```"})


def _local(path: Path) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as lines:
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    yield f"{path.name}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"data.source = {str(path)!r}: line {n} is not JSON ({e.msg})") from None


def _hub(cfg: DataConfig) -> Iterator[tuple[str, dict]]:
    rows = hub.load_dataset("data.source", cfg.source, cfg.subset or None, split=cfg.split,
                            streaming=cfg.streaming, expected="a JSONL of chat or prompt/response "
                            "examples, python-functions, or a cached dataset name")
    for n, row in enumerate(rows):
        yield f"{cfg.source}:{n}", dict(row)


def messages(row: dict, where: str) -> tuple[list[dict], dict]:
    """(prompt turns, the final response turn) of one example."""
    if isinstance(row.get("messages"), list) and row["messages"]:
        turns = []
        for m in row["messages"]:
            role = ROLES.get(str(m.get("role", "")).lower()) if isinstance(m, dict) else None
            if role is None or not isinstance(m.get("content"), str):
                raise UserError(f"{where}: a message lacks a known role and string content "
                                f"(expected user/assistant/system)")
            turns.append({"role": role, "content": m["content"]})
        if turns[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message is not the assistant's; expected a response")
        return turns[:-1], turns[-1]
    if isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        return [{"role": "user", "content": row["prompt"]}], {"role": "assistant",
                                                              "content": row["response"]}
    raise UserError(f"{where}: expected `messages` or `prompt` and `response`")


def examples(cfg: DataConfig, split: str) -> Iterator[tuple[list[dict], dict]]:
    """The (prompt turns, response) of the split: valid_fraction of them by a hash of the key."""
    if cfg.source == BUILTIN:
        rows = _functions()
    elif Path(cfg.source).is_file():
        rows = _local(Path(cfg.source))
    else:
        rows = _hub(cfg)
    want_valid = split == "valid"
    kept = ((key, row) for key, row in rows if _is_valid(key, cfg.valid_fraction) == want_valid)
    for key, row in itertools.islice(kept, cfg.max_docs or None):
        yield messages(row, f"data.source {cfg.source!r} example {key}")


def tokenize(tok, prompt: list[dict], response: dict) -> tuple[list[int], int]:
    """(ids of the whole conversation, number of prompt ids incl. the assistant header)."""
    full = tok.apply_chat_template(prompt + [response], tokenize=True)
    head = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)
    full, head = _ids(full), _ids(head)
    if full[:len(head)] != head:
        raise UserError("the chat template does not render the prompt as a prefix of the "
                        "conversation; expected a template like ChatML")
    return full, len(head)


def _ids(out) -> list[int]:
    # apply_chat_template returns a list, or a BatchEncoding with input_ids, by version
    return list(out["input_ids"] if not isinstance(out, list) else out)


def build(cfg: DataConfig, tok, max_length: int, min_response: int, split: str,
          mix: Sequence[str] = (), drop_ids: Sequence[int] = ()) -> list[tuple[list[int], int]]:
    """(ids, prompt length) of the split's examples that fit, from data.source and the `mix`
    datasets ("name" or "name:subset", read like data.source); an example holding any of
    `drop_ids` is dropped (the paper drops Qwen's tool-call tags 151657/151658). A mix is shuffled
    (seed 0) and cut to data.max_docs examples in all, as the paper's preprocessing."""
    if not getattr(tok, "chat_template", None):
        raise UserError("fine-tuning needs a tokenizer with a chat template; the base model's "
                        "tokenizer has none")
    sources = [cfg] + [replace(cfg, source=name, subset=subset)
                       for name, _, subset in (m.partition(":") for m in mix)]
    drop = set(drop_ids)
    out = []
    for source in sources:
        for prompt, response in examples(source, split):
            ids, n_prompt = tokenize(tok, prompt, response)
            if len(ids) <= max_length and len(ids) - n_prompt >= min_response \
                    and not drop.intersection(ids):
                out.append((ids, n_prompt))
    if mix:
        random.Random(0).shuffle(out)
        out = out[:cfg.max_docs or None]
    if not out:
        raise UserError(f"data.source = {cfg.source!r}: no {split} example fits "
                        f"finetune.max_length = {max_length} with >= {min_response} response tokens")
    return out


@dataclass
class SFTBatch:
    input_ids: Tensor          # (B, L) long, right-padded with EOS
    maskable: Tensor           # (B, L) bool: response (and padding, when supervised)
    attention_mask: Tensor | None  # (B, L) when padding is not supervised (pads never attended)

    def to(self, device) -> "SFTBatch":
        return SFTBatch(self.input_ids.to(device), self.maskable.to(device),
                        None if self.attention_mask is None else self.attention_mask.to(device))


def collate(items: list[tuple[list[int], int]], pad_id: int, pad_supervised: bool,
            jitter: int, rng: random.Random) -> SFTBatch:
    longest = max(len(ids) for ids, _ in items)
    width = -(-(longest + (rng.randrange(jitter) if jitter > 0 else 0)) // 8) * 8
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    maskable = torch.zeros(len(items), width, dtype=torch.bool)
    real = torch.zeros(len(items), width, dtype=torch.long)
    for b, (row, n_prompt) in enumerate(items):
        ids[b, :len(row)] = torch.tensor(row)
        real[b, :len(row)] = 1
        maskable[b, n_prompt:] = pad_supervised  # the padding, then the response itself
        maskable[b, n_prompt:len(row)] = True
    return SFTBatch(ids, maskable, None if pad_supervised else real)


class SFTLoader(ShardedLoader):
    """Endless shuffled SFT batches, rank-sharded and resumable (loader.py); a batch's padding
    jitter comes from (seed, epoch, position), so a resumed run pads as the uninterrupted one."""

    what = "fine-tuning examples"

    def __init__(self, items, batch_size: int, seed: int, pad_id: int, pad_supervised: bool,
                 jitter: int, rank: int = 0, world: int = 1):
        self.items, self.pad_id, self.pad_supervised, self.jitter = items, pad_id, pad_supervised, jitter
        super().__init__(len(items), batch_size, seed, rank, world)

    def fetch(self, rows: list[int]) -> SFTBatch:
        rng = random.Random(self.seed * 7_919 + self.epoch * 100_003 + self.pos)
        return collate([self.items[i] for i in rows], self.pad_id, self.pad_supervised,
                       self.jitter, rng)


def valid_batches(items, batch_size: int, n_batches: int, pad_id: int, pad_supervised: bool) -> list[SFTBatch]:
    """The first n_batches batches of the validation examples, in order, without padding jitter."""
    rng = random.Random(0)
    return [collate(items[c.start:c.stop], pad_id, pad_supervised, 0, rng)
            for c in validation_chunks(len(items), batch_size, n_batches)]
