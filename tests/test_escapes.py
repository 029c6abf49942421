"""Ways out of the sandbox that must stay shut, each tried for real (and, where it can be,
tried once outside the sandbox too, to show that the attempt itself works)."""

from __future__ import annotations

import ctypes
import errno
import inspect
import json
import os
import re
import select
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any

import pytest

import pytest_incarnate
from pytest_incarnate import PIPE, Bind, Sandbox, Spec
from pytest_incarnate.errors import IncarnateError

PY = sys.executable
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the root caller's sandbox is what is tried here")


def _sysctl(name: str) -> str:
    with open("/proc/sys/" + name.replace(".", "/")) as f:
        return f.read().strip()


@needs_root
@pytest.mark.parametrize("copy_on_write", [True, False])
def test_host_sysctls_cannot_be_written(leak_check, copy_on_write: bool) -> None:
    """Root inside is host uid 0 (the identity map), and /proc/sys checks the uid only: it
    is read-only inside, and the read-only mount cannot be made read-write."""
    before = _sysctl("vm.swappiness")
    other = "61" if before != "61" else "62"
    script = (f"echo {other} > /proc/sys/vm/swappiness; echo write=$?; "
              "mount -o remount,bind,rw /proc/sys; echo remount=$?; "
              "umount -l /proc/sys; echo umount=$?; "
              f"echo {other} > /proc/sys/vm/swappiness; echo again=$?")
    r = Sandbox(Spec(copy_on_write=copy_on_write)).run(["sh", "-c", script])
    assert r.returncode == 0, r.stderr
    lines = dict(line.split("=") for line in r.stdout.decode().split())
    assert lines["write"] != "0" and lines["remount"] != "0" and lines["umount"] != "0" and lines["again"] != "0"
    assert b"Read-only file system" in r.stderr
    assert _sysctl("vm.swappiness") == before


@pytest.mark.parametrize("copy_on_write", [True, False])
def test_read_only_root_cannot_be_remounted_or_unmounted(leak_check, tmp_path, copy_on_write: bool) -> None:
    """The mounts that make the root are locked: a read-only root stays read-only, and what
    covers the host cannot be unmounted to reach it."""
    sentinel = tmp_path / "sentinel"
    script = (f"mount -o remount,bind,rw /; echo remount=$?; umount -l /; echo umount=$?; "
              f"touch {sentinel}; echo touch=$?")
    r = Sandbox(Spec(copy_on_write=copy_on_write)).run(["sh", "-c", script])
    assert r.returncode == 0, r.stderr
    lines = dict(line.split("=") for line in r.stdout.decode().split())
    assert lines["umount"] != "0"
    if not copy_on_write:
        assert lines["remount"] != "0", r.stderr  # (the copy-on-write root is writable anyway)
    assert not sentinel.exists()  # written copy-on-write (gone with the sandbox), or refused


@pytest.fixture
def run_lock() -> None:
    from pytest_incarnate.cgroups import Run

    Run.current()  # held for the process's lifetime: opened before leak_check counts fds


@needs_root
def test_no_descriptor_to_the_host_cgroups(run_lock, leak_check) -> None:
    """A sandboxed call with limits holds no fd into the cgroup filesystem (from one to its
    v2 directory, the host's root cgroup.procs is a few '..' away)."""

    def cgroup_fds() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if "cgroup" in target:
                out.append(f"{fd} -> {target}")
        return out

    assert Sandbox(Spec(memory="256M", pids=64)).call(cgroup_fds) == []


def test_env_of_the_spec_applies_to_a_call(leak_check) -> None:
    env = Sandbox(Spec(env={"ONLY": "this"})).call(lambda: dict(os.environ))
    assert env == {"ONLY": "this"}


TIOCSTI_CHILD = textwrap.dedent(
    """
    import fcntl, json, os, sys, termios
    from pytest_incarnate import Sandbox

    # This process: a session leader whose controlling terminal is the pty on fd 0.
    def push():
        try:
            fcntl.ioctl(0, termios.TIOCSTI, b"x")
            return "pushed"
        except OSError as e:
            return os.strerror(e.errno)

    def dev_tty():
        try:
            os.close(os.open("/dev/tty", os.O_RDWR))
            return "opened"
        except OSError as e:
            return os.strerror(e.errno)

    out = {"outside": push(), "inside": Sandbox().call(push), "dev_tty": Sandbox().call(dev_tty)}
    print(json.dumps(out))
    """
)


def test_tiocsti_cannot_push_input_into_the_callers_terminal(tmp_path, leak_check) -> None:
    """The sandboxed call runs in a session of its own: the caller's terminal is not its
    controlling terminal, so TIOCSTI is refused and /dev/tty cannot be opened."""
    import json
    import pty

    legacy = "/proc/sys/dev/tty/legacy_tiocsti"
    if os.path.exists(legacy) and open(legacy).read().strip() == "0" and not ROOT:
        pytest.skip("TIOCSTI is disabled on this machine (dev.tty.legacy_tiocsti = 0)")
    script = tmp_path / "tiocsti.py"
    script.write_text(TIOCSTI_CHILD)
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([PY, str(script)], stdin=slave, capture_output=True,
                              start_new_session=True, timeout=60,
                              preexec_fn=lambda: __import__("fcntl").ioctl(0, __import__("termios").TIOCSCTTY, 0))
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0, proc.stderr.decode()
    got = json.loads(proc.stdout)
    assert got["outside"] == "pushed"  # the attempt works where it is allowed
    assert got["inside"] == os.strerror(errno.EPERM)
    assert got["dev_tty"] == os.strerror(errno.ENXIO)


# ---------------------------------------------------------------------------------------
# The escape suite.  Each way out is tried from a sandboxed program (Sandbox.run/spawn) and
# a sandboxed call (Sandbox.call), as root and, where the threat differs, as an unprivileged
# caller (uid 65534 through setpriv), and wherever it can be the same attempt is made
# outside the sandbox first, to show that it works there (so that the test could fail).
#
# A payload is the text of a Python script for Debian's /usr/bin/python3 (uid 1000 and uid
# 65534 cannot run root's pyenv Python under /root).  It reads its arguments from ARGS and
# talks to the test in JSON lines: say(obj) sends one, hear() waits for one.  The same text
# runs as a program (stdin and stdout are the channel), as a call (exec'd in the forked
# child, with two pipes of the caller as the channel), and on the host (the demonstration).

SYSTEM_PY = "/usr/bin/python3"
NOBODY = 65534
LINE_TIMEOUT = 60.0  # a deadline against a hang; never used to wait for something to happen
CALLERS = ["root-run", "root-call", "nobody-run", "nobody-call"]
libc = ctypes.CDLL(None, use_errno=True)

PRELUDE = """\
import json as _json, sys as _sys
ARGS = _json.loads(_sys.argv[1])
def say(obj):
    _sys.stdout.write(_json.dumps(obj) + "\\n")
    _sys.stdout.flush()
def hear():
    line = _sys.stdin.readline()
    if not line:
        raise SystemExit("the test went away")
    return _json.loads(line)
"""


def payload_call(script: str, args: Any, rfd: int, wfd: int) -> None:
    """What a sandboxed call runs: ``script`` in this (forked) process, ``rfd``/``wfd`` as
    its channel.  (Copied for the unprivileged driver, so it imports nothing of the tests.)"""
    import json
    import os

    inp = os.fdopen(os.dup(rfd), "r")

    def say(obj: Any) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(wfd, data):]

    def hear() -> Any:
        line = inp.readline()
        if not line:
            raise SystemExit("the test went away")
        return json.loads(line)

    exec(compile(script, "<payload>", "exec"), {"__name__": "__payload__", "ARGS": args, "say": say, "hear": hear})


# The unprivileged caller: runs one payload on the host, as a program or as a call, with its
# own stdin and stdout as the channel, then says how it ended in a last "__final__" line.
DRIVER = r'''
import json, os, sys, traceback
cfg = json.loads(sys.argv[1])
final = {}
try:
    from pytest_incarnate import PIPE, Sandbox, Spec
    where, script, args = cfg["where"], cfg["script"], cfg["args"]
    if where == "host":
        sys.argv[1:] = [json.dumps(args)]
        exec(compile(cfg["prelude"] + script, "<payload>", "exec"), {"__name__": "__payload__"})
        final = {"ok": True}
    elif where == "run":
        h = Sandbox(Spec(**cfg["spec"])).spawn([sys.executable, "-c", cfg["prelude"] + script, json.dumps(args)],
                                               stderr=PIPE)
        _, err = h.communicate()
        final = {"ok": h.returncode == 0, "returncode": h.returncode, "stderr": err.decode(errors="replace"),
                 "degradations": [type(d).__name__ for d in h.degradations]}
    else:
        import esc_helper
        out = Sandbox(Spec(**cfg["spec"])).call_outcome(esc_helper.payload_call, script, args, 0, 1)
        final = {"ok": out.kind == "ok", "kind": out.kind, "value": repr(out.value),
                 "degradations": [type(d).__name__ for d in out.plan.degradations]}
except BaseException as e:
    final = {"ok": False, "error": repr(e), "traceback": traceback.format_exc()}
sys.stdout.write(json.dumps({"__final__": final}) + "\n")
sys.stdout.flush()
'''


class Nobody:
    """A world-readable copy of the package (with the driver) that uid 65534 can import."""

    def __init__(self, top: str) -> None:
        self.top = top
        self.env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": top, "PYTHONDONTWRITEBYTECODE": "1",
                    "LANG": "C.UTF-8"}
        self.driver = os.path.join(top, "driver.py")


@pytest.fixture(scope="module")
def nobody():
    """As test_unprivileged.py does it: the package copied under /var/tmp for Debian's
    python3 (which has cffi), run through setpriv as uid/gid 65534."""
    if not ROOT:
        pytest.skip("switching to uid 65534 needs root")
    if not os.access(SYSTEM_PY, os.X_OK) or shutil.which("setpriv") is None:
        pytest.skip(f"{SYSTEM_PY} or setpriv is missing")
    if subprocess.run([SYSTEM_PY, "-c", "import cffi, _cffi_backend"], capture_output=True).returncode != 0:
        pytest.skip(f"{SYSTEM_PY} has no cffi (apt-get install python3-cffi)")
    src = os.path.dirname(os.path.abspath(pytest_incarnate.__file__))
    top = tempfile.mkdtemp(prefix="incarnate-esc-unpriv-", dir="/var/tmp")
    try:
        shutil.copytree(src, os.path.join(top, "pytest_incarnate"), ignore=shutil.ignore_patterns("__pycache__"))
        with open(os.path.join(top, "driver.py"), "w") as f:
            f.write(DRIVER)
        with open(os.path.join(top, "esc_helper.py"), "w") as f:
            f.write("from typing import Any\n\n" + inspect.getsource(payload_call))
        # Byte-compiled once here (uid 65534 cannot write the cache): each start is faster.
        subprocess.run([SYSTEM_PY, "-m", "compileall", "-q", top], check=True, capture_output=True)
        for dirpath, _, filenames in os.walk(top):
            os.chmod(dirpath, 0o755)
            for n in filenames:
                p = os.path.join(dirpath, n)
                os.chmod(p, stat.S_IMODE(os.stat(p).st_mode) | 0o444)
        yield Nobody(top)
    finally:
        shutil.rmtree(top)


