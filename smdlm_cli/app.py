"""The `smdlm` command line: one thin Typer function per subcommand, parsing and printing only.

Each command parses its arguments, loads the recipe where it takes one, and hands over to
smdlm_cli/commands/<name>.py, imported only when the command runs so that `smdlm --help` and a
bad recipe never wait for torch. Errors are handled in one place, `_Group.invoke`: a `UserError`
from anywhere (recipe, core, command) becomes the single line `error: <message>` on stderr and exit
code 2; Ctrl-C becomes one line and exit code 130; any other exception is a bug and keeps its
traceback. Typer's own usage errors exit 2 as well.

What this is not: the place for logic. Anything a command computes lives in its command module or
in the core, where tests and library users reach it without the CLI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from smdlm_cli import __version__
from smdlm_cli.cli_evaluate import evaluate_app
from smdlm_cli.core.errors import UserError
from smdlm_cli.recipe import load_recipe

# Consoles are built per use so they write to the sys.stdout/sys.stderr of the moment (test
# runners swap them); soft_wrap keeps an error on one line however long it is.


def _out() -> Console:
    return Console(soft_wrap=True, highlight=False)


def _err() -> Console:
    return Console(stderr=True, soft_wrap=True, highlight=False)


class _Group(TyperGroup):
    """The smdlm command group; turns user errors and Ctrl-C into one line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            # One line even if a message slipped in a newline: scripts and CI logs grep for it.
            message = " ".join(line.strip() for line in str(e).splitlines())
            _err().print(Text.assemble(("error:", "bold red"), " ", message))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _err().print(Text("interrupted", style="yellow"))
            raise typer.Exit(130) from None


app = typer.Typer(
    name="smdlm",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    # Bugs should print the plain Python traceback that a bug report can quote.
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        _out().print(f"smdlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Soft-Masked diffusion language models: pretrain, fine-tune, sample, evaluate, inspect."""


# The options pretrain and finetune share.
RunOut = Annotated[Optional[Path], typer.Option("--out", metavar="DIR", help="run directory to "
                                                "write; default: one under ./runs")]
Resume = Annotated[bool, typer.Option("--resume", help="continue the run in the run directory "
                                      "from its last saved state")]
SetKV = Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="override "
                                                    "a recipe key, e.g. train.steps=100 "
                                                    "(repeatable)")]


@app.command()
def pretrain(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", show_default=False,
                                           help="TOML recipe file (see recipes/)")],
    out: RunOut = None, resume: Resume = False, set_: SetKV = None,
) -> None:
    """Train an MDLM from scratch or continue one, binary or soft-masked."""
    loaded = load_recipe(recipe, set_ or [])
    from smdlm_cli.commands import pretrain as command

    run_dir = command.run(loaded, recipe_path=recipe, out=out, resume=resume)
    # Progress goes to stderr; stdout carries only the result, so run=$(smdlm pretrain ...) works.
    _out().print(Text(str(run_dir)))


@app.command()
def finetune(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", show_default=False,
                                           help="TOML recipe file (see recipes/dream-*.toml)")],
    out: RunOut = None, resume: Resume = False,
    merge: Annotated[bool, typer.Option("--merge", help="also write the merged model "
                                                        "(config.json + model.safetensors)")] = False,
    set_: SetKV = None,
) -> None:
    """DoRA/LoRA fine-tune a large MDLM (Dream-7B, Dream-Coder-7B) with soft-masking."""
    loaded = load_recipe(recipe, set_ or [])
    from smdlm_cli.commands import finetune as command

    _out().print(Text(str(command.run(loaded, recipe_path=recipe, out=out, resume=resume,
                                      merge=merge))))


