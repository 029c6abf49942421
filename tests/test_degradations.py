"""Degradations made for real: each scenario runs a script in its own process whose
privileges were really reduced (a user namespace whose nested-userns limit is 0, a
bounding set without CAP_SYS_ADMIN, both), and the script prints what the probe, the
plan and the sandbox did as JSON.

No mocks: the probe's trials, the clones and the setup steps all hit the kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

PY = sys.executable
ALL = ["user", "mount", "pid", "net", "uts", "ipc", "cgroup"]
NOT_USER = [ns for ns in ALL if ns != "user"]

# Runs as the first lines of every scenario script.  ``record`` turns an outcome or a
# typed error into JSON; ``facts`` runs inside a sandbox (via Sandbox.call).
PRELUDE = r'''
import ctypes, errno, json, os, socket, sys
from pytest_incarnate import Overlay, Sandbox, Spec, probe
from pytest_incarnate import errors

# These scenarios are about namespaces; the copy-on-write root (which needs real root with
# CAP_SYS_ADMIN, and so degrades in most of them) is covered by test_rootfs.py.
_Spec = Spec
def Spec(**kw):
    kw.setdefault("copy_on_write", False)
    return _Spec(**kw)

OUT = {}

def record(name, fn):
    try:
        OUT[name] = {"ok": fn()}
    except errors.IncarnateError as e:
        OUT[name] = {
            "exc": type(e).__name__,
            "bases": [c.__name__ for c in type(e).__mro__],
            "message": str(e),
            **{k: getattr(e, k, None) for k in ("ns", "reason", "fix", "sysctl", "value", "errno", "step")},
        }

def run(spec, argv):
    r = Sandbox(spec).run(argv)
    return {
        "returncode": r.returncode,
        "stdout": r.stdout.decode(),
        "stderr": r.stderr.decode(),
        "namespaces": list(r.namespaces),
        "degradations": [[type(d).__name__, getattr(d, "ns", None), d.reason] for d in r.degradations],
    }

def caps():
    return {c.name: {"granted": c.granted, "via": c.via, "reason": c.reason, "fix": c.fix}
            for c in probe(refresh=True)}

def facts():
    """What a process sees; nothing here writes anywhere."""
    return {
        "uid": os.getuid(),
        "uid_map": open("/proc/self/uid_map").read().split(),
        "userns": os.readlink("/proc/self/ns/user"),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "root_readonly": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
        "cap_sys_admin": bool(int(open("/proc/self/status").read().split("CapEff:")[1].split()[0], 16) >> 21 & 1),
    }

def sysctl(value=None):
    path = "/proc/sys/user/max_user_namespaces"
    if value is not None:
        with open(path, "w") as f:
            f.write(str(value))
    with open(path) as f:
        return f.read().strip()

OUT["outside"] = facts()
OUT["max_user_namespaces"] = sysctl()
'''

EPILOGUE = "\nprint(json.dumps(OUT))\n"

UNSHARE_ZERO_USERNS = ["unshare", "--user", "--map-root-user", "sh", "-c",
                       'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"]
DROP_SYS_ADMIN = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin"]


def _require(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} (util-linux) is not installed")


def scenario(tmp_path, name: str, body: str, wrapper: list[str]) -> dict:
    """Write PRELUDE + body to a script, run it under ``wrapper`` with this Python, and
    return its JSON.  The script and everything it runs end before this returns."""
    script = tmp_path / f"{name}.py"
    script.write_text(PRELUDE + textwrap.dedent(body) + EPILOGUE)
    proc = subprocess.run(
        wrapper + [PY, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"cannot create the outer user namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"scenario {name} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- a. max_user_namespaces=0


@pytest.fixture(scope="module")
def zero_userns(tmp_path_factory):
    """Inside an outer user namespace (we are its mapped root, uid map "0 0 1") whose
    user.max_user_namespaces is 0: no nested user namespace can be created, but every
    other namespace can, with the outer namespace's capabilities."""
    _require("unshare")
    tmp = tmp_path_factory.mktemp("zero-userns")
    for d in ("l1", "l2", "u", "w", "m"):
        (tmp / d).mkdir()
    (tmp / "l1" / "a").write_text("from l1\n")
    (tmp / "l2" / "b").write_text("from l2\n")
    body = f'''
    OUT["caps"] = caps()
    record("strict_all", lambda: run(Spec(strict=True), ["/bin/true"]))
    record("strict_user_only", lambda: run(Spec(namespaces={{"user"}}, strict=True), ["/bin/true"]))
    record("loose_user_only", lambda: run(Spec(namespaces={{"user"}}), ["/bin/true"]))
    record("loose_all", lambda: run(Spec(hostname="degraded"), ["hostname"]))
    record("strict_without_user", lambda: run(Spec(namespaces={NOT_USER!r}, strict=True), ["hostname"]))
    record("call_loose_all", lambda: Sandbox(Spec(hostname="called")).call(facts))
    ovl = Overlay("{tmp}/m", ["{tmp}/l1", "{tmp}/l2"], "{tmp}/u", "{tmp}/w")
    record("overlay", lambda: run(Spec(overlays=[ovl], tmpfs=[]),
                                  ["sh", "-c", "cat {tmp}/m/a {tmp}/m/b && echo new > {tmp}/m/c"]))
    '''
    out = scenario(tmp, "zero_userns", body, UNSHARE_ZERO_USERNS)
    out["tmp"] = str(tmp)
    return out


