"""Typed wrappers over the native core.

The only module that imports the compiled ``_native`` extension.  It turns a list of
:class:`Op` into the flat C spec, calls the core, and turns (step, errno, op index) into
a typed exception that names the step and the path.
"""

from __future__ import annotations

import concurrent.futures
import errno
import os
import select
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

try:
    from pytest_incarnate._native import ffi, lib  # type: ignore[import-not-found,unused-ignore]
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "pytest_incarnate's C core (pytest_incarnate._native) is not built: "
        "install the package with `pip install .` or `pip install -e .` "
        "(needs a C compiler and the Python headers), or build it in place with "
        "`python native/build_ffi.py`"
    ) from exc

from pytest_incarnate.errors import (
    CloneFailed,
    IncarnateError,
    NonExecutablePayload,
    PipeFailed,
    SetupStepFailed,
)

NS_FLAGS = {
    "user": lib.INC_NS_USER,
    "mount": lib.INC_NS_MOUNT,
    "pid": lib.INC_NS_PID,
    "net": lib.INC_NS_NET,
    "uts": lib.INC_NS_UTS,
    "ipc": lib.INC_NS_IPC,
    "cgroup": lib.INC_NS_CGROUP,
}

# Op kinds, by the name used in errors.
OP_KINDS = {
    "hostname": lib.INC_OP_HOSTNAME,
    "loopback": lib.INC_OP_LOOPBACK,
    "make-rprivate": lib.INC_OP_RPRIVATE,
    "mount-tmpfs": lib.INC_OP_TMPFS,
    "bind": lib.INC_OP_BIND,
    "mount-overlay": lib.INC_OP_OVERLAY,
    "mount-proc": lib.INC_OP_PROC,
    "stage-root": lib.INC_OP_STAGE,
    "pivot_root": lib.INC_OP_PIVOT,
    "mkdir": lib.INC_OP_MKDIR,
    "chdir": lib.INC_OP_CHDIR,
    "umask": lib.INC_OP_UMASK,
    "no_new_privs": lib.INC_OP_NO_NEW_PRIVS,
    "setsid": lib.INC_OP_SETSID,
    "drop-privileges": lib.INC_OP_DROP_PRIVS,
    "remount-ro": lib.INC_OP_REMOUNT_RO,
    "unshare": lib.INC_OP_UNSHARE,
    "symlink": lib.INC_OP_SYMLINK,
    "mount-devpts": lib.INC_OP_DEVPTS,
    "hold": lib.INC_OP_HOLD,
    "rlimit": lib.INC_OP_RLIMIT,
    "cpu-affinity": lib.INC_OP_AFFINITY,
}

BIND_RO = lib.INC_BIND_RO
BIND_CREATE = lib.INC_BIND_CREATE
BIND_REC = lib.INC_BIND_REC
DROP_SETGROUPS = lib.INC_DROP_SETGROUPS
UNSHARE_SELF_MAP = lib.INC_UNSHARE_SELF_MAP
OPTIONAL = lib.INC_OP_OPTIONAL  # any op: ENOENT skips it and its ``dependents`` (see Op)
_U64 = (1 << 64) - 1

# The strings each op kind reads in the child (a NULL there would crash it).
_REQUIRED = {
    "hostname": "a",
    "make-rprivate": "a",
    "mount-tmpfs": "bc",
    "bind": "ab",
    "mount-overlay": "bc",
    "mount-proc": "b",
    "stage-root": "a",
    "pivot_root": "a",
    "mkdir": "a",
    "chdir": "a",
    "remount-ro": "a",
    "symlink": "ab",
    "mount-devpts": "b",
    "hold": "a",
}

