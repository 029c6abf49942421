"""Reliability: long runs leave nothing behind, pid 1 reports and reaps, and forking from a
busy multi-threaded process does not deadlock.

Short forms run in CI; ``--reliability-full`` switches on the long forms (see
docs/reliability.md for the figures and the commands that reproduce them):

- soak: N sandboxed tests in a row in a separate pytest process, and N across ``-n 2``
  (1,000 each; full: 10,000 each). Before and after, the host is counted: mounts of the
  host's mount namespace, processes and zombies, namespaces, the project's cgroup
  directories, run locks and temp entries; the inner pytest's own fds are counted at every
  test by a fixture of the generated project (fixtures run in the pytest process).
- pid 1: a test that SIGTERMs itself is reported killed by SIGTERM (plugin, ``Sandbox.call``,
  ``Sandbox.run``); 1,000 orphaned grandchildren are reaped by the sandbox's init.
- fork while threaded: sandboxed calls from a process with 8 threads busy in logging,
  allocation and imports (500; full: 2,000), each with a 10 s timeout, the whole in a
  subprocess with a timeout.

The machine may be shared (other pytest runs making sandboxes at the same time), so every
host count is taken globally, and what changed is attributed: a difference fails the test
unless it belongs to a live process outside this test's process tree. During a soak this
process is a child subreaper, so whatever the inner run orphaned comes back into that tree.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _procs import PR_GET_CHILD_SUBREAPER, PR_SET_CHILD_SUBREAPER, prctl

from pytest_incarnate import Sandbox, Spec
from pytest_incarnate.cgroups import RUN_PREFIX, Hierarchy, _run_lock_dir
from pytest_incarnate.errors import SandboxCrashed
from pytest_incarnate.sandbox import _PENDING_MAX

pytest_plugins = ["pytester"]

ROOT = os.geteuid() == 0

SOAK_SHORT, SOAK_FULL = 1_000, 10_000
THREADED_SHORT, THREADED_FULL = 500, 2_000
ORPHANS = 1_000

try:
    import xdist  # noqa: F401

    HAVE_XDIST = True
except ImportError:
    HAVE_XDIST = False


def _full(config: pytest.Config) -> bool:
    return bool(config.getoption("--reliability-full", default=False))


# --------------------------------------------------------------------------- host counts


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _processes() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, state, start time) of every process on the host."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(entry)
            if f is not None:
                out[int(entry)] = (int(f[1]), f[0], int(f[19]))
    return out


def _tree(procs: dict[int, tuple[int, str, int]], root: int) -> set[int]:
    """``root``'s descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out: set[int] = set()
    todo = [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _ns_holders() -> dict[str, set[int]]:
    """Every namespace a process is in ("mnt:[4026531841]") -> the pids in it."""
    out: dict[str, set[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            kinds = os.listdir(f"/proc/{entry}/ns")
        except OSError:
            continue
        for kind in kinds:
            try:
                out.setdefault(os.readlink(f"/proc/{entry}/ns/{kind}"), set()).add(int(entry))
            except OSError:
                pass
    return out


def _lsns_count() -> int | None:
    """The number of namespaces ``lsns`` lists (None: no lsns here)."""
    if shutil.which("lsns") is None:
        return None
    r = subprocess.run(["lsns", "--raw", "--noheadings", "--output", "NS"], capture_output=True, text=True, check=False)
    return len(set(r.stdout.split())) if r.returncode == 0 else None


def _cgroup_mounts() -> list[str]:
    """Every cgroup hierarchy's mount point (v1 controllers and the v2 hierarchy)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[0] in ("cgroup", "cgroup2"):
                out.append(left.split()[4])
    return out


def _cgroup_dirs() -> set[str]:
    """The project's cgroup directories (``incarnate-<run>`` and the ``sb-<n>`` in them)
    anywhere in any hierarchy. The own cgroups ``Hierarchy.detect()`` names are where they
    are made; the whole of each hierarchy is walked, in case one is made elsewhere."""
    h = Hierarchy.detect()
    tops = set(_cgroup_mounts()) | set(h.v1.values()) | ({h.v2} if h.v2 else set())
    out: set[str] = set()
    for top in tops:
        for d, subdirs, _ in os.walk(top):
            for s in subdirs:
                if s.startswith(RUN_PREFIX):
                    out.add(os.path.join(d, s))
                    out.update(os.path.join(d, s, sb) for sb in os.listdir(os.path.join(d, s)) if sb.startswith("sb-"))
    return {os.path.normpath(p) for p in out}


def _temp_entries() -> set[str]:
    """Temp entries of the project: names with "incarnate" in /tmp and /var/tmp, and run
    locks in the run-lock directory."""
    out = set()
    for d in ("/tmp", "/var/tmp"):
        out.update(os.path.join(d, e) for e in os.listdir(d) if "incarnate" in e)
    lock_dir = _run_lock_dir()
    if os.path.isdir(lock_dir):
        out.update(os.path.join(lock_dir, e) for e in os.listdir(lock_dir))
    return out


@dataclass
class Snapshot:
    mounts: list[str]                         # /proc/1/mountinfo: the host's mount namespace
    procs: dict[int, tuple[int, str, int]]    # every process
    mine: set[int]                            # this process's descendants
    namespaces: dict[str, set[int]]
    lsns: int | None
    cgroups: set[str]
    temp: set[str]
    fds: int                                  # this process's

    @classmethod
    def take(cls) -> Snapshot:
        with open("/proc/1/mountinfo") as f:
            mounts = f.read().splitlines()
        procs = _processes()
        return cls(mounts, procs, _tree(procs, os.getpid()), _ns_holders(), _lsns_count(), _cgroup_dirs(),
                   _temp_entries(), len(os.listdir("/proc/self/fd")))

    def zombies(self) -> set[tuple[int, int]]:
        return {(pid, start) for pid, (_, state, start) in self.procs.items() if state == "Z"}

    def figures(self) -> dict[str, int | None]:
        return {
            "mountinfo lines (host)": len(self.mounts),
            "processes (system)": len(self.procs),
            "descendants of the test": len(self.mine),
            "zombies (system)": len(self.zombies()),
            "zombies below the test": sum(1 for p in self.mine if self.procs.get(p, (0, ""))[1] == "Z"),
            "namespaces (lsns)": self.lsns,
            "namespaces (/proc/*/ns)": len(self.namespaces),
            "incarnate-* cgroup dirs": len(self.cgroups),
            "temp entries and run locks": len(self.temp),
            "fds of the test process": self.fds,
        }


def _run_of(path: str) -> tuple[int, str] | None:
    """The pid and the run id in a run's name (``incarnate-<pid>-<hex>[/sb-<n>]``,
    ``run-<pid>-<hex>.lock``)."""
    m = re.search(r"(?:^|/)(?:incarnate-|run-)((\d+)-[0-9a-f]+)(?:\.lock)?(?:/sb-\d+)?$", path)
    return (int(m.group(2)), m.group(1)) if m else None


def _in_use_outside(paths: set[str], ours: set[int]) -> set[str]:
    """Those of ``paths`` that a live process outside ``ours`` has open (or something under
    them), or as its working directory: another run's on a shared machine."""
    out = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in ours:
            continue
        try:
            targets = [os.readlink(f"/proc/{entry}/cwd")]
            targets += [os.readlink(f"/proc/{entry}/fd/{fd}") for fd in os.listdir(f"/proc/{entry}/fd")]
        except OSError:
            continue
        for t in targets:
            out.update(p for p in paths if t == p or t.startswith(p + "/"))
    return out


def leaks(before: Snapshot, after: Snapshot, inner: set[int], others: dict[str, list[str]]) -> dict[str, Any]:
    """What the run in between left behind (empty: nothing). ``inner``: the pids of the
    run's pytest processes and of their children seen at any test (the forked processes
    that enter the sandboxes). What is not this run's is put in ``others``: namespaces
    held only by live processes outside this test's tree, cgroup directories and run
    locks named after a process that was not this run's, other temp entries in use by a
    live process outside this test's tree (another run on the machine)."""
    out: dict[str, Any] = {}
    if sorted(after.mounts) != sorted(before.mounts):
        out["mounts"] = {"new": sorted(set(after.mounts) - set(before.mounts)),
                         "gone": sorted(set(before.mounts) - set(after.mounts))}
    new_mine = {p: after.procs[p] for p in after.mine - before.mine if p in after.procs}
    if new_mine:
        out["processes"] = new_mine   # alive or zombie, below this process (a subreaper)
    own_zombies = {z for z in after.zombies() - before.zombies() if after.procs[z[0]][0] in after.mine | {os.getpid()}}
    if own_zombies:
        out["zombies"] = sorted(own_zombies)
    ours = after.mine | {os.getpid()}
    new_ns = {ns: pids for ns, pids in after.namespaces.items() if ns not in before.namespaces}
    held = {ns: sorted(pids) for ns, pids in new_ns.items() if pids & ours or not pids}
    if held:
        out["namespaces"] = held
    if len(new_ns) > len(held):
        others["namespaces"] = sorted(set(new_ns) - set(held))
    for what, b, a in (("cgroups", before.cgroups, after.cgroups), ("temp", before.temp, after.temp)):
        left = []
        new = a - b
        in_use = _in_use_outside(new, ours) if new else set()
        for p in sorted(new):
            run = _run_of(p)
            if (run is not None and run[0] not in inner | ours) or (run is None and p in in_use):
                others.setdefault(what, []).append(p)   # made by, or in use by, a process outside this run
            else:
                left.append(p)
        if left:
            out[what] = left
    if after.fds != before.fds:
        out["fds"] = (before.fds, after.fds, sorted(os.listdir("/proc/self/fd")))
    return out


def _adopted_cleanup(before: set[int]) -> None:
    """Reap (or end, then reap) what this process adopted as a subreaper during a run: the
    test has already failed on them; nothing may be left behind by the test either."""
    procs = _processes()
    for pid in sorted(_tree(procs, os.getpid()) - before):
        if procs[pid][0] != os.getpid():
            continue
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if procs[pid][1] != "Z":
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            os.waitid(os.P_PIDFD, fd, os.WEXITED)
        except ChildProcessError:
            pass
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- 2. leak soak

SOAK_CONFTEST = '''
import json, os

import pytest

FDS, CHILDREN, CHILD_PIDS, LIMITED = [], [], set(), []


def pytest_configure(config):
    # every pytest process of the run (the xdist controller and its workers too)
    with open(os.path.join(str(config.rootpath), f"soak-pid-{os.getpid()}"), "w") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "main"))


def _children():
    me, out = str(os.getpid()), []
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        out.append(int(e))
            except OSError:
                pass
    return out


@pytest.fixture(autouse=True)
def counted(request):
    """In the pytest process, before each test: its open fds and its children."""
    marker = request.node.get_closest_marker("incarnate")
    if marker is not None and "memory" in marker.kwargs:
        LIMITED.append(len(FDS))   # the first of these makes the run (its lock stays open)
    FDS.append(len(os.listdir("/proc/self/fd")))
    children = _children()
    CHILDREN.append(len(children))
    CHILD_PIDS.update(children)
    yield


@pytest.fixture
def host_unchanged(request):
    """After a test that wrote files inside: none of them is on the host."""
    yield
    i = request.node.callspec.params["i"]
    for p in (f"/etc/incarnate-soak-{i}", f"/tmp/incarnate-soak-{i}", f"/var/tmp/incarnate-soak-{i}",
              os.path.join(str(request.config.rootpath), f"written-{i}")):
        assert not os.path.lexists(p), p


@pytest.fixture(scope="session", autouse=True)
def record(request):
    """Written at the end of the session, from the pytest process: the sandboxed test
    bodies' writes vanish with their sandboxes, the fixtures' do not."""
    yield
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    data = {"pid": os.getpid(), "fds": FDS, "children": CHILDREN, "child_pids": sorted(CHILD_PIDS), "limited": LIMITED,
            "fds_at_end": len(os.listdir("/proc/self/fd"))}
    with open(os.path.join(str(request.config.rootpath), f"soak-{worker}.json"), "w") as f:
        json.dump(data, f)
'''

SOAK_TESTS = '''
import os, signal, socket, subprocess

import pytest

N, EVERY, PORT = {n}, {every}, {port}


def cases():
    for i in range(N):
        if i % EVERY == 4:   # limits: cgroups made and removed on the way
            yield pytest.param(i, marks=pytest.mark.incarnate(memory="64M", pids=64))
        else:
            yield i


@pytest.mark.parametrize("i", cases())
def test_soak(i, request):
    assert os.getpid() == 2
    kind = i % EVERY
    if kind == 1:   # files: the host's /etc and /var/tmp, the scratch /tmp, the project
        request.getfixturevalue("host_unchanged")
        for p in (f"/etc/incarnate-soak-{{i}}", f"/tmp/incarnate-soak-{{i}}", f"/var/tmp/incarnate-soak-{{i}}",
                  f"written-{{i}}"):
            with open(p, "w") as f:
                f.write("x" * 4096)
            assert os.path.getsize(p) == 4096
    elif kind == 2:   # background children, left running: a child and an orphan
        subprocess.Popen(["sleep", "1000"], start_new_session=True)
        assert os.system("sleep 1000 & echo started > /tmp/bg") == 0
        assert open("/tmp/bg").read() == "started\\n"
    elif kind == 3:   # the port the host's loopback has in use, bound and left open
        s = socket.socket()
        s.bind(("127.0.0.1", PORT))
        s.listen()
        c = socket.create_connection(("127.0.0.1", PORT))
        a, _ = s.accept()
        c.sendall(b"ping")
        assert a.recv(4) == b"ping"
    elif kind == 4:
        with open("/proc/self/cgroup") as f:
            assert f.read()
'''


def _soak(pytester: pytest.Pytester, n: int, workers: int) -> None:
    every = 50
    # The host's loopback has the port in use for the whole run; each sandbox binds it too.
    host_listener = socket.socket()
    host_listener.bind(("127.0.0.1", 0))
    host_listener.listen()
    port = host_listener.getsockname()[1]
    pytester.makeconftest(SOAK_CONFTEST)
    pytester.makepyfile(test_soak=SOAK_TESTS.format(n=n, every=every, port=port))
    args = ["-p", "no:cacheprovider", "-q", "--incarnate"] + (["-n", str(workers)] if workers else [])

    was_subreaper = prctl(PR_GET_CHILD_SUBREAPER)
    prctl(PR_SET_CHILD_SUBREAPER, 1)   # what the run orphans comes back below this process
    before = Snapshot.take()
    try:
        t0 = time.monotonic()
        result = pytester.runpytest_subprocess(*args, timeout=max(300, n * 0.2))
        elapsed = time.monotonic() - t0
        after = Snapshot.take()
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, was_subreaper)
        _adopted_cleanup(before.mine)
        host_listener.close()

    outcomes = result.parseoutcomes()
    if outcomes.get("passed") != n or outcomes.get("failed") or outcomes.get("errors"):
        out = "\n".join(result.outlines)
        start = out.find("= FAILURES =")
        pytest.fail(f"{n} sandboxed tests: {outcomes}\n" + (out[start - 30:][:20000] if start >= 0 else out[-20000:]))
    records = [json.loads(p.read_text()) for p in sorted(pytester.path.glob("soak-*.json"))]
    pytest_pids = {int(p.name.rsplit("-", 1)[1]) for p in pytester.path.glob("soak-pid-*")}
    assert len(records) == max(1, workers) and {r["pid"] for r in records} <= pytest_pids
    inner = pytest_pids.union(*(r["child_pids"] for r in records))
    assert sum(len(r["fds"]) for r in records) == n
    for r in records:
        # The first tests open lazy things (the run's lock, with the first test that has
        # limits): from the 10th test, and from the one after the first with limits, the
        # count must not move.
        r["ref"] = max(9, r["limited"][0] + 1)
    others: dict[str, list[str]] = {}
    left = leaks(before, after, inner, others)
    fb, fa = before.figures(), after.figures()
    print(f"\nsoak: {n} tests, {workers or 1} process(es), {elapsed:.1f} s, {n / elapsed:.0f} tests/s "
          f"({n // every} each writing files, starting children, binding the port, with limits)")
    for k in fb:
        print(f"  {k:28} before {fb[k]!s:>6}  after {fa[k]!s:>6}")
    print("  fds of the inner pytest(s): " + ", ".join(
        f"{r['fds'][r['ref']]} at test {r['ref'] + 1}, {r['fds_at_end']} at the end of {len(r['fds'])}" for r in records))
    for k, v in others.items():
        print(f"  not this run's (other processes on the machine meanwhile): {len(v)} {k}")
    for r in records:
        fds, ref = r["fds"], r["ref"]
        assert ref < len(fds) // 2, (ref, len(fds))
        assert set(fds[ref:]) == {fds[ref]}, f"fds of pytest {r['pid']} at each test from the {ref + 1}th: {sorted(set(fds[ref:]))}"
        assert r["fds_at_end"] == fds[ref], (r["fds_at_end"], fds[ref])
        # At most the last sandboxes still on their way out, reaped at a later call once gone,
        # and never more than PENDING_MAX + 1 of them (the newest is added after the reap):
        # one child each (its init) in one process, two under xdist (a worker has a thread:
        # the held init and the worker's copy that joined it).
        per_call = 2 if workers else 1
        assert max(r["children"]) <= per_call * (_PENDING_MAX + 1), f"children of pytest {r['pid']}: up to {max(r['children'])}"
    assert not left, f"left behind by {n} sandboxed tests: {left}"


@pytest.mark.skipif(not ROOT, reason="counts the host's cgroups and mounts as root")
def test_soak_sequential_leaves_nothing(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> None:
    _soak(pytester, SOAK_FULL if _full(request.config) else SOAK_SHORT, workers=0)


@pytest.mark.skipif(not ROOT, reason="counts the host's cgroups and mounts as root")
@pytest.mark.skipif(not HAVE_XDIST, reason="needs pytest-xdist")
def test_soak_xdist_two_workers_leaves_nothing(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> None:
    _soak(pytester, SOAK_FULL if _full(request.config) else SOAK_SHORT, workers=2)


# --------------------------------------------------------------------------- 3. pid 1

TERM_SUITE = """
import os, signal

import pytest


def test_sigterm_self():
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("still running after SIGTERM")


@pytest.mark.incarnate(timeout=30)
def test_sigterm_to_init_reaches_the_test():
    os.kill(1, signal.SIGTERM)   # the init forwards it to the test (pid 2)
    signal.pause()


def test_alive_after():
    assert os.getpid() == 2
"""


@pytest.mark.parametrize("path", ["direct", "join"])
def test_sigterm_self_is_reported_as_sigterm_in_a_sandboxed_test(
    path: str, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, leak_check
) -> None:
    """Both ways a sandboxed test starts (direct enter; a held sandbox joined, as from an
    xdist worker): the init forwards a SIGTERM to the test, pid 2, which dies of it."""
    from pytest_incarnate import sandbox as sandbox_module

    if path == "join":
        if os.geteuid() != 0:
            pytest.skip("joining a held sandbox needs root")
        monkeypatch.setattr(sandbox_module, "DIRECT", False)
    pytester.makepyfile(TERM_SUITE)
    result = pytester.runpytest("--incarnate", "-p", "no:cacheprovider", "-rf")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines([
        "*_ test_sigterm_self _*",
        "sandboxed test crashed: killed by signal 15 (SIGTERM)",
        "*_ test_sigterm_to_init_reaches_the_test _*",
        "sandboxed test crashed: killed by signal 15 (SIGTERM)",
        "*short test summary*",
        "FAILED *::test_sigterm_self*",
        "FAILED *::test_sigterm_to_init_reaches_the_test*",
    ])
    result.stdout.no_fnmatch_line("*still running after SIGTERM*")


def _term_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    raise AssertionError("still running after SIGTERM")


def test_sigterm_self_is_reported_as_sigterm_by_sandbox_call_and_run(leak_check) -> None:
    with pytest.raises(SandboxCrashed) as info:
        Sandbox().call(_term_self)
    assert info.value.signal == signal.SIGTERM and info.value.returncode == -signal.SIGTERM
    assert str(info.value) == "the sandboxed call was killed by signal 15 (SIGTERM)"
    r = Sandbox().run(["sh", "-c", "kill -TERM $$; echo still running"])
    assert (r.signal, r.returncode, r.stdout) == (signal.SIGTERM, -signal.SIGTERM, b"")


def _orphans(n: int) -> dict[str, Any]:
    """In the sandbox (pid 2): fork n children that each fork a grandchild and exit at once.
    The grandchildren, orphaned, wait on a pipe until all of them are known, then exit; a
    pidfd of each says when it has been reaped (POLLHUP, Linux >= 6.9: reaped, not just
    exited), which only the sandbox's init can do. Then count the zombies here."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 64) if hard != resource.RLIM_INFINITY else n + 64, hard))
    info_r, info_w = os.pipe()
    go_r, go_w = os.pipe()
    for _ in range(n):
        child = os.fork()
        if child == 0:
            try:
                os.close(info_r)
                os.close(go_w)
                grandchild = os.fork()
                if grandchild == 0:
                    os.close(info_w)
                    os.read(go_r, 1)   # EOF once the payload closes go_w
                    os._exit(0)
                os.write(info_w, grandchild.to_bytes(4, "little"))
            finally:
                os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    os.close(info_w)
    os.close(go_r)
    data = b""
    while True:
        b = os.read(info_r, 1 << 16)
        if not b:
            break
        data += b
    os.close(info_r)
    grandchildren = [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]
    parents, pidfds = set(), []
    for g in grandchildren:
        pidfds.append(os.pidfd_open(g))   # before they may exit: the pid cannot be reused yet
        fields = _stat_fields(g)
        assert fields is not None and fields[0] != "Z"
        parents.add(int(fields[1]))
    os.close(go_w)   # every grandchild exits now
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLHUP)
    unreaped = set(pidfds)
    deadline = time.monotonic() + 60   # a watchdog, not a synchronisation
    while unreaped and time.monotonic() < deadline:
        for fd, _ in poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            poller.unregister(fd)
            unreaped.discard(fd)
    for fd in pidfds:
        os.close(fd)
    procs = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            fields = _stat_fields(e)
            if fields is not None:
                procs[int(e)] = fields[0]
    return {"grandchildren": len(grandchildren), "parents": sorted(parents), "unreaped": len(unreaped),
            "zombies": sorted(p for p, s in procs.items() if s == "Z"), "processes": sorted(procs)}


def test_init_reaps_a_thousand_orphans(leak_check) -> None:
    if tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2]) < (6, 9):
        pytest.skip("a pidfd reports reaping (POLLHUP) from Linux 6.9")
    was_subreaper = prctl(PR_GET_CHILD_SUBREAPER)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    before = Snapshot.take()
    try:
        out = Sandbox(Spec(timeout=120)).call(_orphans, ORPHANS)
        after = Snapshot.take()
    finally:
        prctl(PR_SET_CHILD_SUBREAPER, was_subreaper)
        _adopted_cleanup(before.mine)
    assert out["grandchildren"] == ORPHANS
    assert out["parents"] == [1], "the grandchildren were not reparented to the sandbox's init"
    assert out["unreaped"] == 0, f"{out['unreaped']} orphans not reaped by the init within 60 s"
    assert out["zombies"] == [] and out["processes"] == [1, 2], out
    # On the host: nothing below this process, no zombie of it (a subreaper: orphans come
    # here), and no new zombie on the machine that is this test's.
    assert after.mine == before.mine
    new_zombies = after.zombies() - before.zombies()
    assert not {z for z in new_zombies if after.procs[z[0]][0] in after.mine | {os.getpid()}}


# --------------------------------------------------------------------------- 4. fork while threaded

THREADED_SCRIPT = r'''
import faulthandler, importlib, json, logging, logging.handlers, os, sys, threading, time

from pytest_incarnate import Bind, Sandbox, Spec
from pytest_incarnate.errors import SandboxTimeout

calls, work, watchdog = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
faulthandler.dump_traceback_later(watchdog, exit=False)   # the stacks, if the outer timeout comes
sys.path.insert(0, work)
import reloaded   # noqa: E402  (written by the test)

# More switches between threads: more chances that a fork finds a lock held by another.
sys.setswitchinterval(0.001)
busy = logging.getLogger("busy")
busy.setLevel(logging.INFO)
busy.propagate = False
busy.addHandler(logging.handlers.RotatingFileHandler(os.path.join(work, "busy.log"), maxBytes=1 << 20, backupCount=1))
stop = threading.Event()
counts = {}


def logger(k):
    n = 0
    while not stop.is_set():
        busy.info("thread %d line %d", k, n)
        n += 1
    counts[f"logging{k}"] = n


def allocator(k):
    n, keep = 0, []
    while not stop.is_set():
        keep.append(bytearray(1 << (n % 21)))
        if len(keep) > 32:
            keep.clear()
        n += 1
    counts[f"allocation{k}"] = n


def importer(k):
    n = 0
    while not stop.is_set():
        if k == 0:
            importlib.reload(reloaded)
        else:
            name = f"fresh_{n}"
            path = os.path.join(work, name + ".py")
            with open(path, "w") as f:
                f.write(f"N = {n}\n")
            importlib.invalidate_caches()
            assert importlib.import_module(name).N == n
            del sys.modules[name]
            os.unlink(path)
        n += 1
    counts[f"imports{k}"] = n


threads = [threading.Thread(target=f, args=(k,), daemon=True) for f, n in ((logger, 3), (allocator, 3), (importer, 2))
           for k in range(n)]
for t in threads:
    t.start()

# The sandboxed function logs (the logging module's lock, held by the busy threads too, and a
# handler of its own), allocates, and imports a module never imported before (the import
# lock). It does not write through the busy threads' handler: a forked child that does can
# hang on the file object's own lock whatever made the fork (see docs/reliability.md).
inside_log = logging.getLogger("inside")
inside_log.propagate = False
inside_log.addHandler(logging.FileHandler(os.path.join(work, "inside.log")))


def inside(i):
    logging.getLogger(f"inside.{i % 7}").setLevel(logging.INFO)
    inside_log.warning("call %d", i)
    b = bytearray(1 << 16)
    import payload_mod
    return os.getpid(), payload_mod.VALUE, len(b), i


sb = Sandbox(Spec(timeout=10, binds=[Bind(work, readonly=True)]))
timeouts, errors = [], []
t0 = time.monotonic()
for i in range(calls):
    try:
        r = sb.call(inside, i)
        if r != (2, 7, 1 << 16, i):
            errors.append(f"{i}: {r!r}")
    except SandboxTimeout as e:
        timeouts.append(f"{i}: {e}")
    except Exception as e:
        errors.append(f"{i}: {e!r}")
elapsed = time.monotonic() - t0
stop.set()
for t in threads:
    t.join()
faulthandler.cancel_dump_traceback_later()
print(json.dumps({"calls": calls, "timeouts": timeouts, "errors": errors, "elapsed": elapsed, "counts": counts}))
'''


def test_fork_while_threaded_no_deadlock(tmp_path: Path, request: pytest.FixtureRequest, leak_check) -> None:
    calls = THREADED_FULL if _full(request.config) else THREADED_SHORT
    work = tmp_path / "work"
    work.mkdir()
    (work / "reloaded.py").write_text("VALUE = 42\n")
    (work / "payload_mod.py").write_text("VALUE = 7\n")
    script = tmp_path / "threaded.py"
    script.write_text(THREADED_SCRIPT)
    limit = 120 + calls * 1.0   # ~0.15 s per call here: a deadlock, not a slow machine, reaches it
    proc = subprocess.Popen([sys.executable, str(script), str(calls), str(work), str(limit - 10)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # its own session: it and whatever it started
        out, err = proc.communicate()
        pytest.fail(f"deadlock: {calls} sandboxed calls from a threaded process did not end in {limit:.0f} s\n"
                    f"{err.decode(errors='replace')[-5000:]}")
    assert proc.returncode == 0, err.decode(errors="replace")[-5000:]
    report = json.loads(out.decode().splitlines()[-1])
    print(f"\nfork while threaded: {calls} calls in {report['elapsed']:.1f} s "
          f"({report['elapsed'] / calls * 1000:.0f} ms per call); busy threads' iterations: {report['counts']}")
    assert report["timeouts"] == [], f"deadlocked calls (killed by the 10 s timeout): {report['timeouts'][:10]}"
    assert report["errors"] == [], report["errors"][:10]
    assert len(report["counts"]) == 8 and all(v > 0 for v in report["counts"].values()), report["counts"]
    # Every sandboxed call logged its line through the inherited handler.
    assert len((work / "inside.log").read_text().splitlines()) == calls


# --------------------------------------------------------------------------- found by the soak

HOST_MOUNT_SCRIPT = r'''
import ctypes, errno, json, os, sys

from pytest_incarnate import Sandbox, _ffi, probe

libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MNT_DETACH = 4096, 2


def mount(src, p, fstype, flags=0):
    if libc.mount(src.encode(), p.encode(), fstype.encode() if fstype else None, flags, None) != 0:
        raise OSError(ctypes.get_errno(), "mount", p)


def umount(p, flags=0):
    if libc.umount2(p.encode(), flags) != 0:
        raise OSError(ctypes.get_errno(), "umount", p)


LOOK = """
import json, os, sys


def look(d):
    # What is mounted and what exists under d.
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(mp for mp in (line.split()[4] for line in f) if mp == d or mp.startswith(d + "/"))
    seen = sorted(os.path.join(r, n) for r, ds, fs in os.walk(d) for n in ds + fs)
    return {"pid": os.getpid(), "mounts": mounts, "seen": seen}
"""
exec(LOOK)
case, d = sys.argv[1], sys.argv[2]
out = {}
pending = []


def remove():
    # What another test's teardown does on a shared machine, after this sandbox's plan read
    # the host's mounts and before its setup reaches them.
    while pending:
        what, p = pending.pop(0)
        if what == "tree":      # a mount and whatever is mounted under it, its directory removed
            umount(p, MNT_DETACH)
            os.rmdir(p)
        else:                   # a file mount, the file removed
            umount(p)
            os.unlink(p)
        out.setdefault("removed", []).append(p)


probe()  # its trial sandboxes come first, so that the removal falls between plan and setup
if case == "gone":
    # A host filesystem unmounted, its mount point removed, in the at-fork handler of
    # Sandbox.call's fork.
    os.mkdir(f"{d}/m")
    mount("tmpfs", f"{d}/m", "tmpfs")
    pending.append(("tree", f"{d}/m"))
    os.register_at_fork(before=remove)
elif case == "gone-nested":
    # Sandbox.run: a filesystem with another mounted under it, and a file mount, removed just
    # before the core starts the sandbox; a third mount stays.
    for sub in ("m", "k"):
        os.mkdir(f"{d}/{sub}")
        mount("tmpfs", f"{d}/{sub}", "tmpfs")
    os.mkdir(f"{d}/m/n")
    mount("tmpfs", f"{d}/m/n", "tmpfs")
    open(f"{d}/k/marker", "w").close()
    open(f"{d}/source", "w").close()
    open(f"{d}/f", "w").close()
    mount(f"{d}/source", f"{d}/f", None, MS_BIND)
    os.unlink(f"{d}/source")
    pending += [("tree", f"{d}/m"), ("file", f"{d}/f")]
    real_spawn = _ffi.spawn

    def spawn(native):
        remove()
        started = real_spawn(native)
        out["skipped"] = list(started.skipped)
        return started

    _ffi.spawn = spawn
else:
    # Mounts hidden by a later mount over their parent: listed in mountinfo, unreachable. The
    # path of the second leads to a directory of the mount over it.
    for sub in ("a", "b"):
        os.makedirs(f"{d}/{sub}/m")
        mount("tmpfs", f"{d}/{sub}/m", "tmpfs")
        mount("tmpfs", f"{d}/{sub}", "tmpfs")
    os.mkdir(f"{d}/b/m")
    out["hidden"] = not os.path.exists(f"{d}/a/m") and not os.path.ismount(f"{d}/b/m")
    # What the plan takes from the host: by mount id (statx), and by device as before Linux
    # 5.8, whose statx has no mount id (ENOSYS from the core's wrapper).
    from pytest_incarnate import rootfs

    def planned():
        return sorted(m.mountpoint for m in rootfs.host_mounts() if m.mountpoint.startswith(d + "/"))

    def no_mount_id(p):
        raise OSError(errno.ENOSYS, "statx has no STATX_MNT_ID", p)

    out["planned"] = planned()
    by_id, rootfs.mount_id = rootfs.mount_id, no_mount_id
    out["planned_by_device"] = planned()
    rootfs.mount_id = by_id
try:
    if case == "gone-nested":
        r = Sandbox().run([sys.executable, "-c", LOOK + "print(json.dumps(look(sys.argv[1])))", d])
        out["result"] = json.loads(r.stdout) if r.returncode == 0 else r.stderr.decode()
    else:
        out["result"] = Sandbox().call(look, d)
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
out["host"] = look(d)
print(json.dumps(out))
'''


@pytest.mark.skipif(not ROOT or shutil.which("unshare") is None, reason="mounts in a private mount namespace: root and unshare(1)")
@pytest.mark.parametrize("case", ["gone", "gone-nested", "shadowed"])
def test_a_host_mount_that_cannot_be_reached_does_not_fail_the_sandbox(tmp_path: Path, case: str, leak_check) -> None:
    """A host mount that is gone (or hidden) when the sandbox is set up is not part of what
    the host shows: the sandbox runs without it, and shows what the host shows. Gone: after
    the plan, before the child's setup, which skips it and what was mounted under it; hidden:
    under a later mount over its parent, left out of the plan. The mounts are made in a mount
    namespace of the script's own (nothing changes on the host), under /var/tmp (mounts under
    /tmp are left out of the root: it is the sandbox's scratch space)."""
    script = tmp_path / "host_mount.py"
    script.write_text(HOST_MOUNT_SCRIPT)
    d = Path(tempfile.mkdtemp(dir="/var/tmp", prefix="reliability-"))
    try:
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, str(script), case, str(d)],
                           capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(d)
    if r.returncode != 0:
        pytest.fail(r.stderr)
    out = json.loads(r.stdout.splitlines()[-1])
    planned = {"gone": {"removed": [f"{d}/m"]}, "gone-nested": {"removed": [f"{d}/m", f"{d}/f"]},
               "shadowed": {"hidden": True}}[case]
    if {k: out.get(k) for k in planned} != planned:
        pytest.fail(f"the mount was not {case} as planned: {out}")
    assert "error" not in out, out["error"]
    inside = out["result"]
    assert isinstance(inside, dict), inside
    assert inside["pid"] == 2, inside  # it ran inside, under the init
    # Inside, what the host shows under d (once the mounts were gone).
    assert inside["seen"] == out["host"]["seen"]
    if case == "gone-nested":
        assert inside["mounts"] == [f"{d}/k"] and inside["seen"] == [f"{d}/k", f"{d}/k/marker"]
        # The child skipped the file mount and the filesystem, and the one mounted under it
        # with it (not tried on its own: that would have been reported too).
        assert out["skipped"] == [f"{d}/f", f"{d}/m"]
    elif case == "gone":
        assert inside["mounts"] == inside["seen"] == []
    else:
        assert inside["mounts"] == [f"{d}/a", f"{d}/b"] and inside["seen"] == [f"{d}/a", f"{d}/b", f"{d}/b/m"]
        assert out["planned"] == out["planned_by_device"] == [f"{d}/a", f"{d}/b"]
