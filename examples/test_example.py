"""A few tests that would touch the machine without pytest-incarnate."""

import os
import socket
import subprocess

import pytest


@pytest.mark.incarnate(hostname="example")
def test_runs_as_pid_2_with_its_own_hostname():
    assert os.getpid() == 2
    assert socket.gethostname() == "example"


@pytest.mark.incarnate
def test_can_bind_any_port_without_clashing():
    # A fresh network namespace: port 80 on loopback is ours alone.
    s = socket.socket()
    s.bind(("127.0.0.1", 80))
    s.close()


@pytest.mark.incarnate
def test_writes_to_etc_never_reach_the_host():
    # The root is the host's, copy-on-write: this lands in the sandbox's upper layer.
    with open("/etc/written-by-a-test", "w") as f:
        f.write("gone after the test")
    assert open("/etc/written-by-a-test").read() == "gone after the test"


def test_the_host_is_unchanged_after():
    assert not os.path.exists("/etc/written-by-a-test")


@pytest.mark.incarnate
def test_tmp_path_is_writable(tmp_path):
    (tmp_path / "result.txt").write_text("ok")
    assert (tmp_path / "result.txt").read_text() == "ok"


def test_subprocess_in_an_incarnation(incarnation):
    r = incarnation.run(["sh", "-c", "echo $$; hostname"])
    assert r.stdout.split() == [b"2", b"incarnate"]
    assert subprocess.run(["true"]).returncode == 0