STEP_NAMES = {
    lib.INC_STEP_PIPE: "pipe",
    lib.INC_STEP_CLONE: "clone",
    lib.INC_STEP_SETGROUPS: "setgroups",
    lib.INC_STEP_UID_MAP: "uid_map",
    lib.INC_STEP_GID_MAP: "gid_map",
    lib.INC_STEP_SYNC: "sync",
    lib.INC_STEP_PDEATHSIG: "parent-death-signal",
    lib.INC_STEP_INIT_FORK: "init-fork",
    lib.INC_STEP_SIGMASK: "signal-mask",
    lib.INC_STEP_STDIO: "stdio",
    lib.INC_STEP_CLOSE_FDS: "close-fds",
    lib.INC_STEP_EXEC: "exec",
    lib.INC_STEP_WAIT: "wait",
    lib.INC_STEP_SETSID: "setsid",
    lib.INC_STEP_GO: "go-byte",
    lib.INC_STEP_JOIN: "join",
}
_RECORDS = {
    lib.INC_OP_UNSHARE: "its request for its id maps",
    lib.INC_OP_HOLD: "word that the upper layers' fd is held",
}
STEP_OP = lib.INC_STEP_OP


@dataclass(frozen=True)
class Op:
    """One child operation.  a/b/c are the C strings; ``path`` is what errors show.

    With ``OPTIONAL`` in ``flags``, ENOENT from the op (its source or target vanished since
    the plan: a host mount unmounted) skips it, and the ``dependents`` ops right after it
    with it (the mounts nested under it), instead of failing the setup."""

    kind: str
    a: str | None = None
    b: str | None = None
    c: str | None = None
    flags: int = 0
    ival: int = 0
    uid: int = 0
    gid: int = 0
    path: str | None = None
    detail: str = ""
    v1: int = 0
    v2: int = 0
    dependents: int = 0


@dataclass
class Native:
    """Everything one core call needs, with the cdata kept alive."""

    ns: tuple[str, ...]
    ops: Sequence[Op]
    uid_map: str | None = None
    gid_map: str | None = None
    setgroups_deny: bool = False
    use_init: bool = True
    die_with_parent: bool = True
    use_clone3: bool = True
    want_pidfd: bool = True
    exe: str | None = None
    argv: Sequence[str] | None = None
    envp: Sequence[str] | None = None
    stdio: tuple[int, int, int] = (-1, -1, -1)
    close_fds: bool = True
    keep_fds: Sequence[int] = ()
    setsid_payload: bool = False
    expect_ppid: int = 0
    enter_vm: bool = False
    layout: Any = None  # rootfs.Layout: where the upper layers show inside
    cgroup_dirfd: int = -1  # cgroup v2 directory for CLONE_INTO_CGROUP
    cgroup_procs: Sequence[tuple[int, str]] = ()  # v1: (open cgroup.procs fd, its path)
    cgroup_v2_procs: tuple[int, str] = (-1, "")   # v2 cgroup.procs, if CLONE_INTO_CGROUP fails
    hold_init: bool = False  # the init holds the sandbox for a copy of the caller to join (hold_direct)
    _keep: list[Any] = field(default_factory=list)

    def _cstr(self, s: str | None) -> Any:
        if s is None:
            return ffi.NULL
        p = ffi.new("char[]", os.fsencode(s))
        self._keep.append(p)
        return p

    def _cstrv(self, items: Sequence[str]) -> Any:
        ptrs = [self._cstr(x) for x in items] + [ffi.NULL]
        arr = ffi.new("char *[]", ptrs)
        self._keep.append(arr)
        return arr

    def build(self) -> Any:
        spec = ffi.new("struct inc_spec *")
        self._keep.append(spec)
        flags = 0
        for name in self.ns:
            flags |= NS_FLAGS[name]
        spec.ns_flags = flags
        spec.use_clone3 = int(self.use_clone3)
        spec.want_pidfd = int(self.want_pidfd)
        spec.use_init = int(self.use_init)
        spec.die_with_parent = int(self.die_with_parent)
        spec.uid_map = self._cstr(self.uid_map)
        spec.gid_map = self._cstr(self.gid_map)
        spec.setgroups_deny = int(self.setgroups_deny)
        ops = ffi.new("struct inc_op[]", max(1, len(self.ops)))
        self._keep.append(ops)
        for i, op in enumerate(self.ops):
            missing = [k for k in _REQUIRED.get(op.kind, "") if getattr(op, k) is None]
            if missing:
                raise ValueError(f"op {i} ({op.kind}) lacks {', '.join(missing)}")
            if op.dependents < 0:
                raise ValueError(f"op {i} ({op.kind}): dependents must be >= 0, not {op.dependents}")
            c = ops[i]
            c.kind = OP_KINDS[op.kind]
            c.ival = op.ival
            c.flags = op.flags
            c.uid = op.uid
            c.gid = op.gid
            c.a = self._cstr(op.a)
            c.b = self._cstr(op.b)
            c.c = self._cstr(op.c)
            c.v1 = op.v1 & _U64  # RLIM_INFINITY is -1 in Python, all ones in C
            c.v2 = op.v2 & _U64
            c.dependents = op.dependents
        spec.ops = ops
        spec.n_ops = len(self.ops)
        spec.exe = self._cstr(self.exe)
        spec.argv = self._cstrv(self.argv) if self.argv is not None else ffi.NULL
        spec.envp = self._cstrv(self.envp) if self.envp is not None else ffi.NULL
        spec.stdin_fd, spec.stdout_fd, spec.stderr_fd = self.stdio
        spec.close_fds = int(self.close_fds)
        keep = ffi.new("int[]", sorted(self.keep_fds) or [0])
        self._keep.append(keep)
        spec.keep_fds = keep
        spec.n_keep_fds = len(self.keep_fds)
        spec.setsid_payload = int(self.setsid_payload)
        spec.expect_ppid = self.expect_ppid
        spec.enter_vm = int(self.enter_vm)
        spec.cgroup_dirfd = self.cgroup_dirfd
        procs = ffi.new("int[]", [fd for fd, _ in self.cgroup_procs] or [0])
        self._keep.append(procs)
        spec.cgroup_procs_fds = procs
        spec.n_cgroup_procs_fds = len(self.cgroup_procs)
        spec.cgroup_v2_procs_fd = self.cgroup_v2_procs[0]
        spec.hold_init = int(self.hold_init)
        return spec


