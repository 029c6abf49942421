"""The plugin's options, ini keys, markers, hooks, fixtures and reports, run for real with
pytester (each test's sandbox is a real one)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET

import pytest

pytest_plugins = ["pytester"]

try:
    import xdist  # noqa: F401

    HAVE_XDIST = True
except ImportError:
    HAVE_XDIST = False

PID_SUITE = """
import os, pytest

def test_default():
    print("pid", os.getpid())
    assert os.getpid() == 2

@pytest.mark.incarnate(False)
def test_opted_out():
    assert os.getpid() != 2
"""


def test_incarnate_option_sandboxes_every_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PID_SUITE)
    result = pytester.runpytest("--incarnate", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["incarnate: every test sandboxed; on degraded: skip*"])
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)  # without it, nothing is sandboxed


def test_incarnate_ini_key(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PID_SUITE)
    pytester.makeini("[pytest]\nincarnate = true\n")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_spec_precedence_marker_then_command_line_then_ini(pytester: pytest.Pytester,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini("[pytest]\nincarnate = true\nincarnate_spec =\n    hostname = from-ini\n    pids = 50\n")
    pytester.makepyfile(
        """
        import os, socket, pytest

        def test_ini_or_cli():
            assert socket.gethostname() == os.environ["EXPECT_HOST"]

        @pytest.mark.incarnate(hostname="from-marker")
        def test_marker():
            assert socket.gethostname() == "from-marker"

        def test_pids_from_ini():
            with open("/proc/self/cgroup") as f:
                assert f.read()  # the pids limit made a cgroup; the ledger shows the spec
        """
    )
    monkeypatch.setenv("EXPECT_HOST", "from-ini")
    pytester.runpytest("-p", "no:cacheprovider", "--incarnate-report", "ledger.json").assert_outcomes(passed=3)
    ledger = json.loads((pytester.path / "ledger.json").read_text())
    specs = {t["nodeid"].split("::")[1]: t["spec"] for t in ledger["tests"]}
    assert specs["test_ini_or_cli"]["hostname"] == "from-ini" and specs["test_ini_or_cli"]["pids"] == 50
    assert specs["test_marker"]["hostname"] == "from-marker"
    monkeypatch.setenv("EXPECT_HOST", "from-cli")
    pytester.runpytest("-p", "no:cacheprovider", "--incarnate-spec", "hostname=from-cli",
                       "--incarnate-report", "ledger.json").assert_outcomes(passed=3)
    ledger = json.loads((pytester.path / "ledger.json").read_text())
    specs = {t["nodeid"].split("::")[1]: t["spec"] for t in ledger["tests"]}
    assert specs["test_ini_or_cli"]["hostname"] == "from-cli" and specs["test_ini_or_cli"]["pids"] == 50
    assert specs["test_marker"]["hostname"] == "from-marker"


@pytest.mark.parametrize(
    "args, ini, expected",
    [
        (["--incarnate-spec", "memory=lots"], "", "*--incarnate-spec: memory: *must be a size*"),
        (["--incarnate-spec", "nonsense"], "", "*--incarnate-spec: 'nonsense' is not KEY=VALUE*"),
        (["--incarnate-spec", "hostnme=x"], "", "*--incarnate-spec: hostnme: unknown --incarnate-spec keyword*"),
        ([], "incarnate_spec = pids = -3", "*ini incarnate_spec: pids: *"),
        (["--incarnate-on-degraded=maybe"], "", "*--incarnate-on-degraded: 'maybe' is not one of skip, xfail, fail, run*"),
        ([], "incarnate_on_degraded = sometimes", "*ini incarnate_on_degraded: 'sometimes' is not one of*"),
    ],
)
def test_bad_values_say_where_they_came_from(pytester: pytest.Pytester, args: list[str], ini: str, expected: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest("-p", "no:cacheprovider", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


DROP_SYS_ADMIN = ("setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin")


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_requires_isolation_marker(pytester: pytest.Pytester) -> None:
    """CAP_SYS_ADMIN dropped for real, so overlay.root (the host root overlaid) is missing:
    granted capabilities run the test unsandboxed; the missing one skips it (or xfails it,
    by policy) with the probe's reason and fix; an unknown name is a usage error."""
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.requires_isolation("userns", "netns", "ns.mount")
        def test_granted():
            assert os.getpid() != 2  # not sandboxed: the marker only checks

        @pytest.mark.requires_isolation("userns", "overlay.root")
        def test_missing():
            raise AssertionError("must not run")
        """
    )

    def run(*args: str) -> pytest.RunResult:
        return pytester.run(*DROP_SYS_ADMIN, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rsx", *args)

    result = run(str(pytester.path))
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * incarnate: this machine does not grant overlay.root: no: *CAP_SYS_ADMIN*"])
    run("--incarnate-on-degraded=xfail", str(pytester.path)).assert_outcomes(passed=1, xfailed=1)
    # As root with every capability, the same test runs.
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1, failed=1)
    pytester.makepyfile(test_unknown="""
        import pytest

        @pytest.mark.requires_isolation("teleport")
        def test_x():
            pass
        """)
    result = pytester.runpytest("-p", "no:cacheprovider", "test_unknown.py")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*unknown capability 'teleport'; known: ns.user*"])


def test_hooks_adjust_spec_and_see_results(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import json

        SEEN = []

        def pytest_incarnate_adjust_spec(item, kwargs):
            kwargs["hostname"] = "hooked-" + item.name[-1]

        def pytest_incarnate_result(item, record):
            SEEN.append([record.nodeid, record.namespaces, record.root, record.outcome, record.changes])

        def pytest_sessionfinish(session):
            with open("seen.json", "w") as f:
                json.dump(SEEN, f)
        """
    )
    pytester.makepyfile(
        """
        import socket, pytest

        @pytest.mark.incarnate
        def test_a():
            open("/etc/hooked", "w").write("x")
            assert socket.gethostname() == "hooked-a"

        @pytest.mark.incarnate(hostname="ignored")
        def test_b():
            assert socket.gethostname() == "hooked-b"
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=2)
    seen = json.loads((pytester.path / "seen.json").read_text())
    assert [s[0].split("::")[1] for s in seen] == ["test_a", "test_b"]
    for _, namespaces, root, outcome, _ in seen:
        assert set(namespaces) == {"user", "mount", "pid", "net", "uts", "ipc", "cgroup"}
        assert root == "overlay" and outcome == "passed"
    assert seen[0][4]["created"] == 1 and seen[1][4]["created"] == 0


LEDGER_SUITE = """
import os, pytest, warnings

def test_writes():
    with open("/etc/ledger-test", "w") as f:
        f.write("x")

@pytest.mark.incarnate(memory="64M", pids=32)
def test_limited():
    assert True

def test_fails():
    assert 1 == 2

def test_skips():
    pytest.skip("not today")
"""


@pytest.mark.parametrize("xdist", [False, True])
def test_json_ledger_and_junit_properties(pytester: pytest.Pytester, xdist: bool) -> None:
    if xdist and not HAVE_XDIST:
        pytest.skip("needs pytest-xdist")
    pytester.makepyfile(LEDGER_SUITE)
    args = ["-p", "no:cacheprovider", "--incarnate", "--incarnate-report", "out/ledger.json", "--junitxml", "junit.xml"]
    if xdist:
        args += ["-n", "2"]
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=2, failed=1, skipped=1)
    ledger = json.loads((pytester.path / "out" / "ledger.json").read_text())
    tests = {t["nodeid"].split("::")[1]: t for t in ledger["tests"]}
    assert sorted(tests) == ["test_fails", "test_limited", "test_skips", "test_writes"]
    assert tests["test_writes"]["changes"] == {"created": 1, "modified": 0, "deleted": 0, "metadata": 0}
    assert tests["test_limited"]["spec"]["memory"] == 64 << 20 and tests["test_limited"]["spec"]["pids"] == 32
    assert tests["test_limited"]["stats"]["memory_limit"] == 64 << 20
    assert tests["test_fails"]["outcome"] == "failed" and tests["test_skips"]["outcome"] == "skipped"
    for t in tests.values():
        assert t["root"] == "overlay" and "pid" in t["namespaces"] and t["degradations"] == []
        assert 0 < t["duration"] < 30
    if xdist:
        assert {t.get("worker") for t in tests.values()} <= {"gw0", "gw1"}
    root = ET.parse(pytester.path / "junit.xml").getroot()
    props = {}
    for case in root.iter("testcase"):
        props[case.get("name")] = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["test_writes"]["incarnate.root"] == "overlay"
    assert "net" in props["test_fails"]["incarnate.namespaces"].split()


def test_warnings_inside_reach_the_summary(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import warnings, pytest

        class MyWarning(UserWarning):
            pass

        @pytest.mark.incarnate
        def test_warns():
            warnings.warn("careful inside", MyWarning)

        @pytest.mark.incarnate
        def test_pytest_warns():
            with pytest.warns(DeprecationWarning, match="old"):
                warnings.warn("old api", DeprecationWarning)
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, warnings=1)
    result.stdout.fnmatch_lines(["*warnings summary*", "*test_warns*", "*MyWarning: careful inside*"])
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "error::UserWarning:test_warnings_inside_reach_the_summary")
    result.assert_outcomes(passed=1, failed=1)  # -W error applies inside too


def test_keep_upper_of_failed_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.incarnate
        def test_fails_after_writing():
            with open("/etc/evidence", "w") as f:
                f.write("what happened")
            assert False

        @pytest.mark.incarnate
        def test_passes_after_writing():
            with open("/etc/not-kept", "w") as f:
                f.write("x")
        """
    )
    keep = pytester.path / "kept"
    result = pytester.runpytest("-p", "no:cacheprovider", f"--incarnate-keep-upper={keep}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines([f"*what the test wrote is kept in {keep}/*test_fails_after_writing*"])
    (kept,) = keep.iterdir()
    manifest = json.loads((kept / "manifest.json").read_text())
    assert {"path": "/etc/evidence", "kind": "created", "content_kept": True} in manifest
    assert (kept / "files" / "etc" / "evidence").read_text() == "what happened"
    assert not os.path.exists("/etc/evidence")


def test_changes_and_layers_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.fixture
        def only_under_etc(incarnate_changes):
            yield
            changes = incarnate_changes.changes
            assert changes is not None and changes.created == ["/etc/app.conf"]
            changes.assert_only_under("/etc")

        @pytest.mark.incarnate
        def test_installs(only_under_etc):
            with open("/etc/app.conf", "w") as f:
                f.write("x")

        def build(d):
            os.makedirs(os.path.join(d, "data"))
            with open(os.path.join(d, "data", "hello"), "w") as f:
                f.write("from a layer")

        @pytest.fixture(scope="session")
        def data_layer(incarnate_layers):
            layer = incarnate_layers.from_callable(build, key="data-v1")
            assert incarnate_layers.from_callable(build, key="data-v1") is layer
            return layer

        def test_layer_as_overlay(data_layer, incarnation):
            from pytest_incarnate import Bind
            sb = incarnation.__class__(incarnation.spec.replace(binds=[Bind(data_layer.path(), "/srv", readonly=True)]))
            r = sb.run(["cat", "/srv/data/hello"])
            assert r.stdout == b"from a layer"
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


def test_exitfirst_and_last_failed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_1(): pass
        def test_2(): assert 0
        def test_3(): pass
        def test_4(): assert 0
        """
    )
    pytester.runpytest("--incarnate", "-x").assert_outcomes(passed=1, failed=1)
    pytester.runpytest("--incarnate").assert_outcomes(passed=2, failed=2)
    result = pytester.runpytest("--incarnate", "--lf")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*rerun previous 2 failures*"])


@pytest.mark.skipif(not HAVE_XDIST, reason="needs pytest-xdist")
def test_xdist_worker_survives_a_crashing_sandbox(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        "import os, signal\n"
        "def test_exit(): os._exit(3)\n"
        "def test_kill(): os.kill(os.getpid(), signal.SIGKILL)\n"
        + "".join(f"def test_ok_{i}(): assert os.getpid() == 2\n" for i in range(8))
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "-n", "2", "--incarnate")
    result.assert_outcomes(passed=8, failed=2)
    # xdist's own words when a worker dies; the test file's name must not match them, and
    # the summary line is as wide as the terminal, so match only what xdist prints.
    result.stdout.no_fnmatch_line("*crashed while running*")
    result.stdout.no_fnmatch_line("*node down*")
    result.stdout.fnmatch_lines(["*sandboxed test crashed: exited with status 3*",
                                 "*sandboxed test crashed: killed by signal 9 (SIGKILL)*"], consecutive=False)


def test_coverage_inside_is_counted(pytester: pytest.Pytester) -> None:
    """pytest-cov reports the same covered lines with --incarnate as without."""
    pytest.importorskip("pytest_cov")
    pytester.makepyfile(
        mod="""
        def a(x):
            if x > 0:
                return "pos"
            return "neg"

        def b():
            return "never called"
        """,
        test_mod="""
        import mod

        def test_a():
            assert mod.a(1) == "pos"
        """,
    )

    def covered(*extra: str) -> dict:
        out = pytester.path / f"cov{len(extra)}.json"
        r = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--cov=mod", f"--cov-report=json:{out}", *extra)
        r.assert_outcomes(passed=1)
        return json.loads(out.read_text())["files"]["mod.py"]["executed_lines"]

    plain = covered()
    sandboxed = covered("--incarnate")
    assert plain == sandboxed and 3 in plain and 4 not in plain


def test_pdb_post_mortem_inside_the_sandbox(pytester: pytest.Pytester) -> None:
    pexpect = pytest.importorskip("pexpect")
    pytester.makepyfile(
        """
        import os

        def test_fails():
            inside_pid = os.getpid()
            assert inside_pid == 12345
        """
    )
    child = pytester.spawn_pytest("--incarnate --pdb -p no:cacheprovider")
    child.expect("Pdb")
    child.sendline("p inside_pid")
    child.expect(r"\n2\r?\n")  # pid 2: the post-mortem runs inside the sandbox
    child.sendline("c")
    child.expect("1 failed")
    child.expect(pexpect.EOF)
    child.wait()
