"""MBPP and MBPP+: from an HF dataset or a local JSONL of the same format, two test modes.

Datasets: google-research-datasets/mbpp (config "full", split test, 500 problems) and
evalplus/mbppplus (split test), or a local JSONL whose objects have task_id, text (or prompt),
test_list, and optionally test_imports and test (EvalPlus's extended tests).
Test modes: "3-assert" runs the three asserts of test_list, as Dream's evaluation (also for MBPP+);
"plus" runs the `test` field of MBPP+ (the extended EvalPlus tests).
Prompts:
- instruct: Dream's (reference/dream-sm-coding.md §4): "You are an expert Python programmer, and
  here is your task: {text} Your code should pass these tests:\n\n{three asserts}" and the open
  assistant turn "Here is the completed function:\n```python\n"; the answer is cut at ``` and at
  the end of the turn, and the raw code is the solution (no sanitising, as Dream).
- base: the task and its first assert in a docstring; the model writes the function, cut before
  the first top-level assert, docstring, print, __main__ block or code fence.

Not here: generation or execution.
"""

from __future__ import annotations

import json
from pathlib import Path

from smdlm_cli.core import hub
from smdlm_cli.core.errors import UserError
from smdlm_cli.evals.code import Problem, cut
from smdlm_cli.evals.humaneval import ANSWER_PREFIX, END_OF_TURN, chat

DEFAULT = "google-research-datasets/mbpp"
MODES = ("3-assert", "plus")
BASE_STOPS = ["\nassert", '\n"""', "\nprint", "\nif __name__", "```"]
MAX_NEW_TOKENS = 512  # the SM paper's mbpp_instruct setting


def load_problems(dataset: str = DEFAULT, mode: str = "3-assert") -> dict[str, Problem]:
    if mode not in MODES:
        raise UserError(f"--tests {mode}: expected one of {', '.join(MODES)}")
    rows = _local(Path(dataset)) if Path(dataset).is_file() else _hub(dataset)
    problems = {}
    for n, r in enumerate(rows, 1):
        text = r.get("text") or r.get("prompt")
        if not isinstance(text, str) or not isinstance(r.get("test_list"), list) or "task_id" not in r:
            raise UserError(f"--dataset {dataset}: row {n} lacks task_id, text (or prompt) and "
                            f"test_list; expected MBPP's fields")
        if mode == "plus" and not r.get("test"):
            raise UserError(f"--tests plus: --dataset {dataset} row {n} has no `test` field; "
                            f"expected MBPP+ (evalplus/mbppplus)")
        imports = "\n".join(r.get("test_imports") or [])
        tests = r["test"] if mode == "plus" else "\n".join(r["test_list"])
        task_id = str(r["task_id"])
        problems[task_id] = Problem(task_id, text, f"{imports}\n{tests}".strip("\n"),
                                    extra={"test_list": r["test_list"]})
    return problems


def _local(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise UserError(f"--dataset {path}: line {n} is not JSON ({e.msg})") from None
    return rows


def _hub(name: str) -> list[dict]:
    args = ("full",) if name == DEFAULT else ()
    return list(hub.load_dataset("--dataset", name, *args, split="test", expected="an MBPP-format "
                                 "JSONL or a cached dataset name"))


def prompt_text(problem: Problem, fmt: str, tok) -> str:
    tests = problem.extra["test_list"]
    if fmt == "base":
        return f'"""\n{problem.prompt}\n{tests[0] if tests else ""}\n"""\n'
    user = (f"You are an expert Python programmer, and here is your task: {problem.prompt} "
            f"Your code should pass these tests:\n\n" + "\n".join(tests[:3]))
    return chat(tok, [{"role": "user", "content": user}]) + ANSWER_PREFIX


def postprocess(problem: Problem, generated: str, fmt: str) -> dict:
    stops = BASE_STOPS if fmt == "base" else ["```", END_OF_TURN]
    return {"task_id": problem.task_id, "completion": cut(generated, stops)}