@dataclass(frozen=True)
class Started:
    pid: int
    pidfd: int
    status_fd: int
    used_clone3: bool
    hold_fd: int = -1
    skipped: tuple[str, ...] = ()  # the paths of the optional ops skipped (host mounts gone since the plan)


def error_for(native: Native, res: Any) -> IncarnateError:
    """The typed exception for a failed core call."""
    step, err, idx = res.step, res.err, res.op_index
    if step == lib.INC_STEP_PIPE:
        return PipeFailed(err)
    if step == lib.INC_STEP_CLONE:
        return CloneFailed(err, tuple(native.ns))
    if step == lib.INC_STEP_EXEC:
        return NonExecutablePayload(native.exe or "?", err)
    if step == STEP_OP and 0 <= idx < len(native.ops):
        op = native.ops[idx]
        detail = op.detail
        if err == errno.EROFS and op.kind in ("bind", "mount-tmpfs", "mount-overlay"):
            detail += ("; " if detail else "") + (
                "the mount point does not exist and the root is read-only: pick a target that exists, "
                "or one under a tmpfs of the Spec (such as /tmp)"
            )
        return SetupStepFailed(op.kind, err, op.path, detail=detail)
    if step == lib.INC_STEP_RECORD and 0 <= idx < len(native.ops):
        op = native.ops[idx]
        what = _RECORDS.get(OP_KINDS[op.kind], "word that it skipped the op")
        return SetupStepFailed(op.kind, err, op.path, detail=f"the child could not send the parent {what}")
    if step == lib.INC_STEP_GO:
        return SetupStepFailed("go-byte", err, detail="the parent could not write the go byte into the sync pipe")
    if step == lib.INC_STEP_CGROUP:
        path = native.cgroup_procs[idx][1] if 0 <= idx < len(native.cgroup_procs) else native.cgroup_v2_procs[1]
        return SetupStepFailed("cgroup", err, path, detail="placing the sandbox in its cgroup")
    if step in (lib.INC_STEP_UID_MAP, lib.INC_STEP_GID_MAP, lib.INC_STEP_SETGROUPS):
        name = STEP_NAMES[step]
        data = {"uid_map": native.uid_map, "gid_map": native.gid_map, "setgroups": "deny"}[name]
        return SetupStepFailed(name, err, f"/proc/<child>/{name}", detail=f"writing {data!r}")
    return SetupStepFailed(STEP_NAMES.get(step, f"step {step}"), err)


