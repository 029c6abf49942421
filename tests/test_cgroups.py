"""Resource limits on real cgroups: this machine has v1 controllers and a v2 hierarchy whose only
controller is hugetlb, so limits are tested on v1; on v2, grouping, CLONE_INTO_CGROUP,
cgroup.kill, and the delegation path (the move into a leaf, subtree_control down to the run)
with hugetlb. What this machine cannot exercise: writing v2 limits (memory.max, memory.swap.max,
pids.max, cpu.max, cpuset.cpus) and reading their events (memory.events, pids.events) with a
controller enabled (the test at the end checks those files with the controllers injected)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pytest_incarnate import PIPE, Sandbox, Spec
from pytest_incarnate.cgroups import RUN_PREFIX, Hierarchy, Run, sweep
from pytest_incarnate.errors import SandboxCrashed, SpecError

pytest_plugins = ["pytester"]

H = Hierarchy.detect()
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or "memory" not in H.v1 or "pids" not in H.v1, reason="needs root and v1 memory and pids controllers"
)
PY = sys.executable


@pytest.fixture(autouse=True)
def _run_lock_first():
    Run.current()  # the run's lock is held for the process's lifetime: open it before counting fds


def run_dirs() -> list[str]:
    out = []
    for base in list(H.v1.values()) + ([H.v2] if H.v2 else []):
        out += [os.path.join(base, e) for e in os.listdir(base) if e.startswith(RUN_PREFIX)]
    return out


def sandbox_dirs() -> list[str]:
    """This run's sandbox cgroups (other runs on the machine are none of our business)."""
    mine = [d for d in run_dirs() if d.endswith(RUN_PREFIX + Run.current().id)]
    return [os.path.join(d, s) for d in mine for s in os.listdir(d) if s.startswith("sb-")]


def test_memory_limit_reports_oom_kill(leak_check):
    r = Sandbox(Spec(memory="64M")).run([PY, "-c", "x = bytearray(200 * 1024 * 1024)"], timeout=30)
    assert r.signal == signal.SIGKILL and r.oom_killed
    assert r.stats.memory_limit == 64 * 1024 * 1024
    assert r.stats.describe_oom().startswith("OOM-killed: limit 64 MiB, peak ")
    with pytest.raises(SandboxCrashed, match="OOM-killed: limit 64 MiB"):
        Sandbox(Spec(memory=64 * 1024 * 1024)).call(lambda: bytearray(200 * 1024 * 1024))
    assert sandbox_dirs() == []  # each sandbox's cgroups are removed when it ends


def test_fork_bomb_is_contained_by_pids(leak_check):
    bomb = textwrap.dedent(
        """
        import os, time
        n = 0
        while True:
            try:
                pid = os.fork()
            except OSError as e:
                print("refused after", n, e.strerror, flush=True)
                break
            if pid == 0:
                time.sleep(1000)  # hold the slot; the kernel kills it when the init ends
                os._exit(0)
            n += 1
        """
    )
    r = Sandbox(Spec(pids=64)).run([PY, "-c", bomb], timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"refused after ") and int(r.stdout.split()[2]) < 64
    assert r.stats is not None and r.stats.pids_limit_hits > 0
    assert r.stats.pids_limit == 64
    assert leak_check().descendants == 0  # the host's process count is back to its baseline
    assert sandbox_dirs() == []


def test_cpu_quota_and_cpuset_are_applied(leak_check):
    code = "print(open('/proc/self/status').read().split('Cpus_allowed_list:')[1].split()[0])"
    h = Sandbox(Spec(cpu_quota=0.5, cpus="0")).spawn(["sh", "-c", f"read x; {PY} -c \"{code}\""], stdin=PIPE, stdout=PIPE)
    try:
        cpu_dirs = [d for d in sandbox_dirs() if d.startswith(H.v1["cpu"])]
        assert len(cpu_dirs) == 1
        with open(os.path.join(cpu_dirs[0], "cpu.cfs_quota_us")) as f:
            assert int(f.read()) == 50_000
    finally:
        out, _ = h.communicate(b"go\n", timeout=30)
    assert out.strip() == b"0"
    assert h.stats is not None and h.stats.cpu_user is not None


