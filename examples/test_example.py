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
def test_host_root_is_read_only():
    with pytest.raises(OSError) as exc:
        open("/etc/written-by-a-test", "w")
    assert exc.value.errno == 30  # EROFS


@pytest.mark.incarnate
def test_tmp_path_is_writable(tmp_path):
    (tmp_path / "result.txt").write_text("ok")
    assert (tmp_path / "result.txt").read_text() == "ok"


def test_subprocess_in_an_incarnation(incarnation):
    r = incarnation.run(["sh", "-c", "echo $$; hostname"])
    assert r.stdout.split() == [b"2", b"incarnate"]
    assert subprocess.run(["true"]).returncode == 0
