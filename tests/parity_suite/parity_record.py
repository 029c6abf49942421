"""Loaded with ``-p parity_record``: writes every test report (and every warning) of the run
to the JSON file named by $PARITY_RECORD, from the controller only under xdist."""

import json
import os

import pytest

_config = None
_reports = []
_warnings = []


def pytest_configure(config):
    global _config
    _config = config


def _controller():
    return _config is not None and not hasattr(_config, "workerinput")


def _message(report):
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        if crash is not None:
            return crash.message
        lines = report.longreprtext.strip().splitlines()
        return lines[-1] if lines else ""
    if report.skipped and isinstance(report.longrepr, tuple):
        return report.longrepr[2]
    return ""


def pytest_runtest_logreport(report):
    if not _controller():
        return
    # The plugin's own properties ("incarnate.*": namespaces, root) are extra by design.
    props = [list(p) for p in report.user_properties if p[0] != "parity_pid" and not str(p[0]).startswith("incarnate.")]
    pids = [p[1] for p in report.user_properties if p[0] == "parity_pid"]
    context = getattr(report, "context", None)  # a subtest's report (pytest 9)
    _reports.append({
        "nodeid": report.nodeid,
        "subtest": f"{context.msg} {context.kwargs}" if context is not None else None,
        "when": report.when,
        "outcome": report.outcome,
        "message": _message(report),
        "wasxfail": getattr(report, "wasxfail", None),
        "longrepr": report.longreprtext if report.longrepr is not None else "",
        "sections": [list(s) for s in report.sections],
        "user_properties": props,
        "pid": pids[-1] if pids else None,
    })


def pytest_warning_recorded(warning_message, when, nodeid, location):
    if not _controller():
        return
    _warnings.append({
        "nodeid": nodeid,
        "when": when,
        "category": warning_message.category.__name__,
        "message": str(warning_message.message),
    })


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item):
    # Runs in the process that runs the test body (the sandboxed child under --incarnate);
    # the last pid recorded is that process's.
    item.user_properties.append(("parity_pid", os.getpid()))


def pytest_sessionfinish(session, exitstatus):
    if not _controller():
        return
    with open(os.environ["PARITY_RECORD"], "w") as f:
        json.dump({"reports": _reports, "warnings": _warnings, "exitstatus": int(exitstatus)}, f, indent=1)
