"""Layers: keys, the cache, safe unpacking, one build across xdist workers, killed and
failing builders."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import select
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import warnings

import pytest

from pytest_incarnate.errors import IncarnateError, SpecError
from pytest_incarnate.layers import Layer, LayerBuildError, UnsafeTarMember, coerce_layers, default_cache_dir

pytest_plugins = ["pytester"]


def cache_entries(cache: str) -> list[str]:
    """Everything in the cache but lock files (which stay by design)."""
    if not os.path.isdir(cache):
        return []
    return sorted(e for e in os.listdir(cache) if not e.endswith(".lock"))


def partials(cache: str) -> list[str]:
    return [e for e in cache_entries(cache) if ".partial-" in e]


def make_tar(path, members):
    """members: (TarInfo, bytes | None) pairs, written as given (no name cleaning)."""
    with tarfile.open(path, "w") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return str(path)


def ti(name, type=tarfile.REGTYPE, mode=0o644, linkname="", mtime=1_600_000_000):
    info = tarfile.TarInfo(name)
    info.type = type
    info.mode = mode
    info.linkname = linkname
    info.mtime = mtime
    return info


# ----------------------------------------------------------------------------- from_dir


def test_from_dir_is_used_in_place(tmp_path):
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("inside\n")
    cache = tmp_path / "cache"
    layer = Layer.from_dir(tree)
    assert layer.kind == "dir"
    assert layer.path(cache_dir=cache) == str(tree)
    assert not cache.exists(), "a directory layer must not touch the cache"
    assert len(layer.key) == 64 and int(layer.key, 16) >= 0
    assert Layer.from_dir(str(tree)) == layer and hash(Layer.from_dir(tree)) == hash(layer)
    assert "dir" in repr(layer) and str(tree) in repr(layer)


def test_from_dir_key_follows_the_top_of_the_tree(tmp_path):
    tree = tmp_path / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    k0 = Layer.from_dir(tree).key
    assert Layer.from_dir(tree).key == k0, "the fingerprint must be stable when nothing changes"
    (tree / "etc").mkdir()
    k1 = Layer.from_dir(tree).key
    assert k1 != k0, "a new top-level entry changes the key"
    (tree / "usr" / "lib").mkdir()
    k2 = Layer.from_dir(tree).key
    assert k2 != k1, "a new entry in a top-level directory changes the key"
    other = tmp_path / "other"
    other.mkdir()
    (other / "usr").mkdir()
    assert Layer.from_dir(other).key not in (k0, k1, k2)


def test_from_dir_through_a_symlink_is_the_real_directory(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    layer = Layer.from_dir(tmp_path / "alias")
    assert layer.source == str(tmp_path / "real")
    assert layer == Layer.from_dir(tmp_path / "real")


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda tmp: str(tmp / "missing"), "does not exist"),
        (lambda tmp: "relative/dir", "absolute"),
        (lambda tmp: str(tmp) + "/a\x00b", "NUL"),
        (lambda tmp: b"/tmp", "bytes"),
        (lambda tmp: "", "empty"),
        (lambda tmp: 42, "path string"),
    ],
)
def test_from_dir_bad_input_names_the_field(tmp_path, make, problem):
    with pytest.raises(SpecError) as ei:
        Layer.from_dir(make(tmp_path))
    assert ei.value.field == "layer.dir"
    assert problem in ei.value.problem


def test_from_dir_file_and_overlay_unsafe_names(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(SpecError, match="not a directory") as ei:
        Layer.from_dir(tmp_path / "f")
    assert ei.value.field == "layer.dir"
    (tmp_path / "a,b").mkdir()
    with pytest.raises(SpecError, match="','") as ei:
        Layer.from_dir(tmp_path / "a,b")
    assert ei.value.field == "layer.dir"


# ----------------------------------------------------------------------------- from_tar


def good_tar(tmp_path, name="root.tar"):
    return make_tar(
        tmp_path / name,
        [
            (ti("etc", tarfile.DIRTYPE, 0o755), None),
            (ti("etc/hostname"), b"layered\n"),
            (ti("bin/tool", mode=0o755), b"#!/bin/sh\necho tool\n"),  # implicit parent
            (ti("etc/hostname-link", tarfile.SYMTYPE, linkname="hostname"), None),
            (ti("hard", tarfile.LNKTYPE, linkname="etc/hostname"), None),
            (ti("ro", tarfile.DIRTYPE, 0o555), None),
            (ti("ro/inside"), b"x"),
            (ti("fifo", tarfile.FIFOTYPE, 0o600), None),
        ],
    )


def test_from_tar_unpacks_once_with_content_modes_and_links(tmp_path):
    tar = good_tar(tmp_path)
    cache = str(tmp_path / "cache")
    layer = Layer.from_tar(tar)
    assert layer.kind == "tar"
    with open(tar, "rb") as f:
        assert layer.key == hashlib.sha256(f.read()).hexdigest()

    root = layer.path(cache_dir=cache)
    assert root == os.path.join(cache, layer.key)
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700
    with open(os.path.join(root, "etc/hostname")) as f:
        assert f.read() == "layered\n"
    assert os.readlink(os.path.join(root, "etc/hostname-link")) == "hostname"
    assert os.stat(os.path.join(root, "hard")).st_ino == os.stat(os.path.join(root, "etc/hostname")).st_ino
    assert stat.S_IMODE(os.stat(os.path.join(root, "bin/tool")).st_mode) == 0o755
    assert stat.S_IMODE(os.stat(os.path.join(root, "ro")).st_mode) == 0o555
    assert stat.S_IMODE(os.stat(os.path.join(root, "bin")).st_mode) == 0o755
    assert stat.S_ISFIFO(os.lstat(os.path.join(root, "fifo")).st_mode)
    assert os.stat(os.path.join(root, "etc/hostname")).st_mtime == 1_600_000_000
    assert os.stat(os.path.join(root, "etc")).st_mtime == 1_600_000_000
    assert cache_entries(cache) == [layer.key]

    # A second Layer from the same bytes (another name, another process would be the same)
    # finds the entry: nothing is unpacked again.
    before = os.stat(os.path.join(root, "etc/hostname"))
    with open(os.path.join(root, "marker"), "w") as f:
        f.write("added after the build")
    copy = tmp_path / "copy.tar"
    copy.write_bytes(open(tar, "rb").read())
    again = Layer.from_tar(copy)
    assert again.key == layer.key
    assert again.path(cache_dir=cache) == root
    after = os.stat(os.path.join(root, "etc/hostname"))
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert os.path.exists(os.path.join(root, "marker"))
    assert cache_entries(cache) == [layer.key]


def test_from_tar_compressed(tmp_path):
    path = tmp_path / "root.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        info = ti("hello")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"hi"))
    root = Layer.from_tar(path).path(cache_dir=tmp_path / "cache")
    assert open(os.path.join(root, "hello")).read() == "hi"


UNSAFE = {
    "dotdot": ([(ti("../x"), b"escaped")], "'..'"),
    "dotdot-inner": ([(ti("etc/../../x"), b"escaped")], "'..'"),
    "absolute": ([(ti("/abs"), b"escaped")], "absolute path"),
    "symlink-abs": ([(ti("etc", tarfile.SYMTYPE, linkname="/etc"), None)], "absolute path '/etc'"),
    "symlink-up": ([(ti("a/up", tarfile.SYMTYPE, linkname="../../x"), None)], "outside the layer"),
    "hardlink-out": ([(ti("h", tarfile.LNKTYPE, linkname="../etc/passwd"), None)], "hard link target"),
    "hardlink-abs": ([(ti("h", tarfile.LNKTYPE, linkname="/etc/passwd"), None)], "hard link target"),
    "through-symlink": (
        [(ti("sub", tarfile.DIRTYPE, 0o755), None), (ti("d", tarfile.SYMTYPE, linkname="sub"), None),
         (ti("d/f"), b"through")],
        "through the symlink 'd'",
    ),
    # Harmless by its text ("x/.." is the top), out once "x" becomes a link to ".".
    "symlink-chain": (
        [(ti("x", tarfile.DIRTYPE, 0o755), None), (ti("e", tarfile.SYMTYPE, linkname="x/.."), None),
         (ti("x", tarfile.SYMTYPE, linkname="."), None)],
        "resolves outside the layer",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_from_tar_refuses_unsafe_members_and_leaves_nothing(tmp_path, case):
    members, problem = UNSAFE[case]
    members = [(ti("ok"), b"fine")] + members  # something is written before the refusal
    tar = make_tar(tmp_path / "bad.tar", members)
    with tarfile.open(tar) as tf:
        assert [m.name for m in tf.getmembers()] == [m.name for m, _ in members], "tarfile rewrote a name"
    cache = str(tmp_path / "cache")
    layer = Layer.from_tar(tar)
    with pytest.raises(UnsafeTarMember) as ei:
        layer.path(cache_dir=cache)
    err = ei.value
    assert isinstance(err, LayerBuildError) and isinstance(err, IncarnateError)
    assert err.key == layer.key and err.archive == tar
    assert problem in err.problem, err
    assert cache_entries(cache) == []
    assert not (tmp_path / "x").exists() and not os.path.exists("/abs")
    # A refusal is not cached: the next call examines the archive again.
    with pytest.raises(UnsafeTarMember):
        layer.path(cache_dir=cache)


def test_from_tar_device_node_refused_unless_root(tmp_path):
    dev = ti("null", tarfile.CHRTYPE, 0o666)
    dev.devmajor, dev.devminor = 1, 3
    tar = make_tar(tmp_path / "dev.tar", [(dev, None)])
    layer = Layer.from_tar(tar)
    if os.geteuid() != 0:
        with pytest.raises(UnsafeTarMember, match="device node"):
            layer.path(cache_dir=tmp_path / "cache")
        return
    root = layer.path(cache_dir=tmp_path / "cache")
    st = os.lstat(os.path.join(root, "null"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)


@pytest.fixture
def nobody_dir():
    """A directory the unprivileged user (65534) can write, outside the root-only tmp_path."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    d = tempfile.mkdtemp(prefix="layers-nobody-")
    os.chmod(d, 0o777)
    yield d
    shutil.rmtree(d)


