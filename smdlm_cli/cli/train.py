"""`smdlm pretrain` and `smdlm finetune`: parse, load the recipe, hand over to commands/."""

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from smdlm_cli.cli.options import Resume, RunOut, SetKV, out
from smdlm_cli.core import hub
from smdlm_cli.recipe import load_recipe


def pretrain(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", show_default=False,
                                           help="TOML recipe file (see recipes/)")],
    out_: RunOut = None, resume: Resume = False, set_: SetKV = None,
) -> None:
    """Train an MDLM from scratch or continue one, binary or soft-masked."""
    loaded = load_recipe(recipe, set_ or [])
    hub.preflight(hub.recipe_needs(loaded))  # before torch is even imported: offline fails in seconds
    from smdlm_cli.commands import pretrain as command

    run_dir = command.run(loaded, recipe_path=recipe, out=out_, resume=resume)
    # Progress goes to stderr; stdout carries only the result, so run=$(smdlm pretrain ...) works.
    out().print(Text(str(run_dir)))


def finetune(
    recipe: Annotated[Path, typer.Argument(metavar="RECIPE", show_default=False,
                                           help="TOML recipe file (see recipes/dream-*.toml)")],
    out_: RunOut = None, resume: Resume = False,
    merge: Annotated[bool, typer.Option("--merge", help="also write the merged model "
                                                        "(config.json + model.safetensors)")] = False,
    set_: SetKV = None,
) -> None:
    """DoRA/LoRA fine-tune a large MDLM (Dream-7B, Dream-Coder-7B) with soft-masking."""
    loaded = load_recipe(recipe, set_ or [])
    hub.preflight(hub.recipe_needs(loaded))
    from smdlm_cli.commands import finetune as command

    out().print(Text(str(command.run(loaded, recipe_path=recipe, out=out_, resume=resume,
                                     merge=merge))))


def register(app: typer.Typer) -> None:
    app.command()(pretrain)
    app.command()(finetune)
