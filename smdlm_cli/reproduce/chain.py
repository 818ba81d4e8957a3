"""Running the chain of `smdlm reproduce DIR` (planned in stages.py): each stage an smdlm
command in a subprocess, recorded in RUNS/stages.json when it finishes; a finished stage is
skipped, so the same command resumes an interrupted chain. The report stage hands over to
report.py.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from smdlm_cli.core.checkpoint import latest_state
from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_write_bytes, atomic_write_json, read_json
from smdlm_cli.recipe import read_toml
from smdlm_cli.reproduce import stages, sudoku_stages
from smdlm_cli.reproduce.stages import shown


def _machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "cpu": _cpu_model(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    # float results on CPU can differ between processors (kernels chosen per instruction set)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _call(argv: list[str], stage: str, stdout_file: Path | None = None) -> None:
    print(f"[{stage}] {shown(argv)}", file=sys.stderr, flush=True)
    result = subprocess.run([sys.executable, "-m", "smdlm_cli", *argv],
                            stdout=subprocess.PIPE if stdout_file else None)
    if result.returncode != 0:
        raise UserError(f"stage {stage}: `{shown(argv)}` exited with code {result.returncode}; "
                        f"run the same reproduce command again to resume")
    if stdout_file is not None:
        atomic_write_bytes(stdout_file, result.stdout)


def planner(directory: str | Path):
    """The plan module of a reproduction directory: Sudoku when reproduce.toml holds [sudoku]."""
    file = Path(directory) / "reproduce.toml"
    if file.is_file() and "sudoku" in read_toml(file):
        return sudoku_stages
    return stages


def _prepare_training(plan, stage: str, argv: list[str]) -> list[str]:
    """Resume a run an earlier attempt left behind; one killed before its first save starts over."""
    out = plan.runs / stage
    if latest_state(out) is not None:
        return argv + ["--resume"]
    if out.is_dir() and any(out.iterdir()):
        print(f"[{stage}] {out} holds no saved state (stopped before its first save): starting "
              f"it over", file=sys.stderr)
        shutil.rmtree(out)
    return argv


def run_stage(plan, stage: str) -> list[str]:
    """Run one stage (not the report); returns the commands it ran, as shown to users."""
    ran = []
    for argv in planner(plan.directory).commands(plan, stage):
        if stage in plan.train:
            argv = _prepare_training(plan, stage, argv)
        # inspect-lambda --json prints its report on stdout: kept as lambda/<run>.json
        json_out = (plan.runs / "lambda" / f"{Path(argv[1]).name}.json"
                    if argv[0] == "inspect-lambda" else None)
        _call(argv, stage, json_out)
        ran.append(shown(argv) + (f" > {json_out}" if json_out else ""))
    return ran


def run(directory: str | Path, stages: list[str] | None = None, runs: str | None = None,
        report: str | None = None, smoke: bool = False) -> Path | None:
    """Run the chain (or the named stages, in chain order); returns the report's path, or None
    when the report was not among the stages."""
    if not Path(directory).is_dir():
        raise UserError(f"{directory}: no such directory; expected a reproduction directory such as "
                        f"recipes/repro/cpu or recipes/sudoku")
    kind = planner(directory)
    plan = kind.load_plan(directory, runs, report, smoke)
    for s in stages or []:
        if s not in plan.stages:
            raise UserError(f"--stage {s}: unknown stage; expected one of {', '.join(plan.stages)}")
    todo = [s for s in plan.stages if not stages or s in stages]
    record_file = plan.runs / "stages.json"
    record = read_json(record_file) if record_file.is_file() else {"stages": {}}
    if record.get("smoke", smoke) != smoke:
        kind = "a smoke chain" if record["smoke"] else "a real chain"
        raise UserError(f"{plan.runs} holds {kind}'s stages; expected "
                        f"{'--runs DIR of its own for --smoke' if smoke else 'another --runs DIR, or the same command with --smoke'}")
    record.update(directory=str(plan.directory), smoke=smoke, machine=_machine())
    done = record["stages"]
    for stage in todo:
        if stage == "report":
            continue
        if stage in done:
            print(f"[{stage}] done earlier ({done[stage]['seconds']:.0f} s): skipped", file=sys.stderr)
            continue
        missing = [n for n in kind.needs(plan, stage) if n not in done and n not in todo]
        if missing:
            raise UserError(f"--stage {stage}: needs the outputs of stage {', '.join(missing)}; "
                            f"run it first (or leave out --stage)")
        began = time.perf_counter()
        ran = run_stage(plan, stage)
        done[stage] = {"commands": ran, "seconds": time.perf_counter() - began,
                       "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "machine": record["machine"]}  # a resumed chain may change machines
        atomic_write_json(record_file, record)
    if "report" in todo:
        if kind is sudoku_stages:
            from smdlm_cli.reproduce import report_sudoku as report
        else:
            from smdlm_cli.reproduce import report
        return report.write(plan, record)
    return None
