#!/usr/bin/env python3
"""Where the time of ``Sandbox(spec).spawn(["/bin/true"]).wait()`` goes.

Two parts, both measured interleaved round-robin after a warmup, medians in microseconds:

1. Python side: each step of Sandbox.spawn timed on its own (argv check, executable
   lookup, plan, build_ops, environment list, Native.build, the C call, wait), in a spawn
   loop, then the same steps again in a tight loop with no clone in between (the
   difference is what the copy-on-write faults after each clone add).
2. Kernel/C side: the same C core called with fewer namespaces and operations, one
   thing added at a time (a ladder) and one thing removed at a time from the full
   spec; the differences are the marginal cost of each namespace and operation.
   Custom operation lists (a plain bind, a non-recursive bind, ...) go through
   ``pytest_incarnate._ffi`` directly; nothing in the package is changed.

Usage: python bench/profile_steps.py [--runs N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable

from pytest_incarnate import Sandbox, Spec, _ffi
from pytest_incarnate import sandbox as sb
from pytest_incarnate._ffi import BIND_CREATE, BIND_REC, BIND_RO, Native, Op

TRUE = "/bin/true"
NS6 = ("user", "mount", "pid", "net", "uts", "ipc")


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def interleave(cases: dict[str, Callable[[], None]], runs: int, warmup: int) -> dict[str, float]:
    names = list(cases)
    for _ in range(warmup):
        for n in names:
            cases[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for i in range(runs):
        for j in range(len(names)):
            n = names[(i + j) % len(names)]
            t0 = time.perf_counter_ns()
            cases[n]()
            samples[n].append((time.perf_counter_ns() - t0) / 1e3)
    return {n: median(v) for n, v in samples.items()}


# ---------------------------------------------------------------- Python side

def python_steps(runs: int, warmup: int) -> dict[str, float]:
    spec = Spec(namespaces=frozenset(NS6))
    box = Sandbox(spec)
    steps: dict[str, list[float]] = {}

    def rec(name: str, t0: int) -> int:
        t1 = time.perf_counter_ns()
        steps.setdefault(name, []).append((t1 - t0) / 1e3)
        return t1

    def one() -> None:
        t = time.perf_counter_ns()
        t0 = t
        Sandbox(spec)
        t = rec("Sandbox(spec)", t)
        args = sb._check_argv([TRUE])
        t = rec("_check_argv", t)
        exe = sb._resolve_exe(args[0], spec.env, spec.root)
        t = rec("_resolve_exe", t)
        p = box.plan()
        t = rec("plan() (cached probe + make_plan)", t)
        ops = sb.build_ops(spec, p)
        t = rec("build_ops", t)
        env = sb._env_list(spec.env)
        t = rec("_env_list", t)
        native = Native(ns=p.namespaces, ops=ops, uid_map=p.uid_map, gid_map=p.gid_map,
                        setgroups_deny=p.setgroups_deny, exe=exe, argv=args, envp=env,
                        stdio=(-1, -1, -1), setsid_payload=True)
        c = native.build()
        t = rec("Native(...).build()", t)
        res = _ffi.ffi.new("struct inc_result *")
        if _ffi.lib.inc_spawn(c, res) != 0:
            raise _ffi.error_for(native, res)
        t = rec("inc_spawn (C: clone .. exec)", t)
        started = _ffi.Started(res.pid, res.pidfd, res.status_fd, bool(res.used_clone3))
        h = sb.Handle(args, started, p, None, None, None, True)
        t = rec("Handle()", t)
        h.wait()
        t = rec("wait (payload + init exit, reap)", t)
        steps.setdefault("total", []).append((t - t0) / 1e3)

    for _ in range(warmup):
        one()
    steps.clear()
    for _ in range(runs):
        one()
    return {k: median(v) for k, v in steps.items()}


def python_steps_warm(runs: int) -> dict[str, float]:
    """The same Python steps in a tight loop with no sandbox started in between: no
    copy-on-write faults from a fresh clone, so this is their cost on warm memory."""
    spec = Spec(namespaces=frozenset(NS6))
    box = Sandbox(spec)
    box.spawn([TRUE]).wait()
    p = box.plan()
    args = sb._check_argv([TRUE])
    ops = sb.build_ops(spec, p)
    env = sb._env_list(None)

    def med(f: Callable[[], object]) -> float:
        xs = []
        for _ in range(runs):
            t0 = time.perf_counter_ns()
            f()
            xs.append((time.perf_counter_ns() - t0) / 1e3)
        return median(xs)

    return {
        "_check_argv": med(lambda: sb._check_argv([TRUE])),
        "_resolve_exe": med(lambda: sb._resolve_exe(TRUE, None, None)),
        "plan()": med(box.plan),
        "  of which id_maps() (reads /proc/self/[ug]id_map)": med(lambda: sb.id_maps("root")),
        "build_ops": med(lambda: sb.build_ops(spec, p)),
        "_env_list": med(lambda: sb._env_list(None)),
        "Native(...).build()": med(lambda: Native(ns=p.namespaces, ops=ops, uid_map=p.uid_map, gid_map=p.gid_map,
                                                  exe=TRUE, argv=args, envp=env).build()),
    }


# ------------------------------------------------------------------- C side

def _full_ops(*, ro: bool = True, rec: bool = True, proc: bool = True, tmpfs: int = 2, pivot: bool = True,
              stage: bool = True, bind: bool = True, hostname: bool = True, loopback: bool = True,
              mount: bool = True, cwd: bool = True) -> list[Op]:
    ops: list[Op] = []
    if hostname:
        ops.append(Op("hostname", a="incarnate", path="incarnate"))
    if loopback:
        ops.append(Op("loopback", path="lo"))
    if mount:
        ops.append(Op("make-rprivate", a="/", path="/"))
        if stage:
            ops.append(Op("stage-root", a="/tmp", path="/tmp"))
            if bind:
                flags = (BIND_RO if ro else 0) | (BIND_REC if rec else 0)
                ops.append(Op("bind", a="/oldroot", b="/newroot", flags=flags, path="/"))
            if proc:
                ops.append(Op("mount-proc", b="/newroot/proc", path="/proc"))
            for t in ("/tmp", "/dev/shm")[:tmpfs]:
                ops.append(Op("mount-tmpfs", b="/newroot" + t, c="mode=0755", flags=BIND_CREATE, path=t))
            if pivot:
                ops.append(Op("pivot_root", a="/newroot", path="/"))
    if cwd:
        ops.append(Op("chdir", a="/", path="/"))
    ops.append(Op("no_new_privs"))
    return ops


STATIC_DIR = "/var/tmp/incarnate-bench"
STATIC_TRUE = STATIC_DIR + "/true-static"
_STATIC_SRC = 'void _start(void){ __asm__ volatile("mov $60,%eax\\n xor %edi,%edi\\n syscall"); }\n'


def static_true() -> str | None:
    """A static, libc-free /bin/true (x86-64), so that a case whose root is the bare
    staging tmpfs (no /lib64 for the dynamic loader) can still exec something."""
    if os.access(STATIC_TRUE, os.X_OK):
        return STATIC_TRUE
    import platform
    import subprocess
    if platform.machine() != "x86_64" or not shutil.which("gcc"):
        return None
    os.makedirs(STATIC_DIR, exist_ok=True)
    src = STATIC_DIR + "/true-static.c"
    with open(src, "w") as f:
        f.write(_STATIC_SRC)
    r = subprocess.run(["gcc", "-static", "-nostdlib", "-O2", "-o", STATIC_TRUE, src], capture_output=True)
    return STATIC_TRUE if r.returncode == 0 else None


def c_cases(true: str) -> dict[str, Callable[[], None]]:
    maps = sb.id_maps("root")
    env = sb._env_list(None)

    def case(ns: tuple[str, ...], ops: list[Op], init: bool = True, exe: str = true) -> Callable[[], None]:
        um, gm, deny = maps if "user" in ns else (None, None, False)
        kinds = [o.kind for o in ops]
        # staged but not pivoted: the host's root is at /oldroot
        if "stage-root" in kinds and "pivot_root" not in kinds:
            exe = "/oldroot" + exe

        def go() -> None:
            st = _ffi.spawn(Native(ns=ns, ops=ops, uid_map=um, gid_map=gm, setgroups_deny=deny, use_init=init,
                                   exe=exe, argv=[TRUE], envp=env, setsid_payload=True))
            _, status = os.waitpid(st.pid, 0)
            if st.status_fd >= 0:
                os.close(st.status_fd)
            if st.pidfd >= 0:
                os.close(st.pidfd)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        return go

    nm = dict(hostname=False, loopback=False, mount=False)
    base = _full_ops(**nm)
    c: dict[str, Callable[[], None]] = {
        # ladder
        "L0 no namespaces": case((), base, init=False),
        "L1 +user": case(("user",), base, init=False),
        "L2 +pid (init)": case(("user", "pid"), base),
        "L3 +ipc": case(("user", "pid", "ipc"), base),
        "L4 +uts +hostname": case(("user", "pid", "ipc", "uts"), _full_ops(loopback=False, mount=False)),
        "L5 +net (lo down)": case(("user", "pid", "ipc", "uts", "net"), _full_ops(loopback=False, mount=False)),
        "L6 +lo up": case(("user", "pid", "ipc", "uts", "net"), _full_ops(mount=False)),
        "L7 +mount, rprivate only": case(NS6, _full_ops(stage=False)),
        "L8 +stage (tmpfs, pivot into it)": case(NS6, _full_ops(bind=False, proc=False, tmpfs=0, pivot=False)),
        # (a non-recursive bind of / is refused with EINVAL in a user namespace: the
        # inherited submounts are locked to it, so it cannot be measured here)
        "L9b +bind / (rec, rw)": case(NS6, _bind_only(rec=True, ro=False)),
        "L9c +bind / (rec, ro)": case(NS6, _bind_only(rec=True, ro=True)),
        "L10 +pivot_root + umount detach": case(NS6, _full_ops(proc=False, tmpfs=0)),
        "L11 +proc": case(NS6, _full_ops(tmpfs=0)),
        "L12 +tmpfs /tmp /dev/shm (= full)": case(NS6, _full_ops()),
        "L13 full, dynamic /bin/true": case(NS6, _full_ops(), exe=TRUE),
        # full minus one
        "F-net": case(("user", "mount", "pid", "uts", "ipc"), _full_ops(loopback=False)),
        "F-pid (no init)": case(("user", "mount", "net", "uts", "ipc"), _full_ops(proc=False), init=False),
        "F-ipc": case(("user", "mount", "pid", "net", "uts"), _full_ops()),
        "F-uts": case(("user", "mount", "pid", "net", "ipc"), _full_ops(hostname=False)),
        "F-lo up": case(NS6, _full_ops(loopback=False)),
        "F-proc": case(NS6, _full_ops(proc=False)),
        "F-tmpfs": case(NS6, _full_ops(tmpfs=0)),
        "F-ro (rec rw bind)": case(NS6, _full_ops(ro=False)),
        "F+cgroup": case(NS6 + ("cgroup",), _full_ops()),
    }
    return c


def _bind_only(*, rec: bool, ro: bool) -> list[Op]:
    """stage + one bind of the old root, no pivot (the ladder step between L8 and L10)."""
    return _full_ops(proc=False, tmpfs=0, pivot=False, ro=ro, rec=rec)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json")
    a = ap.parse_args()
    py = python_steps(a.runs, a.warmup)
    print("Python side of Sandbox(spec).spawn([/bin/true]).wait(), median us per step:")
    for k, v in py.items():
        print(f"  {k:40s} {v:9.1f}")
    warm = python_steps_warm(max(a.runs, 1000))
    print("\nthe same steps in a warm loop (no clone in between), median us:")
    for k, v in warm.items():
        print(f"  {k:52s} {v:7.1f}")
    true = static_true()
    if true is None:
        print("\nno static true (needs gcc and x86-64): C-side cases skipped")
        return 0
    cm = interleave(c_cases(true), a.runs, a.warmup)
    print(f"\nC core via _ffi.spawn + waitpid of {true} (static), median us (interleaved):")
    prev = None
    for k, v in cm.items():
        delta = f"{v - prev:+8.1f}" if prev is not None and k.startswith("L") else ""
        if k.startswith("F"):
            delta = f"{cm['L12 +tmpfs /tmp /dev/shm (= full)'] - v:+8.1f} saved" if k != "F+cgroup" else \
                f"{v - cm['L12 +tmpfs /tmp /dev/shm (= full)']:+8.1f} extra"
        print(f"  {k:40s} {v:9.1f}  {delta}")
        prev = v
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"python_steps_us": py, "python_steps_warm_us": warm, "c_cases_us": cm}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
