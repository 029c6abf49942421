"""tmp_path, monkeypatch, files written under the rootdir and /tmp, the environment.

A sandboxed test's writes outside tmp_path do not reach the host (copy-on-write root, /tmp a
scratch tmpfs), so no test here depends on another test's files: each writes, reads back and
cleans up after itself.  The same goes for memory: a test body runs in a forked child, so what
it changes (a module global, a fixture's object) is gone for later tests and for teardown.
"""

# ruff: noqa: PLR0133  (failing on purpose: the failures are what is compared)

import os
import socket
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MODULE_VALUE = {"answer": 42}


def test_probe_pid():
    # Read back by the parity test: the pid inside a sandbox is 2, outside it is not.
    print(f"pid={os.getpid()} host={socket.gethostname()}")


def test_tmp_path_write_read(tmp_path):
    target = tmp_path / "data.txt"
    target.write_text("content\n")
    assert target.read_text() == "content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt"]


def test_tmp_path_write_fail(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_text("beta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "c.txt"]


def test_tmp_path_subdirs(tmp_path):
    nested = tmp_path / "x" / "y" / "z"
    nested.mkdir(parents=True)
    (nested / "leaf").write_bytes(b"\x00\x01")
    assert (tmp_path / "x" / "y" / "z" / "leaf").stat().st_size == 2


def test_tmpdir_legacy(tmpdir):
    f = tmpdir.join("legacy.txt")
    f.write("legacy")
    assert f.read() == "legacy"


def test_tmp_path_factory(tmp_path_factory):
    d = tmp_path_factory.mktemp("factory")
    (d / "f").write_text("made by the factory")
    assert (d / "f").read_text() == "made by the factory"


def test_write_under_rootdir():
    target = HERE / f"parity-scratch-{os.getpid()}.txt"
    try:
        target.write_text("written under the rootdir")
        assert target.read_text() == "written under the rootdir"
    finally:
        target.unlink(missing_ok=True)


def test_write_under_tmp():
    target = Path("/tmp") / f"parity-scratch-{os.getpid()}"
    try:
        target.write_text("written under /tmp")
        assert target.read_text() == "written under /tmp"
    finally:
        target.unlink(missing_ok=True)


def test_write_under_tmp_fail():
    target = Path("/tmp") / f"parity-scratch-fail-{os.getpid()}"
    try:
        target.write_text("one")
        assert target.read_text() == "two"
    finally:
        target.unlink(missing_ok=True)


def test_read_own_source():
    assert "test_read_own_source" in Path(__file__).read_text()


def test_cwd_is_rootdir():
    assert Path.cwd() == HERE


def test_monkeypatch_setenv(monkeypatch):
    monkeypatch.setenv("PARITY_VAR", "set")
    assert os.environ["PARITY_VAR"] == "set"


def test_monkeypatch_delenv(monkeypatch):
    monkeypatch.setenv("PARITY_GONE", "x")
    monkeypatch.delenv("PARITY_GONE")
    assert "PARITY_GONE" not in os.environ


def test_monkeypatch_setattr(monkeypatch):
    monkeypatch.setattr(os.path, "exists", lambda p: "patched")
    assert os.path.exists("/nowhere") == "patched"


def test_monkeypatch_setitem_fail(monkeypatch):
    monkeypatch.setitem(MODULE_VALUE, "answer", 41)
    assert MODULE_VALUE == {"answer": 42}


def test_monkeypatch_chdir(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert Path.cwd() == tmp_path


def test_monkeypatch_syspath(monkeypatch, tmp_path):
    (tmp_path / "parity_injected_mod.py").write_text("VALUE = 'injected'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import parity_injected_mod

    assert parity_injected_mod.VALUE == "injected"


@pytest.fixture
def patched_env(monkeypatch):
    monkeypatch.setenv("PARITY_FROM_FIXTURE", "fixture")
    return "fixture"


def test_monkeypatch_in_fixture(patched_env):
    assert os.environ.get("PARITY_FROM_FIXTURE") == patched_env


def test_env_unpatched():
    assert "PARITY_VAR" not in os.environ
    assert "PARITY_FROM_FIXTURE" not in os.environ


def test_module_global_unchanged():
    assert MODULE_VALUE == {"answer": 42}


def test_sys_argv_is_a_list():
    assert isinstance(sys.argv, list)


def test_record_property(record_property):
    record_property("parity_key", "parity value")


def test_record_property_fail(record_property):
    record_property("parity_failing", 1)
    assert 1 == 2


def test_subprocess_echo():
    import subprocess

    out = subprocess.run(["echo", "from a child"], capture_output=True, text=True, check=True)
    assert out.stdout == "from a child\n"


def test_subprocess_fail():
    import subprocess

    subprocess.run(["sh", "-c", "exit 7"], check=True)
