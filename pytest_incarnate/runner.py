"""Runs a test item's call phase inside a sandbox and ships the report back.

Setup and teardown (fixtures) stay in the pytest process.  The call phase runs in a forked
child that enters the incarnation; there the usual hooks build the call report (so
assertion rewriting, xfail, skip and captured output behave as without the plugin), and
the report crosses the process boundary with ``pytest_report_to_serializable``.  Warnings
recorded inside, and coverage data measured inside, travel with it and are replayed in the
pytest process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import linecache
import os
import pickle
import re
import shutil
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import pytest

from pytest_incarnate.errors import Degradation, IncarnateError, SandboxCrashed, SandboxTimeout, SpecError
from pytest_incarnate.options import Settings
from pytest_incarnate.sandbox import Sandbox, call_cache, forked_enter, signal_name
from pytest_incarnate.spec import Bind, Spec

SETTINGS = pytest.StashKey[Settings]()
IN_CHILD = pytest.StashKey[bool]()
CHILD_REPORT = pytest.StashKey[Any]()
CRASH = pytest.StashKey[SandboxCrashed]()
CHANGES = pytest.StashKey[Any]()
STATS = pytest.StashKey[Any]()
RECORD = pytest.StashKey["IsolationRecord"]()

_EXTRA = "_incarnate_extra"  # the child's warnings and coverage data, beside its report


class SandboxedCallDone(pytest.skip.Exception):  # type: ignore[misc,name-defined]
    """Raised in the parent once the child's report is in; never shown to users (the
    report it would make is replaced by the child's)."""


@dataclass
class IsolationRecord:
    """What a sandboxed test asked for, was granted and used: the ledger's line, the
    ``pytest_incarnate_result`` hook's argument, and the report's ``incarnate`` attribute."""

    nodeid: str
    spec: dict[str, Any]
    namespaces: list[str] = field(default_factory=list)
    root: str = ""
    degradations: list[dict[str, str]] = field(default_factory=list)
    decision: str = "run"              # what the degradations did: run, skip, xfail, fail
    stats: dict[str, Any] | None = None
    changes: dict[str, int] | None = None
    duration: float = 0.0
    outcome: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def settings_of(config: pytest.Config) -> Settings:
    return config.stash.get(SETTINGS, Settings())


def _jsonable(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (frozenset, set)):
        return sorted(_jsonable(x) for x in v)
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict) or hasattr(v, "items"):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    return str(v)


def spec_summary(spec: Spec) -> dict[str, Any]:
    """The Spec's fields that differ from the defaults, as JSON values."""
    default = Spec()
    return {f.name: _jsonable(getattr(spec, f.name)) for f in dataclasses.fields(spec)
            if getattr(spec, f.name) != getattr(default, f.name)}


def spec_for(item: pytest.Item) -> Spec:
    """The Spec for an item: ini, command line and marker keywords merged (marker first),
    adjusted by ``pytest_incarnate_adjust_spec``, plus a read-write bind of the test's
    tmp_path when it uses one.  A bad value fails the test naming where it came from."""
    __tracebackhide__ = True
    marker = item.get_closest_marker("incarnate")
    if marker and marker.args:
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.incarnate takes keywords only (the Spec's fields), or a single False "
            f"to opt out; got {marker.args!r}"
        )
    kwargs, origin = settings_of(item.config).spec_kwargs(dict(marker.kwargs) if marker else {})
    before = dict(kwargs)
    item.ihook.pytest_incarnate_adjust_spec(item=item, kwargs=kwargs)
    for k in kwargs:
        if k not in before or kwargs[k] is not before[k]:
            origin[k] = "pytest_incarnate_adjust_spec"
    problem = None
    try:
        spec = Spec.from_kwargs("Spec", **kwargs)
    except SpecError as e:
        problem = f"{origin.get(e.field, '@pytest.mark.incarnate')}: {e}"
    except IncarnateError as e:
        problem = str(e)
    if problem is not None:
        pytest.fail(f"incarnate: {problem}", pytrace=False)
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


