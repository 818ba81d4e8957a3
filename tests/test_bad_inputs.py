"""Every bad input the hardening pass found is one `error:` line naming it, and exit code 2.

Each case edits a copy of a tiny run (or writes a bad file) and runs the command in-process; the
loaders it exercises (config.json, softmask.json, state/, prompt and sample files) are the same a
library caller reaches.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from runs import make_run
from smdlm_cli.cli.app import app
from smdlm_cli.core import checkpoint
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.softmask import SoftMask

runner = CliRunner()
BAD_BYTES = b"\xff\xfe\x00 not utf-8\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("bad") / "run", SoftMask(k=2, scale=0.5))


def _json_edit(name: str, **changes):
    def edit(d: Path):
        (d / name).write_text(json.dumps({**json.loads((d / name).read_text()), **changes}))
    return edit


def _write(name: str, data: bytes):
    return lambda d: (d / name).write_bytes(data)


# (case id, how to damage a copy of the run, extra sample flags, words the error must hold)
RUN_CASES = [
    ("config-list", _write("config.json", b"[1, 2]"), [], ["config.json", "JSON array", "object"]),
    ("config-negative-heads", _json_edit("config.json", n_heads=-2), [], ["n_heads = -2", "positive"]),
    ("config-string-length", _json_edit("config.json", model_length="24"), [],
     ["model_length = '24'", "integer"]),
    ("config-bad-mask", _json_edit("config.json", mask_id=10_000), [], ["mask_id = 10000"]),
    ("config-not-utf8", _write("config.json", BAD_BYTES), [], ["config.json", "not UTF-8"]),
    ("softmask-list", _write("softmask.json", b"[]"), [], ["softmask.json", "JSON array"]),
    ("softmask-string-raw", _json_edit("softmask.json", raw={"raw_scale": "x"}), [],
     ["raw raw_scale = 'x'", "expected a number"]),
    ("softmask-raw-not-object", _json_edit("softmask.json", raw=[1]), [], ["raw = [1]"]),
    ("softmask-k-above-vocabulary", _json_edit("softmask.json", k=100_000), [],
     ["k = 100000", "expected 1 to"]),
    ("softmask-nan", _write("softmask.json", b'{"k": 2, "scale": NaN, "centre": -1, "steepness": 1}'),
     [], ["scale = nan", "finite"]),
    ("empty-directory", lambda d: [p.unlink() if p.is_file() else shutil.rmtree(p)
                                   for p in list(d.iterdir())], [], ["not a run directory"]),
    ("corrupt-tokenizer", _write("tokenizer/tokenizer.json", b"{"), [], ["tokenizer", "cannot be read"]),
    ("pickled-weights", lambda d: ((d / "model.safetensors").unlink(),
                                   (d / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")),
     [], ["pytorch_model.bin", "safetensors only", "save_file"]),
    ("truncated-weights", lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:200]), [], ["model.safetensors", "not a readable"]),
    ("k-flag-above-vocabulary", lambda d: None, ["--k", "100000"], ["--k", "k = 100000"]),
    ("seed-beyond-int64", lambda d: None, ["--seed", str(10**20)], ["--seed", "expected an integer"]),
    ("device-mps", lambda d: None, ["--device", "mps"], ["--device mps"]),
    ("length-zero", lambda d: None, ["--length", "0"], ["--length 0", "expected 2 to"]),
]


def one_line(result, words):
    err = result.stderr
    assert result.exit_code == 2, (result.exit_code, err, result.exception)
    assert err.startswith("error: ") and err.count("\n") == 1 and "unreachable" not in err, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("edit, flags, words", [c[1:] for c in RUN_CASES], ids=[c[0] for c in RUN_CASES])
def test_sample_refuses_a_damaged_run_in_one_line(run, tmp_path, edit, flags, words):
    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    edit(damaged)
    result = runner.invoke(app, ["sample", "--ckpt", str(damaged), "--nfe", "2", "--num-samples", "1",
                                 "--out", str(tmp_path / "s.jsonl"), *flags])
    one_line(result, words)
    assert not (tmp_path / "s.jsonl").exists()


@pytest.mark.parametrize("content, words", [(BAD_BYTES, ["not UTF-8", "byte 0xff"]),
                                            (b"", ["holds no prompt"]),
                                            (b"\n  \n", ["holds no prompt"])],
                         ids=["not-utf8", "empty", "blank"])
def test_prompt_file(run, tmp_path, content, words):
    (tmp_path / "p.txt").write_bytes(content)
    one_line(runner.invoke(app, ["sample", "--ckpt", str(run), "--nfe", "2", "--prompt-file",
                                 str(tmp_path / "p.txt")]), ["--prompt-file", *words])


def test_inspect_lambda_reads_utf8_json_objects_only(tmp_path):
    (tmp_path / "bad.json").write_bytes(BAD_BYTES)
    one_line(runner.invoke(app, ["inspect-lambda", str(tmp_path / "bad.json")]), ["not UTF-8"])
    (tmp_path / "list.json").write_text("[1]")
    one_line(runner.invoke(app, ["inspect-lambda", str(tmp_path / "list.json")]), ["JSON array"])


@pytest.mark.parametrize("flags, words", [
    (["--timeout", "nan"], ["--timeout nan", "finite"]),
    (["--timeout", "inf"], ["--timeout inf"]),
    (["--max-new-tokens", "-5"], ["--max-new-tokens -5"]),
    (["--workers", "-1"], ["--workers -1"]),
], ids=["timeout-nan", "timeout-inf", "max-new-tokens-negative", "workers-negative"])
def test_code_evaluation_flags(tmp_path, flags, words):
    samples = tmp_path / "s.jsonl"
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": "    return 1\n"}) + "\n")
    one_line(runner.invoke(app, ["evaluate", "humaneval", "--samples", str(samples), *flags]), words)


def test_samples_file_not_utf8(tmp_path):
    (tmp_path / "s.jsonl").write_bytes(BAD_BYTES)
    one_line(runner.invoke(app, ["evaluate", "humaneval", "--samples", str(tmp_path / "s.jsonl")]),
             ["--samples", "not UTF-8"])


# --- the resumable state: every file a save writes, damaged ------------------------------------
@pytest.fixture()
def state(tmp_path) -> Path:
    w = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(w.parameters())
    w(torch.ones(1, 4)).sum().backward()
    opt.step()
    return checkpoint.save_state(tmp_path, 1, dict(w.named_parameters()), opt, None,
                                 {"forwards": 1, "tokens": 4, "loader": {"position": 0}})


@pytest.mark.parametrize("name, data, words", [
    ("weights.safetensors", None, ["weights.safetensors", "is damaged"]),
    ("optimizer.safetensors", None, ["optimizer.safetensors", "is damaged"]),
    ("trainer.json", b"{", ["trainer.json", "not valid JSON"]),
    ("trainer.json", b"[]", ["trainer.json", "JSON array"]),
    ("trainer.json", b'{"step": "1", "forwards": 1, "tokens": 4, "loader": {}}', ["step = '1'"]),
    ("optimizer.json", b"{}", ["optimizer.json", "param_groups"]),
    ("optimizer.json", BAD_BYTES, ["optimizer.json", "not UTF-8"]),
], ids=["truncated-weights", "truncated-optimizer", "trainer-cut", "trainer-list", "trainer-types",
        "optimizer-keys", "optimizer-bytes"])
def test_a_damaged_state_is_one_line(state, name, data, words):
    path = state / name
    path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2] if data is None else data)
    with pytest.raises(UserError) as e:
        checkpoint.load_state(state)
    assert str(e.value).startswith("--resume: ") and "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_an_intact_state_loads(state):
    st = checkpoint.load_state(state)
    assert st["trainer"]["step"] == 1 and set(st["weights"]) == {"weight", "bias"}


# --- nothing is unpickled -----------------------------------------------------------------------
def test_a_pickled_adapter_is_refused_before_peft_reads_it(run, tmp_path):
    from smdlm_cli.core.models import load_model

    ft = tmp_path / "ft"
    (ft / "adapter").mkdir(parents=True)
    (ft / "base.json").write_text(json.dumps({"path": str(run)}))
    (ft / "adapter" / "adapter_config.json").write_text("{}")
    (ft / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1
    with pytest.raises(UserError, match=r"adapter_model.bin, a pickled weights file.*safetensors only"):
        load_model(str(ft))


def test_a_pickled_scorer_is_refused(tmp_path):
    from smdlm_cli.evals.scorer import load_scorer

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UserError, match=r"--scorer .*pytorch_model.bin.*Convert it outside smdlm"):
        load_scorer(str(tmp_path), torch.device("cpu"))


def test_no_module_calls_torch_load():
    """No call of torch.load, pickle.load(s) or of anything named load on torch (the advice text
    that tells users how to convert outside smdlm is a string, not a call)."""
    import ast

    offenders = []
    for p in (Path(__file__).parents[1] / "smdlm_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "pickle") \
                    and node.func.attr in ("load", "loads"):
                offenders.append(f"{p.name}:{node.lineno}")
    assert offenders == []


# --- inputs that used to exit 0 with a wrong result ---------------------------------------------
def test_nan_weights_are_named_not_decoded(run, tmp_path):
    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "run"
    shutil.copytree(run, damaged)
    w = load_file(str(damaged / "model.safetensors"))
    name = sorted(w)[0]
    w[name] = torch.full_like(w[name], float("nan"))
    save_file(w, str(damaged / "model.safetensors"))
    one_line(runner.invoke(app, ["sample", "--ckpt", str(damaged), "--nfe", "2"]),
             [name.removeprefix("backbone."), "NaN"])


@pytest.mark.parametrize("flags, words", [(["--batches", "-1"], ["--batches -1"]),
                                          (["--batch-size", "-2"], ["--batch-size -2"]),
                                          (["--seed", "-1"], ["--seed -1"])],
                         ids=["batches", "batch-size", "seed"])
def test_elbo_flags(run, flags, words):
    one_line(runner.invoke(app, ["evaluate", "elbo", "--ckpt", str(run), *flags]), words)
