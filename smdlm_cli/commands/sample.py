"""`smdlm sample`: generate from a run with any sampler, binary or soft-masked.

A sample is one block of the model's length, shaped as training data: [BOS], then the prompt's
tokens (if any), then masks to the end; the sampler fills the masks (core/generate.py, the path
every command decodes through). Row b draws its randomness from seed + b, so any row can be
reproduced alone. SampleSettings and parse_options are the decoding options every generating
command shares. Results go to a JSONL file (one
object per sample) with a JSON sidecar holding every setting, the package versions and the
checkpoint's sha256.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from rich.console import Console

from smdlm_cli.core import compiling, rundir
from smdlm_cli.core.runlock import check_output
from smdlm_cli.core.validate import read_text
from smdlm_cli.core.distributed import resolve_device
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.generate import choose_softmask, generate as core_generate
from smdlm_cli.core.io import atomic_write_json, atomic_write_text
from smdlm_cli.core.samplers import validate_sampler_args
from smdlm_cli.core.tokenizer import chat_prompt
from smdlm_cli.evals.report import checkpoint_info, versions

console = Console(stderr=True, soft_wrap=True, highlight=False)


@dataclass
class SampleSettings:
    ckpt: str | None = None
    nfe: int = 128
    k: int | None = None            # None: the checkpoint's SoftMask; 0: binary decoding
    sampler: str | None = None      # None: the run's sampler.json, else mdlm (ar for an AR run)
    num_samples: int = 4
    batch_size: int = 8
    length: int | None = None       # None: the model's training length
    prompts: list[str] = field(default_factory=list)
    top_p: float | None = None
    temperature: float | None = None
    seed: int = 0
    sm_schedule: str = "none"
    exact: bool | None = None       # None: the model's default (Dream: a forward every step)
    device: str = "auto"
    out: str | None = None
    options: dict = field(default_factory=dict)  # further sampler options (--option KEY=VALUE)
    chat: bool = False              # prompts go through the tokenizer's chat template
    compile: bool = False           # torch.compile the blocks (decoding without a KV cache)


# Why every generation can come out empty, and what to try: said once, by sample and evaluate.
EMPTY_HINT = ("{what} generated nothing but special tokens (EOS/padding): a fine-tuned model that "
              "learned to pad does this, and so does an undertrained one; try a longer fine-tune, "
              "a shorter --length / --max-new-tokens, or finetune.pad_supervised = false")


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


def read_prompt_file(path: str | Path) -> list[str]:
    """--prompt-file: one prompt per non-blank line of a UTF-8 file; a file with none is an error."""
    prompts = [line for line in read_text(path, f"--prompt-file {path}").splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"--prompt-file {path}: holds no prompt; expected one prompt per line "
                        f"(leave the flag out to sample unconditionally)")
    return prompts


def sampler_options(s: SampleSettings) -> dict:
    """--option pairs plus the --top-p / --temperature flags that were given."""
    flags = {k: v for k, v in (("top_p", s.top_p), ("temperature", s.temperature)) if v is not None}
    return {**s.options, **flags}


def open_run(ckpt: str | None, device: str) -> rundir.Run:
    """The run named by --ckpt (default: the newest under ./runs), loaded on --device."""
    return rundir.load(rundir.resolve(ckpt, announce=console.print), resolve_device(device))


def decode_settings(s: SampleSettings, run: rundir.Run) -> dict:
    """The keyword arguments of core.generate.generate that SampleSettings fix for this run."""
    for flag, value in (("--nfe", s.nfe), ("--num-samples", s.num_samples)):
        if value < 1:
            raise UserError(f"{flag} {value}: expected an integer >= 1")
    sampler = s.sampler or run.default_sampler
    # the run's recorded options (sampler.json) apply to its own sampler; flags win over them
    recorded = run.decoding.get("options", {}) if sampler == run.decoding.get("sampler") else {}
    options = {**recorded, **sampler_options(s)}
    validate_sampler_args(sampler, steps=s.nfe, **options)
    if s.compile:  # here, where every command's decoding settings are fixed: compiled once
        compiling.compile_for_decoding(run.model, sampler, options)
    return dict(sampler=sampler, nfe=s.nfe, softmask=choose_softmask(run.softmask, s.k),
                seed=s.seed, batch_size=s.batch_size, sm_schedule=s.sm_schedule, exact=s.exact,
                options=options)


def generate(s: SampleSettings, trace: bool = False, run: rundir.Run | None = None,
             on_batch: Callable[[int], None] | None = None):
    """Decode every sample: (run, records, sidecar, first batch's trace).

    `run`: already loaded on s.device, for callers that sample one run many times (the sweep).
    on_batch(rows) is called after each batch.
    """
    run = run or open_run(s.ckpt, s.device)
    tok, model = run.tokenizer, run.model
    kw = decode_settings(s, run)
    texts = s.prompts
    if s.chat:  # an instruct model: each prompt as the user turn, the assistant's turn open
        texts = [chat_prompt(tok, [{"role": "user", "content": p}], "--chat") for p in s.prompts or [""]]
    prompts = [texts[i % len(texts)] if texts else "" for i in range(s.num_samples)]
    length = model.config.model_length if s.length is None else s.length
    gen = core_generate(model, tok, prompts, length=length, trace=trace, on_batch=on_batch, **kw)
    records = [{"text": tok.decode(ids, skip_special_tokens=True), "tokens": ids, "prompt": p,
                "seed": seed, "nfe": gen.nfe, "seconds": sec}
               for ids, p, seed, sec in zip(gen.tokens, prompts, gen.seeds, gen.row_seconds)]
    softmask = kw["softmask"]
    empty = sum(not tok.decode(ids[start:], skip_special_tokens=True).strip()
                for ids, start in zip(gen.tokens, gen.start))
    sidecar = {
        "settings": {**asdict(s), "sampler": kw["sampler"], "length": length,
                     "sampler_options": kw["options"],  # --option pairs with the run's defaults
                     "k": softmask.k if softmask else 0},
        "checkpoint": checkpoint_info(run.path),
        "softmask": softmask.to_dict() if softmask else None,
        "device": str(model.embedding_weight().device), "versions": versions(),
        "empty_samples": empty,
        "timing": {"seconds": gen.seconds, "generated_tokens": gen.generated,
                   "tokens_per_s": gen.generated / max(gen.seconds, 1e-9)},
        "created": datetime.now().isoformat(timespec="seconds"),
    }
    return run, records, sidecar, gen.trace


def write(records: list[dict], sidecar: dict, out: Path) -> None:
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write_json(sidecar_path(out), sidecar)


def sidecar_path(out: Path) -> Path:
    """samples-X.jsonl -> samples-X.meta.json: the settings next to the samples they made."""
    return out.with_name(f"{out.stem}.meta.json")


def check_out(out: str) -> Path:
    """--out FILE: not a directory, and neither it nor its sidecar a run's own file."""
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {out}: is a directory; expected a .jsonl file path")
    check_output(sidecar_path(path))
    return check_output(path)


def run(s: SampleSettings, show_steps: bool = False) -> Path:
    if s.out:
        check_out(s.out)  # before decoding: a refused path should not cost a generation
    run, records, sidecar, trace = generate(s, trace=show_steps)
    tok = run.tokenizer
    out = check_out(s.out) if s.out else (run.path / "samples" /
                                          f"samples-{datetime.now():%Y%m%d-%H%M%S}.jsonl")
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
    if sidecar["empty_samples"] == len(records):
        console.print(EMPTY_HINT.format(what=f"all {len(records)} samples"))
    return out