# Test-only stage hook (tests/test_kill_matrix.py).  INCARNATE_TEST_STAGE_FIFO=<path>:<stage>
# makes the process that reaches <stage> write "<stage>\n" to <path> (a FIFO the test holds
# open for reading) and stop there, so that the test can SIGKILL pytest at that exact point
# without sleeping.  Stages here: "before-clone" (just before the core starts a sandbox),
# "after-clone" (in the core, the parent right after clone, before the id maps: see
# inc_spec.test_stage) and "after-mounts" (the child's setup is done, the payload runs).
# Probe trials never stop.  Read once, at import: unset, a sandbox pays one comparison.
TEST_STAGES = ("before-clone", "after-clone", "after-mounts")


def _test_stage_from_env() -> tuple[str, str] | None:
    path, sep, stage = os.environ.get("INCARNATE_TEST_STAGE_FIFO", "").rpartition(":")
    return (path, stage) if sep and path and stage in TEST_STAGES else None


_TEST_STAGE = _test_stage_from_env()


def _test_stage(stage: str) -> None:
    """Test-only: at the stage INCARNATE_TEST_STAGE_FIFO names, announce it and wait until the
    parent of this process is gone.  In pytest itself (the process the test kills) that is
    forever; a process that the kill does not end (the forked child before the core runs)
    then goes on exactly as if the kill had come at this point."""
    if _TEST_STAGE is None or _TEST_STAGE[1] != stage:
        return
    parent = os.pidfd_open(os.getppid())  # taken before the line: the test kills only after reading it
    try:
        fd = os.open(_TEST_STAGE[0], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, stage.encode() + b"\n")
        finally:
            os.close(fd)
        select.select([parent], [], [])
    finally:
        os.close(parent)


def _test_stage_before_clone(spec: Any) -> int:
    """Test-only: the before-clone stage, then the core's after-clone stage armed in ``spec``;
    the fd to close after the core call (-1: none)."""
    _test_stage("before-clone")
    if _TEST_STAGE is None or _TEST_STAGE[1] != "after-clone":
        return -1
    fd = os.open(_TEST_STAGE[0], os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    spec.test_stage = lib.INC_TEST_STAGE_AFTER_CLONE
    spec.test_stage_fd = fd
    return fd


# The parent-death signal follows the thread that created the child, not the process: a
# sandbox spawned from a short-lived thread would be killed when that thread ends.  Spawns
# from other threads are therefore made by one long-lived thread of this module's.
_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawner_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="incarnate-spawn")
        return _spawner


def spawn(native: Native) -> Started:
    spec = native.build()
    res = ffi.new("struct inc_result *")
    staged = _TEST_STAGE is not None and native.argv is not None  # test-only; never in a probe trial
    stage_fd = _test_stage_before_clone(spec) if staged else -1
    if threading.current_thread() is threading.main_thread():
        rc = lib.inc_spawn(spec, res)
    else:
        rc = _spawner_pool().submit(lib.inc_spawn, spec, res).result()
    if stage_fd >= 0:
        os.close(stage_fd)
    if rc != 0:
        raise error_for(native, res)
    if staged:
        _test_stage("after-mounts")
    return Started(res.pid, res.pidfd, res.status_fd, bool(res.used_clone3), res.hold_fd, skipped(native, res))


