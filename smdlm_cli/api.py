"""The Python API: train, fine-tune, load, generate and evaluate, the calls the CLI is a skin over.

    import smdlm
    run_dir = smdlm.train("recipes/quickstart.toml", out="runs/mine", overrides=["train.steps=50"])
    run = smdlm.load(run_dir)                      # model, tokenizer, SoftMask, default sampler
    texts = smdlm.generate(run, ["def add(a, b):"], nfe=32, max_new_tokens=24)
    report = smdlm.evaluate("elbo", run_dir)       # the same JSON report `smdlm evaluate` writes

Every call goes through the same code as its command: `generate` is core/generate.py, the path
that `smdlm sample`, `evaluate`, the sweep and inspect-lambda decode through. Errors in the input
raise smdlm_cli.core.errors.UserError with the one-line message the CLI would print.

Not here: parsing flags or printing (cli/), the work itself (commands/, core/, evals/).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from smdlm_cli.core.errors import UserError
from smdlm_cli.core.rundir import Run

__all__ = ["train", "finetune", "load", "generate", "evaluate", "Run", "UserError"]


def _recipe(recipe, overrides: Sequence[str]):
    from smdlm_cli.core.config import Recipe
    from smdlm_cli.recipe import load_recipe

    return (recipe, Path("recipe.toml")) if isinstance(recipe, Recipe) else \
        (load_recipe(recipe, list(overrides)), Path(recipe))


def train(recipe, *, out: str | Path | None = None, resume: bool = False,
          overrides: Sequence[str] = ()) -> Path:
    """`smdlm pretrain`: train (or continue) an MDLM from a recipe file or Recipe; returns the run
    directory. `overrides` are --set KEY=VALUE strings."""
    from smdlm_cli.commands import pretrain

    loaded, path = _recipe(recipe, overrides)
    return pretrain.run(loaded, recipe_path=path, out=Path(out) if out else None, resume=resume)


def finetune(recipe, *, out: str | Path | None = None, resume: bool = False, merge: bool = False,
             overrides: Sequence[str] = ()) -> Path:
    """`smdlm finetune`: DoRA/LoRA + SM fine-tuning of a Dream-layout base; returns the run."""
    from smdlm_cli.commands import finetune as command

    loaded, path = _recipe(recipe, overrides)
    return command.run(loaded, recipe_path=path, out=Path(out) if out else None, resume=resume,
                       merge=merge)


def load(run: str | Path | None = None, device: str = "auto") -> Run:
    """A run directory (default: the newest under ./runs) as a Run: .model (eval mode), .tokenizer,
    .softmask (None for binary runs), .decoding (sampler.json), .default_sampler."""
    from smdlm_cli.core import rundir
    from smdlm_cli.core.distributed import resolve_device

    return rundir.load(rundir.resolve(run), resolve_device(device))


def generate(run: Run | str | Path, prompts: Sequence[str] | None = None, *,
             num_samples: int = 1, nfe: int | None = None, k: int | None = None,
             sampler: str | None = None, length: int | None = None,
             max_new_tokens: int | None = None, seed: int = 0, batch_size: int = 8,
             top_p: float | None = None, temperature: float | None = None,
             sm_schedule: str = "none", exact: bool | None = None, **options) -> list[str]:
    """Decoded texts, one per prompt (or `num_samples` unconditional samples without prompts).

    With `max_new_tokens`, each text is the completion after its prompt, cut at the first EOS;
    otherwise rows run to `length` (default the model's) and each text is the whole row.
    `nfe` None: one step per generated token for completions (or the run's sampler.json), 128
    for whole rows. `k`: None keeps the run's SoftMask, 0 decodes binary. `sampler` None and
    options not given take the run's sampler.json (a Dream run: the paper's decoding); `exact`
    None the model's default. Further sampler options (block_length, cache, threshold, alg, ...)
    as keywords. Text i is drawn from seed + i.
    """
    from smdlm_cli.commands.sample import SampleSettings, decode_settings
    from smdlm_cli.core.generate import completion, generate as decode
    from smdlm_cli.core.sampler_defaults import completion_steps

    run = run if isinstance(run, Run) else load(run)
    if nfe is None:
        nfe = 128 if max_new_tokens is None else completion_steps(run.decoding, max_new_tokens)
    settings = SampleSettings(nfe=nfe, k=k, sampler=sampler, num_samples=num_samples,
                              batch_size=batch_size, top_p=top_p, temperature=temperature,
                              seed=seed, sm_schedule=sm_schedule, exact=exact, options=options)
    jobs = list(prompts) if prompts is not None else [""] * num_samples
    if max_new_tokens is not None:
        kw = decode_settings(settings, run)
        gen = decode(run.model, run.tokenizer, jobs, max_new_tokens=max_new_tokens,
                     cut_prompts=True, **kw)
        return [completion(run.tokenizer, gen, j) for j in range(len(jobs))]
    kw = decode_settings(replace(settings, num_samples=len(jobs) or 1), run)
    gen = decode(run.model, run.tokenizer, jobs, length=length or run.model.config.model_length, **kw)
    return [run.tokenizer.decode(ids, skip_special_tokens=True) for ids in gen.tokens]


def evaluate(task: str, run: str | Path | None = None, **settings) -> dict:
    """`smdlm evaluate TASK` without the command line: elbo, genppl, mauve, humaneval, mbpp or
    lm-eval.

    Keywords are the command's settings by their field names (e.g. scorer=..., nfe=...,
    num_samples=..., limit=...); the report is also written under RUN/reports/ as the CLI does.
    """
    from smdlm_cli.commands import evaluate as command
    from smdlm_cli.commands.sample import SampleSettings

    ckpt = None if run is None else str(run)
    if task == "elbo":
        args = {"device": "auto", "split": "valid", "batch_size": 0, "batches": 0, "seed": None,
                "binary": False, "out": None} | settings
        return command.elbo(ckpt, **args)[0]
    sampling_keys = set(SampleSettings.__dataclass_fields__)
    sampling = SampleSettings(ckpt=ckpt, **{k: v for k, v in settings.items() if k in sampling_keys})
    rest = {k: v for k, v in settings.items() if k not in sampling_keys}
    if task in ("humaneval", "mbpp"):
        code = command.CodeSettings(**rest)
        return command.code_task(task, replace(sampling, nfe=settings.get("nfe", 0)), code)[0]
    if task == "genppl":
        return command.genppl(sampling, rest.get("samples"), rest.get("scorer", command.DEFAULT_SCORER),
                              sampling.batch_size, rest.get("out"))[0]
    if task == "mauve":
        return command.mauve(sampling, rest.get("samples"), rest.get("featurizer", command.DEFAULT_SCORER),
                             rest.get("refs"), rest.get("num_refs", 0), sampling.batch_size,
                             rest.get("out"))[0]
    if task == "lm-eval":  # rest: the fields of commands/lmeval.LmEvalSettings (tasks=[...], ...)
        from smdlm_cli.commands import lmeval

        return lmeval.run(replace(sampling, nfe=settings.get("nfe", 0)),
                          lmeval.LmEvalSettings(**rest))[0]
    raise UserError(f"evaluate {task!r}: expected elbo, genppl, mauve, humaneval, mbpp or lm-eval")
