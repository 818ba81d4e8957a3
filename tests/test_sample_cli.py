"""`smdlm sample`: reproducible, prompt-preserving, row-independent, SM at scale 0 is binary."""

import hashlib
import json
import os
import time

import pytest
from typer.testing import CliRunner

from runs import LENGTH, make_run, tokenizer
from smdlm_cli.cli.app import app
from smdlm_cli.core.softmask import SoftMask

runner = CliRunner()


@pytest.fixture(scope="module")
def sm_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run") / "sm", SoftMask(k=3, scale=0.9, centre=-6.0,
                                                                    steepness=2.0))


def sample(run_dir, out, *args):
    result = runner.invoke(app, ["sample", "--ckpt", str(run_dir), "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_writes_samples_and_sidecar(sm_run, tmp_path):
    rows = sample(sm_run, tmp_path / "s.jsonl", "--nfe", "8", "--num-samples", "3")
    assert len(rows) == 3
    tok = tokenizer()
    for r in rows:
        assert isinstance(r["text"], str) and len(r["tokens"]) == LENGTH and r["seconds"] > 0
        assert 1 <= r["nfe"] <= 9  # 8 steps, reused steps skipped, plus the noise-removal forward
        assert tok.mask_token_id not in r["tokens"] and r["tokens"][0] == tok.bos_token_id
    side = json.loads((tmp_path / "s.meta.json").read_text())
    digest = hashlib.sha256((sm_run / "model.safetensors").read_bytes()).hexdigest()
    assert side["checkpoint"]["sha256"] == digest
    assert side["settings"]["k"] == 3 and side["softmask"]["scale"] == pytest.approx(0.9)
    assert {"torch", "transformers", "smdlm"} <= set(side["versions"])


def test_seeds_reproduce_and_rows_are_independent(sm_run, tmp_path):
    a = sample(sm_run, tmp_path / "a.jsonl", "--nfe", "6", "--num-samples", "3", "--seed", "5")
    b = sample(sm_run, tmp_path / "b.jsonl", "--nfe", "6", "--num-samples", "3", "--seed", "5")
    c = sample(sm_run, tmp_path / "c.jsonl", "--nfe", "6", "--num-samples", "1", "--seed", "7")
    d = sample(sm_run, tmp_path / "d.jsonl", "--nfe", "6", "--num-samples", "3", "--seed", "6")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert a[2]["tokens"] == c[0]["tokens"]  # row 2 of seed 5 is seed 7 alone
    assert a[1]["tokens"] == d[0]["tokens"] and a[0]["tokens"] != d[0]["tokens"]


def test_prompt_is_kept(sm_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\nimport os\n")
    rows = sample(sm_run, tmp_path / "p.jsonl", "--nfe", "4", "--num-samples", "3",
                  "--prompt-file", str(prompts))
    tok = tokenizer()
    for r, text in zip(rows, ["def f(x):", "import os", "def f(x):"]):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert r["prompt"] == text and r["tokens"][1:1 + len(ids)] == ids


def test_k0_equals_sm_at_scale_zero(sm_run, tmp_path):
    zero = make_run(tmp_path / "zero", SoftMask(k=3, scale=0.0))  # same weights: same seed
    binary = sample(sm_run, tmp_path / "k0.jsonl", "--nfe", "8", "--num-samples", "4", "--k", "0")
    scaled = sample(zero, tmp_path / "z.jsonl", "--nfe", "8", "--num-samples", "4")
    soft = sample(sm_run, tmp_path / "sm.jsonl", "--nfe", "8", "--num-samples", "4")
    assert [r["tokens"] for r in binary] == [r["tokens"] for r in scaled]
    assert [r["tokens"] for r in binary] != [r["tokens"] for r in soft]  # the feedback matters


def test_default_checkpoint_is_the_newest_run(sm_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["sample", "--nfe", "4"])
    assert result.exit_code == 2 and "smdlm pretrain" in result.stderr
    old = make_run(tmp_path / "runs" / "old")
    new = make_run(tmp_path / "runs" / "new", seed=1)
    os.utime(old / "model.safetensors", (time.time() - 100,) * 2)
    result = runner.invoke(app, ["sample", "--nfe", "4", "--num-samples", "1"])
    assert result.exit_code == 0, result.output
    assert f"sampling from {new.relative_to(tmp_path)}" in result.stderr
    assert result.stdout.strip().startswith(str(new.relative_to(tmp_path) / "samples"))


@pytest.mark.parametrize("args, message", [
    (["--nfe", "0"], "--nfe 0: expected an integer >= 1"),
    (["--k", "-1"], "--k -1: expected 0"),
    (["--length", "500"], "--length 500: expected 2 to 24"),
    (["--sampler", "nope"], "sampler = 'nope'"),
    (["--sampler", "confidence", "--temperature", "-1"], "sampler confidence"),
    (["--prompt", "x " * 40], "takes"),
])
def test_bad_flags_are_one_line_errors(sm_run, tmp_path, args, message):
    result = runner.invoke(app, ["sample", "--ckpt", str(sm_run), "--out", str(tmp_path / "x.jsonl"),
                                 *args])
    assert result.exit_code == 2 and message in result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "x.jsonl").exists()


def test_k_on_a_binary_run_is_refused(tmp_path):
    run = make_run(tmp_path / "binary")
    result = runner.invoke(app, ["sample", "--ckpt", str(run), "--k", "3"])
    assert result.exit_code == 2 and "binary run" in result.stderr


def test_show_steps_replays_the_denoising(sm_run, tmp_path):
    result = runner.invoke(app, ["sample", "--ckpt", str(sm_run), "--out", str(tmp_path / "v.jsonl"),
                                 "--nfe", "4", "--num-samples", "1", "--show-steps"])
    assert result.exit_code == 0, result.output
    assert "step 4/4" in result.stderr  # off a terminal, Live prints the last frame only


def test_masks_are_shaded_by_lambda():
    from smdlm_cli.commands.show_steps import BLOCK, frame

    tok = tokenizer()
    ids = tok("x = 1", add_special_tokens=False)["input_ids"]
    m = tok.mask_token_id
    text = frame(ids + [m, m], [0.0] * len(ids) + [0.0, 1.0], tok, m, 2, 8)
    assert text.plain == "step 2/8\nx = 1" + BLOCK * 2
    dim, bright = (str(span.style) for span in text.spans[-2:])
    assert dim == "rgb(80,80,80)" and bright == "rgb(255,255,0)"


def test_all_empty_samples_say_why(sm_run, tmp_path):
    """A model that only writes EOS decodes to empty text: sample says so, in one line, with what
    to try; a model that writes text does not."""
    from smdlm_cli.core.io import atomic_save_tensors, load_tensors

    weights = load_tensors(sm_run / "model.safetensors")
    bias = next(k for k in weights if k.endswith("output_layer.linear.bias"))
    weights[bias] = weights[bias].clone()
    weights[bias][tokenizer().eos_token_id] = 1e4
    eos_run = tmp_path / "eos"
    eos_run.mkdir()
    for f in sm_run.iterdir():
        if f.name != "model.safetensors":
            (eos_run / f.name).symlink_to(f)
    atomic_save_tensors(eos_run / "model.safetensors", weights)
    result = runner.invoke(app, ["sample", "--ckpt", str(eos_run), "--out", str(tmp_path / "e.jsonl"),
                                 "--nfe", "4", "--num-samples", "2"])
    assert result.exit_code == 0, result.output
    assert "all 2 samples generated nothing but special tokens" in result.stderr
    assert "pad_supervised" in result.stderr
    assert json.loads((tmp_path / "e.meta.json").read_text())["empty_samples"] == 2
    plain = runner.invoke(app, ["sample", "--ckpt", str(sm_run), "--out", str(tmp_path / "p.jsonl"),
                                "--nfe", "4", "--num-samples", "2"])
    assert "generated nothing" not in plain.stderr
