"""The sandbox's root filesystem: the host's root seen copy-on-write, standard mounts, and
the changes report.

Layout inside the mount namespace, before the final pivot_root::

    /              the staging tmpfs (the host root is at /oldroot)
    /uppers        a tmpfs holding every upper layer (its size is Spec.upper_size)
      L0/upper, L0/work    the overlay of the host's root filesystem
      L1/...               one overlay per other host filesystem (/home, /var, ...)
      T0, T1, ...          the spec's unsized tmpfs places (/tmp, /dev/shm), bound in
    /newroot       the new root: the overlays, then /proc, /dev, /sys, the binds

The init keeps /uppers open at a known fd, so the parent can take it (pidfd_getfd) and
read what was written after the payload ends; the tmpfs vanishes with the last fd.
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pytest_incarnate._ffi import BIND_CREATE, BIND_REC, BIND_RO, OPTIONAL, Op, mount_id

NEW = "/newroot"
OLD = "/oldroot"
UPPERS = "/uppers"

# Filesystems that are not data: handled by the standard mounts, never overlaid.
PSEUDO_FS = frozenset(
    "proc sysfs devtmpfs devpts mqueue cgroup cgroup2 securityfs debugfs tracefs pstore bpf configfs "
    "fusectl hugetlbfs binfmt_misc autofs efivarfs nsfs rpc_pipefs selinuxfs".split()
)
STANDARD_TREES = ("/proc", "/sys", "/dev")
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
             ("stderr", "/proc/self/fd/2"), ("ptmx", "pts/ptmx"), ("core", "/proc/kcore"))


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


@dataclass(frozen=True)
class HostMount:
    mountpoint: str
    fstype: str
    is_dir: bool = True


# statx of a mount point that says it cannot be reached from here: gone (unmounted, its
# directory removed), under something else now, or behind a directory this process may not
# enter.  Any other error keeps the mount, as mountinfo lists it.
_UNREACHABLE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES, errno.EPERM})


def _reachable(mp: str, stack: list[tuple[int, str, int]]) -> HostMount | None:
    """Of the mounts listed on ``mp`` [(mount id, fstype, device)], the one its path reaches
    now (the top of a stack), or None: the path leads into another mount (this one is
    hidden under a mount over an ancestor), or nowhere (gone since mountinfo was read)."""
    try:
        mnt_id, mode = mount_id(mp)
    except OSError as e:
        if e.errno in _UNREACHABLE:
            return None
        if e.errno != errno.ENOSYS:
            return HostMount(mp, stack[-1][1], os.path.isdir(mp))
        try:  # no STATX_MNT_ID (before Linux 5.8): the device, which bind mounts share
            st = os.lstat(mp)
        except OSError as e2:
            return None if e2.errno in _UNREACHABLE else HostMount(mp, stack[-1][1], os.path.isdir(mp))
        found = [fstype for _, fstype, dev in stack if dev == st.st_dev]
        return HostMount(mp, found[-1], stat.S_ISDIR(st.st_mode)) if found else None
    found = [fstype for mid, fstype, _ in stack if mid == mnt_id]
    return HostMount(mp, found[-1], stat.S_ISDIR(mode)) if found else None


class MountWatch:
    """Whether this process's mount table changed: poll(2) on /proc/self/mountinfo reports
    every change (POLLPRI), so that the table need not be read again for every sandbox.
    ``generation()`` moves on at each change seen; -1 when not watching.  Turned on for a
    pytest session by the plugin (see sandbox.call_cache); per process (a fork opens its
    own), and never kept by a payload (see close_in_payload)."""

    def __init__(self) -> None:
        self.enabled = False
        self.pid = -1
        self.fd = -1
        self.poller: Any = None
        self.gen = 0
        self.ns = -1  # the mount namespace watched (its inode)

    def generation(self) -> int:
        if not self.enabled:
            return -1
        try:
            ns = os.stat("/proc/self/ns/mnt").st_ino
        except OSError:
            ns = -1
        if self.pid == os.getpid() and ns != self.ns:  # moved to another mount namespace
            self.close()
        if self.pid != os.getpid():
            self.ns = ns
            self.pid = os.getpid()
            self.fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
            self.poller = select.poll()
            self.poller.register(self.fd, select.POLLPRI | select.POLLERR)
            self.poller.poll(0)
            self.gen += 1
        elif self.poller.poll(0):
            self.gen += 1
        return self.gen

    def close(self) -> None:
        if self.fd >= 0 and self.pid == os.getpid():
            os.close(self.fd)
        self.fd, self.pid, self.poller = -1, -1, None
        self.gen += 1

    def close_in_payload(self) -> None:
        """The payload does not keep a view of the host's mount table."""
        if self.fd >= 0 and self.pid != os.getpid():
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd, self.pid, self.poller = -1, -1, None