def test_zero_userns_precondition(zero_userns):
    # The limit really is 0 where the script runs, and the script is the outer userns's
    # root: uid 0, mapped to the host's uid 0 only, with CAP_SYS_ADMIN over that userns.
    assert zero_userns["max_user_namespaces"] == "0"
    outside = zero_userns["outside"]
    assert outside["uid"] == 0 and outside["uid_map"] == ["0", "0", "1"]
    assert outside["cap_sys_admin"]


def test_zero_userns_probe_names_the_sysctl(zero_userns):
    caps = zero_userns["caps"]
    user = caps["ns.user"]
    assert not user["granted"]
    assert "user.max_user_namespaces" in user["reason"] and "0" in user["reason"]
    assert "user.max_user_namespaces" in user["fix"]
    # The other namespaces are created directly: the outer userns owns them, and we
    # hold CAP_SYS_ADMIN in it.  Nothing needs a nested user namespace.
    for ns in NOT_USER:
        assert caps[f"ns.{ns}"] == {"granted": True, "via": "direct", "reason": "", "fix": ""}, ns


def test_zero_userns_strict_raises_the_sysctl_error(zero_userns):
    for key in ("strict_all", "strict_user_only"):
        err = zero_userns[key]
        assert err.get("exc") == "UserNsDisabledBySysctl", err
        assert "NamespaceCapMissing" in err["bases"]
        assert err["ns"] == "user"
        assert err["sysctl"] == "user.max_user_namespaces" and err["value"] == "0"
        assert "user.max_user_namespaces is 0" in err["message"]
        assert err["fix"] == "sysctl -w user.max_user_namespaces=10000"


def test_zero_userns_loose_skips_only_the_user_namespace(zero_userns):
    only = zero_userns["loose_user_only"]["ok"]
    assert only["returncode"] == 0
    assert only["namespaces"] == []
    assert len(only["degradations"]) == 1
    kind, ns, reason = only["degradations"][0]
    assert (kind, ns) == ("NamespaceSkipped", "user")
    assert "user.max_user_namespaces is 0" in reason

    full = zero_userns["loose_all"]["ok"]
    assert full["returncode"] == 0, full["stderr"]
    assert full["stdout"] == "degraded\n"  # the uts namespace was still had
    assert full["namespaces"] == NOT_USER
    assert [d[:2] for d in full["degradations"]] == [["NamespaceSkipped", "user"]]


def test_zero_userns_strict_without_user_is_fine(zero_userns):
    # Not asking for a user namespace: nothing is missing, strict or not.
    r = zero_userns["strict_without_user"]["ok"]
    assert r["returncode"] == 0 and r["stdout"] == "incarnate\n"
    assert r["namespaces"] == NOT_USER and r["degradations"] == []