def as_nobody(fn) -> str:
    """Run fn() in a forked child as uid/gid 65534; its return value (a str), or the
    exception it raised, as text."""
    r, w = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded, fork() may deadlock"
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                msg = fn()
            except BaseException as e:
                msg = f"{type(e).__name__}: {e}"
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        ready, _, _ = select.select([f], [], [], 60)
        if not ready:
            os.kill(pid, signal.SIGKILL)
        msg = f.read().decode()
    os.waitpid(pid, 0)
    return msg


def test_from_tar_device_node_refused_as_an_unprivileged_user(nobody_dir):
    dev = ti("null", tarfile.CHRTYPE, 0o666)
    dev.devmajor, dev.devminor = 1, 3
    tar = make_tar(os.path.join(nobody_dir, "dev.tar"), [(ti("ok"), b"fine"), (dev, None)])
    os.chmod(tar, 0o644)
    layer = Layer.from_tar(tar)
    cache = os.path.join(nobody_dir, "cache")

    def build():
        try:
            layer.path(cache_dir=cache)
        except UnsafeTarMember as e:
            return "refused: " + e.problem
        return "built"

    msg = as_nobody(build)
    assert msg.startswith("refused: a device node"), msg
    assert cache_entries(cache) == []
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700 and os.stat(cache).st_uid == 65534


