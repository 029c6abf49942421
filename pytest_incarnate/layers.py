"""Layers: root-filesystem trees, built once and cached by a content key.

A :class:`Layer` is a directory tree meant to be stacked under a sandbox's root (as an
overlay lower directory).  There are three kinds:

``Layer.from_dir(path)``
    an existing directory, used in place (never copied).
``Layer.from_tar(path)``
    a tar archive (plain, gzip, bzip2 or xz), unpacked once into the cache.
``Layer.from_callable(fn, key=...)``
    a Python callable ``fn(path)`` that fills an empty directory, run once into the cache.

``layer.path()`` returns the directory holding the tree, building it first if the cache
does not have it yet.  A Layer is a frozen value: its :attr:`~Layer.key` is computed when
it is made.

Keys
----
Every layer has a ``key``, a 64-digit hex string; for the cached kinds it names the cache
entry ``<cache>/<key>``.

- dir: sha256 of the directory's real path and a *cheap fingerprint* of the tree: the
  top directory's device, inode and mtime, and the name, type, inode, size, mtime and
  ctime of each of its top-level entries.  It changes when a top-level entry is added,
  removed, renamed, replaced, edited or chmodded, and when an entry is added to or removed
  from a top-level subdirectory (that changes the subdirectory's mtime).  It does not see
  an edit deeper down (``usr/bin/tool`` rewritten in place): walking a whole root tree
  every time a Layer is made would cost more than the layer saves.  Make the Layer after
  preparing the directory; when the key must follow the content, use a tar or a callable.
- tar: sha256 of the archive's bytes.  The same archive anywhere, under any name, is
  unpacked once.  (Hashing reads the archive once per process; the digest is remembered
  for an unchanged file.)
- callable: sha256 of the key string the caller gives (``key="debian-base-v3"``); bump
  it when ``fn`` changes what it builds.  Without ``key``, the key string is
  ``"<fn.__module__>:<fn.__qualname__>@<version>"`` and ``version`` must be given: the code
  of ``fn`` is not hashed, so the explicit version is what says "rebuild".  Lambdas and
  nested functions have no stable name and need an explicit ``key``.

The cache
---------
``cache_dir`` (an argument of :meth:`Layer.path`), else ``$INCARNATE_CACHE_DIR``, else
``$XDG_CACHE_HOME/pytest-incarnate/layers`` (``~/.cache/pytest-incarnate/layers``); created
with mode 0700.  It is shared by runs and by pytest-xdist workers:

- a complete entry ``<cache>/<key>`` appears only by an atomic ``rename`` of a finished
  build, so its existence means it is complete, and it is used without locking;
- otherwise the builder takes ``<cache>/<key>.lock`` (a :class:`filelock.FileLock`, an
  ``flock`` the kernel drops when its holder dies), checks again, and builds into
  ``<cache>/.<key>.partial-<pid>-<random>``; the other workers wait on the lock and then
  find the entry complete;
- a build that fails (or a builder that is killed) never renames its partial directory:
  a failure removes it, a killed builder's is removed by the next builder.  Holding the
  lock proves no live builder owns a partial directory of that key (the pid in the name is
  for people); partial directories of other keys are removed when their lock is free.

Lock files stay in the cache (removing one while another process waits on it would let
two builders in).  Delete the whole cache directory, when no run is using it, to clean up.

Tar archives are unpacked by this module, not by ``tarfile.extractall``, with the checks
of tarfile's ``"data"`` filter on every Python version: a member with an absolute name or
a ``..`` component, a symlink with an absolute target or one that leads outside the layer,
a hard link to outside, a device node when not running as root, or a member that would be
written through a symlink is refused with :class:`UnsafeTarMember`, and nothing is left in
the cache.  (So a root filesystem exported with absolute symlinks, ``/etc/localtime ->
/usr/share/zoneinfo/UTC``, must have them made relative first.)  Ownership is restored
only when running as root; modes and mtimes always.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import stat
import sys
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from filelock import FileLock, Timeout

from pytest_incarnate.errors import IncarnateError, SpecError
from pytest_incarnate.spec import _path as _spec_path
from pytest_incarnate.spec import overlay_safe as _overlay_safe

__all__ = [
    "Layer",
    "LayerBuildError",
    "UnsafeTarMember",
    "default_cache_dir",
    "coerce_layers",
]

KINDS = ("dir", "tar", "callable")
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- errors


def _describe(cause: BaseException | str) -> str:
    if isinstance(cause, str):
        return cause
    return f"{type(cause).__name__}: {cause}"


class LayerBuildError(IncarnateError):
    """A layer could not be built into the cache; nothing was left there.

    ``key`` is the layer's hex key, ``name`` what the layer was made from (the callable's
    key string, the archive's path), ``cause`` the exception (or a message).
    """

    def __init__(self, key: str, cause: BaseException | str, name: str | None = None) -> None:
        self.key = key
        self.name = name
        self.cause = cause
        what = f"{name!r} (key {key})" if name is not None else f"key {key}"
        super().__init__(f"cannot build layer {what}: {_describe(cause)}")

    def __reduce__(self) -> Any:
        return (LayerBuildError, (self.key, _describe(self.cause), self.name))


class UnsafeTarMember(LayerBuildError):
    """A tar archive has a member that would land (or point) outside the layer, or that
    this process may not create; the archive is refused as a whole."""

    def __init__(self, key: str, archive: str, member: str, problem: str) -> None:
        self.archive = archive
        self.member = member
        self.problem = problem
        super().__init__(key, f"unsafe member {member!r}: {problem}", archive)

    def __reduce__(self) -> Any:
        return (UnsafeTarMember, (self.key, self.archive, self.member, self.problem))


# ----------------------------------------------------------------------- validation


# The same rules as every path of a Spec.
_abs_path = _spec_path


def _key_string(field_name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise SpecError(field_name, value, f"must be a str, not {type(value).__name__}")
    if not value:
        raise SpecError(field_name, value, "must not be empty")
    if "\x00" in value:
        raise SpecError(field_name, value, "contains a NUL byte")
    return value


def _hex_key(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


# ------------------------------------------------------------------------- the cache


def default_cache_dir() -> str:
    """``$INCARNATE_CACHE_DIR``, else ``$XDG_CACHE_HOME/pytest-incarnate/layers``, else
    ``~/.cache/pytest-incarnate/layers``."""
    env = os.environ.get("INCARNATE_CACHE_DIR")
    if env:
        return _abs_path("INCARNATE_CACHE_DIR", env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg and xdg.startswith("/") else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "pytest-incarnate", "layers")


def _cache_dir(cache_dir: Any) -> str:
    path = default_cache_dir() if cache_dir is None else _abs_path("cache_dir", cache_dir)
    _overlay_safe("cache_dir", path)
    try:
        os.makedirs(path, mode=0o700)
    except FileExistsError:
        pass
    if not os.path.isdir(path):
        raise SpecError("cache_dir", path, "is not a directory")
    return path


def _rmtree(path: str) -> None:
    """Remove a tree, making read-only directories in it writable as needed."""

    def onerror(func: Any, p: str, exc: Any) -> None:
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, 0o700)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, 0o700)
                _rmtree(p)
            else:
                os.unlink(p)
        except FileNotFoundError:
            pass

    if not os.path.lexists(path):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=onerror)
    else:
        shutil.rmtree(path, onerror=onerror)


def _partial_prefix(key: str) -> str:
    return f".{key}.partial-"


def _reap_partials(cache: str, key: str) -> None:
    """Remove partial directories left by dead builders.  The caller holds ``key``'s lock,
    so every partial directory of ``key`` is dead; one of another key is dead if its lock
    is free."""
    for entry in os.listdir(cache):
        if not entry.startswith(".") or ".partial-" not in entry:
            continue
        other = entry[1:].split(".partial-", 1)[0]
        if not _hex_key(other):
            continue
        try:
            if other == key:
                _rmtree(os.path.join(cache, entry))
                continue
            lock = FileLock(os.path.join(cache, other + ".lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # its builder is alive
            try:
                _rmtree(os.path.join(cache, entry))
            finally:
                lock.release()
        except OSError:
            continue  # not ours to remove (another user's?): it is never used anyway


# ---------------------------------------------------------------- fingerprints, digests


def _dir_fingerprint(real: str) -> str:
    h = hashlib.sha256()
    top = os.stat(real)
    h.update(b"dir\0" + real.encode("utf-8", "surrogateescape") + b"\0")
    h.update(f"{top.st_dev}:{top.st_ino}:{top.st_mtime_ns}\n".encode())
    with os.scandir(real) as it:
        entries = sorted(it, key=lambda e: e.name)
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        h.update(e.name.encode("utf-8", "surrogateescape"))
        h.update(f"\0{st.st_mode:o}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


# (path, dev, ino, size, mtime_ns, ctime_ns) -> sha256: an unchanged archive is hashed once.
_TAR_DIGESTS: dict[tuple[Any, ...], str] = {}


def _file_sha256(f: Any) -> str:
    h = hashlib.sha256()
    while True:
        chunk = f.read(_CHUNK)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def _tar_digest(path: str) -> str:
    st = os.stat(path)
    memo = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    digest = _TAR_DIGESTS.get(memo)
    if digest is None:
        with open(path, "rb") as f:
            digest = _file_sha256(f)
        _TAR_DIGESTS[memo] = digest
    return digest


# --------------------------------------------------------------------- the Layer value


@dataclass(frozen=True, repr=False)
class Layer:
    """A root-filesystem tree with a content key; make one with :meth:`from_dir`,
    :meth:`from_tar` or :meth:`from_callable`.

    kind
        ``"dir"``, ``"tar"`` or ``"callable"``.
    source
        the directory's real path, the archive's absolute path, or the callable's key
        string.
    key
        64 hex digits; the name of the cache entry (see the module documentation).

    Layers are equal when kind, source and key are; a callable layer's function is not
    compared (its key stands for it).
    """

    kind: str
    source: str
    key: str
    _build: Callable[[str], Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpecError("layer.kind", self.kind, f"must be one of {', '.join(KINDS)}")
        if not _hex_key(self.key):
            raise SpecError("layer.key", self.key, "must be 64 lowercase hex digits (use the from_* constructors)")
        if self.kind == "callable" and not callable(self._build):
            raise SpecError("layer.fn", self._build, "a callable layer needs its build function")

    # -------------------------------------------------------------- constructors

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Layer:
        """An existing directory, used in place.  Field in errors: ``layer.dir``."""
        p = _abs_path("layer.dir", path)
        if not os.path.isdir(p):
            problem = "does not exist" if not os.path.lexists(p) else "is not a directory"
            raise SpecError("layer.dir", path, problem)
        real = _overlay_safe("layer.dir", os.path.realpath(p))
        return cls("dir", real, _dir_fingerprint(real))

    @classmethod
    def from_tar(cls, path: str | os.PathLike[str]) -> Layer:
        """A tar archive, unpacked once into the cache.  Field in errors: ``layer.tar``."""
        p = _abs_path("layer.tar", path)
        if not os.path.isfile(p):
            problem = "does not exist" if not os.path.lexists(p) else "is not a regular file"
            raise SpecError("layer.tar", path, problem)
        try:
            if not tarfile.is_tarfile(p):
                raise SpecError("layer.tar", path, "is not a tar archive (plain, gzip, bzip2 or xz)")
            digest = _tar_digest(p)
        except OSError as e:
            raise SpecError("layer.tar", path, f"cannot be read: {e.strerror or e}") from e
        return cls("tar", p, digest)

    @classmethod
    def from_callable(
        cls, fn: Callable[[str], Any], key: str | None = None, *, version: str | None = None
    ) -> Layer:
        """A directory filled by ``fn(path)`` (``path`` is an empty directory), run once
        into the cache.  ``key``: the cache key string; or leave it out and give
        ``version``, the key string then being ``module:qualname@version``.  With both,
        it is ``key@version``.  Fields in errors: ``layer.fn``, ``layer.key``,
        ``layer.version``."""
        if not callable(fn):
            raise SpecError("layer.fn", fn, "must be a callable taking the directory to fill")
        if version is not None:
            version = _key_string("layer.version", version)
        if key is not None:
            name = _key_string("layer.key", key)
            if version is not None:
                name += "@" + version
        else:
            if version is None:
                raise SpecError("layer.key", None, "give key='...' (or version='...' to derive it from the function's name)")
            module = getattr(fn, "__module__", None)
            qualname = getattr(fn, "__qualname__", None)
            if not isinstance(module, str) or not isinstance(qualname, str):
                raise SpecError("layer.key", fn, "this callable has no __module__/__qualname__; give key='...'")
            if "<lambda>" in qualname or "<locals>" in qualname:
                raise SpecError("layer.key", fn, f"{qualname!r} is not a stable name; give key='...'")
            name = f"{module}:{qualname}@{version}"
        digest = hashlib.sha256(b"callable\0" + name.encode("utf-8", "surrogatepass")).hexdigest()
        return cls("callable", name, digest, fn)

    @classmethod
    def coerce(cls, value: Any) -> Layer:
        """Accept a Layer, a directory path, or a tar archive's path.  Field: ``layers``."""
        if isinstance(value, Layer):
            return value
        if isinstance(value, (str, os.PathLike)):
            p = _abs_path("layers", value)
            if os.path.isdir(p):
                return cls.from_dir(p)
            if os.path.isfile(p):
                return cls.from_tar(p)
            raise SpecError("layers", value, "is neither a directory nor a tar archive")
        if callable(value):
            raise SpecError("layers", value, "wrap a callable in Layer.from_callable(fn, key='...') to give it a cache key")
        raise SpecError("layers", value, "each layer must be a Layer, a directory or a tar archive")

    # ------------------------------------------------------------------- use

    def path(self, cache_dir: str | os.PathLike[str] | None = None) -> str:
        """The directory holding the tree, built into the cache first if needed (a
        directory layer is its own directory and touches no cache).

        Raises :class:`LayerBuildError` (or :class:`UnsafeTarMember`) when the build
        fails; nothing is left in the cache then, and the next call tries again."""
        if self.kind == "dir":
            if not os.path.isdir(self.source):
                raise SpecError("layer.dir", self.source, "is no longer a directory")
            return self.source
        cache = _cache_dir(cache_dir)
        final = os.path.join(cache, self.key)
        if os.path.isdir(final):  # complete entries appear only by rename
            return final
        with FileLock(os.path.join(cache, self.key + ".lock")):
            if os.path.isdir(final):
                return final
            _reap_partials(cache, self.key)
            tmp = os.path.join(cache, f"{_partial_prefix(self.key)}{os.getpid()}-{secrets.token_hex(4)}")
            os.mkdir(tmp, 0o755)
            try:
                self._fill(tmp)
                if not os.path.isdir(tmp) or os.path.islink(tmp):
                    raise LayerBuildError(self.key, "the build removed or replaced its directory", self.source)
                os.rename(tmp, final)
            except BaseException as e:
                try:
                    _rmtree(tmp)
                except OSError:
                    pass  # the next builder of this key removes it
                if isinstance(e, LayerBuildError) or not isinstance(e, Exception):
                    raise
                raise LayerBuildError(self.key, e, self.source) from e
        return final

    def _fill(self, tmp: str) -> None:
        if self.kind == "callable":
            assert self._build is not None
            self._build(tmp)
        else:
            _unpack(self, tmp)

    def __repr__(self) -> str:
        return f"<Layer {self.kind} {self.source!r} key={self.key[:12]}>"


