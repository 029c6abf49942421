"""Fault injection: every system call of the sandbox setup made to fail, for real.

Each case runs a small driver (``DRIVER`` below) as a separate Python process: it probes the
machine, builds its Sandbox and blocks; strace then attaches to it (``strace -f -p PID -e
inject=SYSCALL:error=ERRNO:when=N``) and the driver makes one sandbox (``Sandbox.spawn`` of
``/bin/true``, or ``Sandbox.call``).  Attaching after the probe keeps the probe's trial
children out of the count.  strace counts calls per syscall and per process ("tracee"): with
``-f`` the Nth call of each process of the sandbox (the parent, the forked monitor of a call,
the init, the payload) is refused, and without ``-f`` only the parent's.  A fresh process of a
retry counts from 1 again, so a refusal that makes the library retry is met again by the
retry's new process (the tables say so where it matters).

The driver prints one JSON line: the outcome ("ok", "error" for an IncarnateError, "untyped"
for anything else), the error's type, step and errno, and what it left behind: children
(the driver is a child subreaper, so an orphaned sandbox process comes back to it), mounts in
the host's mount namespace, file descriptors, cgroup directories.  The test adds a watchdog
(a hang is an outcome), the driver's exit status (a crash by signal is one too), and checks
that the run's cgroup directories and lock file are gone once the driver exited.

``pytest --reliability-full tests/test_faults.py`` runs the exhaustive form: every system
call a calibration trace shows in the sandbox's processes, every occurrence, three errnos
(the cases that are not clean go to a JSON report: $INCARNATE_FAULTS_REPORT, or the test's
tmp_path).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _procs import descendants

from pytest_incarnate import cgroups

PY = sys.executable
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERRNOS = ("EPERM", "ENOMEM", "ENOSPC")
WATCHDOG = 10.0  # seconds for one sandbox under strace; past it the case is a hang
WORKERS = 4

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (scripts/check installs it)")

DRIVER = r'''
import ctypes, errno, json, os, signal, sys, traceback
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
from pytest_incarnate import DEVNULL, PIPE, Sandbox, Spec, cgroups
from pytest_incarnate.errors import IncarnateError
from pytest_incarnate.probe import probe


def retry(fn):
    """The driver's own bookkeeping: an injected refusal hits one call, so try again."""
    err = None
    for _ in range(8):
        try:
            return fn()
        except OSError as e:
            err = e
    raise err


def emit(obj):
    data = (json.dumps(obj) + "\n").encode()
    for _ in range(8):
        try:
            n = os.write(1, data)
        except OSError:
            continue
        data = data[n:]
        if not data:
            return


def mounts():
    with open("/proc/self/mountinfo") as f:
        return set(f.read().splitlines())


def fds():
    return set(os.listdir("/proc/self/fd"))


def children():
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        return [int(p) for p in f.read().split()]


def cgroup_dirs():
    run = cgroups.Run._current
    if run is None:
        return []
    h = cgroups.Hierarchy.detect()
    left = []
    for base in list(h.v1.values()) + ([h.v2] if h.v2 else []):
        d = os.path.join(base, cgroups.RUN_PREFIX + run.id)
        if os.path.isdir(d):
            left += [os.path.join(d, e) for e in os.listdir(d) if os.path.isdir(os.path.join(d, e))]
    return sorted(left)


mode, kwargs = sys.argv[1], json.loads(sys.argv[2])
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
spec = Spec(**kwargs)
sb = Sandbox(spec)
probe()
sb.plan()
if spec.limits().any():
    cgroups.Run.current()  # the run's lock and sweep, before the count starts
before_mounts, before_fds = mounts(), fds()
run = cgroups.Run._current
emit({"ready": os.getpid(), "run": run.id if run else None, "v1": cgroups.Hierarchy.detect().v1})
signal.sigwait([signal.SIGUSR1])  # strace is attached now