def test_failed_build_with_read_only_directories_is_removed_as_an_unprivileged_user(nobody_dir):
    cache = os.path.join(nobody_dir, "cache")

    def bad(path):
        for d in ("ro", "ro/none"):
            os.mkdir(os.path.join(path, d))
            open(os.path.join(path, d, "half"), "w").close()
        os.chmod(os.path.join(path, "ro", "none"), 0)
        os.chmod(os.path.join(path, "ro"), 0o500)
        raise ValueError("boom")

    def build():
        try:
            Layer.from_callable(bad, key="k-ro").path(cache_dir=cache)
        except LayerBuildError as e:
            return "failed: " + str(e)
        return "built"

    msg = as_nobody(build)
    assert msg.startswith("failed: ") and "boom" in msg, msg
    assert cache_entries(cache) == []


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda tmp: str(tmp / "missing.tar"), "does not exist"),
        (lambda tmp: "root.tar", "absolute"),
        (lambda tmp: str(tmp), "not a regular file"),
        (lambda tmp: str(tmp / "bad.tar\x00"), "NUL"),
    ],
)
def test_from_tar_bad_input_names_the_field(tmp_path, make, problem):
    with pytest.raises(SpecError) as ei:
        Layer.from_tar(make(tmp_path))
    assert ei.value.field == "layer.tar" and problem in ei.value.problem