MOUNT_WATCH = MountWatch()
_HOST_MOUNTS: list[Any] = [None, None]  # (generation, mounts) while MOUNT_WATCH is on


def host_mounts() -> list[HostMount]:
    """This process's mounts that it can reach now, in mountinfo order: for each mount point,
    the mount its path leads to.  A mount hidden by a later mount over an ancestor of its
    mount point (or over the same one), or gone since, is left out: the host does not show it.
    While MOUNT_WATCH is on, the answer is kept until the mount table changes."""
    gen = MOUNT_WATCH.generation()
    if gen >= 0 and _HOST_MOUNTS[0] == gen:
        return list(_HOST_MOUNTS[1])
    out = _read_host_mounts()
    if gen >= 0:
        _HOST_MOUNTS[:] = [gen, tuple(out)]
    return out


def _read_host_mounts() -> list[HostMount]:
    stacks: dict[str, list[tuple[int, str, int]]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            major, _, minor = fields[2].partition(":")
            stacks.setdefault(_unescape(fields[4]), []).append(
                (int(fields[0]), right.split()[0], os.makedev(int(major), int(minor))))
    out = []
    for mp, stack in stacks.items():
        m = _reachable(mp, stack)
        if m is not None:
            out.append(m)
    return out


def keep(changes: Changes | None, keep_dir: str | None, pid: int) -> None:
    """Save ``changes`` under ``keep_dir/<pid>`` when the spec asks to keep them."""
    if changes is not None and keep_dir is not None:
        changes.save(os.path.join(keep_dir, str(pid)))


@dataclass(frozen=True)
class Layout:
    """Where each upper directory shows inside, for the changes report."""

    layers: tuple[tuple[str, str, str], ...] = ()  # (mount point inside, upper dir, host lower dirs "a:b")
    scratch: tuple[tuple[str, str], ...] = ()     # (tmpfs place inside, dir under /uppers)
    mountpoints: frozenset[str] = frozenset()     # places the sandbox mounted on (not changes)
    hold_fd: int = -1
    keep_dir: str | None = None                   # Spec.keep_upper


def hold_fd_number() -> int:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return int(min(soft, 1024) - 1)


def overlay_root_ops(spec, plan, userxattr: bool) -> tuple[list[Op], Layout]:  # type: ignore[no-untyped-def]
    """Ops from the staging root to a complete /newroot, copy-on-write over the host's
    root (each of its filesystems), or over ``spec.root``, a directory.

    The host's other filesystems are taken from the mounts this process reaches when the
    sandbox is planned.  Each is optional in the child: one unmounted (its mount point
    removed) before the child's setup reaches it is skipped, with the mounts nested under it,
    which follow it in the ops (a subtree is contiguous), so the sandbox shows what the host
    shows then."""
    ops: list[Op] = []
    upper_data = "mode=0755" + (f",size={spec.upper_size}" if spec.upper_size is not None else "")
    ops.append(Op("mount-tmpfs", b=UPPERS, c=upper_data, flags=BIND_CREATE, path="(upper layers)"))
    hidden = [t.target for t in spec.tmpfs] + list(spec.hide)
    hidden += [b.target or b.source for b in spec.binds]
    base = ":".join(spec.root_dirs())
    layers: list[tuple[str, str, str]] = [("/", "L0", base)]
    places: list[HostMount] = []
    for m in host_mounts() if not spec.custom_root else ():
        mp = m.mountpoint
        if mp == "/" or m.fstype in PSEUDO_FS or any(_under(mp, t) for t in STANDARD_TREES):
            continue
        if any(_under(mp, h) for h in hidden):
            continue
        places.append(m)
    # Every mount after the mounts it is under, and right after them: ancestors first,
    # the rest in any order (the host shows none that a later mount hides).
    places.sort(key=lambda m: m.mountpoint.split("/"))
    mounts: list[Op] = []
    for i, m in enumerate(places):
        mp = m.mountpoint
        nested = 0
        while i + 1 + nested < len(places) and _under(places[i + 1 + nested].mountpoint, mp):
            nested += 1
        if m.is_dir:
            name = f"L{len(layers)}"
            layers.append((mp, name, mp))
            mounts.append(_overlay(mp, name, mp, userxattr, flags=OPTIONAL, dependents=nested))
        else:
            # A file mounted on its own (a container's /etc/hosts): read-only pass-through.
            mounts.append(Op("bind", a=OLD + mp, b=NEW + mp, flags=BIND_RO | OPTIONAL, dependents=nested, path=mp,
                             detail="a host file mount"))
    for _, name, _ in layers:
        ops += _upper_dirs(name)
    ops.append(_overlay("/", "L0", base, userxattr))
    return ops + mounts, Layout(layers=tuple(layers))


def _upper_dirs(name: str) -> list[Op]:
    """A layer's directories in the upper tmpfs."""
    return [Op("mkdir", a=f"{UPPERS}/{name}", ival=0o755), Op("mkdir", a=f"{UPPERS}/{name}/upper", ival=0o755),
            Op("mkdir", a=f"{UPPERS}/{name}/work", ival=0o755)]


def _overlay(mp: str, name: str, lower: str, userxattr: bool, flags: int = 0, dependents: int = 0) -> Op:
    """The overlay of layer ``name`` on ``mp`` (``lower``: host directories, top first,
    ':'-separated)."""
    lowers = ":".join(OLD + p if p != "/" else OLD for p in lower.split(":"))
    data = f"lowerdir={lowers},upperdir={UPPERS}/{name}/upper,workdir={UPPERS}/{name}/work"
    if userxattr:
        data += ",userxattr"
    return Op("mount-overlay", b=NEW if mp == "/" else NEW + mp, c=data, flags=flags, dependents=dependents,
              path=lower, detail="copy-on-write layer over " + lower)


def _layer_ops(mp: str, name: str, lower: str, userxattr: bool) -> list[Op]:
    return _upper_dirs(name) + [_overlay(mp, name, lower, userxattr, flags=BIND_CREATE)]


def _own_roots(paths: list[str], uid: int) -> list[str]:
    """For each path, its topmost ancestor that the caller owns, with everything between:
    an overlay rooted there never copies up a directory the caller does not own (with a
    one-id map that copy-up fails: EOVERFLOW)."""
    out: list[str] = []
    for p in paths:
        p = os.path.realpath(p)
        top = None
        while p != "/":
            try:
                if os.stat(p).st_uid != uid:
                    break
            except OSError:
                break
            top = p
            p = os.path.dirname(p)
        if top is not None and top not in out:
            out.append(top)
    return out


def own_tree_ops(spec, plan) -> tuple[list[Op], Layout]:  # type: ignore[no-untyped-def]
    """For a caller that is not real root: the host root stays read-only, and each
    directory tree the caller owns (its home, the project) is overlaid copy-on-write.

    Measured (Linux 6.18): inside a user namespace inherited mounts are locked and
    overlayfs refuses ``lowerdir=/``; a root assembled from overlays of the top-level
    directories works, but with a one-id map every root-owned directory below a layer's
    top fails to copy up (EOVERFLOW, /var/tmp included), while each layer's top directory
    becomes writable (its upper directory is the caller's).  An overlay rooted at a tree the
    caller owns never copies up a directory it does not own."""
    ops: list[Op] = []
    mounts = [m.mountpoint for m in host_mounts() if m.mountpoint != "/"]
    hidden = [t.target for t in spec.tmpfs] + list(spec.hide) + [b.target or b.source for b in spec.binds]
    layers: list[tuple[str, str, str]] = []
    for own in _own_roots([os.path.expanduser("~"), os.getcwd()], os.geteuid()):
        if any(_under(own, h) or _under(h, own) for h in hidden) or any(_under(m, own) for m in mounts):
            continue  # a mount below it would be locked: overlayfs refuses such a lower layer
        name = f"L{len(layers)}"
        layers.append((own, name, own))
        ops.extend(_layer_ops(own, name, own, userxattr=True))
    if layers:
        upper_data = "mode=0755" + (f",size={spec.upper_size}" if spec.upper_size is not None else "")
        ops.insert(0, Op("mount-tmpfs", b=UPPERS, c=upper_data, flags=BIND_CREATE, path="(upper layers)"))
    return ops, Layout(layers=tuple(layers))


PROC_READONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")


def standard_ops(spec, plan, *, overlay: bool) -> list[Op]:  # type: ignore[no-untyped-def]
    """/proc, /dev (minimal, or the host's read-only), read-only /sys, the hidden paths:
    inside /newroot, whatever the root (over the host's read-only root they cover what the
    recursive bind brought along)."""
    ns = plan.namespaces
    ops: list[Op] = []
    create = BIND_CREATE  # made in the upper layer, or in a tmpfs; on a read-only root they exist
    if spec.mount_proc and "pid" in ns:
        if plan.proc_fresh:
            ops.append(Op("mount-proc", b=NEW + "/proc", flags=create, path="/proc"))
        else:
            ops.append(Op("bind", a=OLD + "/proc", b=NEW + "/proc", flags=BIND_REC | create, path="/proc",
                          detail="the enclosing /proc"))
        # Host-wide knobs that /proc checks by uid alone (a root caller is uid 0 inside):
        # read-only, and locked with the rest once the user namespace is entered.
        for p in PROC_READONLY:
            if os.path.exists("/proc/" + p):
                ops.append(Op("bind", a=f"{NEW}/proc/{p}", b=f"{NEW}/proc/{p}", flags=BIND_RO | BIND_REC,
                              path=f"/proc/{p}", detail="read-only"))
    if spec.dev == "host" and overlay:
        ops.append(Op("bind", a=OLD + "/dev", b=NEW + "/dev", flags=BIND_RO | BIND_REC | create, path="/dev"))
    if spec.dev == "minimal":
        ops.append(Op("mount-tmpfs", b=NEW + "/dev", c="mode=0755", flags=create, path="/dev"))
        for node in DEV_NODES:
            if os.path.exists("/dev/" + node):
                ops.append(Op("bind", a=f"{OLD}/dev/{node}", b=f"{NEW}/dev/{node}", flags=BIND_CREATE,
                              path=f"/dev/{node}"))
        ops.append(Op("mount-devpts", b=NEW + "/dev/pts", path="/dev/pts"))
        for name, target in DEV_LINKS:
            ops.append(Op("symlink", a=target, b=f"{NEW}/dev/{name}", path=f"/dev/{name}"))
        ops.append(Op("mkdir", a=NEW + "/dev/shm", ival=0o1777))
    if overlay:  # over the read-only host root, /sys came with the recursive bind
        ops.append(Op("bind", a=OLD + "/sys", b=NEW + "/sys", flags=BIND_RO | BIND_REC | create, path="/sys"))
    for h in spec.hide:
        ops.append(Op("mount-tmpfs", b=NEW + h, c="mode=0755,size=1m", flags=create, path=h, detail="hidden"))
    return ops


# ------------------------------------------------------------------------- changes


@dataclass(frozen=True)
class Change:
    path: str
    kind: str  # "created", "modified", "deleted", "metadata"


@dataclass(frozen=True)
class Changes:
    """What a sandbox wrote, relative to the root: created, modified, deleted (overlay
    whiteouts) and metadata-changed paths.  Small files' contents are kept
    (``content(path)``)."""

    items: tuple[Change, ...] = ()
    _contents: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    MAX_CONTENT = 1 << 20

    def __iter__(self) -> Iterator[Change]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def paths(self, kind: str | None = None) -> list[str]:
        return [c.path for c in self.items if kind is None or c.kind == kind]

    @property
    def created(self) -> list[str]:
        return self.paths("created")

    @property
    def modified(self) -> list[str]:
        return self.paths("modified")

    @property
    def deleted(self) -> list[str]:
        return self.paths("deleted")

    @property
    def metadata(self) -> list[str]:
        return self.paths("metadata")

    def kind_of(self, path: str) -> str | None:
        for c in self.items:
            if c.path == path:
                return c.kind
        return None

    def content(self, path: str) -> bytes:
        """The new content of a created or modified file (kept up to 1 MiB)."""
        try:
            return self._contents[path]
        except KeyError:
            raise KeyError(f"no content kept for {path!r}: not a changed regular file, or larger than 1 MiB") from None

    def save(self, directory: str) -> str:
        """Keep what the sandbox wrote, to inspect after a failure: ``manifest.json`` (each
        path and its kind) and, under ``files/``, the content of created and modified files
        (those kept: up to 1 MiB each).  Returns the manifest's path."""
        import json

        os.makedirs(directory, mode=0o700, exist_ok=True)
        files = os.path.join(directory, "files")
        for path, data in self._contents.items():
            dest = os.path.join(files, path.lstrip("/"))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(data)
        manifest = os.path.join(directory, "manifest.json")
        with open(manifest, "w") as f:
            json.dump([{"path": c.path, "kind": c.kind, "content_kept": c.path in self._contents} for c in self.items],
                      f, indent=2)
        return manifest

    def outside(self, *allowed: str) -> list[Change]:
        return [c for c in self.items if not any(_under(c.path, a) for a in allowed)]

    def assert_only_under(self, *allowed: str) -> None:
        """Fail, listing them, if anything was written outside ``allowed``."""
        __tracebackhide__ = True
        bad = self.outside(*allowed)
        if bad:
            lines = "\n".join(f"  {c.kind}: {c.path}" for c in bad)
            raise AssertionError(f"the sandbox wrote outside {', '.join(allowed)}:\n{lines}")


@dataclass(frozen=True)
class UpperEntry:
    """One entry of an upper layer, as read from the upper alone (no host access needed,
    so the sandboxed payload itself can take it)."""

    path: str
    host: tuple[str, ...] | None  # the lower files to compare with, top first; None: scratch
    mode: int
    uid: int
    gid: int
    size: int
    mtime: int
    rdev: int
    link: str | None = None
    content: bytes | None = None
    digest: str | None = None


def _scan(dir_fd: int, inside: str, host: tuple[str, ...] | None, out: list[UpperEntry]) -> None:
    for name in sorted(os.listdir(dir_fd)):
        path = inside.rstrip("/") + "/" + name
        hpath = None if host is None else tuple(h.rstrip("/") + "/" + name for h in host)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        link = content = digest = None
        if stat.S_ISLNK(st.st_mode):
            link = os.readlink(name, dir_fd=dir_fd)
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as f:
                if st.st_size <= Changes.MAX_CONTENT:
                    content = f.read()
                else:
                    h = hashlib.sha256()
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                    digest = h.hexdigest()
        out.append(UpperEntry(path, hpath, st.st_mode, st.st_uid, st.st_gid, st.st_size, int(st.st_mtime),
                              st.st_rdev, link, content, digest))
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                _scan(fd, path, hpath, out)
            finally:
                os.close(fd)


def scan_uppers(uppers_fd: int, layout: Layout) -> list[UpperEntry]:
    """Every entry of the upper layers and scratch places, read through ``uppers_fd``."""
    out: list[UpperEntry] = []
    places: list[tuple[str, str, tuple[str, ...] | None]] = [
        (inside, name + "/upper", tuple(lower.split(":"))) for inside, name, lower in layout.layers
    ]
    places += [(inside, name, None) for inside, name in layout.scratch]
    for inside, sub, lower in places:
        fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY, dir_fd=uppers_fd)
        try:
            _scan(fd, inside, lower, out)
        finally:
            os.close(fd)
    return out