def _coverage() -> Any:
    """The coverage.py measurement running in this process (pytest-cov's), if any."""
    import sys

    if "coverage" not in sys.modules:
        return None
    try:
        return sys.modules["coverage"].Coverage.current()
    except Exception:
        return None


def _recording_list() -> list[Any] | None:
    """The list that warnings go to now (the innermost ``catch_warnings(record=True)``:
    pytest's own, or a ``recwarn``/``pytest.warns`` recorder), if any."""
    target = getattr(warnings, "_showwarnmsg_impl", None)
    log = getattr(target, "__self__", None)
    return log if isinstance(log, list) else None


class _LogreportRecorder:
    """In the child: stands in for the ``pytest_runtest_logreport`` hook during the call.
    Reports logged there (subtests) are shipped to the pytest process and logged there,
    where the terminal, JUnit XML and xdist see them; nothing is printed by the child."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.reports: list[Any] = []

    def __call__(self, report: Any) -> None:
        self.reports.append(self.config.hook.pytest_report_to_serializable(config=self.config, report=report))


def _child_body(item: pytest.Item) -> Any:
    """In the sandbox: run the call phase, build its report, and add what must be replayed
    in the pytest process (warnings recorded here, subtest reports, coverage data)."""
    item.stash[IN_CHILD] = True
    log = _recording_list()
    seen = len(log) if log is not None else 0
    recorder = _LogreportRecorder(item.config)
    # This process is a throwaway copy: its hook relay can be changed for good (on the
    # plugin manager's relay, and on config.hook, which may cache the hook caller).
    for relay in {id(r): r for r in (item.config.pluginmanager.hook, item.config.hook)}.values():
        setattr(relay, "pytest_runtest_logreport", recorder)  # noqa: B010 - HookRelay declares no such attribute
    call = pytest.CallInfo.from_call(lambda: item.ihook.pytest_runtest_call(item=item), when="call")
    report = item.ihook.pytest_runtest_makereport(item=item, call=call)
    if call.excinfo is not None and report.failed and item.config.getoption("usepdb", False):
        # --pdb: the post-mortem runs here, inside the sandbox, on the inherited terminal.
        item.ihook.pytest_exception_interact(node=item, call=call, report=report)
    data = item.config.hook.pytest_report_to_serializable(config=item.config, report=report)
    relayed = []
    if log is not None and _recording_list() is log:
        for w in log[seen:]:
            message, category = w.message, w.category
            try:
                pickle.loads(pickle.dumps((message, category)))
            except Exception:
                message, category = str(message), UserWarning
            relayed.append((message, category, w.filename, w.lineno, w.line))
    cov_data = None
    cov = _coverage()
    if cov is not None:
        try:
            cov.stop()
            cov_data = cov.get_data().dumps()
        except Exception:
            cov_data = None
    data[_EXTRA] = {"warnings": relayed, "coverage": cov_data, "logreports": recorder.reports}
    return data


def _replay(item: pytest.Item, extra: dict[str, Any]) -> None:
    """In the pytest process: hand the child's warnings to the active recorder (pytest's,
    for the test and the summary), log its subtest reports, and merge its coverage data
    into the running measurement."""
    log = _recording_list()
    for message, category, filename, lineno, line in extra.get("warnings", ()):
        if log is not None:
            log.append(warnings.WarningMessage(message, category, filename, lineno, None, line))
        else:
            warnings.warn_explicit(message, category, filename, lineno)
    capman = item.config.pluginmanager.getplugin("capturemanager")
    for data in extra.get("logreports", ()):
        rep = item.config.hook.pytest_report_from_serializable(config=item.config, data=data)
        if rep is None:
            continue
        _keep_subtest_kwargs(rep, data)
        if rep.failed and rep.nodeid == item.nodeid and rep.when == "call":
            _count_failed_subtest(item)
        # As the subtests do: the terminal's progress letter is not the test's output.
        with capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext():
            item.ihook.pytest_runtest_logreport(report=rep)
    data = extra.get("coverage")
    cov = _coverage() if data else None
    if cov is not None and data is not None:
        try:
            from coverage import CoverageData

            other = CoverageData(no_disk=True)
            other.loads(data)
            cov.get_data().update(other)
        except Exception as e:
            warnings.warn(f"incarnate: the coverage data of a sandboxed test could not be merged: {e!r}", stacklevel=1)


def _keep_subtest_kwargs(rep: Any, data: dict[str, Any]) -> None:
    """pytest 9.2's subtest context turns its keyword values into their repr when it is made,
    and again when it is read back from its serialized form: ``i=0`` would be shown as
    ``i='0'``.  The values as the child had them (reprs already) are put back."""
    context = getattr(rep, "context", None)
    shipped = data.get("_subtest.context")
    if context is not None and isinstance(shipped, dict) and isinstance(shipped.get("kwargs"), dict):
        try:
            object.__setattr__(context, "kwargs", dict(shipped["kwargs"]))
        except (AttributeError, TypeError):
            pass


def _count_failed_subtest(item: pytest.Item) -> None:
    """pytest's subtests count a test's failed subtests in the config's stash (the parent
    turns a passing test with failed subtests into a failure); no public hook does this."""
    try:
        from _pytest.subtests import failed_subtests_key  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pytest without built-in subtests
        return
    counts = item.config.stash.get(failed_subtests_key, None)
    if counts is not None:
        # Keyed by the nodeid string up to pytest 9.1, by the structured NodeId (``.id``,
        # a property of nodes) since 9.2.
        key = item.id if isinstance(getattr(type(item), "id", None), property) else item.nodeid  # type: ignore[attr-defined,unused-ignore]
        counts[key] += 1


def decide(item: pytest.Item, degradations: tuple[Degradation, ...]) -> str:
    """What the degradations do to this test: the hook's answer, or the policy."""
    policy = settings_of(item.config).on_degraded
    answer = item.ihook.pytest_incarnate_degraded(item=item, degradations=degradations, policy=policy)
    if answer is None:
        return policy
    if answer not in ("skip", "xfail", "fail", "run"):
        raise pytest.UsageError(f"pytest_incarnate_degraded returned {answer!r}; expected skip, xfail, fail, run or None")
    return str(answer)


