"""The `smdlm` root command: the group, its error handling, and the entry point.

Errors are handled in one place, `_Group.invoke`: a `UserError` from anywhere (recipe, core,
command) becomes the single line `error: <message>` on stderr and exit code 2; Ctrl-C becomes one
line and exit code 130; any other exception is a bug and keeps its traceback. Typer's own usage
errors exit 2 as well. Subcommands live in train.py, sample.py, evaluate.py and reproduce.py and
import their command modules only when they run, so `smdlm --help` and a bad recipe never wait
for torch.

What this is not: the place for logic. Anything a command computes lives in commands/ or the core,
where tests and library users reach it without the CLI.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.text import Text
from typer.core import TyperGroup

from smdlm_cli import __version__
from smdlm_cli.cli import evaluate, reproduce, sample, train
from smdlm_cli.cli.options import err, out
from smdlm_cli.core.errors import UserError


def _conventional_help() -> None:
    """typer 0.29 writes `<bool>` after every flag (`--resume <bool>` reads as if it took a value)
    and `{RECIPE}` for a required argument; give flags no type and arguments click's plain
    `RECIPE` / `[RUN]`. Private hooks of typer's: where a release drops them, its own style stays
    (tests/test_cli.py checks the help text)."""
    option, argument = typer.core.TyperOption, typer.core.TyperArgument
    if hasattr(option, "display_type_rich"):
        shown = option.display_type_rich
        option.display_type_rich = lambda self, ctx: None if self.is_flag else shown(self, ctx)
    if hasattr(argument, "_usage_display_name"):
        argument._usage_display_name = lambda self: (
            (self.display_name_raw if self.required else f"[{self.display_name_raw}]")
            + ("..." if self.nargs != 1 else ""))


_conventional_help()


class _Group(TyperGroup):
    """The smdlm command group; turns user errors and Ctrl-C into one line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            # One line even if a message slipped in a newline: scripts and CI logs grep for it.
            message = " ".join(line.strip() for line in str(e).splitlines())
            err().print(Text.assemble(("error:", "bold red"), " ", message))
            raise typer.Exit(2) from None
        except Exception as e:
            # a flag or argument click could not parse (`--seed 1e20`, a typo in an option): one
            # line, like every other bad input, instead of Typer's boxed usage block. Typer ships
            # its own copy of click, so the class is recognised by name; a bare command still
            # shows its help (NoArgsIsHelpError).
            kinds = {c.__name__ for c in type(e).__mro__}
            if "UsageError" not in kinds or "NoArgsIsHelpError" in kinds:
                raise
            where = e.ctx.command_path if e.ctx is not None else "smdlm"
            message = " ".join(e.format_message().split())
            err().print(Text.assemble(("error:", "bold red"), f" {where}: {message} (see {where} "
                                      "--help)"))
            raise typer.Exit(2) from None
        except KeyboardInterrupt as e:
            # a command that knows what it kept says so (training: the state and how to resume)
            err().print(Text(str(e) or "interrupted", style="yellow"))
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
        out().print(f"smdlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Soft-Masked diffusion language models: pretrain, fine-tune, sample, evaluate, inspect."""


for module in (train, sample, reproduce):
    module.register(app)
app.add_typer(evaluate.evaluate_app, name="evaluate")


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
