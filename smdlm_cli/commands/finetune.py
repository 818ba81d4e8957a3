"""`smdlm finetune RECIPE`: DoRA/LoRA fine-tuning of a large MDLM (Dream-7B, Dream-Coder-7B, LLaDA-8B)
with SM.

The base model (`model.init`: a Dream or LLaDA hub name or directory, or `tiny-dream` /
`tiny-llada`, small randomly initialised models of those layouts built here for offline use) is
frozen and wrapped by peft with DoRA or LoRA adapters; the SoftMask parameters train beside them
at their own learning rate. The
loop is pretrain's (core/trainer.py) with the fine-tuning objective: chat-formatted examples,
prompt never masked, one t per batch in [t_min, t_max], (1/t)-weighted loss.
A run directory holds adapter/ (adapter_config.json, adapter_model.safetensors), base.json (where
the base model is), softmask.json + transparency_config.json, sampler.json (the paper's decoding,
what sample and evaluate default to), tokenizer/, recipe.toml, metrics.jsonl and state/; with
finetune.keep_best also best/, a loadable run holding the adapter and omega of the lowest
validation loss (the official load_best_model_at_end); `--merge` adds the merged model
(config.json + model.safetensors).
`smdlm sample` / `evaluate` load such a run by merging the adapter into the base.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from smdlm_cli.commands.training import console, train
from smdlm_cli.core import checkpoint, sampler_defaults, sft
from smdlm_cli.core.config import Recipe
from smdlm_cli.core.distributed import Dist, barrier, batch_layout, validation_batch
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_write_json
from smdlm_cli.core.models import load_model, save_model
from smdlm_cli.core.softmask import SoftMask
from smdlm_cli.core.tiny_dream import TINY_DREAM, build_tiny_dream
from smdlm_cli.core.tiny_llada import TINY_LLADA, build_tiny_llada
from smdlm_cli.core.tokenizer import load_tokenizer

BEST = "best"  # the subdirectory holding the lowest-validation-loss adapter (finetune.keep_best)


def _base(recipe: Recipe, run_dir: Path, main: bool) -> str:
    init = recipe.model.init
    if not init:
        raise UserError("model.init is empty; expected the base model to fine-tune (a Dream hub "
                        "name such as Dream-org/Dream-Coder-v0-Instruct-7B, a directory, tiny-dream "
                        "or tiny-llada)")
    tiny = {TINY_DREAM: ("Dream", build_tiny_dream), TINY_LLADA: ("LLaDA", build_tiny_llada)}
    if init not in tiny:
        return init
    base = run_dir / "base"
    if main and not (base / "config.json").exists():
        layout, build = tiny[init]
        console.print(f"building the tiny {layout}-layout base model (random weights) ...")
        build(base, recipe.data, seed=recipe.train.seed)
    barrier()
    return str(base)


def _portable(base: str, run_dir: Path) -> str:
    """base.json's path: relative to the run for a base inside it (tiny-*), absolute for other
    directories, a hub name as is; so the run loads from any working directory and moves whole."""
    path = Path(base)
    if not path.is_dir():
        return base
    path = path.resolve()
    try:
        return str(path.relative_to(run_dir.resolve()))
    except ValueError:
        return str(path)


def _wrap(model, recipe: Recipe):
    """Freeze the base and add the adapters."""
    from peft import LoraConfig, get_peft_model

    f = recipe.finetune
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing = recipe.train.grad_checkpointing
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    unknown = [m for m in f.target_modules if m not in names]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear)})
        raise UserError(f"finetune.target_modules: {unknown[0]!r} is not a module of the base "
                        f"model; expected names among {', '.join(linear)}")
    config = LoraConfig(r=f.r, lora_alpha=f.alpha, lora_dropout=f.dropout, bias="none",
                        target_modules=list(f.target_modules), use_dora=f.method == "dora")
    return get_peft_model(model, config)


def publish(backbone, run_dir: Path) -> None:
    """adapter/'s files, each written to a temporary name and renamed over the old one: adapter/
    always holds a complete adapter (the previous or the new), never nothing."""
    target = run_dir / "adapter"
    target.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=".adapter-"))
    try:
        backbone.save_pretrained(str(tmp), safe_serialization=True)
        # the weights last: a reader that sees new weights sees the config they belong to
        files = sorted(tmp.iterdir(), key=lambda f: f.suffix == ".safetensors")
        for f in files:
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run(recipe: Recipe, recipe_path: Path, out: Path | None, resume: bool, merge: bool) -> Path:
    """Fine-tune the recipe's base into its run directory; returns the directory."""
    def finish(run_dir: Path, inputs: tuple, result) -> None:
        if merge:
            # under FSDP this rank holds only shards: merge the adapter just published instead
            sharded = recipe.train.strategy == "fsdp" and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1
            save_model(load_model(str(run_dir)) if sharded else inputs[0].merge_and_unload(),
                       run_dir)
        console.print(f"run saved in [bold]{run_dir}[/bold] (adapter/, softmask.json"
                      f"{', merged model.safetensors' if merge else ''})")
        console.print(f"next: smdlm sample --ckpt {run_dir} --chat --prompt '...' · smdlm evaluate "
                      f"humaneval --ckpt {run_dir} --format instruct")

    f = recipe.finetune
    official = {"sum_micro_batches": f.official_grad_scaling,
                "validation_sm_share": recipe.softmask.prob if f.validation == "official" else 1.0}
    best_dir: list[Path] = []  # RUN/best, known once the run directory is

    def setup(run_dir: Path, resume: bool, ctx: Dist):
        best_dir[:] = [run_dir / BEST]
        return _setup(recipe, run_dir, resume, ctx)

    def on_best(backbone, softmask) -> None:
        publish(backbone, best_dir[0])
        if softmask is not None:
            checkpoint.save_softmask(best_dir[0], softmask)

    return train(recipe, recipe_path, out, resume, "finetune", setup, objective="sft",
                 publish=publish, finish=finish, objective_options=official,
                 on_best=on_best if f.keep_best else None)


