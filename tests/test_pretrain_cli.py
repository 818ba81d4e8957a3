"""`smdlm pretrain` as a process: SIGKILL and --resume end where an uninterrupted run ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smdlm_cli.core.io import load_tensors

ROOT = Path(__file__).parents[1]
BUDGET = ["data.max_docs=30", "data.vocab_size=400", "model.length=48", "train.batch_size=4",
          "train.eval_every=4", "train.eval_batches=1", "train.save_every=4", "train.log_every=1",
          "train.warmup=2", "train.steps=16", "model.dropout=0.1"]


def pretrain(out: Path, *extra: str, wait: bool = True):
    argv = [sys.executable, "-m", "smdlm_cli", "pretrain", str(ROOT / "recipes" / "quickstart.toml"),
            "--out", str(out), *[a for kv in BUDGET for a in ("--set", kv)], *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    return proc


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    pretrain(tmp_path / "full")
    proc = pretrain(tmp_path / "killed", wait=False)
    deadline = time.time() + 300
    while not (tmp_path / "killed" / "state" / "step-0000008").exists():  # past the second save
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "state" / "step-0000016").exists()
    pretrain(tmp_path / "killed", "--resume")
    a = load_tensors(tmp_path / "full" / "model.safetensors")
    b = load_tensors(tmp_path / "killed" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert (tmp_path / "full" / "softmask.json").read_text() == \
        (tmp_path / "killed" / "softmask.json").read_text()


def test_an_existing_run_is_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = pretrain(out, wait=False)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "already holds a run" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_full_quickstart_lowers_the_validation_elbo(tmp_path):
    """The README's main job, unshrunk (about 10 minutes on 2 cores): `-m slow` runs it."""
    argv = [sys.executable, "-m", "smdlm_cli", "pretrain", str(ROOT / "recipes" / "quickstart.toml"),
            "--out", str(tmp_path / "qs")]
    start = time.time()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    assert time.time() - start < 600
    import json

    vals = [json.loads(x)["val_nll"] for x in (tmp_path / "qs" / "metrics.jsonl").read_text().splitlines()
            if "val_nll" in x]
    assert vals[-1] < vals[0] - 1.0


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes").glob("*.toml")))
def test_every_shipped_recipe_loads(recipe):
    from smdlm_cli.recipe import load_recipe

    r = load_recipe(ROOT / "recipes" / recipe)
    assert r.train.steps > 0 and r.model.length >= 64


@pytest.mark.parametrize("recipe, missing", [("owt.toml", "'gpt2'"), ("owt-binary.toml", "'gpt2'"),
                                             ("owt-continue.toml", "'gpt2'")])
def test_owt_recipes_fail_fast_offline(recipe, missing, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from smdlm_cli.cli.app import app

    monkeypatch.chdir(tmp_path)
    start = time.time()
    result = CliRunner().invoke(app, ["pretrain", str(ROOT / "recipes" / recipe)])
    assert result.exit_code == 2 and time.time() - start < 30
    assert missing in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no debris


def test_ctrl_c_says_what_was_kept_and_how_to_go_on(tmp_path, monkeypatch):
    """Before the first save: nothing is kept and the directory is gone, so the same command
    starts over; after one: the message names the state and the --resume command."""
    from typer.testing import CliRunner

    from smdlm_cli.cli.app import app
    from smdlm_cli.core import trainer

    tiny = [a for kv in ("data.max_docs=40", "data.vocab_size=400", "model.length=48",
                         "train.steps=4", "train.batch_size=4", "train.eval_every=2",
                         "train.eval_batches=1", "train.save_every=2", "train.warmup=1")
            for a in ("--set", kv)]
    real_fit = trainer.fit

    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "fit", interrupted)
    run = tmp_path / "run"
    argv = ["pretrain", str(ROOT / "recipes" / "quickstart.toml"), "--out", str(run), *tiny]
    first = CliRunner().invoke(app, argv)
    assert first.exit_code == 130 and "nothing was kept; the same command starts over" in first.stderr
    assert not run.exists()
    monkeypatch.setattr(trainer, "fit", real_fit)
    assert CliRunner().invoke(app, argv).exit_code == 0  # the same command, as promised
    monkeypatch.setattr(trainer, "fit", interrupted)
    again = CliRunner().invoke(app, ["pretrain", str(run / "recipe.toml"), "--out", str(run),
                                     "--resume", "--set", "train.steps=6"])
    assert again.exit_code == 130
    assert f"keeps the state of step-0000004; continue with: smdlm pretrain {run / 'recipe.toml'}" \
           f" --out {run} --resume" in " ".join(again.stderr.split())


def test_the_training_eta_survives_progress_lines_minutes_apart():
    """Rich estimates speed over its last 30 s by default: a run logging every 40 s had no ETA."""
    from smdlm_cli.commands.training import progress_bar

    clock = [0.0]
    bar = progress_bar("pretrain", get_time=lambda: clock[0])
    task = bar.add_task("train", total=100, info="")
    for step in (10, 20, 30):
        clock[0] += 40.0
        bar.update(task, completed=step)
    assert bar.tasks[0].time_remaining == pytest.approx(70 * 4.0)