def test_zero_userns_call_is_isolated_except_for_identity(zero_userns):
    outside = zero_userns["outside"]
    inside = zero_userns["call_loose_all"]["ok"]
    assert inside["hostname"] == "called" != outside["hostname"]
    # pid namespace and a fresh /proc (mounted by the outer userns's root): only the
    # init and the call.
    assert inside["pid"] == 2 and inside["pids"] == [1, 2]
    # pivot_root onto the read-only view of / happened without a user namespace.
    assert inside["root_readonly"] and not outside["root_readonly"]
    # What degraded is the identity: the call is in the outer user namespace, with its
    # map (not a fresh one) and its capabilities.
    assert inside["userns"] == outside["userns"]
    assert inside["uid_map"] == outside["uid_map"] == ["0", "0", "1"]
    assert inside["cap_sys_admin"]


def test_zero_userns_overlay_still_works(zero_userns):
    # The probe reports "overlay", "pivot_root" and "proc" only for the user-namespace
    # path ("no usable user namespace" here), but the direct path still does all three:
    # a writable overlay is mounted (without userxattr), both lowers show, and the write
    # lands in the upper directory on the host.
    r = zero_userns["overlay"]["ok"]
    assert r["returncode"] == 0, r["stderr"]
    assert r["stdout"] == "from l1\nfrom l2\n"
    assert r["namespaces"] == NOT_USER
    tmp = zero_userns["tmp"]
    with open(os.path.join(tmp, "u", "c")) as f:
        assert f.read() == "new\n"
    assert not os.path.exists(os.path.join(tmp, "l1", "c"))


# ------------------------------------------------------- a2. the probe goes stale at run time

# A user namespace with the *whole* identity map (so nested user namespaces work for
# root), made by the script itself: unshare(CLONE_NEWUSER), and a forked helper still in
# the parent namespace writes the maps.  Root in it may change its max_user_namespaces,
# so the script can make the cached probe stale between the probe and the run.
FULL_MAP_USERNS = r'''
libc = ctypes.CDLL(None, use_errno=True)
r, w = os.pipe()
me = os.getpid()
helper = os.fork()
if helper == 0:
    os.close(w)
    os.read(r, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{me}/{name}", "w") as f:
            f.write("0 0 4294967295")
    os._exit(0)
os.close(r)
if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
    raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
os.write(w, b"go")
os.close(w)
assert os.waitpid(helper, 0)[1] == 0
OUT["outside"] = facts()
'''


@pytest.fixture(scope="module")
def stale_probe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stale-probe")
    body = FULL_MAP_USERNS + textwrap.dedent('''
    def stale():
        sysctl(10000)
        granted = probe(refresh=True)["ns.user"].granted
        sysctl(0)  # the cached probe still says "granted"
        return granted

    OUT["granted_before"] = [stale()]
    record("strict", lambda: run(Spec(strict=True), ["hostname"]))
    OUT["granted_before"].append(stale())
    record("run", lambda: run(Spec(), ["hostname"]))
    OUT["granted_before"].append(stale())
    def call():
        out = Sandbox(Spec()).call_outcome(facts)
        (kind, value), plan = (out.kind, out.value), out.plan
        return {"kind": kind, "value": value, "namespaces": list(plan.namespaces),
                "degradations": [[type(d).__name__, getattr(d, "ns", None), d.reason] for d in plan.degradations]}
    record("call", call)
    OUT["cached_after"] = probe()["ns.user"].granted
    ''')
    return scenario(tmp, "stale_probe", body, [])


def test_stale_probe_loose_run_and_call_replan(stale_probe):
    assert stale_probe["outside"]["uid_map"] == ["0", "0", "4294967295"]
    assert stale_probe["granted_before"] == [True, True, True]
    # The plan included a user namespace; clone failed (ENOSPC), the sandbox re-probed
    # and ran without it, saying why.
    r = stale_probe["run"]["ok"]
    assert r["returncode"] == 0 and r["stdout"] == "incarnate\n"
    assert r["namespaces"] == NOT_USER
    assert [d[:2] for d in r["degradations"]] == [["NamespaceSkipped", "user"]]
    assert "user.max_user_namespaces is 0" in r["degradations"][0][2]
    # Same for a call: the clone happens in the forked child and its CloneFailed comes
    # back pickled, errno included, so the parent can decide to re-plan.
    c = stale_probe["call"]["ok"]
    assert c["kind"] == "ok"
    assert c["namespaces"] == NOT_USER
    assert [d[:2] for d in c["degradations"]] == [["NamespaceSkipped", "user"]]
    assert c["value"]["pids"] == [1, 2]
    assert c["value"]["userns"] == stale_probe["outside"]["userns"]
    assert stale_probe["cached_after"] is False  # the re-probe replaced the cache