def test_from_tar_not_an_archive(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(SpecError, match="not a tar archive") as ei:
        Layer.from_tar(junk)
    assert ei.value.field == "layer.tar"


def test_from_tar_changed_after_the_layer_was_made(tmp_path):
    tar = good_tar(tmp_path)
    layer = Layer.from_tar(tar)
    make_tar(tmp_path / "root.tar", [(ti("other"), b"other bytes")])
    cache = str(tmp_path / "cache")
    with pytest.raises(LayerBuildError, match="changed since the Layer was made") as ei:
        layer.path(cache_dir=cache)
    assert ei.value.key == layer.key
    assert cache_entries(cache) == []
    assert Layer.from_tar(tar).key != layer.key


# ------------------------------------------------------------------------ from_callable


def test_from_callable_builds_once_and_keys(tmp_path):
    calls = []

    def build(path):
        calls.append(path)
        assert os.listdir(path) == []
        with open(os.path.join(path, "built"), "w") as f:
            f.write("yes")

    cache = str(tmp_path / "cache")
    layer = Layer.from_callable(build, key="k-once")
    assert layer.kind == "callable" and layer.source == "k-once"
    assert layer.key == hashlib.sha256(b"callable\0k-once").hexdigest()
    root = layer.path(cache_dir=cache)
    assert Layer.from_callable(build, key="k-once").path(cache_dir=cache) == root
    assert len(calls) == 1 and ".partial-" in calls[0]
    assert open(os.path.join(root, "built")).read() == "yes"
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o755
    assert cache_entries(cache) == [layer.key]
    assert Layer.from_callable(build, key="k-other").key != layer.key
    assert Layer.from_callable(build, key="k-once", version="2").key != layer.key
    assert "k-once" in repr(layer) and "callable" in repr(layer)


def named_build(path):
    open(os.path.join(path, "named"), "w").close()


def test_from_callable_key_derived_from_the_name_and_a_version():
    layer = Layer.from_callable(named_build, version="1")
    assert layer.source == f"{__name__}:named_build@1"
    assert Layer.from_callable(named_build, version="2").key != layer.key
    with pytest.raises(SpecError) as ei:
        Layer.from_callable(named_build)
    assert ei.value.field == "layer.key"
    with pytest.raises(SpecError, match="not a stable name") as ei:
        Layer.from_callable(lambda p: None, version="1")
    assert ei.value.field == "layer.key"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"key": ""}, "layer.key"),
        ({"key": "a\x00b"}, "layer.key"),
        ({"key": 7}, "layer.key"),
        ({"key": "k", "version": 3}, "layer.version"),
    ],
)
def test_from_callable_bad_key_names_the_field(kwargs, field):
    with pytest.raises(SpecError) as ei:
        Layer.from_callable(named_build, **kwargs)
    assert ei.value.field == field


def test_from_callable_needs_a_callable():
    with pytest.raises(SpecError) as ei:
        Layer.from_callable("not callable", key="k")  # type: ignore[arg-type]
    assert ei.value.field == "layer.fn"


def test_failing_callable_raises_naming_the_key_and_leaves_nothing(tmp_path):
    cache = str(tmp_path / "cache")

    def bad(path):
        os.mkdir(os.path.join(path, "ro"))
        open(os.path.join(path, "ro", "half"), "w").close()
        os.chmod(os.path.join(path, "ro"), 0o500)
        raise ValueError("boom in the build")

    layer = Layer.from_callable(bad, key="k-fail")
    with pytest.raises(LayerBuildError) as ei:
        layer.path(cache_dir=cache)
    err = ei.value
    assert err.key == layer.key and err.name == "k-fail"
    assert "k-fail" in str(err) and "boom in the build" in str(err)
    assert isinstance(err.__cause__, ValueError) and err.cause is err.__cause__
    assert cache_entries(cache) == []
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is LayerBuildError and copy.key == err.key and str(copy) == str(err)

    # The failure is not cached: a fixed build under the same key succeeds.
    root = Layer.from_callable(named_build, key="k-fail").path(cache_dir=cache)
    assert os.listdir(root) == ["named"]


def test_callable_replacing_its_directory_is_a_build_error(tmp_path):
    def swap(path):
        os.rmdir(path)
        open(path, "w").close()

    cache = str(tmp_path / "cache")
    with pytest.raises(LayerBuildError, match="removed or replaced"):
        Layer.from_callable(swap, key="k-swap").path(cache_dir=cache)
    assert cache_entries(cache) == []


def test_keyboard_interrupt_in_a_build_is_not_wrapped_and_leaves_nothing(tmp_path):
    def interrupted(path):
        open(os.path.join(path, "half"), "w").close()
        raise KeyboardInterrupt

    cache = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        Layer.from_callable(interrupted, key="k-int").path(cache_dir=cache)
    assert cache_entries(cache) == []


# ------------------------------------------------------------------ killed builders


KILLED_BUILDER = textwrap.dedent(
    """
    import os, signal, sys
    from pytest_incarnate.layers import Layer

    def build(path):
        with open(os.path.join(path, "half"), "w") as f:
            f.write("written before the builder died")
        os.kill(os.getpid(), signal.SIGKILL)

    Layer.from_callable(build, key=sys.argv[2]).path(cache_dir=sys.argv[1])
    """
)


