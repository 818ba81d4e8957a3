"""Run generated Python programs (HumanEval/MBPP completions plus their tests).

Each program runs in a fresh ``python -I`` subprocess with its own temporary
working directory, a wall-clock timeout that kills the whole process group,
resource limits (address space, CPU, file size, open files, no core dumps) and
an audit hook that refuses process creation, signals, ctypes, networking and
writes outside the working directory. Where the kernel allows unprivileged user
namespaces the child also moves into an empty network namespace. A program
passes only if it runs to the end and the child then prints a per-run random
nonce, so ``os._exit(0)``, ``sys.exit(0)`` or printing "passed" never pass.

What this is NOT: a security boundary against a determined adversary. It is a
guard against accidents and misbehaving generated code (``rm -rf``, fork loops,
huge allocations, infinite loops, stray network calls). Known gaps:

* audit hooks can be bypassed by code that corrupts interpreter memory, by C
  extensions, and by unaudited C entry points (e.g. ``_posixsubprocess``);
  the nonce is reachable from the program through frame introspection;
* reading files anywhere is allowed; writes through an ``os.open(dir_fd=...)``
  are resolved against the working directory, not the dir_fd;
* macOS has no working RLIMIT_AS, so memory is not capped there;
* network isolation only exists where unprivileged user namespaces are allowed
  (containers often forbid them); otherwise only Python-level sockets are
  blocked.

For large runs of untrusted code use a container or VM (no network, read-only
root, dropped capabilities) around this.
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
from typing import Callable

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


# Child bootstrap, run as ``python -I -c RUNNER``. The payload arrives on stdin.
# The resource limits are set here rather than in a preexec_fn: preexec_fn is
# documented as unsafe with threads (run_programs uses threads) and forces a
# full fork of a possibly large parent; the program has not run yet, so it is
# just as early for what matters, and soft = hard means it cannot raise them.
RUNNER = r'''
import json, os, sys

def limit(name, value):
    import resource
    res = getattr(resource, name, None)
    if res is None:
        return
    try:
        hard = resource.getrlimit(res)[1]
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(res, (value, value))
    except (ValueError, OSError):  # e.g. RLIMIT_AS on macOS
        pass

def unshare():
    # New user + network namespace: no interfaces but a down loopback, so even
    # code that slips past the audit hook cannot reach the network.
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).unshare(0x10000000 | 0x40000000) == 0
    except Exception:  # no libc unshare (macOS) or forbidden (containers)
        return False

def install_hook(root):
    import socket
    from os.path import abspath, isabs, join, realpath
    deny_always = frozenset((
        "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
        "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill",
        "pty.spawn", "os.chdir", "resource.setrlimit", "resource.prlimit",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
        "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"))
    # event -> (index of a path argument, index of its dir_fd argument or None)
    path_args = {
        "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
        "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)),
        "os.symlink": ((1, 2),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
        "os.utime": ((0, 3),), "os.truncate": ((0, None),),
        "os.setxattr": ((0, None),), "os.removexattr": ((0, None),),
        "shutil.rmtree": ((0, 1),), "shutil.move": ((0, None), (1, None)),
        "shutil.copyfile": ((1, None),), "shutil.copymode": ((1, None),),
        "shutil.copystat": ((1, None),), "shutil.copytree": ((1, None),),
        "shutil.chown": ((0, None),), "shutil.make_archive": ((0, None),),
        "shutil.unpack_archive": ((1, None),)}
    writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def fd_path(fd):
        try:
            return os.readlink("/proc/self/fd/%d" % fd)
        except (OSError, TypeError):
            return None  # unknown -> treated as outside

    def inside(path, dir_fd=None):
        if isinstance(path, int):
            path = fd_path(path)
        else:
            path = os.fsdecode(path)
            if dir_fd not in (None, -1) and not isabs(path):
                base = fd_path(dir_fd)
                path = None if base is None else join(base, path)
        if path is None:
            return False
        path = realpath(abspath(path))
        return path == root or path.startswith(root + os.sep)

    def deny(event, path=None):
        where = "" if path is None else " on %r outside the sandbox dir" % (path,)
        raise PermissionError("sandbox: %s%s blocked" % (event, where))

    def hook(event, args):
        if event in deny_always or event.startswith("ctypes."):
            deny(event)
        if event == "socket.__new__" and args[1] != socket.AF_UNIX:
            deny(event)
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None))[:3]
            if path is None or isinstance(path, int):
                return
            wants_write = any(c in (mode or "") for c in "wax+") or (flags or 0) & writes
            if wants_write and not inside(path):
                deny(event, path)
            return
        for pi, di in path_args.get(event, ()):
            if args[pi] is not None and not inside(args[pi], None if di is None else args[di]):
                deny(event, args[pi])

    sys.addaudithook(hook)  # audit hooks cannot be removed

def describe(exc):
    try:
        msg = str(exc)
    except BaseException:
        msg = "<unprintable>"
    line = type(exc).__name__ + (": " + msg if msg else "")
    return " ".join(line.split())[:300]

payload = json.loads(sys.stdin.buffer.read())
limit("RLIMIT_AS", payload["memory_mb"] * 1024 * 1024)
limit("RLIMIT_CPU", payload["cpu_seconds"])
limit("RLIMIT_FSIZE", 64 * 1024 * 1024)
limit("RLIMIT_CORE", 0)
limit("RLIMIT_NOFILE", 256)
unshare()
sys.dont_write_bytecode = True  # imports must not try to write .pyc files
import faulthandler
faulthandler.disable()
report = os.dup(1)  # the real stdout, for our one result line only
null = os.open(os.devnull, os.O_RDWR)
os.dup2(null, 0)
os.dup2(null, 1)  # program output is discarded; fd 2 stays on the bounded capture file
os.close(null)
nonce = payload.pop("nonce")
install_hook(os.path.realpath(payload["dir"]))
try:
    exec(compile(payload.pop("program"), "<program>", "exec"), {"__name__": "__sandbox__"})
    line = nonce
except BaseException as exc:  # SystemExit too: sys.exit(0) is not a pass
    line = nonce + ":" + describe(exc)
os.write(report, ("\n" + line + "\n").encode("utf-8", "replace"))
os._exit(0)  # skip atexit handlers and leftover non-daemon threads
'''


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


def run_program(program: str, limits: Limits = Limits()) -> Outcome:
    """Run one program in a fresh sandboxed subprocess; never raises for what it does."""
    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="smdlm-exec-")
    payload = json.dumps({"program": program, "nonce": nonce, "dir": workdir,
                          "memory_mb": int(limits.memory_mb),
                          "cpu_seconds": math.ceil(limits.timeout) + 1}).encode()
    start = time.monotonic()
    try:
        # Output goes to unlinked files, bounded by RLIMIT_FSIZE, never to memory.
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen([sys.executable, "-I", "-c", RUNNER], stdin=subprocess.PIPE,
                                    stdout=out, stderr=err, cwd=workdir, env=_env(workdir),
                                    start_new_session=True)
            timed_out = False
            try:
                proc.communicate(payload, timeout=limits.timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
            seconds = time.monotonic() - start
            lines = _tail(out).splitlines()
            stderr_lines = _tail(err).strip().splitlines()
    finally:
        _remove(workdir)

    if nonce in lines:
        return Outcome("passed", "", seconds)
    if timed_out:
        return Outcome("timed out", f"timed out after {float(limits.timeout)} s", seconds)
    if proc.returncode == -signal.SIGXCPU:
        return Outcome("timed out", "CPU time limit exceeded", seconds)
    reports = [ln[len(nonce) + 1:] for ln in lines if ln.startswith(nonce + ":")]
    if reports:
        return Outcome("failed", reports[-1][:_DETAIL_CHARS], seconds)
    detail = f"exit code {proc.returncode}"
    if stderr_lines:  # e.g. "Fatal Python error: ..."
        detail += ": " + stderr_lines[-1].strip()
    return Outcome("failed", detail[:_DETAIL_CHARS], seconds)


def run_programs(programs: list[str], limits: Limits = Limits(),
                 on_done: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """Run programs in parallel (one thread drives one subprocess); results in input order.

    ``on_done(i, outcome)`` is called from the calling thread as each one finishes.
    """
    results: list[Outcome | None] = [None] * len(programs)
    workers = limits.workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(programs) or 1))) as pool:
        futures = {pool.submit(run_program, p, limits): i for i, p in enumerate(programs)}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if on_done is not None:
                on_done(i, results[i])
    return results  # type: ignore[return-value]
