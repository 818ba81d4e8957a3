"""The code that runs INSIDE the sandboxed child (`python -I -c <this file's text>`), never imported.

execution.py starts it, writes a JSON payload on its stdin and reads one verdict line from its
stdout. In order, it: reads the payload (the nonce included); with `isolate`, finishes the kernel
sandbox that `unshare` began (read-only, nosuid, nodev filesystem; a private /tmp, /dev and work
directory; its own /proc; every capability dropped, no new privileges, not dumpable); sets the
resource limits; starts the reporter thread, the only holder of the nonce; installs the audit
hook; runs the solution, then wraps the functions it defined so they must return built-in data;
runs the tests; and parks the main thread with a status.

The verdict: the reporter thread polls the main thread's stack and writes "nonce" (passed) or
"nonce:reason" only once the main thread is parked in this file's own code, called from this
file's own frame, at the bottom of the stack, so a program cannot claim to have finished by
calling anything itself. Nothing of the runner stays in `__main__` (the function deletes itself
from the module), the nonce is never in a frame the program's thread can walk to, and the few
functions the reporter calls (os.write, os._exit, sys._current_frames) are bound before the
program runs, so patching them changes nothing.
"""


def _runner():
    del globals()["_runner"]  # from here on, __main__ holds nothing of the runner
    import _thread
    import json
    import os
    import sys
    import time

    # Bound now, before the program can patch a module or builtins: what decides the verdict
    # never looks a name up at run time.
    write, exit_now, frames, sleep = os.write, os._exit, sys._current_frames, time.sleep
    get_ident, new_lock, kind, raw = _thread.get_ident, _thread.allocate_lock, type, bytes
    run_code, build, listed, text, copy = exec, compile, list, str, dict
    containers, mapping, failure = (list, tuple, set, frozenset), dict, BaseException
    clean_builtins = copy(__builtins__.__dict__ if kind(__builtins__) is not dict else __builtins__)
    try:
        payload = json.loads(sys.stdin.buffer.read())
        nonce = payload.pop("nonce").encode()
    except Exception:
        exit_now(3)

    def isolate(workdir):
        """Finish the namespaces unshare(1) created: we are uid 0 of a new user namespace, PID 1
        of a new PID namespace, in private mount, network, IPC and UTS namespaces."""
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)

        def check(result, what):
            if result != 0:
                err = ctypes.get_errno()
                raise OSError(err, "%s: %s" % (what, os.strerror(err)))

        def mount(source, target, fstype, flags, data=None):
            enc = (lambda s: None if s is None else s.encode())
            check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                             enc(data)), "mount " + target)

        class MountAttr(ctypes.Structure):
            _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                        ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]

        def mount_setattr(path, attr_set, attr_clr, recursive):
            attr = MountAttr(attr_set, attr_clr, 0, 0)
            # 442 = mount_setattr on every Linux architecture (5.12+); AT_RECURSIVE = 0x8000
            check(libc.syscall(442, -100, path.encode(), 0x8000 if recursive else 0,
                               ctypes.byref(attr), ctypes.sizeof(attr)), "mount_setattr " + path)

        bind, nosuid, nodev, noexec, rdonly, rec, private = 4096, 2, 4, 8, 1, 16384, 1 << 18
        attr_ro, attr_nosuid, attr_nodev = 1, 2, 4
        mount(None, "/", None, rec | private)
        # The whole tree read-only, no setuid, no device nodes: even uid 0 (which maps to the
        # evaluator's uid) cannot write a host file or open a disk.
        mount_setattr("/", attr_ro | attr_nosuid | attr_nodev, 0, True)
        mount("tmpfs", "/tmp", "tmpfs", nosuid | nodev, "size=64m,mode=1777")
        devices = ("null", "zero", "full", "random", "urandom")
        os.mkdir("/tmp/.dev")
        for name in devices:  # staged, as the host /dev is about to be covered
            open("/tmp/.dev/" + name, "w").close()
            mount("/dev/" + name, "/tmp/.dev/" + name, None, bind)
            mount_setattr("/tmp/.dev/" + name, 0, attr_ro | attr_nodev, False)
        mount("tmpfs", "/dev", "tmpfs", nosuid | noexec, "size=1m,mode=755")
        for name in devices:
            open("/dev/" + name, "w").close()
            mount("/tmp/.dev/" + name, "/dev/" + name, None, bind)
            check(libc.umount2(("/tmp/.dev/" + name).encode(), 2), "umount " + name)
            os.remove("/tmp/.dev/" + name)
        os.rmdir("/tmp/.dev")
        os.mkdir("/dev/shm")
        os.chmod("/dev/shm", 0o1777)
        for link, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(target, "/dev/" + link)
        try:  # this PID namespace's /proc: the evaluator's processes are not in it
            mount("proc", "/proc", "proc", nosuid | nodev | noexec | rdonly)
        except OSError:  # a container that masks parts of /proc: hide the host's, all of it
            mount("tmpfs", "/proc", "tmpfs", nosuid | nodev | noexec | rdonly, "size=4k")
        os.makedirs(workdir, exist_ok=True)
        mount("tmpfs", workdir, "tmpfs", nosuid | nodev, "size=64m,mode=700")
        os.chdir(workdir)
        # No capability left and none to regain (exec as uid 0 grants none; no setuid files):
        # the mounts above cannot be undone, and /proc/1/mem is closed to our own children.
        check(libc.prctl(28, 0x01 | 0x02 | 0x40 | 0x80, 0, 0, 0), "securebits")
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP; EINVAL past the last capability
        check(libc.prctl(47, 4, 0, 0, 0), "clear ambient capabilities")
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        check(libc.capset(header, data), "capset")
        check(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
        check(libc.prctl(4, 0, 0, 0, 0), "not dumpable")
        # PID 1 ignores the signals it has no handler for (a segfault, its own SIGKILL), so the
        # program runs as PID 2; PID 1 only reaps and leaves with its status, which ends the
        # namespace and everything the program started in it.
        child = os.fork()
        if child:
            while True:
                pid, status = os.waitpid(-1, 0)
                if pid == child:
                    exit_now(os.WEXITSTATUS(status) if os.WIFEXITED(status)
                             else 128 + os.WTERMSIG(status))

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

    report = os.dup(1)  # the real stdout, for the reporter's one line only
    if payload["isolate"]:
        try:
            isolate(payload["dir"])
        except Exception as exc:
            write(report, ("\n" + nonce.decode() + ":sandbox setup failed: " + str(exc)[:200]
                           + "\n").encode())
            exit_now(0)
    limit("RLIMIT_AS", payload["memory_mb"] * 1024 * 1024)
    limit("RLIMIT_CPU", payload["cpu_seconds"])
    limit("RLIMIT_FSIZE", 64 * 1024 * 1024)
    limit("RLIMIT_CORE", 0)
    limit("RLIMIT_NOFILE", 256)
    sys.dont_write_bytecode = True  # imports must not try to write .pyc files
    sys.setrecursionlimit(3000)  # the return-value guard adds a frame per call
    import faulthandler
    faulthandler.disable()
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # program output is discarded; fd 2 stays on the bounded capture file
    os.close(null)

    def park(status):
        """The main thread's last stop: the reporter reads `status` from this frame."""
        lock = new_lock()
        lock.acquire()
        lock.acquire()

    runner_code, park_code = sys._getframe().f_code, park.__code__

    def reporter(secret, main, fd):
        while True:
            frame = frames().get(main)
            if frame is not None and frame.f_code is park_code:
                caller = frame.f_back
                if caller is not None and caller.f_code is runner_code and \
                        caller.f_back is not None and caller.f_back.f_back is None:
                    status = frame.f_locals.get("status")
                    if kind(status) is raw:
                        break
            sleep(0.005)
        line = b"\n" + secret + (b"" if status == b"" else b":" + status) + b"\n"
        write(fd, line)
        exit_now(0)

    reporter_id = _thread.start_new_thread(reporter, (nonce, get_ident(), report))
    del nonce

    def install_hook(root):
        import socket
        from os.path import abspath, isabs, join, realpath
        deny_always = frozenset((
            "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
            "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill",
            "pty.spawn", "os.chdir", "resource.setrlimit", "resource.prlimit",
            "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
            "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
            # the routes to the reporter's frame and to the nonce in memory
            "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_exceptions",
            "sys.settrace", "sys.setprofile"))
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
            "shutil.unpack_archive": ((1, None),), "sqlite3.connect": ((0, None),)}
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
                if path == ":memory:":
                    return True
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
            if event == "sys._current_frames":
                if get_ident() != reporter_id:
                    deny(event)
                return
            if event in deny_always or event.startswith("ctypes."):
                deny(event)
            if event == "socket.__new__" and args[1] != socket.AF_UNIX:
                deny(event)
            if event == "open":
                path, mode, flags = (tuple(args) + (None, None))[:3]
                if path is None or isinstance(path, int):
                    return
                text = os.fsdecode(path)
                if text.startswith("/proc/") and text.rstrip("/").endswith("/mem"):
                    deny(event, path)  # the process's own memory holds the nonce
                wants_write = any(c in (mode or "") for c in "wax+") or (flags or 0) & writes
                if wants_write and not inside(path):
                    deny(event, path)
                return
            for pi, di in path_args.get(event, ()):
                if len(args) > pi and args[pi] is not None and \
                        not inside(args[pi], None if di is None or len(args) <= di else args[di]):
                    deny(event, args[pi])

        sys.addaudithook(hook)  # audit hooks cannot be removed

        import posix

        def outside_only(name, make):  # no audit event for these: the functions are swapped
            def checked(path, *args, dir_fd=None, **kwargs):
                if not inside(path, dir_fd):
                    deny("os." + name, path)
                return make(path, *args, dir_fd=dir_fd, **kwargs)
            return checked

        for name in ("mkfifo", "mknod"):
            setattr(os, name, outside_only(name, getattr(posix, name)))
            setattr(posix, name, getattr(os, name))

    def describe(exc):
        try:
            message = text(exc)
            line = kind(exc).__name__ + (": " + message if message else "")
            return raw(" ".join(line.split())[:300].encode("utf-8", "replace"))
        except failure:
            return b"<unprintable exception>"

    heap_type = 1 << 9  # Py_TPFLAGS_HEAPTYPE: classes made at run time, the program's included

    def plain(value, depth=0):
        """Built-in data all the way down: nothing whose == the program could have written."""
        t = kind(value)
        if t.__flags__ & heap_type or depth > 64:
            return False
        if t in containers:
            for v in value:
                if not plain(v, depth + 1):
                    return False
        elif t is mapping:
            for k, v in value.items():
                if not (plain(k, depth + 1) and plain(v, depth + 1)):
                    return False
        return True

    def guarded(fn, name):
        def call(*args, **kwargs):
            value = fn(*args, **kwargs)
            if not plain(value):
                raise TypeError("sandbox: %s returned a %s object; expected built-in data (a type "
                                "the program defines could compare equal to anything)"
                                % (name, kind(value).__name__))
            return value
        call.__name__ = call.__qualname__ = name
        call.__doc__ = fn.__doc__
        return call

    function = kind(limit)

    def run(solution, tests):
        namespace = {"__name__": "__sandbox__"}
        try:
            # Compiled apart: a string or comment left open in the solution cannot swallow the tests.
            run_code(build(solution, "<solution>", "exec"), namespace)
            for name, value in listed(namespace.items()):
                if kind(value) is function and value.__globals__ is namespace:
                    namespace[name] = guarded(value, name)
            if tests:
                # the tests see the builtins as they were before the solution ran
                namespace["__builtins__"] = copy(clean_builtins)
                run_code(build(tests, "<tests>", "exec"), namespace)
            return b""
        except failure as exc:  # SystemExit too: sys.exit(0) is not a pass
            return describe(exc)

    install_hook(os.path.realpath(payload["dir"]))
    solution, tests = payload.pop("solution"), payload.pop("tests")
    del payload
    status = run(solution, tests)
    park(status)


_runner()