def _same_content(e: UpperEntry, host: str) -> bool:
    try:
        with open(host, "rb") as f:
            if e.content is not None:
                return f.read(Changes.MAX_CONTENT + 1) == e.content
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return h.hexdigest() == e.digest
    except OSError:
        return False


def classify(entries: list[UpperEntry], skip: frozenset[str] = frozenset()) -> Changes:
    """On the host: compare each upper entry with the host's file to tell created,
    modified, deleted (whiteouts) and metadata-changed paths."""
    found: dict[str, Change] = {}
    contents: dict[str, bytes] = {}
    for e in entries:
        if stat.S_ISCHR(e.mode) and e.rdev == 0:
            found[e.path] = Change(e.path, "deleted")
            continue
        if e.path in skip:
            continue
        hst = host = None
        for candidate in e.host or ():  # the topmost lower layer that has it
            try:
                hst, host = os.lstat(candidate), candidate
                break
            except OSError:
                continue
        kind: str | None
        if hst is None or stat.S_IFMT(hst.st_mode) != stat.S_IFMT(e.mode):
            kind = "created"
        elif stat.S_ISDIR(e.mode):
            kind = "metadata" if (e.mode, e.uid, e.gid) != (hst.st_mode, hst.st_uid, hst.st_gid) else None
        elif stat.S_ISLNK(e.mode):
            kind = None if os.readlink(host or "") == e.link else "modified"
        elif stat.S_ISREG(e.mode) and (e.size != hst.st_size or not _same_content(e, host or "")):
            kind = "modified"
        elif (e.mode, e.uid, e.gid, e.mtime) != (hst.st_mode, hst.st_uid, hst.st_gid, int(hst.st_mtime)):
            kind = "metadata"
        else:
            kind = None
        if kind is not None:
            found[e.path] = Change(e.path, kind)
            if kind in ("created", "modified") and e.content is not None:
                contents[e.path] = e.content
    return Changes(tuple(sorted(found.values(), key=lambda c: c.path)), contents)


def compute_changes(uppers_fd: int, layout: Layout) -> Changes:
    """Scan and classify in one go (the parent of a spawned sandbox)."""
    return classify(scan_uppers(uppers_fd, layout), layout.mountpoints)
