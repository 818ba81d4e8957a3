"""`smdlm reproduce DIR`: the paper's main experiment at small scale, as a resumable chain of smdlm
commands.

DIR holds base.toml (a binary MDLM trained from scratch), ar.toml (the AR scorer and reference
row), three continuations of the base on equal data (binary.toml, sm-iso-update.toml,
sm-iso-compute.toml), a diagnostic fourth (sm-on.toml: sm-iso-update with soft-masking switched on
from the start, beyond the paper's protocol) and reproduce.toml (how they are evaluated). The
stages, in order:

  base, ar, binary, sm-iso-update, sm-iso-compute, sm-on
                    `smdlm pretrain`, resumed where an earlier attempt stopped
  lambda            `smdlm inspect-lambda --decode` of each SM run at NFE L/16
  cache             `smdlm evaluate sweep --sampler confidence` at NFE L/8: {no cache, dual cache}
                    x {threshold off, on}, each with binary and SM decoding
  sweep-<sampler>   `smdlm evaluate sweep` of the continuations and the AR row: gen-PPL, unigram
                    entropy, MAUVE (and ELBO, in the first sweep) at NFE L/16, L/8, L/4, L/2, L
  sm-on-sweep       the same for sm-on with the first sampler: apart from the main table
  report            the Markdown report and its figures, computed from the outputs above
                    (commands/results.py)

Every stage but the report runs the smdlm command line in a subprocess, exactly as a user would,
and is recorded in RUNS/stages.json (its commands and wall seconds) when it finishes; a finished
stage is skipped, so the same command resumes an interrupted chain. `--smoke` shrinks everything
(a few steps of a tiny model, a handful of samples) to check the chain end to end in minutes.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

from smdlm_cli.core.checkpoint import latest_state
from smdlm_cli.core.config import Recipe, ReproduceConfig
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_write_bytes, atomic_write_json, read_json
from smdlm_cli.recipe import load_recipe, load_table

TRAIN = ("base", "ar", "binary", "sm-iso-update", "sm-iso-compute", "sm-on")
CONTINUATIONS = ("binary", "sm-iso-update", "sm-iso-compute")   # the main table's rows
SM_RUNS = ("sm-iso-update", "sm-iso-compute", "sm-on")
# The caching study: name -> sampler options on top of the block length and temperature.
CACHE = {"no-cache": {}, "no-cache+threshold": {"threshold": True},
         "dual-cache": {"cache": "dual"}, "dual-cache+threshold": {"cache": "dual", "threshold": True}}
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
        return [*TRAIN, "lambda", "cache", *(f"sweep-{s}" for s in self.cfg.samplers),
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
    if stage == "cache":
        return ["ar", "binary", "sm-iso-update"]
    if stage == "sm-on-sweep":
        return ["ar", "sm-on"]
    return ["ar", *CONTINUATIONS]


# ---- running -------------------------------------------------------------------------------------

def shown(argv: list[str]) -> str:
    return "smdlm " + shlex.join(argv)


def _machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    # float results on CPU can differ between processors (kernels chosen per instruction set)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _call(argv: list[str], stage: str, stdout_file: Path | None = None) -> None:
    print(f"[{stage}] {shown(argv)}", file=sys.stderr, flush=True)
    result = subprocess.run([sys.executable, "-m", "smdlm_cli", *argv],
                            stdout=subprocess.PIPE if stdout_file else None)
    if result.returncode != 0:
        raise UserError(f"stage {stage}: `{shown(argv)}` exited with code {result.returncode}; "
                        f"run the same reproduce command again to resume")
    if stdout_file is not None:
        atomic_write_bytes(stdout_file, result.stdout)


def _prepare_training(plan: Plan, stage: str, argv: list[str]) -> list[str]:
    """Resume a run an earlier attempt left behind; one killed before its first save starts over."""
    out = plan.runs / stage
    if latest_state(out) is not None:
        return argv + ["--resume"]
    if out.is_dir() and any(out.iterdir()):
        print(f"[{stage}] {out} holds no saved state (stopped before its first save): starting "
              f"it over", file=sys.stderr)
        shutil.rmtree(out)
    return argv


def run_stage(plan: Plan, stage: str) -> list[str]:
    """Run one stage (not the report); returns the commands it ran, as shown to users."""
    ran = []
    for argv in commands(plan, stage):
        if stage in TRAIN:
            argv = _prepare_training(plan, stage, argv)
        # inspect-lambda --json prints its report on stdout: kept as lambda/<run>.json
        json_out = plan.runs / "lambda" / f"{Path(argv[1]).name}.json" if stage == "lambda" else None
        _call(argv, stage, json_out)
        ran.append(shown(argv) + (f" > {json_out}" if json_out else ""))
    return ran


def run(directory: str | Path, stages: list[str] | None = None, runs: str | None = None,
        report: str | None = None, smoke: bool = False) -> Path | None:
    """Run the chain (or the named stages, in chain order); returns the report's path, or None
    when the report was not among the stages."""
    plan = load_plan(directory, runs, report, smoke)
    for s in stages or []:
        if s not in plan.stages:
            raise UserError(f"--stage {s}: unknown stage; expected one of {', '.join(plan.stages)}")
    todo = [s for s in plan.stages if not stages or s in stages]
    record_file = plan.runs / "stages.json"
    record = read_json(record_file) if record_file.is_file() else {"stages": {}}
    record.update(directory=str(plan.directory), smoke=smoke, machine=_machine())
    done = record["stages"]
    for stage in todo:
        if stage == "report":
            continue
        if stage in done:
            print(f"[{stage}] done earlier ({done[stage]['seconds']:.0f} s): skipped", file=sys.stderr)
            continue
        missing = [n for n in needs(plan, stage) if n not in done and n not in todo]
        if missing:
            raise UserError(f"--stage {stage}: needs the outputs of stage {', '.join(missing)}; "
                            f"run it first (or leave out --stage)")
        began = time.perf_counter()
        ran = run_stage(plan, stage)
        done[stage] = {"commands": ran, "seconds": time.perf_counter() - began,
                       "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "machine": record["machine"]}  # a resumed chain may change machines
        atomic_write_json(record_file, record)
    if "report" in todo:
        from smdlm_cli.commands import results

        return results.write(plan, record)
    return None
