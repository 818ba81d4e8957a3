"""Every command README.md shows is run here (smdlm, torchrun) or by CI (.ci/run: pip, pytest).

The smdlm commands run exactly as printed, in a scratch directory that links the repository's
recipes/, with `--set` overrides appended that shrink the budget (fewer files, steps and tokens);
the overrides come last, so they win over the README's own. The OWT recipes run unchanged. A README command this file does not
know fails the test: the README cannot drift from the code.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from smdlm_cli.core.io import load_tensors

ROOT = Path(__file__).parents[1]
SMALL = ["data.max_docs=40", "data.vocab_size=400", "model.length=64", "train.steps=6",
         "train.batch_size=4", "train.eval_every=3", "train.eval_batches=1", "train.save_every=3",
         "train.log_every=1", "train.warmup=2"]
LLADA_SMALL = ["data.max_docs=20", "train.steps=2", "train.batch_size=2", "train.eval_every=2",
               "train.eval_batches=1", "train.save_every=2", "train.log_every=1", "train.warmup=1"]
FT_SMALL = ["data.max_docs=80", "train.steps=4", "train.batch_size=4", "train.eval_every=2",
            "train.eval_batches=1", "train.save_every=2", "train.log_every=1", "train.warmup=1",
            "finetune.max_length=192"]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.DOTALL)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def shrink(command: str) -> list[str]:
    argv = shlex.split(command)
    extra = []
    if "--resume" in argv:
        extra = ["--set", "train.steps=8"]  # a resumed run may only lengthen
    elif "pretrain" in argv and "quickstart" in command:  # OWT recipes run as printed: offline they stop at once
        extra = [a for kv in SMALL for a in ("--set", kv)]
    elif "finetune" in argv and "tiny-dream" in command:  # the 7B recipes too
        extra = [a for kv in FT_SMALL for a in ("--set", kv)]
    elif "finetune" in argv and "tiny-llada" in command:  # the 8B recipe too
        extra = [a for kv in LLADA_SMALL for a in ("--set", kv)]
    elif argv[1] == "reproduce":
        extra = ["--smoke"]  # the whole chain, at a size that takes two minutes
    elif argv[1:3] in (["evaluate", "genppl"], ["evaluate", "sweep"]):
        extra = ["--num-samples", "8"]  # click keeps the last value of a repeated option
    if argv[0] == "smdlm":
        argv = [sys.executable, "-m", "smdlm_cli"] + argv[1:]  # the same app as the console script
    elif argv[0] == "python":
        argv = [sys.executable] + argv[1:]
    return argv + extra


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    (d / "recipes").symlink_to(ROOT / "recipes")
    (d / "examples").symlink_to(ROOT / "examples")
    return d


def test_install_and_test_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().replace(" --quiet", "").replace("python -m pip", "pip")
    for command in readme_commands():
        if command.startswith(("pip ", "python -m pytest")):
            assert command in ci.splitlines(), command


def test_every_readme_command_is_known_here():
    for command in readme_commands():
        assert command.startswith(("pip ", "python -m pytest", "smdlm ", "torchrun ",
                                   "python -m smdlm_cli", "python benchmarks/")), command
    smdlm = [c for c in readme_commands() if c.startswith(("smdlm ", "torchrun ", "python -m smdlm_cli",
                                                           "python benchmarks/"))]
    assert smdlm == [c for c in EXERCISED], "README commands changed: update EXERCISED"


def quickstart(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = cwd / result.stdout.strip().splitlines()[-1]
    assert run_dir == cwd / "runs" / "quickstart"
    for name in ("config.json", "model.safetensors", "softmask.json", "transparency_config.json",
                 "recipe.toml", "metrics.jsonl", "tokenizer/tokenizer.json", "state/latest"):
        assert (run_dir / name).exists(), name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val_nll" in x] == [0, 3, 6]
    assert "to train longer" in result.stderr and "runs/quickstart" in result.stderr


def sampled(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    out = cwd / result.stdout.strip().splitlines()[-1]
    assert out.parent == cwd / "runs" / "quickstart" / "samples"
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["text"], str) and r["nfe"] <= 65 for r in rows)
    assert "sampling from runs/quickstart" in result.stderr


def inspected(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scale ω_s" in result.stdout and "λ over decoding steps" in result.stdout
    for name in ("lambda.png", "lambda-decode.png"):
        assert (cwd / "runs" / "quickstart" / name).stat().st_size > 1000


def ar_baseline(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    assert "AR (causal) LM" in result.stderr
    config = json.loads((cwd / "runs" / "quickstart-ar" / "config.json").read_text())
    assert config["causal"] is True
    same = [(cwd / "runs" / r / "tokenizer" / "tokenizer.json").read_text()
            for r in ("quickstart", "quickstart-ar")]
    assert same[0] == same[1]  # the same corpus settings train the same BPE


def _report(result, cwd, task):
    assert result.returncode == 0, result.stderr[-2000:]
    path = cwd / result.stdout.strip().splitlines()[-1]
    report = json.loads(path.read_text())
    assert report["task"] == task and report["versions"]["torch"]
    return path, report


def elbo_evaluated(result, cwd):
    path, report = _report(result, cwd, "elbo")
    assert path.parent == cwd / "runs" / "quickstart" / "reports"
    last = [json.loads(x) for x in (cwd / "runs" / "quickstart" / "metrics.jsonl").read_text()
            .splitlines() if "val_nll" in x][-1]
    assert abs(report["nll"] - last["val_nll"]) < 1e-6 and report["sm"]


def genppl_evaluated(result, cwd):
    _, report = _report(result, cwd, "genppl")
    assert report["samples"] == 8 and report["gen_ppl"] > 1 and report["entropy"] > 0
    assert report["settings"]["scorer"] == "runs/quickstart-ar"


def swept(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    out = cwd / "reports" / "sweep"
    report = json.loads((out / "sweep.json").read_text())
    assert [r["decoding"] for r in report["rows"]] == ["binary", "SM", "AR"]
    assert [c["nfe"] for c in report["rows"][0]["cells"]] == [8, 16, 32]
    assert all(0 < c["mauve"] <= 1 for r in report["rows"] for c in r["cells"])
    assert "## gen-PPL" in (out / "sweep.md").read_text() and (out / "sweep.png").exists()


def humaneval_run(result, cwd):
    _, report = _report(result, cwd, "humaneval")
    assert report["tasks"] == 5 and report["pass@1"] == 0.0
    assert (cwd / "reports" / "humaneval.samples.jsonl").exists()


def humaneval_rescored(result, cwd):
    path, report = _report(result, cwd, "humaneval")
    assert path.parent == cwd / "reports" and report["samples"] == 5
    assert report["pass@1"] == json.loads((cwd / "reports" / "humaneval.json").read_text())["pass@1"]


def reproduced(result, cwd):
    assert result.returncode == 0, result.stderr[-3000:]
    # a smoke run has its own runs and report: the committed docs/ and the real chain stay as they were
    smoke = cwd / "runs" / "repro-cpu-smoke"
    stages = json.loads((smoke / "stages.json").read_text())["stages"]
    assert {"cache", "sweep-remdm-cap", "sm-on", "sm-on-sweep"} <= set(stages)
    text = (smoke / "results.md").read_text()
    assert "## Main table" in text and "**Smoke run**" in text
    assert (smoke / "figures" / "results-mdlm.png").is_file()
    assert not (cwd / "docs").exists() and not (cwd / "runs" / "repro-cpu").exists()


def sudoku_reproduced(result, cwd):
    assert result.returncode == 0, result.stderr[-3000:]
    smoke = cwd / "runs" / "sudoku-smoke"
    assert {"solve-mdlm", "solve-confidence", "entropy"} <= set(
        json.loads((smoke / "stages.json").read_text())["stages"])
    assert "**Smoke run**" in (smoke / "results-sudoku.md").read_text()
    assert set(json.loads((smoke / "results-sudoku.json").read_text())["verdicts"]) == \
        {"better", "worse", "same"}
    assert not (cwd / "docs").exists() and not (cwd / "runs" / "sudoku").exists()


def sudoku_evaluated(result, cwd):
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["puzzles"] == 4 and report["k"] == 3 and [r["nfe"] for r in report["results"]] == [1, 2, 4]
    assert all(len(r["seeds"]) == 3 and 0 <= r["solved"] <= 1 for r in report["results"])


def finetuned(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = cwd / "runs" / "tiny-dream"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "softmask.json",
                 "transparency_config.json", "base.json", "tokenizer/tokenizer.json", "state/latest"):
        assert (run_dir / name).exists(), name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val_nll" in x] == [0, 2, 4]
    assert "dora r=16" in result.stderr
    # the base the run built lives inside it: named relative to the run, so the run moves whole
    assert json.loads((run_dir / "base.json").read_text()) == {"path": "base"}


def dream_sampled(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    out = cwd / result.stdout.strip().splitlines()[-1]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and all(1 <= r["nfe"] <= 64 for r in rows)
    sidecar = json.loads(out.with_name(out.stem + ".meta.json").read_text())
    assert sidecar["settings"]["options"] == {"block_length": 32, "cache": "dual", "threshold": 0.9}
    # the run's sampler.json (the paper's Dream decoding) fills what the flags leave open
    assert sidecar["settings"]["sampler_options"] == {"alg": "entropy", "temperature": 0.1,
                                                      "top_p": 0.9, "block_length": 32,
                                                      "cache": "dual", "threshold": 0.9}


def dream_evaluated(result, cwd):
    _, report = _report(result, cwd, "humaneval")
    assert report["tasks"] == 3 and report["settings"]["code"]["format"] == "instruct"
    assert report["settings"]["sampling"]["options"] == {"cache": "prefix", "block_length": 32}


def dream_offline(result, cwd):
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Dream-org/" in result.stderr
    assert not (cwd / "runs" / "dream-coder-sm").exists()


def llada_finetuned(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    run_dir = cwd / "runs" / "tiny-llada"
    config = json.loads((run_dir / "base" / "config.json").read_text())
    assert config["model_type"] == "llada" and "d_model" in config
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "k_proj", "v_proj", "attn_out"}
    assert "dora r=16" in result.stderr and (run_dir / "softmask.json").exists()


def llada_sampled(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    out = cwd / result.stdout.strip().splitlines()[-1]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 4 and rows[0]["prompt"].endswith("assistant<|end_header_id|>\n\n")
    sidecar = json.loads(out.with_name(out.stem + ".meta.json").read_text())
    assert sidecar["settings"]["options"] == {"alg": "low_confidence", "transfer": "even",
                                              "block_length": 32, "cfg_scale": 0.5}


def llada_offline(result, cwd):
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "GSAI-ML/LLaDA-8B-Instruct" in result.stderr
    assert not (cwd / "runs" / "llada-sm").exists()


def lm_eval_run(result, cwd):
    path, report = _report(result, cwd, "lm-eval")
    assert path.parent == cwd / "runs" / "tiny-llada" / "reports"
    assert 0 <= report["smdlm_demo_mc/acc"] <= 1 and 0 <= report["smdlm_demo_gen/exact_match"] <= 1
    assert report["n-samples"]["smdlm_demo_mc"]["effective"] == 5
    assert report["settings"]["model_args"]["alg"] == "low_confidence"


def lm_eval_cli(result, cwd):
    # lm-eval's own command line and its results table
    assert result.returncode == 0, result.stderr[-2000:]
    row = next(line for line in result.stdout.splitlines() if "smdlm_demo_mc" in line)
    assert "|acc" in row.replace(" ", "")


def longer(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    recipe = (cwd / "runs" / "longer" / "recipe.toml").read_text()
    assert "prob = 0.5" in recipe


def resumed(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    steps = [json.loads(x)["step"] for x in (cwd / "runs" / "longer" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 8 and steps.count(6) == 2  # step 6: one loss line, one validation line


def owt_offline(result, cwd):
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "gpt2" in result.stderr and "Traceback" not in result.stderr
    assert not (cwd / "runs" / "owt").exists()  # the same command works once online


def ddp(result, cwd):
    # the first failing rank's own output comes before torchrun's summary
    assert result.returncode == 0, result.stderr[-6000:]
    assert "2 process(es)" in result.stderr
    assert (cwd / "runs" / "ddp" / "model.safetensors").exists()


def fsdp(result, cwd):
    assert result.returncode == 0, result.stderr[-6000:]
    run_dir = cwd / "runs" / "fsdp"
    state = run_dir / "state" / (run_dir / "state" / "latest").read_text().strip()
    assert {p.name for p in state.glob("weights.rank*.safetensors")} == \
        {"weights.rank0.safetensors", "weights.rank1.safetensors"}
    ddp = load_tensors(cwd / "runs" / "ddp" / "model.safetensors")  # the same recipe under DDP
    for k, v in load_tensors(run_dir / "model.safetensors").items():
        torch.testing.assert_close(v, ddp[k], rtol=0, atol=1e-4, msg=k)


def tracked(result, cwd):
    assert result.returncode == 0, result.stderr[-2000:]
    events = list((cwd / "runs" / "tracked" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000
    assert (cwd / "runs" / "tracked" / "metrics.jsonl").exists()


def gpu_checked(result, cwd):
    from test_gpu_check import check

    check(result, cwd)


# README command -> check of its result, in README order (later commands use earlier runs).
EXERCISED = {
    "smdlm pretrain recipes/quickstart.toml": quickstart,
    "smdlm sample --nfe 64 --k 3": sampled,
    "smdlm inspect-lambda --decode": inspected,
    "smdlm pretrain recipes/quickstart-ar.toml": ar_baseline,
    "smdlm evaluate elbo --ckpt runs/quickstart": elbo_evaluated,
    "smdlm evaluate genppl --ckpt runs/quickstart --scorer runs/quickstart-ar --nfe 32": genppl_evaluated,
    "smdlm evaluate sweep --ckpt runs/quickstart --ckpt runs/quickstart-ar --nfe 8,16,32 --metrics genppl,entropy,mauve,elbo --scorer runs/quickstart-ar --out reports/sweep": swept,
    "smdlm evaluate humaneval --ckpt runs/quickstart --limit 5 --out reports/humaneval.json": humaneval_run,
    "smdlm evaluate humaneval --samples reports/humaneval.samples.jsonl --limit 5": humaneval_rescored,
    "smdlm reproduce recipes/repro/cpu": reproduced,
    "smdlm reproduce recipes/sudoku": sudoku_reproduced,
    "smdlm evaluate sudoku --ckpt runs/sudoku/sm-iso-update --nfe 1,2,4 --seeds 3 --json": sudoku_evaluated,
    "smdlm finetune recipes/tiny-dream.toml": finetuned,
    "smdlm sample --ckpt runs/tiny-dream --sampler confidence --nfe 64 --length 128 -o block_length=32 -o cache=dual -o threshold=0.9": dream_sampled,
    "smdlm evaluate humaneval --ckpt runs/tiny-dream --format instruct --limit 3 --max-new-tokens 64 --sampler confidence -o cache=prefix -o block_length=32": dream_evaluated,
    "smdlm finetune recipes/dream-coder-sm.toml": dream_offline,
    "smdlm finetune recipes/tiny-llada.toml": llada_finetuned,
    "smdlm sample --ckpt runs/tiny-llada --chat --prompt \"Return the sum of a list.\" --sampler confidence --nfe 64 --length 128 -o alg=low_confidence -o transfer=even -o block_length=32 -o cfg_scale=0.5": llada_sampled,
    "smdlm finetune recipes/llada-sm.toml": llada_offline,
    "smdlm evaluate lm-eval --ckpt runs/tiny-llada --chat --tasks smdlm_demo_mc,smdlm_demo_gen --include-path examples/lm-eval --no-builtin-tasks --mc-num 8 --sampler confidence --nfe 16 -o alg=low_confidence -o transfer=even -o block_length=16": lm_eval_run,
    "python -m smdlm_cli.evals.lmeval --model smdlm --model_args ckpt=runs/tiny-llada,k=1,mc_num=8 --tasks smdlm_demo_mc --include_path examples/lm-eval --device cpu": lm_eval_cli,
    "smdlm pretrain recipes/quickstart.toml --out runs/tracked --set 'train.trackers=[\"jsonl\",\"tensorboard\"]'": tracked,
    "python benchmarks/gpu_check.py --cpu --tiny": gpu_checked,
    "smdlm pretrain recipes/quickstart.toml --out runs/longer --set train.steps=1000 --set softmask.prob=0.5": longer,
    "smdlm pretrain runs/longer/recipe.toml --out runs/longer --resume": resumed,
    "smdlm pretrain recipes/owt.toml": owt_offline,
    "torchrun --nproc_per_node 2 -m smdlm_cli pretrain recipes/quickstart.toml --out runs/ddp": ddp,
    "torchrun --nproc_per_node 2 -m smdlm_cli pretrain recipes/quickstart.toml --out runs/fsdp --set train.strategy=fsdp": fsdp,
}


@pytest.mark.parametrize("command", list(EXERCISED))
def test_readme_command_runs(command, workdir, request):
    argv = shrink(command)
    if argv[3:4] == ["reproduce"]:  # run once per session, shared with test_reproduce / test_sudoku
        from conftest import SMOKE_ARGV, SUDOKU_SMOKE_ARGV

        sudoku = "recipes/sudoku" in argv
        assert argv == (SUDOKU_SMOKE_ARGV if sudoku else SMOKE_ARGV)
        result, cwd = request.getfixturevalue("sudoku_chain" if sudoku else "smoke_chain")
        EXERCISED[command](result, cwd)
        return
    if argv[3:5] == ["evaluate", "sudoku"]:  # on the smoke chain's runs (runs/sudoku-smoke)
        result, cwd = request.getfixturevalue("sudoku_chain")
        argv = [a.replace("runs/sudoku/", "runs/sudoku-smoke/") for a in argv] + ["--limit", "4"]
        EXERCISED[command](run(argv, cwd), cwd)
        return
    if argv[1:2] == ["benchmarks/gpu_check.py"]:  # run once per session, shared with test_gpu_check
        from conftest import GPU_CHECK_ARGV

        assert argv == GPU_CHECK_ARGV
        result, cwd, _ = request.getfixturevalue("gpu_check_cpu")
        EXERCISED[command](result, cwd)
        return
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run"] + argv[1:]
    EXERCISED[command](run(argv, workdir), workdir)


def test_readme_python_api_example_runs(tmp_path):
    """README's Python API block, run as printed in a scratch directory."""
    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert len(code) == 1
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    check = (code[0] + "\nassert len(completions) == 2 and all(isinstance(t, str) for t in completions)"
             "\nassert len(binary) == 2 and run.softmask is not None"
             "\nimport json, math\nlast = [json.loads(x) for x in (run_dir / 'metrics.jsonl')"
             ".read_text().splitlines() if 'val_nll' in x][-1]"
             "\nassert math.isclose(report['nll'], last['val_nll'], abs_tol=1e-6)\n")
    result = run([sys.executable, "-c", check], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "runs" / "api" / "model.safetensors").exists()


