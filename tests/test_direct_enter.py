"""Direct enter: a single-threaded caller starts the sandbox's init itself (CLONE_VM), so that the
payload is the only copy of its memory; a threaded caller, or INCARNATE_DIRECT=0, starts an init
that holds the sandbox and forks its copy into it (join); INCARNATE_JOIN=0 as well forks a monitor
first.  Each test runs a driver script in a fresh interpreter (its thread count is known) and
looks at its process tree from outside while the payload waits on a pipe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pytest_incarnate import _ffi

REPO = str(Path(__file__).resolve().parents[1])
pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not _ffi.direct_available(),
                                reason="real root (the copy-on-write root) and direct enter (x86_64/aarch64, no CET, no ASan)")

DRIVER = r'''
import json, os, random, sys, threading
from pytest_incarnate import Sandbox, _ffi

threaded = sys.argv[1] == "threaded"
ready_w, go_r = int(sys.argv[2]), int(sys.argv[3])
if threaded:
    gate = threading.Event()
    t = threading.Thread(target=gate.wait)
    t.start()

def payload():
    os.write(ready_w, b"r")      # the test looks at the tree now
    os.read(go_r, 1)             # until it says go
    try:                         # the init shares the caller's memory: it must be out of reach
        open("/proc/1/mem", "rb").close()
        init_mem = "opened"
    except OSError as e:
        init_mem = type(e).__name__
    return os.getpid(), random.random(), init_mem

def dumpable():
    import ctypes
    return ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)

def vm_kib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmSize:")).split()[1])

out = {"before": dumpable(), "vm_before": vm_kib()}
out["first"] = Sandbox().call(payload)
out["after"] = dumpable()
out["second"] = Sandbox().call(lambda: random.random())
for _ in range(200):
    Sandbox().call(os.getpid)
out["vm_after"] = vm_kib()
out["live"] = _ffi.direct_live()
if threaded:
    gate.set()
    t.join()
print(json.dumps(out))
'''


def _children(pid: int) -> list[int]:
    """The live children of ``pid`` (a zombie of the driver's start-up, not yet reaped, left out)."""
    out = []
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        for c in f.read().split():
            try:
                with open(f"/proc/{c}/stat") as st:
                    if st.read().rsplit(")", 1)[1].split()[0] != "Z":
                        out.append(int(c))
            except FileNotFoundError:
                pass
    return out


def _pidns(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/pid")


def _run(mode: str, env: dict[str, str]) -> tuple[dict[str, object], list[int], list[int]]:
    """Run the driver; return its report, its children and grandchildren while the payload waited."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, mode, str(ready_w), str(go_r)], pass_fds=(ready_w, go_r),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env, "PYTHONPATH": REPO}, cwd="/")
    os.close(ready_w)
    os.close(go_r)
    try:
        assert os.read(ready_r, 1) == b"r", proc.communicate(timeout=60)
        driver_ns = _pidns(proc.pid)
        children = _children(proc.pid)
        grandchildren = [g for c in children for g in _children(c)]
        top_ns = {c: _pidns(c) for c in children}
        os.write(go_w, b"g")
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(ready_r)
        os.close(go_w)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    report["top_ns"] = top_ns
    report["driver_ns"] = driver_ns
    return report, children, grandchildren


def test_a_single_threaded_caller_starts_the_init_itself() -> None:
    report, children, grandchildren = _run("single", {})
    # The caller's only child is the init, already in the sandbox's pid namespace; below it, the payload.
    assert len(children) == 1, children
    (init,) = children
    assert report["top_ns"][init] != report["driver_ns"]
    assert len(grandchildren) == 1
    assert report["first"][0] == 2   # the payload is pid 2 inside
    assert report["first"][2] == "PermissionError"   # the init (pytest's memory) is not dumpable
    # While the init shared its memory the caller was not dumpable; the flag is back after.
    assert report["before"] == 1 and report["after"] == 1
    # Each payload has its own random state (the interpreter's fork protocol ran: random is reseeded).
    assert report["first"][1] != report["second"]
    # 202 calls: each init's stack (256 KiB) is unmapped once it is reaped (leaked, they would
    # add 50 MiB), and none is left.
    assert report["vm_after"] - report["vm_before"] < 16 * 1024, report
    assert report["live"] == 0


@pytest.mark.parametrize("mode,env", [("threaded", {}), ("single", {"INCARNATE_DIRECT": "0"})], ids=["threaded", "direct-off"])
def test_a_threaded_caller_forks_once_into_a_held_sandbox(mode: str, env: dict[str, str]) -> None:
    """A caller with another thread (an xdist worker), or direct enter turned off: the core
    starts an init that holds the sandbox (CLONE_VM, from the caller), and the caller forks
    its one copy into the init's pid namespace, where it joins the rest."""
    report, children, grandchildren = _run(mode, env)
    # Both are the caller's children, both in the sandbox's pid namespace, nothing below them:
    # one copy of the caller (the payload), no monitor.
    assert len(children) == 2, children
    assert all(ns != report["driver_ns"] for ns in report["top_ns"].values()), report
    assert len(set(report["top_ns"].values())) == 1, report
    assert grandchildren == []
    assert report["first"][0] == 2                   # the payload, pid 2 under the held init
    assert report["first"][2] == "PermissionError"   # the init shares the caller's memory: out of reach
    assert report["after"] == 1                      # the caller is dumpable again once the inits are reaped
    assert report["first"][1] != report["second"]    # the interpreter's fork protocol ran (random reseeded)
    assert report["live"] == 0


@pytest.mark.parametrize("mode,env", [("threaded", {"INCARNATE_JOIN": "0"}),
                                      ("single", {"INCARNATE_DIRECT": "0", "INCARNATE_JOIN": "0"})],
                         ids=["threaded", "direct-off"])
def test_without_join_a_threaded_caller_forks_a_monitor(mode: str, env: dict[str, str]) -> None:
    report, children, grandchildren = _run(mode, env)
    # The caller's child is the forked monitor, in the caller's pid namespace; the init below it.
    assert len(children) == 1, children
    (monitor,) = children
    assert report["top_ns"][monitor] == report["driver_ns"]
    assert len(grandchildren) == 1
    assert report["first"][0] == 2
    assert report["first"][2] == "PermissionError"
    assert report["after"] == 1
    assert report["first"][1] != report["second"]
    assert report["live"] == 0


MOUNT_TESTS = r'''
import os
import subprocess
import pytest

D = os.environ["MOUNT_DIR"]

@pytest.fixture
def mounted():
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", D], check=True)
    with open(os.path.join(D, "marker"), "w") as f:
        f.write("on the new mount")
    yield
    subprocess.run(["umount", D], check=True)

def test_1_before():
    assert not os.path.exists(os.path.join(D, "marker"))

def test_2_mounted(mounted):
    with open(os.path.join(D, "marker")) as f:
        assert f.read() == "on the new mount"

def test_3_after():
    assert not os.path.exists(os.path.join(D, "marker"))
'''


@pytest.mark.skipif(shutil.which("unshare") is None, reason="unshare(1)")
def test_a_mount_made_between_tests_is_seen_by_the_next_sandbox(tmp_path: Path) -> None:
    """The plugin keeps the core's spec between tests while the mount table stays the same: a
    host mount made (and removed) by a fixture between two sandboxed tests shows (and goes)
    in the next one.  The inner pytest runs in a mount namespace of its own, under /var/tmp
    (/tmp is the sandboxes' scratch space)."""
    (tmp_path / "test_mounts.py").write_text(MOUNT_TESTS)
    d = tempfile.mkdtemp(dir="/var/tmp", prefix="direct-enter-")
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, "-m", "pytest", "-q",
                            "-p", "no:cacheprovider", "--incarnate", "test_mounts.py"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "MOUNT_DIR": d, "PYTHONPATH": REPO})
    finally:
        os.rmdir(d)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 passed" in r.stdout, r.stdout


