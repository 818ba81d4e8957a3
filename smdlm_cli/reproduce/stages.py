"""The plan of `smdlm reproduce DIR` (what runs, in which order, with which commands): the paper's main experiment at small scale, as a resumable chain of smdlm
commands.

DIR holds base.toml (a binary MDLM trained from scratch), ar.toml (the AR scorer and reference
row), three continuations of the base on equal data (binary.toml, sm-iso-update.toml,
sm-iso-compute.toml), a diagnostic fourth (sm-on.toml: sm-iso-update with soft-masking switched on
from the start, beyond the paper's protocol) and reproduce.toml (how they are evaluated). The
stages, in order:

  base, ar, binary, sm-iso-update, sm-iso-compute, sm-on
                    `smdlm pretrain`, resumed where an earlier attempt stopped
  entropy           `smdlm inspect-lambda --decode` of the base and of the binary continuation
                    (more training tokens) at NFE L/4: the median entropy of the predictions SM
                    would feed back, against the regime bar (ENTROPY_BAR), and how it falls with
                    training
  lambda            `smdlm inspect-lambda --decode` of each SM run at NFE L/16
  cache             `smdlm evaluate sweep --sampler confidence` at NFE L/8: {no cache, dual cache}
                    x {threshold off, on}, each with binary and SM decoding
  sweep-<sampler>   `smdlm evaluate sweep` of the continuations and the AR row: gen-PPL, unigram
                    entropy, MAUVE (and ELBO, in the first sweep) at NFE L/16, L/8, L/4, L/2, L
  sm-on-sweep       the same for sm-on with the first sampler: apart from the main table
  report            the Markdown report and its figures, computed from the outputs above
                    (reproduce/report.py)

Every stage but the report runs the smdlm command line in a subprocess, exactly as a user would,
and is recorded in RUNS/stages.json (its commands and wall seconds) when it finishes; a finished
stage is skipped, so the same command resumes an interrupted chain. `--smoke` shrinks everything
(a few steps of a tiny model, a handful of samples) to check the chain end to end in minutes.

This module only plans: chain.py runs the stages, report.py writes the report. Both import this;
neither imports the other's internals, so there is no cycle.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from pathlib import Path

from smdlm_cli.core.config import Recipe, ReproduceConfig
from smdlm_cli.core.errors import UserError
from smdlm_cli.recipe import load_recipe, load_table

TRAIN = ("base", "ar", "binary", "sm-iso-update", "sm-iso-compute", "sm-on")
CONTINUATIONS = ("binary", "sm-iso-update", "sm-iso-compute")   # the main table's rows
SM_RUNS = ("sm-iso-update", "sm-iso-compute", "sm-on")
# The caching study: name -> sampler options on top of the block length and temperature.
CACHE = {"no-cache": {}, "no-cache+threshold": {"threshold": True},
         "dual-cache": {"cache": "dual"}, "dual-cache+threshold": {"cache": "dual", "threshold": True}}
ENTROPY_BAR = 1.0  # nats: the base's median fed-back entropy at NFE L/4 for λ to be able to act
ENTROPY_RUNS = ("base", "binary")  # the bar's curve against training tokens: base, then + binary
SMOKE_TRAIN = ["data.max_docs=30", "data.vocab_size=320", "model.length=32", "train.steps=4",
               "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1",
               "train.save_every=2", "train.log_every=1", "train.warmup=1"]
SMOKE_EVAL = {"num_samples": 4, "seeds": 2, "batch_size": 4, "cache_block": 8}


@dataclass
class Plan:
    directory: Path
    cfg: ReproduceConfig
    recipes: dict[str, Recipe]      # the training recipes, as they will run
    smoke: bool
    kind = "lm"
    train = TRAIN

    @property
    def runs(self) -> Path:
        return Path(self.cfg.runs)

    @property
    def length(self) -> int:
        return self.recipes["base"].model.length

    @property
    def nfe(self) -> list[int]:
        return [self.length // d for d in (16, 8, 4, 2, 1)]

    @property
    def stages(self) -> list[str]:
        # the short diagnostic stages before the long sweeps: an interrupted chain has them first
        return [*TRAIN, "entropy", "lambda", "cache", *(f"sweep-{s}" for s in self.cfg.samplers),
                "sm-on-sweep", "report"]


def _train_sets(smoke: bool, recipe: Recipe) -> list[str]:
    sets = list(SMOKE_TRAIN) if smoke else []
    if smoke and recipe.train.max_forward_passes:
        sets.append("train.max_forward_passes=4")  # iso-compute keeps its meaning: 4 forwards
    return sets


def load_plan(directory: str | Path, runs: str | None = None, report: str | None = None,
              smoke: bool = False) -> Plan:
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory}: no such directory; expected a reproduction directory such as "
                        f"recipes/repro/cpu")
    missing = [f"{n}.toml" for n in (*TRAIN, "reproduce") if not (directory / f"{n}.toml").is_file()]
    if missing:
        raise UserError(f"{directory}: missing {', '.join(missing)}; expected {', '.join(TRAIN)} "
                        f"and reproduce (.toml each)")
    cfg = load_table(directory / "reproduce.toml", "reproduce", ReproduceConfig)
    if smoke:  # its own runs and report, beside the real chain's: never the committed report
        runs = runs or f"{cfg.runs}-smoke"
        report = report or str(Path(runs) / Path(cfg.report).name)
    cfg = replace(cfg, **{k: v for k, v in (("runs", runs), ("report", report)) if v is not None},
                  **(SMOKE_EVAL if smoke else {}))
    from smdlm_cli.core.samplers import SAMPLERS

    unknown = [s for s in cfg.samplers if s not in SAMPLERS or s == "confidence"]
    if unknown or not cfg.samplers:
        raise UserError(f"{directory / 'reproduce.toml'}: reproduce.samplers = {cfg.samplers}, "
                        f"expected a non-empty list of unconditional samplers: mdlm, remdm-cap, "
                        f"remdm-loop")
    recipes = {}
    for name in TRAIN:
        recipe = load_recipe(directory / f"{name}.toml")
        recipes[name] = load_recipe(directory / f"{name}.toml", _train_sets(smoke, recipe))
    _check_recipes(directory, recipes)
    plan = Plan(directory, cfg, recipes, smoke)
    blocks = plan.length // cfg.cache_block if plan.length % cfg.cache_block == 0 else 0
    if plan.length % 16 or not blocks or (plan.length // 8) % blocks:
        raise UserError(f"{directory}: model.length = {plan.length} with reproduce.cache_block = "
                        f"{cfg.cache_block}; expected a length divisible by 16 whose NFE L/8 splits "
                        f"evenly over length / cache_block blocks")
    return plan


def _check_recipes(directory: Path, recipes: dict[str, Recipe]) -> None:
    """What makes the comparison fair: equal data for the continuations, binary base, AR scorer."""
    if recipes["base"].softmask.enabled or recipes["base"].model.causal:
        raise UserError(f"{directory / 'base.toml'}: expected a binary MDLM (softmask.enabled = "
                        f"false, model.causal = false)")
    if not recipes["ar"].model.causal:
        raise UserError(f"{directory / 'ar.toml'}: expected model.causal = true (the AR scorer)")
    first = recipes["binary"]
    for name in TRAIN[2:]:
        r = recipes[name]
        if (name == "binary") == r.softmask.enabled:
            raise UserError(f"{directory / f'{name}.toml'}: softmask.enabled = "
                            f"{str(r.softmask.enabled).lower()}, expected "
                            f"{str(name != 'binary').lower()}")
        if (r.data, r.train.seed, r.train.batch_size) != (first.data, first.train.seed,
                                                           first.train.batch_size):
            raise UserError(f"{directory / f'{name}.toml'}: [data], train.seed and train.batch_size "
                            f"must equal binary.toml's: the continuations see the same batches")


# ---- the commands of each stage ----------------------------------------------------------------

def _pretrain(plan: Plan, name: str) -> list[str]:
    sets = _train_sets(plan.smoke, plan.recipes[name])
    if name not in ("base", "ar"):
        sets.append(f"model.init={plan.runs / 'base'}")
    if name == "ar":
        sets.append(f"data.tokenizer={plan.runs / 'base' / 'tokenizer'}")
    argv = ["pretrain", str(plan.directory / f"{name}.toml"), "--out", str(plan.runs / name)]
    return argv + [a for kv in sets for a in ("--set", kv)]


def _sweep(plan: Plan, ckpts: list[str], nfe: list[int], metrics: str, sampler: str,
           out: Path, options: dict | None = None) -> list[str]:
    c = plan.cfg
    argv = ["evaluate", "sweep", *(a for r in ckpts for a in ("--ckpt", str(plan.runs / r))),
            "--nfe", ",".join(map(str, nfe)), "--metrics", metrics,
            "--scorer", str(plan.runs / "ar"), "--num-samples", str(c.num_samples),
            "--seeds", str(c.seeds), "--batch-size", str(c.batch_size), "--sampler", sampler,
            "--device", c.device, "--out", str(out)]
    return argv + [a for k, v in (options or {}).items() for a in ("-o", f"{k}={v}")]


def commands(plan: Plan, stage: str) -> list[list[str]]:
    """The smdlm argument lists a stage runs (without the leading `smdlm`)."""
    c, runs = plan.cfg, plan.runs
    if stage in TRAIN:
        return [_pretrain(plan, stage)]
    if stage.startswith("sweep-"):
        sampler = stage.removeprefix("sweep-")
        metrics = "genppl,entropy,mauve" + (",elbo" if sampler == c.samplers[0] else "")
        return [_sweep(plan, [*CONTINUATIONS, "ar"], plan.nfe, metrics, sampler, runs / stage)]
    if stage == "sm-on-sweep":
        return [_sweep(plan, ["sm-on"], plan.nfe, "genppl,entropy,mauve,elbo", c.samplers[0],
                       runs / stage)]
    if stage == "entropy":
        return [["inspect-lambda", str(runs / r), "--json", "--decode", "--nfe",
                 str(plan.length // 4), "--num-samples", str(c.num_samples),
                 "--decode-png", str(runs / "lambda" / f"{r}-decode.png")] for r in ENTROPY_RUNS]
    if stage == "lambda":
        return [["inspect-lambda", str(runs / r), "--json", "--decode", "--nfe",
                 str(plan.length // 16), "--num-samples", str(c.num_samples),
                 "--png", str(runs / "lambda" / f"{r}.png"),
                 "--decode-png", str(runs / "lambda" / f"{r}-decode.png")] for r in SM_RUNS]
    if stage == "cache":
        out = []
        for name, rule in CACHE.items():
            options = {"block_length": c.cache_block, "temperature": c.temperature}
            options.update({"cache": rule["cache"]} if "cache" in rule else {})
            options.update({"threshold": c.threshold} if "threshold" in rule else {})
            out.append(_sweep(plan, ["binary", "sm-iso-update"], [plan.length // 8],
                              "genppl,entropy,mauve", "confidence", runs / "cache" / name, options))
        return out
    raise UserError(f"--stage {stage}: unknown stage; expected one of {', '.join(plan.stages)}")


def needs(plan: Plan, stage: str) -> list[str]:
    """The stages whose outputs `stage` reads."""
    if stage == "base":
        return []
    if stage in TRAIN:
        return ["base"]
    if stage == "report":
        return []  # it reports what exists and says what is missing
    if stage == "lambda":
        return list(SM_RUNS)
    if stage == "entropy":
        return list(ENTROPY_RUNS)
    if stage == "cache":
        return ["ar", "binary", "sm-iso-update"]
    if stage == "sm-on-sweep":
        return ["ar", "sm-on"]
    return ["ar", *CONTINUATIONS]


# ---- running -------------------------------------------------------------------------------------

def shown(argv: list[str]) -> str:
    return "smdlm " + shlex.join(argv)


