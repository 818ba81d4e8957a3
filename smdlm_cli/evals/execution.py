"""Run generated Python programs (HumanEval/MBPP solutions, then their tests) in a sandbox.

Each program gets a fresh ``python -I`` process, a fresh work directory, a wall-clock timeout,
resource limits (address space, CPU, file size, open files, no core dumps) and an audit hook
that refuses process creation, signals, ctypes, sockets, writes outside the work directory and
the routes to the verdict's secret (gc, other threads' frames, /proc/*/mem, tracing).

Where the kernel allows user namespaces (checked once: `isolation()`; every report records the
answer) the kernel isolates it as well, which no Python-level trick can undo: `unshare` puts the
process in new user, mount, PID, network, IPC and UTS namespaces, and the runner
(sandbox_runner.py) makes the whole filesystem read-only, nosuid and nodev, mounts a private
/tmp, /dev (null, zero, full, random, urandom), /proc and work directory, drops every
capability, sets no-new-privileges and makes itself undumpable before the program runs as PID 2.
So even a child started behind the hook's back (``_posixsubprocess``, multiprocessing's spawn)
cannot write outside, reach the network, see or signal the evaluator, or outlive the run: PID 1
leaves when the program ends, and the kernel kills everything left in the namespace.

The verdict: the program passes only if the runner's own main frame, at the bottom of the
stack, has parked itself after the tests returned; a reporter thread that alone holds a per-run
nonce then writes it. ``os._exit(0)``, ``sys.exit(0)``, printing "passed", patching ``os.write``,
reading ``__main__`` or walking the caller's frames never pass. The solution and its tests are
compiled apart (an unclosed string cannot swallow the tests), the tests see the builtins as they
were before the solution ran, and every function the solution defines must return built-in data
(an object whose ``==`` is always true fails).

What a program written against this harness could still forge or do (documented, not blocked):

* pass tests by patching the modules the tests call (``math.isclose = lambda *a: True``), by
  returning an iterator (map, generator) whose items are objects that compare equal to anything,
  or by rewriting built-in types' dicts through interpreter internals the hook does not see;
* read the nonce out of its own memory through C code the audit hook does not see (a C
  extension, memory corruption): inside its own process the runner and the program share an
  address space, and no Python-level guard can separate them;
* read files anywhere the evaluator's user may (reads are not confined; the network is, with
  namespaces), and spend its CPU and memory limits;
* without namespaces (containers that forbid them, macOS): everything the audit hook cannot see
  escapes it: children started through ``_posixsubprocess`` run unhooked (they can write, signal
  and outlive the run), and memory is not capped on macOS.

For large runs of untrusted code, still run the evaluation itself in a disposable container or VM.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from smdlm_cli.core.errors import UserError

_DETAIL_CHARS = 300
_TAIL_BYTES = 4096


@dataclass
class Limits:
    timeout: float = 5.0  # wall-clock seconds per program
    memory_mb: int = 1024  # address-space limit (RLIMIT_AS)
    workers: int = 0  # parallel programs; 0 = os.cpu_count()


@dataclass
class Outcome:
    status: str  # "passed", "failed" or "timed out"
    detail: str  # "" if passed, else one short line saying why not
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child's code (sandbox_runner.py) is passed as text to `python -I -c`, never imported.
RUNNER = (Path(__file__).parent / "sandbox_runner.py").read_text(encoding="utf-8")
# unshare(1) makes the namespaces; the runner finishes the sandbox inside them. --kill-child ties
# the PID namespace's life to unshare's: killing unshare's process group ends every process in it.
UNSHARE = ("--user", "--map-root-user", "--mount", "--pid", "--fork", "--kill-child", "--net",
           "--ipc", "--uts")
NAMESPACES = ("namespaces: user, mount, PID, network, IPC, UTS; read-only filesystem but a "
              "private work dir, /tmp and /dev; no capabilities; plus the audit hook")
HOOK_ONLY = "audit hook only (no user namespaces here): a guard, not a boundary"
_isolation: list[str] = []


def _env(workdir: str) -> dict[str, str]:
    # -I ignores PYTHON* variables, so PYTHONHASHSEED would have no effect here.
    # One BLAS/OpenMP thread: several programs run at once, and thread pools
    # reserve address space that would eat into RLIMIT_AS.
    env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": workdir, "TMPDIR": workdir,
           "LANG": "C.UTF-8"}
    env.update(dict.fromkeys(("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"), "1"))
    return env


def _tail(f, size: int = _TAIL_BYTES) -> str:
    f.flush()
    end = f.seek(0, os.SEEK_END)
    f.seek(max(0, end - size))
    return f.read().decode("utf-8", "replace")


def _kill_group(pgid: int) -> None:
    # The child leads its own session, so this also reaches anything it spawned.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove(workdir: str) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    if os.path.exists(workdir):  # a program may have chmod-ed its own dirs shut
        for dirpath, _, _ in os.walk(workdir):
            try:
                os.chmod(dirpath, 0o700)
            except OSError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)


def isolation() -> str:
    """Which sandbox runs here: NAMESPACES where unshare(1) and user namespaces work (checked once
    per process by running a program that must find itself PID 2 on a read-only root), else
    HOOK_ONLY. Set SMDLM_SANDBOX=hook to force the fallback."""
    if not _isolation:
        works = False
        if sys.platform.startswith("linux") and shutil.which("unshare") and \
                os.environ.get("SMDLM_SANDBOX") != "hook":
            probe = ("import os\nassert os.getpid() == 2\n"
                     "assert os.statvfs('/').f_flag & os.ST_RDONLY\n"
                     "assert not os.statvfs('.').f_flag & os.ST_RDONLY\n")
            works = _run(probe, "", Limits(timeout=30.0), isolate=True).passed
        _isolation.append(NAMESPACES if works else HOOK_ONLY)
    return _isolation[0]


def run_program(program: str, limits: Limits = Limits(), tests: str = "") -> Outcome:
    """Run a solution (then `tests`, compiled apart) in a fresh sandboxed process; never raises
    for what the program does (a sandbox that cannot be set up is a UserError)."""
    return _run(program, tests, limits, isolate=isolation() == NAMESPACES)


def _run(program: str, tests: str, limits: Limits, isolate: bool) -> Outcome:
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="smdlm-exec-")
    payload = json.dumps({"solution": program, "tests": tests, "nonce": nonce, "dir": workdir,
                          "isolate": isolate, "memory_mb": int(limits.memory_mb),
                          "cpu_seconds": math.ceil(limits.timeout) + 1}).encode()
    argv = [sys.executable, "-I", "-c", RUNNER]
    if isolate:
        argv = [shutil.which("unshare") or "unshare", *UNSHARE, *argv]
    start = time.monotonic()
    try:
        # Output goes to unlinked files, bounded by RLIMIT_FSIZE, never to memory.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                    cwd=workdir, env=_env(workdir), start_new_session=True)
            timed_out = False
            try:
                proc.communicate(payload, timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
            seconds = time.monotonic() - start
            code = proc.returncode
            if isolate and code > 128:  # the namespace's PID 1 reports a signal as 128 + N
                code = 128 - code
            lines = _tail(out).splitlines()
            stderr_lines = _tail(err).strip().splitlines()
    finally:
        _remove(workdir)

    if nonce in lines:
        return Outcome("passed", "", seconds)
    if timed_out:
        return Outcome("timed out", f"timed out after {float(limits.timeout)} s", seconds)
    if code == -signal.SIGXCPU:
        return Outcome("timed out", "CPU time limit exceeded", seconds)
    reports = [ln[len(nonce) + 1:] for ln in lines if ln.startswith(nonce + ":")]
    unshare_failed = [ln for ln in stderr_lines if ln.split(":", 1)[0].endswith("unshare")] \
        if isolate and not reports else []
    if unshare_failed or (reports and reports[-1].startswith("sandbox setup failed")):
        # Not the program's doing: scoring it as failed would lower pass@k without a word.
        why = unshare_failed[-1] if unshare_failed else reports[-1]
        raise UserError(f"sandbox: {why}; set SMDLM_SANDBOX=hook to run with the audit hook only")
    if reports:
        return Outcome("failed", reports[-1][:_DETAIL_CHARS], seconds)
    detail = f"exit code {code}"
    if stderr_lines:  # e.g. "Fatal Python error: ..."
        detail += ": " + stderr_lines[-1].strip()
    return Outcome("failed", detail[:_DETAIL_CHARS], seconds)


def run_programs(programs: list[str | tuple[str, str]], limits: Limits = Limits(),
                 on_done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """Run programs (a source, or a (solution, tests) pair) in parallel, one thread driving one
    subprocess; results in input order.

    ``on_done(i, outcome)`` is called from the calling thread as each one finishes.
    """
    results: list[Outcome | None] = [None] * len(programs)
    workers = limits.workers or os.cpu_count() or 1
    if programs:
        isolation()  # probed once, before the threads race for it
    pairs = [(p, "") if isinstance(p, str) else p for p in programs]
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(programs) or 1))) as pool:
        futures = {pool.submit(run_program, p, limits, t): i for i, (p, t) in enumerate(pairs)}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if on_done is not None:
                on_done(i, results[i])
    return results  # type: ignore[return-value]
