"""Sandbox: run a program, or call a Python function, inside an incarnation.

Spec -> plan (the probe decides what is possible; strict raises, otherwise degradations
are recorded) -> ordered child operations -> native core -> Result.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno as _errno
import io
import os
import pickle
import resource
import select
import shutil
import signal as _signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, NoReturn

from pytest_incarnate import _ffi, cgroups, rootfs
from pytest_incarnate._ffi import BIND_CREATE, BIND_REC, BIND_RO, DROP_SETGROUPS, Native, Op
from pytest_incarnate.errors import (
    CloneFailed,
    CpuAffinitySkipped,
    Degradation,
    IncarnateError,
    InvalidArgv,
    NamespaceCapMissing,
    NamespaceSkipped,
    NonExecutablePayload,
    OverlaySkipped,
    OverlayUnavailable,
    ProcSkipped,
    SandboxCrashed,
    SandboxIOFailed,
    SandboxTimeout,
    SetupStepFailed,
    SpecError,
    UidMapFailed,
    UserNsDisabledBySysctl,
    UserNsRestrictedByLsm,
    setup_step,
)
from pytest_incarnate.probe import Capabilities, id_maps, probe
from pytest_incarnate.spec import NAMESPACES, Spec

STAGE_BASE = "/tmp"
MOUNTINFO = "/proc/self/mountinfo"
# A refused clone worth one re-probe: a limit reached, or a capability taken away since.
_RETRY_CLONE_ERRNOS = frozenset({_errno.EPERM, _errno.ENOSPC, _errno.EINVAL, _errno.EUSERS, _errno.EACCES})
PIPE = -1
DEVNULL = -3


LATE_NS = ("user", "net", "uts", "ipc")
# The cgroup namespace is entered by an op, after the move into the sandbox's cgroups (so that
# its root is the sandbox's cgroup) and before the payload's user namespace: owned by a more
# privileged user namespace, it does not let the payload mount cgroupfs (and write its own
# limits through it).



@dataclass(frozen=True)
class Plan:
    """What a Spec will get on this machine: the namespaces granted, what degraded, and
    how the root is made ("overlay": the host's, copy-on-write; "readonly"; "host": no
    mount namespace)."""

    namespaces: tuple[str, ...]
    degradations: tuple[Degradation, ...]
    uid_map: str | None
    gid_map: str | None
    setgroups_deny: bool
    root: str = "readonly"
    overlay_first: bool = False  # build the root as real root, then enter the user namespace
    cpus: frozenset[int] = frozenset()  # the CPU affinity to set (empty: leave it)
    proc: bool = True  # a /proc is mounted (the nested user namespace maps itself through it)
    proc_fresh: bool = True  # a fresh proc mount; else the enclosing /proc is bound

    @property
    def relock(self) -> bool:
        """The mounts are made inside the user namespace (no real root): a nested user
        namespace is entered after them, so that the kernel locks them (the payload cannot
        remount a read-only mount read-write, nor unmount what covers the host)."""
        return "user" in self.namespaces and "mount" in self.namespaces and "pid" in self.namespaces \
            and self.proc and not self.overlay_first

    @property
    def late_namespaces(self) -> tuple[str, ...]:
        """Namespaces entered with unshare after the root is built, owned by the user
        namespace entered then: the user namespace itself when real root builds the root
        first; the others when the user namespace is re-entered to lock the mounts."""
        if "user" not in self.namespaces:
            return ()
        if self.overlay_first:
            return tuple(n for n in self.namespaces if n in LATE_NS)
        if self.relock:
            return tuple(n for n in self.namespaces if n in LATE_NS and n != "user")
        return ()

    @property
    def clone_namespaces(self) -> tuple[str, ...]:
        late = self.late_namespaces
        return tuple(n for n in self.namespaces if n not in late and n != "cgroup")


@dataclass(frozen=True)
class Result:
    """The outcome of :meth:`Sandbox.run`."""

    argv: tuple[str, ...]
    returncode: int
    stdout: bytes | None
    stderr: bytes | None
    signal: int | None = None
    timed_out: bool = False
    degradations: tuple[Degradation, ...] = ()
    namespaces: tuple[str, ...] = ()
    duration: float = 0.0
    changes: rootfs.Changes | None = None
    stats: cgroups.Stats | None = None
    cause: str | None = None  # a limit that ended the payload ("OOM-killed: ...", "CPU time limit ...")

    @property
    def oom_killed(self) -> bool:
        return self.stats is not None and self.stats.oom_killed

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _missing_ns_error(ns: str, caps: Capabilities, reason: str, fix: str) -> NamespaceCapMissing:
    if ns == "user":
        if "AppArmor" in reason:
            return UserNsRestrictedByLsm("AppArmor", reason, fix)
        for name in ("user.max_user_namespaces", "kernel.unprivileged_userns_clone"):
            if caps.sysctls.get(name) == "0" and name in reason:
                return UserNsDisabledBySysctl(name, "0", fix)
    return NamespaceCapMissing(ns, reason, fix)


def make_plan(spec: Spec, caps: Capabilities) -> Plan:
    """Decide, before anything runs, which namespaces this spec gets here."""
    granted: list[str] = []
    degr: list[Degradation] = []
    want_user = "user" in spec.namespaces
    for ns in NAMESPACES:
        if ns not in spec.namespaces:
            continue
        with_user = want_user and (ns == "user" or caps.granted("ns.user"))
        cap = caps.namespace(ns, with_user)
        if cap.granted:
            granted.append(ns)
            continue
        if spec.strict:
            raise _missing_ns_error(ns, caps, cap.reason, cap.fix)
        degr.append(NamespaceSkipped(ns, cap.reason + (f" (fix: {cap.fix})" if cap.fix else "")))
    uid_map = gid_map = None
    deny = False
    if "user" in granted:
        uid_map, gid_map, deny = id_maps(spec.map_user)
    root = "host"
    if "mount" in granted:
        root = "readonly"
        if spec.copy_on_write:
            # The host's root needs real root (overlaid before the user namespace is
            # entered); a directory of one's own can be overlaid inside a user namespace.
            # The host's root needs real root (overlaid before the user namespace is
            # entered); a directory of one's own can be overlaid inside a user namespace.
            cap = caps["overlay.root"]
            userns_overlay = "user" in granted and caps["overlay"].granted
            if cap.granted or (spec.custom_root and userns_overlay):
                root = "overlay"
            elif spec.strict:
                raise OverlayUnavailable(cap.reason, cap.fix)
            else:
                reason = cap.reason
                if userns_overlay:
                    root = "own-trees"
                    reason += "; the caller's own trees (home, project) are copy-on-write, the rest read-only"
                degr.append(OverlaySkipped(reason))
    proc_fresh = spec.mount_proc and "pid" in granted and "mount" in granted
    if proc_fresh and not caps.granted("proc"):
        # Inside a sandbox (or a container) whose /proc has locked read-only parts, the
        # kernel refuses a new proc mount ("not fully visible"): bind the enclosing one.
        cap = caps["proc"]
        if spec.strict:
            raise NamespaceCapMissing("pid", f"a fresh /proc cannot be mounted: {cap.reason}", cap.fix)
        degr.append(ProcSkipped(cap.reason))
        proc_fresh = False
    # Real root builds the root (copy-on-write or read-only) before it enters the user
    # namespace: the mounts are then locked for the payload.
    overlay_first = root in ("overlay", "readonly") and "user" in granted and caps["overlay.root"].granted
    cpus: frozenset[int] = frozenset()
    if spec.cpu_affinity is not None:
        with setup_step("cpu-affinity", detail="reading this process's CPU affinity"):
            allowed = frozenset(os.sched_getaffinity(0))
        cpus = spec.cpu_affinity & allowed
        refused = sorted(spec.cpu_affinity - allowed)
        if refused:
            why = f"CPUs {refused} are not allowed for this process (allowed: {sorted(allowed)})"
            if spec.strict:
                raise SpecError("cpu_affinity", sorted(spec.cpu_affinity), why)
            degr.append(CpuAffinitySkipped(why + ("; using " + str(sorted(cpus)) if cpus else "; affinity left as it is")))
    return Plan(tuple(granted), tuple(degr), uid_map, gid_map, deny, root, overlay_first, cpus, spec.mount_proc,
                proc_fresh)


def _resolve_host_path(field: str, path: str) -> str:
    """``path`` with its symlinks resolved, now, in the parent (the child refuses any symlink
    it meets later); a path that cannot be resolved is a SpecError naming the field."""
    try:
        return os.path.realpath(path, strict=False)
    except OSError as e:  # a component swapped while it was being read, a loop
        raise SpecError(field, path, f"cannot be resolved: {e.strerror or e}") from None


def _ancestors(path: str) -> list[str]:
    out = []
    while path not in ("/", ""):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:  # "//" is its own dirname
            break
        path = parent
    return out


def build_ops(spec: Spec, plan: Plan) -> tuple[list[Op], rootfs.Layout]:
    """The ordered child operations for a spec and its plan, and where the upper layers
    show inside (for the changes report)."""
    ns = plan.namespaces
    late = plan.late_namespaces
    ops: list[Op] = []
    layout = rootfs.Layout()
    cwd = spec.cwd
    if "cgroup" in ns:
        ops.append(Op("unshare", ival=_ffi.NS_FLAGS["cgroup"], path="cgroup (rooted at the sandbox's cgroup)"))
    if "mount" in ns:
        new, old = rootfs.NEW, rootfs.OLD
        ops.append(Op("make-rprivate", a="/", path="/"))
        ops.append(Op("stage-root", a=STAGE_BASE, path=STAGE_BASE))
        mountpoints: list[str] = []
        if plan.root == "overlay":
            with setup_step("host-mounts", MOUNTINFO, "listing the host's filesystems to overlay each"):
                root_ops, layout = rootfs.overlay_root_ops(spec, plan, userxattr="user" in ns and not late)
            ops += root_ops
        else:
            dirs = spec.root_dirs()
            if len(dirs) == 1:
                root_src = dirs[0]
                ops.append(Op("bind", a=old + root_src.rstrip("/") if root_src != "/" else old, b=new,
                              flags=BIND_RO | BIND_REC, path=root_src))
            else:  # a read-only overlay of the layer stack
                data = "lowerdir=" + ":".join(old + d for d in dirs) + (",userxattr" if "user" in ns and not plan.overlay_first else "")
                ops.append(Op("mount-overlay", b=new, c=data, path=":".join(dirs), detail="read-only layer stack"))
            if plan.root == "own-trees":
                with setup_step("host-mounts", MOUNTINFO, "finding the caller's own trees to overlay"):
                    root_ops, layout = rootfs.own_tree_ops(spec, plan)
                ops += root_ops
        ops += rootfs.standard_ops(spec, plan, overlay=plan.root == "overlay")
        mountpoints += ["/dev", "/sys", "/proc", *spec.hide]
        scratch: list[tuple[str, str]] = []
        for t in spec.tmpfs:
            mountpoints.append(t.target)
            if plan.root == "overlay" and t.size is None:
                # An unsized tmpfs place is a directory of the upper tmpfs, bound in: what
                # is written there shows in the changes report and counts to upper_size.
                name = f"T{len(scratch)}"
                scratch.append((t.target, name))
                ops.append(Op("mkdir", a=f"{rootfs.UPPERS}/{name}", ival=t.mode))
                ops.append(Op("bind", a=f"{rootfs.UPPERS}/{name}", b=new + t.target, flags=BIND_CREATE, path=t.target,
                              detail="scratch space"))
            else:
                ops.append(Op("mount-tmpfs", b=new + t.target, c=t.data(), flags=BIND_CREATE, path=t.target))
        userxattr = ",userxattr" if "user" in ns and "user" not in late else ""
        for o in spec.overlays:
            # Host paths are resolved here: after the staging pivot an absolute symlink
            # would resolve against the staging root, not the host's.
            real = os.path.realpath
            data = "lowerdir=" + ":".join(old + real(p) for p in o.lower)
            if o.upper is not None and o.work is not None:
                data += f",upperdir={old}{real(o.upper)},workdir={old}{real(o.work)}"
            mountpoints.append(o.target)
            ops.append(Op("mount-overlay", b=new + o.target, c=data + userxattr, flags=BIND_CREATE, path=o.target))
        for b in spec.binds:
            src = _resolve_host_path("binds.source", b.source)
            flags = BIND_REC | BIND_CREATE | (BIND_RO if b.readonly else 0)
            target = b.target or b.source
            mountpoints.append(target)
            ops.append(Op("bind", a=old + src, b=new + target, flags=flags, path=b.source,
                          detail=f"onto {target}" + (" (read-only)" if b.readonly else "")))
        with setup_step("cwd", detail="reading the working directory"):
            here = os.getcwd()
        project_layer = (plan.root == "overlay" and spec.cwd is None and not spec.custom_root
                         and spec.mount_root_hides(here))
        if project_layer:
            # The working directory (the project) lies under a scratch tmpfs (/tmp): keep
            # it visible, copy-on-write, as the rest of the host.
            name = f"L{len(layout.layers)}"
            ops += rootfs._layer_ops(here, name, here, userxattr="user" in ns and not late)
            layout = rootfs.Layout(layout.layers + ((here, name, here),))
            mountpoints.append(here)
        if plan.root == "overlay" or layout.layers:
            with setup_step("hold", "(upper layers)", "reading RLIMIT_NOFILE"):
                hold = rootfs.hold_fd_number()
            ops.append(Op("hold", a=rootfs.UPPERS, ival=hold, path="(upper layers)"))
            skip = frozenset(p for m in mountpoints for p in _ancestors(m))
            layout = rootfs.Layout(layout.layers, tuple(scratch), skip, hold, spec.keep_upper)
        ops.append(Op("pivot_root", a=new, path="/"))
        if cwd is None:
            visible = not spec.custom_root and (project_layer or not spec.mount_root_hides(here))
            cwd = here if visible else "/"
    if late and plan.overlay_first:
        flags = 0
        for n in late:
            flags |= _ffi.NS_FLAGS[n]
        if "mount" in ns:
            flags |= _ffi.NS_FLAGS["mount"]  # so that the new user namespace owns a mount namespace too
        ops.append(Op("unshare", ival=flags, path=" ".join(late)))
    elif plan.relock:
        # A nested user (and mount) namespace locks every mount made so far; the child maps
        # its own single id (the id it has in the outer namespace).
        flags = _ffi.NS_FLAGS["user"] | _ffi.NS_FLAGS["mount"]
        for n in late:
            flags |= _ffi.NS_FLAGS[n]
        inner_uid = os.getuid() if spec.map_user == "self" else 0
        inner_gid = os.getgid() if spec.map_user == "self" else 0
        ops.append(Op("unshare", ival=flags, flags=_ffi.UNSHARE_SELF_MAP, a=f"{inner_uid} {inner_uid} 1\n",
                      b=f"{inner_gid} {inner_gid} 1\n", path="user (nested, locks the mounts) " + " ".join(late)))
    if "uts" in ns and spec.hostname is not None:
        ops.append(Op("hostname", a=spec.hostname, path=spec.hostname))
    if "net" in ns and spec.loopback:
        ops.append(Op("loopback", path="lo"))
    if cwd is not None:
        ops.append(Op("chdir", a=cwd, path=cwd))
    if spec.umask is not None:
        ops.append(Op("umask", ival=spec.umask))
    if spec.uid is not None or spec.gid is not None:
        uid = spec.uid if spec.uid is not None else os.getuid()
        gid = spec.gid if spec.gid is not None else os.getgid()
        flags = 0 if plan.setgroups_deny else DROP_SETGROUPS
        ops.append(Op("drop-privileges", uid=uid, gid=gid, flags=flags, path=f"uid={uid} gid={gid}"))
    for name, (soft, hard) in (spec.rlimits or {}).items():
        res = getattr(resource, "RLIMIT_" + name.upper())
        # "unlimited": as high as this process may go (the sandbox cannot raise a hard limit:
        # that takes CAP_SYS_RESOURCE in the initial user namespace).
        if resource.RLIM_INFINITY in (soft, hard):
            try:
                ceiling = resource.getrlimit(res)[1]
            except OSError:  # let the child try, and say what the kernel answers
                ceiling = resource.RLIM_INFINITY
            soft, hard = (ceiling if v == resource.RLIM_INFINITY else v for v in (soft, hard))
        ops.append(Op("rlimit", ival=res, v1=soft, v2=hard, path=name, detail=f"soft {soft}, hard {hard}"))
    if plan.cpus:
        mask = sum(1 << c for c in plan.cpus)
        ops.append(Op("cpu-affinity", v1=mask & (2**64 - 1), v2=mask >> 64, path=",".join(map(str, sorted(plan.cpus)))))
    if spec.no_new_privs:
        ops.append(Op("no_new_privs"))
    return ops, layout


def _env_list(env: Mapping[str, str] | None) -> list[str]:
    src = os.environ if env is None else env
    return [f"{k}={v}" for k, v in src.items()]


def _check_argv(argv: Any) -> tuple[str, ...]:
    if isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence):
        raise InvalidArgv(argv, "must be a list of strings, e.g. ['/bin/true']")
    if not argv:
        raise InvalidArgv(argv, "must not be empty")
    out = []
    for a in argv:
        if isinstance(a, os.PathLike):
            a = os.fspath(a)
        if not isinstance(a, str):
            raise InvalidArgv(argv, f"every item must be a str, got {type(a).__name__}")
        if "\x00" in a:
            raise InvalidArgv(argv, "an argument contains a NUL byte")
        out.append(a)
    return tuple(out)


def _resolve_exe(argv0: str, env: Mapping[str, str] | None, roots: list[str] | None) -> str:
    """The path to exec, resolved in the parent (the child only execs it).  ``roots``: the
    directories of a custom root, top first (None: the host's)."""
    path = (env if env is not None else os.environ).get("PATH", os.defpath)
    bases = [r.rstrip("/") for r in roots] if roots else [""]

    def executable(p: str) -> bool:
        return any(os.access(b + p, os.X_OK) for b in bases) if p.startswith("/") else os.access(p, os.X_OK)

    if "/" in argv0:
        found = argv0 if executable(argv0) else None
    elif roots is None:
        found = shutil.which(argv0, path=path)
    else:
        found = next((os.path.join(d, argv0) for d in path.split(":") if executable(os.path.join(d, argv0))), None)
    if not found:
        exists = any(os.path.exists(b + argv0) for b in bases) if argv0.startswith("/") else False
        raise NonExecutablePayload(argv0, _errno.EACCES if exists else _errno.ENOENT)
    return found


class Handle:
    """A running sandboxed program (from :meth:`Sandbox.spawn`).

    ``pid`` is the sandbox's first process (its pid-1 init when there is a pid
    namespace); ``pidfd`` refers to it.  Signals sent with :meth:`send_signal` reach the
    payload (the init forwards SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2);
    :meth:`kill` ends the whole sandbox.
    """

    def __init__(self, argv: tuple[str, ...], started: _ffi.Started, plan: Plan,
                 stdin: IO[bytes] | None, stdout: IO[bytes] | None, stderr: IO[bytes] | None,
                 has_init: bool, layout: rootfs.Layout | None = None,
                 cgroup: cgroups.SandboxCgroup | None = None, plan_rlimits: Mapping[str, Any] | None = None) -> None:
        self.argv = argv
        self._cgroup = cgroup
        self.stats: cgroups.Stats | None = None
        self.cause: str | None = None  # a limit that ended the payload, named
        cpu = (plan_rlimits or {}).get("cpu")
        self._cpu_limit = cpu[0] if cpu else None
        self._hold_fd = started.hold_fd
        self._layout = layout
        self.changes: rootfs.Changes | None = None
        self.pid = started.pid
        self.pidfd = started.pidfd
        self._status_fd = started.status_fd
        self.plan = plan
        self.degradations = plan.degradations
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode: int | None = None
        self.signal: int | None = None
        self.timed_out = False
        self._has_init = has_init
        self.used_clone3 = started.used_clone3
        self._start = time.monotonic()
        self.duration = 0.0

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.returncode is None:
                self.kill()
            self.wait()
        finally:
            for f in (self.stdin, self.stdout, self.stderr):
                if f is not None:
                    f.close()

    def __del__(self) -> None:
        try:
            if self.returncode is None:
                self.kill()
                self.wait()
        except Exception:
            pass

    def poll(self) -> int | None:
        if self.returncode is None:
            self._reap(os.WNOHANG)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the payload; raise TimeoutError after ``timeout`` seconds."""
        if self.returncode is not None:
            return self.returncode
        if timeout is not None and self.pidfd >= 0:
            r, _, _ = select.select([self.pidfd], [], [], max(0.0, timeout))
            if not r:
                raise TimeoutError(f"sandbox {self.argv[0]!r} still running after {timeout} s")
        elif timeout is not None:
            deadline = time.monotonic() + timeout
            while self.poll() is None:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sandbox {self.argv[0]!r} still running after {timeout} s")
                time.sleep(0.005)
        self._reap(0)
        assert self.returncode is not None
        return self.returncode

    def _reap(self, flags: int) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(self.pid, flags)
            except InterruptedError:
                continue
            except ChildProcessError:
                # Someone else reaped it (SIGCHLD ignored, or a stray waitpid(-1)):
                # the status is lost, and saying "0" would be a lie.
                self.returncode = 255
                self._close_fds()
                self.stats = _release_cgroup(self._cgroup)
                raise SandboxCrashed(
                    f"sandbox pid {self.pid} was reaped by someone else, so its status is lost: do not ignore "
                    "SIGCHLD or call waitpid(-1) while sandboxes run") from None
            break
        if pid == 0:
            return
        self.duration = time.monotonic() - self._start
        lost: OSError | None = None  # the init's status record could not be read
        try:
            if self._status_fd >= 0:
                try:
                    data = os.read(self._status_fd, _ffi.STATUS_SIZE)
                except OSError as e:
                    lost = e  # the init's own status stands in: the payload's exit code, or 128 + its signal
                else:
                    if len(data) == _ffi.STATUS_SIZE:
                        status = int.from_bytes(data, "little", signed=True)
            if os.WIFSIGNALED(status):
                self.signal = os.WTERMSIG(status)
                self.returncode = -self.signal
            else:
                self.returncode = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 255
            if self._hold_fd >= 0 and self._layout is not None:
                try:
                    self.changes = rootfs.compute_changes(self._hold_fd, self._layout)
                except OSError:
                    self.changes = None  # a host file it could not read: no report rather than a wrong one
                rootfs.keep(self.changes, self._layout.keep_dir, self.pid)
        finally:
            if self.returncode is None:  # reaped, whatever happened above: never waited for again
                self.returncode = 255
            self._close_fds()
            self.stats = _release_cgroup(self._cgroup)
        # The init reaped the payload, so its usage counts the payload's CPU time.
        self.cause = limit_cause(self.signal, self.stats, self._cpu_limit, usage.ru_utime + usage.ru_stime)
        if lost is not None:
            raise SandboxIOFailed(
                "read-status", lost.errno or _errno.EIO,
                f"the payload's status record from the init is lost; returncode {self.returncode} is the init's "
                "own exit status (the payload's exit code, or 128 + the signal that ended it)") from lost

    def _close_fds(self) -> None:
        for name in ("_status_fd", "pidfd", "_hold_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        if self.pidfd >= 0:
            try:
                _signal.pidfd_send_signal(self.pidfd, sig)
            except ProcessLookupError:
                pass
        elif self._has_init:
            os.kill(self.pid, sig)
        else:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(_signal.SIGTERM)

    def kill(self) -> None:
        """End the whole sandbox: SIGKILL to its init (the kernel then kills every
        process in its pid namespace), or to its process group without one."""
        if self.returncode is not None:
            return
        if self._has_init:
            self.send_signal(_signal.SIGKILL)
        else:
            try:
                os.killpg(self.pid, _signal.SIGKILL)
            except ProcessLookupError:
                pass

    def communicate(self, input: bytes | None = None, timeout: float | None = None) -> tuple[bytes | None, bytes | None]:
        """Send ``input``, read stdout and stderr to EOF, wait.  On timeout the sandbox is
        killed and ``timed_out`` is set.  If communicate fails (an interrupt such as
        KeyboardInterrupt, or a pipe that cannot be read or written: SandboxIOFailed), the
        sandbox is killed and reaped before the exception propagates; its output is lost."""
        try:
            return self._communicate(input, timeout)
        except BaseException:
            self._abort()
            raise

    def _abort(self) -> None:
        """After a failed communicate or run: kill the sandbox, close its pipes, reap it (which
        closes its descriptors and releases its cgroup).  An error of this cleanup gives way to
        the exception being handled."""
        try:
            self.kill()
        except OSError:
            pass
        for f in (self.stdin, self.stdout, self.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        if self.returncode is None:
            try:
                self._reap(0)
            except Exception:
                pass

    def _communicate(self, input: bytes | None, timeout: float | None) -> tuple[bytes | None, bytes | None]:
        out: dict[int, list[bytes]] = {}
        readers = {}
        names = {}
        for name, f in (("stdout", self.stdout), ("stderr", self.stderr)):
            if f is not None:
                readers[f.fileno()] = f
                out[f.fileno()] = []
                names[f.fileno()] = name
        writer = self.stdin
        pending = memoryview(input or b"")
        if writer is not None and not pending:
            writer.close()
            writer = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while readers or writer is not None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.timed_out = True
                self.kill()
                deadline = None  # drain what is left, the sandbox is gone
                continue
            wl = [writer.fileno()] if writer is not None else []
            with _sandbox_io("poll-output"):
                r, w, _ = select.select(list(readers), wl, [], remaining)
            for fd in r:
                with _sandbox_io(f"read-{names[fd]}"):
                    chunk = os.read(fd, 65536)
                if chunk:
                    out[fd].append(chunk)
                else:
                    readers.pop(fd)
            if w and writer is not None:
                try:
                    with _sandbox_io("write-stdin"):
                        n = os.write(writer.fileno(), pending[:65536])
                    pending = pending[n:]
                except BrokenPipeError:
                    pending = pending[:0]
                if not pending:
                    writer.close()
                    writer = None
        res = [None if f is None else b"".join(out[f.fileno()]) for f in (self.stdout, self.stderr)]
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            self.wait(remaining)
        except TimeoutError:
            self.timed_out = True
            self.kill()
            self.wait()
        return res[0], res[1]


class Sandbox:
    """Runs programs or Python callables inside a fresh incarnation per call.

    >>> Sandbox(Spec(hostname="box")).run(["hostname"]).stdout
    b'box\\n'
    """

    def __init__(self, spec: Spec | None = None, **kwargs: Any) -> None:
        if spec is not None and kwargs:
            spec = spec.replace(**kwargs)
        self.spec = spec if spec is not None else Spec.from_kwargs(**kwargs)
        self._use_clone3 = True

    def __repr__(self) -> str:
        return f"Sandbox({self.spec!r})"

    def plan(self, refresh: bool = False) -> Plan:
        """What this spec gets here; strict specs raise the typed error instead."""
        return make_plan(self.spec, probe(refresh=refresh))

    # -------------------------------------------------------------- programs

    def _cgroup(self) -> tuple[cgroups.SandboxCgroup | None, tuple[Degradation, ...]]:
        """The sandbox's cgroup when the spec has limits, and what could not be had
        (strict: CgroupNotWritable)."""
        limits = self.spec.limits()
        if not limits.any():
            return None, ()
        cg, degr = cgroups.create(limits, self.spec.strict)
        return cg, tuple(degr)

    def _native(self, plan: Plan, cg: cgroups.SandboxCgroup | None = None, **kw: Any) -> Native:
        ops, layout = build_ops(self.spec, plan)
        if cg is not None:
            kw.update(cgroup_dirfd=cg.dirfd, cgroup_procs=tuple(cg.procs), cgroup_v2_procs=cg.v2_procs)
        return Native(
            ns=plan.clone_namespaces,
            ops=ops,
            layout=layout,
            uid_map=plan.uid_map,
            gid_map=plan.gid_map,
            setgroups_deny=plan.setgroups_deny,
            die_with_parent=self.spec.die_with_parent,
            use_clone3=self._use_clone3,
            **kw,
        )

    def _fallback_plan(self, plan: Plan, exc: IncarnateError) -> Plan | None:
        """After a refused clone or id map, the plan to try once more (not strict), or None."""
        if self.spec.strict:
            return None
        if isinstance(exc, CloneFailed) and exc.errno in _RETRY_CLONE_ERRNOS:
            # The machine changed since the probe (a limit reached, a capability taken away).
            new = make_plan(self.spec, probe(refresh=True))
            return None if new == plan else new
        if isinstance(exc, SetupStepFailed) and exc.step in ("uid_map", "gid_map", "setgroups") and os.geteuid() == 0:
            # Real root whose whole identity map was refused (a nested, limited userns):
            # map only root, and say so.
            return dataclasses.replace(
                plan, uid_map=f"0 {os.getuid()} 1", gid_map=f"0 {os.getgid()} 1", setgroups_deny=True,
                degradations=plan.degradations + (UidMapFailed(f"{exc}; mapped uid 0 only"),))
        return None

    def _run_native(self, plan: Plan, go: Callable[[Plan], Any]) -> tuple[Plan, Any]:
        """``go(plan)``, and once more with the fallback plan if the first was refused."""
        try:
            return plan, go(plan)
        except (CloneFailed, SetupStepFailed) as e:
            new = self._fallback_plan(plan, e)
            if new is None:
                raise
            return new, go(new)

    def spawn(self, argv: Sequence[str], *, stdin: int | IO[Any] | None = None, stdout: int | IO[Any] | None = None,
              stderr: int | IO[Any] | None = None, pass_fds: Sequence[int] = ()) -> Handle:
        """Start ``argv`` inside; ``stdin``/``stdout``/``stderr`` take PIPE, DEVNULL, a
        file or an fd (None: inherit)."""
        args = _check_argv(argv)
        exe = _resolve_exe(args[0], self.spec.env, self.spec.root_dirs() if self.spec.custom_root else None)
        plan = self.plan()
        cg, cg_degr = self._cgroup()
        fds: list[int] = []
        to_close: list[int] = []
        parent_ends: list[IO[bytes] | None] = []
        try:
            for i, want in enumerate((stdin, stdout, stderr)):
                stream = ("stdin", "stdout", "stderr")[i]
                if want is None:
                    fds.append(-1)
                    parent_ends.append(None)
                elif want == PIPE:
                    with setup_step("stdio-pipe", detail=f"creating the {stream} pipe"):
                        r, w = os.pipe2(os.O_CLOEXEC)
                        child, parent = (r, w) if i == 0 else (w, r)
                        fds.append(child)
                        to_close.append(child)
                        try:
                            parent_ends.append(os.fdopen(parent, "wb" if i == 0 else "rb", buffering=0))
                        except BaseException:
                            os.close(parent)
                            raise
                elif want == DEVNULL:
                    with setup_step("open-devnull", os.devnull, f"to use as {stream}"):
                        fd = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
                    fds.append(fd)
                    to_close.append(fd)
                    parent_ends.append(None)
                elif isinstance(want, int):
                    fds.append(want)
                    parent_ends.append(None)
                else:
                    fds.append(want.fileno())
                    parent_ends.append(None)
            env = _env_list(self.spec.env)

            def go(p: Plan) -> tuple[_ffi.Started, Native]:
                n = self._native(p, cg, exe=exe, argv=args, envp=env, stdio=(fds[0], fds[1], fds[2]),
                                 keep_fds=tuple(pass_fds), setsid_payload=True)
                return _ffi.spawn(n), n

            plan, (started, native) = self._run_native(plan, go)
            plan = dataclasses.replace(plan, degradations=plan.degradations + cg_degr)
            try:
                handle = Handle(args, started, plan, parent_ends[0], parent_ends[1], parent_ends[2],
                                "pid" in plan.namespaces, native.layout, cg, self.spec.rlimits)
            except BaseException:
                _ffi.abandon(started)
                raise
        except BaseException:
            for f in parent_ends:
                if f is not None:
                    f.close()
            _release_cgroup(cg)
            raise
        finally:
            for fd in to_close:
                os.close(fd)
        return handle

    def run(self, argv: Sequence[str], input: bytes | None = None, timeout: float | None = None,
            capture_output: bool = True) -> Result:
        """Run ``argv`` inside and wait.  Output is captured unless ``capture_output`` is
        False; after ``timeout`` seconds the whole sandbox is killed and the result says
        ``timed_out``."""
        if input is not None and not isinstance(input, (bytes, bytearray, memoryview)):
            raise SpecError("input", input, "must be bytes")
        out = PIPE if capture_output else None
        h = self.spawn(argv, stdin=PIPE if input is not None else DEVNULL, stdout=out, stderr=out)
        try:
            if timeout is None:
                timeout = self.spec.timeout
            stdout, stderr = h.communicate(bytes(input) if input is not None else None, timeout)
        except BaseException:  # an interrupt, a lost pipe: nothing of the sandbox outlives the call
            h._abort()
            raise
        assert h.returncode is not None
        return Result(h.argv, h.returncode, stdout, stderr, h.signal, h.timed_out, h.degradations,
                      h.plan.namespaces, h.duration, h.changes, h.stats, h.cause)

    # ------------------------------------------------------------- callables

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn(*args, **kwargs)`` inside a fresh incarnation and return its value, or
        re-raise its exception.  The callable runs in a forked child (pid 2 under an init
        when there is a pid namespace); its return value must be picklable."""
        out = self.call_outcome(fn, *args, **kwargs)
        if out.kind == "ok":
            return out.value
        raise out.value

    def call_outcome(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CallOutcome:
        """Like :meth:`call`, but returns a CallOutcome: kind ("ok" or "err"), the value or
        the exception, the plan, and the filesystem changes."""
        return forked_enter(self, lambda: fn(*args, **kwargs))


@dataclass(frozen=True)
class CallOutcome:
    kind: str
    value: Any
    plan: Plan
    changes: rootfs.Changes | None = None
    stats: cgroups.Stats | None = None


@contextlib.contextmanager
def _sandbox_io(step: str, detail: str = "the sandbox was killed; its output is lost") -> Iterator[None]:
    """Reading or writing a running sandbox's pipes: a plain OSError becomes SandboxIOFailed
    (raised once the caller has killed and reaped the sandbox).  BrokenPipeError passes (a
    payload that stops reading its input is not a failure), and so does InterruptedError
    (the caller retries)."""
    try:
        yield
    except (IncarnateError, BrokenPipeError, InterruptedError):
        raise
    except OSError as e:
        raise SandboxIOFailed(step, e.errno or _errno.EIO, detail) from e


def _release_cgroup(cg: cgroups.SandboxCgroup | None) -> cgroups.Stats | None:
    """Read the sandbox's usage, kill what is left in its cgroups, remove them."""
    if cg is None:
        return None
    if cg.released is None:
        try:
            cg.released = cg.stats()
            cg.kill_all()
        finally:
            cg.remove()
    return cg.released


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _dump(obj: Any) -> bytes:
    try:
        data = pickle.dumps(obj)
        pickle.loads(data)  # an exception class with its own __init__ pickles but may not load
        return data
    except Exception as e:  # unpicklable value or exception
        kind, value = obj
        if kind == "err":
            tb = "".join(traceback.format_exception(type(value), value, value.__traceback__))
            return pickle.dumps(("err", SandboxCrashed(f"unpicklable exception from the sandbox:\n{tb}")))
        return pickle.dumps(("err", SandboxCrashed(f"the sandboxed call's return value cannot be pickled: {e!r}")))


def _upper_inside(layout: rootfs.Layout | None) -> list[rootfs.UpperEntry] | None:
    """In the payload: read its own upper layers through the fd the init holds too (the
    host is not visible here: the parent classifies the entries)."""
    if layout is None or layout.hold_fd < 0:
        return None
    try:
        return rootfs.scan_uppers(layout.hold_fd, layout)
    except OSError:
        return None
    finally:
        try:
            os.close(layout.hold_fd)
        except OSError:
            pass


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


LOST_RESULT = "the sandbox was killed; the call's result is lost"


def _kill_tree(monitor: int, cg: cgroups.SandboxCgroup | None, monitor_above_init: bool = True) -> tuple[int, list[int]]:
    """Kill the whole sandbox of a call (a timeout, an interrupt, a lost result): how many of
    its processes there were (not counting the init), and a pidfd of each of them, for
    ``_await_killed`` once the monitor is reaped.  ``monitor`` is the process above the init,
    or the init itself (``monitor_above_init`` false: direct enter)."""
    inside = _descendants(monitor)  # the init and everything below it (or what is below the init)
    pidfds = _kill_processes(monitor, inside, cg)  # the init dies with the monitor (parent-death signal)
    return (max(0, len(inside) - 1) if monitor_above_init else len(inside)), pidfds


def _kill_processes(first: int, inside: list[int], cg: cgroups.SandboxCgroup | None) -> list[int]:
    """SIGKILL what is left in ``cg``, then ``first`` (whose death ends the rest), then each of
    ``inside``, after taking a pidfd of each of those: the pidfds."""
    pidfds = []
    for p in inside:
        try:
            pidfds.append(os.pidfd_open(p))
        except OSError:  # gone already
            pass
    try:
        if cg is not None:
            cg.kill_all()
        os.kill(first, _signal.SIGKILL)
        for p in inside:
            try:
                os.kill(p, _signal.SIGKILL)
            except ProcessLookupError:
                pass
    except BaseException:
        _await_killed(pidfds, 0.0)
        raise
    return pidfds


def _await_killed(pidfds: list[int], timeout: float = 5.0) -> None:
    """After the monitor is reaped: wait (up to ``timeout`` in all) until every process of a
    killed sandbox has exited, and reap those that came back to this process (when it is a
    child subreaper), so that none outlives the call; close the pidfds."""
    deadline = time.monotonic() + timeout
    try:
        for fd in pidfds:
            try:
                select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
            except OSError:  # ChildProcessError: not this process's child, its own parent reaps it
                pass
    finally:
        for fd in pidfds:
            os.close(fd)


# Enter mode starts the init with CLONE_VM, so that only the payload copies the caller's
# memory (INCARNATE_ENTER_VM=0 copies it for the init too, as before; for comparison).
ENTER_VM = os.environ.get("INCARNATE_ENTER_VM", "1") != "0"

# The plugin's calls start the init straight from the pytest process when they can (see
# _ffi.enter_direct): one copy of its memory per test instead of two.  INCARNATE_DIRECT=0
# forks a monitor first, as before (also the path from threaded callers; for comparison).
DIRECT = os.environ.get("INCARNATE_DIRECT", "1") != "0"

# A caller with other threads (an xdist worker) starts an init that holds the sandbox and
# forks its one copy into it (see _join_ok), instead of forking a monitor that starts the
# init, which forks the payload (two copies).  INCARNATE_JOIN=0: the monitor, as before.
JOIN = os.environ.get("INCARNATE_JOIN", "1") != "0"

# Finished sandboxed calls whose processes are on their way out, reaped at the next
# sandbox or at exit: monitor pids, or inits started directly.
# Finished sandboxed calls whose processes are on their way out, reaped at the next
# sandbox or at exit: forked monitors' pids here; directly started inits are in the core's
# registry (_ffi.direct_reap).
_PENDING: list[int] = []
_PENDING_MAX = 4  # at most this many finished sandboxes still on their way out, of each kind


def reap_pending(block: bool = True) -> None:
    """Reap the monitors or inits of finished sandboxed calls (see ``reap_later``).  Not
    blocking: only those already gone, and the oldest while more than _PENDING_MAX are
    left (a sandbox's exit, its copy of the memory torn down, then overlaps the next test)."""
    keep: list[int] = []
    for i, pid in enumerate(_PENDING):
        wait = block or len(_PENDING) - i > _PENDING_MAX
        try:
            done, _ = os.waitpid(pid, 0 if wait else os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done == 0:
            keep.append(pid)
    _PENDING[:] = keep
    for init, copy in list(_HELD_COPIES.items()):
        if copy not in keep:
            del _HELD_COPIES[init]
    if _ffi.direct_live():
        while _ffi.direct_reap(-1, nohang=not block)[0] > 0:
            pass
        if _ffi.direct_live() > _PENDING_MAX:
            # A held init ends only once the copy that joined it is reaped (its pid stays
            # allocated in the init's namespace until then): reap those first, or the wait
            # below would never end.
            for copy in _HELD_COPIES.values():
                _reap_copy(copy)
                _PENDING.remove(copy)
            _HELD_COPIES.clear()
        while _ffi.direct_live() > _PENDING_MAX:
            _ffi.direct_reap(-1)


atexit.register(reap_pending)

# Held inits (the core's registry) whose joined copy (in _PENDING) is not reaped yet.
_HELD_COPIES: dict[int, int] = {}


def _reap_copy(pid: int, kill: bool = False) -> None:
    if kill:
        try:
            os.kill(pid, _signal.SIGKILL)
        except ProcessLookupError:  # pragma: no cover - it is this process's child until reaped
            pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


_ALL_SIGNALS = frozenset(int(s) for s in _signal.valid_signals() - {_signal.SIGKILL, _signal.SIGSTOP})
# The C function under signal.pthread_sigmask (CPython's _signal): the wrapper turns each
# signal of the returned mask into a Signals member, 30 times the cost of the call (65 µs of
# each sandboxed test).
try:
    from _signal import pthread_sigmask as _sigmask  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - an interpreter without CPython's _signal
    _sigmask = _signal.pthread_sigmask


def _hold_signals() -> set[int] | None:
    """Block every signal; the mask before, or None if the kernel refused (then nothing is
    held: the call goes on without that protection)."""
    try:
        return _sigmask(_signal.SIG_BLOCK, _ALL_SIGNALS)  # type: ignore[no-any-return,unused-ignore]
    except OSError:
        return None


def _release_signals(mask: set[int] | None) -> None:
    if mask is not None:
        try:
            _sigmask(_signal.SIG_SETMASK, mask)
        except OSError:  # cannot happen with a valid mask; nothing better to do
            pass


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _direct_ok(native: Native) -> bool:
    """The core can start the init from this process itself: enter mode with CLONE_VM, a
    pid namespace and an init, and a single thread here (a copy of a threaded process
    made without fork(3) could inherit a lock held by another thread)."""
    return (DIRECT and native.enter_vm and "pid" in native.ns and native.use_init
            and not (native.cgroup_dirfd >= 0 and native.cgroup_v2_procs[0] < 0)
            and threading.current_thread() is threading.main_thread()
            and _single_threaded() and _ffi.direct_available())


def _join_ok(native: Native) -> bool:
    """For a caller with other threads (an xdist worker): the core can start an init that
    holds the sandbox from this process itself (CLONE_VM, nothing copied), and this process
    can fork its one copy straight into the init's pid namespace (setns needs CAP_SYS_ADMIN)
    and join the rest there.  The sandbox's cgroups hold only the init: calls with limits
    fork a monitor instead."""
    return (JOIN and native.enter_vm and "pid" in native.ns and native.use_init
            and native.cgroup_dirfd < 0 and not native.cgroup_procs
            and threading.current_thread() is threading.main_thread()
            and os.geteuid() == 0 and _ffi.direct_available())


def _join_flags(native: Native) -> int:
    """The namespaces a joining copy enters with one setns: all of the init's but its pid
    namespace (the caller set that one for its children before the fork), including those
    the init entered after the host's mounts (unshare ops)."""
    flags = 0
    for name in native.ns:
        flags |= int(_ffi.NS_FLAGS[name])
    for op in native.ops:
        if op.kind == "unshare":
            flags |= op.ival
    return flags & ~int(_ffi.NS_FLAGS["pid"])


def _fork_into(init_pid: int) -> tuple[int, int]:
    """Fork this process into the pid namespace of the held sandbox whose init is
    ``init_pid``: (the child's pid, 0 in the child; a pidfd of the init, which the child
    joins through).  Only the calling thread's namespace for children changes, and only
    around the fork."""
    me = os.getpid()
    with setup_step("join", detail="opening a pidfd of the sandbox's init"):
        pidfd = os.pidfd_open(init_pid)
    try:
        with setup_step("join", detail="entering the sandbox's pid namespace for the fork"):
            _ffi.setns(pidfd, _ffi.NS_FLAGS["pid"])
        try:
            with setup_step("fork", detail="forking the process that joins the sandbox"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
                    pid = os.fork()
        except BaseException:
            with contextlib.suppress(OSError):
                _own_pidns()
            raise
        if pid != 0:
            try:
                with setup_step("join", detail="returning to this thread's own pid namespace for its children"):
                    _own_pidns()
            except BaseException:
                _reap_copy(pid, kill=True)
                raise
        return pid, pidfd
    except BaseException:
        if os.getpid() != me:  # pragma: no cover - the copy never runs the caller's code
            os._exit(70)
        os.close(pidfd)
        raise


def _own_pidns() -> None:
    """The calling thread's children are born in its own pid namespace again (its active
    one, which setns always accepts unless memory is short)."""
    fd = os.open("/proc/thread-self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _ffi.setns(fd, _ffi.NS_FLAGS["pid"])
    finally:
        os.close(fd)


def _end_held(held: _ffi.DirectStarted, reap: bool = True) -> None:
    """End a held sandbox: its init is killed (and what is left in its pid namespace with it),
    then reaped now, or (``reap`` false) at the next call (the core's registry)."""
    try:
        os.kill(held.pid, _signal.SIGKILL)
    except ProcessLookupError:  # pragma: no cover - it is this process's child until reaped
        pass
    if reap:
        _ffi.direct_reap(held.pid)
    else:
        _ffi.direct_drop_status(held.pid)


def _kill_joined(pid: int, init_pid: int) -> tuple[int, list[int]]:
    """Kill a joined call's sandbox: the copy that joined it (this process's child), what it
    started, and the init with everything else in its pid namespace.  (How many processes
    there were, not counting the init; a pidfd of each, for ``_await_killed``.)"""
    inside = [pid, *_descendants(pid), *[q for q in _descendants(init_pid) if q != pid]]
    return len(inside), _kill_processes(init_pid, inside, None)


def forked_enter(sandbox: Sandbox, body: Callable[[], Any], plan: Plan | None = None,
                 cgroup: tuple[cgroups.SandboxCgroup | None, tuple[Degradation, ...]] | None = None,
                 reap_later: bool = False) -> CallOutcome:
    """Fork, enter the incarnation in the child, run ``body`` there, ship its outcome
    and its filesystem changes back.  ``plan`` and ``cgroup`` (from ``Sandbox._cgroup``),
    when given, were made beforehand (the plugin looks at their degradations first); the
    cgroup is released here either way.  ``reap_later``: once the whole result is in (and
    without cgroups to release), the sandbox's processes, already on their way out, are
    reaped at the next call or at exit instead of now (the plugin's per-test path)."""
    reap_pending(block=False)
    cg, cg_degr = cgroup if cgroup is not None else sandbox._cgroup()
    try:
        plan, out = sandbox._run_native(plan or sandbox.plan(),
                                        lambda p: _run_forked(sandbox, p, cg, body, reap_later=reap_later))
    finally:
        stats = _release_cgroup(cg)
    result: CallOutcome = dataclasses.replace(
        out, plan=dataclasses.replace(plan, degradations=plan.degradations + cg_degr), stats=stats)
    return result


def _child_enters(r: int, w: int, unblock: Callable[[], None], enter: Callable[[], None], sandbox: Sandbox,
                  native: Native, body: Callable[[], Any]) -> NoReturn:
    """In a child forked for a call: drop the parent's end of the result pipe, let signals
    in, enter the sandbox (``enter``: as its monitor, or joining a held one), then run the
    payload.  A typed setup error goes back to the parent as the call's result."""
    try:
        os.close(r)
        unblock()
        cgroups.Run.forget_in_child()
        enter()
    except IncarnateError as e:
        try:
            _write_all(w, pickle.dumps(("setup", e)))
        finally:
            os._exit(0)
    except BaseException:
        os._exit(70)
    _payload_main(sandbox, native, body, w)


def _payload_main(sandbox: Sandbox, native: Native, body: Callable[[], Any], w: int) -> NoReturn:
    """In the payload: run ``body``, ship its outcome and the upper layers' entries, exit."""
    code = 70
    try:
        cgroups.Run.forget_in_child()
        rootfs.MOUNT_WATCH.close_in_payload()
        if sandbox.spec.env is not None:
            os.environ.clear()
            os.environ.update(sandbox.spec.env)
        try:
            result: tuple[str, Any] = ("ok", body())
        except BaseException as e:
            result = ("err", e)
        _write_all(w, _dump(result) + pickle.dumps(_upper_inside(native.layout)))
        os.close(w)  # EOF for the parent now, not after this process's memory is torn down
        code = 0
    finally:
        os._exit(code)


_NATIVE_CACHE: dict[Any, tuple[Native, Any, str]] = {}
_NATIVE_GEN = [-1]  # the mount table's generation the cache was built at


def call_cache(on: bool) -> None:
    """Keep the core's spec of sandboxed calls between calls (on), or drop it and the
    descriptor that watches the mount table (off).  The plugin turns it on for a session."""
    rootfs.MOUNT_WATCH.enabled = on
    if not on:
        rootfs.MOUNT_WATCH.close()
        _NATIVE_CACHE.clear()


def _native_for_call(sandbox: Sandbox, p: Plan, cg: cgroups.SandboxCgroup | None) -> tuple[Native, Any, str]:
    """The core's spec for a sandboxed call, built once per spec and plan while nothing it
    depends on changes (the working directory, the mount table, the fd limit): the
    plugin's per-test path builds the same one for every test.  Specs naming host paths
    (binds, overlays, a root of their own) are built each time: a path may change.
    (native, its C spec, how the call enters: "direct", "join" or "monitor".)"""
    spec = sandbox.spec
    key: Any = None
    cacheable = not spec.binds and not spec.overlays and not spec.custom_root and _ffi._TEST_STAGE is None
    if rootfs.MOUNT_WATCH.enabled and cg is None and cacheable:
        try:
            # Everything build_ops reads besides the spec, the plan and the mount table: the
            # working directory, home (own trees), ids, the fd limit (the hold fd's number)
            # and the hard limits that "unlimited" rlimits stand for.
            limits = tuple(resource.getrlimit(getattr(resource, "RLIMIT_" + name.upper()))
                           for name in sorted(spec.rlimits or {}))
            key = (spec, p, os.getcwd(), os.path.expanduser("~"), os.getuid(), os.geteuid(), os.getgid(), os.getegid(),
                   resource.getrlimit(resource.RLIMIT_NOFILE), limits, os.getpid(), sandbox._use_clone3, ENTER_VM,
                   DIRECT, _single_threaded(), threading.current_thread() is threading.main_thread())
            hash(key)
        except (OSError, TypeError):
            key = None
    if key is not None:
        gen = rootfs.MOUNT_WATCH.generation()
        if gen != _NATIVE_GEN[0]:
            _NATIVE_CACHE.clear()
            _NATIVE_GEN[0] = gen
        hit = _NATIVE_CACHE.get(key)
        if hit is not None:
            return hit
    native = sandbox._native(p, cg, expect_ppid=os.getpid(), close_fds=False, setsid_payload=True,
                             enter_vm=ENTER_VM)
    mode = "direct" if _direct_ok(native) else "join" if _join_ok(native) else "monitor"
    if mode != "monitor":
        native = dataclasses.replace(native, expect_ppid=0, hold_init=mode == "join")
    built = (native, native.build(), mode)  # allocated in the parent, before the fork
    if key is not None:
        if len(_NATIVE_CACHE) >= 8:
            _NATIVE_CACHE.pop(next(iter(_NATIVE_CACHE)))
        _NATIVE_CACHE[key] = built
    return built


def _run_forked(sandbox: Sandbox, p: Plan, cg: cgroups.SandboxCgroup | None, body: Callable[[], Any],
                reap_later: bool = False) -> CallOutcome:
    native, cspec, mode = _native_for_call(sandbox, p, cg)
    direct = mode == "direct"
    # No signal handler (KeyboardInterrupt, a timeout plugin's) runs from the result pipe's
    # creation until the sandbox is known here and the try/finally below that ends it has
    # begun: every signal waits meanwhile (the payload and a monitor get the mask back).
    me = os.getpid()
    mask = _hold_signals()
    unblocked = False

    def unblock() -> None:
        nonlocal unblocked
        if not unblocked:
            unblocked = True
            _release_signals(mask)

    try:
        with setup_step("result-pipe", detail="the pipe that brings the call's result back"):
            r, w = os.pipe2(os.O_CLOEXEC)
    except BaseException:
        unblock()
        raise
    init: _ffi.DirectStarted | None = None
    held: _ffi.DirectStarted | None = None  # "join": the init holding the sandbox the child joined
    copy = -1  # "join": the child, once forked (the held init cannot end before it is reaped)
    try:
        if mode == "join":
            started = _ffi.hold_direct(native, cspec)
            if started is False:  # too many inits live: fork a monitor
                native = dataclasses.replace(native, expect_ppid=os.getpid(), hold_init=False)
                cspec = native.build()
            else:
                held = started  # ended by the handler below if anything fails from here
                pid, pidfd = _fork_into(held.pid)
                copy = pid
                if pid == 0:  # pragma: no cover - runs in the child

                    def join() -> None:
                        _ffi.join(native, cspec, pidfd, _join_flags(native))
                        os.close(pidfd)

                    _child_enters(r, w, unblock, join, sandbox, native, body)
                os.close(pidfd)
        if direct:
            got = _ffi.enter_direct(native, cspec)
            if got is None:  # pragma: no cover - runs in the payload
                try:
                    os.close(r)
                    unblock()
                finally:
                    _payload_main(sandbox, native, body, w)
            if got is False:  # threads appeared, or too many inits live: fork a monitor
                direct = False
                native = dataclasses.replace(native, expect_ppid=os.getpid())
                cspec = native.build()
            else:
                init = got
                pid = init.pid
        if not direct and held is None:
            with setup_step("fork", detail="forking the process that enters the sandbox"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
                    pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child
                _child_enters(r, w, unblock, lambda: _ffi.enter(native, cspec), sandbox, native, body)
        os.close(w)
        w = -1
    except BaseException:
        if os.getpid() != me:  # pragma: no cover - a payload never runs the caller's code
            os._exit(70)
        os.close(r)
        if w >= 0:
            os.close(w)
        if held is not None:
            if copy > 0:
                _reap_copy(copy, kill=True)
            _end_held(held)
        unblock()
        raise

    def kill_all() -> tuple[int, list[int]]:
        if held is not None:
            return _kill_joined(pid, held.pid)
        return _kill_tree(pid, cg, monitor_above_init=not direct)

    chunks = []
    limit = sandbox.spec.timeout
    deadline = None if limit is None else time.monotonic() + limit
    timed_out = -1
    reaped = False
    killed: list[int] | None = None  # pidfds of the sandbox's processes, once it has been killed
    parse_error: Exception | None = None
    status, used = 0, 0.0
    try:
        try:
            unblock()  # a signal now is handled below: the sandbox is killed and reaped
            while True:
                if deadline is not None:
                    with _sandbox_io("read-result", LOST_RESULT):
                        ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
                    if not ready:
                        timed_out, killed = kill_all()
                        break
                try:
                    with _sandbox_io("read-result", LOST_RESULT):
                        b = os.read(r, 1 << 16)
                except InterruptedError:
                    continue
                if not b:
                    break
                chunks.append(b)
        except BaseException:
            # An interrupt (KeyboardInterrupt), a failed read: the result is lost, so the
            # sandbox is ended now rather than waited for.
            if killed is None:
                _, killed = kill_all()
            raise
        data = b"".join(chunks)
        parsed = None
        if timed_out < 0 and data:
            stream = io.BytesIO(data)
            try:
                kind, value = pickle.load(stream)
                entries = pickle.load(stream) if stream.tell() < len(data) else None
                parsed = (kind, value, entries)
            except Exception as e:  # a torn result: the status below says why
                parse_error = e
        # The result is whole: the processes are on their way out, and are reaped later (a
        # directly started init stays in the core's registry).  Not for a caller that is not
        # root: its memory stays non-dumpable while a direct init lives, and its next
        # sandbox's id maps could then not be written.
        if (parsed is not None and reap_later and cg is None and parsed[0] != "setup"
                and (init is None or os.geteuid() == 0)):
            if init is None:
                _PENDING.append(pid)
            else:
                _ffi.direct_drop_status(init.pid)
            if held is not None:
                _HELD_COPIES[held.pid] = pid
                _end_held(held, reap=False)
            reaped = True
    finally:
        os.close(r)
        try:
            if not reaped:
                if init is not None:
                    _, status, used = _ffi.direct_reap(init.pid)
                else:
                    _, status, usage = os.wait4(pid, 0)
                    used = usage.ru_utime + usage.ru_stime
                if held is not None:
                    _end_held(held)
        finally:
            if killed is not None:
                _await_killed(killed)
    if timed_out >= 0:
        _release_cgroup(cg)
        raise SandboxTimeout(limit or 0.0, timed_out)
    if not data:
        cpu = (sandbox.spec.rlimits or {}).get("cpu")
        raise _crash(status, _release_cgroup(cg), cpu[0] if cpu else None, used)
    if parsed is None:
        raise SandboxCrashed(f"the sandboxed call's result could not be read back: {parse_error!r}") from parse_error
    kind, value, entries = parsed
    if kind == "setup":
        raise value
    changes = None
    if entries is not None and native.layout is not None:
        changes = rootfs.classify(entries, native.layout.mountpoints)
        rootfs.keep(changes, native.layout.keep_dir, pid)
    return CallOutcome(kind, value, p, changes)


def signal_name(sig: int) -> str:
    """SIGKILL, SIGRTMIN+3, ... (real-time signals have no enum member)."""
    try:
        return _signal.Signals(sig).name
    except ValueError:
        rtmin = getattr(_signal, "SIGRTMIN", 34)
        return f"SIGRTMIN+{sig - rtmin}" if sig >= rtmin else f"signal {sig}"


def limit_cause(sig: int | None, stats: cgroups.Stats | None, cpu_limit: int | None, cpu_used: float) -> str | None:
    """Name the limit that ended a payload, if one did."""
    if sig is None:
        return None
    if stats is not None and stats.oom_killed:
        return stats.describe_oom()
    # At the hard limit the kernel sends SIGKILL; the usage it reports may fall a tick short.
    if sig == _signal.SIGXCPU or (sig == _signal.SIGKILL and cpu_limit is not None and cpu_used >= 0.9 * cpu_limit):
        return f"CPU time limit exceeded: RLIMIT_CPU {cpu_limit} s, used {cpu_used:.1f} s"
    return None


def _crash(status: int, stats: cgroups.Stats | None = None, cpu_limit: int | None = None,
           cpu_used: float = 0.0) -> SandboxCrashed:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        cause = limit_cause(sig, stats, cpu_limit, cpu_used)
        if cause is not None:
            return SandboxCrashed(f"the sandboxed call was stopped: {cause}", -sig, sig)
        return SandboxCrashed(f"the sandboxed call was killed by signal {sig} ({signal_name(sig)})", -sig, sig)
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else 255
    return SandboxCrashed(f"the sandboxed call exited with status {code} before returning", code)
