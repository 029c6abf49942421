"""Cgroups: one cgroup per sandbox, with limits, accounting, and removal afterwards.

Two backends behind one interface:

- v1 (this machine's controllers): a directory per controller hierarchy (memory, pids, cpu,
  cpuacct, cpuset, freezer) under this process's own cgroup in each; the parent writes the
  child's pid into every ``cgroup.procs`` before the child runs anything.
- v2 (the unified hierarchy): one directory; the child is born in it with
  CLONE_INTO_CGROUP, and ``cgroup.kill`` ends it.  A limit whose controller no v1 hierarchy
  has goes to v2 when the controller is delegated (listed in the own cgroup's
  ``cgroup.controllers``): it is enabled in ``cgroup.subtree_control`` down to the sandbox.
  The no-internal-processes rule forbids that in a cgroup that has processes, so the
  processes of the own cgroup are first moved into a leaf, ``<own cgroup>/incarnate_leaf``
  (as systemd's delegated scopes expect), once per run.

Layout: ``<own cgroup>/incarnate-<run id>/sb-<n>``.  Each run holds a lock (a file lock
under the runtime directory) for its lifetime; a run directory whose lock can be taken
belongs to a dead run and is swept (``pytest-incarnate sweep``, and at the next start).
"""

from __future__ import annotations

import atexit
import errno as _errno
import fcntl
import itertools
import os
import secrets
import signal as _signal
import threading
import time
import warnings
from dataclasses import dataclass, field

from pytest_incarnate.errors import CgroupNotWritable, CgroupSkipped, Degradation, SetupStepFailed, SpecError, setup_step

V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct", "cpuset", "freezer")
RUN_PREFIX = "incarnate-"
LEAF = "incarnate_leaf"  # v2: where the own cgroup's processes go when it delegates controllers


def parse_size(field_name: str, value: int | str) -> int:
    """Bytes from an int or a string like "64M", "1.5G", "512k"."""
    if isinstance(value, bool):
        raise SpecError(field_name, value, "must be a size in bytes or a string like '64M'")
    if isinstance(value, int):
        if not 0 < value < 2**63:
            raise SpecError(field_name, value, "must be positive and below 2**63 bytes")
        return value
    if isinstance(value, str):
        s = value.strip().upper().removesuffix("IB").removesuffix("B")
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
        num = s[:-1] if s[-1:] in "KMGT" else s
        try:
            n = int(float(num) * mult)
        except (ValueError, OverflowError):  # "abc", "inf", "1e400"
            n = 0
        if 0 < n < 2**63:
            return n
    raise SpecError(field_name, value, "must be a size in bytes or a string like '64M'")


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox (None: no limit)."""

    memory: int | None = None      # bytes; swap is not allowed on top
    pids: int | None = None
    cpu_quota: float | None = None  # CPUs' worth of time, e.g. 0.5
    cpus: str | None = None         # cpuset list, e.g. "0" or "0-1"

    def any(self) -> bool:
        return any(v is not None for v in (self.memory, self.pids, self.cpu_quota, self.cpus))

    def controllers(self) -> list[str]:
        out = []
        if self.memory is not None:
            out.append("memory")
        if self.pids is not None:
            out.append("pids")
        if self.cpu_quota is not None:
            out.append("cpu")
        if self.cpus is not None:
            out.append("cpuset")
        return out


@dataclass(frozen=True)
class Stats:
    """What a sandbox used, read after it ended."""

    memory_peak: int | None = None   # bytes
    memory_limit: int | None = None
    oom_kills: int = 0
    cpu_user: float | None = None    # seconds
    cpu_system: float | None = None
    pids_limit_hits: int = 0         # forks refused by the pids limit
    pids_limit: int | None = None

    @property
    def oom_killed(self) -> bool:
        return self.oom_kills > 0

    def describe_oom(self) -> str:
        limit = f"{self.memory_limit / 1048576:.0f} MiB" if self.memory_limit else "?"
        peak = f"{self.memory_peak / 1048576:.1f} MiB" if self.memory_peak is not None else "?"
        return f"OOM-killed: limit {limit}, peak {peak}"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _write(path: str, value: str) -> None:
    """Write a cgroup file in one write; an error names the file."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None
    finally:
        os.close(fd)


