"""`smdlm pretrain RECIPE`: build tokenizer, corpus, DiT and SoftMask from a recipe, then train.

Trains from scratch or continues weights named by `model.init` (a run directory, an MDLM directory
or a hub name); binary or soft-masked per `[softmask]`. Works the same under
`torchrun --nproc_per_node N -m smdlm_cli pretrain ...` (rank 0 writes, every rank trains).
The loop itself is core/trainer.py, the run directory and progress commands/training.py; this
file only assembles the inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from smdlm_cli.commands.training import console, train
from smdlm_cli.core import checkpoint
from smdlm_cli.core.config import Recipe
from smdlm_cli.core.data import (BlockLoader, build_corpus, cache_dir, iter_documents, prompt_length,
                                 valid_batches)
from smdlm_cli.core.distributed import Dist, barrier, batch_layout, validation_batch
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.models import load_model, load_state_into
from smdlm_cli.core.models.dit import build_dit
from smdlm_cli.core.softmask import SoftMask
from smdlm_cli.core.tokenizer import load_tokenizer, mask_token_id, train_bpe, vocab_size


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
        barrier()
        return load_tokenizer(str(tok_dir))
    if main:
        tok.save_pretrained(tok_dir)
    return tok


def _model(recipe: Recipe, run_dir: Path, resume: bool, tok, main: bool):
    """The backbone and the SoftMask (None for binary runs), initialised as the recipe says."""
    m, sm_cfg = recipe.model, recipe.softmask
    softmask = None
    if resume and (run_dir / "config.json").exists():
        backbone = load_model(str(run_dir))
    elif resume and m.init:  # killed before its first publish: the weights come from state/
        backbone = load_model(m.init, weights=False)
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
    else:  # new, or resumed before its first publish (then state/ overwrites these weights)
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
    """Train the recipe's model into its run directory; returns the directory."""
    prompt = prompt_length(recipe.data)  # Sudoku's givens: a condition, never masked
    return train(recipe, recipe_path, out, resume, "pretrain",
                 lambda run_dir, resume, ctx: _setup(recipe, run_dir, resume, ctx),
                 finish=_next_steps, objective_options={"prompt": prompt} if prompt else None)


def _setup(recipe: Recipe, run_dir: Path, resume: bool, ctx: Dist):
    """Tokenizer, model, data: (backbone, softmask, loader, validation batches)."""
    tok = _tokenizer(recipe, run_dir, resume, ctx.main)
    backbone, softmask = _model(recipe, run_dir, resume, tok, ctx.main)
    length = backbone.config.model_length  # a continued checkpoint keeps its own length
    if ctx.main:  # rank 0 fills the cache first, so the others read it instead of racing
        train_blocks, valid_blocks = build_corpus(recipe.data, tok, length, cache_dir())
    barrier()
    if not ctx.main:
        train_blocks, valid_blocks = build_corpus(recipe.data, tok, length, cache_dir())
    micro = batch_layout(recipe.train, ctx.world).micro
    loader = BlockLoader(train_blocks, micro, recipe.train.seed, ctx.rank, ctx.world)
    valid = valid_batches(valid_blocks, validation_batch(recipe.train), recipe.train.eval_batches)
    if ctx.main:
        kind = ("AR (causal) LM" if backbone.config.causal else
                "soft-masked MDLM" if softmask is not None else "binary MDLM")
        n_params = sum(p.numel() for p in backbone.parameters())
        console.print(f"{kind}, {n_params / 1e6:.2f}M parameters, {train_blocks.shape[0]} "
                      f"training blocks of {length} tokens, {ctx.world} process(es) on {ctx.device}")
    return backbone, softmask, loader, valid


def _next_steps(run_dir: Path, inputs: tuple, result) -> None:
    console.print(f"run saved in [bold]{run_dir}[/bold] (model.safetensors, metrics.jsonl, state/)")
    console.print(f"next: smdlm sample --ckpt {run_dir} · smdlm inspect-lambda --ckpt {run_dir} "
                  f"--decode · smdlm evaluate elbo --ckpt {run_dir}")
    console.print(f"to train longer: smdlm pretrain {run_dir / 'recipe.toml'} --out {run_dir} "
                  f"--resume --set train.steps=N")
