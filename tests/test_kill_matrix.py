"""Kill matrix: pytest SIGKILLed at each stage of a sandboxed test; every sandbox process is gone
within 2 s, and after the next run nothing of the killed run is left.

Each round runs ``python -m pytest test_blocked.py::test_blocked`` as a subprocess with
``INCARNATE_TEST_STAGE_FIFO=<fifo>:<stage>`` (the test-only stage hook, see
``pytest_incarnate/_ffi.py``).  The sandboxed test has limits (``memory="64M", pids=64``, so the
run has cgroups) and starts a background ``sleep``.  The process that reaches the stage writes
the stage's name to the FIFO and stops there:

- ``before-clone``: the forked child of pytest, just before the C core starts the sandbox;
- ``after-clone``: that child, in the core, right after clone and before the id maps;
- ``after-mounts``: the sandbox's payload, its setup (mounts) done;
- ``during-call``: the test body inside the sandbox, its background child running;
- ``during-teardown``: a fixture finalizer in the pytest process.

``test_spawned`` does the same for ``Sandbox.run`` called in a test (spawn mode: the first three
stages, in the pytest process itself).

This test blocks on the FIFO (select with a deadline) until the line comes, records the killed
process's descendants from /proc (pidfds and start times), SIGKILLs it and waits on the pidfds:
every one must be gone (exited and reaped) within ``GONE_WITHIN`` seconds of the kill.  This
process is a child subreaper meanwhile, so the orphans come back to it and are reaped here.
Then the next run (``cgroups.sweep()``, which a run does at its start; the last round of each
stage starts a real pytest run instead) must leave no cgroup directory, lock file or temp entry
of the killed run.  The killed pytest runs in a mount namespace of its own (a private copy of
the host's, kept past the kill): its mount table must be as it was when pytest started.

Under xdist (``-n 2``), the worker running the sandboxed test (found by the run id in its
cgroup's name) is SIGKILLed at the stage: xdist reports the test as crashed ("worker 'gwN'
crashed while running ...") and the run goes on (the other tests pass, exit status 1).

``ROUNDS`` kills per stage (``XDIST_ROUNDS`` under xdist, at during-call only);
``pytest --reliability-full`` runs ``FULL_ROUNDS`` of each, at every stage, under xdist too
(the acceptance figure).  ``pytest -s`` prints the times.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from _procs import PR_GET_CHILD_SUBREAPER, PR_SET_CHILD_SUBREAPER, children_map, descendants, prctl, start_time

from pytest_incarnate.cgroups import RUN_PREFIX, Hierarchy, _run_lock_dir, sweep

H = Hierarchy.detect()
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or "memory" not in H.v1 or not (shutil.which("unshare") and shutil.which("nsenter")),
    reason="needs root, the cgroup v1 memory controller, unshare and nsenter (util-linux)",
)

STAGES = ("before-clone", "after-clone", "after-mounts", "during-call", "during-teardown")
# The processes below the killed one at each stage, at least, when the call forks a monitor
# first (an xdist worker: it has threads): the forked child; + the cloned init; the monitor,
# init and payload; + the background sleep; none (the sandbox has ended).
MIN_PROCS = {"before-clone": 1, "after-clone": 2, "after-mounts": 3, "during-call": 4, "during-teardown": 0}
# A single-threaded pytest starts the init itself (direct enter): nothing yet; the init; the
# init and payload; + the background sleep; none.
MIN_PROCS_DIRECT = {"before-clone": 0, "after-clone": 1, "after-mounts": 2, "during-call": 3, "during-teardown": 0}
# Sandbox.run in the test (spawn mode, no fork): nothing yet; the cloned init; the init and
# the payload.
SPAWN_STAGES = ("before-clone", "after-clone", "after-mounts")
MIN_PROCS_SPAWN = {"before-clone": 0, "after-clone": 1, "after-mounts": 2}
ROUNDS, XDIST_ROUNDS = 5, 1          # per stage; --reliability-full: FULL_ROUNDS of each
FULL_ROUNDS = 20
GONE_WITHIN = 2.0      # seconds from the kill until every process of the sandbox is gone
READY_TIMEOUT = 60.0   # seconds for one pytest to reach the stage (a loaded machine is slow)
OTHERS = 6             # plain tests beside the sandboxed one (test_other), under xdist

INNER = '''
import os
import signal
import subprocess

import pytest

FIFO, _, STAGE = os.environ.get("INCARNATE_TEST_STAGE_FIFO", os.getcwd() + "/stage.fifo:none").rpartition(":")


def reached(stage):
    """The stages the test itself reaches (the package announces the others): say so, and
    stay here until killed."""
    if STAGE == stage:
        fd = os.open(FIFO, os.O_WRONLY)
        os.write(fd, (stage + "\\n").encode())
        os.close(fd)
        while True:
            signal.pause()


@pytest.fixture
def finalizer():
    yield
    reached("during-teardown")


@pytest.mark.incarnate(memory="64M", pids=64, binds=[os.path.dirname(FIFO)])
def test_blocked(finalizer):
    child = subprocess.Popen(["sleep", "1000"])  # a background child
    reached("during-call")
    child.kill()
    child.wait()


@pytest.mark.parametrize("n", range({others}))
def test_other(n):
    assert n >= 0


def test_spawned():
    from pytest_incarnate import Sandbox, Spec

    Sandbox(Spec(memory="64M", pids=64)).run(["sh", "-c", "sleep 1000 & wait"])
'''


def _bases() -> list[str]:
    return list(dict.fromkeys(H.v1.values())) + ([H.v2] if H.v2 else [])


def _run_dirs() -> set[str]:
    """Every run directory, in every hierarchy."""
    out: set[str] = set()
    for b in _bases():
        try:
            out.update(os.path.join(b, e) for e in os.listdir(b) if e.startswith(RUN_PREFIX))
        except OSError:
            pass
    return out


def _cgroup_procs(run_dirs: set[str]) -> set[int]:
    """Every process in the sandbox cgroups of these runs."""
    out: set[int] = set()
    for run_dir in run_dirs:
        for sb in os.listdir(run_dir):
            try:
                with open(os.path.join(run_dir, sb, "cgroup.procs")) as f:
                    out.update(int(x) for x in f.read().split())
            except (FileNotFoundError, NotADirectoryError):
                pass
    return out


def _run_pid(run_dir: str) -> int:
    """The process that made a run (``incarnate-<pid>-<hex>``)."""
    return int(os.path.basename(run_dir)[len(RUN_PREFIX):].split("-")[0])


def _mounts_of(ns_fd: int) -> set[str]:
    """The mount table (mount ids and all) of the mount namespace ``ns_fd`` refers to."""
    out = subprocess.run(["nsenter", f"--mount=/proc/self/fd/{ns_fd}", "cat", "/proc/self/mountinfo"],
                         pass_fds=[ns_fd], capture_output=True, text=True, check=True, timeout=30)
    return set(out.stdout.splitlines())


def _temp_entries() -> set[str]:
    out: set[str] = set()
    for d in dict.fromkeys(("/tmp", "/var/tmp", _run_lock_dir())):
        if os.path.isdir(d):
            out.update(os.path.join(d, e) for e in os.listdir(d))
    return out


@pytest.fixture(scope="module")
def subreaper():
    """The killed pytest's orphans (its forked child, the sandbox's init) come back to this
    process, which reaps them: "gone from /proc" can then be checked exactly (pid 1 here
    reaps orphans only every few seconds)."""
    was = prctl(PR_GET_CHILD_SUBREAPER)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    yield
    prctl(PR_SET_CHILD_SUBREAPER, was)


def _rounds(request: pytest.FixtureRequest, normal: int) -> int:
    return FULL_ROUNDS if request.config.getoption("reliability_full", default=False) else normal


@dataclass
class Killed:
    seconds: float       # from the kill until every process was gone
    processes: int       # how many there were


class Round:
    """One inner pytest run, killed at a stage."""

    def __init__(self, project: str, stage: str, mode: str) -> None:
        self.project, self.stage, self.mode = project, stage, mode
        self.xdist = mode == "xdist"
        self.min_procs = {"spawn": MIN_PROCS_SPAWN, "xdist": MIN_PROCS}.get(mode, MIN_PROCS_DIRECT)[stage]
        self.fifo = os.path.join(project, "stage.fifo")
        if not os.path.exists(self.fifo):
            os.mkfifo(self.fifo)
        self.log = os.path.join(project, "inner.log")
        self.pids: set[int] = set()
        self.test_file = os.path.join(project, "test_blocked.py")
        with open(self.test_file, "w") as f:
            f.write(INNER.format(others=OTHERS))

    def output(self) -> str:
        with open(self.log, "rb") as f:
            return f.read().decode(errors="replace")

    def run(self, next_run: str = "sweep") -> Killed:
        """One round; ``next_run``: "sweep" (``cgroups.sweep()`` here) or "pytest" (a fresh run
        of the sandboxed test, without the hook)."""
        before = (_run_dirs(), _temp_entries())
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))}
        env["INCARNATE_TEST_STAGE_FIFO"] = f"{self.fifo}:{self.stage}"
        # pytest runs in a mount namespace of its own, a private copy of this one, whose table
        # it saves first: only the processes of this round can mount there, so whatever is new
        # in it afterwards is what the run left behind (the tests of others, on this machine,
        # mount in the host's meanwhile).  unshare and sh exec: pytest keeps the pid.
        self.mounts_file = os.path.join(self.project, "mountinfo.before")
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'cat /proc/self/mountinfo > "$0" && exec "$@"', self.mounts_file,
                sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
        if self.mode == "xdist":   # the sandboxed test and the plain ones
            argv += [self.test_file, "-n", "2", "-k", "not spawned"]
        else:
            argv.append(self.test_file + ("::test_spawned" if self.mode == "spawn" else "::test_blocked"))
        # Opened before pytest starts: no writer yet, so select waits for one; the stage's
        # writers do not block in open.
        reader = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)
        try:
            with open(self.log, "wb") as out:
                proc = subprocess.Popen(argv, cwd=self.project, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT)
            self.pids = {proc.pid}   # the pytest processes of this round
            try:
                self._wait_for_stage(reader, proc)
                return self._kill_and_check(proc, before, next_run)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        finally:
            os.close(reader)

    def _wait_for_stage(self, reader: int, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        got = b""
        while (self.stage + "\n").encode() not in got:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                proc.kill()
                proc.wait()
                pytest.fail(f"the inner pytest never reached {self.stage} (exit {proc.returncode}):\n{self.output()}")
            r, _, _ = select.select([reader], [], [], min(left, 1.0))
            if r:
                got += os.read(reader, 64)
        assert got == (self.stage + "\n").encode(), got   # one process reached it, once

    def _target(self, proc: subprocess.Popen[bytes]) -> tuple[int, set[str]]:
        """The process to kill (pytest, or the xdist worker running the sandboxed test) and
        its run directories (``incarnate-<pid>-<hex>``: the run is made in that process)."""
        runs = _run_dirs()
        if not self.xdist:
            return proc.pid, {d for d in runs if _run_pid(d) == proc.pid}
        workers = set(children_map().get(proc.pid, []))
        self.pids.update(workers)
        target = workers & {_run_pid(d) for d in runs}
        assert len(target) == 1, (workers, runs)
        (pid,) = target
        return pid, {d for d in runs if _run_pid(d) == pid}

    def _kill_and_check(self, proc: subprocess.Popen[bytes], before: tuple[set[str], set[str]],
                        next_run: str) -> Killed:
        mount_ns = os.open(f"/proc/{proc.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)  # kept past the kill
        try:
            return self._kill_and_check_in(proc, before, next_run, mount_ns)
        finally:
            os.close(mount_ns)

    def _kill_and_check_in(self, proc: subprocess.Popen[bytes], before: tuple[set[str], set[str]],
                           next_run: str, mount_ns: int) -> Killed:
        target, run_dirs = self._target(proc)
        assert run_dirs, f"no cgroup of the sandboxed test's run (pid {target})"
        # Below the killed process, and in its sandbox cgroups (a process that left the tree
        # stays in those).
        below = set(descendants(target)) | _cgroup_procs(run_dirs)
        assert len(below) >= self.min_procs, (self.stage, self.mode, below)
        tracked: dict[int, tuple[int, int]] = {}   # pid -> (pidfd, start time)
        for pid in below:
            start = start_time(pid)
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            if start is not None:
                tracked[pid] = (fd, start)
            else:
                os.close(fd)
        try:
            t0 = time.monotonic()
            os.kill(target, signal.SIGKILL)
            seconds = self._wait_gone(tracked, t0)
        finally:
            for fd, _ in tracked.values():
                os.close(fd)

        if self.xdist:
            # The controller goes on: the test is reported as crashed, the others pass.
            rc = proc.wait(timeout=120)
            out = self.output()
            assert rc == 1, out
            assert re.search(r"worker 'gw\d' crashed while running 'test_blocked\.py::test_blocked'", out), out
            counts = dict((w, int(n)) for n, w in re.findall(r"(\d+) (failed|passed|error)", out.splitlines()[-1]))
            # during-teardown: the call's report (passed) was in before the crash
            passed = OTHERS + (1 if self.stage == "during-teardown" else 0)
            assert counts == {"failed": 1, "passed": passed}, out
        else:
            assert proc.wait(timeout=30) == -signal.SIGKILL

        # The next run: no cgroup, lock file or temp entry of the killed run is left, and
        # nothing is mounted in the mount namespace it ran in.
        runs_before, temp_before = before
        if next_run == "pytest":
            self._next_run()
        else:
            sweep()
        left = sorted(_run_dirs() & run_dirs)
        assert left == [], f"cgroups of the killed run left after the sweep ({self.stage}): {left}"
        # Nor of any other pytest process of this round (the other xdist worker, the next run).
        # Runs of other processes on this machine are not looked at: their tests may run now.
        new_runs = sorted(d for d in _run_dirs() - runs_before if _run_pid(d) in self.pids)
        assert new_runs == [], f"run directories left after the inner run ({self.stage}): {new_runs}"
        ids = [os.path.basename(d)[len(RUN_PREFIX):] for d in run_dirs]
        new_temp = sorted(e for e in _temp_entries() - temp_before if any(i in e for i in ids))
        assert new_temp == [], f"temp entries of the killed run left ({self.stage}): {new_temp}"
        with open(self.mounts_file) as f:
            mounts_before = set(f.read().splitlines())
        assert mounts_before, "the inner run's mount table was not saved"
        new_mounts = sorted(_mounts_of(mount_ns) - mounts_before)
        assert new_mounts == [], f"mounts left in pytest's mount namespace ({self.stage}): {new_mounts}"
        return Killed(seconds, len(tracked))

    def _next_run(self) -> None:
        """A fresh pytest run of the sandboxed test, without the hook: it sweeps what dead runs
        left when it makes its first cgroup."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST", "INCARNATE_TEST_STAGE_FIFO"))}
        with open(self.log, "wb") as out:
            nxt = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                                    self.test_file + "::test_blocked"], cwd=self.project, env=env,
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self.pids.add(nxt.pid)
        assert nxt.wait(timeout=120) == 0, self.output()

    def _wait_gone(self, tracked: dict[int, tuple[int, int]], t0: float) -> float:
        """Wait until every tracked process has exited (its pidfd is readable) and is out of
        /proc (reaped: the ones orphaned to this subreaper are reaped here); the time since
        the kill.  Fails past GONE_WITHIN."""
        deadline = t0 + GONE_WITHIN
        waiting = {fd: pid for pid, (fd, _) in tracked.items()}
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            r, _, _ = select.select(list(waiting), [], [], left)
            for fd in r:
                del waiting[fd]
        assert not waiting, (f"{self.stage}: sandbox processes still running {GONE_WITHIN} s after the kill: "
                             f"{sorted(waiting.values())}")
        # Reap the ones orphaned to this subreaper.  A zombie whose parent is another process
        # of the sandbox comes here only once that parent is reaped: poll for it.
        while True:
            alive = []
            for pid, (fd, start) in tracked.items():
                if start_time(pid) != start:
                    continue
                try:
                    os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
                except ChildProcessError:
                    pass   # not (yet) ours: reaped by its parent, or inside its pid namespace
                if start_time(pid) == start:
                    alive.append(pid)
            now = time.monotonic()
            if not alive:
                return now - t0
            assert now < deadline, f"{self.stage}: sandbox processes still in /proc {GONE_WITHIN} s after the kill: {alive}"
            time.sleep(0.001)