@dataclass
class Hierarchy:
    """Where this process's cgroups are: v1 controller roots, and/or the v2 root."""

    v1: dict[str, str] = field(default_factory=dict)  # controller -> this process's cgroup dir
    v2: str | None = None        # this process's v2 cgroup (the parent of the leaf, once moved)
    v2_root: str | None = None   # the v2 mount point

    def v2_controllers(self) -> set[str]:
        """The controllers delegated to the own v2 cgroup (usable in its children)."""
        if self.v2 is None:
            return set()
        return set((_read(f"{self.v2}/cgroup.controllers") or "").split())

    @classmethod
    def detect(cls) -> Hierarchy:
        mounts_v1: dict[str, str] = {}
        v2_mount = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fstype, _, opts = right.split()[:3]
                mp = left.split()[4]
                if fstype == "cgroup2":
                    v2_mount = mp
                elif fstype == "cgroup":
                    for c in opts.split(","):
                        if c in V1_CONTROLLERS and c not in mounts_v1:
                            mounts_v1[c] = mp
        own: dict[str, str] = {}
        own_v2 = None
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if ctrls == "":
                    own_v2 = path
                for c in ctrls.split(","):
                    if c in mounts_v1:
                        own[c] = os.path.join(mounts_v1[c], path.lstrip("/"))
        v2 = os.path.join(v2_mount, (own_v2 or "/").lstrip("/")).rstrip("/") if v2_mount else None
        if v2 is not None and os.path.basename(v2) == LEAF:
            v2 = os.path.dirname(v2)  # moved into the leaf by an earlier run: its parent is ours
        return cls(own, v2, v2_mount)

    def kind(self) -> str:
        if self.v1 and self.v2:
            return "hybrid"
        return "v1" if self.v1 else "v2" if self.v2 else "none"


def _run_lock_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") if os.geteuid() != 0 else "/run"
    return os.path.join(base or "/tmp", "pytest-incarnate")


class Run:
    """This process's run: a lock held for its lifetime, and the run directories."""

    _lock = threading.Lock()
    _current: Run | None = None

    def __init__(self) -> None:
        self.id = f"{os.getpid()}-{secrets.token_hex(3)}"
        lock_dir = _run_lock_dir()
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        self.lock_path = os.path.join(lock_dir, f"run-{self.id}.lock")
        self._fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(self._fd)
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
            raise
        self.pid = os.getpid()
        self._seq = itertools.count()

    @classmethod
    def current(cls) -> Run:
        with cls._lock:
            if cls._current is None or cls._current.pid != os.getpid():
                first = cls._current is None
                cls._current = Run()
                if first:
                    try:
                        sweep()  # what killed runs left behind
                    except OSError:
                        pass
                atexit.register(cls._current.close)
            return cls._current

    def close(self) -> None:
        """At exit: remove this run's (empty) directories, then its lock."""
        if self.pid != os.getpid():
            return
        h = Hierarchy.detect()
        for base in list(h.v1.values()) + ([h.v2] if h.v2 else []):
            try:
                os.rmdir(os.path.join(base, RUN_PREFIX + self.id))
            except OSError:
                pass
        try:
            os.unlink(self.lock_path)
        except OSError:
            pass
        os.close(self._fd)

    def next_name(self) -> str:
        return f"sb-{next(self._seq)}"

    @classmethod
    def forget_in_child(cls) -> None:
        """In a forked child: drop the inherited lock fd, so that the run counts as dead
        once the run's own process is (a sandbox outliving it must not keep it alive)."""
        run = cls._current
        if run is not None and run.pid != os.getpid():
            try:
                os.close(run._fd)
            except OSError:
                pass
            cls._current = None


