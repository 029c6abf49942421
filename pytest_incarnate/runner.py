"""Runs a test item's call phase inside a sandbox and ships the report back.

Setup and teardown (fixtures) stay in the pytest process.  The call phase runs in a forked
child that enters the incarnation; there the usual hooks build the call report (so
assertion rewriting, xfail, skip and captured output behave as without the plugin), and
the report crosses the process boundary with ``pytest_report_to_serializable``.
"""

from __future__ import annotations

import linecache
import os

from typing import Any

import pytest

from pytest_incarnate.errors import NamespaceSkipped, SandboxCrashed, SandboxTimeout
from pytest_incarnate.sandbox import Sandbox, forked_enter, signal_name
from pytest_incarnate.spec import Bind, Spec

IN_CHILD = pytest.StashKey[bool]()
CHILD_REPORT = pytest.StashKey[Any]()
CRASH = pytest.StashKey[SandboxCrashed]()
CHANGES = pytest.StashKey[Any]()
STATS = pytest.StashKey[Any]()

class SandboxedCallDone(pytest.skip.Exception):  # type: ignore[misc,name-defined]
    """Raised in the parent once the child's report is in; never shown to users (the
    report it would make is replaced by the child's)."""

def spec_for(item: pytest.Item) -> Spec:
    """The Spec for an item: its ``incarnate`` marker's keywords, plus a read-write bind
    of the test's tmp_path when it uses one."""
    marker = item.get_closest_marker("incarnate")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
    if marker and marker.args:
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.incarnate takes keywords only (the Spec's fields), got {marker.args!r}"
        )
    spec = Spec.from_kwargs("@pytest.mark.incarnate", **kwargs)
    funcargs = getattr(item, "funcargs", {})
    extra = []
    # The project stays readable inside (tracebacks read its source) even when it lives
    # under a path the spec hides with a tmpfs (a project under /tmp, say).  With the
    # copy-on-write root the working directory is overlaid there already.
    rootdir = str(item.config.rootpath)
    cow_cwd = spec.copy_on_write and not spec.custom_root and spec.cwd is None and rootdir == os.getcwd()
    if spec.mount_root_hides(rootdir) and not cow_cwd:
        extra.append(Bind(rootdir, readonly=True))
    for name in ("tmp_path", "tmpdir"):
        if name in funcargs:
            extra.append(Bind(str(funcargs[name])))
    if extra:
        spec = spec.replace(binds=tuple(spec.binds) + tuple(extra))
    return spec

def _warm_linecache(item: pytest.Item) -> None:
    path = getattr(item, "path", None)
    if path is not None:
        linecache.getlines(str(path))

def _child_body(item: pytest.Item) -> Any:
    item.stash[IN_CHILD] = True
    call = pytest.CallInfo.from_call(lambda: item.ihook.pytest_runtest_call(item=item), when="call")
    report = item.ihook.pytest_runtest_makereport(item=item, call=call)
    return item.config.hook.pytest_report_to_serializable(config=item.config, report=report)

def run_call_sandboxed(item: pytest.Item) -> None:
    """Run ``item``'s call phase inside; raise SandboxedCallDone once the report is in."""
    sandbox = Sandbox(spec_for(item))
    _warm_linecache(item)
    plan = sandbox.plan()
    missing = [d for d in plan.degradations if isinstance(d, NamespaceSkipped)]
    if missing:
        reason = "incarnate: " + "; ".join(d.describe() for d in missing)
        try:
            raise pytest.skip.Exception(reason, _use_item_location=True)
        except TypeError:  # pragma: no cover - a pytest without the keyword
            pytest.skip(reason)
    try:
        out = forked_enter(sandbox, lambda: _child_body(item))
    except SandboxCrashed as e:
        item.stash[CRASH] = e
        raise SandboxedCallDone("crashed") from None
    if out.kind != "ok":  # the reporting itself failed in the child
        raise out.value
    item.stash[CHANGES] = out.changes
    item.stash[STATS] = out.stats
    item.stash[CHILD_REPORT] = out.value
    raise SandboxedCallDone("done")

def replace_report(item: pytest.Item, report: pytest.TestReport) -> pytest.TestReport:
    """In the parent: the call report made in the child, or a failure naming the crash."""
    data = item.stash.get(CHILD_REPORT, None)
    if data is not None:
        del item.stash[CHILD_REPORT]
        rep: pytest.TestReport = item.config.hook.pytest_report_from_serializable(config=item.config, data=data)
        rep.sections = list(rep.sections)
        stats = item.stash.get(STATS, None)
        if rep.failed and stats is not None and stats.pids_limit_hits:
            # A failure that may come from refused forks says so.
            rep.sections.append(("incarnate", f"{stats.pids_limit_hits} fork(s) refused by the pids limit "
                                              f"(pids={stats.pids_limit})"))
        return rep
    crash = item.stash.get(CRASH, None)
    if crash is not None:
        del item.stash[CRASH]
        report.outcome = "failed"
        if isinstance(crash, SandboxTimeout):
            msg = f"sandboxed test {crash.cause}"
        elif "was stopped: " in crash.cause:
            msg = "sandboxed test " + crash.cause.split("was stopped: ", 1)[1]
        elif crash.signal:
            name = signal_name(crash.signal)
            msg = f"sandboxed test crashed: killed by signal {crash.signal} ({name})"
        else:
            msg = f"sandboxed test crashed: exited with status {crash.returncode} (os._exit or a fatal error) before reporting"
        report.longrepr = msg
        return report
    return report