out = {}
try:
    if mode == "run":
        r = sb.run(["/bin/true"])
        out.update(outcome="ok", returncode=r.returncode, changes=r.changes is not None,
                   degradations=sorted(type(d).__name__ for d in r.degradations))
    elif mode == "spawn":
        h = sb.spawn(["/bin/true"], stdin=DEVNULL, stdout=PIPE, stderr=PIPE)
        h.communicate()
        out.update(outcome="ok", returncode=h.returncode, used_clone3=h.used_clone3,
                   changes=h.changes is not None, degradations=sorted(type(d).__name__ for d in h.degradations))
    else:
        if mode in ("call-forked", "call-joined"):  # as from a threaded caller
            import pytest_incarnate.sandbox as sandbox_module
            sandbox_module.DIRECT = False
            sandbox_module.JOIN = mode == "call-joined"  # a held sandbox joined, or a monitor forked
        o = sb.call_outcome(os.getpid)
        out.update(outcome="ok" if o.kind == "ok" else "raised", value=repr(o.value), changes=o.changes is not None,
                   degradations=sorted(type(d).__name__ for d in o.plan.degradations))
except IncarnateError as e:
    err = getattr(e, "errno", None)
    out.update(outcome="error", type=type(e).__name__, step=getattr(e, "step", None), path=getattr(e, "path", None),
               errno=errno.errorcode.get(err, err) if err else None, message=str(e))
except BaseException as e:
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "pytest_incarnate" in f.filename]
    site = f"{os.path.basename(frames[-1].filename)}:{frames[-1].name}" if frames else "?"
    out.update(outcome="untyped", type=type(e).__name__, message=str(e), site=site, traceback=traceback.format_exc())