def test_stale_probe_strict_raises(stale_probe):
    # Strict does not re-plan.  Today the raw CloneFailed(ENOSPC) of the clone comes out
    # (not the typed UserNsDisabledBySysctl a fresh probe would give); accept either,
    # but it must be an error about the user namespace limit, not a run.
    err = stale_probe["strict"]
    assert "exc" in err, err
    if err["exc"] == "CloneFailed":
        assert err["errno"] == 28  # ENOSPC: the user namespace count limit
        assert "user" in err["message"]
    else:
        assert err["exc"] == "UserNsDisabledBySysctl", err
        assert err["sysctl"] == "user.max_user_namespaces"


# ----------------------------------------------- a3. root of a nested, single-uid user namespace


@pytest.fixture(scope="module")
def nested_root(tmp_path_factory):
    """Plain `unshare -Ur`: root, but only uid 0 is mapped (as in a rootless container).
    Nested user namespaces are allowed; the whole identity map is not writable there."""
    _require("unshare")
    tmp = tmp_path_factory.mktemp("nested-root")
    body = '''
    OUT["caps"] = caps()
    record("run", lambda: run(Spec(), ["cat", "/proc/self/uid_map"]))
    '''
    return scenario(tmp, "nested_root", body, ["unshare", "--user", "--map-root-user"])


def test_nested_root_still_runs_isolated(nested_root):
    assert nested_root["outside"]["uid_map"] == ["0", "0", "1"]
    r = nested_root["run"]["ok"]
    assert r["returncode"] == 0, r["stderr"]
    assert set(NOT_USER) <= set(r["namespaces"])


def test_nested_root_gets_a_user_namespace(nested_root):
    assert nested_root["caps"]["ns.user"]["granted"], nested_root["caps"]["ns.user"]
    r = nested_root["run"]["ok"]
    assert "user" in r["namespaces"]
    assert r["stdout"].split() == ["0", "0", "1"]


# --------------------------------------------------------------- b. CAP_SYS_ADMIN dropped


@pytest.fixture(scope="module")
def no_sys_admin(tmp_path_factory):
    """Real root (uid 0, the whole host map) whose capability sets lack CAP_SYS_ADMIN:
    no namespace but a user namespace can be created directly."""
    _require("setpriv")
    tmp = tmp_path_factory.mktemp("no-sys-admin")
    body = '''
    OUT["caps"] = caps()
    mu = {"mount", "uts"}
    record("strict_mount_uts", lambda: run(Spec(namespaces=mu, strict=True), ["hostname"]))
    record("strict_uts", lambda: run(Spec(namespaces={"uts"}, strict=True), ["hostname"]))
    record("loose_mount_uts", lambda: run(Spec(namespaces=mu), ["hostname"]))
    record("strict_user_mount_uts", lambda: run(Spec(namespaces=mu | {"user"}, strict=True), ["hostname"]))
    record("call_user_mount_uts", lambda: Sandbox(Spec(namespaces=mu | {"user"}, strict=True)).call(facts))
    record("plan_with_user", lambda: list(Sandbox(Spec(namespaces=mu | {"user"})).plan().namespaces))
    '''
    return scenario(tmp, "no_sys_admin", body, DROP_SYS_ADMIN)


def test_no_sys_admin_precondition(no_sys_admin):
    outside = no_sys_admin["outside"]
    assert outside["uid"] == 0 and not outside["cap_sys_admin"]
    assert outside["uid_map"] == ["0", "0", "4294967295"]  # the initial user namespace


def test_no_sys_admin_probe_goes_through_the_user_namespace(no_sys_admin):
    caps = no_sys_admin["caps"]
    assert caps["ns.user"]["granted"]
    for ns in NOT_USER:
        assert caps[f"ns.{ns}"]["granted"] and caps[f"ns.{ns}"]["via"] == "userns", ns


def test_no_sys_admin_strict_without_user_raises(no_sys_admin):
    for key, ns in (("strict_mount_uts", "mount"), ("strict_uts", "uts")):
        err = no_sys_admin[key]
        # Exactly the base class: neither the sysctl nor the LSM is to blame.
        assert err.get("exc") == "NamespaceCapMissing", err
        assert err["ns"] == ns
        assert "CAP_SYS_ADMIN" in err["reason"]
        assert "user" in err["fix"]
        assert f"cannot create the {ns} namespace" in err["message"]


