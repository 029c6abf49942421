"""Acceptance: pytest SIGKILLed in the middle of a sandboxed test, 20 times; after the next
run's sweep, no cgroup, process or temp entry of those runs is left.

Each round runs ``python -m pytest test_blocked.py -p no:cacheprovider`` as a subprocess. Its one
test has ``@pytest.mark.incarnate(memory="64M", pids=64)``. The test starts two background
``sleep 1000`` and says it is ready through a FIFO, which is bind-mounted into the
sandbox. Then it waits for the sleeps. The test here blocks on the FIFO until then (select
with a deadline). It reads the run's id and the sandbox's processes from the cgroups that
appeared, and SIGKILLs the pytest process.

Each killed pytest's pid is in its run's name (``incarnate-<pid>-<hex>``). The run is made
in the pytest process, not in the forked child that runs the test, so the id is found by
that prefix under the memory controller's own cgroup.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from _procs import PR_GET_CHILD_SUBREAPER, PR_SET_CHILD_SUBREAPER, descendants, prctl, start_time

from pytest_incarnate.cgroups import RUN_PREFIX, Hierarchy, _run_lock_dir, sweep

H = Hierarchy.detect()
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or "memory" not in H.v1, reason="needs root and the cgroup v1 memory controller"
)

ROUNDS = 20
READY_TIMEOUT = 20.0   # seconds for one pytest to reach the blocked test
EXIT_TIMEOUT = 10.0    # seconds for every sandbox process to be gone after the kills

INNER = '''
import os

import pytest

FIFO = {fifo!r}


@pytest.mark.incarnate(memory="64M", pids=64, binds=[os.path.dirname(FIFO)])
def test_blocked():
    os.system(f"sleep 1000 & sleep 1000 & echo ready > {{FIFO}}; wait")
'''


def _bases() -> list[str]:
    return list(dict.fromkeys(H.v1.values())) + ([H.v2] if H.v2 else [])


def _run_dirs(run_id: str) -> list[str]:
    return [p for p in (os.path.join(b, RUN_PREFIX + run_id) for b in _bases()) if os.path.isdir(p)]


def _procs(run_id: str) -> set[int]:
    """Every pid in every sandbox cgroup of the run, in every controller."""
    out: set[int] = set()
    for run_dir in _run_dirs(run_id):
        for sb in os.listdir(run_dir):
            p = os.path.join(run_dir, sb, "cgroup.procs")
            if sb.startswith("sb-") and os.path.exists(p):
                with open(p) as f:
                    out.update(int(x) for x in f.read().split())
    return out


def _wait_ready(fifo: str, proc: subprocess.Popen[bytes], log: str) -> None:
    """Block on the FIFO until the sandboxed test writes its line (or pytest ends)."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # no writer yet: select waits for one
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        got = b""
        while b"ready\n" not in got:
            left = deadline - time.monotonic()
            if left <= 0 or proc.poll() is not None:
                proc.kill()
                proc.wait()
                with open(log, "rb") as f:
                    out = f.read().decode(errors="replace")
                pytest.fail(f"the inner pytest never reached its test (exit {proc.returncode}):\n{out}")
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if r:
                got += os.read(fd, 64)
    finally:
        os.close(fd)


def test_pytest_killed_mid_test_20_times_leaves_nothing_after_sweep(tmp_path: Path) -> None:
    fifo = str(tmp_path / "ready")
    os.mkfifo(fifo)
    test_file = tmp_path / "test_blocked.py"
    test_file.write_text(textwrap.dedent(INNER.format(fifo=fifo)))
    log = str(tmp_path / "inner.log")
    with open("/proc/self/mountinfo") as f:
        mounts_before = len(f.readlines())

    # The sandbox's init (and a forked monitor, if there is one) is orphaned by the kill. As a subreaper, this process adopts them and
    # reaps them, so "gone from /proc" can be checked exactly. (pid 1 here reaps orphans only
    # every few seconds.)
    was_subreaper = prctl(PR_GET_CHILD_SUBREAPER)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    run_ids: list[str] = []
    tracked: dict[int, tuple[int, int]] = {}   # pid -> (pidfd, start time)
    try:
        for _ in range(ROUNDS):
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "pytest", str(test_file), "-p", "no:cacheprovider", "-q"],
                                        cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            _wait_ready(fifo, proc, log)
            mine = [e for e in os.listdir(H.v1["memory"]) if e.startswith(f"{RUN_PREFIX}{proc.pid}-")]
            assert len(mine) == 1, mine
            run_id = mine[0][len(RUN_PREFIX):]
            run_ids.append(run_id)
            in_cgroup = _procs(run_id)
            # the init, the test's process, its shell and the two sleeps
            assert len(in_cgroup) >= 5, (run_id, in_cgroup)
            # every process of the run is below the pytest process (the init is its child:
            # pytest starts it itself; a forked monitor, from a threaded caller, would be
            # below it too, outside the cgroup)
            below = set(descendants(proc.pid))
            assert in_cgroup <= below, (run_id, in_cgroup, below)
            for pid in below:
                start = start_time(pid)
                try:
                    tracked[pid] = (os.pidfd_open(pid), start or -1)
                except ProcessLookupError:
                    pass   # already gone
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            assert _run_dirs(run_id), "the killed run left no cgroup to sweep"

        # Every sandbox process ends (the init has a parent-death signal): wait on the pidfds.
        deadline = time.monotonic() + EXIT_TIMEOUT
        waiting = {fd: pid for pid, (fd, _) in tracked.items()}
        while waiting and time.monotonic() < deadline:
            r, _, _ = select.select(list(waiting), [], [], max(0.0, deadline - time.monotonic()))
            for fd in r:
                del waiting[fd]
        assert not waiting, f"sandbox processes still running {EXIT_TIMEOUT} s after the kills: {sorted(waiting.values())}"
        for fd, _ in tracked.values():
            try:
                os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)   # the adopted ones
            except ChildProcessError:
                pass   # not our child: reaped inside its pid namespace, or by its parent

        # The next run's sweep. It runs after the processes are gone, because the forked
        # test process holds the run's lock fd while it lives.
        sweep()
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, was_subreaper)
        for fd, _ in tracked.values():
            os.close(fd)

    assert len(set(run_ids)) == ROUNDS
    left_dirs = [d for run_id in run_ids for d in _run_dirs(run_id)]
    assert left_dirs == [], "cgroups left after the sweep"
    left_procs = sorted(pid for pid, (_, start) in tracked.items() if start_time(pid) == start)
    assert left_procs == [], "processes of the killed runs still in /proc"
    lock_dir = _run_lock_dir()
    left_tmp = [os.path.join(d, e) for d in dict.fromkeys(("/tmp", "/run/pytest-incarnate", lock_dir)) if os.path.isdir(d)
                for e in os.listdir(d) if any(run_id in e for run_id in run_ids)]
    assert left_tmp == [], "temp entries of the killed runs left"
    with open("/proc/self/mountinfo") as f:
        assert len(f.readlines()) == mounts_before, "mounts left in the host's mount namespace"
