"""What `pretrain` and `finetune` share around the loop: the run directory, the resume check, the
fail-clean start, the progress display and the closing summary.

A command supplies `setup(run_dir) -> (backbone, softmask, loader, valid batches)`; `train` does
the rest with core/trainer.fit. Under torchrun every rank calls it; rank 0 writes and prints.

Not here: how a model, tokenizer or data set is built (pretrain.py, finetune.py).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from smdlm_cli.core import hub, runlock, tracking, trainer
from smdlm_cli.core.config import Recipe
from smdlm_cli.core.distributed import Dist, barrier, cpu_threads, distributed
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_write_text
from smdlm_cli.recipe import dump_recipe, load_recipe

# Keys a resumed run may change: they alter how long and how often, never what is trained.
RESUMABLE_CHANGES = {"train.steps", "train.save_every", "train.eval_every", "train.log_every",
                     "train.max_forward_passes", "train.threads", "train.trackers"}
SECTIONS = ("model", "data", "softmask", "train", "finetune")
console = Console(stderr=True, soft_wrap=True)  # log lines stay whole in files and CI logs


def run_dir_for(recipe_path: Path, out: Path | None) -> Path:
    return out if out is not None else Path("runs") / recipe_path.stem


def check_resume_recipe(run_dir: Path, recipe: Recipe) -> None:
    """A resumed run must train the same thing; only lengths and cadences may change."""
    saved = load_recipe(run_dir / "recipe.toml")
    for section in SECTIONS:
        old, new = vars(getattr(saved, section)), vars(getattr(recipe, section))
        for key in old:
            name = f"{section}.{key}"
            if old[key] != new[key] and name not in RESUMABLE_CHANGES:
                raise UserError(f"--resume: {name} = {new[key]!r} differs from the run's "
                                f"{old[key]!r} ({run_dir / 'recipe.toml'}); only "
                                f"{', '.join(sorted(RESUMABLE_CHANGES))} may change")


def train(recipe: Recipe, recipe_path: Path, out: Path | None, resume: bool, command: str,
          setup: Callable[[Path, bool, Dist], tuple], objective: str = "elbo",
          publish: Callable | None = None,
          finish: Callable[[Path, tuple, trainer.TrainResult], None] | None = None,
          objective_options: dict | None = None, on_best: Callable | None = None) -> Path:
    """Check the run directory, write recipe.toml, set up, train with progress, summarise.

    A run that fails before its first step (offline, bad data) leaves nothing behind, so the same
    command works once the cause is fixed; a directory it did not create is kept. Rank 0 holds the
    run directory's lock throughout (core/runlock.py).
    """
    hub.preflight(hub.recipe_needs(recipe))
    tracking.check(recipe.train.trackers)  # on every rank, so a missing package never hangs one
    with distributed(recipe.train.device) as ctx:
        if ctx.device.type == "cpu":
            threads, note = cpu_threads(recipe.train.threads, ctx.world)
            if threads:
                torch.set_num_threads(threads)
            if note and ctx.main:
                console.print(note)
        run_dir = run_dir_for(recipe_path, out)
        fresh = not run_dir.exists()
        lock = runlock.claim(run_dir, resume, ctx.main)  # rank 0 holds it until training ends
        if resume:
            check_resume_recipe(run_dir, recipe)
        barrier()  # every rank has checked the directory before rank 0 writes into it
        try:
            if ctx.main:
                if not resume:
                    atomic_write_text(run_dir / "recipe.toml", dump_recipe(recipe, header=(
                        f"smdlm {command} {run_dir / 'recipe.toml'} --out {run_dir} --resume")))
            inputs = setup(run_dir, resume, ctx)
        except UserError:
            if fresh and ctx.main:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        options = ({"objective": objective} | ({"publish": publish} if publish else {})
                   | ({"objective_options": objective_options} if objective_options else {})
                   | ({"on_best": on_best} if on_best else {}))
        try:
            result = _fit_with_progress(recipe, inputs, run_dir, ctx, resume, command, options)
        except KeyboardInterrupt:
            if lock is not None:
                lock.release()
            raise Interrupted(_interrupted(run_dir, command, fresh and ctx.main)) from None
        if ctx.main:
            _summary(run_dir, result, *val_words(objective, inputs[0]))
            if finish is not None:
                finish(run_dir, inputs, result)
            lock.release()
        return run_dir


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, with what was kept and how to go on (the CLI prints it)."""