out["leaks"] = {
    "children": retry(children),
    "mounts": sorted(line.split(" - ")[0].split()[4] for line in retry(mounts) - before_mounts),
    "fds": sorted(retry(fds) - before_fds),
    "cgroups": retry(cgroup_dirs),
}
run = cgroups.Run._current
out["run"] = [run.id, run.lock_path] if run is not None else None
emit(out)
'''


def _kill_all(pids: list[int]) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_case(mode: str, spec: dict[str, Any], faults: list[tuple[str, str, str]], follow: bool = True,
             path: str | None = None, timeout: float = WATCHDOG, trace: str = "/dev/null") -> dict[str, Any]:
    """One sandbox under strace with ``faults`` [(syscall, errno, when)]; the driver's
    report, plus the outcome "hang" or "crash" and the leftovers seen from outside.
    ``path``: only calls on that path count (strace -P), formatted with the driver's run id
    (``{run}``) and v1 controller directories (``{pids}``...); a case whose path names a
    controller this machine has no v1 hierarchy for is skipped.  ``trace``: strace's output."""
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    drv = subprocess.Popen([PY, "-c", DRIVER, mode, json.dumps(spec)], cwd="/", env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    tracer = None
    try:
        assert drv.stdout is not None and drv.stderr is not None
        first = drv.stdout.readline()
        if not first:
            _, err = drv.communicate(timeout=30)
            raise AssertionError(f"the driver failed before it was ready: {err.decode()[-2000:]}")
        ready = json.loads(first)
        pid = ready["ready"]
        args = ["strace", "-o", trace] + (["-f"] if follow else [])
        if path is not None:
            try:
                args += ["-P", os.path.normpath(path.format(run=ready["run"], **ready["v1"]))]
            except KeyError as e:
                return {"outcome": "skipped", "reason": f"no v1 {e} controller on this machine"}
        for syscall, errname, when in faults:
            args += ["-e", f"inject={syscall}:error={errname}:when={when}"]
        tracer = subprocess.Popen(args + ["-p", str(pid)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        assert tracer.stderr is not None
        said = []
        for line in tracer.stderr:  # "strace: Process N attached" once it traces the driver
            said.append(line)
            if "attached" in line:
                break
        else:
            raise AssertionError(f"strace did not attach: {''.join(said)}")
        threading.Thread(target=tracer.stderr.read, daemon=True).start()  # drain the rest
        os.kill(pid, signal.SIGUSR1)
        try:
            out, err = drv.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            left = descendants(drv.pid)
            _kill_all([drv.pid, *left])
            drv.communicate()
            return {"outcome": "hang", "left": left, "elapsed": time.monotonic() - t0}
        lines = out.decode().strip().splitlines()
        if drv.returncode < 0:
            res: dict[str, Any] = {"outcome": "crash", "signal": -drv.returncode}
        elif drv.returncode != 0 or not lines:
            res = {"outcome": "driver-failed", "rc": drv.returncode}
        else:
            res = json.loads(lines[-1])
        res["stderr"] = err.decode()[-3000:]
        tracer.wait(timeout=30)
        res["outside"] = _outside_leftovers(res.get("run"))
        res["elapsed"] = time.monotonic() - t0
        return res
    finally:
        if drv.poll() is None:
            _kill_all([drv.pid, *descendants(drv.pid)])
            drv.wait()
        if tracer is not None and tracer.poll() is None:
            tracer.kill()
            tracer.wait()


def _outside_leftovers(run: list[str] | None) -> list[str]:
    """After the driver exited: its run's cgroup directories and lock file must be gone."""
    if not run:
        return []
    run_id, lock = run
    h = cgroups.Hierarchy.detect()
    left = [os.path.join(b, cgroups.RUN_PREFIX + run_id) for b in list(h.v1.values()) + ([h.v2] if h.v2 else [])]
    return [p for p in left + [lock] if os.path.exists(p)]


def traced(mode: str, spec: dict[str, Any], follow: bool) -> list[tuple[int, str]]:
    """strace's lines (pid, call) for one normal run, cached per (mode, spec, follow)."""
    key = (mode, json.dumps(spec, sort_keys=True), follow)
    if key not in _TRACES:
        fd, name = tempfile.mkstemp(prefix="incarnate-faults-", suffix=".trace", dir="/var/tmp")
        os.close(fd)
        try:
            r = run_case(mode, spec, [], follow=follow, trace=name, timeout=60)
            assert r["outcome"] == "ok", r
            with open(name) as f:
                lines = f.read().splitlines()
        finally:
            os.unlink(name)
        out = []
        for line in lines:
            pid, _, call = line.partition(" ") if follow else ("0", "", line)
            out.append((int(pid), call.lstrip()))
        _TRACES[key] = out
    return _TRACES[key]


_TRACES: dict[tuple[str, str, bool], list[tuple[int, str]]] = {}


@dataclass(frozen=True)
class Nth:
    """The occurrence of ``syscall`` that the parent makes as its ``index``th call matching
    ``pattern`` in a normal run (found in a strace of that run, without -f): robust to calls
    added before it."""

    pattern: str
    index: int = 1  # the first matching call, or the second...
    child: bool = False  # in the sandbox's process that makes it (a strace -f of the run)

    def resolve(self, mode: str, spec: dict[str, Any], syscall: str) -> str:
        lines = traced(mode, spec, follow=self.child)
        if self.child:
            pid = next((p for p, call in lines if call.startswith(syscall + "(") and re.search(self.pattern, call)), None)
            lines = [(p, call) for p, call in lines if p == pid]
        n = seen = 0
        for _, call in lines:
            if call.startswith(syscall + "("):
                n += 1
                if re.search(self.pattern, call):
                    seen += 1
                    if seen == self.index:
                        return str(n)
        raise AssertionError(f"no call {self.index} of {syscall} matching {self.pattern!r} in a normal run")



# ------------------------------------------------------------------------------ the table

RO = {"copy_on_write": False}  # read-only host root: the same operations on every machine
COW = {}  # the default: the host root copy-on-write (overlays, the upper layers held)
LIMITED = {"copy_on_write": False, "pids": 64, "uid": 65534, "gid": 65534, "rlimits": {"nofile": 256},
           "cpu_affinity": [0]}
PIDS_TASKS = "{pids}/incarnate-{run}/sb-0/tasks"
INJECTED = "<injected>"  # in an expectation: the errno that was injected

# Known bugs, each named once; a case carrying one is xfail(strict=True) and asserts the
# correct behaviour, so that it turns red (XPASS) when the bug is fixed.
# (None open now: the cases that pinned the untyped OSErrors, the go-byte hang, Handle._reap
# and open_for_spawn's leak assert the fixed behaviour.)


@dataclass(frozen=True)
class Case:
    id: str
    mode: str                          # "run": Sandbox.spawn(["/bin/true"]); "call": Sandbox.call;
                                       # "call-forked": Sandbox.call through a forked monitor;
                                       # "call-joined": a held sandbox the caller's copy joins
    spec: dict[str, Any]
    faults: tuple[tuple[str, str | Nth], ...]  # (syscall, when), each refused with the case's errno
    expect: dict[str, Any]             # the fields of the driver's report to compare
    follow: bool = True                # strace -f: the sandbox's processes too, not only the parent
    path: str | None = None            # strace -P: only the calls on this path count
    errnos: tuple[str, ...] = ERRNOS
    by_errno: dict[str, dict[str, Any]] = field(default_factory=dict)  # expectation overrides
    bug: str | None = None
    note: str = ""


class OneOf:
    """In an expectation: any of these values (the first pipe at EOF may be stdout or stderr)."""

    def __init__(self, *options: str) -> None:
        self.options = options

    def __eq__(self, other: object) -> bool:
        return other in self.options

    def __hash__(self) -> int:
        return hash(self.options)

    def __repr__(self) -> str:
        return " or ".join(map(repr, self.options))


def err(type_: str, step: str | OneOf | None = None, errno: str = INJECTED) -> dict[str, Any]:
    return {"outcome": "error", "type": type_, "step": step, "errno": errno}


def step(name: str, path: str | None = None) -> dict[str, Any]:
    """SetupStepFailed naming the step, the injected errno, and (when given) the path."""
    exp = err("SetupStepFailed", name)
    if path is not None:
        exp["path"] = path
    return exp


def ok(**kw: Any) -> dict[str, Any]:
    return {"outcome": "ok", "returncode": 0, **kw}


TYPED = {"outcome": "error", "errno": INJECTED}  # the correct behaviour a bug case asserts

GO = Nth(r'^write\(\d+, "g", 1\)')  # the parent's first go byte
NOT_GO = Nth(r'^write\(\d+, "(?!g")')  # the parent's first other write: the child's uid_map
MAPS_REQUEST = Nth(r'^write\(\d+, "\\20\\0\\0\\0', child=True)  # the child's record, step 16
HOLD_READY = Nth(r'^write\(\d+, "\\21\\0\\0\\0', child=True)  # the child's record, step 17
STATUS = Nth(r'^read\(\d+, "\\0\\0\\0\\0", 4\)\s+= 4$')  # the init's status record (exit 0)
STDOUT = Nth(r'^read\(\d+, "", 65536\)')  # the parent's first read of a payload's pipe: stdout, at EOF
RESULT = Nth(r'^read\(\d+, "\\200\\4')  # the parent's first read of a call's result (a pickle)

CASES = [
    # -- the parent: clone, pipes, id maps, the go byte, pidfd_getfd (strace without -f)
    Case("clone3", "spawn", COW, (("clone3", "1"),), err("CloneFailed"), follow=False,
         by_errno={"EPERM": ok(used_clone3=False, changes=True, degradations=[])},
         note="EPERM: a seccomp profile older than clone3; clone(2) is tried and succeeds"),
    Case("clone3+clone", "spawn", COW, (("clone3", "1"), ("clone", "1")), err("CloneFailed"), follow=False,
         errnos=("EPERM",), note="EPERM from both: a re-probe, the same plan, CloneFailed"),
    Case("pipe2-sync", "run", RO, (("pipe2", "3"),), err("PipeFailed"), follow=False),
    Case("pipe2-err", "run", RO, (("pipe2", "4"),), err("PipeFailed"), follow=False),
    Case("pipe2-status", "run", RO, (("pipe2", "5"),), err("PipeFailed"), follow=False),
    Case("write-uid_map", "run", RO, (("write", NOT_GO),), ok(degradations=["UidMapFailed"]), follow=False,
         note="real root whose identity map is refused maps uid 0 only, and says so"),
    Case("write-gid_map", "run", RO, (("write", Nth(NOT_GO.pattern, 2)),), ok(degradations=["UidMapFailed"]),
         follow=False),
    Case("pidfd_getfd", "run", COW, (("pidfd_getfd", "1"),), ok(changes=False, degradations=[]), follow=False,
         note="no duplicate of the upper layers: the run has no changes report (changes is None)"),
    Case("pipe2-stdout", "run", RO, (("pipe2", "1"),), step("stdio-pipe"), follow=False),
    Case("openat-devnull", "run", RO, (("openat", Nth('"/dev/null"')),), step("open-devnull", "/dev/null"),
         follow=False),
    Case("write-go", "run", RO, (("write", GO),), step("go-byte"), follow=False, errnos=("EPERM",),
         note="the child, waiting for the byte, is killed and reaped: no hang"),
    Case("write-maps-request", "run", LIMITED, (("write", MAPS_REQUEST),), step("unshare"), errnos=("EPERM",),
         note="the child's request for its id maps (after its moves into the v1 cgroups, so "
              "that the parent's own writes come later): the child reports the failed write and exits"),
    Case("write-hold-ready", "run", {"pids": 64}, (("write", HOLD_READY),), step("hold", "(upper layers)"),
         errnos=("EPERM",), note="the child's word that the upper layers' fd is held, for pidfd_getfd"),
    Case("read-status", "spawn", RO, (("read", STATUS),), err("SandboxIOFailed", "read-status"), follow=False,
         note="the init's status record, read after the wait"),
    Case("read-stdout", "run", RO, (("read", STDOUT),), err("SandboxIOFailed", OneOf("read-stdout", "read-stderr")),
         follow=False,
         note="the parent's first read at EOF of the payload's stdout or stderr (communicate; which one reaches EOF "
              "first varies): the sandbox is killed and reaped"),
    # -- the child: every setup step (strace -f; the parent makes none of these calls)
    Case("prctl-pdeathsig", "run", RO, (("prctl", "1"),), step("parent-death-signal")),
    Case("prctl-no_new_privs", "run", RO, (("prctl", "2"),), step("no_new_privs")),
    Case("prctl-pdeathsig-again", "run", RO, (("prctl", "3"),), step("parent-death-signal")),
    Case("mount-rprivate", "run", RO, (("mount", "1"),), step("make-rprivate", "/")),
    Case("mount-stage", "run", RO, (("mount", "2"),), step("stage-root", "/tmp")),
    Case("mount-proc", "run", RO, (("mount", "3"),), step("mount-proc", "/proc")),
    Case("mount-dev-tmpfs", "run", RO, (("mount", "4"),), step("mount-tmpfs", "/dev")),
    Case("mount-devpts", "run", RO, (("mount", "5"),), step("mount-devpts", "/dev/pts")),
    Case("mount-uppers", "run", COW, (("mount", "3"),), step("mount-tmpfs", "(upper layers)")),
    Case("mount-overlay", "run", COW, (("mount", "4"),), step("mount-overlay", "/")),
    Case("mkdir-stage", "run", RO, (("mkdir", "1"),), step("stage-root")),
    Case("mkdirat-resolve", "run", RO, (("mkdirat", "1"),), step("mount-devpts", "/dev/pts"),
         note="the first mount point created component by component is /dev/pts"),
    Case("chdir-stage", "run", RO, (("chdir", "1"),), step("stage-root")),
    Case("pivot_root-stage", "run", RO, (("pivot_root", "1"),), step("stage-root")),
    Case("pivot_root", "run", RO, (("pivot_root", "2"),), step("pivot_root", "/")),
    Case("umount2", "run", RO, (("umount2", "1"),), step("pivot_root")),
    Case("chdir", "run", RO, (("chdir", "5"),), step("chdir", "/")),
    Case("open_tree", "run", RO, (("open_tree", "1"),), step("bind", "/")),
    Case("move_mount", "run", RO, (("move_mount", "1"),), step("bind")),
    Case("mount_setattr", "run", RO, (("mount_setattr", "1"),), step("bind")),
    Case("symlink", "run", RO, (("symlink", "1"),), step("symlink", "/dev/fd")),
    Case("dup3-hold", "run", COW, (("dup3", "1"),), step("hold", "(upper layers)")),
    Case("unshare", "run", RO, (("unshare", "1"),), step("unshare")),
    Case("sethostname", "run", RO, (("sethostname", "1"),), step("hostname", "incarnate")),
    Case("socket", "run", RO, (("socket", "1"),), step("loopback", "lo")),
    Case("ioctl", "run", RO, (("ioctl", "2"),), step("loopback")),
    Case("rt_sigaction", "run", RO, (("rt_sigaction", "1"),), step("signal-mask")),
    Case("rt_sigprocmask", "run", RO, (("rt_sigprocmask", "1"),), step("signal-mask")),
    Case("clone-init-fork", "run", RO, (("clone", "1"),), step("init-fork")),
    Case("setsid", "run", RO, (("setsid", "1"),), step("setsid")),
    Case("dup2-stdio", "run", RO, (("dup2", "1"),), step("stdio")),
    Case("execve", "run", RO, (("execve", "1"),), err("NonExecutablePayload")),
    Case("write-cgroup-tasks", "run", LIMITED, (("write", "1"),), step("cgroup"), path=PIDS_TASKS,
         note="the child's move into its v1 pids cgroup (it writes 0 into tasks)"),
    Case("cgroup-limit-write", "run", LIMITED, (("write", Nth(r'^write\(\d+, "64", 2\)')),), step("cgroup-limit"),
         follow=False, note="the parent's write of pids.max"),
    Case("cgroup-open-tasks", "run", LIMITED, (("openat", "1"),), step("cgroup-open"), follow=False, path=PIDS_TASKS,
         note="the parent opens the pids controller's tasks file after the others"),
    Case("setgroups", "run", LIMITED, (("setgroups", "1"),), step("drop-privileges")),
    Case("setresgid", "run", LIMITED, (("setresgid", "1"),), step("drop-privileges")),
    Case("setresuid", "run", LIMITED, (("setresuid", "1"),), step("drop-privileges", "uid=65534 gid=65534")),
    Case("prlimit64", "run", LIMITED, (("prlimit64", "1"),), step("rlimit", "nofile")),
    Case("sched_setaffinity", "run", LIMITED, (("sched_setaffinity", "1"),), step("cpu-affinity", "0")),
    # -- Sandbox.call: the core in enter mode, in a forked monitor
    Case("call-pipe2-err", "call", COW, (("pipe2", "2"),), err("PipeFailed"),
         note="the parent's first pipe2 is its result pipe; the monitor's second, the core's error pipe"),
    Case("call-mount-rprivate", "call", COW, (("mount", "1"),), step("make-rprivate", "/")),
    Case("call-mount-overlay", "call", COW, (("mount", "4"),), step("mount-overlay")),
    Case("call-setsid", "call", COW, (("setsid", "1"),), step("setsid")),
    Case("call-clone-init", "call", COW, (("clone", "1"),), err("CloneFailed"),
         note="direct enter (a single-threaded caller): the first clone is the init's, from the caller"),
    Case("call-fork", "call-forked", COW, (("clone", "1"),), step("fork"),
         note="a forked monitor (INCARNATE_DIRECT=0 and INCARNATE_JOIN=0): os.fork"),
    # -- Sandbox.call from a threaded caller: a held sandbox, the caller's copy forked into it
    Case("call-joined-init", "call-joined", COW, (("clone", "1"),), err("CloneFailed"),
         note="the held init's clone, from the caller"),
    Case("call-joined-pidfd", "call-joined", COW, (("pidfd_open", "1"),), step("join")),
    Case("call-joined-setns", "call-joined", COW, (("setns", "1"),), step("join"),
         note="the caller's setns into the init's pid namespace (and the child's first setns, had it one)"),
    Case("call-joined-fork", "call-joined", COW, (("clone", "2"),), step("fork"), follow=False,
         note="the caller's fork into the held sandbox"),
    Case("call-joined-restore", "call-joined", COW, (("setns", "2"),), step("join"), follow=False,
         note="the caller's way back to its own pid namespace after the fork: the copy is killed and reaped"),
    Case("call-pipe2-result", "call", COW, (("pipe2", "1"),), step("result-pipe")),
    Case("call-mountinfo", "call", COW, (("openat", "1"),), step("host-mounts", "/proc/self/mountinfo")),
    Case("call-read-result", "call", COW, (("read", RESULT),), err("SandboxIOFailed", "read-result"), follow=False,
         note="the parent's read of the call's result: the sandbox is killed and reaped"),
    Case("call-prctl-monitor", "call", COW, (("prctl", "1"),), step("parent-death-signal")),  # fixed: now typed
    Case("call-write-go", "call", COW, (("write", "1"),), step("go-byte"), errnos=("EPERM",),
         note="the monitor's go byte (the first write of every process is refused: it comes first)"),
]

PARAMS = [pytest.param(c, e, id=f"{c.id}-{e}",
                       marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=c.bug)] if c.bug else [])
          for c in CASES for e in c.errnos]


def expectation(case: Case, errname: str) -> dict[str, Any]:
    exp = dict(case.by_errno.get(errname, case.expect))
    return {k: (errname if v == INJECTED else v) for k, v in exp.items()}


def faults_of(case: Case, errname: str) -> list[tuple[str, str, str]]:
    return [(s, errname, w.resolve(case.mode, case.spec, s) if isinstance(w, Nth) else w) for s, w in case.faults]


@pytest.fixture(scope="module")
def fault_results(request: pytest.FixtureRequest) -> dict[tuple[str, str], dict[str, Any]]:
    """Every selected case of the table, run four at a time (each in its own driver)."""
    wanted = [item.callspec.params for item in request.session.items
              if getattr(item, "originalname", None) == "test_fault" and hasattr(item, "callspec")]
    jobs = {(p["case"].id, p["errname"]): p["case"] for p in wanted}
    before = _tmp_entries()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futs = {key: pool.submit(run_case, c.mode, c.spec, faults_of(c, key[1]), c.follow, c.path)
                for key, c in jobs.items()}
        results = {key: f.result() for key, f in futs.items()}
    new = _tmp_entries() - before
    for r in results.values():
        r["tmp"] = sorted(new)
    return results


def _tmp_entries() -> set[str]:
    out = set()
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        try:
            out |= {os.path.join(d, e) for e in os.listdir(d) if "incarnate" in e}
        except OSError:
            pass
    return out


def assert_clean(r: dict[str, Any]) -> None:
    assert r["outcome"] not in ("hang", "crash", "driver-failed"), r
    assert r["leaks"] == {"children": [], "mounts": [], "fds": [], "cgroups": []}, r
    assert r["outside"] == [], r
    assert r["tmp"] == [], r


@pytest.mark.parametrize("case, errname", PARAMS)
def test_fault(case: Case, errname: str, fault_results: dict[tuple[str, str], dict[str, Any]]) -> None:
    r = fault_results[(case.id, errname)]
    if r["outcome"] == "skipped":
        pytest.skip(r["reason"])
    assert r["outcome"] != "hang", f"hang: {case.faults} with {errname}, processes left: {r.get('left')}"
    assert r["outcome"] != "untyped", f"untyped {r['type']}: {r['message']}\n{r['traceback']}"
    exp = expectation(case, errname)
    got = {k: r.get(k) for k in exp}
    assert got == exp, f"{case.faults} with {errname}: {r.get('message') or r}"
    assert_clean(r)


# -------------------------------------------------------------------- the exhaustive form

# Calls left out: releasing (close) and waiting/exiting ones, whose refusal is not a setup
# failure, and the time and identity queries the C library makes.
NOT_INJECTED = frozenset({
    "close", "close_range", "exit", "exit_group", "wait4", "rt_sigtimedwait", "restart_syscall", "getpid", "getppid",
    "gettid", "getuid", "geteuid", "getgid", "getegid", "set_robust_list", "rseq", "set_tid_address", "brk", "mmap",
    "munmap", "mprotect", "arch_prctl", "futex", "clock_gettime", "madvise", "rt_sigreturn", "sysinfo",
})
FULL_SETUPS = [("run", RO), ("run", COW), ("run", LIMITED), ("call", COW), ("call-forked", COW), ("call-joined", COW)]


def calibrate(mode: str, spec: dict[str, Any]) -> dict[str, int]:
    """The most calls of each syscall any one process of a normal run makes (strace -f)."""
    counts: collections.Counter[tuple[int, str]] = collections.Counter()
    for pid, call in traced(mode, spec, follow=True):
        m = re.match(r"([a-z0-9_]+)\(", call)  # a call's start ("<... x resumed>" lines are not)
        if m:
            counts[(pid, m.group(1))] += 1
    most: dict[str, int] = {}
    for (_, name), n in counts.items():
        if name not in NOT_INJECTED:
            most[name] = max(most.get(name, 0), n)
    return most


def classify(r: dict[str, Any]) -> str | None:
    """None if the outcome is acceptable (a typed error or success, nothing left behind);
    else what is wrong.  Run directories or a lock left at exit count apart when the next
    run's sweep removes them (``cgroups.sweep``, run here)."""
    if r["outcome"] in ("hang", "crash", "driver-failed"):
        return r["outcome"]
    what = []
    if r["outcome"] == "untyped":
        what.append(f"untyped {r['type']} from {r['site']}")
    leaks = {k: v for k, v in r["leaks"].items() if v}
    if leaks:
        what.append(f"left behind {sorted(leaks)}" + (f" (new mounts: {leaks['mounts']})" if "mounts" in leaks else ""))
    if r["outside"]:
        cgroups.sweep()
        still = [p for p in r["outside"] if os.path.exists(p)]
        what.append("left at exit, not swept" if still else "left at exit for the next run's sweep")
    return "; ".join(what) or None


def test_exhaustive(request: pytest.FixtureRequest, tmp_path: Any) -> None:
    """Every syscall of the setup x EPERM, ENOMEM, ENOSPC x every occurrence (--reliability-full)."""
    if not request.config.getoption("reliability_full"):
        pytest.skip("the exhaustive fault injection runs with --reliability-full")
    jobs = []
    for mode, spec in FULL_SETUPS:
        for name, n in sorted(calibrate(mode, spec).items()):
            for k in range(1, n + 1):
                for e in ERRNOS:
                    jobs.append((mode, spec, name, k, e))
    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda j: (j, run_case(j[0], j[1], [(j[2], j[4], str(j[3]))])), jobs))
    bad: dict[str, list[str]] = collections.defaultdict(list)
    outcomes: collections.Counter[str] = collections.Counter()
    for (mode, spec, name, k, e), r in results:
        outcomes[r["outcome"]] += 1
        why = classify(r)
        if why is not None:
            bad[why].append(f"{mode} {json.dumps(spec)} {name}:{k} {e}")
    summary = f"{len(jobs)} cases in {time.monotonic() - t0:.0f} s: {dict(outcomes)}"
    report = Path(os.environ.get("INCARNATE_FAULTS_REPORT") or tmp_path / "faults-full.json")
    report.write_text(json.dumps({"summary": summary, "bad": bad}, indent=1))
    print(f"{summary}; every case that is not clean: {report}")
    for why, where in sorted(bad.items()):
        print(f"{why}: {len(where)} cases, e.g. {where[:3]}")
    # What is tolerated: a refused rmdir of the sandbox's cgroup when it is released (the
    # cgroup is left to the sweep, with a warning); cleanup at exit that only the next run's
    # sweep finishes.  Anything else (a hang, a crash, an untyped error) fails the test.
    def known(why: str, where: list[str]) -> bool:
        if why == "left at exit for the next run's sweep":
            return True
        # A refused rmdir of the sandbox's cgroup leaves it to the next run's sweep, with a
        # warning; the sandbox's result is kept.
        if why.startswith("left behind ['cgroups']") and all(" rmdir:" in w for w in where):
            return True
        # Known, open (docs/reliability.md): a refused read of the call's result, while the
        # forked monitor is still in its clone, kills the monitor before its init exists; the
        # init, orphaned before it armed its parent-death signal, sees EOF on its go byte and
        # exits at once, but this driver (a child subreaper) may count it first.
        return why == "left behind ['children']" and all(w.startswith("call-forked {} read:") for w in where)

    unknown = {w: v for w, v in bad.items() if not known(w, v)}
    assert not unknown, f"{summary}; unexpected: {json.dumps(unknown, indent=1)}"
    if bad:
        pytest.xfail(f"{summary}; known bugs: {', '.join(f'{w} x{len(v)}' for w, v in sorted(bad.items()))}")
