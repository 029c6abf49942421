"""Capability probe: what this machine grants this process, with a reason and a fix for
every "no".

Every namespace is tried for real in a throwaway child (created with the same native core
the sandboxes use), and so are the operations that follow it (id maps, a tmpfs, an
overlay, pivot_root, bringing up lo).  The sysctls are read only to explain a refusal.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import json
import os
import platform
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pytest_incarnate import _ffi
from pytest_incarnate._ffi import Native, Op
from pytest_incarnate.cgroups import _read
from pytest_incarnate.errors import CloneFailed, IncarnateError, SetupStepFailed
from pytest_incarnate.spec import NAMESPACES

SYSCTLS = {
    "kernel.unprivileged_userns_clone": "/proc/sys/kernel/unprivileged_userns_clone",
    "user.max_user_namespaces": "/proc/sys/user/max_user_namespaces",
    "kernel.apparmor_restrict_unprivileged_userns": "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
}
APPARMOR_FIX = (
    "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 "
    "(or an AppArmor profile granting 'userns,' to the Python interpreter)"
)


@dataclass(frozen=True)
class Capability:
    name: str
    granted: bool
    reason: str = ""
    fix: str = ""
    via: str = ""  # "direct" or "userns" for namespaces

    def line(self) -> str:
        if self.granted:
            return f"{self.name}: yes" + (f" ({self.via})" if self.via else "")
        out = f"{self.name}: no: {self.reason}"
        if self.fix:
            out += f" (fix: {self.fix})"
        return out


@dataclass(frozen=True)
class Capabilities:
    """The probe's answer: an item per capability, each granted or not with its reason."""

    items: tuple[Capability, ...]
    euid: int
    kernel: str
    sysctls: Mapping[str, str]

    def __getitem__(self, name: str) -> Capability:
        for c in self.items:
            if c.name == name:
                return c
        raise KeyError(f"unknown capability {name!r}; known: {', '.join(self.names())}")

    def __iter__(self) -> Iterator[Capability]:
        return iter(self.items)

    def names(self) -> list[str]:
        return [c.name for c in self.items]

    def granted(self, name: str) -> bool:
        return self[name].granted

    def summary(self) -> str:
        yes = [c.name for c in self.items if c.granted]
        no = [c.name for c in self.items if not c.granted]
        s = f"granted: {' '.join(yes) or 'nothing'}"
        if no:
            s += f"; not granted: {' '.join(no)}"
        return s

    def to_dict(self) -> dict[str, Any]:
        return {
            "euid": self.euid,
            "kernel": self.kernel,
            "sysctls": dict(self.sysctls),
            "capabilities": {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in self.items},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def namespace(self, ns: str, with_userns: bool) -> Capability:
        """Whether namespace ``ns`` can be had, given whether a user namespace comes too."""
        c = self[f"ns.{ns}"]
        if ns == "user" or not c.granted or c.via == "direct" or with_userns:
            return c
        return Capability(
            c.name, False, "needs CAP_SYS_ADMIN, or a user namespace beside it", "add 'user' to the Spec's namespaces"
        )


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """A trial child is started and reaped with every signal waiting: an interrupt (say
    KeyboardInterrupt during the first probe) comes after, and leaves no zombie."""
    try:
        mask: set[int | signal.Signals] | None = signal.pthread_sigmask(
            signal.SIG_BLOCK, signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
    except OSError:  # refused: the trial goes on without that protection
        mask = None
    try:
        yield
    finally:
        if mask is not None:
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            except OSError:
                pass


def _spawn_and_reap(native: Native) -> _ffi.Started:
    with _signals_held():
        st = _ffi.spawn(native)
        os.waitpid(st.pid, 0)
        if st.pidfd >= 0:
            os.close(st.pidfd)
    return st


def _trial(ns: tuple[str, ...], ops: list[Op], maps: tuple[str, str, bool] | None) -> tuple[bool, str, int]:
    """Run the ops in a throwaway child; (ok, failed step, errno)."""
    uid_map, gid_map, deny = maps if maps else (None, None, False)
    try:
        _spawn_and_reap(Native(ns=ns, ops=ops, uid_map=uid_map, gid_map=gid_map, setgroups_deny=deny, use_init=False))
    except SetupStepFailed as e:
        return False, e.step, e.errno or 0
    except CloneFailed as e:
        return False, "clone", e.errno or 0
    except IncarnateError as e:
        return False, getattr(e, "step", type(e).__name__), getattr(e, "errno", 0) or 0
    return True, "", 0


_maps_cache: dict[tuple[int, int, int, str], tuple[str, str, bool]] = {}


def id_maps(map_user: str = "root") -> tuple[str, str, bool]:
    """(uid_map, gid_map, setgroups deny) for a new user namespace of this process
    (cached per process and ids: it is on every sandbox's path)."""
    key = (os.getpid(), os.geteuid(), os.getegid(), map_user)
    maps = _maps_cache.get(key)
    if maps is None:
        maps = _maps_cache[key] = _id_maps(map_user)
    return maps


def _id_maps(map_user: str) -> tuple[str, str, bool]:
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0:
        # Real root (or root of a user namespace): the identity over every id this
        # namespace has, so file ownership keeps working inside.
        return _identity("/proc/self/uid_map"), _identity("/proc/self/gid_map"), False
    inside_uid = 0 if map_user == "root" else uid
    inside_gid = 0 if map_user == "root" else gid
    return f"{inside_uid} {uid} 1", f"{inside_gid} {gid} 1", True


def _identity(path: str) -> str:
    try:
        with open(path) as f:
            extents = [line.split() for line in f if line.strip()]
    except OSError:
        extents = []
    if not extents:
        return "0 0 4294967295"
    return "\n".join(f"{first} {first} {count}" for first, _, count in extents)


def _why(err: int) -> str:
    return f"{_errno.errorcode.get(err, err)} ({os.strerror(err)})" if err else "refused"


def _cgroup_items() -> list[Capability]:
    """Which limits can be had: a writable v1 controller, or one delegated on v2; and whether
    the v2 hierarchy can group sandboxes (and which controllers it delegates)."""
    from pytest_incarnate import cgroups

    h = cgroups.Hierarchy.detect()
    delegated = h.v2_controllers()
    v2_why = cgroups._can_write(h.v2) if h.v2 is not None else "no cgroup2 hierarchy is mounted"
    out = []
    for name, ctrl in (("cgroup.memory", "memory"), ("cgroup.pids", "pids"), ("cgroup.cpu", "cpu"), ("cgroup.cpuset", "cpuset")):
        d = h.v1.get(ctrl)
        if d is not None:
            why = cgroups._can_write(d)
            out.append(Capability(name, why is None, why or "", via="v1"))
        elif ctrl in delegated and v2_why is None:
            out.append(Capability(name, True, via=f"v2, delegated to {h.v2}"))
        elif h.v2 is not None and ctrl in delegated:
            out.append(Capability(name, False, f"{ctrl} is delegated on v2 but {v2_why}",
                                  "make the own cgroup writable (delegate it to this user)"))
        else:
            why = (f"no v1 {ctrl} hierarchy, and {ctrl} is not delegated to the v2 cgroup {h.v2} "
                   f"(its cgroup.controllers: {' '.join(sorted(delegated)) or 'none'}; hierarchy: {h.kind()})"
                   if h.v2 is not None else f"no {ctrl} controller is mounted (hierarchy: {h.kind()})")
            out.append(Capability(name, False, why,
                                  "enable it in the parent's cgroup.subtree_control, or run under a delegated cgroup "
                                  "(systemd-run --scope -p Delegate=yes ...)"))
    if h.v2 is None:
        out.append(Capability("cgroup.v2", False, "no cgroup2 hierarchy is mounted", "mount -t cgroup2 none /sys/fs/cgroup/unified"))
    else:
        out.append(Capability("cgroup.v2", v2_why is None, v2_why or "",
                              via=f"{h.kind()}: grouping, CLONE_INTO_CGROUP, cgroup.kill; delegated controllers: "
                                  f"{' '.join(sorted(delegated)) or 'none'}"))
    return out


def _explain_userns(err: int, sysctls: Mapping[str, str]) -> tuple[str, str]:
    if sysctls.get("kernel.unprivileged_userns_clone") == "0" and os.geteuid() != 0:
        return "kernel.unprivileged_userns_clone is 0", "sysctl -w kernel.unprivileged_userns_clone=1"
    if sysctls.get("user.max_user_namespaces") == "0":
        return "user.max_user_namespaces is 0", "sysctl -w user.max_user_namespaces=10000"
    if err == _errno.ENOSPC:
        return "the user namespace limit (user.max_user_namespaces or nesting depth) is reached", (
            "raise user.max_user_namespaces"
        )
    if err == _errno.EPERM:
        return "clone(CLONE_NEWUSER) refused with EPERM (seccomp filter, container runtime, or chroot)", (
            "run outside the restricting container, or allow user namespaces in its seccomp profile"
        )
    return f"clone(CLONE_NEWUSER) failed: {_why(err)}", ""


def _ns_ops(ns: str) -> list[Op]:
    if ns == "mount":
        return [Op("make-rprivate", a="/", path="/")]
    if ns == "net":
        return [Op("loopback", path="lo")]
    if ns == "uts":
        return [Op("hostname", a="incarnate-probe")]
    return []


_lock = threading.Lock()
_cache: dict[int, Capabilities] = {}


def probe(refresh: bool = False) -> Capabilities:
    """What this machine grants this process; cached per process (``refresh`` re-probes)."""
    key = os.getpid()
    with _lock:
        if not refresh and key in _cache:
            return _cache[key]
        caps = _probe()
        _cache.clear()
        _cache[key] = caps
        return caps


def _probe() -> Capabilities:
    sysctls = {k: v for k, p in SYSCTLS.items() if (v := _read(p)) is not None}
    items: list[Capability] = []
    maps = id_maps()
    root = os.geteuid() == 0

    ok, step, err = _trial(("user",), [], maps)
    userns_ok = ok
    if ok:
        items.append(Capability("ns.user", True, via="userns"))
    else:
        if step in ("uid_map", "gid_map", "setgroups"):
            reason, fix = f"the user namespace was created but writing {step} failed: {_why(err)}", (
                "run as root, or install newuidmap/newgidmap with a subuid range"
            )
        else:
            reason, fix = _explain_userns(err, sysctls)
        items.append(Capability("ns.user", False, reason, fix))

    lsm_blocked = False
    if userns_ok:
        # Ubuntu 24.04: the namespace is created, then AppArmor strips its capabilities.
        ok, step, err = _trial(("user", "mount"), [Op("make-rprivate", a="/"), Op("mount-tmpfs", b="/tmp", c="mode=0755")], maps)
        if not ok and err in (_errno.EPERM, _errno.EACCES):
            lsm_blocked = True
            restricted = sysctls.get("kernel.apparmor_restrict_unprivileged_userns") == "1"
            reason = (
                "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1): "
                f"the namespace is created but {step} fails with {_why(err)}"
                if restricted
                else f"a user namespace is created but {step} inside it fails with {_why(err)} (an LSM policy?)"
            )
            items[-1] = Capability("ns.user", False, reason, APPARMOR_FIX if restricted else "check the LSM policy (AppArmor, SELinux)")

    for ns in NAMESPACES:
        if ns == "user":
            continue
        ops = _ns_ops(ns)
        cap: Capability | None = None
        if root:
            ok, step, err = _trial((ns,), ops, None)
            if ok:
                cap = Capability(f"ns.{ns}", True, via="direct")
            else:
                direct_reason = f"{step} failed: {_why(err)}"
                if err == _errno.EPERM:
                    direct_reason = f"{step} refused with EPERM: CAP_SYS_ADMIN is missing"
        else:
            direct_reason = "creating it needs CAP_SYS_ADMIN (not root)"
        if cap is None and userns_ok and not lsm_blocked:
            ok, step, err = _trial(("user", ns), ops, maps)
            if ok:
                cap = Capability(f"ns.{ns}", True, via="userns")
            else:
                cap = Capability(f"ns.{ns}", False, f"{direct_reason}; inside a user namespace {step} failed: {_why(err)}")
        if cap is None:
            cap = Capability(
                f"ns.{ns}", False, f"{direct_reason}; no user namespace to fall back on", "grant CAP_SYS_ADMIN or enable user namespaces"
            )
        items.append(cap)

    # Root-filesystem operations, the way a default sandbox does them: inside a user
    # namespace when there is one, else directly (root with CAP_SYS_ADMIN).
    by_ns = {c.name: c for c in items}
    if userns_ok and not lsm_blocked:
        base: tuple[str, ...] = ("user",)
        how, base_maps, xattr = "inside a user namespace", maps, ",userxattr"
    elif by_ns["ns.mount"].granted:
        base, how, base_maps, xattr = (), "as root", None, ""
    else:
        base = None  # type: ignore[assignment]
    if base is not None:
        stage = [Op("make-rprivate", a="/"), Op("stage-root", a="/tmp", path="/tmp")]
        ok, step, err = _trial(base + ("mount",), stage, base_maps)
        items.append(Capability("pivot_root", ok, "" if ok else f"{how}: {step} failed: {_why(err)}"))
        ovl = stage + [Op("mkdir", a=f"/{d}", ival=0o755) for d in ("l1", "l2", "u", "w", "m")] + [
            Op("mount-overlay", b="/m", c="lowerdir=/l1:/l2,upperdir=/u,workdir=/w" + xattr, path="/m")
        ]
        ok, step, err = _trial(base + ("mount",), ovl, base_maps)
        fix = "a kernel >= 5.11 allows overlayfs in user namespaces" if base else "load the overlay module"
        items.append(Capability("overlay", ok, "" if ok else f"overlay {how}: {step} failed: {_why(err)}", "" if ok else fix))
        pid_ok = by_ns["ns.pid"].granted
        if pid_ok:
            proc_ops = [Op("make-rprivate", a="/"), Op("mount-proc", b="/proc", path="/proc")]
            ok, step, err = _trial(base + ("mount", "pid"), proc_ops, base_maps)
            items.append(Capability("proc", ok, "" if ok else f"{how}: {step} failed: {_why(err)}"))
        else:
            items.append(Capability("proc", False, "no pid namespace to mount a fresh /proc for", "see ns.pid"))
    else:
        why = "no mount namespace: neither CAP_SYS_ADMIN nor a usable user namespace"
        items += [Capability(n, False, why, "see ns.user and ns.mount") for n in ("pivot_root", "overlay", "proc")]

    # The host's root seen copy-on-write: an overlay whose lower layer is the root itself.
    # Inherited mounts are locked in a mount namespace created with a user namespace, and
    # overlayfs refuses such a lower layer; real root overlays it before entering one.
    if root and by_ns["ns.mount"].granted and by_ns["ns.mount"].via == "direct":
        ops = [Op("make-rprivate", a="/"), Op("stage-root", a="/tmp", path="/tmp"),
               Op("mount-tmpfs", b="/uppers", c="mode=0755", flags=_ffi.BIND_CREATE, path="/uppers"),
               Op("mkdir", a="/uppers/u", ival=0o755), Op("mkdir", a="/uppers/w", ival=0o755),
               Op("mount-overlay", b="/newroot", c="lowerdir=/oldroot,upperdir=/uppers/u,workdir=/uppers/w", path="/")]
        ok, step, err = _trial(("mount",), ops, None)
        items.append(Capability("overlay.root", ok, "" if ok else f"overlaying the host root: {step} failed: {_why(err)}",
                                "" if ok else "load the overlay module (modprobe overlay)"))
    elif root:
        items.append(Capability("overlay.root", False, "CAP_SYS_ADMIN is missing: the host root can only be overlaid "
                                "from a mount namespace of the initial user namespace", "run as root with CAP_SYS_ADMIN"))
    else:
        items.append(Capability("overlay.root", False, "not root: in a user namespace inherited mounts are locked and "
                                "overlayfs refuses the host root as a lower layer", "run as root"))

    items += _cgroup_items()

    st = _spawn_and_reap(Native(ns=(), ops=[], use_init=False))
    items.append(Capability("clone3", st.used_clone3, "" if st.used_clone3 else "clone3 is not available: clone(2) is used"))
    items.append(Capability("pidfd", st.pidfd >= 0, "" if st.pidfd >= 0 else "CLONE_PIDFD is not available (Linux < 5.2)"))

    return Capabilities(tuple(items), os.geteuid(), platform.release(), sysctls)