class Talk:
    """The test's end of one payload's channel (see ``start``)."""

    def __init__(self, rfd: int, wfd: int, finish: Any, what: str) -> None:
        self.rfd, self.wfd = rfd, wfd
        self._finish = finish
        self._buf = b""
        self._final: dict[str, Any] | None = None
        self.what = what

    def recv(self, timeout: float = LINE_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.rfd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"{self.what}: no line from the payload in {timeout} s")
            chunk = os.read(self.rfd, 65536)
            if not chunk:
                raise AssertionError(f"{self.what}: the payload ended without a line: {self.finish()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        obj = json.loads(line)
        if isinstance(obj, dict) and "__final__" in obj:
            self._buf = line + b"\n" + self._buf  # (for finish)
            raise AssertionError(f"{self.what}: the payload ended without a line: {self.finish()}")
        return obj

    def send(self, obj: Any) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(self.wfd, data):]

    def finish(self) -> dict[str, Any]:
        """Wait for the end; how it ended ("ok" is True for a clean end)."""
        if self._final is None:
            self._final = self._finish(self)
        return self._final

    def __enter__(self) -> Talk:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.finish()


def start(caller: str, script: str, args: Any, spec: dict[str, Any] | None = None,
          nobody: Nobody | None = None, cwd: str | None = None, pass_fds: tuple[int, ...] = (),
          prefix: tuple[str, ...] = ()) -> Talk:
    """Start ``script`` as ``caller``: "<who>-<where>", who = root (this process) or nobody
    (uid 65534, through the driver), where = host (no sandbox), run (a sandboxed program)
    or call (a sandboxed call).  ``spec``: Spec keywords (JSON for the driver).
    ``pass_fds``: given to the program on the host or in the sandbox, or to the driver.
    ``prefix``: a command that runs the payload (or the driver) on the host, e.g. unshare."""
    who, where = caller.split("-")
    spec = dict(spec or {})
    spec.setdefault("timeout", 2 * LINE_TIMEOUT)  # a hung payload is killed with its sandbox
    if who == "nobody":
        assert nobody is not None
        cfg = {"where": where, "script": script, "args": args, "spec": spec, "prelude": PRELUDE}
        proc = subprocess.Popen(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *prefix, SYSTEM_PY, nobody.driver,
             json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd or nobody.top,
            env=nobody.env, pass_fds=pass_fds)

        def finish_nobody(t: Talk) -> dict[str, Any]:
            proc.stdin.close()
            rest = t._buf + proc.stdout.read()
            err = proc.stderr.read().decode(errors="replace")
            proc.wait()
            for f in (proc.stdout, proc.stderr):
                f.close()
            for line in rest.splitlines():
                obj = json.loads(line)
                if isinstance(obj, dict) and "__final__" in obj:
                    return obj["__final__"]
            return {"ok": False, "error": f"the driver ended ({proc.returncode}) without a final line", "stderr": err}

        return Talk(proc.stdout.fileno(), proc.stdin.fileno(), finish_nobody, caller)
    argv = [SYSTEM_PY, "-c", PRELUDE + script, json.dumps(args)]
    if where == "host":
        proc = subprocess.Popen([*prefix, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=cwd, pass_fds=pass_fds)

        def finish_host(t: Talk) -> dict[str, Any]:
            proc.stdin.close()
            proc.stdout.read()
            err = proc.stderr.read().decode(errors="replace")
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            return {"ok": proc.returncode == 0, "returncode": proc.returncode, "stderr": err}

        return Talk(proc.stdout.fileno(), proc.stdin.fileno(), finish_host, caller)
    sandbox = Sandbox(Spec(**spec))
    if where == "run":
        h = sandbox.spawn(argv, stdin=PIPE, stdout=PIPE, stderr=PIPE, pass_fds=pass_fds)

        def finish_run(t: Talk) -> dict[str, Any]:
            _, err = h.communicate(timeout=LINE_TIMEOUT)
            return {"ok": h.returncode == 0, "returncode": h.returncode, "stderr": (err or b"").decode(errors="replace"),
                    "degradations": [type(d).__name__ for d in h.degradations]}

        return Talk(h.stdout.fileno(), h.stdin.fileno(), finish_run, caller)
    assert where == "call"
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["outcome"] = sandbox.call_outcome(payload_call, script, args, in_r, out_w)
        except BaseException as e:
            box["error"] = e
        finally:
            os.close(out_w)  # the payload's copy is gone with it: EOF for recv

    thread = threading.Thread(target=body, daemon=True)
    thread.start()

    def finish_call(t: Talk) -> dict[str, Any]:
        os.close(in_w)
        thread.join(2 * LINE_TIMEOUT)
        os.close(in_r)
        os.close(out_r)
        if "error" in box:
            return {"ok": False, "error": repr(box["error"])}
        out = box["outcome"]
        return {"ok": out.kind == "ok", "kind": out.kind, "value": repr(out.value),
                "degradations": [type(d).__name__ for d in out.plan.degradations]}

    return Talk(out_r, in_w, finish_call, caller)


def one_answer(caller: str, script: str, args: Any, **kw: Any) -> Any:
    """Run a payload that says one thing; that thing (the run must end cleanly)."""
    with start(caller, script, args, **kw) as t:
        got = t.recv()
    end = t.finish()
    assert end["ok"], f"{caller}: {end}"
    return got


@pytest.fixture
def host_dir():
    """A fresh host directory under /var/tmp (the sandboxes replace /tmp), removed after."""
    d = tempfile.mkdtemp(prefix="incarnate-esc-", dir="/var/tmp")
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- 1. writing a host file ---------------------------------------------------------------

WRITE_PAYLOAD = r'''
import ctypes, errno, os, stat
A = ARGS
S, TOKEN, tag = A["sentinel"], b"escaped\n", A["tag"]
D = os.path.dirname(S)
demo = A["demo"]  # on the host: after each attempt, see whether the sentinel changed, and restore it
libc = ctypes.CDLL(None, use_errno=True)
R = {}

def fingerprint(path):
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            return (f.read(), st.st_mode, st.st_mtime_ns, tuple(os.listxattr(path)))
    except OSError:
        return None

ORIGINAL = {p: fingerprint(p) for p in (S, A["shm_file"], A["run_file"])}

def restore(path, fp):
    with open(path, "wb") as f:
        f.write(fp[0])
    os.chmod(path, stat.S_IMODE(fp[1]))
    for x in os.listxattr(path):
        os.removexattr(path, x)
    os.utime(path, ns=(fp[2], fp[2]))

def write(path, flags=os.O_TRUNC):
    fd = os.open(path, os.O_WRONLY | flags, 0o644)
    try:
        os.write(fd, TOKEN)
    finally:
        os.close(fd)

def attempt(name, fn, on_host=True):
    if demo and not on_host:
        return
    made = []
    try:
        fn(made.append)
        R[name] = "ok"
    except OSError as e:
        R[name] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        for p in made:
            try:
                os.unlink(p)
            except OSError:
                pass
    if demo:
        for path, fp in ORIGINAL.items():
            if fp is not None and fingerprint(path) != fp:
                R[name] = "changed"
                restore(path, fp)

def link_then_write(where, make):
    def go(mark):
        p = os.path.join(where, f"esc-{tag}-{len(R)}")
        make(p)
        mark(p)
        write(p)
    return go

def via_cwd(mark):
    os.chdir(D)
    try:
        write("/proc/self/cwd/" + os.path.basename(S))
    finally:
        os.chdir("/")

def every_root(mark):
    n = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                write(f"/proc/{pid}/root{S}")
                n += 1
            except OSError:
                pass
    if not n:
        raise OSError(errno.ENOENT, "no /proc/<pid>/root led anywhere")

def rename_over(mark):
    p = os.path.join(D, f".esc-{tag}")
    with open(p, "wb") as f:
        f.write(TOKEN)
    mark(p)
    os.rename(p, S)

class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 128)]

def by_handle(mark):
    # The "shocker" way out: open_by_handle_at with a handle made on the host, through a
    # descriptor of the same filesystem (the bind); it needs CAP_DAC_READ_SEARCH on the host.
    raw = bytes.fromhex(A["handle"][1])
    fh = FileHandle(len(raw), A["handle"][0])
    ctypes.memmove(fh.f_handle, raw, len(raw))
    mfd = os.open(A["handle_mount"], os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = libc.open_by_handle_at(mfd, ctypes.byref(fh), os.O_WRONLY | os.O_TRUNC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        os.write(fd, TOKEN)
        os.close(fd)
    finally:
        os.close(mfd)

def mknod_disk(mark):
    p = f"/tmp/esc-{tag}-disk"
    os.mknod(p, stat.S_IFBLK | 0o600, A["dev"])
    mark(p)  # never opened: a raw write to the host's disk would corrupt it
    raise OSError(0, "created")

bind = A["bind_view"]  # D/bound, bound elsewhere in the sandbox (on the host: D/bound itself)
attempt("direct", lambda m: write(S))
attempt("append", lambda m: write(S, os.O_APPEND))
attempt("truncate", lambda m: os.truncate(S, 0))
attempt("open-by-handle", by_handle)  # (before rename-over: the handle names this inode)
attempt("proc-self-root", lambda m: write("/proc/self/root" + S))
attempt("proc-1-root", lambda m: write("/proc/1/root" + S), on_host=False)  # (the host's pid 1 is not ours)
attempt("proc-parent-root", lambda m: write(f"/proc/{os.getppid()}/root{S}"))  # inside: the sandbox's init
attempt("proc-every-root", every_root, on_host=False)  # (on the host: every process's root, not ours to touch)
attempt("proc-self-cwd", via_cwd)
attempt("symlink-in-tmp", link_then_write("/tmp", lambda p: os.symlink(S, p)))
attempt("symlink-in-dev-shm", link_then_write("/dev/shm", lambda p: os.symlink(S, p)))
attempt("symlink-in-run", link_then_write("/run", lambda p: os.symlink(S, p)))
attempt("symlink-beside", link_then_write(D, lambda p: os.symlink(os.path.basename(S), p)))
attempt("hardlink-beside", link_then_write(D, lambda p: os.link(S, p)))
attempt("hardlink-in-tmp", link_then_write("/tmp", lambda p: os.link(S, p)))
attempt("hardlink-in-bind", link_then_write(bind, lambda p: os.link(S, p)))
attempt("dotdot-from-bind", lambda m: write(bind + "/../" + os.path.basename(S)))
attempt("dotdots-from-bind", lambda m: write(bind + "/.." * 12 + S))
attempt("symlink-in-bind-abs", lambda m: write(bind + "/abs"))   # made on the host: -> the sentinel
attempt("symlink-in-bind-rel", lambda m: write(bind + "/rel"))   # made on the host: -> ../sentinel
attempt("rename-over", rename_over)
attempt("chmod", lambda m: os.chmod(S, 0o600))
attempt("utime", lambda m: os.utime(S, (0, 0)))
attempt("setxattr", lambda m: os.setxattr(S, "user.escape", b"1"))
attempt("mknod-host-disk", mknod_disk, on_host=False)
attempt("dev-shm-file", lambda m: write(A["shm_file"], os.O_CREAT | os.O_TRUNC))
attempt("run-file", lambda m: write(A["run_file"], os.O_CREAT | os.O_TRUNC))
attempt("proc-parent-root-dev-shm-file", lambda m: write(f"/proc/{os.getppid()}/root" + A["shm_file"]))
attempt("unlink", lambda m: os.unlink(S))  # last: the sandbox's view has no sentinel after it
say(R)
'''

# What each caller can do to its own file outside a sandbox: uid 65534 cannot write in /run,
# open_by_handle_at needs CAP_DAC_READ_SEARCH, and its parent on the host is the (root) test
# process, whose /proc/<pid>/root it may not follow.
ROOT_ONLY_ON_HOST = {"symlink-in-run", "open-by-handle", "proc-parent-root", "proc-parent-root-dev-shm-file"}
CHANGES_ON_HOST = {
    "direct", "append", "truncate", "proc-self-root", "proc-parent-root", "proc-self-cwd", "symlink-in-tmp",
    "symlink-in-dev-shm", "symlink-in-run", "symlink-beside", "hardlink-beside", "hardlink-in-tmp",
    "hardlink-in-bind", "dotdot-from-bind", "dotdots-from-bind", "symlink-in-bind-abs", "symlink-in-bind-rel", "rename-over", "chmod",
    "utime", "setxattr", "open-by-handle", "dev-shm-file", "run-file", "proc-parent-root-dev-shm-file", "unlink",
}


def file_handle(path: str) -> tuple[int, str]:
    """name_to_handle_at(path): the handle's type and bytes (hex)."""

    class FileHandle(ctypes.Structure):
        _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 128)]

    fh = FileHandle(128, 0)
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, path.encode(), ctypes.byref(fh), ctypes.byref(mount_id), 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes]).hex()


