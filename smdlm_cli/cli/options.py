"""Every command-line option that more than one command takes, declared once.

`decoding(...)` adds the sampling options of `smdlm sample` to any command that decodes (the
evaluations, inspect-lambda) and hands them over as one `SampleSettings`, so a flag's name, help
and default are written in one place and commands take keyword arguments, never long positional
lists. Imports stay light: torch is loaded only when a command runs.

Not here: what the options do (commands/).
"""

import functools
import inspect
import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from smdlm_cli.core.errors import UserError


def out() -> Console:
    """stdout, built per use so it writes to the sys.stdout of the moment (test runners swap it)."""
    return Console(soft_wrap=True, highlight=False)


def err() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


# --- runs and files -----------------------------------------------------------------------------
Ckpt = Annotated[Optional[str], typer.Option("--ckpt", metavar="DIR",
                                             help="run directory; default: newest under ./runs")]
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N")]
ReportOut = Annotated[Optional[str], typer.Option("--out", metavar="FILE", help="report to write; "
                                                  "default RUN/reports/<task>-<time>.json")]
AsJson = Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout")]
Samples = Annotated[Optional[str], typer.Option("--samples", metavar="FILE",
                                                help="score these samples (JSONL) instead of "
                                                     "sampling; no checkpoint needed")]
Scorer = Annotated[str, typer.Option("--scorer", help="causal LM: an HF name or directory, or an "
                                     "smdlm AR run (offline)")]
RunOut = Annotated[Optional[Path], typer.Option("--out", metavar="DIR", help="run directory to "
                                                "write; default: one under ./runs")]
Resume = Annotated[bool, typer.Option("--resume", help="continue the run in the run directory "
                                      "from its last saved state")]
SetKV = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="override "
                                                    "a recipe key, e.g. train.steps=100 "
                                                    "(repeatable)")]
Seed = Annotated[int, typer.Option("--seed", help="first sampling seed; sample i uses seed + i")]

# --- decoding: name -> (annotation, default) ------------------------------------------------------
DECODING = {
    "nfe": (Annotated[Optional[int], typer.Option(
        "--nfe", help="denoising steps (forward passes at most); code tasks default to one step "
                      "per generated token")], None),
    "k": (Annotated[Optional[int], typer.Option(
        "--k", help="soft-masking top-k; default the checkpoint's; 0 decodes with binary "
                    "masks")], None),
    "sampler": (Annotated[Optional[str], typer.Option(
        "--sampler", help="mdlm, remdm-cap, remdm-loop or confidence; default the run's "
                          "sampler.json (a Dream run: confidence, the paper's options), else mdlm "
                          "(ar for an AR run)")], None),
    "num_samples": (Annotated[int, typer.Option("--num-samples", help="samples to draw")], 4),
    "batch_size": (Annotated[int, typer.Option("--batch-size", help="rows decoded together")], 8),
    "length": (Annotated[Optional[int], typer.Option(
        "--length", help="tokens per sample, BOS included; default the model's length")], None),
    "top_p": (Annotated[Optional[float], typer.Option("--top-p", help="nucleus mass")], None),
    "temperature": (Annotated[Optional[float], typer.Option(
        "--temperature", help="softmax temperature of the sampler's draws; default the "
                              "sampler's")], None),
    "option": (Annotated[Optional[list[str]], typer.Option(
        "--option", "-o", metavar="KEY=VALUE", help="sampler option, e.g. block_length=32, "
        "cache=dual, threshold=0.9, alg=entropy (repeatable)")], None),
    "seed": (Seed, 0),
    "sm_schedule": (Annotated[str, typer.Option("--sm-schedule", help="none, linear or "
                                                "stepwise")], "none"),
    "exact": (Annotated[Optional[bool], typer.Option(
        "--exact/--no-exact", help="a forward at every step, also at one that changes nothing (SM "
        "feedback keeps refining); default: the model's (Dream yes, as its own loop; MDLM no)")],
        None),
    "device": (Device, "auto"),
    "ckpt": (Ckpt, None),
    "compile": (Annotated[bool, typer.Option(
        "--compile", help="torch.compile the transformer blocks for decoding without a KV cache "
                          "(needs a C compiler; the first forwards are slower while it "
                          "compiles)")], False),
}


def decoding(*names: str, **defaults):
    """Add the DECODING options `names` to a command; it receives them as `decoding`, a
    SampleSettings (the rest at their defaults; `defaults` overrides a flag's default)."""
    def wrap(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "decoding"]
        added = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=DECODING[n][0],
                                   default=defaults.get(n, DECODING[n][1])) for n in names]

        @functools.wraps(fn)
        def command(**kwargs):
            from smdlm_cli.commands.sample import SampleSettings, parse_options

            given = {n: kwargs.pop(n) for n in names}
            given["options"] = parse_options(given.pop("option", None))
            given = {k: v for k, v in given.items() if v is not None or k == "k"}
            return fn(decoding=SampleSettings(**given), **kwargs)

        command.__signature__ = sig.replace(parameters=own + added)
        command.__annotations__ = {}
        return command
    return wrap


def emit(report: dict, path, as_json: bool, lines: list[str]) -> None:
    """Summary lines to stderr; the report's path (or, with --json, the report) to stdout."""
    for line in lines:
        err().print(line)
    if as_json:
        print(json.dumps(report))
    else:
        print(path)


def ints(flag: str, text: str) -> list[int]:
    """--flag 1,10 -> [1, 10], or a one-line error."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"{flag} {text}: expected comma-separated integers, e.g. 1,10")
    return values
