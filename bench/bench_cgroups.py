#!/usr/bin/env python3
"""What cgroup limits add to starting a sandbox, and what one move into a cgroup costs.

Part 1, sandbox start-up. Three lines are measured interleaved round-robin in one run. The
starting line rotates from round to round, after a warmup. One sample is the wall time of
``Sandbox(spec).spawn(["/bin/true"]).wait()``:

  no limits        Spec()
  memory+pids      Spec(memory="256M", pids=256)
  all four         Spec(memory="256M", pids=256, cpu_quota=1.0, cpus=<one allowed CPU>)

Part 2, moving one process into a fresh cgroup. Each sample makes a new cgroup
(untimed) and times only the move:

  v1 procs, before exec   the parent writes the pid of a forked child (blocked in read(),
                          like the core's child waiting for its go byte) to cgroup.procs
  v1 procs, after exec    the same for a child that has exec'd (/bin/cat on a pipe)
  v1 tasks, by parent     the parent writes the child's pid to the v1 ``tasks`` file
  v1 tasks "0", by child  the child writes "0" to ``tasks`` itself (it has one thread)
  v2 procs, by parent     the parent writes the child's pid to a v2 cgroup.procs
  v2 CLONE_INTO_CGROUP    clone3() of a child born in the v2 cgroup: the clone3 call
  clone3, no cgroup       the same clone3() without CLONE_INTO_CGROUP (the baseline)

The v1 moves go to the memory controller, under ``<own cgroup>/incarnate-<run>/``. They
use the package's run directory and lock, so ``pytest-incarnate sweep`` does not take them
for a dead run's. The clone3 lines use a small C helper. It is compiled with ``cc`` into
/var/tmp/incarnate-bench, and the two lines are skipped without a compiler. The table
gives the median, p99 and maximum, how many samples took over 5 ms, and the median CPU
time of the moving thread. A wall time far above that CPU time means the thread slept.

Both parts run once per gap (``--gaps-ms``, default 0 and 30). Gap 0 runs the samples
back to back. A gap of G ms sleeps that long, untimed, before each timed call, as between
two tests of a suite. That matters because a write to cgroup.procs waits for an RCU grace
period only when no other such write happened within about the last grace period (see
bench/README.md, "Cgroup cost").

The header also shows what the kernel offers against that wait. It checks
CONFIG_CGROUP_FAVOR_DYNMODS, ``cgroup_favordynmods=`` on the command line, the
``favordynmods`` mount option on the cgroup mounts, and whether the kernel knows the
per-thread-group lock (CGRP_ATTACH_LOCK_PER_THREADGROUP in its BTF). It never mounts or
remounts anything.

Root only. Usage: python bench/bench_cgroups.py [--runs N] [--writes N] [--warmup N]
[--gaps-ms 0,30] [--json PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gzip
import hashlib
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench_core import percentile  # the same interpolation as the core benchmark

TRUE = "/bin/true"
OUT = Path("/var/tmp/incarnate-bench")
SLOW_MS = 5.0

Sample = tuple[int, "int | None"]   # wall ns, CPU ns of the thread doing it (None: not measured)


@dataclass
class Line:
    key: str
    label: str
    what: str
    sample: Callable[[float], Sample] | None   # gap in seconds -> one timed sample
    skipped: str = ""
    wall: list[int] = field(default_factory=list)
    cpu: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _pause(gap: float) -> None:
    if gap > 0:
        time.sleep(gap)


# ------------------------------------------------------------------ the clone3 helper

CLONE3_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef SYS_clone3
#define SYS_clone3 435
#endif
#define INTO_CGROUP 0x200000000ULL

struct args { uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls,
              set_tid, set_tid_size, cgroup; };

static int64_t now(clockid_t c)
{
    struct timespec t;
    clock_gettime(c, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* clone3() a child that exits at once, born in the cgroup `dirfd` (if >= 0).
 * out[0]: wall ns of the clone3 call in the parent, out[1]: the parent thread's CPU ns.
 * Returns 0, or -errno. */
int timed_clone3(int dirfd, int64_t *out)
{
    struct args a;
    memset(&a, 0, sizeof a);
    a.exit_signal = SIGCHLD;
    if (dirfd >= 0) {
        a.flags = INTO_CGROUP;
        a.cgroup = (uint64_t)dirfd;
    }
    int64_t c0 = now(CLOCK_THREAD_CPUTIME_ID), t0 = now(CLOCK_MONOTONIC);
    long r = syscall(SYS_clone3, &a, sizeof a);
    if (r == 0)
        syscall(SYS_exit_group, 0);
    int64_t t1 = now(CLOCK_MONOTONIC), c1 = now(CLOCK_THREAD_CPUTIME_ID);
    if (r < 0)
        return -errno;
    out[0] = t1 - t0;
    out[1] = c1 - c0;
    int st;
    while (waitpid((pid_t)r, &st, 0) < 0 && errno == EINTR)
        ;
    return 0;
}
"""


