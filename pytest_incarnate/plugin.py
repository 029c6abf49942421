"""pytest plugin: the ``incarnate`` marker, the ``incarnation`` fixture and the header.

Heavy modules are imported only when a test asks for isolation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generator

import pytest

if TYPE_CHECKING:
    from pytest_incarnate.probe import Capabilities
    from pytest_incarnate.sandbox import Sandbox

MARKER_HELP = (
    "incarnate(**spec): run the test's call phase inside a fresh incarnation (its keywords are "
    "pytest_incarnate.Spec fields: namespaces, hostname, binds, tmpfs, env, cwd, layers, memory, pids, "
    "cpu_quota, cpus, rlimits, timeout, strict, ...). The root is the host's, copy-on-write. "
    "A namespace the machine cannot grant skips the test with the reason."
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)


def pytest_report_header(config: pytest.Config) -> list[str]:
    from pytest_incarnate.probe import probe

    try:
        caps = probe()
    except Exception as e:  # the header must never break a run
        return [f"incarnate: probe failed: {e}"]
    return [f"incarnate: kernel {caps.kernel}, euid {caps.euid}; {caps.summary()}"]


def _sandboxed(item: pytest.Item) -> bool:
    from pytest_incarnate.runner import IN_CHILD

    return item.get_closest_marker("incarnate") is not None and not item.stash.get(IN_CHILD, False)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    if _sandboxed(item):
        from pytest_incarnate.runner import run_call_sandboxed

        run_call_sandboxed(item)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    if call.when == "call" and _sandboxed(item):
        from pytest_incarnate.runner import replace_report

        return replace_report(item, report)
    return report


@pytest.fixture(scope="session")
def incarnate_capabilities() -> Capabilities:
    """What this machine grants (see ``pytest-incarnate probe``); probed once per process."""
    from pytest_incarnate.probe import probe

    return probe()


@pytest.fixture
def incarnation(request: pytest.FixtureRequest) -> Sandbox:
    """A :class:`~pytest_incarnate.Sandbox` configured from the test's
    ``@pytest.mark.incarnate(...)`` keywords (the default Spec without one), for running
    subprocesses inside a fresh incarnation: ``incarnation.run(["cmd", ...])``."""
    from pytest_incarnate.sandbox import Sandbox
    from pytest_incarnate.spec import Spec

    marker = request.node.get_closest_marker("incarnate")
    spec = Spec.from_kwargs("@pytest.mark.incarnate", **(marker.kwargs if marker else {}))
    return Sandbox(spec)