REAP_LATER_CONFTEST = r"""
import ctypes, json, os
import pytest
from pytest_incarnate import _ffi

SEEN = {"setup": []}

def dumpable():
    return ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)

def pytest_runtest_setup(item):
    SEEN["setup"].append([dumpable(), _ffi.direct_live()])

def pytest_unconfigure(config):
    SEEN["end"] = [dumpable(), _ffi.direct_live()]
    with open(os.environ["REPORT"], "w") as f:
        json.dump(SEEN, f)
"""


def test_the_plugin_reaps_later_and_gives_the_flag_back_at_the_end(tmp_path: Path) -> None:
    """The plugin's path: a finished test's init is reaped at a later call (non-blocking,
    once gone) or at the end; meanwhile pytest is not dumpable; at the end no init is
    left and the flag is back."""
    (tmp_path / "conftest.py").write_text(REAP_LATER_CONFTEST)
    (tmp_path / "test_many.py").write_text("".join(f"def test_{i}(): pass\n" for i in range(6)))
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--incarnate", "test_many.py"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "REPORT": str(report), "PYTHONPATH": REPO})
    assert r.returncode == 0, r.stdout + r.stderr
    seen = json.loads(report.read_text())
    assert seen["setup"][0] == [1, 0]   # before the first sandbox
    # From the second test on, the previous test's init may still be registered: the flag
    # is cleared exactly while one is.
    for flag, live in seen["setup"][1:]:
        assert flag == (0 if live else 1), seen
    assert any(live for _, live in seen["setup"][1:]), seen   # reaped later, not at once
    assert seen["end"] == [1, 0]


