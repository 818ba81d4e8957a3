"""`smdlm sample` and `smdlm inspect-lambda`: parse, then hand over to commands/."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.text import Text

from smdlm_cli.cli.options import decoding, out
from smdlm_cli.core.errors import UserError


@decoding("ckpt", "nfe", "k", "sampler", "num_samples", "batch_size", "length", "top_p",
          "temperature", "option", "seed", "sm_schedule", "exact", "device", "compile", nfe=128)
def sample(
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="text every sample "
                                                        "starts with (repeatable: rows cycle)")] = None,
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="one prompt per "
                                                        "line")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="wrap each prompt in the tokenizer's chat "
                                       "template (instruct models)")] = False,
    out_: Annotated[Optional[str], typer.Option("--out", metavar="FILE", help="JSONL to write; "
                                                "default DIR/samples/samples-<time>.jsonl")] = None,
    show_steps: Annotated[bool, typer.Option("--show-steps", help="replay the first sample's "
                                             "denoising, masks shaded by lambda")] = False,
    *, decoding,
) -> None:
    """Generate samples from a run: any sampler, binary or soft-masked; JSONL + JSON sidecar."""
    from dataclasses import replace

    from smdlm_cli.commands import sample as command

    prompts = list(prompt or [])
    if prompt_file is not None:
        prompts += command.read_prompt_file(prompt_file)
    settings = replace(decoding, prompts=prompts, chat=chat, out=out_)
    out().print(Text(str(command.run(settings, show_steps=show_steps))))


@decoding("nfe", "num_samples", "seed", "length", nfe=32, num_samples=8)
def inspect_lambda(
    target: Annotated[Optional[str], typer.Argument(metavar="RUN", show_default=False,
                                                    help="same as --ckpt (kept for older "
                                                         "scripts)")] = None,
    ckpt: Annotated[Optional[str], typer.Option(
        "--ckpt", metavar="DIR_OR_JSON", help="run directory, softmask.json or official "
        "transparency_config.json; default: newest run under ./runs")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON only")] = False,
    png: Annotated[Optional[Path], typer.Option("--png", metavar="FILE", help="curve plot; "
                                                "default RUN/lambda.png")] = None,
    decode: Annotated[bool, typer.Option("--decode", help="also sample and plot lambda over the "
                                                          "decoding steps")] = False,
    decode_png: Annotated[Optional[Path], typer.Option("--decode-png", metavar="FILE",
                                                       help="default RUN/lambda-decode.png")] = None,
    *, decoding,
) -> None:
    """The learned omega and lambda(H): table, curve (terminal and PNG), lambda during decoding."""
    from smdlm_cli.commands import inspect_lambda as command

    if target is not None and ckpt is not None and target != ckpt:
        raise UserError(f"inspect-lambda {target} --ckpt {ckpt}: name the run once")
    info, path = command.run(ckpt or target, png=png, decode=decode, sampling=decoding,
                             decode_png=decode_png)
    if as_json:
        print(json.dumps(info))
    else:
        command.show(info, path, out())


def register(app: typer.Typer) -> None:
    app.command()(sample)
    app.command("inspect-lambda")(inspect_lambda)