def _kills(tmp_path: Path, stage: str, mode: str, rounds: int) -> None:
    rnd = Round(str(tmp_path), stage, mode)
    kills = [rnd.run("pytest" if i == rounds - 1 else "sweep") for i in range(rounds)]
    times = sorted(k.seconds for k in kills if k.processes)
    most = max(k.processes for k in kills)
    gone = (f"all gone {times[-1] * 1000:.1f} ms after the kill at most (median {times[len(times) // 2] * 1000:.1f} ms)"
            if times else "none running at the kill")
    print(f"\nkill matrix [{mode}] {stage}: {len(kills)} kills, up to {most} sandbox processes, {gone}")


@pytest.mark.parametrize("stage", STAGES)
def test_pytest_killed_at_stage(stage: str, tmp_path: Path, request: pytest.FixtureRequest, subreaper: None) -> None:
    _kills(tmp_path, stage, "call", _rounds(request, ROUNDS))


@pytest.mark.parametrize("stage", SPAWN_STAGES)
def test_pytest_killed_at_stage_of_sandbox_run(stage: str, tmp_path: Path, request: pytest.FixtureRequest,
                                               subreaper: None) -> None:
    """The same stages when the test runs a program with Sandbox.run (spawn mode, no fork)."""
    _kills(tmp_path, stage, "spawn", _rounds(request, ROUNDS))


@pytest.mark.parametrize("stage", STAGES)
def test_xdist_worker_killed_at_stage(stage: str, tmp_path: Path, request: pytest.FixtureRequest,
                                      subreaper: None) -> None:
    pytest.importorskip("xdist")
    full = request.config.getoption("reliability_full", default=False)
    if stage != "during-call" and not full:
        pytest.skip("under xdist, the stages other than during-call run with --reliability-full")
    _kills(tmp_path, stage, "xdist", _rounds(request, XDIST_ROUNDS))