def build_clone3() -> tuple[Callable[[int], Sample] | None, str]:
    """The compiled helper as a function (dirfd -> sample), or None and why not."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc) on PATH (apt-get install -y gcc)"
    tag = hashlib.sha256(CLONE3_C.encode()).hexdigest()[:12]
    OUT.mkdir(parents=True, exist_ok=True)
    so = OUT / f"bench_cgroups_clone3-{tag}.so"
    if not so.exists():
        src = OUT / f"bench_cgroups_clone3-{tag}.c"
        src.write_text(CLONE3_C)
        proc = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(so), str(src)], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            return None, f"the helper did not compile: {proc.stderr.strip()[:200]}"
    lib = ctypes.CDLL(str(so))
    lib.timed_clone3.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int64)]
    lib.timed_clone3.restype = ctypes.c_int

    def call(dirfd: int) -> Sample:
        out = (ctypes.c_int64 * 2)()
        r = lib.timed_clone3(dirfd, out)
        if r != 0:
            raise OSError(-r, f"clone3: {os.strerror(-r)}")
        return out[0], out[1]

    return call, ""


# ------------------------------------------------------------------ part 2: the moves

class Cgroups:
    """Fresh cgroups under this run's directories (v1 memory, and v2)."""

    def __init__(self) -> None:
        from pytest_incarnate.cgroups import RUN_PREFIX, Hierarchy, Run, _can_write

        self.run = Run.current()
        h = Hierarchy.detect()
        self.v1 = h.v1.get("memory")
        self.v1_why = "" if self.v1 else f"no v1 memory controller (cgroup {h.kind()})"
        if self.v1 and _can_write(self.v1):
            self.v1_why, self.v1 = str(_can_write(self.v1)), None
        self.v2 = h.v2
        self.v2_why = "" if self.v2 else "no cgroup v2 hierarchy"
        if self.v2 and _can_write(self.v2):
            self.v2_why, self.v2 = str(_can_write(self.v2)), None
        self.prefix = RUN_PREFIX
        self.seq = itertools.count()

    def fresh(self, base: str) -> str:
        run_dir = os.path.join(base, self.prefix + self.run.id)
        os.makedirs(run_dir, exist_ok=True)
        d = os.path.join(run_dir, f"bench-{next(self.seq)}")
        os.mkdir(d)
        return d

    @staticmethod
    def remove(d: str) -> None:
        from pytest_incarnate.cgroups import _rmdir

        _rmdir(d)


