"""`smdlm reproduce`: the chain runs end to end (smoke size), resumes, and its report is computed
from the run outputs; the cpu and gpu directories load and validate."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from smdlm_cli.commands import sweep
from smdlm_cli.reproduce import chain as driver, report as results, report_lambda, stages as reproduce
from smdlm_cli.reproduce.outputs import training_summary
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_write_json, read_json

ROOT = Path(__file__).parents[1]
CPU = ROOT / "recipes" / "repro" / "cpu"
GPU = ROOT / "recipes" / "repro" / "gpu"


def smdlm(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smdlm_cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def chain(smoke_chain):
    """The smoke chain's runs directory, which also holds its report (results.md, figures/)."""
    result, d = smoke_chain
    assert result.returncode == 0, result.stderr[-3000:]
    return d / "runs" / "repro-cpu-smoke"


def test_every_stage_ran_once_and_is_recorded(chain):
    record = read_json(chain / "stages.json")
    plan = reproduce.load_plan(CPU, str(chain), smoke=True)
    assert sorted(record["stages"]) == sorted(plan.stages[:-1])  # all but the report
    assert record["smoke"] is True and record["machine"]["cpus"] >= 1 and record["machine"]["cpu"]
    assert len(record["stages"]["cache"]["commands"]) == 4
    assert all(c.startswith("smdlm ") for s in record["stages"].values() for c in s["commands"])
    for name in reproduce.TRAIN:
        assert (chain / name / "model.safetensors").is_file()
    for png in ("results-mdlm.png", "results-remdm-cap.png", "results-lambda.png",
                "results-sm-on.png"):
        assert (chain / "figures" / png).stat().st_size > 1000


def test_continuations_start_from_the_base_on_equal_data(chain):
    plan = reproduce.load_plan(CPU, str(chain), smoke=True)
    s = {n: training_summary(plan, n) for n in reproduce.CONTINUATIONS}
    for name in reproduce.CONTINUATIONS:
        assert s[name]["recipe"].model.init == "runs/repro-cpu-smoke/base"  # the runs dir, relative
        # the same initial weights and validation batches: the step-0 ELBO is the same number
        assert s[name]["first_val"] == s["binary"]["first_val"]
    assert s["binary"]["sm_steps"] == 0
    assert s["sm-iso-update"]["steps"] == s["binary"]["steps"]
    assert s["sm-iso-compute"]["forwards"] == s["binary"]["forwards"]   # iso-compute
    assert s["sm-iso-compute"]["steps"] < s["binary"]["steps"]
    for name in ("sm-iso-update", "sm-iso-compute"):  # the final validation record's counts
        assert s[name]["counted_at"] == s[name]["steps"]
        assert s[name]["forwards"] == s[name]["steps"] + s[name]["sm_steps"]
    ar = json.loads((chain / "ar" / "tokenizer" / "tokenizer.json").read_text())
    base = json.loads((chain / "base" / "tokenizer" / "tokenizer.json").read_text())
    assert ar["model"]["vocab"] == base["model"]["vocab"]  # one tokenizer for scorer and models
    # the diagnostic: sm-iso-update's run with omega_s starting at 0.5 instead of 1e-6
    on = training_summary(plan, "sm-on")
    assert on["recipe"].model.init == "runs/repro-cpu-smoke/base" and on["steps"] == s["binary"]["steps"]
    assert on["omega"]["scale"][0] == pytest.approx(0.5, abs=0.05)
    assert s["sm-iso-update"]["omega"]["scale"][0] < 1e-4


def _table_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")[1:]]