def _host_fingerprint(path: str) -> tuple[Any, ...] | None:
    try:
        st = os.lstat(path)
        with open(path, "rb") as f:
            content = f.read()
        return (content, st.st_ino, st.st_nlink, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                st.st_ctime_ns, tuple(os.listxattr(path)))
    except FileNotFoundError:
        return None


class Sentinels:
    """A sentinel file in a host directory D (with D/bound to bind, holding two symlinks
    to it), one in the host's /dev/shm and one in its /run; all owned by ``uid``."""

    def __init__(self, top: str, name: str, uid: int) -> None:
        self.dir = os.path.join(top, name)
        self.file = os.path.join(self.dir, "sentinel")
        self.bound = os.path.join(self.dir, "bound")
        tag = f"{os.getpid()}-{name}"
        self.shm_file = f"/dev/shm/incarnate-esc-{tag}"
        self.run_file = f"/run/incarnate-esc-{tag}"
        os.mkdir(self.dir)
        os.mkdir(self.bound)
        for p in (self.file, self.shm_file, self.run_file):
            with open(p, "w") as f:
                f.write(f"host file {p}\n")
        os.symlink(self.file, os.path.join(self.bound, "abs"))
        os.symlink("../sentinel", os.path.join(self.bound, "rel"))
        for p in (self.dir, self.bound, self.file, self.shm_file, self.run_file):
            os.lchown(p, uid, uid)
            os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
        self.before = self.state()

    def state(self) -> dict[str, Any]:
        return {
            "files": {p: _host_fingerprint(p) for p in (self.file, self.shm_file, self.run_file)},
            "dir": sorted(os.listdir(self.dir)),
            "bound": sorted(os.listdir(self.bound)),
        }

    def remove(self) -> None:
        for p in (self.shm_file, self.run_file):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def args(self, demo: bool, bind_view: str) -> dict[str, Any]:
        return {"sentinel": self.file, "shm_file": self.shm_file, "run_file": self.run_file, "demo": demo,
                "tag": str(os.getpid()), "bind_view": bind_view, "handle": list(file_handle(self.file)),
                "handle_mount": bind_view, "dev": os.stat(self.file).st_dev}


@needs_root
@pytest.mark.parametrize("caller", CALLERS)
def test_host_file_cannot_be_written_through_any_path(leak_check, host_dir, request, caller: str) -> None:
    """A sentinel in a host directory (under /var/tmp, which the sandbox sees through its
    copy-on-write root) is written through every path to it: directly, through
    /proc/{self,1,every pid}/root and /proc/self/cwd, symlinks and hard links made in /tmp,
    /dev/shm, /run and beside it, `..` out of a bind of its subdirectory and symlinks in
    that bind, rename over it, metadata, open_by_handle_at with a handle made on the host, a
    device node of the host's disk; and files of the host's /dev/shm and /run.  Outside a
    sandbox, each one that can be tried there changes the host's file (a second sentinel,
    restored after each); inside, many "succeed" on the sandbox's copy, and the host's files
    do not change.  (As uid 65534, the sentinel's directory is the caller's working
    directory: a tree it owns, so copy-on-write as well.)"""
    who, where = caller.split("-")
    nobody = request.getfixturevalue("nobody") if who == "nobody" else None
    uid = NOBODY if who == "nobody" else 0
    demo, inside = Sentinels(host_dir, "demo", uid), Sentinels(host_dir, "inside", uid)
    try:
        # Outside, the same attempts, one by one (the payload restores the file after each).
        got = one_answer(f"{who}-host", WRITE_PAYLOAD, demo.args(True, demo.bound), nobody=nobody, cwd=demo.dir)
        expected = CHANGES_ON_HOST - (ROOT_ONLY_ON_HOST if who == "nobody" else set())
        assert {k for k, v in got.items() if v == "changed"} == expected, got
        # Inside: D/bound is bound at V/view (a directory of its own beside D).
        view = os.path.join(host_dir, "view")
        os.mkdir(view)
        os.mkdir(os.path.join(view, "view"))
        spec = {"binds": [[inside.bound, os.path.join(view, "view"), "rw"]]}
        got = one_answer(caller, WRITE_PAYLOAD, inside.args(False, os.path.join(view, "view")), spec=spec,
                         nobody=nobody, cwd=inside.dir)
        assert inside.state() == inside.before, got
        assert not any(v == "changed" for v in got.values()), got
        assert got["open-by-handle"] == "EPERM" and got["mknod-host-disk"] == "EPERM", got
        assert got["dotdot-from-bind"] == "ENOENT", got  # `..` of the bind is its mount point's parent
        assert got["hardlink-in-tmp"] == "EXDEV" and got["hardlink-in-bind"] == "EXDEV", got
    finally:
        demo.remove()
        inside.remove()


# --- 2. chdir through the descriptors it has ------------------------------------------------

FD_PAYLOAD = r'''
import errno, os, stat
A = ARGS
ours = {tuple(x) for x in A["ours"]}  # (dev, ino) of the test's host directories
R = {}
def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))
for n in sorted(int(x) for x in os.listdir("/proc/self/fd")):
    try:
        st = os.fstat(n)
    except OSError:
        continue  # the listing's own descriptor, closed by now
    entry = {"dir": stat.S_ISDIR(st.st_mode), "dev": st.st_dev, "ino": st.st_ino}
    for how, go in (("chdir", lambda: os.chdir(f"/proc/self/fd/{n}")), ("fchdir", lambda: os.fchdir(n))):
        try:
            go()
            entry[how] = "ok"
        except OSError as e:
            entry[how] = err(e)
            continue
        try:
            here = os.stat(".")
            if (here.st_dev, here.st_ino) in ours and how == "chdir":
                # A host directory: create a file in it, rewrite a file beside it, walk up.
                try:
                    os.close(os.open(f"escaped-{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
                    entry["create"] = "ok"
                except OSError as e:
                    entry["create"] = err(e)
                try:
                    fd = os.open("../sentinel", os.O_WRONLY | os.O_TRUNC)
                    os.write(fd, b"escaped\n")
                    os.close(fd)
                    entry["up"] = "ok"
                except OSError as e:
                    entry["up"] = err(e)
                top = os.stat("/".join([".."] * 40))
                entry["host_root"] = [top.st_dev, top.st_ino] == A["host_root"]
        finally:
            os.chdir("/")
    R[str(n)] = entry
say(R)
'''


def _fd_table() -> dict[int, tuple[bool, int, int]]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue
        out[int(name)] = (stat.S_ISDIR(st.st_mode), st.st_dev, st.st_ino)
    return out


def _host_devs() -> set[int]:
    devs = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            major, minor = line.split()[2].split(":")
            devs.add(os.makedev(int(major), int(minor)))
    return devs


