#!/usr/bin/env python3
"""Does the sandbox's start-up grow with the caller's memory, and would CLONE_VM fix it?

Compiles bench/clone_vm_experiment.c (a stripped-down spawn: same namespaces, id maps,
go byte, pid-1 init, CLONE_VM|CLONE_VFORK payload; no mount operations) into
/var/tmp/incarnate-bench and times, interleaved, with the caller holding 0, 50 and 200 MB
of extra touched memory:

  proto fork-like   the first child copies the caller's address space (as the core does)
  proto CLONE_VM    the first child shares it (no copy, no copy-on-write afterwards)
  incarnate spawn   Sandbox(spec).spawn(["/bin/true"]).wait(), for reference
  bwrap             subprocess.run(["bwrap", "--unshare-all", "--dev-bind", "/", "/", "/bin/true"])

Root only.  Usage: python bench/clone_vm_experiment.py [--runs N] [--mb 0,50,200]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = Path("/var/tmp/incarnate-bench")
TRUE = "/bin/true"


def build() -> ctypes.CDLL:
    OUT.mkdir(parents=True, exist_ok=True)
    so = OUT / "clone_vm_experiment.so"
    src = HERE / "clone_vm_experiment.c"
    if not so.exists() or so.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(so), str(src)], check=True)
    lib = ctypes.CDLL(str(so))
    lib.proto_spawn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)]
    lib.proto_spawn.restype = ctypes.c_int
    return lib


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--mb", default="0,50,200")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("root only (the prototype writes identity id maps)")
        return 0
    lib = build()
    env = [f"{k}={v}".encode() for k, v in os.environ.items()]
    envp = (ctypes.c_char_p * (len(env) + 1))(*env, None)
    exe = TRUE.encode()

    from pytest_incarnate import Sandbox, Spec
    box = Sandbox(Spec(namespaces=frozenset({"user", "mount", "pid", "uts", "ipc", "net"})))

    def check(rc: int) -> None:
        if rc != 0:
            raise SystemExit(f"proto_spawn returned {rc}")

    cases = {
        "proto fork-like": lambda: check(lib.proto_spawn(0, exe, envp)),
        "proto CLONE_VM": lambda: check(lib.proto_spawn(1, exe, envp)),
        "incarnate spawn": lambda: box.spawn([TRUE]).wait(),
    }
    if shutil.which("bwrap"):
        cases["bwrap"] = lambda: subprocess.run(["bwrap", "--unshare-all", "--dev-bind", "/", "/", TRUE], check=True)

    ballast: list[bytearray] = []
    print("median ms per call (interleaved)")
    print(f"{'extra MB':>8} {'RSS MB':>7}  " + "  ".join(f"{k:>16}" for k in cases))
    for mb in (int(x) for x in a.mb.split(",")):
        while sum(len(b) for b in ballast) < mb * 2**20:
            b = bytearray(2**20)
            b[::4096] = b"x" * 256   # touch every page
            ballast.append(b)
        rss = int([ln for ln in open("/proc/self/status") if ln.startswith("VmRSS")][0].split()[1]) // 1024
        names = list(cases)
        for _ in range(10):
            for n in names:
                cases[n]()
        samples: dict[str, list[int]] = {n: [] for n in names}
        for i in range(a.runs):
            for j in range(len(names)):
                n = names[(i + j) % len(names)]
                t0 = time.perf_counter_ns()
                cases[n]()
                samples[n].append(time.perf_counter_ns() - t0)
        meds = {n: sorted(v)[len(v) // 2] / 1e6 for n, v in samples.items()}
        print(f"{mb:>8} {rss:>7}  " + "  ".join(f"{meds[n]:>16.3f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
