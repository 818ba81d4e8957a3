"""`smdlm evaluate lm-eval`: lm-evaluation-harness tasks on a run, with smdlm's flags and report.

The run is wrapped as lm-eval's "smdlm" model (evals/lmeval.py) and lm-eval's own evaluator runs
the tasks: its prompts, few-shot examples, filters and metrics. The report is smdlm's JSON report
(evals/report.py) with lm-eval's per-task results under "results" and each metric also at the top
level as "<task>/<metric>" (a filter other than "none" is kept: "<task>/<metric>,<filter>").

Not here: the model adapter and its ELBO (evals/lmeval.py, evals/likelihood.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from smdlm_cli.commands.sample import SampleSettings, sampler_options
from smdlm_cli.core import rundir
from smdlm_cli.core.errors import UserError
from smdlm_cli.evals.report import new_report, report_path, timed, write_report


@dataclass
class LmEvalSettings:
    tasks: list[str]
    include_path: str | None = None   # a directory of task YAMLs of one's own
    builtin: bool = True              # also index lm-eval's own tasks (slow to index: ~15 s)
    num_fewshot: int | None = None
    limit: float | None = None        # documents per task (a fraction if < 1)
    chat: bool = False                # lm-eval's --apply_chat_template
    mc_num: int = 128
    mc_batch_size: int = 32
    out: str | None = None


def _check(e: LmEvalSettings, s: SampleSettings) -> None:
    if not e.tasks:
        raise UserError("--tasks: expected one or more comma-separated lm-eval task names")
    if e.include_path is not None and not Path(e.include_path).is_dir():
        raise UserError(f"--include-path {e.include_path}: no such directory of task YAMLs")
    if e.mc_num < 1 or e.mc_batch_size < 1:
        raise UserError(f"--mc-num {e.mc_num} / --mc-batch-size {e.mc_batch_size}: expected "
                        f"integers >= 1")
    if s.nfe is not None and s.nfe < 0:
        raise UserError(f"--nfe {s.nfe}: expected an integer >= 1 (0: one per generated token)")


def _plain(value):
    """JSON-safe copies of lm-eval's numbers (NaN and infinities become None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return float(value) if hasattr(value, "__float__") else str(value)


def run(s: SampleSettings, e: LmEvalSettings) -> tuple[dict, Path]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("evaluate lm-eval needs lm-evaluation-harness; expected it installed: "
                        "pip install 'smdlm[lmeval]'") from None
    from smdlm_cli.evals.lmeval import SMDLM

    _check(e, s)
    run_dir = rundir.resolve(s.ckpt)
    manager = TaskManager(include_path=e.include_path, include_defaults=e.builtin)
    unknown = [t for t in e.tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--tasks: {unknown[0]!r} is not an lm-eval task here; expected a built-in "
                        f"task or one under --include-path")
    model_args = {"sampler": s.sampler, "nfe": s.nfe or None, "k": s.k, "seed": s.seed,
                  "sm_schedule": s.sm_schedule, "exact": s.exact, "mc_num": e.mc_num,
                  "mc_batch_size": e.mc_batch_size, **sampler_options(s)}
    model_args = {k: v for k, v in model_args.items() if v is not None}
    lm = SMDLM(ckpt=str(run_dir), batch_size=s.batch_size, device=s.device, **model_args)
    settings = {"tasks": e.tasks, "model_args": model_args, "lm_eval": asdict(e),
                "batch_size": s.batch_size, "device": str(lm.device)}
    report = new_report("lm-eval", settings, run_dir)
    with timed(report, "lm-eval"):
        try:
            out = simple_evaluate(model=lm, tasks=e.tasks, num_fewshot=e.num_fewshot,
                                  limit=e.limit, task_manager=manager, apply_chat_template=e.chat,
                                  log_samples=False)
        except (ConnectionError, FileNotFoundError) as err:  # a task's dataset: offline, missing
            why = str(err).splitlines()[0][:200] if str(err) else ""
            raise UserError(f"--tasks {','.join(e.tasks)}: a task's data could not be loaded "
                            f"({type(err).__name__}: {why}); expected its dataset in the local "
                            f"cache or the hub reachable") from None
    results = _plain(out["results"])
    report["results"] = results
    report["n-samples"] = _plain(out.get("n-samples", {}))
    for task, metrics in results.items():
        for name, value in metrics.items():
            metric, _, kind = name.partition(",")
            if name != "alias":
                report[f"{task}/{metric}" if kind in ("", "none") else f"{task}/{name}"] = value
    return report, write_report(report, report_path("lm-eval", e.out, run_dir))