def kill_a_builder(cache: str, key: str) -> str:
    proc = subprocess.run([sys.executable, "-c", KILLED_BUILDER, cache, key], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    left = partials(cache)
    assert len(left) == 1, f"the killed builder should leave one partial directory: {cache_entries(cache)}"
    assert os.path.exists(os.path.join(cache, left[0], "half"))
    return left[0]


def test_killed_builder_partial_is_never_used_and_is_removed(tmp_path):
    cache = str(tmp_path / "cache")
    kill_a_builder(cache, "k-killed")
    calls = []

    def good(path):
        calls.append(path)
        assert os.listdir(path) == [], "a build must start from an empty directory"
        open(os.path.join(path, "good"), "w").close()

    layer = Layer.from_callable(good, key="k-killed")
    root = layer.path(cache_dir=cache)
    assert len(calls) == 1
    assert sorted(os.listdir(root)) == ["good"]
    assert partials(cache) == []
    assert cache_entries(cache) == [layer.key]


def test_killed_builder_of_another_key_is_cleaned_up_too(tmp_path):
    cache = str(tmp_path / "cache")
    kill_a_builder(cache, "k-dead")
    root = Layer.from_callable(named_build, key="k-alive").path(cache_dir=cache)
    assert os.listdir(root) == ["named"]
    assert partials(cache) == []


# ------------------------------------------------------------- xdist: one build only


def test_two_xdist_workers_build_a_layer_once(pytester, tmp_path):
    cache = tmp_path / "cache"
    counter = tmp_path / "builds"
    workers = tmp_path / "workers"
    pytester.makepyfile(
        test_shared_layer=f"""
        import os, time
        import pytest
        from pytest_incarnate.layers import Layer

        CACHE = {str(cache)!r}
        COUNTER = {str(counter)!r}
        WORKERS = {str(workers)!r}

        def append(path, line):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(fd, (line + "\\n").encode())
            finally:
                os.close(fd)

        def build(path):
            append(COUNTER, os.environ.get("PYTEST_XDIST_WORKER", "?"))
            time.sleep(0.3)  # widen the window in which the other worker arrives
            with open(os.path.join(path, "content"), "w") as f:
                f.write("complete")

        @pytest.mark.parametrize("i", range(4))
        def test_uses_the_layer(i):
            root = Layer.from_callable(build, key="k1").path(cache_dir=CACHE)
            with open(os.path.join(root, "content")) as f:
                assert f.read() == "complete"
            append(WORKERS, os.environ["PYTEST_XDIST_WORKER"])
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    builds = counter.read_text().splitlines()
    assert len(builds) == 1, f"the layer was built by {builds}"
    assert sorted(set(workers.read_text().split())) == ["gw0", "gw1"], "both workers must have used the layer"
    assert partials(str(cache)) == []


# ---------------------------------------------------------------- cache dir, coerce


def test_cache_dir_default_and_validation(tmp_path, monkeypatch):
    monkeypatch.setenv("INCARNATE_CACHE_DIR", str(tmp_path / "from-env"))
    assert default_cache_dir() == str(tmp_path / "from-env")
    root = Layer.from_callable(named_build, key="k-env").path()
    assert os.path.dirname(root) == str(tmp_path / "from-env")
    assert stat.S_IMODE(os.stat(tmp_path / "from-env").st_mode) == 0o700
    monkeypatch.delenv("INCARNATE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "pytest-incarnate" / "layers")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == str(tmp_path / "home" / ".cache" / "pytest-incarnate" / "layers")
    monkeypatch.setenv("INCARNATE_CACHE_DIR", "relative")
    with pytest.raises(SpecError) as ei:
        default_cache_dir()
    assert ei.value.field == "INCARNATE_CACHE_DIR"
    for bad in ("relative", str(tmp_path / "a:b")):
        with pytest.raises(SpecError) as ei:
            Layer.from_callable(named_build, key="k").path(cache_dir=bad)
        assert ei.value.field == "cache_dir"


def test_coerce(tmp_path):
    (tmp_path / "tree").mkdir()
    tar = good_tar(tmp_path)
    layers = coerce_layers([str(tmp_path / "tree"), tar, Layer.from_callable(named_build, key="k")])
    assert [x.kind for x in layers] == ["dir", "tar", "callable"]
    assert coerce_layers(None) == ()
    for bad, problem in ((str(tmp_path / "nothing"), "neither"), (named_build, "from_callable"), (3, "each layer")):
        with pytest.raises(SpecError) as ei:
            coerce_layers([bad])
        assert ei.value.field == "layers" and problem in ei.value.problem
    with pytest.raises(SpecError) as ei:
        coerce_layers(str(tmp_path / "tree"))
    assert ei.value.field == "layers"
    with pytest.raises(SpecError) as ei:
        Layer("bogus", "/", "0" * 64)
    assert ei.value.field == "layer.kind"
