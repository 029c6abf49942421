"""Reporting: the degradations summary, the JSON ledger (``--incarnate-report``) and the
``requires_isolation`` marker."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import pytest

from pytest_incarnate.options import Settings

ALIASES = {f"{ns}ns": f"ns.{ns}" for ns in ("user", "mount", "pid", "net", "uts", "ipc", "cgroup")}
ALIASES.update({"mntns": "ns.mount", "userns": "ns.user", "cgroup": "cgroup.v2"})


class Ledger:
    """Collects each sandboxed test's isolation record from its reports (under xdist, the
    workers' reports carry them to the controller)."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        self.records: dict[str, dict[str, Any]] = {}
        self.started = time.time()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        rec = getattr(report, "incarnate", None)
        if isinstance(rec, dict):
            rec = dict(rec)
            rec.setdefault("nodeid", report.nodeid)
            worker = getattr(report, "node", None)
            if worker is not None:
                rec["worker"] = getattr(worker, "gateway", worker).id if hasattr(worker, "gateway") else str(worker)
            self.records[report.nodeid] = rec

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        degraded = {k: r for k, r in self.records.items() if r.get("degradations")}
        if not degraded:
            return
        terminalreporter.write_sep("=", "incarnate: degradations")
        for nodeid, rec in sorted(degraded.items()):
            terminalreporter.write_line(f"{nodeid} ({rec.get('decision')}):")
            for d in rec["degradations"]:
                terminalreporter.write_line(f"    {d['type']}: {d['detail']}")

    @pytest.hookimpl
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        path = self.settings.report
        if not path or hasattr(self.config, "workerinput"):  # xdist workers: the controller writes it
            return
        path = os.path.join(str(self.config.invocation_params.dir), path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        doc = {"version": 1, "started": self.started, "finished": time.time(),
               "tests": [self.records[k] for k in sorted(self.records)]}
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def check_requirements(item: pytest.Item, marker: pytest.Mark) -> None:
    """``@pytest.mark.requires_isolation(...)``: act by policy when a capability is missing."""
    __tracebackhide__ = True
    from pytest_incarnate.probe import probe
    from pytest_incarnate.runner import apply_policy, settings_of

    caps = probe()
    names = [ALIASES.get(n, n) for n in marker.args]
    unknown = [n for n in names if n not in caps.names()]
    if unknown or not names:
        raise pytest.UsageError(
            f"{item.nodeid}: @pytest.mark.requires_isolation: unknown capability {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(caps.names())}, or userns, netns, ..." if unknown else
            f"{item.nodeid}: @pytest.mark.requires_isolation needs at least one capability name")
    missing = [caps[n] for n in names if not caps.granted(n)]
    if missing:
        reason = "incarnate: this machine does not grant " + "; ".join(c.line() for c in missing)
        policy = settings_of(item.config).on_degraded
        if policy == "run":
            return
        apply_policy(policy, reason)
