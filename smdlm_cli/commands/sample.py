"""`smdlm sample`: generate from a run with any sampler, binary or soft-masked.

A sample is one block of the model's length, shaped as training data: [BOS], then the prompt's
tokens (if any), then masks to the end; the sampler fills the masks. Row b of the output draws its
randomness from seed + b, so any row can be reproduced alone. Results go to a JSONL file (one
object per sample) with a JSON sidecar holding every setting, the package versions and the
checkpoint's sha256.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from smdlm_cli.core import checkpoint
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_write_json, atomic_write_text
from smdlm_cli.core.models import load_model
from smdlm_cli.core.samplers import decode, validate_sampler_args
from smdlm_cli.core.softmask import SoftMask
from smdlm_cli.core.tokenizer import chat_prompt, load_tokenizer
from smdlm_cli.evals.report import checkpoint_info, versions

console = Console(stderr=True, soft_wrap=True, highlight=False)


@dataclass
class SampleSettings:
    ckpt: str | None = None
    nfe: int = 128
    k: int | None = None            # None: the checkpoint's SoftMask; 0: binary decoding
    sampler: str | None = None      # None: mdlm, or ar for an AR (causal) run
    num_samples: int = 4
    batch_size: int = 8
    length: int | None = None       # None: the model's training length
    prompts: list[str] = field(default_factory=list)
    top_p: float | None = None
    temperature: float | None = None
    seed: int = 0
    sm_schedule: str = "none"
    exact: bool = False
    device: str = "auto"
    out: str | None = None
    options: dict = field(default_factory=dict)  # further sampler options (--option KEY=VALUE)
    chat: bool = False              # prompts go through the tokenizer's chat template


def parse_options(pairs: list[str] | None) -> dict:
    """--option KEY=VALUE pairs -> {key: value}: none -> None, then int, float, or the text."""
    options = {}
    for pair in pairs or []:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--option {pair}: expected KEY=VALUE, e.g. cache=dual or threshold=0.9")
        value: object = text.strip()
        if value.lower() == "none":
            value = None
        else:
            for kind in (int, float):
                try:
                    value = kind(text)
                    break
                except ValueError:
                    pass
        options[key.strip()] = value
    return options


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return device


def resolve_run(ckpt: str | None) -> Path:
    if ckpt is None:
        run_dir = checkpoint.find_latest_run("runs")
        console.print(f"sampling from {run_dir} (the newest run under runs/; --ckpt picks another)")
        return run_dir
    if not Path(ckpt).is_dir():
        raise UserError(f"--ckpt {ckpt}: no such run directory")
    return Path(ckpt)


def load_run(run_dir: Path, device: torch.device):
    """(model, tokenizer, SoftMask or None) of a run directory."""
    tok_dir = run_dir / "tokenizer"
    tok = load_tokenizer(str(tok_dir if tok_dir.is_dir() else run_dir))
    model = load_model(str(run_dir), device=device).eval()
    if len(tok) > model.vocab_size or tok.mask_token_id != model.mask_id:
        raise UserError(f"{run_dir}: tokenizer ({len(tok)} ids, mask {tok.mask_token_id}) does not "
                        f"match the model ({model.vocab_size} ids, mask {model.mask_id})")
    return model, tok, checkpoint.load_softmask(run_dir)


def choose_softmask(softmask: SoftMask | None, k: int | None, run_dir: Path) -> SoftMask | None:
    """--k N overrides the checkpoint's k; --k 0 decodes with binary masks."""
    if k is None or k == 0:
        return None if k == 0 else softmask
    if k < 0:
        raise UserError(f"--k {k}: expected 0 (binary decoding) or a positive top-k size")
    if softmask is None:
        raise UserError(f"--k {k}: {run_dir} has no soft-masking parameters (a binary run); "
                        f"use --k 0 or train with [softmask] enabled = true")
    softmask = copy.deepcopy(softmask)  # the caller's (perhaps shared) SoftMask keeps its k
    softmask.k = k
    return softmask


def build_inputs(tok, prompts: list[str], n: int, length: int, mask_id: int,
                 bos: bool = True) -> tuple[torch.Tensor, list[str]]:
    """(n, length) ids: [BOS] (for models trained on BOS blocks) + prompt + masks, prompts cycled."""
    texts = [prompts[i % len(prompts)] if prompts else "" for i in range(n)]
    x = torch.full((n, length), mask_id, dtype=torch.long)
    start = int(bos)
    if bos:
        x[:, 0] = tok.bos_token_id
    for i, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"] if text else []
        if start + len(ids) >= length:
            raise UserError(f"--length {length}: prompt {text[:40]!r} takes {len(ids)} tokens; "
                            f"expected a length above {start} + the prompt's tokens")
        x[i, start:start + len(ids)] = torch.tensor(ids, dtype=torch.long)
    return x, texts