def skipped(native: Native, res: Any) -> tuple[str, ...]:
    """The paths of the optional ops a started sandbox skipped (the first 16 named)."""
    n = min(res.n_skipped, len(res.skipped))
    return tuple(native.ops[i].path or native.ops[i].kind for i in res.skipped[0:n] if 0 <= i < len(native.ops))


def mount_id(path: str) -> tuple[int, int]:
    """(mount id, file type bits) of what ``path`` resolves to now, without following its last
    component or triggering an automount; OSError (ENOSYS before Linux 5.8) otherwise."""
    mnt = ffi.new("uint64_t *")
    mode = ffi.new("uint32_t *")
    if lib.inc_mount_id(os.fsencode(path), mnt, mode) < 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err), path)
    return int(mnt[0]), int(mode[0])


def abandon(started: Started) -> None:
    """Kill and reap a started sandbox whose handle could not be made (an interrupt)."""
    try:
        os.kill(started.pid, 9)
    except ProcessLookupError:
        pass
    os.waitpid(started.pid, 0)
    for fd in (started.pidfd, started.status_fd, started.hold_fd):
        if fd >= 0:
            os.close(fd)


def enter(native: Native, spec: Any) -> None:
    """Enter the sandbox from a freshly forked child, with ``spec`` built by
    ``native.build()`` before the fork.  Returns in the payload; raises (in the calling
    process, the would-be monitor) if setup failed."""
    res = ffi.new("struct inc_result *")
    stage_fd = _test_stage_before_clone(spec) if _TEST_STAGE is not None else -1  # test-only
    rc = lib.inc_enter(spec, res)
    if stage_fd >= 0:
        os.close(stage_fd)
    if rc != 0:
        raise error_for(native, res)
    if _TEST_STAGE is not None:
        _test_stage("after-mounts")  # in the payload


STATUS_SIZE = lib.inc_status_size()


# ---------------------------------------------------------------- direct enter
# The caller itself starts the init (CLONE_VM), and the init forks the payload from the
# caller's memory: one copy instead of two (a forked monitor, then the payload).  The call
# goes through ctypes' PyDLL to the module's inc_enter_direct_py (native/build_ffi.py): the
# GIL stays held and no bytecode runs between PyOS_BeforeFork, the core call and
# PyOS_AfterFork_Parent/_Child, as in os.fork.  A started init is the core's (its registry:
# inc_direct_reap) before any Python code of the caller runs again.


@dataclass(frozen=True)
class DirectStarted:
    """An init started by ``enter_direct``; reaped with ``direct_reap``."""

    pid: int


_direct_call: Any = None


def direct_available() -> bool:
    """Direct enter works here: raw system calls, no shadow stack, ctypes' PyDLL."""
    global _direct_call
    if _direct_call is None:
        try:
            import ctypes

            from pytest_incarnate import _native

            fn = ctypes.PyDLL(_native.__file__).inc_enter_direct_py
            fn.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
            fn.restype = ctypes.c_int
            _direct_call = fn if lib.inc_direct_available() else False
        except (ImportError, OSError, AttributeError):
            _direct_call = False
    return bool(_direct_call)


def _addr(p: Any) -> int:
    return int(ffi.cast("uintptr_t", p))


def _direct_stack(native: Native) -> Any:
    """Memory for a directly started init (its stack, its context), or None when 64 inits
    are live (the caller then forks a monitor)."""
    mem = lib.inc_direct_new()
    if mem == ffi.NULL:
        if ffi.errno == errno.EAGAIN:
            return None
        raise CloneFailed(ffi.errno or errno.ENOMEM, tuple(native.ns))
    return mem


def _abandon_direct(mem: Any, res: Any) -> None:
    """An interrupt in a direct start: an init that was started (it is in the registry) is
    killed, to be reaped later; otherwise its memory is freed."""
    if lib.inc_direct_owns(mem):
        try:
            os.kill(res.pid, 9)
        except ProcessLookupError:
            pass
    else:
        lib.inc_direct_free(mem)