class SandboxCgroup:
    """The cgroup(s) of one sandbox."""

    def __init__(self, dirs: dict[str, str], v2: str | None, limits: Limits) -> None:
        self.dirs = dirs      # v1: controller -> directory
        self.v2 = v2          # v2 directory
        self.limits = limits
        self.procs: list[tuple[int, str]] = []
        self.v2_procs: tuple[int, str] = (-1, "")
        self.dirfd = -1
        self.released: Stats | None = None  # the stats read when it was released

    def open_for_spawn(self) -> None:
        """Open what the core needs: each v1 "tasks" file (the child moves itself), the v2
        directory (CLONE_INTO_CGROUP) and its cgroup.procs (the fallback).  A file that
        cannot be opened is SetupStepFailed("cgroup-open") naming it; the ones opened
        before it are closed again."""
        try:
            for d in dict.fromkeys(self.dirs.values()):
                p = os.path.join(d, "tasks")
                with setup_step("cgroup-open", p):
                    self.procs.append((os.open(p, os.O_WRONLY | os.O_CLOEXEC), p))
            if self.v2 is not None:
                with setup_step("cgroup-open", self.v2):
                    self.dirfd = os.open(self.v2, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                p = os.path.join(self.v2, "cgroup.procs")
                with setup_step("cgroup-open", p):
                    self.v2_procs = (os.open(p, os.O_WRONLY | os.O_CLOEXEC), p)
        except BaseException:
            self.close_fds()
            raise

    def close_fds(self) -> None:
        for fd, _ in self.procs + [self.v2_procs]:
            if fd >= 0:
                os.close(fd)
        self.procs = []
        self.v2_procs = (-1, "")
        if self.dirfd >= 0:
            os.close(self.dirfd)
            self.dirfd = -1

    def stats(self) -> Stats:
        mem = self.dirs.get("memory")
        peak = limit = None
        oom = 0
        if mem:
            peak = int(_read(f"{mem}/memory.max_usage_in_bytes") or 0) or None
            lim = int(_read(f"{mem}/memory.limit_in_bytes") or 0)
            limit = lim if self.limits.memory is not None else None
            for line in (_read(f"{mem}/memory.oom_control") or "").splitlines():
                if line.startswith("oom_kill "):
                    oom = int(line.split()[1])
        acct = self.dirs.get("cpuacct")
        user = system = None
        if acct:
            u, s = _read(f"{acct}/cpuacct.usage_user"), _read(f"{acct}/cpuacct.usage_sys")
            user = int(u) / 1e9 if u else None
            system = int(s) / 1e9 if s else None
        pids = self.dirs.get("pids")
        hits = 0
        if pids:
            for line in (_read(f"{pids}/pids.events") or "").splitlines():
                if line.startswith("max "):
                    hits = int(line.split()[1])
        if self.v2 is not None:
            v2 = self.v2
            if not mem and os.path.exists(f"{v2}/memory.max"):
                peak = int(_read(f"{v2}/memory.peak") or 0) or None  # Linux 5.19+
                limit = self.limits.memory
            for line in (_read(f"{v2}/memory.events") or "").splitlines():
                if line.startswith("oom_kill "):
                    oom = max(oom, int(line.split()[1]))
            if not acct:  # cpu.stat's usage lines exist on every v2 cgroup, controller or not
                for line in (_read(f"{v2}/cpu.stat") or "").splitlines():
                    k, _, val = line.partition(" ")
                    if k == "user_usec":
                        user = int(val) / 1e6
                    elif k == "system_usec":
                        system = int(val) / 1e6
            if not pids:
                for line in (_read(f"{v2}/pids.events") or "").splitlines():
                    if line.startswith("max "):
                        hits = int(line.split()[1])
        return Stats(peak, limit, oom, user, system, hits, self.limits.pids)

    def kill_all(self) -> int:
        """Kill every process left in the sandbox's cgroups; how many there were."""
        pids: set[int] = set()
        for d in list(self.dirs.values()) + ([self.v2] if self.v2 else []):
            for line in (_read(f"{d}/cgroup.procs") or "").split():
                pids.add(int(line))
        if self.v2 is not None and os.path.exists(f"{self.v2}/cgroup.kill"):
            try:
                _write(f"{self.v2}/cgroup.kill", "1")
            except OSError:
                pass
        for pid in pids:
            try:
                os.kill(pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(pids)

    def remove(self) -> None:
        """Remove the sandbox's cgroups.  One the kernel will not remove is left to the next
        run's sweep, with a warning: the sandbox's result is not lost for it."""
        self.close_fds()
        failed = []
        for d in list(dict.fromkeys(self.dirs.values())) + ([self.v2] if self.v2 else []):
            try:
                _rmdir(d)
            except OSError as e:
                failed.append(f"{d} ({_errname(e)})")
        if failed:
            warnings.warn(f"incarnate: the sandbox's cgroup could not be removed: {', '.join(failed)}; "
                          "the next run's sweep (or `pytest-incarnate sweep`) removes it", RuntimeWarning, stacklevel=2)


def _rmdir(d: str) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            os.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != _errno.EBUSY or time.monotonic() > deadline:
                raise
            # Killed tasks are still being released by the kernel; v1 has no event for
            # "empty", so poll briefly.
            time.sleep(0.001)


def _can_write(d: str) -> str | None:
    """None if a child cgroup can be made in ``d``; else why not."""
    if not os.path.isdir(d):
        return f"{d} does not exist"
    try:
        if os.statvfs(d).f_flag & os.ST_RDONLY:
            return "the cgroup filesystem is mounted read-only here (a container?): mount it read-write or delegate a cgroup"
    except OSError as e:
        return str(e)
    if not os.access(d, os.W_OK):
        return f"no write permission (delegate {d} to this user, or run as root)"
    return None


# A limit file refusing its value with one of these: the value is wrong (SpecError); with
# any other errno the cgroup could not be set up (SetupStepFailed "cgroup-limit").
_VALUE_ERRNOS = frozenset({_errno.EINVAL, _errno.ERANGE, _errno.EOVERFLOW})


def create(limits: Limits, strict: bool) -> tuple[SandboxCgroup | None, list[Degradation]]:
    """Create a sandbox's cgroups with its limits.  Not strict: what cannot be had is a
    CgroupSkipped degradation and the sandbox runs without it; strict: CgroupNotWritable.
    A value the kernel refuses is a SpecError naming the field; any other failure is
    SetupStepFailed naming the step ("cgroup-detect", "cgroup-run", "cgroup-create",
    "cgroup-limit", "cgroup-open"), the file and the errno, and leaves no directory or
    descriptor of the sandbox behind."""
    with setup_step("cgroup-detect", "/proc/self/mountinfo", "finding this process's cgroups"):
        h = Hierarchy.detect()
    degr: list[Degradation] = []
    with setup_step("cgroup-run", _run_lock_dir(), "taking the run's lock"):
        run = Run.current()
    name = run.next_name()
    dirs: dict[str, str] = {}
    made: list[str] = []
    limited = limits.controllers()

    def refuse(where: str, ctrl: str, why: str) -> None:
        if ctrl not in limited:
            return  # only accounting was lost
        if strict:
            raise CgroupNotWritable(where, why)
        degr.append(CgroupSkipped(where, why))

    wanted = set(limited) | ({"memory", "cpuacct", "pids"} & set(h.v1))
    on_v2: list[str] = []  # limits whose controller has no v1 hierarchy
    try:
        for ctrl in sorted(wanted):
            base = h.v1.get(ctrl)
            if base is None:
                if ctrl in limited:
                    on_v2.append(ctrl)
                continue
            why = _can_write(base)
            if why is not None:
                refuse(base, ctrl, why)
                continue
            run_dir = os.path.join(base, RUN_PREFIX + run.id)
            d = os.path.join(run_dir, name)
            with setup_step("cgroup-create", d):
                os.makedirs(run_dir, exist_ok=True)
                os.mkdir(d)
            made.append(d)
            dirs[ctrl] = d
        v2 = None
        v2_why = _can_write(h.v2) if h.v2 is not None else None
        if h.v2 is not None and v2_why is None:
            # Grouping on the unified hierarchy: born there (CLONE_INTO_CGROUP), and
            # cgroup.kill ends every process at once; limits go there when their
            # controller is delegated and no v1 hierarchy has it.
            run_dir = os.path.join(h.v2, RUN_PREFIX + run.id)
            with setup_step("cgroup-create", run_dir):
                os.makedirs(run_dir, exist_ok=True)
            failed = _v2_delegate(h, run_dir, on_v2) if on_v2 else {}
            for ctrl, why in failed.items():
                refuse(h.v2, ctrl, why)
            on_v2 = [c for c in on_v2 if c not in failed]
            v2 = os.path.join(run_dir, name)
            with setup_step("cgroup-create", v2):
                os.mkdir(v2)
            made.append(v2)
        else:
            for ctrl in on_v2:
                if h.v2 is None:
                    refuse(ctrl, ctrl, f"no {ctrl} controller is mounted: no v1 hierarchy has it and there is no cgroup2 hierarchy")
                else:
                    refuse(h.v2, ctrl, f"no v1 {ctrl} hierarchy, and the v2 cgroup cannot be written: {v2_why}")
            on_v2 = []
        cg = SandboxCgroup(dirs, v2, limits)
        try:
            _apply_v1(cg, limits)
            if v2 is not None and on_v2:
                _apply_v2(v2, limits, on_v2)
        except OSError as e:
            field_name = next((f for f in ("memory", "pids", "cpus", "cpu_quota") if f.split("_")[0] in str(e.filename)),
                              "limits")
            value = getattr(limits, field_name, None)
            if e.errno in _VALUE_ERRNOS:  # a value the kernel refuses (CPUs this machine lacks, say)
                raise SpecError(field_name, value,
                                f"the kernel refused it ({_errname(e)} writing {e.filename})") from None
            raise SetupStepFailed("cgroup-limit", e.errno or _errno.EIO, e.filename,
                                  detail=f"setting the {field_name} limit ({value!r})") from e
        cg.open_for_spawn()
        return cg, degr
    except BaseException:
        for d in made:
            try:
                _rmdir(d)
            except OSError:
                pass
        raise


def _errname(e: OSError) -> str:
    return f"{_errno.errorcode.get(e.errno or 0, e.errno)} ({e.strerror})"


def _v2_delegate(h: Hierarchy, run_dir: str, ctrls: list[str]) -> dict[str, str]:
    """Enable ``ctrls`` from the own v2 cgroup down to ``run_dir``; the ones that cannot be
    enabled, with the reason and its fix."""
    assert h.v2 is not None
    base = h.v2
    avail = h.v2_controllers()
    failed: dict[str, str] = {}
    for c in ctrls:
        if c not in avail:
            failed[c] = (
                f"no v1 {c} hierarchy, and {c} is not delegated to the v2 cgroup {base} (its cgroup.controllers: "
                f"{' '.join(sorted(avail)) or 'none'}); fix: enable it in the parent's cgroup.subtree_control, "
                "or run under a delegated cgroup (systemd-run --scope -p Delegate=yes ...)"
            )
    want = [c for c in ctrls if c not in failed]
    enabled = set((_read(f"{base}/cgroup.subtree_control") or "").split())
    todo = [c for c in want if c not in enabled]
    if todo:
        try:
            if h.v2_root is not None and os.path.realpath(base) != os.path.realpath(h.v2_root):
                _move_to_leaf(base)  # no internal processes: a cgroup that delegates has none
            _write(f"{base}/cgroup.subtree_control", " ".join("+" + c for c in todo))
        except OSError as e:
            for c in todo:
                failed[c] = f"enabling {c} in {base}/cgroup.subtree_control failed: {_errname(e)}"
            want = [c for c in want if c not in todo]
    if want:
        enabled = set((_read(f"{run_dir}/cgroup.subtree_control") or "").split())
        todo = [c for c in want if c not in enabled]
        if todo:
            try:
                _write(f"{run_dir}/cgroup.subtree_control", " ".join("+" + c for c in todo))
            except OSError as e:
                for c in todo:
                    failed[c] = f"enabling {c} in {run_dir}/cgroup.subtree_control failed: {_errname(e)}"
    return failed


def _move_to_leaf(base: str) -> None:
    """Move every process of the v2 cgroup ``base`` into ``base/incarnate_leaf``."""
    leaf = os.path.join(base, LEAF)
    os.makedirs(leaf, exist_ok=True)
    for _ in range(100):  # a process may fork while the others move
        pids = (_read(f"{base}/cgroup.procs") or "").split()
        if not pids:
            return
        for pid in pids:
            try:
                _write(f"{leaf}/cgroup.procs", pid)
            except ProcessLookupError:
                pass
    raise OSError(_errno.EBUSY, f"processes keep appearing in {base}/cgroup.procs while moving them to {leaf}")


def _apply_v2(d: str, limits: Limits, ctrls: list[str]) -> None:
    if "memory" in ctrls and limits.memory is not None:
        _write(f"{d}/memory.max", str(limits.memory))
        if os.path.exists(f"{d}/memory.swap.max"):
            _write(f"{d}/memory.swap.max", "0")  # swap off, as on v1
    if "pids" in ctrls and limits.pids is not None:
        _write(f"{d}/pids.max", str(limits.pids))
    if "cpu" in ctrls and limits.cpu_quota is not None:
        period = 100_000
        _write(f"{d}/cpu.max", f"{max(1000, int(limits.cpu_quota * period))} {period}")
    if "cpuset" in ctrls and limits.cpus is not None:
        _write(f"{d}/cpuset.cpus", limits.cpus)  # v2 cpusets inherit mems; no copy as on v1


def _apply_v1(cg: SandboxCgroup, limits: Limits) -> None:
    d = cg.dirs
    if limits.memory is not None and "memory" in d:
        _write(f"{d['memory']}/memory.limit_in_bytes", str(limits.memory))
        if os.path.exists(f"{d['memory']}/memory.memsw.limit_in_bytes"):
            _write(f"{d['memory']}/memory.memsw.limit_in_bytes", str(limits.memory))  # swap off
        _write(f"{d['memory']}/memory.swappiness", "0") if os.path.exists(f"{d['memory']}/memory.swappiness") else None
    if limits.pids is not None and "pids" in d:
        _write(f"{d['pids']}/pids.max", str(limits.pids))
    if limits.cpu_quota is not None and "cpu" in d:
        period = 100_000
        _write(f"{d['cpu']}/cpu.cfs_period_us", str(period))
        _write(f"{d['cpu']}/cpu.cfs_quota_us", str(max(1000, int(limits.cpu_quota * period))))
    if "cpuset" in d:
        parent = os.path.dirname(d["cpuset"])
        grand = os.path.dirname(parent)
        for f in ("cpuset.mems", "cpuset.cpus"):
            # A new v1 cpuset starts empty: copy the parent's (and make the run dir usable).
            for target, source in ((parent, grand), (d["cpuset"], parent)):
                if not _read(f"{target}/{f}"):
                    _write(f"{target}/{f}", _read(f"{source}/{f}") or "")
        if limits.cpus is not None:
            _write(f"{d['cpuset']}/cpuset.cpus", limits.cpus)


def sweep(verbose: bool = False) -> list[str]:
    """Remove the run directories of runs that are gone (their lock can be taken)."""
    h = Hierarchy.detect()
    removed: list[str] = []
    lock_dir = _run_lock_dir()
    for base in list(h.v1.values()) + ([h.v2] if h.v2 else []):
        try:
            entries = os.listdir(base)
        except OSError:
            continue
        for e in entries:
            if not e.startswith(RUN_PREFIX):
                continue
            run_id = e[len(RUN_PREFIX):]
            if Run._current is not None and run_id == Run._current.id:
                continue
            lock = os.path.join(lock_dir, f"run-{run_id}.lock")
            if os.path.exists(lock):
                fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue  # its run is alive
                os.close(fd)
            run_dir = os.path.join(base, e)
            for sb in os.listdir(run_dir):
                p = os.path.join(run_dir, sb)
                if os.path.isdir(p):
                    cg = SandboxCgroup({"x": p}, None, Limits())
                    cg.kill_all()
                    _rmdir(p)
            _rmdir(run_dir)
            removed.append(run_dir)
    for f in os.listdir(lock_dir) if os.path.isdir(lock_dir) else ():
        p = os.path.join(lock_dir, f)
        if f.startswith("run-") and (Run._current is None or f != f"run-{Run._current.id}.lock"):
            fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.unlink(p)
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
    return removed
