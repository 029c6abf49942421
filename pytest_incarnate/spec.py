"""Spec: the declarative, validated, frozen description of one incarnation.

Every invalid field raises :class:`~pytest_incarnate.errors.SpecError` naming the field
and the bad value.  Nothing here touches the kernel.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from pytest_incarnate.errors import InvalidRootfsPath, SpecError

NAMESPACES: tuple[str, ...] = ("user", "mount", "pid", "net", "uts", "ipc", "cgroup")
MAP_USER_CHOICES = ("root", "self")


def _path(field_name: str, value: Any, *, absolute: bool = True) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, bytes):
        raise SpecError(field_name, value, "must be a str path, not bytes")
    if not isinstance(value, str):
        raise SpecError(field_name, value, f"must be a path string, not {type(value).__name__}")
    if not value:
        raise SpecError(field_name, value, "must not be empty")
    if "\x00" in value:
        raise SpecError(field_name, value, "contains a NUL byte")
    if absolute and not value.startswith("/"):
        raise SpecError(field_name, value, "must be an absolute path")
    norm = os.path.normpath(value)
    if norm.startswith("//"):  # normpath keeps exactly two leading slashes (POSIX allows a meaning)
        norm = "/" + norm.lstrip("/")
    return norm


def overlay_safe(field_name: str, value: str) -> str:
    """A path that goes into an overlay mount's options, whose syntax has no room for
    ',' or ':'."""
    if "," in value or ":" in value:
        raise SpecError(field_name, value, "overlay paths cannot contain ',' or ':'")
    return value


def _text(field_name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise SpecError(field_name, value, f"must be a str, not {type(value).__name__}")
    if "\x00" in value:
        raise SpecError(field_name, value, "contains a NUL byte")
    return value


def _bool(field_name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise SpecError(field_name, value, f"must be True or False, not {type(value).__name__}")
    return value


def _id(field_name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field_name, value, f"must be an int id or None, not {type(value).__name__}")
    if not 0 <= value < 2**32 - 1:
        raise SpecError(field_name, value, "must be between 0 and 4294967294")
    return value


@dataclass(frozen=True)
class Bind:
    """A host path made visible inside at ``target`` (default: the same path)."""

    source: str
    target: str | None = None
    readonly: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", _path("binds.source", self.source))
        tgt = self.source if self.target is None else self.target
        object.__setattr__(self, "target", _path("binds.target", tgt))
        object.__setattr__(self, "readonly", _bool("binds.readonly", self.readonly))

    @classmethod
    def coerce(cls, value: Any) -> Bind:
        """Accept a Bind, a path, or a (source, target[, "ro"|"rw"|bool]) tuple."""
        if isinstance(value, Bind):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(os.fspath(value))
        if isinstance(value, (tuple, list)) and 1 <= len(value) <= 3:
            src = value[0]
            tgt = value[1] if len(value) > 1 else None
            mode = value[2] if len(value) > 2 else False
            if isinstance(mode, str):
                if mode not in ("ro", "rw"):
                    raise SpecError("binds", value, 'mode must be "ro" or "rw"')
                mode = mode == "ro"
            return cls(src, tgt, mode)
        raise SpecError("binds", value, "each bind must be a Bind, a path, or (source, target[, 'ro'|'rw'])")


@dataclass(frozen=True)
class Tmpfs:
    """A fresh tmpfs at ``target``; ``size`` in bytes or a tmpfs size string ("64m")."""

    target: str
    size: int | str | None = None
    mode: int = 0o755

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", _path("tmpfs.target", self.target))
        if self.size is not None:
            if isinstance(self.size, bool) or not isinstance(self.size, (int, str)):
                raise SpecError("tmpfs.size", self.size, "must be a byte count or a string like '64m'")
            if isinstance(self.size, int) and self.size <= 0:
                raise SpecError("tmpfs.size", self.size, "must be positive")
            if isinstance(self.size, str):
                s = self.size.strip().lower()
                if not s or not (s[:-1] if s[-1] in "kmg%" else s).isdigit():
                    raise SpecError("tmpfs.size", self.size, "must be digits with an optional k, m, g or % suffix")
        if isinstance(self.mode, bool) or not isinstance(self.mode, int) or not 0 <= self.mode <= 0o7777:
            raise SpecError("tmpfs.mode", self.mode, "must be a permission mode like 0o755")

    def data(self) -> str:
        d = f"mode={self.mode:04o}"
        if self.size is not None:
            d += f",size={self.size}"
        return d

    @classmethod
    def coerce(cls, value: Any) -> Tmpfs:
        if isinstance(value, Tmpfs):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(os.fspath(value))
        if isinstance(value, dict):
            unknown = set(value) - {"target", "size", "mode"}
            if unknown or "target" not in value:
                raise SpecError("tmpfs", value, "a tmpfs dict takes target, size and mode")
            return cls(**value)
        raise SpecError("tmpfs", value, "each tmpfs must be a Tmpfs, a path, or a dict of its fields")


@dataclass(frozen=True)
class Overlay:
    """An overlay mount at ``target``: ``lower`` directories (top first), and an
    ``upper``/``work`` pair on the same filesystem for a writable overlay."""

    target: str
    lower: tuple[str, ...]
    upper: str | None = None
    work: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", _path("overlays.target", self.target))
        lower: Any = self.lower
        if isinstance(lower, (str, os.PathLike)):
            lower = (lower,)
        if not isinstance(lower, (tuple, list)) or not lower:
            raise SpecError("overlays.lower", self.lower, "must be a non-empty list of directories")
        lower = tuple(_path("overlays.lower", x) for x in lower)
        for p in lower:
            overlay_safe("overlays.lower", p)
        object.__setattr__(self, "lower", lower)
        if (self.upper is None) != (self.work is None):
            raise SpecError("overlays.upper", self.upper, "upper and work must be given together")
        for name in ("upper", "work"):
            v = getattr(self, name)
            if v is not None:
                v = overlay_safe(f"overlays.{name}", _path(f"overlays.{name}", v))
                object.__setattr__(self, name, v)
        if self.upper is None and len(lower) < 2:
            raise SpecError("overlays.lower", self.lower, "a read-only overlay needs at least two lower directories")


def _coerce_tuple(field_name: str, value: Any, coerce: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes, os.PathLike)) or not isinstance(value, Iterable):
        raise SpecError(field_name, value, "must be a list")
    return tuple(coerce(v) for v in value)


@dataclass(frozen=True)
class Spec:
    """What one incarnation gets.  Frozen; build variants with :meth:`replace`.

    namespaces
        any subset of ``user mount pid net uts ipc cgroup`` (default: all).
    hostname
        hostname in the uts namespace (None: leave it).
    root
        None: the host's root, copy-on-write (writes land in a per-sandbox upper layer and
        vanish; ``Result.changes`` lists them), or read-only with ``copy_on_write=False``.
        A directory: that directory tree, copy-on-write too.
    layers
        a stack of :class:`~pytest_incarnate.layers.Layer` (or directories, or tar archives),
        top first, as the root: built once into a cache shared by runs and xdist workers.
    upper_size
        size limit of the tmpfs holding the upper layers ("64m"); writes past it get ENOSPC.
    rlimits
        resource limits of the payload: ``{"nofile": 256, "cpu": (5, 10)}`` (as, nofile,
        nproc, core, cpu, fsize, stack; a limit or a (soft, hard) pair).
    cpu_affinity
        the CPUs the payload may run on ("0-1", [0, 2]); CPUs this process may not use are
        left out with a CpuAffinitySkipped degradation (strict: SpecError).
    timeout
        wall-clock seconds for a run or a call (a sandboxed test): past it the whole sandbox
        is killed, every process in it, and the result says it timed out.
    memory, pids, cpu_quota, cpus
        cgroup limits: memory in bytes or "64M" (no swap on top), a number of processes,
        CPUs' worth of time (0.5), a CPU list ("0-1").  ``Result.stats`` gives the usage.
    keep_upper
        a directory: after each run, what the sandbox wrote is saved under
        ``<keep_upper>/<pid>/`` (see ``Changes.save``) to inspect after a failure.
    dev, hide
        ``dev="minimal"``: a fresh /dev (null, zero, full, random, urandom, tty, pts, ptmx,
        shm, the fd links); ``"host"``: the host's, read-only.  ``hide``: paths covered by an
        empty tmpfs (default /run, so the host's unix sockets there cannot be reached).
    binds, tmpfs, overlays
        mounts made inside, in that order after the root (tmpfs, overlays, then binds).
    env
        the payload's environment (None: the caller's).
    cwd
        working directory inside (None: the caller's, or / if it is not visible).
    map_user
        ``"root"``: the caller is root inside (as real root: the whole identity map);
        ``"self"``: the caller keeps its own uid and gid inside.
    uid, gid
        drop to these ids inside after setup (None: stay).
    strict
        True: a namespace that cannot be had is an error; False: it is skipped and the
        result lists a NamespaceSkipped degradation.
    """

    namespaces: frozenset[str] = frozenset(NAMESPACES)
    hostname: str | None = "incarnate"
    root: str | None = None
    layers: tuple[Any, ...] = ()
    binds: tuple[Bind, ...] = ()
    tmpfs: tuple[Tmpfs, ...] = (Tmpfs("/tmp", mode=0o1777), Tmpfs("/dev/shm", mode=0o1777))
    overlays: tuple[Overlay, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    map_user: str = "root"
    uid: int | None = None
    gid: int | None = None
    strict: bool = False
    mount_proc: bool = True
    loopback: bool = True
    no_new_privs: bool = True
    die_with_parent: bool = True
    umask: int | None = None
    copy_on_write: bool = True
    upper_size: int | str | None = None
    dev: str = "minimal"
    hide: tuple[str, ...] = ("/run",)
    keep_upper: str | None = None
    memory: int | str | None = None
    pids: int | None = None
    cpu_quota: float | None = None
    cpus: str | None = None
    timeout: float | None = None
    rlimits: Mapping[str, Any] | None = None
    cpu_affinity: Any = None

    def __post_init__(self) -> None:
        def set_(k: str, v: Any) -> None:
            object.__setattr__(self, k, v)

        ns: Any = self.namespaces
        if isinstance(ns, str):
            ns = ns.replace(",", " ").split()
        if not isinstance(ns, Iterable):
            raise SpecError("namespaces", self.namespaces, "must be a set of namespace names")
        ns = list(ns)
        for name in ns:
            if not isinstance(name, str):
                raise SpecError("namespaces", name, "namespace names are strings")
            if name not in NAMESPACES:
                raise SpecError("namespaces", name, f"unknown namespace; choose from {', '.join(NAMESPACES)}")
        set_("namespaces", frozenset(ns))
        if self.hostname is not None:
            h = _text("hostname", self.hostname)
            try:
                encoded = h.encode()
            except UnicodeEncodeError:
                raise SpecError("hostname", h, "must be valid UTF-8 text (it holds an undecodable byte)") from None
            if not 0 < len(encoded) <= 64:
                raise SpecError("hostname", h, "must be 1 to 64 bytes")
        if self.root is not None:
            try:
                root = _path("root", self.root)
            except SpecError as e:
                raise InvalidRootfsPath(self.root, e.problem) from None
            if not os.path.isdir(root):
                hint = "; a tar archive goes in layers=[...]" if os.path.isfile(root) else ""
                raise InvalidRootfsPath(root, "is not an existing directory" + hint)
            set_("root", root)
        if self.layers:  # (imported only when used: it needs filelock)
            from pytest_incarnate.layers import coerce_layers

            set_("layers", coerce_layers(self.layers))
        else:
            set_("layers", ())
        if self.layers and self.root is not None:
            raise SpecError("layers", self.layers, "give root (a directory) or layers (a stack), not both")
        set_("binds", _coerce_tuple("binds", self.binds, Bind.coerce))
        set_("tmpfs", _coerce_tuple("tmpfs", self.tmpfs, Tmpfs.coerce))
        overlays = _coerce_tuple(
            "overlays", self.overlays,
            lambda v: v if isinstance(v, Overlay) else _overlay_from_dict(v) if isinstance(v, dict) else _bad_overlay(v)
        )
        set_("overlays", overlays)
        if self.env is not None:
            if not isinstance(self.env, Mapping):
                raise SpecError("env", self.env, "must be a mapping of str to str")
            env = {}
            for k, v in self.env.items():
                _text("env", k)
                _text(f"env[{k!r}]", v)
                if not k or "=" in k:
                    raise SpecError("env", k, "variable names must be non-empty and contain no '='")
                env[k] = v
            set_("env", _FrozenDict(env))
        if self.cwd is not None:
            set_("cwd", _path("cwd", self.cwd))
        if self.map_user not in MAP_USER_CHOICES:
            raise SpecError("map_user", self.map_user, 'must be "root" or "self"')
        set_("uid", _id("uid", self.uid))
        set_("gid", _id("gid", self.gid))
        if self.upper_size is not None:
            try:
                Tmpfs("/", size=self.upper_size)  # the same rules as a tmpfs size
            except SpecError as e:
                raise SpecError("upper_size", self.upper_size, e.problem) from None
        if self.memory is not None:
            from pytest_incarnate.cgroups import parse_size

            set_("memory", parse_size("memory", self.memory))
        if self.pids is not None and (isinstance(self.pids, bool) or not isinstance(self.pids, int)
                                      or not 1 <= self.pids <= 4194304):  # the kernel's PID_MAX_LIMIT
            raise SpecError("pids", self.pids, "must be a number of processes from 1 to 4194304")
        if self.cpu_quota is not None:
            if isinstance(self.cpu_quota, bool) or not isinstance(self.cpu_quota, (int, float)) or not 0.01 <= self.cpu_quota <= 4096:
                raise SpecError("cpu_quota", self.cpu_quota, "must be a number of CPUs' worth of time, e.g. 0.5")
            set_("cpu_quota", float(self.cpu_quota))
        if self.cpus is not None:
            c = self.cpus
            if isinstance(c, (list, tuple)):
                c = ",".join(str(x) for x in c)
            if isinstance(c, int) and not isinstance(c, bool):
                c = str(c)
            if not isinstance(c, str) or not c or any(ch not in "0123456789,-" for ch in c):
                raise SpecError("cpus", self.cpus, 'must be a CPU list like "0", "0-1" or [0, 2]')
            _cpu_set("cpus", c)  # well formed, CPUs 0 to 127
            set_("cpus", c)
        if self.rlimits is not None:
            set_("rlimits", _FrozenDict(_check_rlimits(self.rlimits)))
        if self.cpu_affinity is not None:
            set_("cpu_affinity", _cpu_set("cpu_affinity", self.cpu_affinity))
        if self.timeout is not None:
            if (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                    or not 0 < self.timeout < float("inf")):  # (NaN compares false)
                raise SpecError("timeout", self.timeout, "must be a positive, finite number of seconds")
            set_("timeout", float(self.timeout))
        if self.keep_upper is not None:
            set_("keep_upper", _path("keep_upper", self.keep_upper))
        if self.dev not in ("minimal", "host"):
            raise SpecError("dev", self.dev, 'must be "minimal" (a fresh /dev) or "host" (the host\'s, read-only)')
        set_("hide", tuple(_path("hide", h) for h in _coerce_tuple("hide", self.hide, lambda v: v)))
        for name in ("strict", "mount_proc", "loopback", "no_new_privs", "die_with_parent", "copy_on_write"):
            _bool(name, getattr(self, name))
        if self.umask is not None and (isinstance(self.umask, bool) or not isinstance(self.umask, int) or not 0 <= self.umask <= 0o777):
            raise SpecError("umask", self.umask, "must be a mode between 0 and 0o777")

    @classmethod
    def from_kwargs(cls, source: str = "Spec", /, **kwargs: Any) -> Spec:
        """Build from keywords (a marker's, an ini value's), naming unknown ones."""
        known = {f.name for f in fields(cls)}
        for k in kwargs:
            if k not in known:
                raise SpecError(k, kwargs[k], f"unknown {source} keyword; known: {', '.join(sorted(known))}")
        return cls(**kwargs)

    def limits(self) -> Any:
        from pytest_incarnate.cgroups import Limits

        return Limits(self.memory, self.pids, self.cpu_quota, self.cpus)  # type: ignore[arg-type]

    @property
    def custom_root(self) -> bool:
        """True when the root is a directory or a layer stack rather than the host's."""
        return self.root is not None or bool(self.layers)

    def root_dirs(self) -> list[str]:
        """The host directories that make the root, top first (layers are built now)."""
        if self.layers:
            return [layer.path() for layer in self.layers]
        return [os.path.realpath(self.root)] if self.root is not None else ["/"]

    def mount_root_hides(self, path: str) -> bool:
        """True if a tmpfs or overlay of this spec covers ``path`` (and no bind shows it)."""
        def under(p: str, t: str) -> bool:
            return p == t or p.startswith(t.rstrip("/") + "/")

        if any(under(path, b.target or b.source) for b in self.binds):
            return False
        return any(under(path, t) for t in [x.target for x in self.tmpfs] + [o.target for o in self.overlays] + list(self.hide))

    def replace(self, **changes: Any) -> Spec:
        return replace(self, **changes)


RLIMITS = ("as", "nofile", "nproc", "core", "cpu", "fsize", "stack")


def _check_rlimits(value: Any) -> dict[str, tuple[int, int]]:
    """{name: limit or (soft, hard)}; None or "unlimited" for no limit."""
    import resource

    if not isinstance(value, Mapping):
        raise SpecError("rlimits", value, f"must be a mapping like {{'nofile': 256}} (names: {', '.join(RLIMITS)})")
    out = {}
    for name, v in value.items():
        if name not in RLIMITS:
            raise SpecError("rlimits", name, f"unknown limit; choose from {', '.join(RLIMITS)}")
        pair = v if isinstance(v, (tuple, list)) else (v, v)
        if len(pair) != 2:
            raise SpecError(f"rlimits[{name!r}]", v, "must be a limit or a (soft, hard) pair")
        nums = []
        for x in pair:
            if x is None or x == "unlimited":
                nums.append(resource.RLIM_INFINITY)
            elif isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63:
                nums.append(x)
            else:
                raise SpecError(f"rlimits[{name!r}]", v, "limits are ints from 0 to 2**63-1, None or 'unlimited'")
        soft, hard = nums
        if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
            raise SpecError(f"rlimits[{name!r}]", v, "the soft limit cannot be above the hard limit")
        out[name] = (soft, hard)
    return out


def _cpu_set(field_name: str, value: Any) -> frozenset[int]:
    cpus: set[int] = set()
    items: Iterable[Any]
    if isinstance(value, str):
        items = [p for p in value.split(",") if p]
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, Iterable):
        items = list(value)
    else:
        raise SpecError(field_name, value, 'must be CPUs like "0-1", "0,2" or [0, 2]')
    for it in items:
        try:
            if isinstance(it, str) and "-" in it:
                lo, hi = (int(x) for x in it.split("-", 1))
                if lo < 0 or hi > 127:
                    raise SpecError(field_name, value, "must name CPUs 0 to 127")
                cpus.update(range(lo, hi + 1))
            elif isinstance(it, bool):
                raise ValueError
            else:
                cpus.add(int(it))
        except (TypeError, ValueError):
            raise SpecError(field_name, value, 'must be CPUs like "0-1", "0,2" or [0, 2]') from None
    if not cpus or min(cpus) < 0 or max(cpus) > 127:
        raise SpecError(field_name, value, "must name CPUs 0 to 127")
    return frozenset(cpus)


def _overlay_from_dict(v: dict[str, Any]) -> Overlay:
    known = {f.name for f in fields(Overlay)}
    unknown = sorted(str(k) for k in v if k not in known)
    if unknown:
        raise SpecError("overlays", v, f"unknown overlay field {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    missing = [k for k in ("target", "lower") if k not in v]
    if missing:
        raise SpecError("overlays", v, f"an overlay needs {' and '.join(missing)}")
    return Overlay(**v)


def _bad_overlay(v: Any) -> Overlay:
    raise SpecError("overlays", v, "each overlay must be an Overlay or a dict of its fields")


class _FrozenDict(dict):  # type: ignore[type-arg]
    """A dict that refuses changes, so a frozen Spec stays frozen (and hashable)."""

    def _refuse(self, *a: Any, **k: Any) -> None:
        raise TypeError("a Spec is frozen; use spec.replace(...) to change a field")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted(self.items())))

    def __reduce__(self) -> Any:  # copy.deepcopy and pickle rebuild it whole
        return (_FrozenDict, (dict(self),))
