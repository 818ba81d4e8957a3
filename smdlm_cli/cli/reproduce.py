"""`smdlm reproduce DIR`: parse, then hand over to reproduce/."""

from pathlib import Path
from typing import Annotated, Optional

import typer

from smdlm_cli.cli.options import out


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
                                        "chain in minutes (numbers meaningless); writes to "
                                        "RUNS-smoke/, never the real chain's runs or report")] = False,
) -> None:
    """The paper's main experiment at small scale: train, evaluate, write the report; resumable."""
    from smdlm_cli.reproduce import chain

    path = chain.run(directory, stage, runs, report, smoke)
    out().print(f"report written to {path}" if path else "done (add --stage report to rewrite "
                "the report)")


def register(app: typer.Typer) -> None:
    app.command("reproduce")(reproduce)