@app.command()
def sample(
    nfe: Annotated[int, typer.Option("--nfe", help="denoising steps (forward passes at most)")] = 128,
    k: Annotated[Optional[int], typer.Option("--k", help="soft-masking top-k; default the "
                                             "checkpoint's; 0 decodes with binary masks")] = None,
    ckpt: Annotated[Optional[str], typer.Option("--ckpt", metavar="DIR",
                                                help="run directory; default: newest under ./runs")] = None,
    sampler: Annotated[Optional[str], typer.Option(
        "--sampler", help="mdlm, remdm-cap, remdm-loop or confidence; ar for an AR run; "
                          "default mdlm (ar for an AR run)")] = None,
    num_samples: Annotated[int, typer.Option("--num-samples", help="samples to draw")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="samples decoded together")] = 8,
    length: Annotated[Optional[int], typer.Option("--length", help="tokens per sample, BOS "
                                                  "included; default the model's length")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="text every sample "
                                                        "starts with (repeatable: rows cycle)")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="one prompt per "
                                                        "line")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap each prompt in the tokenizer's chat "
                                       "template (instruct models)")] = False,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="nucleus mass")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature")] = None,
    option: Annotated[Optional[list[str]], typer.Option(
        "--option", "-o", metavar="KEY=VALUE", help="sampler option, e.g. block_length=32, "
        "cache=dual, threshold=0.9, alg=entropy (repeatable)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="sample i uses seed + i")] = 0,
    sm_schedule: Annotated[str, typer.Option("--sm-schedule", help="none, linear or stepwise")] = "none",
    exact: Annotated[bool, typer.Option("--exact", help="recompute instead of reusing a step "
                                                        "that changed nothing")] = False,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N")] = "auto",
    out: Annotated[Optional[str], typer.Option("--out", metavar="FILE", help="JSONL to write; "
                                               "default DIR/samples/samples-<time>.jsonl")] = None,
    show_steps: Annotated[bool, typer.Option("--show-steps", help="replay the first sample's "
                                             "denoising, masks shaded by lambda")] = False,
) -> None:
    """Generate samples from a run: any sampler, binary or soft-masked; JSONL + JSON sidecar."""
    from smdlm_cli.commands import sample as command

    prompts = list(prompt or [])
    if prompt_file is not None:
        try:
            prompts += [line for line in prompt_file.read_text().splitlines() if line.strip()]
        except OSError as e:
            raise UserError(f"--prompt-file {prompt_file}: {e.strerror}") from None
    settings = command.SampleSettings(
        ckpt=ckpt, nfe=nfe, k=k, sampler=sampler, num_samples=num_samples, batch_size=batch_size,
        length=length, prompts=prompts, top_p=top_p, temperature=temperature, seed=seed,
        sm_schedule=sm_schedule, exact=exact, device=device, out=out,
        options=command.parse_options(option), chat=chat)
    _out().print(Text(str(command.run(settings, show_steps=show_steps))))


@app.command("inspect-lambda")
def inspect_lambda(
    target: Annotated[Optional[str], typer.Argument(metavar="[RUN_OR_JSON]", show_default=False,
                                                    help="run directory, softmask.json or official "
                                                         "transparency_config.json; default: newest "
                                                         "run under ./runs")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON only")] = False,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="FILE", help="curve plot; "
                                                "default RUN/lambda.png")] = None,
    decode: Annotated[bool, typer.Option("--decode", help="also sample and plot lambda over the "
                                                          "decoding steps")] = False,
    nfe: Annotated[int, typer.Option("--nfe", help="steps of the --decode pass")] = 32,
    num_samples: Annotated[int, typer.Option("--num-samples", help="samples of the --decode "
                                             "pass")] = 8,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    length: Annotated[Optional[int], typer.Option("--length", help="tokens per --decode sample")] = None,
    decode_png: Annotated[Optional[Path], typer.Option("--decode-png", metavar="FILE",
                                                       help="default RUN/lambda-decode.png")] = None,
) -> None:
    """The learned omega and lambda(H): table, curve (terminal and PNG), lambda during decoding."""
    import json

    from smdlm_cli.commands import inspect_lambda as command

    info, path = command.run(target, png, decode, nfe, num_samples, seed, length, decode_png)
    if as_json:
        print(json.dumps(info))
    else:
        command.show(info, path, _out())


@app.command("reproduce")
def reproduce(
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="recipes/repro/cpu or "
                                              "recipes/repro/gpu: six training recipes and "
                                              "reproduce.toml")],
    stage: Annotated[Optional[list[str]], typer.Option("--stage", help="run only this stage "
                     "(repeatable): base, ar, binary, sm-iso-update, sm-iso-compute, "
                     "sm-on, lambda, cache, sweep-<sampler>, sm-on-sweep, report")] = None,
    runs: Annotated[Optional[str], typer.Option("--runs", metavar="DIR", help="outputs; default "
                                                "reproduce.runs")] = None,
    report: Annotated[Optional[str], typer.Option("--report", metavar="FILE", help="Markdown "
                                                  "report; default reproduce.report")] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="a few steps and samples: checks the whole "
                                        "chain in minutes (numbers meaningless)")] = False,
) -> None:
    """The paper's main experiment at small scale: train, evaluate, write the report; resumable."""
    from smdlm_cli.commands import reproduce as command

    path = command.run(directory, stage, runs, report, smoke)
    _out().print(f"report written to {path}" if path else "done (add --stage report to rewrite "
                 "the report)")


app.add_typer(evaluate_app, name="evaluate")


def main() -> None:
    """Entry point of the `smdlm` console script and of `python -m smdlm_cli`."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        app(prog_name="smdlm")
        return
    code: object = 0
    try:
        app(prog_name="smdlm")
    except SystemExit as done:
        code = done.code
    # A torchrun worker leaves without finalizing the interpreter. Gloo's worker threads drop
    # their references to a collective's tensors a moment after it completes, and dropping one
    # takes the GIL; if finalization has begun by then, Python ends that thread inside a C++
    # destructor and the process aborts (SIGABRT) after a run that saved correctly (seen 1 run in
    # 60 of the README's two-rank pretrain). Every file is closed by now; only stdio is buffered.
    if not isinstance(code, int):  # sys.exit("message") or sys.exit(None)
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