STUBS = {  # Slurm's commands, standing in for a 2-node allocation on this machine
    "scontrol": "#!/bin/sh\necho 127.0.0.1\n",
    "srun": "#!/bin/sh\n\"$@\" & a=$!\n\"$@\" & b=$!\nwait $a; x=$?\nwait $b; y=$?\n"
            "exit $((x | y))\n",
}


def test_readme_slurm_script_runs_two_agents(tmp_path):
    """examples/slurm/multinode.sbatch, as README lists it, run by bash with srun starting its
    torchrun line twice (the two nodes' agents) and meeting at the c10d rendezvous."""
    script = ROOT / "examples" / "slurm" / "multinode.sbatch"
    listing = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)[1]
    lines = script.read_text().splitlines()
    for line in listing.splitlines():
        assert line in lines, line
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in STUBS.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_JOB_NODELIST": "node[1-2]",
           "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_ID": "42",
           "RDZV_PORT": str(free_port()),
           "PATH": f"{stubs}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    args = ["recipes/quickstart.toml", "--out", "runs/slurm", "--set", "train.strategy=fsdp"]
    result = subprocess.run(["bash", str(script), *args, *(a for kv in SMALL for a in ("--set", kv))],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert "2 process(es)" in result.stderr
    state = tmp_path / "runs" / "slurm" / "state" / "step-0000006"
    assert (state / "weights.rank1.safetensors").exists()
    assert (tmp_path / "runs" / "slurm" / "model.safetensors").exists()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
