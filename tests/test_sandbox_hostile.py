"""Hostile completions, all scored in one `smdlm evaluate humaneval` run: none may pass, write
outside its work dir, outlive the run or signal the evaluator, and the run must end in a report.

Every completion answers the task wrongly (f(1) returns 1, the test wants 2) after its attack, so
a pass can only come from a forged verdict: pass@1 must be exactly 0. The attacks that only the
kernel can stop (a child process started through _posixsubprocess, which no audit hook sees) run
only where the namespace sandbox runs; kill -9 of the evaluator is never tried without it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from smdlm_cli.cli.app import app
from smdlm_cli.evals.execution import NAMESPACES, isolation

TASK = {"task_id": "Hostile/0", "prompt": "def f(x):\n", "entry_point": "f",
        "canonical_solution": "    return x + 1\n",
        "test": "def check(candidate):\n    assert candidate(1) == 2\n"}
MARKER = "smdlm-hostile-survivor-7f3a"


def fork_exec(argv: str, setsid: bool = False) -> str:
    """A child started through _posixsubprocess directly: no audit event, no hook in the child."""
    return textwrap.dedent(f"""
        import _posixsubprocess, os, shutil
        argv = {argv}
        r, w = os.pipe()
        _posixsubprocess.fork_exec(
            [a.encode() for a in argv], [shutil.which(argv[0]).encode()], True, (w,), None, None,
            -1, -1, -1, -1, -1, -1, r, w, True, {setsid}, -1, None, None, None, -1, None, False)
        os.close(w)
        os.read(r, 100)
        """)


def hostile(out: Path, canary: Path) -> dict[str, str]:
    """name -> completion (the body of f, then module-level attack code)."""
    wrong = "    return x\n"
    forge_nonce = textwrap.dedent("""
        def forge(values):
            for v in values:
                if isinstance(v, bytes):
                    v = v.decode('ascii', 'replace')
                if isinstance(v, str) and len(v) == 32:
                    for fd in range(3, 40):
                        try:
                            os.write(fd, ('\\n' + v + '\\n').encode())
                        except OSError:
                            pass
        """)
    programs = {
        "patch-os-write": wrong + textwrap.dedent("""
            import os
            _write = os.write
            def write(fd, data):  # turn "nonce:AssertionError" into "nonce"
                return _write(fd, data.split(b':')[0] + b'\\n' if b':' in data else data)
            os.write = write
            """),
        "nonce-from-main": wrong + "import os, sys\n" + forge_nonce + textwrap.dedent("""
            forge(vars(sys.modules['__main__']).values())
            os._exit(0)
            """),
        "nonce-from-caller-frames": wrong + "import os, sys\n" + forge_nonce + textwrap.dedent("""
            frame = sys._getframe(0)
            while frame is not None:
                forge(list(frame.f_locals.values()))
                for v in list(frame.f_locals.values()):
                    cells = getattr(v, '__closure__', None)
                    if isinstance(cells, tuple):
                        forge([c.cell_contents for c in cells])
                frame = frame.f_back
            os._exit(0)
            """),
        "nonce-from-traceback": wrong + "import os, sys\n" + forge_nonce + textwrap.dedent("""
            try:
                raise ValueError
            except ValueError as e:
                frame = e.__traceback__.tb_frame
            while frame is not None:
                forge(list(frame.f_locals.values()))
                frame = frame.f_back
            os._exit(0)
            """),
        "nonce-from-gc": wrong + "import gc, os\n" + forge_nonce + "forge(gc.get_objects())\nos._exit(0)\n",
        "nonce-from-own-memory": wrong + "data = open('/proc/self/mem', 'rb')\n",
        "always-equal": "    class Equal:\n        def __eq__(self, other):\n            return True\n"
                        "    return Equal()\n",
        "int-subclass-equal": "    class Int(int):\n        def __eq__(self, other):\n            return True\n"
                              "    return Int(x)\n",
        "call-the-park": wrong + textwrap.dedent("""
            import sys
            frame = sys._getframe(0)
            while frame is not None:
                park = frame.f_locals.get('park')
                if callable(park):
                    park(b'')
                frame = frame.f_back
            """),
        "patch-builtins": wrong + "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
                          "builtins.exec = lambda *a, **k: None\n",
        "sqlite-outside": wrong + f"import sqlite3\nsqlite3.connect({str(out / 'db.sqlite')!r}).execute('create table t(x int)')\n",
        "mkfifo-outside": wrong + f"import os\nos.mkfifo({str(out / 'fifo')!r})\n",
        "inside-canary": wrong + "open('inside.txt', 'w').write('mine')\nassert open('inside.txt').read() == 'mine'\n",
    }
    if isolation() == NAMESPACES:  # children the audit hook never sees: the kernel's job
        programs.update({
            "multiprocessing-spawn-writes-outside": wrong + textwrap.dedent(f"""
                import multiprocessing as mp
                if __name__ == '__sandbox__':
                    p = mp.get_context('spawn').Process(target=open, args=({str(canary)!r}, 'w'))
                    p.start()
                    p.join()
                """),
            "fork-exec-writes-outside": wrong + fork_exec(f"['touch', {str(out / 'touched')!r}]"),
            "setsid-child-outlives": wrong + fork_exec(
                f"['sh', '-c', 'sleep 2; touch {out / 'late'} # {MARKER}']", setsid=True),
            "fork-exec-kills-the-evaluator": wrong + fork_exec(f"['kill', '-9', '{os.getpid()}']"),
            "fork-exec-kills-everything": wrong + fork_exec("['kill', '-9', '-1']"),
        })
    return programs


def survivors() -> list[str]:
    found = []
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and MARKER.encode() in (p / "cmdline").read_bytes():
                found.append(p.name)
        except OSError:
            pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="Linux /proc needed to look for survivors")
def test_no_hostile_completion_passes_escapes_or_stops_the_report(tmp_path):
    # Outside /tmp, which the namespace sandbox replaces by a private one: the targets must be
    # visible (on the read-only tree) for the attacks to mean anything.
    out = Path(tempfile.mkdtemp(prefix=".hostile-", dir=Path(__file__).parent))
    try:
        _attack(tmp_path, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _attack(tmp_path: Path, out: Path) -> None:
    canary = out / "canary.txt"
    canary.write_text("untouched")
    programs = hostile(out, canary)
    (tmp_path / "tasks.jsonl").write_text(json.dumps(TASK) + "\n")
    (tmp_path / "samples.jsonl").write_text("".join(
        json.dumps({"task_id": TASK["task_id"], "completion": c, "name": n}) + "\n"
        for n, c in programs.items()))
    before = set(Path(tempfile.gettempdir()).glob("smdlm-exec-*"))
    start = time.monotonic()
    result = CliRunner().invoke(app, [
        "evaluate", "humaneval", "--dataset", str(tmp_path / "tasks.jsonl"), "--samples",
        str(tmp_path / "samples.jsonl"), "--timeout", "4", "--workers", "4", "--out",
        str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    rows = dict(zip(programs, report["results"]))
    assert report["samples"] == len(programs) and report["pass@1"] == 0.0, \
        {n: r for n, r in rows.items() if r["status"] == "passed"}
    assert report["isolation"] == isolation()
    assert "unexpected" not in rows["always-equal"]["detail"]
    assert "returned a Equal object" in rows["always-equal"]["detail"]
    assert "returned a Int object" in rows["int-subclass-equal"]["detail"]
    assert "PermissionError" in rows["nonce-from-gc"]["detail"]
    assert "PermissionError" in rows["nonce-from-own-memory"]["detail"]
    assert rows["inside-canary"]["detail"].startswith("AssertionError")  # it wrote, inside
    assert canary.read_text() == "untouched"
    assert survivors() == []
    time.sleep(max(0.0, 2.5 - (time.monotonic() - start)))  # past the survivor's sleep 2
    assert sorted(p.name for p in out.iterdir()) == ["canary.txt"]
    assert set(Path(tempfile.gettempdir()).glob("smdlm-exec-*")) <= before  # none left behind
    # Reaching this line is itself a result: the evaluator (this process) was a target.