def _interrupted(run_dir: Path, command: str, remove: bool) -> str:
    from smdlm_cli.core import checkpoint

    state = checkpoint.latest_state(run_dir)
    if state is None:
        if remove:  # nothing trained was kept: leave nothing behind, so the same command restarts
            shutil.rmtree(run_dir, ignore_errors=True)
        return ("interrupted before the first save: nothing was kept; the same command starts "
                "over (train.save_every sets how often a run saves)")
    return (f"interrupted: {run_dir} keeps the state of {state.name}; continue with: smdlm "
            f"{command} {run_dir / 'recipe.toml'} --out {run_dir} --resume")


def progress_bar(name: str, get_time=None) -> Progress:
    """The training bar. Its ETA looks back 10 minutes, not Rich's 30 s: a slow run's progress
    lines come further apart than that, and the ETA then stayed at -:--:--."""
    columns = [TextColumn(f"[bold]{name}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=False, speed_estimate_period=600,
                    **({"get_time": get_time} if get_time else {}))


def _fit_with_progress(recipe, inputs, run_dir, ctx, resume, name: str, options: dict):
    backbone, softmask, loader, valid = inputs
    args = (backbone, softmask, recipe.train, recipe.softmask, loader, valid, run_dir, ctx)
    if not ctx.main:
        return trainer.fit(*args, resume=resume, **options)
    what, unit = val_words(options["objective"], backbone)
    trackers = tracking.Trackers(recipe.train.trackers, run_dir, run_dir.name)
    with progress_bar(name) as progress, trackers:
        task = progress.add_task("train", total=recipe.train.steps, info="")

        def on_step(rec: dict) -> None:
            if trackers:
                track(trackers, rec, softmask, backbone.vocab_size)
            if "loss" in rec:
                info = f"loss {rec['loss']:.3f}  {rec['tokens_per_s']:,.0f} tok/s"
                if "scale" in rec:
                    info += f"  ω_s {rec['scale']:.3g}"
                progress.update(task, completed=rec["step"], info=info)
            else:
                bound = "≤ " if what.endswith("ELBO") else ""
                progress.console.print(f"step {rec['step']}: {what} {rec['val_nll']:.4f} "
                                       f"{unit} (ppl {bound}{rec['val_ppl']:.2f})")

        return trainer.fit(*args, resume=resume, on_step=on_step, **options)


def track(trackers: tracking.Trackers, rec: dict, softmask, vocab: int) -> None:
    """A metrics record to the trackers; at a validation of an SM run also λ's key points and
    the λ(H) curve as a figure (the inspect-lambda plot of the current ω)."""
    trackers.record(rec)
    if "val_nll" not in rec or softmask is None:
        return
    import matplotlib.pyplot as plt

    from smdlm_cli.commands.inspect_lambda import curve_figure, describe

    info = describe(softmask, vocab)
    trackers.scalars({f"softmask/{k}": v for k, v in info["key_points"].items()}, rec["step"])
    fig = curve_figure(info, hint=False)
    trackers.figure("softmask/lambda_curve", fig, rec["step"])
    plt.close(fig)


def val_words(objective: str, backbone) -> tuple[str, str]:
    """What validation measures, and its unit: an ELBO bound, or an exact NLL (AR, SFT)."""
    if objective == "sft":
        return "validation NLL", "nats per masked token"
    if getattr(backbone.config, "causal", False):
        return "validation NLL", "nats/token"
    return "validation ELBO", "nats/token"


def _summary(run_dir: Path, result: trainer.TrainResult, what: str, unit: str) -> None:
    first, last = result.first_val, result.last_val
    if first and last:
        console.print(f"{what} {first['val_nll']:.4f} -> {last['val_nll']:.4f} {unit} after "
                      f"{result.step} steps ({result.forwards} forward passes, {result.sm_steps} "
                      f"soft-masked)")