def enter_direct(native: Native, spec: Any) -> DirectStarted | None | Literal[False]:
    """Enter the sandbox from this process without forking it first.  Returns None in the
    payload; in the caller, the started init, or False when this process is not (or no
    longer) single-threaded or 64 inits are live (fork a monitor instead).  Raises the
    typed error if setup failed, with nothing left behind."""
    mem = _direct_stack(native)
    if mem is None:
        return False
    res = ffi.new("struct inc_result *")
    me = os.getpid()
    stage_fd = -1
    try:
        stage_fd = _test_stage_before_clone(spec) if _TEST_STAGE is not None else -1
        rc = _direct_call(_addr(spec), _addr(res), _addr(mem))
        if rc == 1:  # the payload
            if stage_fd >= 0:
                os.close(stage_fd)
            if _TEST_STAGE is not None:
                _test_stage("after-mounts")
            return None
    except BaseException:
        if os.getpid() != me:  # pragma: no cover - the payload never runs the caller's code
            os._exit(70)
        _abandon_direct(mem, res)
        if stage_fd >= 0:
            os.close(stage_fd)
        raise
    if stage_fd >= 0:
        os.close(stage_fd)
    if rc == 0:
        return DirectStarted(res.pid)
    lib.inc_direct_free(mem)
    if rc == 2:
        return False
    raise error_for(native, res)


def hold_direct(native: Native, spec: Any) -> DirectStarted | Literal[False]:
    """Start an init that builds the sandbox and holds it (``native.hold_init``), from this
    process, whatever its threads (``inc_hold_direct``); it is the core's until
    ``direct_reap``.  False when 64 inits are live.  Raises the typed error if the setup
    failed, with nothing left behind."""
    mem = _direct_stack(native)
    if mem is None:
        return False
    res = ffi.new("struct inc_result *")
    stage_fd = -1
    try:
        stage_fd = _test_stage_before_clone(spec) if _TEST_STAGE is not None else -1
        rc = lib.inc_hold_direct(spec, res, mem)
    except BaseException:
        _abandon_direct(mem, res)
        raise
    finally:
        if stage_fd >= 0:
            os.close(stage_fd)
    if rc == 0:
        return DirectStarted(res.pid)
    lib.inc_direct_free(mem)
    raise error_for(native, res)


def join(native: Native, spec: Any, pidfd: int, ns_flags: int) -> None:
    """In this process's copy forked into a held sandbox's pid namespace: join the init's
    other namespaces and apply the Spec's process attributes (``inc_join``).  Raises the
    typed error (step "join", or the op) if that fails."""
    res = ffi.new("struct inc_result *")
    if lib.inc_join(spec, pidfd, ns_flags, res) != 0:
        raise error_for(native, res)
    if _TEST_STAGE is not None:
        _test_stage("after-mounts")


def setns(fd: int, ns_flags: int) -> None:
    if lib.inc_setns(fd, ns_flags) != 0:
        err = ffi.errno
        raise OSError(err, os.strerror(err))


def direct_reap(pid: int = -1, nohang: bool = False) -> tuple[int, int, float]:
    """Wait for a directly started init (``pid``, or any with -1; ``nohang``: only one that
    has exited): (its pid, 0 if none has exited, -1 if none is registered; the payload's
    raw wait status; the sandbox's CPU time in seconds)."""
    status = ffi.new("int *")
    cpu = ffi.new("long long *")
    got = lib.inc_direct_reap(pid, int(nohang), status, cpu)
    return int(got), int(status[0]), cpu[0] / 1e6


def direct_drop_status(pid: int) -> None:
    """A registered init's status pipe is closed: a finished call waiting to be reaped holds
    no descriptor (its result is in)."""
    lib.inc_direct_drop_status(pid)


def direct_live() -> int:
    return int(lib.inc_direct_live()) if _direct_call else 0