@pytest.mark.skipif(H.v2 is None, reason="no cgroup v2 hierarchy")
def test_v2_grouping_with_clone_into_cgroup(leak_check):
    h = Sandbox(Spec(pids=32)).spawn(["sh", "-c", "sleep 1000 & sleep 1000 & echo up; read x"], stdin=PIPE, stdout=PIPE)
    try:
        assert h.stdout.readline() == b"up\n"  # the sleeps are started
        with open(f"/proc/{h.pid}/cgroup") as f:
            v2_line = [line for line in f if line.startswith("0::")][0]
        assert f"/{RUN_PREFIX}" in v2_line and "/sb-" in v2_line  # born there (CLONE_INTO_CGROUP)
        v2_dir = [d for d in sandbox_dirs() if d.startswith(H.v2)][0]
        with open(os.path.join(v2_dir, "cgroup.procs")) as f:
            assert len(f.read().split()) >= 3  # the init, sh and the sleeps
    finally:
        h.kill()
        h.wait(timeout=30)
    assert sandbox_dirs() == []


def test_bad_limits_name_the_field():
    for kwargs, field in (({"memory": "lots"}, "memory"), ({"pids": 0}, "pids"), ({"cpu_quota": "half"}, "cpu_quota"),
                          ({"cpus": "a-b"}, "cpus"), ({"memory": -1}, "memory")):
        with pytest.raises(SpecError) as exc:
            Spec(**kwargs)
        assert exc.value.field == field


STRICT_AND_LOOSE = """
import json
from pytest_incarnate import Sandbox, Spec
from pytest_incarnate.errors import CgroupNotWritable
out = {}
try:
    Sandbox(Spec(memory="64M", strict=True)).run(["/bin/true"])
except CgroupNotWritable as e:
    out["strict"] = str(e)
"""


def _in_private_mountns(tmp_path, prepare: str, body: str) -> dict:
    """Run STRICT_AND_LOOSE + body (which fills ``out``) as a script in a private mount
    namespace after the shell commands ``prepare``; its JSON."""
    script = tmp_path / "script.py"
    script.write_text(STRICT_AND_LOOSE + textwrap.dedent(body) + "\nprint(json.dumps(out))\n")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", f"{prepare} && exec {PY} {script}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_read_only_cgroupfs_strict_and_not(tmp_path):
    """cgroupfs made read-only for real, in a private mount namespace."""
    got = _in_private_mountns(tmp_path, " && ".join(f"mount -o remount,bind,ro {m}" for m in _mountpoints()), """
        r = Sandbox(Spec(memory="64M")).run(["/bin/true"])
        out["rc"] = r.returncode
        out["degr"] = [[type(d).__name__, d.describe()] for d in r.degradations]
        """)
    assert "is not writable" in got["strict"] and "mounted read-only" in got["strict"]
    assert got["rc"] == 0
    assert [d[0] for d in got["degr"]] == ["CgroupSkipped"]
    assert "read-only" in got["degr"][0][1]