def _fork_blocked() -> tuple[int, int]:
    """A forked child blocked in read() until the returned fd is closed: (pid, fd)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(w)
            os.read(r, 1)
        finally:
            os._exit(0)
    os.close(r)
    return pid, w


def _timed_write(fd: int, data: bytes) -> tuple[int, int]:
    c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
    os.write(fd, data)
    t1, c1 = time.perf_counter_ns(), time.thread_time_ns()
    return t1 - t0, c1 - c0


def write_by_parent(cg: Cgroups, base: str, filename: str) -> Callable[[float], Sample]:
    def sample(gap: float) -> Sample:
        d = cg.fresh(base)
        pid, w = _fork_blocked()
        fd = os.open(os.path.join(d, filename), os.O_WRONLY | os.O_CLOEXEC)
        try:
            _pause(gap)
            return _timed_write(fd, str(pid).encode())
        finally:
            os.close(fd)
            os.close(w)
            os.waitpid(pid, 0)
            cg.remove(d)
    return sample


def write_after_exec(cg: Cgroups, base: str) -> Callable[[float], Sample]:
    def sample(gap: float) -> Sample:
        d = cg.fresh(base)
        p = subprocess.Popen(["/bin/cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)  # returns after exec
        fd = os.open(os.path.join(d, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            _pause(gap)
            return _timed_write(fd, str(p.pid).encode())
        finally:
            os.close(fd)
            assert p.stdin is not None
            p.stdin.close()
            p.wait()
            cg.remove(d)
    return sample


def write_zero_by_child(cg: Cgroups, base: str) -> Callable[[float], Sample]:
    """The child moves itself: "0" to the v1 tasks file (this thread only; the child has
    one thread, so the whole process moves)."""
    def sample(gap: float) -> Sample:
        d = cg.fresh(base)
        fd = os.open(os.path.join(d, "tasks"), os.O_WRONLY | os.O_CLOEXEC)
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            _pause(gap)
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    os.close(r)
                    wall, cpu = _timed_write(fd, b"0")
                    with open("/proc/self/cgroup") as f:
                        moved = f"/{os.path.basename(os.path.dirname(d))}/{os.path.basename(d)}\n" in f.read()
                    if moved:
                        os.write(w, wall.to_bytes(8, "little") + cpu.to_bytes(8, "little"))
                        code = 0
                finally:
                    os._exit(code)
            os.close(w)
            w = -1
            data = b""
            while len(data) < 16:
                chunk = os.read(r, 16 - len(data))
                if not chunk:
                    break
                data += chunk
            _, status = os.waitpid(pid, 0)
            if len(data) < 16 or status != 0:
                raise RuntimeError(f"the child was not moved (status {status})")
            return int.from_bytes(data[:8], "little"), int.from_bytes(data[8:], "little")
        finally:
            os.close(fd)
            os.close(r)
            if w >= 0:
                os.close(w)
            cg.remove(d)
    return sample


def clone_into(cg: Cgroups, base: str, clone3: Callable[[int], Sample]) -> Callable[[float], Sample]:
    def sample(gap: float) -> Sample:
        d = cg.fresh(base)
        dirfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _pause(gap)
            return clone3(dirfd)
        finally:
            os.close(dirfd)
            cg.remove(d)
    return sample


def clone_plain(clone3: Callable[[int], Sample]) -> Callable[[float], Sample]:
    def sample(gap: float) -> Sample:
        _pause(gap)
        return clone3(-1)
    return sample


def write_lines() -> list[Line]:
    cg = Cgroups()
    clone3, clone3_why = build_clone3()
    out: list[Line] = []

    def v1(key: str, label: str, what: str, make: Callable[[str], Callable[[float], Sample]]) -> None:
        out.append(Line(key, label, what, make(cg.v1) if cg.v1 is not None else None, skipped=cg.v1_why))

    def v2(key: str, label: str, what: str, make: Callable[[str], Callable[[float], Sample]] | None, why: str = "") -> None:
        if cg.v2 is not None and make is not None:
            out.append(Line(key, label, what, make(cg.v2)))
        else:
            out.append(Line(key, label, what, None, skipped=cg.v2_why or why))

    v1("v1_procs_before_exec", "v1 procs, before exec", "parent: os.write(cgroup.procs, pid of a forked, blocked child)",
       lambda b: write_by_parent(cg, b, "cgroup.procs"))
    v1("v1_procs_after_exec", "v1 procs, after exec", "parent: os.write(cgroup.procs, pid of /bin/cat after its exec)",
       lambda b: write_after_exec(cg, b))
    v1("v1_tasks_parent", "v1 tasks, by parent", "parent: os.write(tasks, pid of a forked, blocked child)",
       lambda b: write_by_parent(cg, b, "tasks"))
    v1("v1_tasks_self", "v1 tasks \"0\", by child", "child: os.write(tasks, b\"0\") (moves itself, one thread)",
       lambda b: write_zero_by_child(cg, b))
    v2("v2_procs_parent", "v2 procs, by parent", "parent: os.write(cgroup.procs, pid of a forked, blocked child)",
       lambda b: write_by_parent(cg, b, "cgroup.procs"))
    v2("v2_clone_into", "v2 CLONE_INTO_CGROUP", "clone3(CLONE_INTO_CGROUP, fresh v2 cgroup) in the parent",
       (lambda b: clone_into(cg, b, clone3)) if clone3 else None, clone3_why)
    out.append(Line("clone3_plain", "clone3, no cgroup", "clone3() without CLONE_INTO_CGROUP (baseline)",
                    clone_plain(clone3) if clone3 else None, skipped=clone3_why))
    return out


# ------------------------------------------------------------------ part 1: spawns

def spawn_lines() -> list[Line]:
    from pytest_incarnate import Sandbox, Spec

    cpu = str(min(os.sched_getaffinity(0)))
    specs = [
        ("no_limits", "no limits", "Spec()", Spec(), False),
        ("memory_pids", "memory+pids", 'Spec(memory="256M", pids=256)', Spec(memory="256M", pids=256), True),
        ("all_four", "all four", f'Spec(memory="256M", pids=256, cpu_quota=1.0, cpus="{cpu}")',
         Spec(memory="256M", pids=256, cpu_quota=1.0, cpus=cpu), True),
    ]
    out = []
    for key, label, what, spec, limited in specs:
        def sample(gap: float, spec: Spec = spec, limited: bool = limited) -> Sample:
            _pause(gap)
            t0 = time.perf_counter_ns()
            h = Sandbox(spec).spawn([TRUE])
            rc = h.wait()
            dt = time.perf_counter_ns() - t0
            if h.degradations:
                raise RuntimeError(f"degraded: {[str(d) for d in h.degradations]}")
            if rc != 0:
                raise RuntimeError(f"exit status {rc}")
            if limited and h.stats is None:
                raise RuntimeError("no cgroup (no stats)")
            return dt, None
        out.append(Line(key, label, f"Sandbox({what}).spawn(['{TRUE}']).wait()", sample))
    return out


# ------------------------------------------------------------------ measuring

def _one(line: Line, gap: float) -> tuple[Sample | None, str]:
    assert line.sample is not None
    try:
        return line.sample(gap), ""
    except Exception as e:  # a failing line is reported, not fatal
        return None, f"{type(e).__name__}: {e}"


def measure(lines: list[Line], runs: int, warmup: int, gap: float) -> None:
    for line in lines:
        if line.sample is not None:
            _, err = _one(line, 0.0)
            if err:
                line.skipped, line.sample = f"its first call failed ({err})", None
    live = [ln for ln in lines if ln.sample is not None]
    for _ in range(max(0, warmup - 1)):
        for line in live:
            _one(line, 0.0)
    n = len(live)
    for i in range(runs):
        for j in range(n):
            line = live[(i + j) % n]   # rotate the starting line
            got, err = _one(line, gap)
            if err:
                line.failures.append(err)
            else:
                assert got is not None
                line.wall.append(got[0])
                if got[1] is not None:
                    line.cpu.append(got[1])


def summarize(lines: list[Line]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for line in lines:
        d: dict[str, object] = {"label": line.label, "what": line.what}
        if line.sample is None and not line.wall:
            d["skipped"] = line.skipped
        else:
            ms = [x / 1e6 for x in line.wall]
            d["n"] = len(ms)
            d["failures"] = len(line.failures)
            if line.failures:
                d["first_failure"] = line.failures[0]
            if ms:
                d.update(median_ms=percentile(ms, 0.5), p99_ms=percentile(ms, 0.99), max_ms=max(ms),
                         min_ms=min(ms), over_5ms=sum(x > SLOW_MS for x in ms))
            if line.cpu:
                d["cpu_median_ms"] = percentile([x / 1e6 for x in line.cpu], 0.5)
        out[line.key] = d
    return out


def _table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        text.append("  ".join(cells).rstrip())
        if k == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def _notes(res: dict[str, dict[str, object]]) -> list[str]:
    notes = []
    for d in res.values():
        if "skipped" in d:
            notes.append(f"{d['label']}: skipped: {d['skipped']}")
        elif d.get("failures"):
            notes.append(f"{d['label']}: {d['failures']} failed calls (first: {d['first_failure']})")
    return notes


def spawn_table(res: dict[str, dict[str, object]]) -> str:
    base = res.get("no_limits", {})
    rows = [("line", "median ms", "p99 ms", "max ms", "+median ms", "+p99 ms", "n")]
    for d in res.values():
        if "median_ms" not in d:
            rows.append((str(d["label"]), "skipped" if "skipped" in d else "failed", "", "", "", "", ""))
            continue
        dm = dp = ""
        if "median_ms" in base and d is not base:
            dm = f"{d['median_ms'] - base['median_ms']:+.3f}"  # type: ignore[operator]
            dp = f"{d['p99_ms'] - base['p99_ms']:+.3f}"  # type: ignore[operator]
        rows.append((str(d["label"]), f"{d['median_ms']:.3f}", f"{d['p99_ms']:.3f}", f"{d['max_ms']:.3f}", dm, dp,
                     str(d["n"])))
    return "\n".join([_table(rows)] + _notes(res))


def write_table(res: dict[str, dict[str, object]]) -> str:
    rows = [("move", "median ms", "p99 ms", "max ms", f">{SLOW_MS:g} ms", "cpu median ms", "n")]
    for d in res.values():
        if "median_ms" not in d:
            rows.append((str(d["label"]), "skipped" if "skipped" in d else "failed", "", "", "", "", ""))
            continue
        cpu = f"{d['cpu_median_ms']:.3f}" if "cpu_median_ms" in d else ""
        rows.append((str(d["label"]), f"{d['median_ms']:.3f}", f"{d['p99_ms']:.3f}", f"{d['max_ms']:.3f}",
                     f"{d['over_5ms']}/{d['n']}", cpu, str(d["n"])))
    return "\n".join([_table(rows)] + _notes(res))


# ------------------------------------------------------------------ the kernel's options

def kernel_facts() -> dict[str, object]:
    facts: dict[str, object] = {}
    config: dict[str, str] = {}
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith("CONFIG_") and "=" in line:
                    k, _, v = line.strip().partition("=")
                    config[k] = v
        facts["config_readable"] = True
    except OSError:
        facts["config_readable"] = False
    facts["CONFIG_CGROUP_FAVOR_DYNMODS"] = config.get("CONFIG_CGROUP_FAVOR_DYNMODS", "n") if config else "unknown"
    facts["CONFIG_HZ"] = config.get("CONFIG_HZ", "unknown")
    facts["CONFIG_RCU_LAZY"] = config.get("CONFIG_RCU_LAZY", "n") if config else "unknown"
    try:
        cmdline = Path("/proc/cmdline").read_text().split()
    except OSError:
        cmdline = []
    facts["cmdline_cgroup_favordynmods"] = [a for a in cmdline if a.startswith("cgroup_favordynmods")]
    facts["cmdline_rcu_expedited"] = [a for a in cmdline if "rcu_expedited" in a or "rcu_normal" in a]
    mounts = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, opts = right.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                mounts.append({"mount": left.split()[4], "type": fstype, "favordynmods": "favordynmods" in opts.split(",")})
    facts["cgroup_mounts"] = mounts
    try:
        facts["cgroup_features"] = Path("/sys/kernel/cgroup/features").read_text().split()
    except OSError:
        facts["cgroup_features"] = None
    try:
        facts["per_threadgroup_lock_in_btf"] = b"CGRP_ATTACH_LOCK_PER_THREADGROUP" in Path("/sys/kernel/btf/vmlinux").read_bytes()
    except OSError:
        facts["per_threadgroup_lock_in_btf"] = None
    try:
        facts["rcu_expedited"] = Path("/sys/kernel/rcu_expedited").read_text().strip()
    except OSError:
        facts["rcu_expedited"] = None
    return facts


def facts_text(f: dict[str, object]) -> str:
    mounts = f["cgroup_mounts"]
    feats = f["cgroup_features"]
    on_cmdline = f["cmdline_cgroup_favordynmods"]
    assert isinstance(mounts, list) and isinstance(on_cmdline, list) and (feats is None or isinstance(feats, list))
    with_opt = [m["mount"] for m in mounts if m["favordynmods"]]
    return "\n".join([
        (f"kernel: CONFIG_HZ={f['CONFIG_HZ']}, CONFIG_RCU_LAZY={f['CONFIG_RCU_LAZY']}, "
        f"CONFIG_CGROUP_FAVOR_DYNMODS={f['CONFIG_CGROUP_FAVOR_DYNMODS']}, "
        f"cgroup_favordynmods= on the command line: {' '.join(on_cmdline) or 'no'}, "
        f"/sys/kernel/rcu_expedited={f['rcu_expedited']}"),
        (f"favordynmods: {'a known mount option' if feats and 'favordynmods' in feats else 'not in /sys/kernel/cgroup/features'}; "
        f"set on {', '.join(with_opt) if with_opt else 'none'} of the {len(mounts)} cgroup mounts; "
        f"per-thread-group lock for cgroup.procs writes with favordynmods (6.18+): "
        f"{'present' if f['per_threadgroup_lock_in_btf'] else 'absent' if f['per_threadgroup_lock_in_btf'] is False else 'unknown'}"),
    ])


# ------------------------------------------------------------------ main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200, help="timed spawns per line and gap (default 200)")
    ap.add_argument("--writes", type=int, default=200, help="timed moves per line and gap (default 200)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed rounds first (default 10)")
    ap.add_argument("--gaps-ms", default="0,30", help="pauses before each timed call, one pass each (default 0,30)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure as JSON to PATH")
    args = ap.parse_args(argv)
    gaps = [float(g) for g in args.gaps_ms.split(",") if g.strip()]
    if os.geteuid() != 0:
        print("root only: the cgroups are made under this process's own cgroup, which needs root here")
        return 1
    try:
        import pytest_incarnate  # noqa: F401
    except ImportError as e:
        print(f"pytest_incarnate cannot be imported: {e!r} (pip install -e .)")
        return 1

    facts = kernel_facts()
    load_before = os.getloadavg()
    env: dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "runs": args.runs, "writes": args.writes, "warmup": args.warmup, "gaps_ms": gaps,
        "loadavg_before": load_before,
    }
    print(f"Linux {env['kernel']}, {env['cpus']} CPUs, Python {env['python']}; {args.runs} spawns and "
          f"{args.writes} moves per line and gap, interleaved round-robin, after {args.warmup} warmup rounds")
    print(facts_text(facts))
    passes: list[dict[str, object]] = []
    report: dict[str, object] = {"env": env, "kernel": facts, "passes": passes}
    bad = False
    for gap_ms in gaps:
        gap = gap_ms / 1000
        started = time.time()
        spawns = spawn_lines()
        measure(spawns, args.runs, args.warmup, gap)
        s_res = summarize(spawns)
        moves = write_lines()
        measure(moves, args.writes, args.warmup, gap)
        w_res = summarize(moves)
        title = "back to back" if gap == 0 else f"{gap_ms:g} ms untimed pause before each timed call"
        print(f"\n== gap {gap_ms:g} ms ({title}); {time.time() - started:.0f} s")
        print("\nSandbox(spec).spawn(['/bin/true']).wait()  (+: compared with no limits)")
        print(spawn_table(s_res))
        print("\nmoving one process into a fresh cgroup (only the move is timed)")
        print(write_table(w_res))
        passes.append({"gap_ms": gap_ms, "spawn": s_res, "moves": w_res})
        bad = bad or any("median_ms" not in d or d.get("failures") for d in s_res.values())
    load_after = os.getloadavg()
    env["loadavg_after"] = load_after
    print(f"\nload average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load_before)} before, "
          f"{' '.join(f'{x:.2f}' for x in load_after)} after")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
