"""Experiment trackers: a tiny pretrain logs metrics.jsonl's records (and the λ(H) curve) to
TensorBoard and to wandb in offline mode; a missing package is a one-line error; the sweep logs its
tables."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from smdlm_cli.core import tracking
from smdlm_cli.core.errors import UserError

ROOT = Path(__file__).parents[1]
TINY = ["data.max_docs=30", "data.vocab_size=400", "model.length=48", "train.steps=4",
        "train.batch_size=4", "train.eval_every=2", "train.eval_batches=1", "train.save_every=4",
        "train.log_every=1", "train.warmup=2", "softmask.prob=1.0", "softmask.scale=0.5"]
needs_tb = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                              reason="tensorboard is not installed (pip install 'smdlm[tracking]')")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="wandb is not installed (pip install 'smdlm[tracking]')")


def pretrain(out: Path, trackers: str, env: dict | None = None) -> subprocess.CompletedProcess:
    sets = TINY + [f"train.trackers={trackers}"]
    argv = [sys.executable, "-m", "smdlm_cli", "pretrain", str(ROOT / "recipes" / "quickstart.toml"),
            "--out", str(out), *[a for kv in sets for a in ("--set", kv)]]
    return subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True, timeout=600)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@needs_tb
def test_tensorboard_gets_the_records_of_metrics_jsonl_and_the_lambda_curve(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = pretrain(run, '["jsonl","tensorboard"]')
    assert result.returncode == 0, result.stderr[-2000:]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    records = metrics(run)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_nll" in r]
    assert len(train) == 4 and [r["step"] for r in val] == [0, 2, 4]
    for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
        logged = events.Scalars(f"train/{key}")
        assert [e.step for e in logged] == [r["step"] for r in train]
        assert [e.value for e in logged] == pytest.approx([r[key] for r in train], rel=1e-6)
    for key in ("scale", "centre", "steepness"):  # ω, from the training records
        assert [e.value for e in events.Scalars(f"softmask/{key}")] == \
            pytest.approx([r[key] for r in train], rel=1e-6)
    logged = events.Scalars("val/val_nll")
    assert [e.step for e in logged] == [0, 2, 4]
    assert [e.value for e in logged] == pytest.approx([r["val_nll"] for r in val], rel=1e-6)
    # λ's key points and its curve, at every evaluation
    half = events.Scalars("softmask/entropy_at_half_scale")
    assert [e.step for e in half] == [0, 2, 4]
    assert half[-1].value == pytest.approx(-train[-1]["centre"], rel=1e-5)
    assert [e.value for e in events.Scalars("softmask/lambda_at_zero_entropy")][0] < 0.5
    images = events.Images("softmask/lambda_curve")
    assert [e.step for e in images] == [0, 2, 4]
    assert images[0].width > 100 and images[0].height > 100
    assert set(tags["scalars"]) >= {"train/sm", "val/val_ppl", "val/val_bpd"}


@needs_wandb
def test_wandb_offline_writes_its_run_directory_without_a_network(tmp_path):
    run = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path / "elsewhere"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "c")}
    result = pretrain(run, '["jsonl","wandb"]', env)
    assert result.returncode == 0, result.stderr[-2000:]
    run_id = (run / "wandb" / "wandb-id").read_text().strip()
    [offline] = list((run / "wandb").glob(f"wandb/offline-run-*-{run_id}"))
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 1000
    assert metrics(run)[-1]["val_nll"] > 0  # metrics.jsonl as ever


def test_a_missing_tracker_package_is_one_line_naming_it(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"^train.trackers: wandb is not installed; pip install wandb"):
        tracking.check(["jsonl", "wandb"])
    assert tracking.check(["jsonl"]) == []
    with pytest.raises(UserError, match="unknown tracker 'mlflow'"):
        tracking.check(["mlflow"], "--track")


def test_an_unknown_tracker_in_a_recipe_is_one_line_exit_2(tmp_path):
    result = pretrain(tmp_path / "run", '["jsonl","mlflow"]')
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert 'train.trackers = ["jsonl", "mlflow"], expected a list of strings, each one of "jsonl", ' \
           '"tensorboard", "wandb"' in result.stderr
    assert not (tmp_path / "run").exists()


def test_records_become_named_scalars():
    rec = {"step": 3, "loss": 2.5, "sm": True, "lr": 1e-4, "scale": 0.4, "note": "x",
           "grad_norm": float("nan")}
    assert tracking.scalars(rec) == {"train/loss": 2.5, "train/sm": 1.0, "train/lr": 1e-4,
                                     "softmask/scale": 0.4}
    assert tracking.scalars({"step": 0, "val_nll": 3.0, "val_ppl": 20.1}) == \
        {"val/val_nll": 3.0, "val/val_ppl": 20.1}


@needs_tb
def test_the_sweep_logs_its_tables_and_figure(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from smdlm_cli.commands import sweep
    from smdlm_cli.core.softmask import SoftMask
    from tests.runs import make_run

    run = make_run(tmp_path / "tiny", SoftMask(k=2, scale=0.5))
    w = sweep.SweepSettings(ckpts=[str(run)], nfe=[2, 4], metrics=["entropy"], num_samples=2,
                            batch_size=2, device="cpu", out=str(tmp_path / "sweep"),
                            track=["tensorboard"], track_dir=str(tmp_path / "logs"))
    report, _ = sweep.run(w)
    events = EventAccumulator(str(tmp_path / "logs" / "tensorboard"),
                              size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    [text] = events.Tensors("sweep/entropy/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    rows = [line for line in table.splitlines() if line.startswith("| tiny")]
    assert [r.split("|")[1].strip() for r in rows] == ["tiny · binary", "tiny · SM"]
    binary = report["rows"][0]["cells"]
    assert rows[0].split("|")[2].strip() == sweep.fmt(binary[0]["entropy"], binary[0]["entropy_se"])
    assert len(events.Images("sweep/figure")) == 1
    with pytest.raises(UserError, match="^--track: unknown tracker 'tb'"):
        sweep.run(sweep.SweepSettings(ckpts=[str(run)], nfe=[2], track=["tb"]))


def test_pretrain_without_the_package_stops_before_anything_is_written(tmp_path, monkeypatch):
    from smdlm_cli.commands import pretrain as command
    from smdlm_cli.recipe import load_recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else real(name, *a))
    recipe = load_recipe(ROOT / "recipes" / "quickstart.toml",
                         TINY + ['train.trackers=["jsonl","tensorboard"]'])
    with pytest.raises(UserError, match="tensorboard is not installed; pip install tensorboard"):
        command.run(recipe, recipe_path=Path("quickstart.toml"), out=tmp_path / "run", resume=False)
    assert not (tmp_path / "run").exists()


def test_sweep_track_flag_errors_are_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "smdlm_cli", "evaluate", "sweep", "--ckpt",
                             str(tmp_path / "none"), "--track", "tensorboard,mlflow"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--track: unknown tracker 'mlflow'; expected one of jsonl, tensorboard, wandb" in result.stderr


@needs_tb
def test_under_torchrun_only_rank_0_logs(tmp_path):
    run = tmp_path / "run"
    sets = TINY + ['train.trackers=["jsonl","tensorboard"]', "train.steps=2", "train.eval_every=2",
                   "train.save_every=2"]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "smdlm_cli", "pretrain", str(ROOT / "recipes" / "quickstart.toml"), "--out",
            str(run), *[a for kv in sets for a in ("--set", kv)]]
    result = subprocess.run(argv, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = list((run / "tensorboard").glob("events.out.tfevents.*"))  # one writer: rank 0's
    acc = EventAccumulator(str(events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in acc.Scalars("val/val_nll")] == [0, 2]
