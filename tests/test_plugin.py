"""The pytest integration, through pytester: a marker runs the call phase inside."""

from __future__ import annotations

import shutil
import sys

import pytest

pytest_plugins = ["pytester"]

SUITE = """
import os, socket, pytest

@pytest.mark.incarnate(hostname="box")
def test_inside(tmp_path):
    (tmp_path / "out.txt").write_text("written inside")
    print("hello from inside")
    assert socket.gethostname() == "box"
    assert os.getpid() == 2

@pytest.mark.incarnate
def test_fail():
    x = [1, 2]
    assert x == [1, 3], "lists differ"

def test_fail_plain():
    x = [1, 2]
    assert x == [1, 3], "lists differ"

@pytest.mark.incarnate
def test_raises():
    raise KeyError("missing-key")

@pytest.mark.incarnate
@pytest.mark.xfail(reason="known bug")
def test_xfail():
    assert 0

@pytest.mark.incarnate
def test_skip_inside():
    pytest.skip("skipped inside")

@pytest.mark.incarnate
def test_exit_crash():
    os._exit(42)

@pytest.mark.incarnate
def test_signal_crash():
    os.kill(os.getpid(), 9)

@pytest.mark.incarnate
def test_capsys(capsys):
    print("captured")
    assert capsys.readouterr().out == "captured\\n"
"""


def test_outcomes_and_messages(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_suite=SUITE)
    result = pytester.runpytest("-rA", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=5, skipped=1, xfailed=1)
    for line in [
        "incarnate: kernel *",
        "E       AssertionError: lists differ",
        "E       KeyError: 'missing-key'",
        "sandboxed test crashed: exited with status 42 (os._exit or a fatal error) before reporting",
        "sandboxed test crashed: killed by signal 9 (SIGKILL)",
        "hello from inside",
        "SKIPPED * skipped inside",
        "XFAIL test_suite.py::test_xfail - known bug",
        "FAILED test_suite.py::test_exit_crash*",
    ]:
        result.stdout.fnmatch_lines([line])
    # The tmp_path was bound read-write: what the test wrote reached the host.
    written = list(pytester.path.parent.glob("**/test_inside0/out.txt"))
    assert written and written[0].read_text() == "written inside"


def test_failure_report_matches_unsandboxed(pytester: pytest.Pytester) -> None:
    body = """
def helper(d):
    return d["a"] + 1

def test_it():
    data = {"a": 1, "b": [1, 2, 3]}
    assert helper(data) == 3, "helper result"
"""
    pytester.makepyfile(test_plain=body, test_boxed="import pytest\npytestmark = pytest.mark.incarnate\n" + body)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=2)
    out = result.stdout.str()
    shown = [line for line in out.splitlines() if line.startswith(("E ", ">"))]
    half = len(shown) // 2
    assert half >= 3
    assert shown[:half] == shown[half:]  # the sandboxed report reads exactly as the plain one
    assert "E       AssertionError: helper result" in shown
    assert "E       assert 2 == 3" in shown


