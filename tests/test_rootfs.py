"""The copy-on-write root: writes anywhere land in the sandbox's upper layer, the host never
changes, and ``Result.changes`` says exactly what was written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import uuid

import pytest

from pytest_incarnate import Sandbox, Spec, probe
from pytest_incarnate.errors import OverlaySkipped, OverlayUnavailable, SetupStepFailed

pytestmark = pytest.mark.skipif(
    not probe()["overlay.root"].granted, reason=f"no copy-on-write root here: {probe()['overlay.root'].reason}"
)

PY = sys.executable
SENTINELS = ("/etc/hosts", "/etc/hostname")


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def var_tmp_dir():
    """A scratch directory outside /tmp (the sandbox's /tmp is its own)."""
    d = tempfile.mkdtemp(prefix="rootfs-test-", dir="/var/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_writes_everywhere_leave_the_host_unchanged_and_are_reported(var_tmp_dir, leak_check):
    tok = "cow-" + uuid.uuid4().hex[:8]
    sep = os.path.join(var_tmp_dir, "separate")
    os.mkdir(sep)
    home = os.path.expanduser("~")
    project = os.getcwd()
    script = os.path.join(var_tmp_dir, "scenario.py")
    with open(script, "w") as f:
        f.write(textwrap.dedent(f"""
            import json, sys
            from pytest_incarnate import Sandbox
            cmd = " && ".join([
                "echo etc > /etc/{tok}", "echo usr > /usr/local/{tok}", "echo home > {home}/{tok}",
                "echo project > {project}/{tok}", "echo tmp > /tmp/{tok}", "echo sep > {sep}/{tok}",
                "echo extra >> /etc/hosts", "rm /etc/hostname", "cat /etc/{tok}",
            ])
            r = Sandbox().run(["sh", "-c", cmd])
            print(json.dumps({{"rc": r.returncode, "out": r.stdout.decode(), "err": r.stderr.decode(),
                               "changes": [[c.path, c.kind] for c in r.changes],
                               "etc": r.changes.content("/etc/{tok}").decode(),
                               "degradations": [d.describe() for d in r.degradations]}}))
        """))
    before = {p: digest(p) for p in SENTINELS}
    # A separately mounted filesystem, made for real: a tmpfs in a private mount namespace
    # that the scenario (and so the sandbox's host) runs in.
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mount -t tmpfs -o size=4m sep {sep} && echo keep > {sep}/host-file && exec {PY} {script}"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["rc"] == 0, got["err"]
    assert got["out"] == "etc\n"
    assert got["degradations"] == []
    expected = {
        (f"/etc/{tok}", "created"), (f"/usr/local/{tok}", "created"), (f"{home}/{tok}", "created"),
        (f"{project}/{tok}", "created"), (f"/tmp/{tok}", "created"), (f"{sep}/{tok}", "created"),
        ("/etc/hosts", "modified"), ("/etc/hostname", "deleted"),
    }
    assert {tuple(c) for c in got["changes"]} == expected
    assert got["etc"] == "etc\n"
    # The host: the sentinels are byte for byte the same, and nothing was created.
    assert {p: digest(p) for p in SENTINELS} == before
    for d in ("/etc", "/usr/local", home, project, "/tmp", sep):
        assert not os.path.exists(os.path.join(d, tok)), d


def test_call_reports_changes_too(tmp_path, leak_check):
    tok = "cow-" + uuid.uuid4().hex[:8]

    def body() -> str:
        with open(f"/etc/{tok}", "w") as f:
            f.write("inside")
        os.chmod("/etc/hosts", 0o600)
        return open(f"/etc/{tok}").read()

    out = Sandbox().call_outcome(body)
    assert (out.kind, out.value) == ("ok", "inside")
    assert out.changes is not None
    assert sorted((c.path, c.kind) for c in out.changes) == sorted([("/etc/hosts", "metadata"), (f"/etc/{tok}", "created")])
    assert out.changes.content(f"/etc/{tok}") == b"inside"
    assert not os.path.exists(f"/etc/{tok}")
    out.changes.assert_only_under("/etc")
    kept = tmp_path / "kept"
    manifest = json.loads(open(out.changes.save(str(kept))).read())
    assert {m["path"]: m["kind"] for m in manifest} == {"/etc/hosts": "metadata", f"/etc/{tok}": "created"}
    assert (kept / "files" / "etc" / tok).read_bytes() == b"inside"
    with pytest.raises(AssertionError, match=f"created: /etc/{tok}"):
        out.changes.assert_only_under("/usr")


def test_keep_upper_saves_what_was_written(tmp_path, leak_check):
    h = Sandbox(Spec(keep_upper=str(tmp_path / "kept"))).spawn(["sh", "-c", "echo kept > /etc/kept-file"])
    assert h.wait(timeout=30) == 0
    manifest = json.loads((tmp_path / "kept" / str(h.pid) / "manifest.json").read_text())
    assert manifest == [{"path": "/etc/kept-file", "kind": "created", "content_kept": True}]
    assert (tmp_path / "kept" / str(h.pid) / "files" / "etc" / "kept-file").read_text() == "kept\n"


def test_upper_size_limit_gives_enospc_and_a_clean_result(leak_check):
    r = Sandbox(Spec(upper_size="1m")).run(
        ["sh", "-c", "dd if=/dev/zero of=/etc/big bs=64k count=64 2>&1; echo rc=$?"]
    )
    assert r.returncode == 0
    assert b"No space left on device" in r.stdout and b"rc=1" in r.stdout
    assert not os.path.exists("/etc/big")


def test_standard_mounts(leak_check):
    code = textwrap.dedent(
        """
        import json, os
        out = {"dev": sorted(os.listdir("/dev")), "run": os.listdir("/run"),
               "pts": os.path.ismount("/dev/pts"), "null": open("/dev/null", "w").write("x")}
        try:
            open("/sys/kernel/incarnate-probe", "w")
        except OSError as e:
            out["sys"] = e.errno
        out["shm"] = os.access("/dev/shm", os.W_OK)
        print(json.dumps(out))
        """
    )
    r = Sandbox().run([PY, "-c", code])
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    for name in ("null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd", "stdin", "stdout", "stderr"):
        assert name in got["dev"], name
    assert not {"sda", "vda", "mem", "kmsg"} & set(got["dev"])  # no host devices beyond the minimal set
    assert got["run"] == []  # the host's /run (and its unix sockets) hidden
    assert got["pts"] is True and got["shm"] is True
    assert got["sys"] in (errno.EROFS, errno.EACCES)


def test_escape_attempts_do_not_reach_the_host(var_tmp_dir, leak_check):
    tok = "escape-" + uuid.uuid4().hex[:8]

    def attack() -> list[str]:
        wrote = []
        targets = [f"/proc/1/root/etc/{tok}", f"/proc/self/root/etc/{tok}"]
        for fd in os.listdir("/proc/self/fd"):
            p = f"/proc/self/fd/{fd}"
            if os.path.isdir(p):
                targets.append(f"{p}/{tok}")
                try:
                    os.chdir(p)  # chdir through an inherited descriptor
                    targets.append(os.path.join(os.getcwd(), tok))
                except OSError:
                    pass
        for t in targets:
            try:
                with open(t, "w") as f:
                    f.write("x")
                wrote.append(t)
            except OSError:
                pass
        return wrote

    out = Sandbox().call_outcome(attack)
    assert out.kind == "ok"
    assert out.value  # writes succeeded inside...
    assert not os.path.exists(f"/etc/{tok}")  # ...and none reached the host
    found = subprocess.run(["find", "/etc", "/var/tmp", "/root", "-xdev", "-name", tok], capture_output=True, text=True)
    assert found.stdout == ""

    # A symlink planted where a bind target should be is refused, not followed.
    planted = os.path.join(var_tmp_dir, "planted")
    os.symlink("/etc", planted)
    with pytest.raises(SetupStepFailed) as exc:
        Sandbox(Spec(binds=[(var_tmp_dir, os.path.join(planted, tok))])).run(["/bin/true"])
    assert exc.value.step == "bind" and exc.value.errno == errno.ELOOP
    assert not os.path.exists(f"/etc/{tok}")


def test_degrades_to_read_only_without_overlay(tmp_path, leak_check):
    """CAP_SYS_ADMIN taken away for real: the host root cannot be overlaid (only a user
    namespace's mount namespace is left, where inherited mounts are locked)."""
    script = tmp_path / "ro.py"
    script.write_text(textwrap.dedent(
        """
        import json
        from pytest_incarnate import Sandbox, Spec
        from pytest_incarnate.errors import OverlayUnavailable
        r = Sandbox().run(["sh", "-c", "echo x > /etc/x 2>/dev/null; echo $?; echo t > /tmp/t && echo tmp-ok"])
        out = {"out": r.stdout.decode(), "degr": [[type(d).__name__, d.reason] for d in r.degradations],
               "changes": [[c.path, c.kind] for c in r.changes] if r.changes is not None else None}
        try:
            Sandbox(Spec(strict=True)).run(["/bin/true"])
        except OverlayUnavailable as e:
            out["strict"] = str(e)
        print(json.dumps(out))
        """
    ))
    proc = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", PY, str(script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    status, tmp = got["out"].split()
    assert status != "0" and tmp == "tmp-ok"  # /etc read-only, /tmp writable
    assert [d[0] for d in got["degr"]] == ["OverlaySkipped"] and "CAP_SYS_ADMIN" in got["degr"][0][1]
    assert got["changes"] == []  # /tmp is plain tmpfs here; the caller's own trees were not written
    assert "cannot give the sandbox a copy-on-write root" in got["strict"]


def test_overlay_types_are_public():
    assert OverlaySkipped("why").describe().startswith("copy-on-write root skipped")
    assert "fix: x" in str(OverlayUnavailable("why", "x"))


@pytest.fixture
def busybox_root(tmp_path):
    busybox = "/bin/busybox"  # Debian's busybox-static: no shared libraries to bring along
    if not os.path.exists(busybox):
        pytest.skip("needs busybox-static (apt-get install busybox-static; scripts/check installs it)")
    root = tmp_path / "busybox-root"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo", "hostname", "id"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc").mkdir()
    (root / "etc" / "motd").write_text("from the busybox tree\n")
    return root


def test_busybox_root_runs_sh_copy_on_write(busybox_root, leak_check):
    before = sorted(p.name for p in (busybox_root / "etc").iterdir())
    r = Sandbox(Spec(root=str(busybox_root), env={"PATH": "/bin"})).run(
        ["/bin/sh", "-c", "cat /etc/motd; ls /; echo new > /etc/new; echo $$; hostname"]
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "from the busybox tree"
    assert lines[-2:] == ["2", "incarnate"]
    assert "bin" in lines and "proc" in lines and "usr" not in lines  # only the tree, not the host
    assert ("/etc/new", "created") in {(c.path, c.kind) for c in r.changes}
    assert sorted(p.name for p in (busybox_root / "etc").iterdir()) == before  # the tree is unchanged


def test_unprivileged_user_writes_its_own_files_copy_on_write():
    """As uid 65534: the user's own tree (its home, under a root-owned parent) is
    copy-on-write; the rest of the host root is read-only (EROFS, where the host says
    EACCES: see docs/limitations.md)."""
    if os.geteuid() != 0 or not os.path.exists("/usr/bin/python3") or shutil.which("setpriv") is None:
        pytest.skip("needs root (to switch user), setpriv and Debian's /usr/bin/python3")
    if subprocess.run(["/usr/bin/python3", "-c", "import cffi, _cffi_backend"], capture_output=True).returncode:
        pytest.skip("needs python3-cffi for /usr/bin/python3 (scripts/check installs it)")
    import pytest_incarnate

    base = tempfile.mkdtemp(prefix="rootfs-unpriv-", dir="/var/tmp")  # root-owned parent
    try:
        shutil.copytree(os.path.dirname(pytest_incarnate.__file__), os.path.join(base, "pkg", "pytest_incarnate"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        home = os.path.join(base, "home")
        os.mkdir(home)
        with open(os.path.join(home, "notes.txt"), "w") as f:
            f.write("host\n")
        for p in (home, os.path.join(home, "notes.txt")):
            os.chown(p, 65534, 65534)
        for root, _dirs, _files in os.walk(base):
            os.chmod(root, 0o755)
        script = os.path.join(base, "s.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent("""
                import json, os
                from pytest_incarnate import Sandbox
                r = Sandbox().run(["sh", "-c",
                    "echo inside >> $HOME/notes.txt && cat $HOME/notes.txt; echo x > /etc/x || true"])
                print(json.dumps({"rc": r.returncode, "out": r.stdout.decode(), "err": r.stderr.decode(),
                                  "changes": [[c.path, c.kind] for c in r.changes or ()],
                                  "degr": [type(d).__name__ for d in r.degradations]}))
            """))
        os.chmod(script, 0o644)
        proc = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "env", "-i", "PATH=/usr/bin:/bin",
             f"HOME={home}", f"PYTHONPATH={base}/pkg", "PYTHONDONTWRITEBYTECODE=1", "/usr/bin/python3", script],
            capture_output=True, text=True, timeout=60, cwd=home,
        )
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        assert got["rc"] == 0, got["err"]
        assert got["out"] == "host\ninside\n"
        assert "Read-only file system" in got["err"]
        assert got["changes"] == [[f"{home}/notes.txt", "modified"]]
        assert got["degr"] == ["OverlaySkipped"]
        with open(os.path.join(home, "notes.txt")) as f:
            assert f.read() == "host\n"  # the host file is unchanged
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _add_motd(path: str) -> None:
    os.makedirs(os.path.join(path, "etc"))
    with open(os.path.join(path, "etc", "motd"), "w") as f:
        f.write("from the top layer\n")


def test_layer_stack_root(busybox_root, tmp_path, monkeypatch, leak_check):
    import tarfile

    from pytest_incarnate.layers import Layer

    monkeypatch.setenv("INCARNATE_CACHE_DIR", str(tmp_path / "cache"))
    archive = tmp_path / "busybox.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(busybox_root, arcname=".")
    top = Layer.from_callable(_add_motd, key="motd-v1")
    spec = Spec(layers=[top, str(archive)], env={"PATH": "/bin"})
    r = Sandbox(spec).run(["/bin/sh", "-c", "cat /etc/motd; echo changed > /etc/motd; ls /bin/sh"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == ["from the top layer", "/bin/sh"]
    assert [(c.path, c.kind) for c in r.changes] == [("/etc/motd", "modified")]
    with open(os.path.join(top.path(), "etc", "motd")) as f:
        assert f.read() == "from the top layer\n"  # the cached layer is unchanged
    with pytest.raises(Exception) as exc:
        Spec(root=str(busybox_root), layers=[top])
    assert "root (a directory) or layers" in str(exc.value)
