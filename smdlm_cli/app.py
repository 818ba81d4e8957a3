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

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from smdlm_cli import __version__
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

# The placeholders take any arguments, so that scripts written against the future command get the
# clear "not available yet" line rather than a usage error about an option.
_ANY_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


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


@app.command()
def pretrain(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", show_default=False,
                                           help="TOML recipe file (see recipes/)")],
    out: Annotated[Optional[Path], typer.Option("--out", metavar="DIR",
                                                help="run directory to write; default: one "
                                                     "under ./runs")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run in the run directory "
                                                          "from its last saved state")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE",
                                                      help="override a recipe key, e.g. "
                                                           "train.steps=100 (repeatable)")] = None,
) -> None:
    """Train an MDLM from scratch or continue one, binary or soft-masked."""
    loaded = load_recipe(recipe, set_ or [])
    from smdlm_cli.commands import pretrain as command

    run_dir = command.run(loaded, recipe_path=recipe, out=out, resume=resume)
    # Progress goes to stderr; stdout carries only the result, so run=$(smdlm pretrain ...) works.
    _out().print(Text(str(run_dir)))


@app.command(context_settings=_ANY_ARGS)
def finetune() -> None:
    """DoRA/LoRA fine-tune a large MDLM (Dream-7B, Dream-Coder-7B) with SM (not available yet)."""
    from smdlm_cli.commands import finetune as command

    command.run()


@app.command(context_settings=_ANY_ARGS)
def sample() -> None:
    """Generate with the MDLM, ReMDM and confidence samplers, SM feedback (not available yet)."""
    from smdlm_cli.commands import sample as command

    command.run()


@app.command(context_settings=_ANY_ARGS)
def evaluate() -> None:
    """Evaluate: humaneval, mbpp, elbo, genppl, mauve, sweep (not available yet)."""
    from smdlm_cli.commands import evaluate as command

    command.run()


@app.command("inspect-lambda", context_settings=_ANY_ARGS)
def inspect_lambda() -> None:
    """The learned omega and lambda(p): table, curve plot, in decoding (not available yet)."""
    from smdlm_cli.commands import inspect_lambda as command

    command.run()


def main() -> None:
    """Entry point of the `smdlm` console script and of `python -m smdlm_cli`."""
    app(prog_name="smdlm")