def coerce_layers(value: Any) -> tuple[Layer, ...]:
    """A list of layers (see :meth:`Layer.coerce`), None meaning none.  Field: ``layers``."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes, os.PathLike, Layer)) or not isinstance(value, Iterable):
        raise SpecError("layers", value, "must be a list of layers")
    return tuple(Layer.coerce(v) for v in value)


# ----------------------------------------------------------------------- unpacking


class _Unpacker:
    """Unpack one archive into ``root`` with the "data" filter's rules, never following a
    symlink while writing."""

    def __init__(self, layer: Layer, root: str) -> None:
        self.layer = layer
        self.root = root
        self.as_root = os.geteuid() == 0
        self.dirs: list[tuple[str, tarfile.TarInfo]] = []
        self.links: list[str] = []

    def refuse(self, member: str, problem: str) -> UnsafeTarMember:
        return UnsafeTarMember(self.layer.key, self.layer.source, member, problem)

    def parts(self, name: str, member: str | None = None, what: str = "its name") -> list[str]:
        if name.startswith("/"):
            raise self.refuse(member or name, f"{what} is an absolute path ({name!r})")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise self.refuse(member or name, f"{what} has a '..' component ({name!r})")
        return parts

    def walk(self, member: str, parts: list[str], create: bool) -> str:
        """The directory holding ``parts[-1]``: every component before it must be a real
        directory (created when missing and ``create``), never a symlink."""
        cur = self.root
        for i, comp in enumerate(parts[:-1]):
            cur = os.path.join(cur, comp)
            try:
                st = os.lstat(cur)
            except FileNotFoundError:
                if not create:
                    raise self.refuse(member, f"{'/'.join(parts[: i + 1])!r} does not exist") from None
                os.mkdir(cur, 0o700)
                self.dirs.append((cur, tarfile.TarInfo()))  # implicit: 0755 below
                continue
            if stat.S_ISLNK(st.st_mode):
                raise self.refuse(member, f"it would be written through the symlink {'/'.join(parts[: i + 1])!r}")
            if not stat.S_ISDIR(st.st_mode):
                raise self.refuse(member, f"{'/'.join(parts[: i + 1])!r} is not a directory")
        return cur

    def check_symlink(self, m: tarfile.TarInfo, parts: list[str]) -> None:
        target = m.linkname
        if not target:
            raise self.refuse(m.name, "a symlink with an empty target")
        if target.startswith("/"):
            raise self.refuse(m.name, f"a symlink to the absolute path {target!r}")
        resolved = os.path.normpath(os.path.join(*parts[:-1], target) if len(parts) > 1 else target)
        if resolved == ".." or resolved.startswith("../"):
            raise self.refuse(m.name, f"a symlink to {target!r}, outside the layer")

    def clear(self, dest: str, keep_dir: bool) -> None:
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            if not keep_dir:
                _rmtree(dest)
        else:
            os.unlink(dest)

    def member(self, tf: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        parts = self.parts(m.name)
        if not parts:
            if m.isdir():
                self.dirs.append((self.root, m))
                return
            raise self.refuse(m.name, "it names the layer's top directory but is not a directory")
        if m.ischr() or m.isblk():
            if not self.as_root:
                raise self.refuse(m.name, "a device node, refused unless running as root")
        elif m.issym():
            self.check_symlink(m, parts)
        elif m.islnk():
            self.parts(m.linkname, m.name, "its hard link target")
        elif not (m.isreg() or m.isdir() or m.isfifo()):
            raise self.refuse(m.name, f"unsupported member type {m.type!r}")
        dest = os.path.join(self.walk(m.name, parts, create=True), parts[-1])
        self.clear(dest, keep_dir=m.isdir())
        if m.isdir():
            if not os.path.isdir(dest):
                os.mkdir(dest, 0o700)
            self.dirs.append((dest, m))
            return
        if m.isreg():
            src = tf.extractfile(m)
            assert src is not None
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                with src:
                    while True:
                        chunk = src.read(_CHUNK)
                        if not chunk:
                            break
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(fd, view):]
            finally:
                os.close(fd)
        elif m.issym():
            os.symlink(m.linkname, dest)
            self.links.append(dest)
        elif m.islnk():
            tparts = self.parts(m.linkname, m.name, "its hard link target")
            target = os.path.join(self.walk(m.name, tparts, create=False), tparts[-1]) if tparts else self.root
            try:
                tst = os.lstat(target)
            except FileNotFoundError:
                raise self.refuse(m.name, f"a hard link to {m.linkname!r}, which is not in the archive before it") from None
            if stat.S_ISDIR(tst.st_mode):
                raise self.refuse(m.name, f"a hard link to the directory {m.linkname!r}")
            os.link(target, dest, follow_symlinks=False)
            if stat.S_ISLNK(tst.st_mode):
                self.links.append(dest)  # the same text, read from another directory
            return  # a hard link shares its target's owner, mode and times
        elif m.isfifo():
            os.mkfifo(dest, 0o600)
        else:  # device node, as root
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(dest, kind | 0o600, os.makedev(m.devmajor, m.devminor))
        self.attrs(dest, m)

    def attrs(self, dest: str, m: tarfile.TarInfo) -> None:
        if self.as_root:
            os.chown(dest, m.uid, m.gid, follow_symlinks=False)
        if not m.issym():
            os.chmod(dest, m.mode & 0o7777)
        os.utime(dest, (m.mtime, m.mtime), follow_symlinks=False)

    def run(self, tf: tarfile.TarFile) -> None:
        for m in tf:
            self.member(tf, m)
        # A symlink that is harmless by its text can still lead out through another one
        # ("e -> x/.." with "x -> ."): check where each one really resolves.
        real_root = os.path.realpath(self.root)
        for link in self.links:
            if not os.path.lexists(link) or not os.path.islink(link):
                continue
            real = os.path.realpath(link)
            if real != real_root and not real.startswith(real_root + "/"):
                rel = os.path.relpath(link, self.root)
                raise self.refuse(rel, f"a symlink to {os.readlink(link)!r}, which resolves outside the layer")
        # Directories last, children before parents, so adding their entries does not undo the mode or mtime.
        for dest, m in sorted(self.dirs, key=lambda d: d[0], reverse=True):
            if m.name:
                self.attrs(dest, m)
            else:
                os.chmod(dest, 0o755)


def _unpack(layer: Layer, root: str) -> None:
    with open(layer.source, "rb") as f:
        digest = _file_sha256(f)
        if digest != layer.key:
            raise LayerBuildError(layer.key, f"the archive changed since the Layer was made (its sha256 is now {digest})",
                                  layer.source)
        f.seek(0)
        with tarfile.open(fileobj=f, mode="r:*") as tf:
            _Unpacker(layer, root).run(tf)