def test_incarnation_fixture_runs_subprocesses(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.incarnate(hostname="fixture-box")
        def test_it(incarnation):
            # This test runs sandboxed itself, so this sandbox is nested: it gets every
            # namespace, but no copy-on-write root (inherited mounts are locked here) and no
            # fresh /proc (the enclosing one has locked read-only parts: /proc/sys, ...).
            r = incarnation.run(["sh", "-c", "hostname; echo 1 > /proc/sys/vm/swappiness || echo refused"])
            assert r.stdout == b"fixture-box\\nrefused\\n"
            assert [type(d).__name__ for d in r.degradations] == ["OverlaySkipped", "ProcSkipped"]

        def test_unsandboxed(incarnation):
            r = incarnation.run(["hostname"])
            assert r.stdout == b"incarnate\\n"
            assert r.degradations == ()

        def test_caps(incarnate_capabilities):
            assert incarnate_capabilities.granted("ns.user")
        """
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=3)


def test_bad_marker_keyword_fails_the_test_naming_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.incarnate(hostnme="x")
        def test_it():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*incarnate: @pytest.mark.incarnate: hostnme: unknown Spec keyword*"])


DEGRADED_SUITE = """
import os, pytest

@pytest.mark.incarnate(namespaces={"mount", "uts"})
def test_needs_mount():
    pass

@pytest.mark.incarnate(namespaces={"user", "mount", "uts"})
def test_with_userns():
    with open("/proc/self/status") as f:
        assert "NSpid" in f.read()
"""

# What each policy does to the two degraded tests (CAP_SYS_ADMIN dropped for real: a mount
# namespace without a user namespace cannot be had; with one, the host root cannot be overlaid).
POLICY_OUTCOMES = {
    "skip": ({"skipped": 2}, ["SKIPPED * incarnate: mount namespace skipped: *CAP_SYS_ADMIN*",
                              "SKIPPED * incarnate: copy-on-write root skipped*"]),
    "xfail": ({"xfailed": 2}, ["XFAIL *test_needs_mount*incarnate: mount namespace skipped*",
                               "XFAIL *test_with_userns*incarnate: copy-on-write root skipped*"]),
    "fail": ({"failed": 2}, ["*_ test_needs_mount _*", "incarnate: mount namespace skipped*",
                             "*_ test_with_userns _*", "incarnate: copy-on-write root skipped*"]),
    "run": ({"passed": 2}, ["*test_needs_mount (run):", "    NamespaceSkipped: mount namespace skipped*",
                            "*test_with_userns (run):", "    OverlaySkipped: copy-on-write root skipped*"]),
}


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
@pytest.mark.parametrize("policy", list(POLICY_OUTCOMES))
@pytest.mark.parametrize("where", ["cli", "ini"])
def test_degradation_policy_with_capabilities_dropped(pytester: pytest.Pytester, policy: str, where: str) -> None:
    """Each policy gives its documented outcome, with the degradation as the reason, set on
    the command line or in the ini file."""
    pytester.makepyfile(DEGRADED_SUITE)
    args = ["-rsxf", "-p", "no:cacheprovider"]
    if where == "cli":
        args.append(f"--incarnate-on-degraded={policy}")
    else:
        pytester.makeini(f"[pytest]\nincarnate_on_degraded = {policy}\n")
    result = pytester.run("setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin",
                          sys.executable, "-m", "pytest", *args, str(pytester.path))
    outcomes, lines = POLICY_OUTCOMES[policy]
    result.assert_outcomes(**outcomes)
    result.stdout.fnmatch_lines(lines, consecutive=False) if policy != "run" else result.stdout.fnmatch_lines(
        ["*= incarnate: degradations =*", *lines])


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_degraded_hook_decides_per_test(pytester: pytest.Pytester) -> None:
    """pytest_incarnate_degraded (firstresult) overrides the policy: here a read-only root is
    acceptable, a missing namespace is not."""
    pytester.makepyfile(DEGRADED_SUITE)
    pytester.makeconftest(
        """
        from pytest_incarnate.errors import OverlaySkipped

        def pytest_incarnate_degraded(item, degradations, policy):
            assert policy == "skip"
            if all(isinstance(d, OverlaySkipped) for d in degradations):
                return "run"
        """
    )
    result = pytester.run("setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin",
                          sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", str(pytester.path))
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * incarnate: mount namespace skipped: *CAP_SYS_ADMIN*"])


def test_user_namespaces_disabled_skip_with_the_sysctl_fix(pytester: pytest.Pytester) -> None:
    """user.max_user_namespaces set to 0 for real (inside an outer user namespace, whose
    mapped root cannot overlay the host root nor make a nested user namespace)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux)")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.incarnate(namespaces={"user", "mount"}, copy_on_write=False)
        def test_it():
            pass
        """
    )
    result = pytester.run("unshare", "--user", "--map-root-user", "sh", "-c",
                          'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh",
                          sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", str(pytester.path))
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["SKIPPED * incarnate: user namespace skipped: *max_user_namespaces*"])