def apply_policy(decision: str, reason: str) -> None:
    """Skip, xfail or fail the running test with ``reason`` (nothing for "run")."""
    __tracebackhide__ = True
    if decision == "skip":
        try:
            raise pytest.skip.Exception(reason, _use_item_location=True)
        except TypeError:  # pragma: no cover - a pytest without the keyword
            pytest.skip(reason)
    elif decision == "xfail":
        pytest.xfail(reason)
    elif decision == "fail":
        pytest.fail(reason, pytrace=False)


def run_call_sandboxed(item: pytest.Item) -> None:
    """Run ``item``'s call phase inside; raise SandboxedCallDone once the report is in."""
    __tracebackhide__ = True
    spec = spec_for(item)
    sandbox = Sandbox(spec)
    record = IsolationRecord(item.nodeid, spec_summary(spec))
    item.stash[RECORD] = record
    _warm_linecache(item)
    try:
        plan = sandbox.plan()
        cgroup = sandbox._cgroup()
    except IncarnateError as e:  # strict: what the machine cannot grant is an error
        record.decision = "fail"
        pytest.fail(f"incarnate (strict): {type(e).__name__}: {e}", pytrace=False)
    record.namespaces = list(plan.namespaces)
    record.root = plan.root
    degradations = plan.degradations + cgroup[1]
    record.degradations = [{"type": type(d).__name__, "detail": d.describe()} for d in degradations]
    if degradations:
        record.decision = decide(item, degradations)
        if record.decision != "run":
            from pytest_incarnate.sandbox import _release_cgroup

            _release_cgroup(cgroup[0])
            apply_policy(record.decision, "incarnate: " + "; ".join(d.describe() for d in degradations))
    n_props = len(item.user_properties)
    t0 = time.monotonic()
    try:
        call_cache(True)  # until the session ends (plugin.pytest_sessionfinish)
        out = forked_enter(sandbox, lambda: _child_body(item), plan=plan, cgroup=cgroup, reap_later=True)
    except SandboxCrashed as e:
        record.duration = time.monotonic() - t0
        item.stash[CRASH] = e
        raise SandboxedCallDone("crashed") from None
    record.duration = time.monotonic() - t0
    if out.kind != "ok":  # the reporting itself failed in the child
        raise out.value
    new = out.plan.degradations[len(plan.degradations):]
    if new:  # found while running (a refused clone retried with less): reported, not acted on
        record.degradations += [{"type": type(d).__name__, "detail": d.describe()} for d in new]
    item.stash[CHANGES] = out.changes
    item.stash[STATS] = out.stats
    if out.changes is not None:
        record.changes = {k: len(out.changes.paths(k)) for k in ("created", "modified", "deleted", "metadata")}
    if out.stats is not None:
        record.stats = _jsonable(out.stats)
    data = dict(out.value)
    _replay(item, data.pop(_EXTRA, {}))
    item.stash[CHILD_REPORT] = (data, n_props)
    raise SandboxedCallDone("done")


