"""Ways out of the sandbox that must stay shut, each tried for real (and, where it can be,
tried once outside the sandbox too, to show that the attempt itself works)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from pytest_incarnate import Sandbox, Spec

PY = sys.executable
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="the root caller's sandbox is what is tried here")


def _sysctl(name: str) -> str:
    with open("/proc/sys/" + name.replace(".", "/")) as f:
        return f.read().strip()


@needs_root
@pytest.mark.parametrize("copy_on_write", [True, False])
def test_host_sysctls_cannot_be_written(leak_check, copy_on_write: bool) -> None:
    """Root inside is host uid 0 (the identity map), and /proc/sys checks the uid only: it
    is read-only inside, and the read-only mount cannot be made read-write."""
    before = _sysctl("vm.swappiness")
    other = "61" if before != "61" else "62"
    script = (f"echo {other} > /proc/sys/vm/swappiness; echo write=$?; "
              "mount -o remount,bind,rw /proc/sys; echo remount=$?; "
              "umount -l /proc/sys; echo umount=$?; "
              f"echo {other} > /proc/sys/vm/swappiness; echo again=$?")
    r = Sandbox(Spec(copy_on_write=copy_on_write)).run(["sh", "-c", script])
    assert r.returncode == 0, r.stderr
    lines = dict(line.split("=") for line in r.stdout.decode().split())
    assert lines["write"] != "0" and lines["remount"] != "0" and lines["umount"] != "0" and lines["again"] != "0"
    assert b"Read-only file system" in r.stderr
    assert _sysctl("vm.swappiness") == before


@pytest.mark.parametrize("copy_on_write", [True, False])
def test_read_only_root_cannot_be_remounted_or_unmounted(leak_check, tmp_path, copy_on_write: bool) -> None:
    """The mounts that make the root are locked: a read-only root stays read-only, and what
    covers the host cannot be unmounted to reach it."""
    sentinel = tmp_path / "sentinel"
    script = (f"mount -o remount,bind,rw /; echo remount=$?; umount -l /; echo umount=$?; "
              f"touch {sentinel}; echo touch=$?")
    r = Sandbox(Spec(copy_on_write=copy_on_write)).run(["sh", "-c", script])
    assert r.returncode == 0, r.stderr
    lines = dict(line.split("=") for line in r.stdout.decode().split())
    assert lines["umount"] != "0"
    if not copy_on_write:
        assert lines["remount"] != "0", r.stderr  # (the copy-on-write root is writable anyway)
    assert not sentinel.exists()  # written copy-on-write (gone with the sandbox), or refused


@pytest.fixture
def run_lock() -> None:
    from pytest_incarnate.cgroups import Run

    Run.current()  # held for the process's lifetime: opened before leak_check counts fds


@needs_root
def test_no_descriptor_to_the_host_cgroups(run_lock, leak_check) -> None:
    """A sandboxed call with limits holds no fd into the cgroup filesystem (from one to its
    v2 directory, the host's root cgroup.procs is a few '..' away)."""

    def cgroup_fds() -> list[str]:
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if "cgroup" in target:
                out.append(f"{fd} -> {target}")
        return out

    assert Sandbox(Spec(memory="256M", pids=64)).call(cgroup_fds) == []


def test_env_of_the_spec_applies_to_a_call(leak_check) -> None:
    env = Sandbox(Spec(env={"ONLY": "this"})).call(lambda: dict(os.environ))
    assert env == {"ONLY": "this"}


TIOCSTI_CHILD = textwrap.dedent(
    """
    import fcntl, json, os, sys, termios
    from pytest_incarnate import Sandbox

    # This process: a session leader whose controlling terminal is the pty on fd 0.
    def push():
        try:
            fcntl.ioctl(0, termios.TIOCSTI, b"x")
            return "pushed"
        except OSError as e:
            return os.strerror(e.errno)

    def dev_tty():
        try:
            os.close(os.open("/dev/tty", os.O_RDWR))
            return "opened"
        except OSError as e:
            return os.strerror(e.errno)

    out = {"outside": push(), "inside": Sandbox().call(push), "dev_tty": Sandbox().call(dev_tty)}
    print(json.dumps(out))
    """
)


def test_tiocsti_cannot_push_input_into_the_callers_terminal(tmp_path, leak_check) -> None:
    """The sandboxed call runs in a session of its own: the caller's terminal is not its
    controlling terminal, so TIOCSTI is refused and /dev/tty cannot be opened."""
    import json
    import pty

    legacy = "/proc/sys/dev/tty/legacy_tiocsti"
    if os.path.exists(legacy) and open(legacy).read().strip() == "0" and not ROOT:
        pytest.skip("TIOCSTI is disabled on this machine (dev.tty.legacy_tiocsti = 0)")
    script = tmp_path / "tiocsti.py"
    script.write_text(TIOCSTI_CHILD)
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([PY, str(script)], stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              start_new_session=True, timeout=60,
                              preexec_fn=lambda: __import__("fcntl").ioctl(0, __import__("termios").TIOCSCTTY, 0))
    finally:
        os.close(slave)
        os.close(master)
    assert proc.returncode == 0, proc.stderr.decode()
    got = json.loads(proc.stdout)
    assert got["outside"] == "pushed"  # the attempt works where it is allowed
    assert got["inside"] == os.strerror(errno.EPERM)
    assert got["dev_tty"] == os.strerror(errno.ENXIO)