def test_main_table_is_read_from_the_sweep(chain):
    text = (chain / "results.md").read_text()
    report = read_json(chain / "sweep-mdlm" / "sweep.json")
    row = next(r for r in report["rows"] if r["decoding"] == "SM"
               and Path(r["run"]).name == "sm-iso-update")
    full, low = row["cells"][-1], row["cells"][0]
    assert full["nfe"] == 32 and low["nfe"] == 2  # L and L/16 of the smoke length 32
    assert _table_row(text, "mdlm: sm-iso-update · SM") == [
        sweep.fmt(full["mauve"], full["mauve_se"]), sweep.fmt(full["genppl"], full["genppl_se"]),
        sweep.fmt(full["entropy"], full["entropy_se"]), sweep.fmt(low["mauve"], low["mauve_se"]),
        sweep.fmt(low["genppl"], low["genppl_se"])]
    assert "**Smoke run**" in text
    assert "Largest difference between the weights of sm-iso-update" in text
    assert "smdlm evaluate sweep --ckpt" in text and "smdlm pretrain" in text  # the commands


def test_switched_on_diagnostic_is_read_from_its_sweep_and_the_main_one(chain):
    text = (chain / "results.md").read_text()
    section = text.split("## Diagnostic: soft-masking switched on")[1].split("\n## ")[0]
    main = read_json(chain / "sweep-mdlm" / "sweep.json")
    mine = read_json(chain / "sm-on-sweep" / "sweep.json")
    assert {(Path(r["run"]).name, r["decoding"]) for r in mine["rows"]} == {("sm-on", "binary"),
                                                                           ("sm-on", "SM")}
    on = next(r for r in mine["rows"] if r["decoding"] == "SM")["cells"][0]
    binary = next(r for r in main["rows"] if Path(r["run"]).name == "binary")["cells"][0]
    delta = sweep.fmt(on["genppl"] - binary["genppl"],
                      (on["genppl_se"] ** 2 + binary["genppl_se"] ** 2) ** 0.5)
    first = _table_row(section.split("**mdlm, gen-PPL**")[1], "sm-on (SM decoding) vs binary")[0]
    assert first.startswith(delta + " ")
    assert "sm-on" not in text.split("## Main table")[1].split("\n## ")[0]  # not a main-table row