def _keep_upper(item: pytest.Item, changes: Any) -> str | None:
    """--incarnate-keep-upper: save a failed test's changes; where they went."""
    where = settings_of(item.config).keep_upper
    if where is None or changes is None:
        return None
    if where == "":
        cache = getattr(item.config, "cache", None)
        where = str(cache.mkdir("incarnate-upper")) if cache is not None else os.path.join(
            str(item.config.rootpath), ".incarnate-upper")
    dest = os.path.join(where, re.sub(r"[^\w.-]+", "_", item.nodeid).strip("_")[:200])
    shutil.rmtree(dest, ignore_errors=True)
    changes.save(dest)
    return dest


def _finish(item: pytest.Item, report: pytest.TestReport) -> pytest.TestReport:
    """Attach the isolation record to the report (ledger, xdist) and to the test's JUnit
    properties, and show it to the ``pytest_incarnate_result`` hook."""
    record = item.stash.get(RECORD, None)
    if record is None:
        return report
    del item.stash[RECORD]
    record.outcome = "xfailed" if hasattr(report, "wasxfail") and report.skipped else report.outcome
    report.incarnate = record.to_json()  # type: ignore[attr-defined]
    props = [("incarnate.namespaces", " ".join(record.namespaces)), ("incarnate.root", record.root)]
    if record.degradations:
        props.append(("incarnate.degradations", "; ".join(d["detail"] for d in record.degradations)))
        props.append(("incarnate.decision", record.decision))
    item.user_properties.extend(props)  # JUnit XML takes them from the teardown report
    item.ihook.pytest_incarnate_result(item=item, record=record)
    return report


def replace_report(item: pytest.Item, report: pytest.TestReport) -> pytest.TestReport:
    """In the parent: the call report made in the child, or a failure naming the crash."""
    stashed = item.stash.get(CHILD_REPORT, None)
    if stashed is not None:
        del item.stash[CHILD_REPORT]
        data, n_props = stashed
        rep: pytest.TestReport = item.config.hook.pytest_report_from_serializable(config=item.config, data=data)
        rep.sections = list(rep.sections)
        # What the call added to the item shows in the later reports too (teardown's, which
        # JUnit XML reads): its captured output and its recorded properties.
        for title, content in rep.sections:
            m = re.fullmatch(r"Captured (\w+) call", title)
            if m:
                item.add_report_section("call", m.group(1), content)
        for prop in list(rep.user_properties)[n_props:]:
            item.user_properties.append(tuple(prop))  # type: ignore[arg-type]
        stats = item.stash.get(STATS, None)
        if rep.failed and stats is not None and stats.pids_limit_hits:
            # A failure that may come from refused forks says so.
            rep.sections.append(("incarnate", f"{stats.pids_limit_hits} fork(s) refused by the pids limit "
                                              f"(pids={stats.pids_limit})"))
        if rep.failed:
            kept = _keep_upper(item, item.stash.get(CHANGES, None))
            if kept:
                rep.sections.append(("incarnate", f"what the test wrote is kept in {kept}"))
        return _finish(item, rep)
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
        return _finish(item, report)
    return _finish(item, report)