@needs_root
@pytest.mark.parametrize("caller", CALLERS)
def test_chdir_through_every_descriptor(leak_check, host_dir, request, caller: str) -> None:
    """The payload tries chdir("/proc/self/fd/N") and fchdir(N) for every descriptor it has,
    and through a host directory it reaches: a file made there, a file beside it rewritten
    through "..", the host's root reached by walking up.  The caller first opens three host
    directories (plain, O_CLOEXEC, O_PATH).

    - A sandboxed program (Sandbox.run) has 0, 1 and 2 only, none a directory: nothing.
      Outside, the same program given the directories escapes through each.
    - A sandboxed call keeps the caller's descriptors (the documented limitation,
      docs/security.md): through each directory the caller held, the payload writes on the
      host and walks up to the host's root.  That is the only way: every other descriptor
      refuses chdir (ENOTDIR), and the only directory the sandbox adds is its own upper
      layers (a filesystem the host does not have mounted)."""
    who, where = caller.split("-")
    nobody = request.getfixturevalue("nobody") if who == "nobody" else None
    uid = NOBODY if who == "nobody" else 0
    sentinel = os.path.join(host_dir, "sentinel")
    with open(sentinel, "w") as f:
        f.write("host\n")
    dirs = [os.path.join(host_dir, n) for n in ("plain", "cloexec", "opath")]
    for p in [*dirs, sentinel]:
        if not os.path.exists(p):
            os.mkdir(p)
        os.chown(p, uid, uid)
    root = os.stat("/")
    fds = [os.open(dirs[0], os.O_RDONLY | os.O_DIRECTORY), os.open(dirs[1], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC),
           os.open(dirs[2], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
    args = {"ours": [[os.fstat(fd).st_dev, os.fstat(fd).st_ino] for fd in fds], "host_root": [root.st_dev, root.st_ino]}

    def made() -> list[str]:
        return sorted(os.path.relpath(os.path.join(d, n), host_dir) for d in dirs for n in os.listdir(d))

    try:
        # Outside: the same program, given the descriptors, escapes through each one.
        got = one_answer(f"{who}-host", FD_PAYLOAD, args, nobody=nobody, pass_fds=tuple(fds))
        through = {int(n) for n, e in got.items() if e.get("create") == "ok" and e.get("up") == "ok" and e["host_root"]}
        assert len(through) == 3, got
        assert open(sentinel).read() == "escaped\n" and len(made()) == 3
        for d in dirs:
            for n in os.listdir(d):
                os.unlink(os.path.join(d, n))
        with open(sentinel, "w") as f:
            f.write("host\n")

        caller_fds = _fd_table()
        # (uid 65534's driver is given the descriptors: it is the caller that holds them.)
        got = one_answer(caller, FD_PAYLOAD, args, nobody=nobody, pass_fds=tuple(fds) if who == "nobody" else ())
        inside = {int(n): e for n, e in got.items()}
        if where == "run":
            # Only 0, 1 and 2 (pipes and /dev/null), whatever the caller had open.
            assert sorted(inside) == [0, 1, 2], got
            assert all(e["chdir"] == "ENOTDIR" and e["fchdir"] == "ENOTDIR" for e in inside.values()), got
            assert made() == [] and open(sentinel).read() == "host\n"
            if who == "root":
                # A descriptor handed over with pass_fds is the caller's choice, and it is
                # a way out like any other: the same program escapes through it.
                got = one_answer(caller, FD_PAYLOAD, args, pass_fds=(fds[0],))
                assert [e.get("create") for e in got.values() if e.get("create")] == ["ok"], got
                assert made() == ["plain/escaped-" + next(n for n, e in got.items() if e.get("create"))]
            return
        # A call: the documented limitation.  Through each directory the caller held, the
        # payload wrote on the host and reached the host's root.
        ours = {(os.fstat(fd).st_dev, os.fstat(fd).st_ino) for fd in fds}
        escaped = {n for n, e in inside.items() if e.get("create") == "ok"}
        assert {(inside[n]["dev"], inside[n]["ino"]) for n in escaped} == ours, got
        assert all(inside[n]["up"] == "ok" and inside[n]["host_root"] for n in escaped), got
        assert sorted(os.path.dirname(p) for p in made()) == ["cloexec", "opath", "plain"], got
        assert open(sentinel).read() == "escaped\n"
        # ... and that is the only way: every descriptor that allows chdir is a directory of
        # the caller's, or on a filesystem the host has not mounted (the sandbox's upper
        # layers); every other one refuses.
        host_devs = _host_devs()
        for n, e in inside.items():
            if e["chdir"] != "ok":
                assert e["chdir"] == e["fchdir"] == "ENOTDIR" and not e["dir"], (n, e)
                continue
            assert e["dir"] and e["fchdir"] == "ok", (n, e)
            if who == "root":
                theirs = caller_fds.get(n)
                assert (theirs is not None and theirs == (True, e["dev"], e["ino"])) or e["dev"] not in host_devs, (n, e)
            else:
                assert (e["dev"], e["ino"]) in ours or e["dev"] not in host_devs, (n, e)
    finally:
        for fd in fds:
            os.close(fd)


# --- 3. seeing or signalling host processes ---------------------------------------------------

PID_PAYLOAD = r'''
import ctypes, errno, os, signal
A = ARGS
libc = ctypes.CDLL(None, use_errno=True)
R = {"pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), "me": os.getpid()}

def attempt(name, fn, on_host=True):
    if A["demo"] and not on_host:
        return
    try:
        fn()
        R[name] = "ok"
    except OSError as e:
        R[name] = errno.errorcode.get(e.errno, str(e.errno))

def check(r):
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r

def ptrace_attach(pid):
    check(libc.ptrace(16, pid, None, None))  # PTRACE_ATTACH
    os.waitpid(pid, 0x40000000)  # __WALL: the stop
    check(libc.ptrace(17, pid, None, None))  # PTRACE_DETACH

def fresh_proc(pid):
    # A proc mounted now would show the pid namespace of whoever mounts it (the kernel
    # refuses it here anyway, EPERM: the sandbox's /proc has read-only binds over parts).
    where = "/tmp/esc-proc"
    os.mkdir(where)
    try:
        check(libc.mount(b"proc", where.encode(), b"proc", 0, None))
        try:
            os.stat(f"{where}/{pid}")
        finally:
            libc.umount2(where.encode(), 2)
    finally:
        os.rmdir(where)

for who in ("host", "caller"):
    H = A[who]
    attempt(f"{who}:kill-0", lambda: os.kill(H, 0))
    attempt(f"{who}:pidfd_open", lambda: os.close(os.pidfd_open(H)))
    attempt(f"{who}:proc-entry", lambda: os.stat(f"/proc/{H}"))
    attempt(f"{who}:proc-status", lambda: open(f"/proc/{H}/status").read())
    attempt(f"{who}:getpgid", lambda: os.getpgid(H))
    attempt(f"{who}:getsid", lambda: os.getsid(H))
    attempt(f"{who}:getpriority", lambda: os.getpriority(os.PRIO_PROCESS, H))
    attempt(f"{who}:sched_getaffinity", lambda: os.sched_getaffinity(H))
    attempt(f"{who}:ptrace-attach", lambda: ptrace_attach(H), on_host=who == "host")
    attempt(f"{who}:fresh-proc", lambda: fresh_proc(H), on_host=False)
    if who == "host":  # (not the caller: were it to work, the test run would die instead of failing)
        attempt(f"{who}:kill-KILL", lambda: os.kill(H, signal.SIGKILL), on_host=False)
say(R)
'''
PID_ATTEMPTS = ["kill-0", "pidfd_open", "proc-entry", "proc-status", "getpgid", "getsid", "getpriority",
                "sched_getaffinity", "ptrace-attach", "fresh-proc", "kill-KILL"]


@needs_root
@pytest.mark.parametrize("caller", CALLERS)
def test_host_processes_cannot_be_seen_or_signalled(leak_check, request, caller: str) -> None:
    """A host process started by the test (as the caller's user) and the calling process
    itself: outside, kill(pid, 0), pidfd_open, /proc/<pid>, getpgid, getsid, getpriority,
    sched_getaffinity and ptrace attach all reach the host process.  Inside, /proc lists
    only the sandbox's processes (its init and the payload), and every one of those calls,
    a proc mounted afresh, and SIGKILL answer ESRCH/ENOENT: the host process lives on."""
    who, where = caller.split("-")
    nobody = request.getfixturevalue("nobody") if who == "nobody" else None
    as_caller = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if who == "nobody" else []
    host = subprocess.Popen([*as_caller, "cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        args = {"host": host.pid, "caller": os.getpid(), "demo": True}
        got = one_answer(f"{who}-host", PID_PAYLOAD, args, nobody=nobody)
        assert {k for k, v in got.items() if k.startswith("host:") and v == "ok"} == {
            f"host:{a}" for a in PID_ATTEMPTS if a not in ("fresh-proc", "kill-KILL")}, got

        got = one_answer(caller, PID_PAYLOAD, {**args, "demo": False}, nobody=nobody)
        assert got["me"] == 2 and got["pids"] == [1, 2], got
        for target in ("host", "caller"):
            for a in PID_ATTEMPTS if target == "host" else PID_ATTEMPTS[:-1]:
                expected = {"proc-entry": {"ENOENT"}, "proc-status": {"ENOENT"}, "fresh-proc": {"EPERM", "ENOENT"}}
                assert got[f"{target}:{a}"] in expected.get(a, {"ESRCH"}), (target, a, got)
        assert host.poll() is None, "the host process was killed from inside"
    finally:
        host.stdin.close()
        host.wait()


# --- 4. reaching servers on the host's loopback and on a test host ---------------------------

# A test server: TCP and UDP on each address (ephemeral ports), "pong" to every client, the
# number of clients served on request ("count" on stdin); EOF ends it.
NET_SERVER = r'''
import json, select, socket, sys
socks = {}
for addr in json.loads(sys.argv[1]):
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    for proto, kind in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
        s = socket.socket(fam, kind)
        s.bind((addr, 0))
        if proto == "tcp":
            s.listen(16)
        socks[s] = f"{proto} {addr} {s.getsockname()[1]}"
hits = {key: 0 for key in socks.values()}
print(json.dumps(sorted(hits)), flush=True)
while True:
    ready, _, _ = select.select([sys.stdin, *socks], [], [])
    for s in ready:
        if s is sys.stdin:
            if not sys.stdin.readline():
                sys.exit(0)
            print(json.dumps(hits), flush=True)
        elif s.type == socket.SOCK_STREAM:
            c, _ = s.accept()
            c.sendall(b"pong")
            c.close()
            hits[socks[s]] += 1
        else:
            _, peer = s.recvfrom(64)
            s.sendto(b"pong", peer)
            hits[socks[s]] += 1
'''

NET_PAYLOAD = r'''
import errno, os, socket
R = {}
for key in ARGS["targets"]:
    proto, addr, port = key.split()
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(10)  # a deadline only: refused and unreachable come back at once
    try:
        s.connect((addr, int(port)))
        if proto == "udp":
            s.send(b"ping")
        R[key] = s.recv(16).decode()
    except socket.timeout:
        R[key] = "timeout"
    except OSError as e:
        R[key] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
# Joining the test host's network namespace instead (the last attempt: on the host it works).
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
for name, path in (("netns-file", ARGS["netns_file"]), ("server-ns", f"/proc/{ARGS['server_pid']}/ns/net")):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                e = ctypes.get_errno()
                raise OSError(e, os.strerror(e))
            R[name] = "ok"
        finally:
            os.close(fd)
    except OSError as e:
        R[name] = errno.errorcode.get(e.errno, str(e.errno))
say(R)
'''


def _is_mount_point(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def _route_dev(addr: str) -> str:
    out = subprocess.run(["ip", "-o", "route", "get", addr], capture_output=True, text=True).stdout.split()
    return out[out.index("dev") + 1] if "dev" in out else ""


class NetBed:
    def __init__(self) -> None:
        n = os.getpid()
        self.ns = f"incarnate-esc-{n}"
        self.veth = f"iesc{n % 100000}h"
        self.peer = f"iesc{n % 100000}p"
        x = n % 250 + 1
        self.v4 = (f"10.231.{x}.1", f"10.231.{x}.2")
        self.v6 = (f"fd00:e5c:0:{x:x}::1", f"fd00:e5c:0:{x:x}::2")
        self.servers: list[tuple[subprocess.Popen[str], list[str]]] = []

    def ip(self, *args: str, ns: bool = False) -> None:
        argv = ["ip", "netns", "exec", self.ns, "ip", *args] if ns else ["ip", *args]
        subprocess.run(argv, check=True, capture_output=True, text=True)

    def server(self, addrs: list[str], in_ns: bool) -> tuple[subprocess.Popen[str], list[str]]:
        argv = [SYSTEM_PY, "-c", NET_SERVER, json.dumps(addrs)]
        if in_ns:
            argv = ["ip", "netns", "exec", self.ns, *argv]
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.servers.append((proc, []))
        keys = json.loads(proc.stdout.readline())  # bound and listening
        self.servers[-1] = (proc, keys)
        return proc, keys

    @staticmethod
    def count(proc: subprocess.Popen[str]) -> dict[str, int]:
        proc.stdin.write("count\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())


@pytest.fixture(scope="module")
def test_net():
    """A test host: a network namespace of our own (ip netns add) joined to the host by a
    veth pair, with private addresses (10.231.x.0/30, fd00:e5c:0:x::/64), running a server;
    and a server on the host's loopback (127.0.0.1, ::1).  All of it removed afterwards."""
    if not ROOT or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    net = NetBed()
    netns_dir_was_mount = _is_mount_point("/run/netns")
    netns_dir_existed = os.path.isdir("/run/netns")
    try:
        net.ip("netns", "add", net.ns)
        net.ip("link", "add", net.veth, "type", "veth", "peer", "name", net.peer)
        net.ip("link", "set", net.peer, "netns", net.ns)
        net.ip("addr", "add", f"{net.v4[0]}/30", "dev", net.veth)
        net.ip("-6", "addr", "add", f"{net.v6[0]}/64", "dev", net.veth, "nodad")
        net.ip("link", "set", net.veth, "up")
        net.ip("addr", "add", f"{net.v4[1]}/30", "dev", net.peer, ns=True)
        net.ip("-6", "addr", "add", f"{net.v6[1]}/64", "dev", net.peer, "nodad", ns=True)
        net.ip("link", "set", net.peer, "up", ns=True)
        # Traffic goes only where we put it: the test host's addresses route through our veth.
        for addr in (net.v4[1], net.v6[1]):
            assert _route_dev(addr) == net.veth, f"{addr} does not route through {net.veth}: not using it"
        net.remote = net.server([net.v4[1], net.v6[1]], in_ns=True)
        net.loopback = net.server(["127.0.0.1", "::1"], in_ns=False)
        yield net
    finally:
        for proc, _ in net.servers:
            proc.stdin.close()
            try:
                proc.wait(LINE_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        subprocess.run(["ip", "netns", "del", net.ns], capture_output=True)  # takes the peer, and so the pair
        subprocess.run(["ip", "link", "del", net.veth], capture_output=True)  # (gone already, normally)
        if not netns_dir_was_mount and _is_mount_point("/run/netns") and not os.listdir("/run/netns"):
            libc.umount2(b"/run/netns", 2)  # ip netns add made it a mount point: ours to undo
            if not netns_dir_existed:
                os.rmdir("/run/netns")


@needs_root
@pytest.mark.parametrize("caller", CALLERS)
def test_host_and_test_host_servers_cannot_be_reached(test_net, leak_check, request, caller: str) -> None:
    """TCP and UDP servers on the host's 127.0.0.1 and ::1, and on a test host in a network
    namespace the test made (10.231.x.2, fd00:e5c:0:x::2 behind a veth pair): from the host
    each answers, and its network namespace can be joined (by root).  From the sandbox
    (only a loopback of its own): loopback servers are refused (ECONNREFUSED), the test host
    has no route (ENETUNREACH), the namespace cannot be opened (/run is hidden, the server's
    pid does not exist inside), and no server counted a client."""
    who, where = caller.split("-")
    nobody = request.getfixturevalue("nobody") if who == "nobody" else None
    (remote, remote_keys), (loop, loop_keys) = test_net.remote, test_net.loopback
    args = {"targets": remote_keys + loop_keys, "netns_file": f"/run/netns/{test_net.ns}", "server_pid": remote.pid}
    before = {**test_net.count(remote), **test_net.count(loop)}
    got = one_answer(f"{who}-host", NET_PAYLOAD, args, nobody=nobody)
    assert {k: got[k] for k in args["targets"]} == {k: "pong" for k in args["targets"]}, got
    joined = {"netns-file": "ok", "server-ns": "ok"} if who == "root" else {"netns-file": "EPERM", "server-ns": "EACCES"}
    assert {k: got[k] for k in joined} == joined, got
    after_demo = {**test_net.count(remote), **test_net.count(loop)}
    assert after_demo == {k: v + 1 for k, v in before.items()}

    got = one_answer(caller, NET_PAYLOAD, args, nobody=nobody)
    for key in remote_keys:
        assert got[key] == "ENETUNREACH", (key, got)
    for key in loop_keys:
        assert got[key] == "ECONNREFUSED", (key, got)
    assert got["netns-file"] == "ENOENT" and got["server-ns"] == "ENOENT", got
    assert {**test_net.count(remote), **test_net.count(loop)} == after_demo  # nothing reached a server


# --- 5. connecting to the host's unix sockets --------------------------------------------------

UNIX_SERVER = r'''
import json, os, select, socket, sys
socks = {}
for key, path in json.loads(sys.argv[1]):
    kind = socket.SOCK_DGRAM if key.endswith("dgram") else socket.SOCK_STREAM
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind("\0" + path[1:] if path.startswith("@") else path)
    if not path.startswith("@"):
        os.chmod(path, 0o777)  # any caller may connect: only the sandbox stands in the way
    if kind == socket.SOCK_STREAM:
        s.listen(16)
    socks[s] = key
hits = {key: 0 for key in socks.values()}
print(json.dumps(sorted(hits)), flush=True)
while True:
    ready, _, _ = select.select([sys.stdin, *socks], [], [])
    for s in ready:
        if s is sys.stdin:
            if not sys.stdin.readline():
                sys.exit(0)
            print(json.dumps(hits), flush=True)
        elif s.type == socket.SOCK_STREAM:
            c, _ = s.accept()
            c.sendall(b"pong")
            c.close()
            hits[socks[s]] += 1
        else:
            s.recv(64)
            hits[socks[s]] += 1
'''

UNIX_PAYLOAD = r'''
import errno, socket
R = {}
for key, path in ARGS["targets"]:
    addr = "\0" + path[1:] if path.startswith("@") else path
    dgram = key.endswith("dgram")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM if dgram else socket.SOCK_STREAM)
    s.settimeout(10)  # a deadline only
    try:
        if dgram:
            s.sendto(b"ping", addr)
            R[key] = "sent"
        else:
            s.connect(addr)
            R[key] = s.recv(16).decode()
    except socket.timeout:
        R[key] = "timeout"
    except OSError as e:
        R[key] = errno.errorcode.get(e.errno, str(e.errno))
    finally:
        s.close()
say(R)
'''


@needs_root
@pytest.mark.parametrize("caller", CALLERS)
def test_host_unix_sockets(leak_check, host_dir, request, caller: str) -> None:
    """Unix sockets of the host (stream and datagram): in a directory the sandbox sees
    copy-on-write (the sentinel directory under /var/tmp: for uid 65534 its own tree), an
    abstract one, and one under /run.  From the host each answers; from the sandbox the
    copy-on-write path and the abstract name are refused (ECONNREFUSED: another inode,
    another network namespace) and /run is hidden (ENOENT).

    Documented ways through (docs/security.md, "Binds"), asserted as such: a socket under a
    bind, and one in the host's tree under a read-only root (uid 65534's root outside its own
    trees; root's with copy_on_write=False), can be connected to, and the host's server
    answers."""
    who, where = caller.split("-")
    nobody = request.getfixturevalue("nobody") if who == "nobody" else None
    uid = NOBODY if who == "nobody" else 0
    own = os.path.join(host_dir, "own")  # copy-on-write inside (uid 65534: its working directory)
    bound = os.path.join(host_dir, "bound")  # bound into the sandbox at the same path
    other = os.path.join(host_dir, "other")  # root's: read-only for uid 65534, copy-on-write for root
    for d, owner in ((own, uid), (bound, uid), (other, 0)):
        os.mkdir(d)
        os.chown(d, owner, owner)
    tag = f"incarnate-esc-{os.getpid()}-{caller}"
    targets = [["cow", f"{own}/s"], ["cow-dgram", f"{own}/d"], ["abstract", f"@{tag}"],
               ["abstract-dgram", f"@{tag}-d"], ["run", f"/run/{tag}.sock"], ["bind", f"{bound}/s"],
               ["bind-dgram", f"{bound}/d"], ["other", f"{other}/s"], ["other-dgram", f"{other}/d"]]
    server = subprocess.Popen([SYSTEM_PY, "-c", UNIX_SERVER, json.dumps(targets)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def count() -> dict[str, int]:
        server.stdin.write("count\n")
        server.stdin.flush()
        return json.loads(server.stdout.readline())

    try:
        assert len(json.loads(server.stdout.readline())) == len(targets)  # listening
        args = {"targets": targets}
        got = one_answer(f"{who}-host", UNIX_PAYLOAD, args, nobody=nobody, cwd=own)
        assert got == {k: "sent" if k.endswith("dgram") else "pong" for k, _ in targets}, got
        demo = count()
        assert demo == {k: 1 for k, _ in targets}

        spec = {"binds": [bound]}
        got = one_answer(caller, UNIX_PAYLOAD, args, spec=spec, nobody=nobody, cwd=own)
        through = {"bind": "pong", "bind-dgram": "sent"}  # documented: a socket under a bind
        if who == "nobody":
            through |= {"other": "pong", "other-dgram": "sent"}  # documented: under a read-only root
        shut = {"cow": "ECONNREFUSED", "cow-dgram": "ECONNREFUSED", "abstract": "ECONNREFUSED",
                "abstract-dgram": "ECONNREFUSED", "run": "ENOENT",
                "other": "ECONNREFUSED", "other-dgram": "ECONNREFUSED"}
        assert got == {k: through.get(k, shut.get(k)) for k, _ in targets}, got
        now = count()
        assert now == {k: demo[k] + (k in through) for k, _ in targets}, (now, got)  # and nothing else arrived

        if caller == "root-run":
            # Root's read-only root (copy_on_write=False): the host's own sockets (documented).
            got = one_answer(caller, UNIX_PAYLOAD, args, spec={"copy_on_write": False})
            assert {k for k, v in got.items() if v in ("pong", "sent")} == {"cow", "cow-dgram", "other", "other-dgram",
                                                                            "bind", "bind-dgram"}, got
    finally:
        server.stdin.close()
        server.wait()
        server.stdout.close()
        try:
            os.unlink(f"/run/{tag}.sock")
        except FileNotFoundError:
            pass


# --- 7. moving out of its cgroup -------------------------------------------------------------

CGROUP_PAYLOAD = r'''
import ctypes, errno, os
A = ARGS
libc = ctypes.CDLL(None, use_errno=True)
R = {}

def err(e):
    return errno.errorcode.get(e.errno, str(e.errno))

def write(path, data="0"):
    with open(path, "w") as f:
        f.write(data)

def attempt(name, fn):
    try:
        fn()
        R[name] = "ok"
    except OSError as e:
        R[name] = err(e)

def check(r):
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

if A["demo"]:
    say({"pid": os.getpid()})
    hear()  # moved into a cgroup of the test's own by now
roots = {"v1": A["v1"], "v2": A["v2"]}
for v, root in roots.items():
    attempt(f"{v}:procs", lambda: write(f"{root}/cgroup.procs"))
    attempt(f"{v}:procs-by-pid", lambda: write(f"{root}/cgroup.procs", str(os.getpid())))
    if v == "v1":
        attempt(f"{v}:tasks", lambda: write(f"{root}/tasks"))
if not A["demo"]:
    for v, root in roots.items():
        attempt(f"{v}:proc-self-root", lambda: write(f"/proc/self/root{root}/cgroup.procs"))
        attempt(f"{v}:proc-1-root", lambda: write(f"/proc/1/root{root}/cgroup.procs"))
        # Every cgroup.procs of the hierarchy as the sandbox sees it (the host's, read-only).
        def every():
            errs = set()
            for d, _, files in os.walk(root):
                if "cgroup.procs" in files:
                    try:
                        write(f"{d}/cgroup.procs")
                        raise OSError(0, f"wrote {d}/cgroup.procs")
                    except OSError as e:
                        errs.add(err(e))
            if errs != {"EROFS"}:
                raise OSError(errno.EIO, f"{sorted(errs)}")
            raise OSError(errno.EROFS, "all refused")
        attempt(f"{v}:every-procs", every)
        # A bind of the hierarchy made writable, or the read-only mount taken away.
        def rebind():
            where = f"/tmp/esc-{v}-bind"
            os.mkdir(where)
            check(libc.mount(root.encode(), where.encode(), None, 4096, None))  # MS_BIND
            try:
                check(libc.mount(None, where.encode(), None, 32 | 4096, None))  # MS_REMOUNT|MS_BIND: rw
                write(f"{where}/cgroup.procs")
            finally:
                libc.umount2(where.encode(), 2)
        attempt(f"{v}:bind-remount-rw", rebind)
        attempt(f"{v}:remount-rw", lambda: check(libc.mount(None, root.encode(), None, 32 | 4096, None)))
        attempt(f"{v}:umount", lambda: check(libc.umount2(root.encode(), 2)))
        # A fresh mount of the hierarchy: its root is the cgroup namespace's, the sandbox's
        # own cgroup; writing there moves the payload where it already is.
        def fresh():
            where = f"/tmp/esc-{v}-fresh"
            os.mkdir(where)
            fs, opts = (b"cgroup", b"pids") if v == "v1" else (b"cgroup2", None)
            check(libc.mount(b"none", where.encode(), fs, 0, opts))
            try:
                write(f"{where}/cgroup.procs")
                R[f"{v}:fresh-parent"] = os.path.samestat(os.stat(where), os.stat(f"{where}/.."))
            finally:
                libc.umount2(where.encode(), 2)
        attempt(f"{v}:fresh-mount", fresh)
    # The v1 release agent runs as root on the host: written with its current value.
    attempt("v1:release_agent", lambda: write(f"{roots['v1']}/release_agent", A["release_agent"]))
say(R)
hear()  # the test looks at this process's cgroups from the host meanwhile
'''


def _cgroup_roots() -> tuple[str, str]:
    v1 = v2 = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, opts = right.split()[:3]
            if fstype == "cgroup" and "pids" in opts.split(","):
                v1 = v1 or left.split()[4]
            elif fstype == "cgroup2":
                v2 = v2 or left.split()[4]
    if v1 is None or v2 is None:
        pytest.skip("needs a v1 pids hierarchy and a cgroup2 one (as here)")
    return v1, v2


def _cgroups_of(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, ctrls, path = line.rstrip("\n").split(":", 2)
            out["v2" if ctrls == "" else ctrls] = path
    return out


def _sandbox_pids() -> list[int]:
    """Host pids of this process's descendants that are pid 1 or 2 of a pid namespace."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
        except (OSError, ValueError):
            continue
    descendants, todo = [], [os.getpid()]
    while todo:
        for c in children.get(todo.pop(), []):
            descendants.append(c)
            todo.append(c)
    out = []
    for p in sorted(descendants):
        try:
            with open(f"/proc/{p}/status") as f:
                nspid = next(line.split()[1:] for line in f if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if len(nspid) > 1 and nspid[-1] in ("1", "2"):
            out.append(p)
    return out


@needs_root
@pytest.mark.parametrize("caller", ["root-run", "root-call"])
def test_payload_cannot_leave_its_cgroup(run_lock, leak_check, caller: str) -> None:
    """With Spec(pids=64) the sandbox has cgroups (v1 pids, and a v2 group).  Outside, a
    process in a cgroup of the test's own moves itself to the root cgroup by writing 0 into
    the root's cgroup.procs (v1 and v2).  Inside, every way is refused: the root's
    cgroup.procs/tasks directly, through /proc/self/root and /proc/1/root, every cgroup.procs
    of both hierarchies, a bind remounted read-write, a remount or an unmount of the
    read-only mount (locked); the v1 release agent cannot be written; a fresh cgroup mount
    shows only the sandbox's own cgroup.  Seen from the host while the payload still runs,
    its processes (init and payload) are in the sandbox's cgroups.  (Uid 65534 gets no
    cgroup and cannot write cgroup.procs outside either: not a threat that differs.)"""
    v1, v2 = _cgroup_roots()
    with open(f"{v1}/release_agent") as f:
        agent = f.read() or "\n"
    args = {"v1": v1, "v2": v2, "release_agent": agent}
    # Outside: the same writes move a process (ours, in a cgroup of ours) to the root.
    demo_dirs = [f"{v1}/esc-demo-{os.getpid()}", f"{v2}/esc-demo-{os.getpid()}"]
    try:
        with start("root-host", CGROUP_PAYLOAD, {**args, "demo": True}) as t:
            pid = t.recv()["pid"]
            for d in demo_dirs:
                os.mkdir(d)
                with open(f"{d}/cgroup.procs", "w") as f:
                    f.write(str(pid))
            demo = os.path.basename(demo_dirs[0])
            assert _cgroups_of(pid)["pids"] == f"/{demo}" and _cgroups_of(pid)["v2"] == f"/{demo}"
            t.send("go")
            got = t.recv()
            assert set(got.values()) == {"ok"}, got
            assert _cgroups_of(pid)["pids"] == "/" and _cgroups_of(pid)["v2"] == "/"
            t.send("done")
        assert t.finish()["ok"], t.finish()
    finally:
        for d in demo_dirs:
            if os.path.isdir(d):
                os.rmdir(d)

    with start(caller, CGROUP_PAYLOAD, {**args, "demo": False}, spec={"pids": 64}) as t:
        got = t.recv()
        inside = _sandbox_pids()
        groups = {p: _cgroups_of(p) for p in inside}
        with open(f"{v1}/cgroup.procs") as f:
            in_v1_root = {int(x) for x in f.read().split()}
        with open(f"{v2}/cgroup.procs") as f:
            in_v2_root = {int(x) for x in f.read().split()}
        t.send("done")
    assert t.finish()["ok"], t.finish()
    refused = {k: v for k, v in got.items() if not k.endswith("fresh-parent") and not k.endswith("fresh-mount")}
    for k, v in refused.items():
        # (/proc/1/root: in a call, the init is not dumpable, so even its root is refused.)
        expected = {"remount-rw": {"EPERM"}, "umount": {"EPERM", "EINVAL"}, "bind-remount-rw": {"EPERM"},
                    "proc-1-root": {"EROFS", "EACCES"}}
        assert v in expected.get(k.split(":")[1], {"EROFS"}), (k, v, got)
    # A fresh mount, when the kernel grants it, is rooted at the sandbox's own cgroup.
    for v in ("v1", "v2"):
        assert got[f"{v}:fresh-mount"] in ("ok", "EPERM", "EBUSY"), got
        if got[f"{v}:fresh-mount"] == "ok":
            assert got[f"{v}:fresh-parent"] is False, got
    assert len(inside) == 2, (inside, groups)  # the sandbox's init and the payload
    pids_paths = {g["pids"] for g in groups.values()}
    v2_paths = {g["v2"] for g in groups.values()}
    assert len(pids_paths) == 1 and len(v2_paths) == 1, groups
    assert re.fullmatch(r".*/incarnate-[0-9a-f-]+/sb-\d+", pids_paths.pop()), groups
    assert re.fullmatch(r".*/incarnate-[0-9a-f-]+/sb-\d+", v2_paths.pop()), groups
    assert not (set(inside) & (in_v1_root | in_v2_root)), (inside, groups)


LIMITS_PAYLOAD = r'''
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
R = {}
# A fresh mount of each v1 hierarchy: its root is the cgroup namespace's root, that is the
# sandbox's own cgroup, with the limit files the parent wrote; they belong to uid 0.
for ctrl, name, value in (("pids", "pids.max", "max"), ("memory", "memory.memsw.limit_in_bytes", "1073741824"),
                          ("memory", "memory.limit_in_bytes", "1073741824"), ("cpu", "cpu.cfs_quota_us", "-1")):
    where = f"/tmp/esc-{ctrl}"
    os.makedirs(where, exist_ok=True)
    if not os.path.ismount(where) and libc.mount(b"none", where.encode(), b"cgroup", 0, ctrl.encode()) != 0:
        R[name] = "mount:" + errno.errorcode[ctypes.get_errno()]
        continue
    try:
        if os.path.exists(f"{where}/{name}"):
            with open(f"{where}/{name}", "w") as f:
                f.write(value)
            R[name] = "ok"
        else:
            R[name] = "absent"
    except OSError as e:
        R[name] = errno.errorcode[e.errno]
# Then as many processes as it likes (the limit is 16).
r, w = os.pipe()
children = []
for _ in range(40):
    try:
        pid = os.fork()
    except OSError as e:
        R["fork"] = errno.errorcode[e.errno]
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    children.append(pid)
R["forked"] = len(children)
say(R)
hear()  # the test reads the sandbox's limits from the host meanwhile
os.close(w)
for pid in children:
    os.waitpid(pid, 0)
'''


@needs_root
@pytest.mark.parametrize("caller", ["root-run", "root-call"])
def test_payload_cannot_raise_its_cgroup_limits(run_lock, leak_check, caller: str) -> None:
    """Spec(pids=16, memory="256M", cpu_quota=0.5): the payload mounts the v1 pids, memory
    and cpu hierarchies afresh in /tmp and writes "no limit" into its own limit files, then
    forks 40 processes.  The limits must hold: the writes refused, the files seen from the
    host unchanged, at most 16 processes."""
    v1, _ = _cgroup_roots()
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, opts = right.split()[:3]
            for c in ("memory", "cpu"):
                if fstype == "cgroup" and c in opts.split(",") and c not in mounts:
                    mounts[c] = left.split()[4]
    mounts["pids"] = v1
    with start(caller, LIMITS_PAYLOAD, {}, spec={"pids": 16, "memory": "256M", "cpu_quota": 0.5}) as t:
        got = t.recv()
        payload = _sandbox_pids()
        groups = _cgroups_of(payload[-1])
        seen = {}
        for c, name in (("pids", "pids.max"), ("memory", "memory.limit_in_bytes"), ("cpu", "cpu.cfs_quota_us")):
            with open(f"{mounts[c]}{groups[c]}/{name}") as f:
                seen[name] = f.read().strip()
        t.send("done")
    assert t.finish()["ok"], t.finish()
    assert seen == {"pids.max": "16", "memory.limit_in_bytes": str(256 << 20), "cpu.cfs_quota_us": "50000"}, (seen, got)
    assert got["forked"] <= 16, got
    assert all(v != "ok" for k, v in got.items() if k not in ("forked", "fork")), got


@needs_root
def test_payload_cannot_leave_cgroups_behind(run_lock, leak_check) -> None:
    """The payload of a Sandbox with limits tries to mount its pids hierarchy afresh and make a
    child cgroup there (refused: see test_payload_cannot_raise_its_cgroup_limits).  When it
    ends, the sandbox ends as usual and leaves no cgroup."""
    from pytest_incarnate import cgroups

    hierarchy = cgroups.Hierarchy.detect()
    run_dirs = [os.path.join(d, cgroups.RUN_PREFIX + cgroups.Run.current().id)
                for d in [*hierarchy.v1.values(), hierarchy.v2] if d]
    before = {d: set(os.listdir(d)) if os.path.isdir(d) else set() for d in run_dirs}
    script = "mkdir -p /tmp/cg && mount -t cgroup -o pids none /tmp/cg && mkdir /tmp/cg/child && echo made || echo refused"
    try:
        r = Sandbox(Spec(pids=64)).run(["sh", "-c", script])
        # The cgroup namespace belongs to a more privileged user namespace: no cgroupfs mount.
        assert r.stdout == b"refused\n", r
        left = {d: sorted(set(os.listdir(d)) - before[d]) for d in run_dirs if os.path.isdir(d)}
        assert not any(left.values()), left
    finally:
        for d in run_dirs:  # what the sandbox left: the child cgroup, then the sandbox's own
            for sb in (set(os.listdir(d)) - before[d]) if os.path.isdir(d) else ():
                for dirpath, _, _ in sorted(os.walk(os.path.join(d, sb)), key=lambda w: -len(w[0])):
                    os.rmdir(dirpath)


# --- 8. set-user-ID and file capabilities ------------------------------------------------------

EUID_C = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void)
{
    char line[256], cap[64] = "?";
    FILE *f = fopen("/proc/self/status", "r");
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "CapEff:", 7) == 0)
            sscanf(line + 7, "%63s", cap);
    printf("%d %d %s\n", (int)getuid(), (int)geteuid(), cap);
    return 0;
}
"""

SUID_PAYLOAD = r'''
import os, subprocess
status = {l.split(":")[0]: l.split()[1] for l in open("/proc/self/status") if l.startswith(("NoNewPrivs", "CapEff"))}
R = {"uid": os.getuid(), "nnp": status["NoNewPrivs"], "caps": status["CapEff"]}
for name, path in ARGS["programs"].items():
    try:
        R[name] = subprocess.run([path], capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError) as e:
        R[name] = repr(e)
say(R)
'''

# CAP_DAC_OVERRIDE (1) and CAP_SETUID (7), permitted and effective, in a security.capability
# xattr (struct vfs_cap_data, revision 2).
FILE_CAPS = (1 << 1) | (1 << 7)


@pytest.fixture
def privileged_programs(host_dir):
    """A tiny program that prints its uid, euid and effective capabilities, twice: set-user-ID
    root, and with file capabilities; in a host directory, removed afterwards."""
    import struct

    if not ROOT or shutil.which("cc") is None:
        pytest.skip("needs root and a C compiler")
    src = os.path.join(host_dir, "euid.c")
    with open(src, "w") as f:
        f.write(EUID_C)
    suid, fcaps = os.path.join(host_dir, "suid"), os.path.join(host_dir, "fcaps")
    subprocess.run(["cc", "-O", "-o", suid, src], check=True, capture_output=True)
    shutil.copy(suid, fcaps)
    os.chown(suid, 0, 0)
    os.chmod(suid, 0o4755)
    os.chmod(fcaps, 0o755)
    os.setxattr(fcaps, "security.capability", struct.pack("<IIIII", 0x02000001, FILE_CAPS, 0, 0, 0))
    try:
        yield {"suid": suid, "fcaps": fcaps}
    finally:
        for p in (suid, fcaps):
            os.unlink(p)  # (host_dir goes too)


@needs_root
@pytest.mark.parametrize("caller", CALLERS)
def test_setuid_and_file_capabilities_grant_nothing(leak_check, privileged_programs, request, caller: str) -> None:
    """Outside, uid 1000 (and uid 65534) running the set-user-ID root program gets euid 0,
    and the program with file capabilities gets CAP_DAC_OVERRIDE and CAP_SETUID.  Inside,
    with no_new_privs (NoNewPrivs: 1), the same programs -- through the copy-on-write root
    and through a read-only bind -- run with the payload's own ids and no capabilities: as
    uid 1000 in root's sandbox (Spec(uid=1000, gid=1000)), as uid 65534 in its own
    (map_user="self").  Root's sandbox with no_new_privs=False shows that nothing else
    stands in the way: there the set-user-ID program does get euid 0."""
    who, where = caller.split("-")
    nobody = request.getfixturevalue("nobody") if who == "nobody" else None
    progs = privileged_programs
    host_dir = os.path.dirname(progs["suid"])
    uid = 1000 if who == "root" else NOBODY
    caps = f"{FILE_CAPS:016x}"
    # Outside.
    for prog, expected in (("suid", [str(uid), "0"]), ("fcaps", [str(uid), str(uid), caps])):
        out = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", progs[prog]],
                             capture_output=True, text=True, check=True).stdout.split()
        assert out[: len(expected)] == expected, (prog, out)
    # Inside.
    programs = {**progs, "suid-bound": "/tmp/esc/suid", "fcaps-bound": "/tmp/esc/fcaps"}
    spec: dict[str, Any] = {"binds": [[host_dir, "/tmp/esc", "ro"]]}
    spec |= {"uid": 1000, "gid": 1000} if who == "root" else {"map_user": "self"}
    got = one_answer(caller, SUID_PAYLOAD, {"programs": programs}, spec=spec, nobody=nobody)
    assert got["uid"] == uid and got["nnp"] == "1", got
    for name in programs:
        assert got[name][:2] == [str(uid), str(uid)], (name, got)
        # No capability beyond the payload's own: none, but for a call with map_user="self",
        # which keeps every capability over its user namespace (documented) and so may
        # pass the file's on to the program (the kernel's no_new_privs rule).
        assert int(got[name][2], 16) & ~int(got["caps"], 16) == 0, (name, got)
        if caller != "nobody-call":
            assert got["caps"] == got[name][2] == "0000000000000000", (name, got)
    if caller == "root-run":
        got = one_answer(caller, SUID_PAYLOAD, {"programs": programs}, spec={**spec, "no_new_privs": False})
        assert got["nnp"] == "0" and got["suid"][:2] == ["1000", "0"] and got["suid-bound"][:2] == ["1000", "0"], got


# --- 9. mounts and propagation ------------------------------------------------------------------

MOUNT_PAYLOAD = r'''
import ctypes, errno, os
A = ARGS
D = A["dir"]
libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MS_REC, MS_SHARED = 4096, 16384, 1 << 20
R = {}

def check(r):
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

def attempt(name, fn):
    try:
        fn()
        R[name] = "ok"
    except OSError as e:
        R[name] = errno.errorcode.get(e.errno, str(e.errno))

def tmpfs(where):
    os.makedirs(where, exist_ok=True)
    check(libc.mount(b"tmpfs", where.encode(), b"tmpfs", 0, None))

say("ready")
hear()  # the host has mounted a tmpfs with a marker on D/hostmnt meanwhile
R["sees-host-mount"] = os.path.exists(f"{D}/hostmnt/marker")
attempt("mount-in-dir", lambda: tmpfs(f"{D}/inner"))
if not A["demo"]:
    attempt("make-dir-shared", lambda: check(libc.mount(None, D.encode(), None, MS_SHARED, None)))
    attempt("mount-in-shared-dir", lambda: tmpfs(f"{D}/inner2"))
    attempt("make-root-rshared", lambda: check(libc.mount(None, b"/", None, MS_REC | MS_SHARED, None)))
    attempt("mount-in-tmp", lambda: tmpfs("/tmp/esc-tmpfs"))
    def rbind():
        os.makedirs("/tmp/esc-root", exist_ok=True)
        check(libc.mount(b"/", b"/tmp/esc-root", None, MS_BIND | MS_REC, None))
    attempt("rbind-root", rbind)
    for p in ("/proc/sys", "/sys/fs/cgroup", "/sys", "/dev", "/run", "/tmp", D, "/"):
        attempt(f"umount {p}", lambda: check(libc.umount2(p.encode(), 2)))  # MNT_DETACH
say(R)
hear()
'''


def _mountinfo() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return set(f.read().splitlines())


@needs_root
@pytest.mark.parametrize("caller", CALLERS)
def test_mounts_do_not_propagate_either_way(leak_check, host_dir, request, caller: str) -> None:
    """A host directory D is made a shared mount on the host and bound into the sandbox
    (read-write).  While the payload runs, the host mounts a tmpfs with a marker on
    D/hostmnt; the payload looks for the marker, then mounts tmpfs (in D, in D after making
    its D shared, in /tmp), makes / rshared, binds /, and unmounts /proc/sys,
    /sys/fs/cgroup, /sys, /dev, /run, /tmp, D and /.  The host's mount table (this
    process's mountinfo) gains only the host's own mount, and the payload never sees it
    (the sandbox's mounts are private).  Outside, a mount namespace that keeps the host's
    propagation (unshare --propagation unchanged; uid 65534: in a user namespace too) sees
    the host's mount, and root's mount there appears on the host."""
    who, where = caller.split("-")
    nobody = request.getfixturevalue("nobody") if who == "nobody" else None
    D = os.path.join(host_dir, "shared")
    for p in (D, f"{D}/inner", f"{D}/inner2", f"{D}/hostmnt"):
        os.mkdir(p)
        os.chmod(p, 0o755)
    mounted: list[str] = []

    def mount(src: bytes | None, target: str, fstype: bytes | None, flags: int) -> None:
        if libc.mount(src, target.encode(), fstype, flags, None) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), target)
        if target not in mounted:
            mounted.append(target)

    def host_mount_with_marker() -> None:
        mount(b"tmpfs", f"{D}/hostmnt", b"tmpfs", 0)
        with open(f"{D}/hostmnt/marker", "w") as f:
            f.write("host\n")

    def umount(target: str) -> None:
        libc.umount2(target.encode(), 2)
        mounted.remove(target)

    try:
        mount(D.encode(), D, None, 4096)  # MS_BIND: D is a mount point ...
        mount(None, D, None, 1 << 20)  # ... and shared
        # Outside: a mount namespace keeping the host's propagation.
        unshare = ("unshare", "--mount", "--propagation", "unchanged")
        if who == "nobody":
            unshare = ("unshare", "--user", "--map-root-user", "--mount", "--propagation", "unchanged")
        with start(f"{who}-host", MOUNT_PAYLOAD, {"dir": D, "demo": True}, nobody=nobody, prefix=unshare) as t:
            assert t.recv() == "ready"
            host_mount_with_marker()
            t.send("check")
            got = t.recv()
            assert got["sees-host-mount"] is True and got["mount-in-dir"] == "ok", got
            # Root's namespace shares D with the host: its mount is the host's too.
            assert _is_mount_point(f"{D}/inner") is (who == "root"), got
            if who == "root":
                libc.umount2(f"{D}/inner".encode(), 2)
            umount(f"{D}/hostmnt")
            t.send("bye")
        assert t.finish()["ok"], t.finish()

        before = _mountinfo()
        with start(caller, MOUNT_PAYLOAD, {"dir": D, "demo": False}, spec={"binds": [D]}, nobody=nobody) as t:
            assert t.recv() == "ready"
            host_mount_with_marker()
            ours = _mountinfo() - before
            t.send("check")
            got = t.recv()
            after = _mountinfo()
            t.send("bye")
        assert t.finish()["ok"], t.finish()
        assert got["sees-host-mount"] is False, got
        assert got["mount-in-dir"] == "ok", got  # inside, in the sandbox's own mount namespace
        assert after == before | ours and len(ours) == 1, (after ^ before, got)
        assert not _is_mount_point(f"{D}/inner") and not _is_mount_point(f"{D}/inner2")
        assert all(got[f"umount {p}"] in ("EINVAL", "EPERM") for p in ("/proc/sys", "/sys/fs/cgroup", "/sys", "/dev",
                                                                        "/run", "/tmp", D, "/")), got
    finally:
        for target in reversed(mounted):
            libc.umount2(target.encode(), 2)


# --- 10. a bind's path swapped for a symlink during setup --------------------------------------

SWAPPER = r'''
import ctypes, os, select, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = sys.argv[1].encode(), sys.argv[2].encode()
print("ready", flush=True)
n = 0
while True:
    if libc.renameat2(-100, a, -100, b, 2) != 0:  # AT_FDCWD, RENAME_EXCHANGE: always one or the other
        sys.exit(f"renameat2: {os.strerror(ctypes.get_errno())}")
    n += 1
    if n % 64 == 0 and select.select([sys.stdin], [], [], 0)[0]:
        break
print(n, flush=True)
'''
MARKER = "marker-only-in-the-real-directory"


# 1,000 setups take about 40 s per case here (the swapper keeps a CPU busy): 200 in CI,
# 1,000 with --reliability-full.
RACE_SETUPS = 200


def _setups(request: pytest.FixtureRequest) -> int:
    return 1000 if request.config.getoption("--reliability-full", default=False) else RACE_SETUPS


@needs_root
@pytest.mark.parametrize("swapped", [
    "target",
    "source",
])
def test_bind_path_swapped_for_a_symlink(leak_check, host_dir, request, swapped: str) -> None:
    """Setups (many; --reliability-full: 1,000) while another process swaps a path between
    a directory holding a marker and a symlink to /etc (renameat2 RENAME_EXCHANGE, so it is
    always one of the two).  "target": the path is where a Bind goes (the C core walks it
    refusing symlinks, ELOOP); "source": the path is the Bind's source.  Each setup either
    binds the directory (the marker is there, from inside) or fails with a typed error;
    none binds /etc or covers the sandbox's /etc.  A source is resolved once, in the parent
    when the sandbox starts, following the symlinks it has then (as bwrap does: a source
    that is a symlink to /etc binds /etc); the child then opens that path refusing any
    symlink, so a swap after the resolution is ELOOP, and a swap during it is a typed
    SpecError, never a bare OSError.  (As root: binds are resolved the same way
    for every caller, and what uid 65534 binds it could read anyway.)"""
    n = _setups(request)
    real = os.path.join(host_dir, "real")
    path = os.path.join(host_dir, "path")
    alt = os.path.join(host_dir, "alt")
    for d in (real, path):
        os.mkdir(d)
        with open(os.path.join(d, MARKER), "w"):
            pass
    os.symlink("/etc", alt)
    if swapped == "target":
        bind = Bind(real, path, readonly=True)
        probe = (f"grep -q ' /etc ' /proc/self/mountinfo && echo etc-covered; test -e /etc/{MARKER} && echo etc-covered; "
                 "test -e /etc/passwd || echo etc-covered; echo dir")
    else:
        bind = Bind(path, "/tmp/esc-bound", readonly=True)
        probe = f"test -e /tmp/esc-bound/{MARKER} && echo dir; test -e /tmp/esc-bound/passwd && echo etc; true"
    sandbox = Sandbox(Spec(binds=[bind]))
    outcomes: dict[str, int] = {}
    swapper = subprocess.Popen([SYSTEM_PY, "-c", SWAPPER, path, alt], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        assert swapper.stdout.readline() == "ready\n"
        for _ in range(n):
            try:
                r = sandbox.run(["/bin/busybox", "sh", "-c", probe])
                key = " ".join(r.stdout.decode().split()) or f"nothing (exit {r.returncode})"
            except IncarnateError as e:
                key = f"typed {type(e).__name__} {errno.errorcode.get(getattr(e, 'errno', 0) or 0, '')}"
            except Exception as e:  # an untyped error is an outcome to report
                key = f"untyped {type(e).__name__}: {e}".replace(host_dir, "<dir>")
            outcomes[key] = outcomes.get(key, 0) + 1
    finally:
        swapper.stdin.write("stop\n")
        swapper.stdin.close()
        swaps = swapper.stdout.read().strip()
        swapper.wait()
        swapper.stdout.close()
    print(f"{n} setups, {swaps} swaps: {outcomes}")
    assert int(swaps) > n, swaps  # the path did change under the setups
    assert "dir" in outcomes, outcomes  # (and some setups did bind the directory)
    # A source that was the symlink when the sandbox started binds /etc (resolved as named).
    allowed = {"dir"} | ({"etc"} if swapped == "source" else set())
    bad = {k: v for k, v in outcomes.items() if k not in allowed and not k.startswith("typed ")}
    assert not bad, f"{sum(bad.values())} of {n} setups went wrong: {outcomes}"


def test_payload_cannot_reach_the_monitor_through_its_init(leak_check) -> None:
    """A sandboxed call's init shares its monitor's memory (CLONE_VM), and the monitor runs
    outside every namespace: the payload, which may ptrace its own init, must not be able to
    open the init's memory for writing (it is made non-dumpable before the payload is forked),
    nor attach to it."""
    import ctypes

    def attempt() -> dict:
        out = {}
        try:
            with open("/proc/1/mem", "r+b"):
                out["mem"] = "opened"
        except OSError as e:
            out["mem"] = errno.errorcode[e.errno]
        libc = ctypes.CDLL(None, use_errno=True)
        PTRACE_ATTACH = 16
        rc = libc.ptrace(PTRACE_ATTACH, 1, None, None)
        out["ptrace"] = "attached" if rc == 0 else errno.errorcode[ctypes.get_errno()]
        out["self_dumpable"] = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
        return out

    got = Sandbox().call(attempt)
    assert got["mem"] == "EACCES" and got["ptrace"] == "EPERM", got
    assert got["self_dumpable"] == 1  # the payload's own memory stays dumpable (core files, /proc/self)


def test_faulthandler_alternate_stack_survives_in_a_call() -> None:
    """The kernel drops the alternate signal stack of a CLONE_VM child; the payload (a fork
    of one) gets the caller's back, so faulthandler can still report a stack overflow."""
    import ctypes

    class StackT(ctypes.Structure):
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    def altstack() -> tuple[int, int]:
        st = StackT()
        ctypes.CDLL(None).sigaltstack(None, ctypes.byref(st))
        return st.ss_flags, st.ss_size

    import faulthandler

    was = faulthandler.is_enabled()
    faulthandler.enable()  # installs an alternate stack in this process
    try:
        outside = altstack()
        inside = Sandbox().call(altstack)
    finally:
        if not was:
            faulthandler.disable()
    assert outside[0] == 0 and outside[1] > 0
    assert inside == outside
