"""Who may write a run directory, and what a writer finds there when it starts.

A run directory is written by one process at a time: the pretrain or finetune that owns it holds
an advisory lock (fcntl.flock on RUN/.lock, which records its PID), so a second writer is refused
with the holder's PID instead of interleaving its metrics and states with the first. The lock is
released by the kernel when the holder exits, however it exits.

On start the owner removes what a killed predecessor may have left: temporaries (`.*.tmp`, the
`.adapter-*` staging directories of finetune) and state directories never completed (no
trainer.json). A directory whose run never completed a save holds nothing that cannot be rebuilt
by the same command, so that command starts it over instead of refusing it.

Other commands never write into a run directory's own files: `check_output` refuses an output
path that lands on one of the names below.
Not here: the layout of the state or how it is saved (checkpoint.py), reading runs (rundir.py).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

from smdlm_cli.core import checkpoint
from smdlm_cli.core.errors import UserError

LOCK = ".lock"
# Every name a run directory's owner writes at its top level (pretrain, finetune, --merge).
RESERVED = frozenset({
    "recipe.toml", "config.json", "model.safetensors", "model.safetensors.index.json",
    "softmask.json", "transparency_config.json", "tokenizer", "metrics.jsonl", checkpoint.STATE,
    "adapter", "base", "base.json", "best", "sampler.json", "generation_config.json", LOCK})


def _temporary(path: Path) -> bool:
    return path.name.startswith(".") and (path.name.endswith(".tmp")
                                          or path.name.startswith(".adapter-"))


class RunLock:
    """The advisory lock of one run directory; `release()` (or process exit) gives it up."""

    fd = -1

    def __init__(self, run_dir: Path):
        path = run_dir / LOCK
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            self.release()
            raise UserError(f"{run_dir} is being written by process {holder} (another pretrain or "
                            f"finetune); wait for it to end, or pass --out DIR for a new run") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = -1

    __del__ = release  # a run that raised gives the lock up with its frame (library callers)


def claim(run_dir: Path, resume: bool, main: bool = True) -> RunLock | None:
    """Check `run_dir` for a new run (or for --resume) and, on the main rank, lock and tidy it.

    A run that never completed a save (killed while starting or during its first save) is started
    over by the same command; --resume on it says so. Other ranks only check, they never write.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir}: is a file; expected a run directory (new or existing)")
    if run_dir.is_dir() and not resume:
        _check(run_dir, resume, main=False)  # refuse before writing even the lock file
    lock = None
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--out {run_dir}: cannot create the directory ({e.strerror})") from None
        lock = RunLock(run_dir)
    try:
        _check(run_dir, resume, main)
        if main:
            clean_temporaries(run_dir)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock


def _check(run_dir: Path, resume: bool, main: bool) -> None:
    state = checkpoint.latest_state(run_dir)
    if resume:
        if state is None:
            raise UserError(f"--resume: {run_dir} holds no complete training state (the run "
                            f"stopped before its first save); run the same command without "
                            f"--resume to start it over")
        return
    entries = [p for p in run_dir.iterdir() if p.name != LOCK and not _temporary(p)] \
        if run_dir.is_dir() else []
    foreign = [p.name for p in entries if p.name not in RESERVED]
    if state is not None or foreign:
        what = "a run" if state is not None else \
            f"a run or other files ({', '.join(sorted(foreign)[:3])})"
        raise UserError(f"{run_dir} already holds {what}: pass --resume to continue a run, or "
                        f"--out DIR for a new one")
    if main:  # a start that never saved: nothing here the same command does not rebuild
        for p in entries:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def clean_temporaries(run_dir: Path) -> None:
    """Remove what a killed writer left: temporary files and incomplete state directories."""
    for p in sorted(run_dir.rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        if _temporary(p) and p.exists():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    for d in (run_dir / checkpoint.STATE).glob("step-*"):
        if not (d / "trainer.json").exists():
            shutil.rmtree(d, ignore_errors=True)


def check_output(path: str | Path, flag: str = "--out") -> Path:
    """`path` unless it lands on a run directory's own file (its weights, config, state, ...)."""
    path = Path(path)
    resolved = path.resolve()
    for parent in [resolved.parent, *resolved.parent.parents]:
        if _is_run(parent):
            first = resolved.relative_to(parent).parts[0]
            if first in RESERVED:
                raise UserError(f"{flag} {path}: would overwrite {parent / first}, part of the run "
                                f"directory {parent}; expected a path outside its own files "
                                f"(e.g. {parent / 'samples'}/...)")
            break
    return path


def _is_run(directory: Path) -> bool:
    return any((directory / name).exists() for name in ("recipe.toml", "model.safetensors",
                                                        "adapter", checkpoint.STATE))
