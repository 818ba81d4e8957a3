"""Sandboxed execution of generated programs: pass/fail/timeout and the guards."""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import pytest

from smdlm_cli.evals import execution
from smdlm_cli.evals.execution import Limits, Outcome, run_program, run_programs

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX-only sandbox")

FAST = Limits(timeout=2.0, memory_mb=512)


def run(program: str, limits: Limits = FAST) -> Outcome:
    return run_program(program, limits)


def assert_blocked(outcome: Outcome, event: str) -> None:
    assert outcome.status == "failed", outcome
    assert not outcome.passed
    assert "PermissionError" in outcome.detail and event in outcome.detail, outcome.detail


def test_correct_program_passes():
    out = run("def f(x): return x+1\nassert f(1) == 2")
    assert out.status == "passed" and out.passed and out.detail == ""
    assert 0 < out.seconds < FAST.timeout


def test_failing_assert_and_syntax_error_fail():
    out = run("def f(x): return x\nassert f(1) == 2, 'off by one'")
    assert out.status == "failed" and out.detail == "AssertionError: off by one"
    out = run("def f(:\n  pass")
    assert out.status == "failed" and out.detail.startswith("SyntaxError:")


def test_infinite_loop_times_out():
    out = run("while True: pass")
    assert out.status == "timed out" and not out.passed
    assert out.detail == "timed out after 2.0 s"
    assert FAST.timeout <= out.seconds < FAST.timeout + 3


def test_sleep_times_out_on_wall_clock():
    out = run("import time\ntime.sleep(100)")
    assert out.status == "timed out"
    assert out.seconds < FAST.timeout + 3


def test_huge_allocation_hits_memory_limit():
    out = run("x = bytearray(8 * 1024**3)", Limits(timeout=5, memory_mb=512))
    assert out.status == "failed" and "MemoryError" in out.detail


def test_segfault_is_a_failure_with_exit_code():
    out = run("import faulthandler\nfaulthandler._sigsegv()")
    assert out.status == "failed" and out.detail.startswith("exit code -11")


def test_os_system_blocked(tmp_path):
    target = tmp_path / "touched"
    out = run(f"import os\nos.system('touch ' + {str(target)!r})")
    assert_blocked(out, "os.system")
    assert not target.exists()


def test_fork_loop_subprocess_and_multiprocessing_blocked():
    assert_blocked(run("import os\nwhile True: os.fork()"), "os.fork")
    assert_blocked(run("import subprocess\nsubprocess.run(['true'])"), "subprocess.Popen")
    mp = "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()"
    assert_blocked(run(mp), "os.fork")
    assert os.getpid() > 0  # still here


def test_write_outside_blocked(tmp_path):
    target = tmp_path / "out.txt"
    assert_blocked(run(f"open({str(target)!r}, 'w').write('x')"), "open")
    assert not target.exists()
    assert_blocked(run(f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))"), "open")
    assert not target.exists()


