"""`smdlm pretrain RECIPE`: build tokenizer, corpus, DiT and SoftMask from a recipe, then train.

Trains from scratch or continues weights named by `model.init` (a run directory, an MDLM directory
or a hub name); binary or soft-masked per `[softmask]`. Works the same under
`torchrun --nproc_per_node N -m smdlm_cli pretrain ...` (rank 0 writes, every rank trains).
The loop itself is core/trainer.py; this file only assembles its inputs and reports progress.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from smdlm_cli.core import checkpoint, trainer
from smdlm_cli.core.config import Recipe
from smdlm_cli.core.data import (BlockLoader, build_corpus, cache_dir, iter_documents,
                                 valid_batches)
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_write_text
from smdlm_cli.core.models import load_model, load_state_into
from smdlm_cli.core.models.dit import build_dit
from smdlm_cli.core.softmask import SoftMask
from smdlm_cli.core.tokenizer import load_tokenizer, mask_token_id, train_bpe, vocab_size
from smdlm_cli.recipe import dump_recipe, load_recipe

# Keys a resumed run may change: they alter how long and how often, never what is trained.
_RESUMABLE_CHANGES = {"train.steps", "train.save_every", "train.eval_every", "train.log_every",
                      "train.max_forward_passes"}
console = Console(stderr=True, soft_wrap=True)  # log lines stay whole in files and CI logs


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _run_dir(recipe_path: Path, out: Path | None, resume: bool) -> Path:
    run_dir = out if out is not None else Path("runs") / recipe_path.stem
    if resume:
        if checkpoint.latest_state(run_dir) is None:
            raise UserError(f"--resume: {run_dir} holds no saved training state to continue")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, "
                        f"or --out DIR for a new one")
    return run_dir


def _check_resume_recipe(run_dir: Path, recipe: Recipe) -> None:
    """A resumed run must train the same thing; only lengths and cadences may change."""
    saved = load_recipe(run_dir / "recipe.toml")
    for section in ("model", "data", "softmask", "train"):
        old, new = vars(getattr(saved, section)), vars(getattr(recipe, section))
        for key in old:
            name = f"{section}.{key}"
            if old[key] != new[key] and name not in _RESUMABLE_CHANGES:
                raise UserError(f"--resume: {name} = {new[key]!r} differs from the run's "
                                f"{old[key]!r} ({run_dir / 'recipe.toml'}); only "
                                f"{', '.join(sorted(_RESUMABLE_CHANGES))} may change")


def _tokenizer(recipe: Recipe, run_dir: Path, resume: bool, main: bool):
    tok_dir = run_dir / "tokenizer"
    init = recipe.model.init
    if resume:
        return load_tokenizer(str(tok_dir))
    if recipe.data.tokenizer != "bpe":
        tok = load_tokenizer(recipe.data.tokenizer)
    elif init and (Path(init) / "tokenizer").is_dir():
        tok = load_tokenizer(str(Path(init) / "tokenizer"))  # a continuation keeps its vocabulary
    else:
        if main:
            console.print(f"training a {recipe.data.vocab_size}-token byte-level BPE on "
                          f"{recipe.data.source} ...")
            train_bpe(iter_documents(recipe.data, "train"), recipe.data.vocab_size).save_pretrained(tok_dir)
        _barrier()
        return load_tokenizer(str(tok_dir))
    if main:
        tok.save_pretrained(tok_dir)
    return tok


def _model(recipe: Recipe, run_dir: Path, resume: bool, tok, main: bool):
    """The backbone and the SoftMask (None for binary runs), initialised as the recipe says."""
    m, sm_cfg = recipe.model, recipe.softmask
    softmask = None
    if resume:
        backbone = load_model(str(run_dir))
    elif m.init:
        backbone = load_model(m.init, weights=False)
        report = load_state_into(backbone, m.init)
        extra = [k for k in report["unexpected"] if not k.startswith("tran_head.")]
        if report["missing"] or extra:
            raise UserError(f"model.init = {m.init}: missing keys {report['missing'][:4]}, "
                            f"unexpected keys {extra[:4]}; expected a DiT checkpoint")
        if main:
            console.print(f"continuing from {m.init}: all backbone weights loaded")
        if sm_cfg.enabled and Path(m.init).is_dir():
            softmask = checkpoint.load_softmask(m.init)
    else:
        torch.manual_seed(recipe.train.seed)  # the initial weights are part of what a seed fixes
        backbone = build_dit(m.preset, vocab_size(tok), mask_token_id(tok), m.length,
                             hidden_dim=m.hidden_size, n_blocks=m.n_blocks, n_heads=m.n_heads,
                             cond_dim=m.cond_dim, dropout=m.dropout, causal=m.causal)
    if backbone.config.causal != m.causal:
        raise UserError(f"model.causal = {str(m.causal).lower()}, but model.init = {m.init} is "
                        f"{'an AR' if backbone.config.causal else 'a diffusion'} model")
    if backbone.vocab_size != vocab_size(tok) or backbone.mask_id != mask_token_id(tok):
        raise UserError(f"model vocabulary {backbone.vocab_size} (mask {backbone.mask_id}) does not "
                        f"match tokenizer {recipe.data.tokenizer!r} ({vocab_size(tok)}, mask "
                        f"{mask_token_id(tok)})")
    if sm_cfg.enabled and softmask is None:
        softmask = SoftMask(k=sm_cfg.k, scale=sm_cfg.scale, centre=sm_cfg.centre,
                            steepness=sm_cfg.steepness, temperature=sm_cfg.temperature or None)
        if m.init and main:
            console.print("added the soft-masking parameters (new): "
                          f"scale {sm_cfg.scale:g}, centre {sm_cfg.centre:g}, steepness {sm_cfg.steepness:g}")
    if resume and sm_cfg.enabled:
        softmask = checkpoint.load_softmask(run_dir) or softmask  # values come from state/ anyway
    return backbone, softmask


def run(recipe: Recipe, recipe_path: Path, out: Path | None, resume: bool) -> Path:
    with trainer.distributed(recipe.train.device) as ctx:
        run_dir = _run_dir(recipe_path, out, resume)
        if resume:
            _check_resume_recipe(run_dir, recipe)
        fresh = not run_dir.exists()
        _barrier()  # every rank has checked the directory before rank 0 writes into it
        try:
            inputs = _setup(recipe, run_dir, resume, ctx)
        except UserError:
            # A run that failed before its first step (offline, bad data) leaves nothing behind, so
            # the same command works once the cause is fixed; a directory it did not create is kept.
            if fresh and ctx.main:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        result = _train_with_progress(recipe, *inputs, run_dir, ctx, resume)
        if ctx.main:
            _summary(run_dir, result)
        return run_dir


def _setup(recipe: Recipe, run_dir: Path, resume: bool, ctx: trainer.Dist):
    """Tokenizer, model, data: (backbone, softmask, loader, validation batches)."""
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            atomic_write_text(run_dir / "recipe.toml", dump_recipe(
                recipe, header=f"smdlm pretrain {run_dir / 'recipe.toml'} --out {run_dir} --resume"))
    tok = _tokenizer(recipe, run_dir, resume, ctx.main)
    backbone, softmask = _model(recipe, run_dir, resume, tok, ctx.main)
    length = backbone.config.model_length  # a continued checkpoint keeps its own length
    if ctx.main:  # rank 0 fills the cache first, so the others read it instead of racing
        train_blocks, valid_blocks = build_corpus(recipe.data, tok, length, cache_dir())
    _barrier()
    if not ctx.main:
        train_blocks, valid_blocks = build_corpus(recipe.data, tok, length, cache_dir())

    per_rank, micro, _ = trainer._batch_layout(recipe.train, ctx.world)
    loader = BlockLoader(train_blocks, micro, recipe.train.seed, ctx.rank, ctx.world)
    valid = valid_batches(valid_blocks, micro, recipe.train.eval_batches, ctx.rank, ctx.world)
    if ctx.main:
        kind = ("AR (causal) LM" if backbone.config.causal else
                "soft-masked MDLM" if softmask is not None else "binary MDLM")
        n_params = sum(p.numel() for p in backbone.parameters())
        console.print(f"{kind}, {n_params / 1e6:.2f}M parameters, {train_blocks.shape[0]} "
                      f"training blocks of {length} tokens, {ctx.world} process(es) on {ctx.device}")
    return backbone, softmask, loader, valid


def _train_with_progress(recipe, backbone, softmask, loader, valid, run_dir, ctx, resume,
                         name: str = "pretrain", **fit_options):
    """trainer.fit with a progress bar on rank 0; fit_options pass through (objective, publish)."""
    if not ctx.main:
        return trainer.fit(backbone, softmask, recipe.train, recipe.softmask, loader, valid, run_dir,
                           ctx, resume=resume, **fit_options)
    sft = fit_options.get("objective") == "sft"
    what = "validation NLL" if sft else "validation ELBO"
    unit = "nats per masked token (ppl" if sft else "nats/token (ppl ≤"
    columns = [TextColumn(f"[bold]{name}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("train", total=recipe.train.steps, info="")

        def on_step(rec: dict) -> None:
            if "loss" in rec:
                info = f"loss {rec['loss']:.3f}  {rec['tokens_per_s']:,.0f} tok/s"
                if "scale" in rec:
                    info += f"  ω_s {rec['scale']:.3g}"
                progress.update(task, completed=rec["step"], info=info)
            else:
                progress.console.print(f"step {rec['step']}: {what} {rec['val_nll']:.4f} "
                                       f"{unit} {rec['val_ppl']:.2f})")

        return trainer.fit(backbone, softmask, recipe.train, recipe.softmask, loader, valid, run_dir,
                           ctx, resume=resume, on_step=on_step, **fit_options)


def _summary(run_dir: Path, result: trainer.TrainResult) -> None:
    first, last = result.first_val, result.last_val
    if first and last:
        console.print(f"validation ELBO {first['val_nll']:.4f} -> {last['val_nll']:.4f} nats/token "
                      f"after {result.step} steps ({result.forwards} forward passes)")
    console.print(f"run saved in [bold]{run_dir}[/bold] (model.safetensors, metrics.jsonl, state/)")
    console.print(f"to train longer: smdlm pretrain {run_dir / 'recipe.toml'} --out {run_dir} "
                  f"--resume --set train.steps=N")
