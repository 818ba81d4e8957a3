"""The plan of `smdlm reproduce DIR` for a Sudoku directory (reproduce.toml holds [sudoku]):
soft-masking where few steps must fill many cells, with an exact metric and no scorer.

DIR holds base.toml (a binary MDLM on generated puzzles), the three continuations of the base on
equal data (binary.toml, sm-iso-update.toml, sm-iso-compute.toml), the sm-on diagnostic and
reproduce.toml. The stages, in order:

  base, binary, sm-iso-update, sm-iso-compute, sm-on
                    `smdlm pretrain`, resumed where an earlier attempt stopped
  entropy           `smdlm evaluate sudoku` of the base at the lowest NFE that feeds anything
                    back (2): the median entropy of its fed-back predictions, on all test puzzles
  lambda            `smdlm inspect-lambda --json` of each SM run (the learned ω and λ(H))
  solve-<sampler>   `smdlm evaluate sudoku` of the (run, decoding) rows at every NFE and seed: all
                    of them with the first sampler, the main three with the others
  report            docs/results-sudoku.md and .json, computed from the outputs above

The chain runner (chain.py) and its resumability are shared with the language-model chain.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from smdlm_cli.core.config import Recipe, SudokuReproduceConfig
from smdlm_cli.core.errors import UserError
from smdlm_cli.recipe import load_recipe, load_table

TRAIN = ("base", "binary", "sm-iso-update", "sm-iso-compute", "sm-on")
CONTINUATIONS = ("binary", "sm-iso-update", "sm-iso-compute")
SM_RUNS = ("sm-iso-update", "sm-iso-compute", "sm-on")
# The table's rows: (name, run, top-k of the decoding: 0 binary, None the run's own SM)
ROWS = [("binary · binary", "binary", 0), ("sm-iso-update · binary", "sm-iso-update", 0),
        ("sm-iso-update · SM", "sm-iso-update", None), ("sm-iso-compute · SM", "sm-iso-compute", None),
        ("sm-on · SM", "sm-on", None)]
MAIN_ROWS = 3  # samplers after the first decode only binary · binary, SM · binary and SM · SM
ENTROPY_NFE = 2  # NFE 1 is one forward: nothing is fed back
SMOKE_TRAIN = ["data.sudoku_train=64", "data.sudoku_test=8", "model.hidden_size=32",
               "model.n_blocks=1", "model.n_heads=2", "model.cond_dim=16", "train.steps=4",
               "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1",
               "train.save_every=2", "train.log_every=1", "train.warmup=1"]
SMOKE_EVAL = {"seeds": 2, "batch_size": 8, "nfe": [1, 2, 81]}


@dataclass
class Plan:
    directory: Path
    cfg: SudokuReproduceConfig
    recipes: dict[str, Recipe]
    smoke: bool
    kind = "sudoku"
    train = TRAIN

    @property
    def runs(self) -> Path:
        return Path(self.cfg.runs)

    @property
    def stages(self) -> list[str]:
        return [*TRAIN, "entropy", "lambda", *(f"solve-{s}" for s in self.cfg.samplers), "report"]


def _train_sets(smoke: bool, recipe: Recipe) -> list[str]:
    sets = list(SMOKE_TRAIN) if smoke else []
    if smoke and recipe.train.max_forward_passes:
        sets.append("train.max_forward_passes=4")
    if smoke and recipe.model.init:  # a continuation keeps its base's shape
        sets = [s for s in sets if not s.startswith("model.")]
    return sets


def load_plan(directory: str | Path, runs: str | None = None, report: str | None = None,
              smoke: bool = False) -> Plan:
    directory = Path(directory)
    missing = [f"{n}.toml" for n in (*TRAIN, "reproduce") if not (directory / f"{n}.toml").is_file()]
    if missing:
        raise UserError(f"{directory}: missing {', '.join(missing)}; expected {', '.join(TRAIN)} "
                        f"and reproduce (.toml each)")
    cfg = load_table(directory / "reproduce.toml", "sudoku", SudokuReproduceConfig)
    if smoke:
        runs = runs or f"{cfg.runs}-smoke"
        report = report or str(Path(runs) / Path(cfg.report).name)
    cfg = replace(cfg, **{k: v for k, v in (("runs", runs), ("report", report)) if v is not None},
                  **(SMOKE_EVAL if smoke else {}))
    bad = [s for s in cfg.samplers if s not in ("mdlm", "confidence")]
    if bad or not cfg.samplers:
        raise UserError(f"{directory / 'reproduce.toml'}: sudoku.samplers = {cfg.samplers}, "
                        f"expected a non-empty list of mdlm, confidence")
    recipes = {}
    for name in TRAIN:
        recipes[name] = load_recipe(directory / f"{name}.toml",
                                    _train_sets(smoke, load_recipe(directory / f"{name}.toml")))
    if any(r.data.source != "sudoku" for r in recipes.values()):
        raise UserError(f"{directory}: every recipe needs data.source = \"sudoku\"")
    if recipes["base"].softmask.enabled:
        raise UserError(f"{directory / 'base.toml'}: expected a binary MDLM (softmask.enabled = false)")
    first = recipes["binary"]
    for name in CONTINUATIONS[1:] + ("sm-on",):
        r = recipes[name]
        if not r.softmask.enabled:
            raise UserError(f"{directory / f'{name}.toml'}: softmask.enabled = false, expected true")
        if (r.data, r.train.seed, r.train.batch_size) != (first.data, first.train.seed,
                                                           first.train.batch_size):
            raise UserError(f"{directory / f'{name}.toml'}: [data], train.seed and train.batch_size "
                            f"must equal binary.toml's: the continuations see the same batches")
    return Plan(directory, cfg, recipes, smoke)


def _solve(plan: Plan, run: str, k: int | None, sampler: str, nfe: list[int], seeds: int,
           out: Path) -> list[str]:
    c = plan.cfg
    argv = ["evaluate", "sudoku", "--ckpt", str(plan.runs / run), "--nfe", ",".join(map(str, nfe)),
            "--seeds", str(seeds), "--sampler", sampler, "--batch-size", str(c.batch_size),
            "--limit", str(c.limit), "--device", c.device, "--out", str(out)]
    return argv + (["--k", str(k)] if k is not None else [])


def commands(plan: Plan, stage: str) -> list[list[str]]:
    runs = plan.runs
    if stage in TRAIN:
        sets = _train_sets(plan.smoke, plan.recipes[stage])
        if stage != "base":
            sets.append(f"model.init={runs / 'base'}")
        argv = ["pretrain", str(plan.directory / f"{stage}.toml"), "--out", str(runs / stage)]
        return [argv + [a for kv in sets for a in ("--set", kv)]]
    if stage == "entropy":
        return [_solve(plan, "base", 0, plan.cfg.samplers[0], [ENTROPY_NFE], 1,
                       runs / "entropy" / "base.json")]
    if stage == "lambda":
        return [["inspect-lambda", str(runs / r), "--json", "--png", str(runs / "lambda" / f"{r}.png")]
                for r in SM_RUNS]
    if stage.startswith("solve-"):
        sampler = stage.removeprefix("solve-")
        rows = ROWS if sampler == plan.cfg.samplers[0] else ROWS[:MAIN_ROWS]
        return [_solve(plan, run, k, sampler, plan.cfg.nfe, plan.cfg.seeds,
                       runs / stage / f"{run}-{'binary' if k == 0 else 'SM'}.json")
                for _, run, k in rows]
    raise UserError(f"--stage {stage}: unknown stage; expected one of {', '.join(plan.stages)}")


def needs(plan: Plan, stage: str) -> list[str]:
    if stage == "base":
        return []
    if stage in TRAIN or stage == "entropy":
        return ["base"]
    if stage == "lambda":
        return list(SM_RUNS)
    if stage == "report":
        return []
    return list(TRAIN[1:])
