"""The sandbox as an unprivileged user (uid 65534, nobody): everything goes through a user
namespace with the one-line id map "0 65534 1" (or "65534 65534 1") and setgroups
denied.

The pyenv Python lives under /root (mode 700), out of nobody's reach, so the script runs
with Debian's /usr/bin/python3 (which has cffi from python3-cffi) on a copy of the
package -- the abi3 extension included -- in a world-readable directory under /var/tmp.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile

import pytest

import pytest_incarnate

SYSTEM_PY = "/usr/bin/python3"
UID = GID = 65534
NOT_USER = ["mount", "pid", "net", "uts", "ipc", "cgroup"]

SCRIPT = r'''
import errno, json, os, socket, sys
import pytest_incarnate
from pytest_incarnate import Sandbox, Spec, probe
from pytest_incarnate import errors

# These scenarios are about namespaces; the copy-on-write root (which needs real root with
# CAP_SYS_ADMIN, and so degrades in most of them) is covered by test_rootfs.py.
_Spec = Spec
def Spec(**kw):
    kw.setdefault("copy_on_write", False)
    return _Spec(**kw)

OUT = {"package": pytest_incarnate.__file__, "python": sys.executable}

def record(name, fn):
    try:
        OUT[name] = {"ok": fn()}
    except Exception as e:
        OUT[name] = {
            "exc": type(e).__name__,
            "bases": [c.__name__ for c in type(e).__mro__],
            "message": str(e),
            **{k: getattr(e, k, None) for k in ("ns", "reason", "fix", "errno", "step", "path")},
        }

def write_error(path):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        return errno.errorcode[e.errno]
    os.close(fd)
    os.unlink(path)
    return "ok"

def facts():
    status = open("/proc/self/status").read()
    return {
        "uid": os.getuid(), "gid": os.getgid(), "euid": os.geteuid(),
        "uid_map": open("/proc/self/uid_map").read().split(),
        "gid_map": open("/proc/self/gid_map").read().split(),
        "setgroups": open("/proc/self/setgroups").read().strip(),
        "userns": os.readlink("/proc/self/ns/user"),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "cap_sys_admin": bool(int(status.split("CapEff:")[1].split()[0], 16) >> 21 & 1),
        "etc_write": write_error("/etc/incarnate-unprivileged-probe"),
        "tmp_write": write_error("/tmp/incarnate-unprivileged-probe"),
        "parent_uid_map": parent_uid_map(),
        "remount_rw": remount_rw("/"),
        "umount_root": umount("/"),
    }

def parent_uid_map():
    """The map of the user namespace that owns this one (the one the mounts were made in)."""
    import ctypes, fcntl
    NS_GET_PARENT = 0xB702
    try:
        fd = os.open("/proc/self/ns/user", os.O_RDONLY)
        parent = fcntl.ioctl(fd, NS_GET_PARENT)
        os.close(fd)
        os.close(parent)
        return "has a parent user namespace"
    except OSError as e:
        return errno.errorcode[e.errno]

def _libc():
    import ctypes
    return ctypes.CDLL(None, use_errno=True)

def remount_rw(path):
    import ctypes
    MS_REMOUNT, MS_BIND = 32, 4096
    if _libc().mount(None, path.encode(), None, MS_REMOUNT | MS_BIND, None) == 0:
        return "ok"
    return errno.errorcode[ctypes.get_errno()]

def umount(path):
    import ctypes
    MNT_DETACH = 2
    if _libc().umount2(path.encode(), MNT_DETACH) == 0:
        return "ok"
    return errno.errorcode[ctypes.get_errno()]

def run(spec, argv):
    r = Sandbox(spec).run(argv)
    return {"returncode": r.returncode, "stdout": r.stdout.decode(), "stderr": r.stderr.decode(),
            "namespaces": list(r.namespaces),
            "degradations": [[type(d).__name__, getattr(d, "ns", None), d.reason] for d in r.degradations]}

OUT["outside"] = {k: v for k, v in facts().items() if k not in ("etc_write", "tmp_write")}
OUT["caps"] = {c.name: {"granted": c.granted, "via": c.via, "reason": c.reason} for c in probe(refresh=True)}

def plan():
    p = Sandbox(Spec()).plan()
    return {"namespaces": list(p.namespaces), "uid_map": p.uid_map, "gid_map": p.gid_map,
            "setgroups_deny": p.setgroups_deny, "degradations": len(p.degradations)}

record("plan", plan)
record("call_root", lambda: Sandbox(Spec()).call(facts))
record("call_self", lambda: Sandbox(Spec(map_user="self")).call(facts))
record("run_hostname", lambda: run(Spec(hostname="unpriv-box"), ["hostname"]))
record("run_id", lambda: run(Spec(), ["sh", "-c", "id -u; id -g; cat /proc/self/uid_map"]))
record("run_self", lambda: run(Spec(map_user="self"), ["sh", "-c", "id -u; grep CapEff /proc/self/status"]))
record("call_value", lambda: Sandbox(Spec()).call(
    lambda a, b=0: {"sum": a + b, "list": [a, b], "uid": os.getuid()}, 40, b=2))
record("call_raises", lambda: Sandbox(Spec()).call(lambda: 1 // 0))
record("loose_mount_uts", lambda: run(Spec(namespaces={"mount", "uts"}), ["hostname"]))
record("strict_mount_uts", lambda: run(Spec(namespaces={"mount", "uts"}, strict=True), ["hostname"]))
missing = os.path.join(os.getcwd(), "no-such-source")
record("bind_missing_call", lambda: Sandbox(Spec(binds=[missing])).call(os.getpid))
record("bind_missing_run", lambda: run(Spec(binds=[missing]), ["/bin/true"]))

def direct_sequence():
    """The plugin's per-test path (reap_later) several times, a program between the calls:
    for a caller that is not root, a direct init is reaped at once, so its memory is
    dumpable again before the next sandbox writes its id maps."""
    import ctypes
    from pytest_incarnate import _ffi, sandbox as sbm
    values = []
    for _ in range(5):
        values.append(sbm.forked_enter(Sandbox(Spec()), os.getpid, reap_later=True).value)
        values.append(Sandbox(Spec()).run(["/bin/true"]).returncode)
    return {"values": values, "direct": _ffi.direct_available(), "live": _ffi.direct_live(),
            "dumpable": ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)}

record("direct_sequence", direct_sequence)
print(json.dumps(OUT))
'''


def _system_python_problem() -> str | None:
    if not os.access(SYSTEM_PY, os.X_OK):
        return f"{SYSTEM_PY} is not installed"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    probe = subprocess.run([SYSTEM_PY, "-c", "import cffi, _cffi_backend"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"{SYSTEM_PY} has no cffi (apt-get install python3-cffi): {probe.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(scope="module")
def unprivileged():
    """Run SCRIPT as uid/gid 65534 on a world-readable copy of the package; its JSON."""
    if os.geteuid() != 0:
        pytest.skip("switching to uid 65534 needs root")
    problem = _system_python_problem()
    if problem:
        pytest.skip(problem)
    src = os.path.dirname(os.path.abspath(pytest_incarnate.__file__))
    assert any(n.startswith("_native") and n.endswith(".so") for n in os.listdir(src)), "the C core is not built"
    top = tempfile.mkdtemp(prefix="incarnate-unpriv-", dir="/var/tmp")
    try:
        os.chmod(top, 0o755)
        shutil.copytree(src, os.path.join(top, "pytest_incarnate"), ignore=shutil.ignore_patterns("__pycache__"))
        script = os.path.join(top, "script.py")
        with open(script, "w") as f:
            f.write(SCRIPT)
        for dirpath, _dirnames, filenames in os.walk(top):
            os.chmod(dirpath, 0o755)
            for n in filenames:
                p = os.path.join(dirpath, n)
                os.chmod(p, stat.S_IMODE(os.stat(p).st_mode) | 0o444)
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "PYTHONPATH": top,
            "PYTHONDONTWRITEBYTECODE": "1",
            "LANG": "C.UTF-8",
        }
        proc = subprocess.run(
            ["setpriv", f"--reuid={UID}", f"--regid={GID}", "--clear-groups", SYSTEM_PY, script],
            capture_output=True, text=True, timeout=120, cwd=top, env=env,
        )
        assert proc.returncode == 0, f"unprivileged script failed:\n{proc.stdout}\n{proc.stderr}"
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        # Nothing was written into the copy (no bytecode, nothing from inside the sandbox).
        out["left_in_top"] = sorted(os.listdir(top))
        out["top"] = top
        return out
    finally:
        shutil.rmtree(top)


def test_runs_unprivileged_on_the_copy(unprivileged):
    assert unprivileged["python"] == SYSTEM_PY
    assert unprivileged["package"].startswith(unprivileged["top"] + "/pytest_incarnate/")
    outside = unprivileged["outside"]
    assert (outside["uid"], outside["euid"], outside["gid"]) == (UID, UID, GID)
    assert not outside["cap_sys_admin"]
    assert unprivileged["left_in_top"] == ["pytest_incarnate", "script.py"]


def test_probe_grants_everything_through_the_user_namespace(unprivileged):
    caps = unprivileged["caps"]
    if not caps["ns.user"]["granted"]:
        pytest.skip(f"unprivileged user namespaces are not available here: {caps['ns.user']['reason']}")
    assert caps["ns.user"]["via"] == "userns"
    for ns in NOT_USER:
        assert caps[f"ns.{ns}"] == {"granted": True, "via": "userns", "reason": ""}, ns
    for name in ("pivot_root", "overlay", "proc"):
        assert caps[name]["granted"], (name, caps[name])
    plan = unprivileged["plan"]["ok"]
    assert plan == {
        "namespaces": ["user"] + NOT_USER,
        "uid_map": f"0 {UID} 1",
        "gid_map": f"0 {GID} 1",
        "setgroups_deny": True,
        "degradations": 0,
    }


def test_call_as_mapped_root(unprivileged):
    outside = unprivileged["outside"]
    inside = unprivileged["call_root"]["ok"]
    assert (inside["uid"], inside["gid"], inside["euid"]) == (0, 0, 0)
    # A nested user namespace locks the mounts made in the outer one (which maps 0 to UID):
    # the payload's map is 0 -> the outer 0.
    assert inside["uid_map"] == ["0", "0", "1"]
    assert inside["gid_map"] == ["0", "0", "1"]
    assert inside["remount_rw"] == "EPERM" and inside["umount_root"] in ("EPERM", "EINVAL")
    assert inside["setgroups"] == "deny"
    assert inside["userns"] != outside["userns"]
    assert inside["cap_sys_admin"]  # over the new user namespace only
    assert inside["hostname"] == "incarnate" != socket.gethostname()
    assert inside["pid"] == 2 and inside["pids"] == [1, 2]
    assert inside["etc_write"] == "EROFS"
    assert inside["tmp_write"] == "ok"  # the Spec's own tmpfs on /tmp is writable


def test_call_keeping_own_ids(unprivileged):
    inside = unprivileged["call_self"]["ok"]
    assert (inside["uid"], inside["gid"]) == (UID, GID)
    assert inside["uid_map"] == [str(UID), str(UID), "1"]
    assert inside["gid_map"] == [str(GID), str(GID), "1"]
    assert inside["remount_rw"] == "EPERM"
    assert inside["setgroups"] == "deny"
    # No exec happens in a call, so the forked process keeps the capabilities it got
    # over the new user namespace even though its uid is not 0 there (see run_self for
    # an exec'd program, which loses them); not asserted either way here.
    assert inside["pids"] == [1, 2]
    assert inside["etc_write"] == "EROFS"


def test_run_programs(unprivileged):
    r = unprivileged["run_hostname"]["ok"]
    assert r["returncode"] == 0 and r["stdout"] == "unpriv-box\n"
    assert r["namespaces"] == ["user"] + NOT_USER and r["degradations"] == []
    r = unprivileged["run_id"]["ok"]
    assert r["returncode"] == 0, r["stderr"]
    assert r["stdout"].split() == ["0", "0", "0", "0", "1"]  # nested: 0 -> the outer 0 (UID)
    # map_user="self": the exec'd program is uid 65534 inside, so execve leaves it no
    # capabilities at all.
    r = unprivileged["run_self"]["ok"]
    assert r["returncode"] == 0, r["stderr"]
    assert r["stdout"].split() == [str(UID), "CapEff:", "0000000000000000"]


def test_call_returns_values_and_raises(unprivileged):
    assert unprivileged["call_value"]["ok"] == {"sum": 42, "list": [40, 2], "uid": 0}
    err = unprivileged["call_raises"]
    assert err["exc"] == "ZeroDivisionError"


def test_spec_without_user_degrades(unprivileged):
    outside = unprivileged["outside"]
    r = unprivileged["loose_mount_uts"]["ok"]
    assert r["returncode"] == 0
    assert r["namespaces"] == []
    assert r["stdout"] == outside["hostname"] + "\n"
    assert [d[:2] for d in r["degradations"]] == [["NamespaceSkipped", "mount"], ["NamespaceSkipped", "uts"]]
    for _, _, reason in r["degradations"]:
        assert "CAP_SYS_ADMIN" in reason
    err = unprivileged["strict_mount_uts"]
    assert err.get("exc") == "NamespaceCapMissing", err
    assert err["ns"] == "mount" and "CAP_SYS_ADMIN" in err["reason"] and "user" in err["fix"]


def test_bind_of_missing_source(unprivileged):
    missing = unprivileged["top"] + "/no-such-source"
    for key in ("bind_missing_call", "bind_missing_run"):
        err = unprivileged[key]
        assert err.get("exc") == "SetupStepFailed", (key, err)
        assert "OSError" in err["bases"]
        assert err["step"] == "bind", key
        assert err["errno"] == errno.ENOENT, key
        assert err["path"] == missing, key
        assert "ENOENT" in err["message"] and missing in err["message"]


def test_calls_in_a_row_and_programs_between_them(unprivileged):
    seq = unprivileged["direct_sequence"]
    assert "ok" in seq, seq
    seq = seq["ok"]
    assert seq["values"] == [2, 0] * 5
    assert seq["direct"] is True   # x86_64 or aarch64: the direct path was the one taken
    assert seq["live"] == 0 and seq["dumpable"] == 1