def _check(s: SampleSettings, model_length: int) -> int:
    for flag, value, lo in (("--nfe", s.nfe, 1), ("--num-samples", s.num_samples, 1),
                            ("--batch-size", s.batch_size, 1)):
        if value < lo:
            raise UserError(f"{flag} {value}: expected an integer >= {lo}")
    length = s.length or model_length
    if not 2 <= length <= model_length:
        raise UserError(f"--length {length}: expected 2 to {model_length} (the model's length)")
    validate_sampler_args(s.sampler, steps=s.nfe, **_sampler_options(s))
    return length


def _sampler_options(s: SampleSettings) -> dict:
    flags = {k: v for k, v in (("top_p", s.top_p), ("temperature", s.temperature)) if v is not None}
    return {**s.options, **flags}


def generate(s: SampleSettings, trace: bool = False, loaded: tuple | None = None,
             on_batch: Callable[[int], None] | None = None):
    """Decode every sample: (run_dir, records, sidecar, first batch's trace, tokenizer).

    `loaded`: (run_dir, model, tokenizer, softmask) already loaded on s.device, for callers that
    sample one run many times (the sweep). on_batch(rows) is called after each batch.
    """
    device = resolve_device(s.device)
    if loaded is None:
        run_dir = resolve_run(s.ckpt)
        model, tok, softmask = load_run(run_dir, device)
    else:
        run_dir, model, tok, softmask = loaded
    if s.sampler is None:
        s = replace(s, sampler="ar" if model.config.causal else "mdlm")
    length = _check(s, model.config.model_length)
    softmask = choose_softmask(softmask, s.k, run_dir)
    if softmask is not None:
        softmask = softmask.to(device)
    texts = s.prompts
    if s.chat:  # an instruct model: each prompt as the user turn, the assistant's turn open
        texts = [chat_prompt(tok, [{"role": "user", "content": p}], "--chat") for p in s.prompts or [""]]
    x, prompts = build_inputs(tok, texts, s.num_samples, length, model.mask_id,
                              bos=getattr(model, "wants_bos", True))
    records, first_trace, total = [], None, 0.0
    for start in range(0, s.num_samples, s.batch_size):
        rows = x[start:start + s.batch_size]
        seeds = [s.seed + start + j for j in range(rows.shape[0])]
        began = time.perf_counter()
        out = decode(model, rows, sampler=s.sampler, steps=s.nfe, softmask=softmask,
                     generator_seeds=seeds, sm_schedule=s.sm_schedule, exact=s.exact,
                     trace=trace and start == 0, **_sampler_options(s))
        tokens = out.tokens.cpu()  # waits for the device: the timing below is the real one
        seconds = time.perf_counter() - began
        total += seconds
        first_trace = first_trace if start else out.trace
        for j, ids in enumerate(tokens.tolist()):
            records.append({"text": tok.decode(ids, skip_special_tokens=True), "tokens": ids,
                            "prompt": prompts[start + j], "seed": seeds[j], "nfe": out.nfe,
                            "seconds": seconds / rows.shape[0]})
        if on_batch is not None:
            on_batch(rows.shape[0])
    generated = int((x == model.mask_id).sum())
    sidecar = {
        "settings": {**asdict(s), "length": length, "k": softmask.k if softmask else 0},
        "checkpoint": checkpoint_info(run_dir),
        "softmask": softmask.to_dict() if softmask else None,
        "device": str(device), "versions": versions(),
        "timing": {"seconds": total, "generated_tokens": generated,
                   "tokens_per_s": generated / max(total, 1e-9)},
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    return run_dir, records, sidecar, first_trace, tok


def write(records: list[dict], sidecar: dict, out: Path) -> None:
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(out.with_suffix(out.suffix + ".json"), sidecar)


def run(s: SampleSettings, show_steps: bool = False) -> Path:
    run_dir, records, sidecar, trace, tok = generate(s, trace=show_steps)
    out = Path(s.out) if s.out else (run_dir / "samples" /
                                     f"samples-{datetime.now():%Y%m%d-%H%M%S}.jsonl")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; expected a .jsonl file path")
    write(records, sidecar, out)
    if show_steps and trace is None:
        console.print("--show-steps: an AR model has no denoising steps to show")
    elif show_steps:
        from smdlm_cli.commands.show_steps import replay

        replay(trace, tok, console)
    t = sidecar["timing"]
    mode = f"SM k={sidecar['settings']['k']}" if sidecar["softmask"] else "binary"
    sampler = sidecar["settings"]["sampler"]
    console.print(f"{len(records)} samples, {sampler} sampler, {records[0]['nfe']} NFE, {mode}, "
                  f"{t['tokens_per_s']:,.0f} generated tokens/s")
    console.print(f"[bold]first sample:[/bold] {records[0]['text'][:400]!r}")
    return out
