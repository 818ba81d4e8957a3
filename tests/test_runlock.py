"""Run directories cannot be lost: one writer, always publishable or resumable, never overwritten
by another command, a full disk reported in one line with nothing previously written lost."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from runs import make_run
from smdlm_cli.cli.app import app
from smdlm_cli.core import checkpoint, runlock
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import load_tensors
from smdlm_cli.core.softmask import SoftMask

ROOT = Path(__file__).parents[1]
BUDGET = ["data.max_docs=20", "data.vocab_size=300", "model.length=32", "model.hidden_size=32",
          "model.n_blocks=1", "model.n_heads=2", "model.cond_dim=16", "train.batch_size=2",
          "train.eval_every=100", "train.eval_batches=1", "train.save_every=100",
          "train.log_every=1", "train.warmup=1", "train.steps=3"]
runner = CliRunner()


def pretrain(out: Path, *extra: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "smdlm_cli", "pretrain", str(ROOT / "recipes" / "quickstart.toml"),
            "--out", str(out), *[a for kv in BUDGET for a in ("--set", kv)], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rd") / "run"
    proc = pretrain(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


def one_line_error(proc, *words):
    err = proc.stderr
    assert proc.returncode == 2 and err.startswith("error:") and err.count("\n") == 1, err[-2000:]
    for w in words:
        assert w in err, err


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    lock = runlock.claim(tmp_path / "run", resume=False)
    try:
        with pytest.raises(UserError, match=f"being written by process {os.getpid()}"):
            runlock.claim(tmp_path / "run", resume=False)
        proc = pretrain(tmp_path / "run")  # a real second process
        one_line_error(proc, f"process {os.getpid()}")
    finally:
        lock.release()
    runlock.claim(tmp_path / "run", resume=False).release()  # free again once released


def test_killed_between_state_and_publish_resumes_and_republishes(trained, tmp_path):
    """The instant the issue found stranded: a complete state, no model, no state/latest."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    published = load_tensors(run / "model.safetensors")
    for name in ("model.safetensors", "config.json", "softmask.json", "state/latest"):
        (run / name).unlink()
    result = runner.invoke(app, ["sample", "--ckpt", str(run), "--nfe", "2"])
    assert result.exit_code == 2 and "--resume" in result.stderr and "hub" not in result.stderr
    (run / ".model.safetensors.x1y2.tmp").write_bytes(b"half")  # stale temporaries
    (run / "state" / ".weights.safetensors.z.tmp").write_bytes(b"half")
    (run / "state" / "step-9999999").mkdir()  # a state never completed
    proc = pretrain(run, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = load_tensors(run / "model.safetensors")
    assert again.keys() == published.keys()
    assert all(torch.equal(again[k], published[k]) for k in again)
    assert (run / "state" / "latest").read_text().strip() == "step-0000003"
    assert not list(run.rglob("*.tmp")) and not (run / "state" / "step-9999999").exists()


def test_a_start_that_never_saved_is_started_over(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for name in ("model.safetensors", "config.json", "softmask.json", "transparency_config.json",
                 "state/latest", "state/step-0000003/trainer.json"):
        (run / name).unlink()
    (run / ".recipe.toml.abc.tmp").write_text("half")
    proc = pretrain(run, "--resume")
    one_line_error(proc, "without --resume")
    proc = pretrain(run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert checkpoint.latest_state(run).name == "step-0000003"
    assert not list(run.rglob("*.tmp"))


def test_a_finished_run_or_foreign_files_are_never_overwritten(trained, tmp_path):
    with pytest.raises(UserError, match="already holds a run"):
        runlock.claim(trained, resume=False, main=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already holds a run or other files \(notes.txt\)"):
        runlock.claim(tmp_path / "mine", resume=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        runlock.claim(tmp_path / "file", resume=False)


@pytest.mark.parametrize("name", ["softmask.json", "model.safetensors", "config.json", "recipe.toml",
                                  "sampler.json", "state/latest", "tokenizer/tokenizer.json"])
def test_sample_never_writes_into_a_run_directorys_own_files(tmp_path, name):
    run = make_run(tmp_path / "run", SoftMask(k=2, scale=0.5))
    (run / "recipe.toml").write_text("# a run\n")
    (run / "state").mkdir()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["sample", "--ckpt", str(run), "--nfe", "2", "--num-samples", "1",
                                 "--out", str(run / name)])
    assert result.exit_code == 2 and result.stderr.startswith("error: --out")
    assert "would overwrite" in result.stderr and result.stderr.count("\n") == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_outputs_beside_a_runs_files_are_allowed(tmp_path):
    run = make_run(tmp_path / "run")
    assert runlock.check_output(run / "samples" / "s.jsonl") == run / "samples" / "s.jsonl"
    assert runlock.check_output(tmp_path / "elsewhere.json") == tmp_path / "elsewhere.json"
    with pytest.raises(UserError, match="would overwrite"):
        runlock.check_output(run / "config.json")
    from smdlm_cli.evals.report import report_path
    with pytest.raises(UserError, match="would overwrite"):
        report_path("elbo", str(run / "model.safetensors"), None)


FULL_DISK = textwrap.dedent("""
    import sys, torch
    from pathlib import Path
    from smdlm_cli.core import checkpoint
    from smdlm_cli.core.errors import UserError
    run = Path(sys.argv[1])
    w = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(w.parameters())
    w(torch.ones(1, 8)).sum().backward(); opt.step()
    small = {"w": w.weight.detach()}
    d = checkpoint.save_state(run, 1, small, opt, None, {"loader": {}})
    checkpoint.commit_state(run, d)
    try:
        checkpoint.save_state(run, 2, {"w": torch.zeros(400_000)}, opt, None, {"loader": {}})
    except UserError as e:
        print("USERERROR", e)
    print("LATEST", checkpoint.latest_state(run).name)
    print("LEFT", sorted(p.name for p in (run / "state").iterdir()))
    print("TMP", list(run.rglob("*.tmp")))
""")


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path):
    """A 1 MiB tmpfs in a private mount namespace: the second, larger state does not fit."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare")
    (tmp_path / "d").mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {tmp_path / 'd'} && "
              f"exec {sys.executable} -c '{FULL_DISK}' {tmp_path / 'd' / 'run'}")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0 and "unshare" in proc.stderr:
        pytest.skip(f"user namespaces unavailable: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert "no space left on the device" in lines["USERERROR"]
    assert "weights.safetensors" in lines["USERERROR"] and "1.5 MiB" in lines["USERERROR"]
    assert lines["LATEST"] == "step-0000001"
    assert lines["LEFT"] == "['latest', 'step-0000001']" and lines["TMP"] == "[]"


def test_inspect_lambda_never_writes_its_plot_over_a_runs_file(tmp_path):
    run = make_run(tmp_path / "run", SoftMask(k=2, scale=0.5))
    before = (run / "softmask.json").read_bytes()
    result = runner.invoke(app, ["inspect-lambda", str(run), "--png", str(run / "softmask.json")])
    assert result.exit_code == 2 and "--png" in result.stderr and "would overwrite" in result.stderr
    assert (run / "softmask.json").read_bytes() == before