STORM = r"""
import errno, json, os, random, signal, sys
from pytest_incarnate import Sandbox, _ffi
from pytest_incarnate import sandbox as sbm

class Tick(BaseException):   # as KeyboardInterrupt, or a timeout plugin's outcome
    pass

armed = [False]   # raise only inside a call: the bookkeeping below is left alone

def tick(signum, frame):
    if armed[0]:
        armed[0] = False
        raise Tick()

me = os.getpid()
sbm.forked_enter(Sandbox(), os.getpid)   # the probe and the imports, before the storm
fds_before = sorted(os.listdir("/proc/self/fd"))
signal.signal(signal.SIGALRM, tick)
rng = random.Random(4)
outcomes = {"ok": 0, "tick": 0, "other": []}
for _ in range(int(sys.argv[1])):
    try:
        armed[0] = True
        # one SIGALRM somewhere in the call: before, during or after the init's start,
        # while the payload runs, while its result is read
        signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0001, 0.008))
        try:
            v = sbm.forked_enter(Sandbox(), os.getpid, reap_later=True).value
        finally:
            armed[0] = False
        if os.getpid() != me:      # a payload running the caller's code
            os.write(2, b"ESCAPED\n")
            os._exit(99)
        outcomes["ok" if v == 2 else "other"] += 1 if v == 2 else [repr(v)]
    except Tick:
        if os.getpid() != me:
            os.write(2, b"ESCAPED\n")
            os._exit(99)
        outcomes["tick"] += 1
    except Exception as e:
        outcomes["other"].append(f"{type(e).__name__}: {e}")
signal.setitimer(signal.ITIMER_REAL, 0, 0)
signal.signal(signal.SIGALRM, signal.SIG_IGN)
sbm.reap_pending()
import ctypes
out = {"outcomes": outcomes, "live": _ffi.direct_live(), "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0),
       "fds": sorted(os.listdir("/proc/self/fd")) == fds_before,
       "children": open(f"/proc/{me}/task/{me}/children").read().split()}
print(json.dumps(out))
"""


def test_signals_during_direct_calls_leave_nothing_and_never_run_the_caller_s_code() -> None:
    """A SIGALRM whose handler raises, at a random point of each of 300 direct calls: each call
    returns or raises the handler's exception in the caller only (never in a payload), and
    afterwards no init is registered, no child is left, no descriptor leaked, and the
    caller is dumpable again."""
    r = subprocess.run([sys.executable, "-c", STORM, "300"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": REPO}, cwd="/")
    assert "ESCAPED" not in r.stderr
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert not out["outcomes"]["other"], out
    assert out["outcomes"]["ok"] + out["outcomes"]["tick"] == 300
    assert out["outcomes"]["tick"] > 0 and out["outcomes"]["ok"] > 0, out   # both happened
    assert out["live"] == 0 and out["dumpable"] == 1 and out["fds"] and out["children"] == [], out


PROBE_STORM = r"""
import json, os, random, signal, sys
from pytest_incarnate.probe import probe

class Tick(BaseException):
    pass

def tick(signum, frame):
    raise Tick()

me = os.getpid()
signal.signal(signal.SIGALRM, tick)
rng = random.Random(7)
ticks = done = 0
for _ in range(int(sys.argv[1])):
    signal.setitimer(signal.ITIMER_REAL, rng.uniform(0.0001, 0.02))
    try:
        probe(refresh=True)
        done += 1
    except Tick:
        ticks += 1
    signal.setitimer(signal.ITIMER_REAL, 0)
signal.signal(signal.SIGALRM, signal.SIG_IGN)
print(json.dumps({"ticks": ticks, "done": done,
                  "children": open(f"/proc/{me}/task/{me}/children").read().split()}))
"""


def test_an_interrupted_probe_leaves_no_child() -> None:
    """The probe's trial children are started and reaped with signals held: a handler that
    raises (KeyboardInterrupt, a timeout's) at any point of 60 probes leaves no zombie."""
    r = subprocess.run([sys.executable, "-c", PROBE_STORM, "60"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": REPO}, cwd="/")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.splitlines()[-1])
    assert out["ticks"] > 0, out
    assert out["children"] == [], out