def _setup(recipe: Recipe, run_dir: Path, resume: bool, ctx: Dist):
    base = _base(recipe, run_dir, ctx.main)
    tok = load_tokenizer(base)
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    model = load_model(base, device=ctx.device, dtype=dtype)
    if len(tok) > model.vocab_size or tok.mask_token_id != model.mask_id:
        raise UserError(f"{base}: tokenizer ({len(tok)} ids, mask {tok.mask_token_id}) does not fit "
                        f"the model ({model.vocab_size} ids, mask {model.mask_id})")
    torch.manual_seed(recipe.train.seed)  # the adapters' initial weights are part of the seed
    backbone = _wrap(model, recipe).to(ctx.device)
    sm = recipe.softmask
    softmask = None
    if sm.enabled:
        softmask = SoftMask(k=sm.k, scale=sm.scale, centre=sm.centre, steepness=sm.steepness,
                            temperature=sm.temperature or None)
        if resume:
            softmask = checkpoint.load_softmask(run_dir) or softmask
    if ctx.main:
        # RUN/best (finetune.keep_best) is a run of its own: the trainer fills its adapter/ and
        # softmask.json at every new lowest validation loss
        for d in [run_dir] + ([run_dir / BEST] if recipe.finetune.keep_best else []):
            d.mkdir(exist_ok=True)
            tok.save_pretrained(d / "tokenizer")
            atomic_write_json(d / "base.json", {"path": _portable(base, d)})
            # the decoding this run expects unless flags say otherwise (the paper's, for Dream)
            sampler_defaults.write(d, sampler_defaults.for_model(model))
    f, t = recipe.finetune, recipe.train
    train_items = sft.build(recipe.data, tok, f.max_length, f.min_response_tokens, "train",
                            f.mix, f.drop_token_ids)
    valid_items = sft.build(recipe.data, tok, f.max_length, f.min_response_tokens, "valid",
                            f.mix, f.drop_token_ids)
    micro = batch_layout(t, ctx.world).micro
    pad = tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id
    loader = sft.SFTLoader(train_items, micro, t.seed, pad, f.pad_supervised, f.pad_jitter,
                           ctx.rank, ctx.world)
    valid = sft.valid_batches(valid_items, validation_batch(t), t.eval_batches, pad, f.pad_supervised)
    if ctx.main:
        n = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
        console.print(f"{f.method} r={f.r} on {', '.join(f.target_modules)}: {n / 1e6:.2f}M trainable "
                      f"parameters; {'SM' if softmask else 'binary'}; {len(train_items)} training and "
                      f"{len(valid_items)} validation examples; {ctx.world} process(es) on {ctx.device}")
    return backbone, softmask, loader, valid