def test_no_controller_anywhere_degrades_or_refuses(tmp_path):
    """The v1 memory, pids and cpuacct hierarchies unmounted for real in a private mount
    namespace; the v2 hierarchy here does not have them either: the limits are skipped, saying
    why and how to fix it, or refused when strict; the probe says no with the same reason; CPU
    time still comes from the v2 cgroup's cpu.stat."""
    if "memory" in H.v2_controllers() or "pids" in H.v2_controllers():
        pytest.skip("this machine's v2 hierarchy has memory or pids: nothing to take away")
    umount = " && ".join(f"umount {m}" for m in _mountpoints(("memory", "pids", "cpuacct")))
    got = _in_private_mountns(tmp_path, umount, """
        from pytest_incarnate.probe import probe
        r = Sandbox(Spec(memory="64M", pids=16)).run(["sh", "-c", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"])
        out["rc"] = r.returncode
        out["degr"] = [[type(d).__name__, d.describe()] for d in r.degradations]
        out["cpu"] = [r.stats.cpu_user, r.stats.cpu_system]
        caps = probe()
        out["probe"] = {k: [caps[k].granted, caps[k].reason, caps[k].fix] for k in ("cgroup.memory", "cgroup.pids")}
        """)
    assert "not delegated to the v2 cgroup" in got["strict"] and "memory" in got["strict"]
    assert got["rc"] == 0
    assert sorted(d[0] for d in got["degr"]) == ["CgroupSkipped", "CgroupSkipped"]
    assert any("memory is not delegated" in d[1] for d in got["degr"])
    assert any("pids is not delegated" in d[1] for d in got["degr"])
    assert got["cpu"][0] > 0.01 and got["cpu"][1] is not None  # CPU time from v2's cpu.stat, without cpuacct
    for ok, reason, fix in got["probe"].values():
        assert not ok and "not delegated" in reason and "subtree_control" in fix


@pytest.mark.skipif(H.v2 is None or "hugetlb" not in H.v2_controllers(), reason="needs hugetlb delegated on cgroup v2")
def test_v2_delegation_moves_the_own_cgroup_into_a_leaf(tmp_path):
    """The v2 delegation path for real, with the one controller this machine's v2 hierarchy has
    (hugetlb): a process in a v2 cgroup of its own, beside a child, asks for a controller; both
    are moved into the leaf (no internal processes), the controller is enabled down to the run
    directory, and a controller that is not delegated (memory) is named with its fix."""
    root_ctl = os.path.join(H.v2_root, "cgroup.subtree_control")
    with open(root_ctl) as f:
        enabled_before = "hugetlb" in f.read().split()
    if not enabled_before:  # delegate it to the root's children for this test; undone below
        with open(root_ctl, "w") as f:
            f.write("+hugetlb")
    base = os.path.join(H.v2, f"t-delegation-{os.getpid()}")
    os.mkdir(base)
    script = tmp_path / "deleg.py"
    script.write_text(textwrap.dedent(
        f"""
        import json, os
        with open({base!r} + "/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(w)
            os.read(r, 1)
            os._exit(0)
        from pytest_incarnate import cgroups, Sandbox, Spec
        h = cgroups.Hierarchy.detect()
        run = cgroups.Run.current()
        run_dir = os.path.join(h.v2, cgroups.RUN_PREFIX + run.id)
        os.makedirs(run_dir, exist_ok=True)
        failed = cgroups._v2_delegate(h, run_dir, ["hugetlb", "memory"])
        def cg(pid):
            with open(f"/proc/{{pid}}/cgroup") as f:
                return [l.strip()[3:] for l in f if l.startswith("0::")][0]
        sub = os.path.join(run_dir, "probe")
        os.mkdir(sub)
        out = dict(base=h.v2, failed=failed, me=cg(os.getpid()), child=cg(child),
                   base_procs=open({base!r} + "/cgroup.procs").read().split(),
                   base_ctl=open({base!r} + "/cgroup.subtree_control").read().split(),
                   run_ctl=open(run_dir + "/cgroup.subtree_control").read().split(),
                   hugetlb_files=any(n.startswith("hugetlb.") for n in os.listdir(sub)),
                   again=cgroups.Hierarchy.detect().v2)
        os.rmdir(sub)
        res = Sandbox(Spec()).run(["/bin/true"])   # a sandbox still works from the leaf
        out["rc"] = res.returncode
        os.close(w)
        os.waitpid(child, 0)
        print(json.dumps(out))
        """
    ))
    try:
        proc = subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        rel = base[len(H.v2_root):]
        assert got["base"] == base and got["again"] == base  # the leaf's parent stays the own cgroup
        assert got["me"] == got["child"] == f"{rel}/incarnate_leaf"
        assert got["base_procs"] == []
        assert "hugetlb" in got["base_ctl"] and "hugetlb" in got["run_ctl"]
        assert got["hugetlb_files"]
        assert list(got["failed"]) == ["memory"] and "not delegated" in got["failed"]["memory"]
        assert got["rc"] == 0
    finally:
        for d in sorted((os.path.join(dp) for dp, _, _ in os.walk(base)), key=len, reverse=True):
            os.rmdir(d)
        if not enabled_before:
            with open(root_ctl, "w") as f:
                f.write("-hugetlb")
    assert not os.path.exists(base)