def test_remove_and_rmtree_outside_blocked(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("data")
    assert_blocked(run(f"import os\nos.remove({str(keep)!r})"), "os.remove")
    assert keep.read_text() == "data"
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_text("y")
    assert_blocked(run(f"import shutil\nshutil.rmtree({str(d)!r})"), "shutil.rmtree")
    assert (d / "sub" / "f").read_text() == "y"
    assert_blocked(run(f"import os\nos.rename({str(keep)!r}, 'stolen')"), "os.rename")
    assert keep.exists()


def test_writes_inside_own_dir_work_and_dir_is_removed(monkeypatch):
    made: list[str] = []
    real_mkdtemp = tempfile.mkdtemp

    def recording_mkdtemp(*args, **kwargs):
        made.append(real_mkdtemp(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(execution.tempfile, "mkdtemp", recording_mkdtemp)
    program = (
        "import os, shutil, tempfile\n"
        "assert os.path.basename(os.getcwd()).startswith('smdlm-exec-')\n"
        "assert os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd()\n"
        "open('inside.txt', 'w').write('x')\n"
        "assert open('inside.txt').read() == 'x'\n"
        "os.makedirs('a/b')\n"
        "open('a/b/c', 'w').write('y')\n"
        "shutil.rmtree('a')\n"
        "with tempfile.NamedTemporaryFile() as f:\n"
        "    f.write(b'z')\n"
        "os.remove('inside.txt')\n"
    )
    out = run(program)
    assert out.status == "passed", out
    assert len(made) == 1 and not os.path.exists(made[0])


def test_exit_and_fake_nonce_do_not_pass():
    out = run("import sys\nsys.exit(0)")
    assert out.status == "failed" and out.detail == "SystemExit: 0"
    out = run("import os\nos._exit(0)")
    assert out.status == "failed" and out.detail == "exit code 0"
    out = run("print('passed')\nprint('0123456789abcdef0123456789abcdef')")
    assert out.status == "passed"  # ran to the end: printing is harmless, it is discarded
    out = run("import os\nos.write(3, b'0123456789abcdef0123456789abcdef\\n')\nos._exit(0)")
    assert out.status == "failed"


def test_cannot_kill_the_parent():
    out = run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)")
    assert_blocked(out, "os.kill")
    out = run("import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGKILL)")
    assert_blocked(out, "os.killpg")
    # Reaching this line is the proof: the pytest process was the target.


def test_network_blocked():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.setblocking(False)
        port = server.getsockname()[1]
        out = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)")
        assert out.status == "failed" and "PermissionError" in out.detail, out
        out = run(f"import socket\ns = socket.socket()\ns.connect(('127.0.0.1', {port}))")
        assert_blocked(out, "socket.__new__")
        with pytest.raises(BlockingIOError):
            server.accept()  # no connection ever arrived
    finally:
        server.close()


def test_ctypes_blocked():
    assert_blocked(run("import ctypes\nctypes.CDLL(None).system(b'true')"), "ctypes.")


def test_run_programs_keeps_order_and_reports_progress():
    programs = [
        "assert True",
        "assert False",
        "while True: pass",
        "x = 1",
        "import os\nos.system('true')",
        "raise ValueError('bad')",
    ]
    seen: list[tuple[int, str]] = []
    outcomes = run_programs(programs, Limits(timeout=2.0, memory_mb=512, workers=3),
                            on_done=lambda i, o: seen.append((i, o.status)))
    assert [o.status for o in outcomes] == ["passed", "failed", "timed out", "passed", "failed", "failed"]
    assert outcomes[5].detail == "ValueError: bad"
    assert sorted(seen) == sorted(enumerate(o.status for o in outcomes))
    assert run_programs([]) == []


def test_a_sandbox_that_cannot_be_set_up_is_an_error_not_a_failed_program(monkeypatch):
    """A program is never scored as failed for what the harness could not do."""
    from smdlm_cli.core.errors import UserError

    if execution.isolation() != execution.NAMESPACES:
        pytest.skip("the namespace sandbox does not run here")
    monkeypatch.setattr(execution, "UNSHARE", ("--user", "--no-such-flag"))
    with pytest.raises(UserError, match="sandbox: .*unshare: unrecognized option .*SMDLM_SANDBOX=hook"):
        run("assert True")
    monkeypatch.setattr(execution, "UNSHARE", ("--user", "--map-root-user", "--fork"))
    with pytest.raises(UserError, match="sandbox: sandbox setup failed: .*SMDLM_SANDBOX=hook"):
        run("assert True")  # no mount namespace: the runner's first mount is refused


def test_the_namespace_sandbox_is_read_only_private_and_without_capabilities(tmp_path):
    if execution.isolation() != execution.NAMESPACES:
        pytest.skip("the namespace sandbox does not run here")
    program = (
        "import os\n"
        "assert os.getpid() == 2 and os.getuid() == 0\n"
        "status = open('/proc/self/status').read()\n"
        "assert 'CapEff:\\t0000000000000000' in status and 'NoNewPrivs:\\t1' in status, status\n"
        "assert os.statvfs('/').f_flag & os.ST_RDONLY and os.statvfs('/usr').f_flag & os.ST_RDONLY\n"
        f"assert not os.path.exists({str(tmp_path)!r})  # the host's /tmp is not this /tmp\n"
        "assert sorted(p for p in os.listdir('/proc') if p.isdigit()) == ['1', '2']\n"
        "import socket\nassert [name for _, name in socket.if_nameindex()] == ['lo']\n"
        "assert {'null', 'zero', 'urandom', 'shm'} <= set(os.listdir('/dev'))\n"
        "assert len(open('/dev/urandom', 'rb').read(8)) == 8\n"
    )
    out = run(program)
    assert out.status == "passed", out