def test_report_follows_the_outputs_and_nothing_reruns(chain, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(chain, runs)
    file = runs / "sweep-mdlm" / "sweep.json"
    report = read_json(file)
    row = next(r for r in report["rows"] if r["decoding"] == "binary"
               and Path(r["run"]).name == "binary")
    row["cells"][-1].update(genppl=1234.5, genppl_se=0.25)
    atomic_write_json(file, report)
    result = smdlm("reproduce", CPU, "--smoke", "--runs", runs, "--report", tmp_path / "r.md",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    stages = len(reproduce.load_plan(CPU, str(runs), smoke=True).stages) - 1  # all but the report
    assert result.stderr.count("done earlier") == stages and "smdlm pretrain" not in result.stderr
    text = (tmp_path / "r.md").read_text()
    assert _table_row(text, "mdlm: binary · binary")[1] == sweep.fmt(1234.5, 0.25)
    # the comparison against that row follows too: SM decoding is now far better at full NFE
    sm = next(r for r in report["rows"] if r["decoding"] == "SM"
              and Path(r["run"]).name == "sm-iso-update")["cells"][-1]
    expected = sweep.fmt(sm["genppl"] - 1234.5, (sm["genppl_se"] ** 2 + 0.25 ** 2) ** 0.5)
    gen_ppl = text.split("**mdlm, gen-PPL**")[1]
    assert _table_row(gen_ppl, "SM iso-update (SM decoding) vs binary")[-1] == f"{expected} better"


def test_lambda_diagnostics_of_the_chain_are_consistent(chain):
    plan = reproduce.load_plan(CPU, str(chain), smoke=True)
    vocab = read_json(chain / "base" / "config.json")["vocab_size"]
    for name in reproduce.SM_RUNS:
        info = read_json(chain / "lambda" / f"{name}.json")
        # an entropy over the vocabulary: between 0 and log V (λ fed back with the run's own ω)
        assert 0 <= report_lambda._median_entropy(info) <= math.log(vocab) + 1e-3
        final = training_summary(plan, name)["omega"]["scale"][-1]
        assert info["scale"] == pytest.approx(final, rel=1e-3)


def test_a_missing_stage_is_reported_as_missing(chain, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(chain, runs)
    shutil.rmtree(runs / "cache")
    record = read_json(runs / "stages.json")
    del record["stages"]["cache"]
    atomic_write_json(runs / "stages.json", record)
    plan = reproduce.load_plan(CPU, str(runs), str(tmp_path / "r.md"), smoke=True)
    text = results.write(plan, record).read_text()
    n = len(plan.stages) - 1  # all but the report
    assert "*stage `cache` not run yet*" in text and f"Stages finished: {n - 1} of {n}" in text
    assert "different machines" not in text
    record["stages"]["sm-on"]["machine"] = {**record["machine"], "cpu": "another processor"}
    assert "The stages ran on 2 different machines" in results.write(plan, record).read_text()


def test_training_restarts_a_run_killed_before_its_first_save(tmp_path):
    plan = reproduce.load_plan(CPU, str(tmp_path / "runs"), smoke=True)
    out = tmp_path / "runs" / "binary"
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    argv = reproduce.commands(plan, "binary")[0]
    assert driver._prepare_training(plan, "binary", argv) == argv and not out.exists()


def test_cpu_and_gpu_directories_load():
    cpu, gpu = reproduce.load_plan(CPU), reproduce.load_plan(GPU)
    assert cpu.nfe == [8, 16, 32, 64, 128] and gpu.nfe == [16, 32, 64, 128, 256]
    assert cpu.cfg.runs == "runs/repro-cpu" and gpu.cfg.device == "cuda"
    for plan in (cpu, gpu):
        r = plan.recipes
        assert r["sm-iso-compute"].train.max_forward_passes == r["binary"].train.steps
        assert r["sm-iso-update"].train.steps == r["binary"].train.steps
        assert r["base"].data.tokenizer == "bpe" and r["ar"].model.causal
        assert r["ar"].data.tokenizer == f"{plan.cfg.runs}/base/tokenizer"
        for name in reproduce.TRAIN[2:]:
            assert r[name].model.init == f"{plan.cfg.runs}/base"
        # sm-on differs from sm-iso-update in omega_s's start only
        assert r["sm-on"].softmask.scale == 0.5 and r["sm-iso-update"].softmask.scale == 1e-6
        assert replace(r["sm-on"].softmask, scale=1e-6) == r["sm-iso-update"].softmask
        assert r["sm-on"].train == r["sm-iso-update"].train
        # every command of the chain can be built before anything ran
        for stage in plan.stages[:-1]:
            assert reproduce.commands(plan, stage)


@pytest.mark.parametrize("edit, message", [
    (("binary.toml", "seed = 2", "seed = 3"), "must equal binary.toml's"),
    (("base.toml", "enabled = false", "enabled = true"), "expected a binary MDLM"),
    (("reproduce.toml", "seeds = 3", "seedz = 3"), "unknown key reproduce.seedz"),
    (("reproduce.toml", 'samplers = ["mdlm", "remdm-cap"]', 'samplers = ["confidence"]'),
     "expected a non-empty list of unconditional samplers"),
    (("reproduce.toml", "cache_block = 32", "cache_block = 48"), "splits evenly"),
])
def test_bad_directories_are_one_line_errors(tmp_path, edit, message):
    d = tmp_path / "cpu"
    shutil.copytree(CPU, d)
    name, old, new = edit
    text = (d / name).read_text()
    assert old in text
    (d / name).write_text(text.replace(old, new))
    with pytest.raises(UserError, match=message):
        reproduce.load_plan(d)


@pytest.mark.parametrize("args, message", [
    (["nowhere"], "nowhere: no such directory"),
    ([CPU, "--stage", "bogus"], "--stage bogus: unknown stage"),
    ([CPU, "--stage", "sweep-mdlm"], "needs the outputs of stage ar, binary, sm-iso-update"),
    ([CPU, "--stage", "cache"], "needs the outputs of stage ar, binary, sm-iso-update;"),
])
def test_bad_command_lines_exit_2_with_one_line(tmp_path, args, message):
    result = smdlm("reproduce", *args, "--runs", tmp_path / "runs", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "stages.json").exists()


def test_a_smoke_run_never_writes_the_real_chain(tmp_path):
    """--smoke defaults to RUNS-smoke/ and a report inside it; a directory of the other kind is
    refused, so a smoke run never marks the real chain's stages done (nor the reverse)."""
    plan = reproduce.load_plan(CPU, smoke=True)
    assert plan.cfg.runs == "runs/repro-cpu-smoke"
    assert plan.cfg.report == "runs/repro-cpu-smoke/results.md"
    assert reproduce.load_plan(CPU).cfg.report == "docs/results.md"
    runs = tmp_path / "runs"
    runs.mkdir()
    atomic_write_json(runs / "stages.json", {"stages": {"base": {"seconds": 1.0}}, "smoke": False})
    result = smdlm("reproduce", CPU, "--smoke", "--runs", runs, "--stage", "base", cwd=tmp_path)
    assert result.returncode == 2 and "holds a real chain's stages" in result.stderr
    assert read_json(runs / "stages.json")["stages"] == {"base": {"seconds": 1.0}}


def test_json_figures_are_computed_from_the_run_outputs(chain):
    """docs/results.json (here the smoke chain's): every figure recomputed from the outputs."""
    figures = read_json(chain / "results.json")
    base = read_json(chain / "lambda" / "base.json")["decode"]
    assert figures["median_fed_back_entropy"] == base["entropy_fed_back_median"]
    assert figures["entropy_bar"]["nfe"] == 32 // 4
    assert figures["entropy_bar"]["cleared"] == (base["entropy_fed_back_median"] <= 1.0)
    plan = reproduce.load_plan(CPU, str(chain), smoke=True)
    curve, tokens = figures["fed_back_entropy_curve"], 0  # the bar's measure against training
    assert [c["run"] for c in curve] == ["base", "binary"]
    for c in curve:
        d = read_json(chain / "lambda" / f"{c['run']}.json")["decode"]
        tokens += training_summary(plan, c["run"])["tokens"]
        assert c["training_tokens"] == tokens and c["median"] == d["entropy_fed_back_median"]
        assert c["quantiles"] == d["entropy_fed_back_quantiles"] and c["count"] == d["entropy_fed_back_count"]
    assert curve[1]["training_tokens"] > curve[0]["training_tokens"] > 0
    for name in reproduce.SM_RUNS:
        s = training_summary(plan, name)
        assert figures["omega_s_final"][name] == s["omega"]["scale"][-1]
        assert figures["sm_steps"][name] == s["sm_steps"]
    counts = {"better": 0, "worse": 0, "same": 0}
    for sampler in plan.cfg.samplers:
        rows = read_json(chain / f"sweep-{sampler}" / "sweep.json")["rows"]
        pick = lambda run, dec: next(r for r in rows if Path(r["run"]).name == run  # noqa: E731
                                     and r["decoding"] == dec)
        for metric, lower in (("genppl", True), ("mauve", False)):
            for a, b in zip(pick("sm-iso-update", "SM")["cells"], pick("binary", "binary")["cells"]):
                delta = a[metric] - b[metric]
                se = math.hypot(a[f"{metric}_se"] or 0.0, b[f"{metric}_se"] or 0.0)
                same = abs(delta) <= 2 * se or delta == 0
                counts["same" if same else "better" if (delta < 0) == lower else "worse"] += 1
    assert figures["verdicts"] == counts
    assert figures["power"]["samples_per_cell"] == plan.cfg.num_samples