def test_no_sys_admin_loose_without_user_runs_unisolated(no_sys_admin):
    r = no_sys_admin["loose_mount_uts"]["ok"]
    assert r["returncode"] == 0
    assert r["namespaces"] == []
    # No uts namespace: the payload saw the host's hostname.
    assert r["stdout"] == no_sys_admin["outside"]["hostname"] + "\n"
    assert [d[:2] for d in r["degradations"]] == [["NamespaceSkipped", "mount"], ["NamespaceSkipped", "uts"]]
    for _, _, reason in r["degradations"]:
        assert "CAP_SYS_ADMIN" in reason


def test_no_sys_admin_with_user_gets_everything(no_sys_admin):
    r = no_sys_admin["strict_user_mount_uts"]["ok"]
    assert r["returncode"] == 0 and r["stdout"] == "incarnate\n"
    assert r["namespaces"] == ["user", "mount", "uts"] and r["degradations"] == []
    assert no_sys_admin["plan_with_user"]["ok"] == ["user", "mount", "uts"]
    outside = no_sys_admin["outside"]
    inside = no_sys_admin["call_user_mount_uts"]["ok"]
    assert inside["userns"] != outside["userns"]
    assert inside["hostname"] == "incarnate"
    assert inside["root_readonly"]
    # Root's full map, and CAP_SYS_ADMIN again -- over the new user namespace only.
    assert inside["uid"] == 0 and inside["uid_map"] == ["0", "0", "4294967295"]
    assert inside["cap_sys_admin"]


# ------------------------------------------------ c. both: no nested userns, no CAP_SYS_ADMIN


@pytest.fixture(scope="module")
def nothing_left(tmp_path_factory):
    _require("unshare", "setpriv")
    tmp = tmp_path_factory.mktemp("nothing-left")
    body = '''
    OUT["caps"] = caps()
    record("strict_all", lambda: run(Spec(strict=True), ["/bin/true"]))
    record("strict_mount", lambda: run(Spec(namespaces={"mount"}, strict=True), ["/bin/true"]))
    record("loose_all", lambda: run(Spec(), ["hostname"]))
    record("call_loose_all", lambda: Sandbox(Spec()).call(facts))
    '''
    return scenario(tmp, "nothing_left", body, UNSHARE_ZERO_USERNS + DROP_SYS_ADMIN)


def test_nothing_left_probe_explains_every_namespace(nothing_left):
    assert nothing_left["max_user_namespaces"] == "0"
    assert not nothing_left["outside"]["cap_sys_admin"]
    caps = nothing_left["caps"]
    assert "user.max_user_namespaces is 0" in caps["ns.user"]["reason"]
    for ns in NOT_USER:
        c = caps[f"ns.{ns}"]
        assert not c["granted"], ns
        assert "CAP_SYS_ADMIN is missing" in c["reason"], c
        assert "no user namespace to fall back on" in c["reason"], c
        assert c["fix"]


def test_nothing_left_strict_raises_for_the_first_missing_namespace(nothing_left):
    err = nothing_left["strict_all"]
    assert err.get("exc") == "UserNsDisabledBySysctl", err  # "user" comes first
    err = nothing_left["strict_mount"]
    assert err.get("exc") == "NamespaceCapMissing", err
    assert err["ns"] == "mount" and "CAP_SYS_ADMIN" in err["reason"]


def test_nothing_left_loose_runs_with_every_namespace_skipped(nothing_left):
    outside = nothing_left["outside"]
    r = nothing_left["loose_all"]["ok"]
    assert r["returncode"] == 0
    assert r["namespaces"] == []
    assert [d[1] for d in r["degradations"]] == ALL
    assert all(d[0] == "NamespaceSkipped" and d[2] for d in r["degradations"])
    # Nothing was isolated: the host's (here: the outer userns's) hostname, pids, root.
    assert r["stdout"] == outside["hostname"] + "\n" == socket.gethostname() + "\n"
    inside = nothing_left["call_loose_all"]["ok"]
    assert inside["userns"] == outside["userns"]
    assert inside["pid"] > 2 and len(inside["pids"]) > 2
    assert not inside["root_readonly"]
