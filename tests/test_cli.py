"""The ``pytest-incarnate`` command: probe exit codes and output, run's isolation and status."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "pytest_incarnate.cli"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60)


def test_probe_text_and_json() -> None:
    r = cli("probe")
    assert r.returncode == 0, r.stderr
    assert "ns.user: yes" in r.stdout
    j = cli("probe", "--json")
    data = json.loads(j.stdout)
    assert data["capabilities"]["ns.mount"]["granted"] is True
    assert data["missing"] == []


def test_probe_require_exit_codes() -> None:
    assert cli("probe", "--require", "ns.user,ns.mount", "--require", "overlay").returncode == 0
    unknown = cli("probe", "--require", "ns.bogus")
    assert unknown.returncode == 2
    assert "unknown capability ns.bogus" in unknown.stderr


def test_probe_require_missing_exits_3_with_the_reason() -> None:
    # Take CAP_SYS_ADMIN away for real and forbid user namespaces: ns.mount is missing.
    script = "echo 0 > /proc/sys/user/max_user_namespaces && exec setpriv --inh-caps=-sys_admin " \
             "--bounding-set=-sys_admin " + " ".join(CLI) + " probe --require ns.mount,ns.user"
    r = subprocess.run(["unshare", "-Ur", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "missing required: ns.mount, ns.user" in r.stderr
    assert "user.max_user_namespaces is 0" in r.stdout


def test_run_isolates_and_returns_the_status() -> None:
    r = cli("run", "--hostname", "cli-box", "--", "sh", "-c", "hostname; echo $$; exit 5")
    assert r.returncode == 5
    assert r.stdout.split() == ["cli-box", "2"]
    assert socket.gethostname() != "cli-box"
    killed = cli("run", "--", "sh", "-c", "kill -TERM $$")
    assert killed.returncode == 128 + 15


@pytest.mark.parametrize("args", [("run", "--", "/no/such/cmd"), ("run", "--bind", "/no/such:/tmp/x", "--", "true")])
def test_run_setup_failure_exits_125(args: tuple[str, ...]) -> None:
    r = cli(*args)
    assert r.returncode == 125
    assert "pytest-incarnate run:" in r.stderr and "ENOENT" in r.stderr


def test_sweep_and_run_with_limits() -> None:
    r = cli("sweep")
    assert r.returncode == 0 and "of dead runs removed" in r.stdout
    oom = cli("run", "--memory", "64M", "--", sys.executable, "-c", "x = bytearray(200 * 1024 * 1024)")
    assert oom.returncode == 128 + 9
    assert "OOM-killed: limit 64 MiB" in oom.stderr


@pytest.mark.parametrize(("args", "named"), [(("--bind", "rel"), "binds.source"), (("--ns", "usr"), "namespaces"),
                                             (("--share", "usr"), "--share"), (("--rlimit", "nofile"), "--rlimit"),
                                             (("--rlimit", "nofiles=3"), "rlimits"), (("--umask", "9x"), "--umask"),
                                             (("--memory", "lots"), "memory"), (("--tmpfs", "rel"), "tmpfs"),
                                             (("--cpus", "a-b"), "cpus"), (("--root", "/no/such/dir"), "/no/such/dir")])
def test_run_bad_flags_exit_2_naming_them(args: tuple[str, ...], named: str) -> None:
    r = cli("run", *args, "--", "true")
    assert r.returncode == 2
    assert named in r.stderr


def test_run_spec_flags_reach_the_payload(tmp_path) -> None:
    """The Spec's fields as flags: environment, rlimits, umask, an extra tmpfs, uid; the JSON
    result lists what the command wrote (copy-on-write: not on the host)."""
    out = tmp_path / "result.json"
    script = "echo $A-$B; ulimit -n; umask; id -u; touch /etc/cli-flag-test; df -k /scratch | tail -1"
    r = cli("run", "--clearenv", "--setenv", "A", "1", "--setenv", "B", "2", "--rlimit", "nofile=64", "--umask", "077",
            "--tmpfs", "/scratch:1m", "--json", str(out), "--", "/bin/sh", "-c", script)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:4] == ["1-2", "64", "0077", "0"]
    assert lines[4].split()[1] == "1024"  # a 1 MiB tmpfs
    assert not os.path.exists("/etc/cli-flag-test")
    doc = json.loads(out.read_text())
    assert doc["status"] == 0 and {"path": "/etc/cli-flag-test", "kind": "created"} in doc["changes"]
    assert "net" in doc["namespaces"] and doc["degradations"] == []
    r = cli("run", "--uid", "1000", "--gid", "1000", "--read-only-root", "--", "sh", "-c", "id -u; touch /etc/x")
    assert r.returncode == 1 and r.stdout.split() == ["1000"] and "Read-only file system" in r.stderr


def test_run_timeout_kills_the_sandbox_and_exits_124() -> None:
    r = cli("run", "--timeout", "0.5", "--", "sh", "-c", "sleep 100 & sleep 100")
    assert r.returncode == 124
    assert "timed out after 0.5 s" in r.stderr
