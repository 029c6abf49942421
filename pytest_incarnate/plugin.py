"""pytest plugin: options and ini keys, the ``incarnate`` and ``requires_isolation`` markers,
hook registration, fixtures, the report header and summary.

Heavy modules are imported only when a test asks for isolation.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import pytest

from pytest_incarnate.options import add_options

if TYPE_CHECKING:
    from pytest_incarnate.layers import Layer
    from pytest_incarnate.probe import Capabilities
    from pytest_incarnate.sandbox import Sandbox

MARKER_HELP = (
    "incarnate(**spec): run the test's call phase inside a fresh incarnation (its keywords are "
    "pytest_incarnate.Spec fields: namespaces, hostname, binds, tmpfs, env, cwd, layers, memory, pids, "
    "cpu_quota, cpus, rlimits, timeout, strict, ...); incarnate(False) opts a test out of --incarnate. "
    "The root is the host's, copy-on-write. What the machine cannot grant skips the test with the reason "
    "(--incarnate-on-degraded)."
)
REQUIRES_HELP = (
    "requires_isolation(*capabilities): skip the test (or xfail, fail, per --incarnate-on-degraded) unless this "
    "machine grants them, with the probe's reason and fix; names as `pytest-incarnate probe` prints them "
    "(ns.user, overlay, cgroup.memory, ...) or userns, netns, ... for the namespaces"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    from pytest_incarnate import hooks

    pluginmanager.add_hookspecs(hooks)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    config.addinivalue_line("markers", REQUIRES_HELP)
    from pytest_incarnate.options import Settings
    from pytest_incarnate.report import Ledger
    from pytest_incarnate.runner import SETTINGS

    settings = Settings.from_config(config)
    config.stash[SETTINGS] = settings
    config.pluginmanager.register(Ledger(config, settings), "incarnate-ledger")


def pytest_sessionfinish(session: pytest.Session) -> None:
    import sys

    sandbox = sys.modules.get("pytest_incarnate.sandbox")
    if sandbox is not None:
        sandbox.reap_pending()  # the last sandboxed test's processes, on their way out
        sandbox.call_cache(False)


def pytest_report_header(config: pytest.Config) -> list[str]:
    from pytest_incarnate.probe import probe
    from pytest_incarnate.runner import settings_of

    try:
        caps = probe()
    except Exception as e:  # the header must never break a run
        return [f"incarnate: probe failed: {e}"]
    s = settings_of(config)
    lines = [f"incarnate: kernel {caps.kernel}, euid {caps.euid}; {caps.summary()}"]
    if s.all_tests or s.cli.kwargs or s.ini.kwargs:
        spec = ", ".join(f"{k}={v!r}" for k, v in {**s.ini.kwargs, **s.cli.kwargs}.items())
        lines.append(f"incarnate: {'every test' if s.all_tests else 'marked tests'} sandboxed; "
                     f"on degraded: {s.on_degraded}" + (f"; spec: {spec}" if spec else ""))
    return lines


def _sandboxed(item: pytest.Item) -> bool:
    from pytest_incarnate.runner import IN_CHILD, settings_of

    if item.stash.get(IN_CHILD, False):
        return False
    marker = item.get_closest_marker("incarnate")
    if marker is not None:
        return not (marker.args and marker.args[0] is False and not marker.kwargs)
    return settings_of(item.config).all_tests


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("requires_isolation")
    if marker is not None:
        from pytest_incarnate.report import check_requirements

        check_requirements(item, marker)


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
    """What this machine grants (see ``pytest-incarnate probe``); probed once per process
    (once per xdist worker)."""
    from pytest_incarnate.probe import probe

    return probe()


@pytest.fixture
def incarnation(request: pytest.FixtureRequest) -> Sandbox:
    """A :class:`~pytest_incarnate.Sandbox` configured like the test's own sandbox would be
    (ini, command line, then the ``@pytest.mark.incarnate(...)`` keywords), for running
    subprocesses inside a fresh incarnation: ``incarnation.run(["cmd", ...])``."""
    from pytest_incarnate.runner import settings_of
    from pytest_incarnate.sandbox import Sandbox
    from pytest_incarnate.spec import Spec

    marker = request.node.get_closest_marker("incarnate")
    kwargs, _ = settings_of(request.config).spec_kwargs(dict(marker.kwargs) if marker else {})
    request.node.ihook.pytest_incarnate_adjust_spec(item=request.node, kwargs=kwargs)
    return Sandbox(Spec.from_kwargs("@pytest.mark.incarnate", **kwargs))


class LayerFactory:
    """Builds :class:`~pytest_incarnate.layers.Layer` objects once per session; their content
    is cached on disk and shared by runs and xdist workers."""

    def __init__(self) -> None:
        self._made: dict[tuple[str, str], Layer] = {}

    def _once(self, kind: str, key: str, make: Any) -> Layer:
        if (kind, key) not in self._made:
            self._made[(kind, key)] = make()
        return self._made[(kind, key)]

    def from_dir(self, path: str) -> Layer:
        from pytest_incarnate.layers import Layer

        return self._once("dir", str(path), lambda: Layer.from_dir(str(path)))

    def from_tar(self, path: str) -> Layer:
        from pytest_incarnate.layers import Layer

        return self._once("tar", str(path), lambda: Layer.from_tar(str(path)))

    def from_callable(self, build: Any, key: str) -> Layer:
        from pytest_incarnate.layers import Layer

        return self._once("callable", key, lambda: Layer.from_callable(build, key=key))


@pytest.fixture(scope="session")
def incarnate_layers() -> LayerFactory:
    """A session-scoped factory of cached root layers: ``incarnate_layers.from_tar(path)``,
    ``.from_dir(path)``, ``.from_callable(fn, key=...)``; pass them as ``layers=[...]``."""
    return LayerFactory()


class TestChanges:
    """The filesystem changes of the requesting test's sandboxed call: ``.changes`` is a
    :class:`~pytest_incarnate.rootfs.Changes` once the call has ended (None before, or when
    the test did not run sandboxed)."""

    __test__ = False  # not a test class

    def __init__(self, item: pytest.Item) -> None:
        self._item = item

    @property
    def changes(self) -> Any:
        from pytest_incarnate.runner import CHANGES

        return self._item.stash.get(CHANGES, None)


@pytest.fixture
def incarnate_changes(request: pytest.FixtureRequest) -> TestChanges:
    """What the test's sandboxed call wrote, to check in a fixture's teardown:
    ``incarnate_changes.changes.assert_only_under("/etc/app")``."""
    return TestChanges(request.node)
