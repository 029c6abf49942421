"""Parity: a suite of about 230 varied tests (tests/parity_suite/) gives the same outcome
counts and, per test and phase, the same outcome, failure message, report text, captured
sections, JUnit properties and warnings with and without ``--incarnate``, and with
``-n 2 --incarnate``.

The suite is copied into a pytester directory (``suite_conftest.py`` becomes ``conftest.py``,
``suite_*`` becomes ``test_*``) and run in subprocesses; ``parity_record.py`` (loaded with
``-p``) writes every report and warning to a JSON file, from the xdist controller when there
is one.  See tests/parity_suite/README.md for what the suite covers.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["pytester"]

REPO = Path(__file__).resolve().parent.parent
SUITE = Path(__file__).resolve().parent / "parity_suite"
PROBE = "test_env.py::test_probe_pid"          # prints its pid: 2 inside a sandbox
COMMON = ("-p", "parity_record", "-p", "no:cacheprovider", "--doctest-modules")
FIELDS = ("outcome", "message", "wasxfail", "longrepr", "sections", "user_properties")
OUTCOME_KEYS = ("passed", "failed", "skipped", "xfailed", "xpassed", "errors")


# -- known plugin bugs ------------------------------------------------------------------------
# A difference a known bug explains does not fail the test: the test ends as xfail naming the
# bug(s).  A known bug that no longer shows up fails the test, as a strict xfail would, so that
# its entry is removed.  Anything else fails the test.

@dataclass(frozen=True)
class Known:
    bug: str
    # (nodeid, when, field, value without sandbox, value sandboxed) -> explained by the bug?
    explains: Callable[[str, str, str, Any, Any], bool]


def _call_sections_dropped(nodeid: str, when: str, field: str, base: Any, other: Any) -> bool:
    return (when == "teardown" and field == "sections"
            and other == [s for s in base if not s[0].endswith(" call")])


def _call_properties_dropped(nodeid: str, when: str, field: str, base: Any, other: Any) -> bool:
    return when == "teardown" and field == "user_properties" and other == [] and base != []


KNOWN_BUGS = [
]


# The summary counts differ exactly as the known differences of outcome imply.
COUNTS_FOLLOW = Known("the summary counts differ only as the known differences above imply",
                      lambda *args: False)


def _explained_by(nodeid: str, when: str, field: str, base: Any, other: Any) -> Known | None:
    for known in KNOWN_BUGS:
        if known.explains(nodeid, when, field, base, other):
            return known
    return None


# -- running the suite ------------------------------------------------------------------------

def _target_name(name: str) -> str:
    if name == "suite_conftest.py":
        return "conftest.py"
    if name.startswith("suite_"):
        return "test_" + name[len("suite_"):]
    return name


def _copy_suite(dest: Path) -> None:
    for p in sorted(SUITE.iterdir()):
        # The suite's own conftest.py only keeps the project's run from collecting it.
        if p.is_file() and p.suffix in (".py", ".txt") and p.name != "conftest.py":
            (dest / _target_name(p.name)).write_text(p.read_text())


_ADDRESS = re.compile(r"0x[0-9a-f]{6,}")
_BASETEMP = re.compile(r"runpytest-\d+(/popen-gw\d+)?")  # xdist: a base temp per worker
_XDIST_HEADER = re.compile(r"\A\[gw\d+\] [^\n]* -- Python [^\n]*\n\n?")


def _normalize(value: Any) -> Any:
    """Object addresses and the run's base temporary directory differ between any two runs;
    xdist heads a failure's text with the worker ("[gw0] linux -- Python 3.11.7 ...", which
    the text's strip() then leaves the first line's indent)."""
    if isinstance(value, str):
        if _XDIST_HEADER.match(value):
            value = _XDIST_HEADER.sub("", value).strip()
        return _BASETEMP.sub("runpytest-N", _ADDRESS.sub("0x?", value))
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    return value


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, name: str, *args: str) -> dict[str, Any]:
    record = pytester.path / f"record-{name}.json"
    monkeypatch.setenv("PARITY_RECORD", str(record))
    start = time.monotonic()
    result = pytester.runpytest_subprocess(*COMMON, *args, timeout=120)
    elapsed = time.monotonic() - start
    assert record.exists(), f"{name}: no record written\n{result.stdout.str()}\n{result.stderr.str()}"
    data: dict[str, Any] = json.loads(record.read_text())
    data["counts"] = result.parseoutcomes()
    data["elapsed"] = elapsed
    return data


def _records(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in data["reports"]:
        nodeid = r["nodeid"] + (f" [subtest {r['subtest']}]" if r["subtest"] else "")
        key = (nodeid, r["when"])
        assert key not in out, f"two reports for {key}"
        rec = {f: _normalize(r[f]) for f in FIELDS}
        if r["nodeid"] == PROBE:
            rec["sections"] = None  # its output is its pid, which must differ
        out[key] = rec
    return out


def _category(nodeid: str, when: str, rec: dict[str, Any] | None) -> str | None:
    """The summary count a report adds to (None: none)."""
    if rec is None:
        return None
    if "[subtest " in nodeid:  # a failed subtest counts as failed; passed ones apart
        return "failed" if rec["outcome"] == "failed" else f"subtests {rec['outcome']}"
    if rec["wasxfail"] is not None:
        return "xfailed" if rec["outcome"] == "skipped" else "xpassed"
    if rec["outcome"] == "failed":
        return "failed" if when == "call" else "errors"
    if rec["outcome"] == "passed":
        return "passed" if when == "call" else None
    return "skipped"


@dataclass
class Difference:
    nodeid: str
    when: str
    field: str
    base: Any
    other: Any
    known: Known | None

    def show(self, mode: str) -> str:
        return f"{self.nodeid} {self.when} {self.field}:\n    no sandbox: {self.base!r}\n    {mode}: {self.other!r}"


def _differences(base: dict[str, Any], other: dict[str, Any]) -> list[Difference]:
    diffs: list[Difference] = []
    a, b = _records(base), _records(other)
    for nodeid, when in sorted(a.keys() | b.keys()):
        ra, rb = a.get((nodeid, when)), b.get((nodeid, when))
        if ra is None or rb is None:
            diffs.append(Difference(nodeid, when, "present", ra is not None, rb is not None,
                                    _explained_by(nodeid, when, "present", ra, rb)))
            continue
        for field in FIELDS:
            if ra[field] != rb[field]:
                diffs.append(Difference(nodeid, when, field, ra[field], rb[field],
                                        _explained_by(nodeid, when, field, ra[field], rb[field])))

    # The summary counts: a difference is known when the known report differences explain it.
    delta: dict[str, int] = {}
    for k in set(base["counts"]) | set(other["counts"]):
        d = other["counts"].get(k, 0) - base["counts"].get(k, 0)
        if d:
            delta[k] = d
    if delta:
        explained: dict[str, int] = {}
        moved = {(d.nodeid, d.when) for d in diffs
                 if d.known is not None and d.field in ("present", "outcome", "wasxfail")}
        for nodeid, when in moved:
            for rec, sign in ((a.get((nodeid, when)), -1), (b.get((nodeid, when)), +1)):
                cat = _category(nodeid, when, rec)
                if cat is not None:
                    explained[cat] = explained.get(cat, 0) + sign
        # Only what the summary line shows (it shows passed subtests with -q only).
        shown = set(base["counts"]) | set(other["counts"])
        explained = {k: v for k, v in explained.items() if v and k in shown}
        known = COUNTS_FOLLOW if moved and explained == delta else None
        diffs.append(Difference("<summary counts>", "", "counts", base["counts"], other["counts"], known))

    wa = sorted(tuple(w[k] or "" for k in ("nodeid", "when", "category", "message")) for w in base["warnings"])
    wb = sorted(tuple(w[k] or "" for k in ("nodeid", "when", "category", "message")) for w in other["warnings"])
    if wa != wb:
        diffs.append(Difference("<warnings>", "", "warnings", sorted(set(wa) - set(wb)), sorted(set(wb) - set(wa)),
                                None))
    return diffs


def _pids(data: dict[str, Any]) -> dict[str, int]:
    return {r["nodeid"]: r["pid"] for r in data["reports"]
            if r["when"] == "call" and r["pid"] is not None and not r["subtest"]}


def _probe_out(data: dict[str, Any]) -> str:
    for r in data["reports"]:
        if r["nodeid"] == PROBE and r["when"] == "call":
            return "".join(c for name, c in r["sections"] if name == "Captured stdout call")
    raise AssertionError(f"{PROBE} did not run")


@pytest.mark.parametrize("mode", ["--incarnate", "-n 2 --incarnate"])
def test_parity_with_and_without_incarnate(
    mode: str, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, leak_check: Any
) -> None:
    if mode.startswith("-n"):
        pytest.importorskip("xdist", reason="pytest-xdist is not installed: -n 2 --incarnate not compared")
    _copy_suite(pytester.path)
    # The subprocesses import the plugin from this checkout, whatever is installed.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))

    # Under xdist, the base runs under xdist too: its own round trip of the reports shows
    # (pytest 9.2 writes a subtest's keyword values as the repr of their repr), with or without
    # the plugin.
    base = _run(pytester, monkeypatch, "plain", *(mode.split()[:2] if mode.startswith("-n") else ()))
    data = _run(pytester, monkeypatch, "sandboxed", *mode.split())
    timings = f"no sandbox: {base['elapsed']:.1f}s, {mode}: {data['elapsed']:.1f}s"
    print(f"parity timings: {timings}")

    # The suite has every kind of outcome.
    assert sum(base["counts"].get(k, 0) for k in OUTCOME_KEYS) >= 200, base["counts"]
    for k in (*OUTCOME_KEYS, "warnings"):
        assert base["counts"].get(k, 0) > 0, f"the suite has no {k}: {base['counts']}"

    # The sandboxed run was sandboxed: every call phase ran as pid 2, none did without.
    base_pids, pids = _pids(base), _pids(data)
    assert base_pids and 2 not in base_pids.values(), base_pids
    assert "pid=2 " not in _probe_out(base), _probe_out(base)
    assert pids.keys() == base_pids.keys(), f"{mode}: not the same call phases"
    not_sandboxed = {n: p for n, p in pids.items() if p != 2}
    assert not not_sandboxed, f"{mode}: call phases not run as pid 2: {not_sandboxed}"
    assert _probe_out(data).startswith("pid=2 "), _probe_out(data)

    diffs = _differences(base, data)
    unexpected = [d for d in diffs if d.known is None]
    shown = "\n".join(d.show(mode) for d in unexpected[:40])
    more = f"\n... and {len(unexpected) - 40} more" if len(unexpected) > 40 else ""
    assert not unexpected, f"{mode}: {len(unexpected)} difference(s) ({timings}):\n{shown}{more}"
    gone = [k.bug for k in KNOWN_BUGS if not any(d.known is k for d in diffs)]
    assert not gone, f"{mode}: known bug(s) no longer seen, remove them from KNOWN_BUGS: {gone}"

    # Nothing the suite wrote outside its tmp_path stayed behind.
    assert not list(pytester.path.glob("parity-scratch-*"))
    assert not [e for e in os.listdir("/tmp") if e.startswith("parity-scratch-")]

    if diffs:
        by_bug: dict[str, list[str]] = {}
        for d in diffs:
            assert d.known is not None
            by_bug.setdefault(d.known.bug, []).append(f"{d.nodeid} {d.when} {d.field}".strip())
        pytest.xfail(" | ".join(f"{bug} [{len(where)}: {', '.join(sorted(set(where))[:3])}, ...]"
                                for bug, where in by_bug.items()))