def _mountpoints(controllers: tuple[str, ...] = ()) -> list[str]:
    """The cgroup mount points (only the v1 ones of ``controllers``, when given)."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _, opts = right.split()[:3]
            if fstype not in ("cgroup", "cgroup2"):
                continue
            if controllers and not set(opts.split(",")) & set(controllers):
                continue
            out.append(left.split()[4])
    return out


def test_a_killed_run_is_swept(tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(
        """
        import os, signal
        from pytest_incarnate import Sandbox, Spec, PIPE
        from pytest_incarnate.cgroups import Run
        h = Sandbox(Spec(memory="64M", pids=32)).spawn(["sh", "-c", "echo up; exec sleep 1000"], stdout=PIPE)
        assert h.stdout.readline() == b"up\\n"
        print(Run.current().id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # pytest SIGKILLed in the middle of a sandboxed test
        """
    ))
    proc = subprocess.run([PY, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run_id = proc.stdout.strip()
    left = [d for d in run_dirs() if d.endswith(run_id)]
    assert left  # the killed run left its cgroups behind...
    removed = sweep()
    assert sorted(set(left) & set(removed)) == sorted(left)  # ...and the sweep removed them
    assert not [d for d in run_dirs() if d.endswith(run_id)]
    assert Run.current().id != run_id


def test_timeout_kills_every_process_of_the_sandbox(leak_check):
    def payload() -> None:
        os.system("for i in 1 2 3 4 5; do sleep 1000 & done; wait")

    from pytest_incarnate.errors import SandboxTimeout

    with pytest.raises(SandboxTimeout) as exc:
        Sandbox(Spec(timeout=1, pids=64)).call(payload)
    assert exc.value.killed == 7  # the call (pid 2), its shell and 5 background sleeps
    assert str(exc.value) == "timed out after 1.0 s; 7 processes killed"
    # The cgroup could be removed: nothing of the sandbox is left.
    assert sandbox_dirs() == []


def test_plugin_reports_oom_and_timeout(pytester):
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.incarnate(memory="64M")
        def test_hog():
            x = bytearray(200 * 1024 * 1024)

        @pytest.mark.incarnate(timeout=1)
        def test_slow():
            os.system("sleep 1000 & sleep 1000 & wait")
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["sandboxed test OOM-killed: limit 64 MiB, peak *MiB"])
    result.stdout.fnmatch_lines(["sandboxed test timed out after 1.0 s; 4 processes killed"])


def test_rlimits_and_cpu_affinity(leak_check):
    r = Sandbox(Spec(rlimits={"nofile": 64, "fsize": (1 << 20, 1 << 20)}, cpu_affinity="0")).run(
        ["sh", "-c", "ulimit -n; ulimit -f; grep Cpus_allowed_list /proc/self/status"])
    assert r.stdout.decode().split() == ["64", "2048", "Cpus_allowed_list:", "0"]  # ulimit -f is in 512-byte blocks
    assert r.degradations == ()
    r = Sandbox(Spec(rlimits={"cpu": (1, 3)})).run([PY, "-c", "while True: pass"], timeout=30)
    assert r.signal == signal.SIGXCPU  # the soft limit's signal
    assert r.cause is not None and r.cause.startswith("CPU time limit exceeded: RLIMIT_CPU 1 s")
    with pytest.raises(SpecError) as exc:
        Spec(rlimits={"nofiles": 1})
    assert exc.value.field == "rlimits"


def test_cpu_affinity_outside_the_allowed_set_degrades():
    allowed = sorted(os.sched_getaffinity(0))
    outside = max(allowed) + 1
    if outside > 127:
        pytest.skip("no CPU number outside this process's set")
    r = Sandbox(Spec(cpu_affinity=[allowed[0], outside])).run(["grep", "Cpus_allowed_list", "/proc/self/status"])
    assert r.stdout.split()[-1] == str(allowed[0]).encode()
    assert [type(d).__name__ for d in r.degradations] == ["CpuAffinitySkipped"]
    assert f"CPUs [{outside}] are not allowed" in r.degradations[0].reason
    with pytest.raises(SpecError) as exc:
        Sandbox(Spec(cpu_affinity=[outside], strict=True)).run(["/bin/true"])
    assert exc.value.field == "cpu_affinity"


def test_plugin_names_the_pids_limit(pytester):
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.incarnate(pids=16)
        def test_forks():
            children = []
            for _ in range(40):
                pid = os.fork()
                if pid == 0:
                    os.read(os.open("/dev/zero", os.O_RDONLY), 1)
                    os._exit(0)
                children.append(pid)
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*BlockingIOError*", "*fork(s) refused by the pids limit (pids=16)*"])


def test_v2_limit_files_and_events_injected(tmp_path):
    """INJECTED, because this machine cannot produce it: a v2 cgroup with the memory, pids, cpu
    and cpuset controllers enabled. Its v1 hierarchies are held by the machine's init (umount of
    /sys/fs/cgroup/pids gives EBUSY, and a lazy one leaves the hierarchy bound), so no controller
    can be moved to v2 here. The directory below has the interface files such a cgroup shows
    (their names and formats from the kernel's cgroup-v2 documentation): what the limits write
    into them and what the stats read back from their events is checked; the kernel enforcing
    them is not."""
    from pytest_incarnate.cgroups import Limits, SandboxCgroup, _apply_v2

    d = tmp_path / "sb-0"
    d.mkdir()
    for name, text in {
        # the files written start empty: the kernel's replace their value, a regular file is overwritten in place
        "memory.max": "", "memory.swap.max": "", "pids.max": "", "cpu.max": "", "cpuset.cpus": "",
        "memory.peak": f"{64 * 1048576}\n",
        "memory.events": "low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\noom_group_kill 0\n",
        "pids.events": "max 3\n",
        "cpu.stat": "usage_usec 1500000\nuser_usec 1250000\nsystem_usec 250000\n",
    }.items():
        (d / name).write_text(text)
    limits = Limits(memory=64 * 1048576, pids=16, cpu_quota=0.25, cpus="0")
    _apply_v2(str(d), limits, limits.controllers())
    assert (d / "memory.max").read_text() == str(64 * 1048576)
    assert (d / "memory.swap.max").read_text() == "0"  # swap off, as on v1
    assert (d / "pids.max").read_text() == "16"
    assert (d / "cpu.max").read_text() == "25000 100000"
    assert (d / "cpuset.cpus").read_text() == "0"

    s = SandboxCgroup({}, str(d), limits).stats()
    assert s.oom_killed and s.oom_kills == 1
    assert s.describe_oom() == "OOM-killed: limit 64 MiB, peak 64.0 MiB"
    assert s.pids_limit_hits == 3 and s.pids_limit == 16
    assert (s.cpu_user, s.cpu_system) == (1.25, 0.25)

    # a controller not delegated is not written to, even when the limit asks for it
    (d / "pids.max").write_text("max\n")
    _apply_v2(str(d), Limits(pids=8), ["memory"])
    assert (d / "pids.max").read_text() == "max\n"
