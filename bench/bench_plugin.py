#!/usr/bin/env python3
"""Per-test cost of ``pytest --incarnate`` against plain pytest, pytest-forked and bwrap.

The script writes a throwaway project (a temporary directory under /var/tmp, removed at
the end) with N trivial tests (``def test_0001(): pass``, default 300) and a second file
whose N tests each run ``bwrap --unshare-all --ro-bind / / --dev /dev --proc /proc true``
through ``subprocess.run``. Then it runs pytest on the project once per configuration and
round, each run in its own subprocess. One sample is the wall time of one whole run
(interpreter start to exit), measured with ``time.perf_counter_ns``:

  pytest 9 (the Python running this script, where pytest-incarnate is installed):
    plain          python -m pytest test_trivial.py
    --incarnate    python -m pytest --incarnate test_trivial.py   (full default isolation)
    bwrap          python -m pytest test_bwrap.py                 (each test starts bwrap)
  pytest 8 (a venv under /var/tmp: pytest>=8,<9, pytest-forked, and this checkout's
  pytest_incarnate; pytest-forked fails every test on pytest 9.2):
    plain          python -m pytest test_trivial.py
    --forked       python -m pytest --forked test_trivial.py      (a fork per test, no isolation)
    --incarnate    python -m pytest --incarnate test_trivial.py

Every run gets ``-q -p no:cacheprovider``, plus ``-p no:NAME`` for each of the timing-
distorting plugins benchmark, hypothesispytest and pytest_cov that is installed in that
Python. Of the plugins under test (incarnate, pytest_forked) a run loads only the one it
measures: the plain and bwrap lines run with ``-p no:incarnate`` (and ``-p no:pytest_forked``),
``--forked`` with ``-p no:incarnate``, ``--incarnate`` with ``-p no:pytest_forked``. So a line's
overhead is all that its plugin adds to plain pytest: import, session set-up and the per-test
work. (Loaded but inactive, pytest-incarnate made ``--forked`` 0.5 to 1 ms a test slower here.)

The configurations are interleaved: each round runs every configuration once, and the
starting one rotates from round to round. One untimed round runs first (page cache,
bytecode caches); in it the --incarnate runs write the plugin's JSON ledger, and the
script checks that every test got the full default isolation (all seven namespaces, the
copy-on-write root, no degradation). A run counts only if pytest's summary line says
that all N tests passed and nothing else happened (no failure, error, skip or xfail).

Per-test overhead = (the run's time - the plain run's time, same pytest, same round) / N.
The table gives its median and maximum over the rounds, and its ratio to pytest-forked's
median overhead. It also gives the same difference in CPU time: user + system of every
process of the run that was waited for (``getrusage(RUSAGE_CHILDREN)`` before and after),
which other load on the machine distorts less than the wall time. Kernel work done in
kworkers (tearing down a network namespace, for one) is not in it.

The venv is kept at /var/tmp/incarnate-bench/pytest8-venv and reused while it still fits
(pytest 8.x, pytest-forked, this checkout's package); ``--fresh-venv`` rebuilds it and
``--no-venv`` leaves the pytest 8 lines out. The package is not ``pip install -e``'d into
it: that would compile native/*.c and copy the extension into pytest_incarnate/ (setuptools'
editable build). Instead the venv gets a symlink to this checkout's pytest_incarnate/
(the same files the main Python's editable install imports) and a dist-info carrying its
``pytest11`` entry point, so pytest autoloads it as usual.

Usage: python bench/bench_plugin.py [--tests N] [--rounds R] [--quick] [--json [PATH]]
       [--venv DIR] [--fresh-venv | --no-venv]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_core import percentile  # the same interpolation as the other benchmarks
from filelock import FileLock, Timeout  # a dependency of the package: two runs never build the venv at once

REPO = Path(__file__).resolve().parent.parent
WORK = Path("/var/tmp/incarnate-bench")
VENV = WORK / "pytest8-venv"
BWRAP = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "true"]
DISTORTING = ("benchmark", "hypothesispytest", "pytest_cov")   # pytest11 entry point names
PLUGINS_UNDER_TEST = ("incarnate", "pytest_forked")
XDIST_PLUGINS = ("xdist", "xdist.looponfail")   # loaded only by the lines that use -n
ALL_NAMESPACES = {"user", "mount", "pid", "net", "uts", "ipc", "cgroup"}
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|warnings?|deselected|rerun)")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the project

def write_project(root: Path, n: int) -> None:
    (root / "pytest.ini").write_text("[pytest]\n")   # pins the rootdir: no ini or conftest above it
    (root / "test_trivial.py").write_text(
        '"""Trivial tests (generated by bench/bench_plugin.py)."""\n\n'
        + "".join(f"\ndef test_{i:04d}():\n    pass\n" for i in range(n)))
    (root / "test_bwrap.py").write_text(
        '"""Each test starts a bwrap sandbox (generated by bench/bench_plugin.py)."""\n\n'
        "import subprocess\n\n"
        f"BWRAP = {BWRAP!r}\n"
        + "".join(f"\n\ndef test_{i:04d}():\n    subprocess.run(BWRAP, check=True)\n" for i in range(n)))


# ------------------------------------------------------------------ interpreters

@dataclass
class Python:
    key: str                  # "9" or "8": the pytest line's suffix
    exe: str
    pytest: str = ""          # version
    plugins: list[str] = field(default_factory=list)   # pytest11 entry points installed
    skipped: str = ""

    def disabled(self) -> list[str]:
        return [name for name in DISTORTING if name in self.plugins]


def inspect_python(py: Python) -> str:
    """Fills in the pytest version and the installed pytest11 plugins; "" or why not."""
    code = ("import json, importlib.metadata as m, pytest; print(json.dumps([pytest.__version__, "
            "sorted({e.name for e in m.entry_points(group='pytest11')})]))")
    try:
        out = subprocess.run([py.exe, "-c", code], capture_output=True, text=True, check=False, timeout=60,
                             env=child_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{py.exe} cannot run: {e}"
    if out.returncode != 0:
        return f"{py.exe} cannot import pytest: {out.stderr.strip().splitlines()[-1:]}"
    py.pytest, py.plugins = json.loads(out.stdout)
    return ""


def child_env() -> dict[str, str]:
    """The environment for the runs, without what the calling pytest (and pytest-cov's
    subprocess coverage) would pass down."""
    drop = ("PYTEST_", "COV_CORE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for k in ("COVERAGE_PROCESS_START", "PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(k, None)
    return env


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _venv_fits(venv: Path, pkg: Path) -> str:
    """"" if the venv has pytest 8.x, pytest-forked, pytest-xdist and this checkout's pytest_incarnate."""
    exe = _venv_python(venv)
    if not exe.exists():
        return "no venv"
    code = ("import json, pytest, pytest_forked, xdist, pytest_incarnate, os; "
            "print(json.dumps([pytest.__version__, os.path.realpath(os.path.dirname(pytest_incarnate.__file__))]))")
    try:
        out = subprocess.run([str(exe), "-c", code], capture_output=True, text=True, check=False, timeout=60,
                             env=child_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if out.returncode != 0:
        return (out.stderr.strip().splitlines() or ["failed"])[-1]
    version, where = json.loads(out.stdout)
    if not version.startswith("8."):
        return f"pytest {version} in the venv"
    if where != str(pkg.resolve()):
        return f"its pytest_incarnate is {where}, not {pkg.resolve()}"
    return ""


def make_venv(venv: Path, fresh: bool, budget_s: float | None) -> str:
    """Creates (or reuses) the pytest 8 venv; returns "" or why it cannot be had."""
    import pytest_incarnate

    pkg = Path(pytest_incarnate.__file__).resolve().parent
    if not fresh and not _venv_fits(venv, pkg):
        log(f"reusing the venv {venv}")
        return ""
    log(f"creating the venv {venv} (pytest>=8,<9, pytest-forked, pytest-xdist)")
    shutil.rmtree(venv, ignore_errors=True)
    deadline = time.monotonic() + budget_s if budget_s else None

    def step(argv: list[str]) -> str:
        timeout = max(1.0, deadline - time.monotonic()) if deadline else 600.0
        try:
            out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout,
                                 env=child_env())
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(argv[:4])}...: {e}"
        if out.returncode != 0:
            tail = (out.stderr.strip() or out.stdout.strip()).splitlines()[-3:]
            return f"{' '.join(argv[:4])}... exited {out.returncode}: {' | '.join(tail)}"
        return ""

    why = step([sys.executable, "-m", "venv", str(venv)])
    exe = str(_venv_python(venv))
    why = why or step([exe, "-m", "pip", "install", "-q", "pytest>=8,<9", "pytest-forked", "pytest-xdist", "cffi",
                       "filelock"])
    if why:
        shutil.rmtree(venv, ignore_errors=True)
        return f"the pytest 8 venv could not be created{' in time' if 'timed out' in why else ''}: {why}"
    # pytest_incarnate: the checkout's files through a symlink, and its entry point
    dist = importlib.metadata.distribution("pytest-incarnate")
    site = Path(subprocess.run([exe, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "pytest_incarnate").symlink_to(pkg, target_is_directory=True)
    info = site / f"pytest_incarnate-{dist.version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(dist.read_text("METADATA") or f"Metadata-Version: 2.1\nName: pytest-incarnate\n"
                                   f"Version: {dist.version}\n")
    (info / "entry_points.txt").write_text("[pytest11]\nincarnate = pytest_incarnate.plugin\n")
    (info / "INSTALLER").write_text("bench_plugin.py (symlink to the checkout)\n")
    why = _venv_fits(venv, pkg)
    return f"the pytest 8 venv does not work: {why}" if why else ""


# ------------------------------------------------------------------ the configurations

@dataclass
class Config:
    key: str
    label: str
    py: Python
    options: list[str]
    testfile: str
    baseline: str             # key of the plain line of the same pytest ("" for a plain line)
    incarnate: bool = False
    skipped: str = ""
    others: tuple[str, ...] = PLUGINS_UNDER_TEST    # blocked, except the one this line measures
    samples_ns: dict[int, int] = field(default_factory=dict)   # round -> wall ns
    cpu_ns: dict[int, int] = field(default_factory=dict)       # round -> CPU ns of the run's process tree
    failures: list[str] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)
    isolation: dict[str, object] = field(default_factory=dict)
    xdist: int = 0            # workers (-n); 0: none, and the venv's xdist plugin is not loaded

    def argv(self, extra: list[str] | None = None) -> list[str]:
        blocked = self.py.disabled() + [name for name in self.others if name in self.py.plugins]
        if not self.xdist and self.py.key == "8":
            blocked += [name for name in XDIST_PLUGINS if name in self.py.plugins]
        disable = [a for name in blocked for a in ("-p", f"no:{name}")]
        workers = ["-n", str(self.xdist)] if self.xdist else []
        return [self.py.exe, "-m", "pytest", "-q", "-p", "no:cacheprovider", *disable, *workers, *self.options,
                *(extra or []), self.testfile]


def make_configs(main: Python, venv: Python, specs: list[tuple[str, list[str]]] | None = None,
                 xdist: int = 0) -> list[Config]:
    """The lines; ``specs`` adds a pytest 8 ``--incarnate`` line for each (label, [KEY=VALUE...]),
    run with those ``--incarnate-spec`` values (not checked for the full default isolation);
    ``xdist`` adds plain, ``--forked`` and ``--incarnate`` lines on pytest 8 with that many
    workers, each compared with the plain line under xdist."""
    if xdist:
        n = f" -n {xdist}"
        extra_x = [
            Config("plain8n", "plain" + n, venv, [], "test_trivial.py", "", xdist=xdist),
            Config("forked8n", "--forked" + n, venv, ["--forked"], "test_trivial.py", "plain8n",
                   others=("incarnate",), xdist=xdist),
            Config("incarnate8n", "--incarnate" + n, venv, ["--incarnate"], "test_trivial.py", "plain8n",
                   incarnate=True, others=("pytest_forked",), xdist=xdist),
        ]
    else:
        extra_x = []
    extra = [Config(f"spec{i}8", f"--incarnate {label}", venv,
                    ["--incarnate", *[a for kv in kvs for a in ("--incarnate-spec", kv)]],
                    "test_trivial.py", "plain8", others=("pytest_forked",))
             for i, (label, kvs) in enumerate(specs or [])]
    return [
        Config("plain9", "plain", main, [], "test_trivial.py", ""),
        Config("incarnate9", "--incarnate", main, ["--incarnate"], "test_trivial.py", "plain9", incarnate=True,
               others=("pytest_forked",)),
        Config("bwrap9", "bwrap in each test", main, [], "test_bwrap.py", "plain9"),
        Config("plain8", "plain", venv, [], "test_trivial.py", ""),
        Config("forked8", "--forked", venv, ["--forked"], "test_trivial.py", "plain8", others=("incarnate",)),
        Config("incarnate8", "--incarnate", venv, ["--incarnate"], "test_trivial.py", "plain8", incarnate=True,
               others=("pytest_forked",)),
        *extra,
        *extra_x,
    ]


def parse_summary(stdout: str) -> tuple[str, dict[str, int]]:
    lines = [ln.strip() for ln in stdout.splitlines() if ln.strip()]
    last = lines[-1].strip("= ") if lines else ""
    counts: dict[str, int] = {}
    for num, word in SUMMARY.findall(last):
        what = {"error": "errors", "warning": "warnings"}.get(word, word)
        counts[what] = counts.get(what, 0) + int(num)
    return last, counts


def _children_cpu_ns() -> int:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((ru.ru_utime + ru.ru_stime) * 1e9)


def run_once(cfg: Config, project: Path, n: int, extra: list[str] | None = None) -> tuple[int, int, str, str]:
    """One timed run: (wall ns, CPU ns, pytest's summary line, failure text or ""). The CPU time is
    user + system of every waited-for process of the run (pytest, its forks, the sandboxes, bwrap);
    kernel work done elsewhere (kworkers tearing down namespaces) is not in it."""
    argv = cfg.argv(extra)
    env = child_env()
    c0 = _children_cpu_ns()
    t0 = time.perf_counter_ns()
    try:
        out = subprocess.run(argv, cwd=project, capture_output=True, text=True, check=False, env=env,
                             timeout=120 + n)
    except subprocess.TimeoutExpired as e:
        return time.perf_counter_ns() - t0, _children_cpu_ns() - c0, "", f"timed out after {e.timeout:.0f} s"
    dt = time.perf_counter_ns() - t0
    cpu = _children_cpu_ns() - c0
    last, counts = parse_summary(out.stdout)
    bad = {k: v for k, v in counts.items() if k not in ("passed", "warnings")}
    if out.returncode != 0 or counts.get("passed") != n or bad:
        tail = (out.stdout.strip().splitlines() + out.stderr.strip().splitlines())[-6:]
        return dt, cpu, last, f"exit status {out.returncode}, summary {last!r}; last lines: {' | '.join(tail)}"
    return dt, cpu, last, ""


def check_isolation(cfg: Config, ledger: Path, n: int) -> str:
    """From the --incarnate-report ledger of the untimed round: "" if every test ran with
    all seven namespaces, the copy-on-write root and no degradation."""
    try:
        tests = json.loads(ledger.read_text())["tests"]
    except (OSError, ValueError, KeyError) as e:
        return f"no ledger ({e})"
    roots = sorted({t.get("root", "") for t in tests})
    namespaces = sorted(set().union(*(set(t.get("namespaces", [])) for t in tests))) if tests else []
    full = [t for t in tests if t.get("root") == "overlay" and set(t.get("namespaces", [])) == ALL_NAMESPACES
            and not t.get("degradations") and t.get("outcome") == "passed"]
    cfg.isolation = {"tests": len(tests), "full_default_isolation": len(full), "roots": roots,
                     "namespaces": namespaces,
                     "degradations": sorted({d.get("type", "?") for t in tests for d in t.get("degradations", [])})}
    if len(full) != n:
        return (f"{n - len(full)} of {n} tests did not get the full default isolation "
                f"(roots {roots}, namespaces {namespaces}, degradations {cfg.isolation['degradations']})")
    return ""


def measure(configs: list[Config], project: Path, n: int, rounds: int, warmup: int) -> None:
    live = [c for c in configs if not c.skipped]
    for w in range(warmup):
        for cfg in live:
            extra: list[str] = []
            ledger = project / f"ledger-{cfg.key}.json"
            if cfg.incarnate and w == 0:
                extra = ["--incarnate-report", str(ledger)]
            dt, _, last, err = run_once(cfg, project, n, extra)
            log(f"  warmup {cfg.key:<11} {dt / 1e9:7.3f} s  {last}")
            if cfg.incarnate and w == 0 and not err:
                err = check_isolation(cfg, ledger, n)
            if err:
                cfg.failures.append(f"untimed round {w + 1}: {err}")
    k = len(live)
    for r in range(rounds):
        for j in range(k):
            cfg = live[(r + j) % k]   # rotate the starting configuration
            dt, cpu, last, err = run_once(cfg, project, n)
            log(f"  round {r + 1}/{rounds} {cfg.key:<11} {dt / 1e9:7.3f} s  {last}")
            cfg.summaries.append(last)
            if err:
                cfg.failures.append(f"round {r + 1}: {err}")
            else:
                cfg.samples_ns[r] = dt
                cfg.cpu_ns[r] = cpu


# ------------------------------------------------------------------ figures

def summarize(configs: list[Config], n: int) -> dict[str, dict[str, object]]:
    by_key = {c.key: c for c in configs}
    out: dict[str, dict[str, object]] = {}
    for cfg in configs:
        d: dict[str, object] = {"label": cfg.label, "pytest": cfg.py.pytest or None, "python": cfg.py.exe,
                                "options": cfg.options, "testfile": cfg.testfile, "tests": n,
                                "baseline": cfg.baseline or None}
        if cfg.skipped:
            d["skipped"] = cfg.skipped
            out[cfg.key] = d
            continue
        d["argv"] = cfg.argv()
        d["runs"] = len(cfg.samples_ns)
        d["failures"] = len(cfg.failures)
        if cfg.failures:
            d["first_failure"] = cfg.failures[0]
        d["all_passed"] = not cfg.failures and len(cfg.samples_ns) == len(cfg.summaries) > 0
        d["summaries"] = cfg.summaries
        if cfg.isolation:
            d["isolation"] = cfg.isolation
        runs_s = [cfg.samples_ns[r] / 1e9 for r in sorted(cfg.samples_ns)]
        d["run_s"] = runs_s
        d["cpu_s"] = [cfg.cpu_ns[r] / 1e9 for r in sorted(cfg.cpu_ns)]
        if runs_s:
            d.update(run_median_s=percentile(runs_s, 0.5), run_max_s=max(runs_s),
                     ms_per_test=percentile(runs_s, 0.5) * 1000 / n)
        base = by_key.get(cfg.baseline)
        if base is not None and not base.skipped:
            over = [(cfg.samples_ns[r] - base.samples_ns[r]) / 1e6 / n
                    for r in sorted(cfg.samples_ns) if r in base.samples_ns]
            cpu_over = [(cfg.cpu_ns[r] - base.cpu_ns[r]) / 1e6 / n for r in sorted(cfg.cpu_ns) if r in base.cpu_ns]
            d["cpu_overhead_ms_per_test"] = cpu_over
            if cpu_over:
                d["cpu_overhead_median_ms"] = percentile(cpu_over, 0.5)
            d["overhead_ms_per_test"] = over
            if over:
                d.update(overhead_median_ms=percentile(over, 0.5), overhead_p99_ms=percentile(over, 0.99),
                         overhead_max_ms=max(over), overhead_min_ms=min(over))
        out[cfg.key] = d
    for field_, ratio in (("overhead_median_ms", "ratio_to_forked"), ("cpu_overhead_median_ms", "cpu_ratio_to_forked")):
        for key, d in out.items():
            # lines under xdist against pytest-forked under xdist, the others against pytest-forked
            ref = out.get("forked8n" if key.endswith("8n") else "forked8", {}).get(field_)
            med = d.get(field_)
            d[ratio] = (med / ref) if isinstance(med, float) and isinstance(ref, float) and ref > 0 else None
    return out


def table(results: dict[str, dict[str, object]]) -> str:
    rows = [("pytest", "line", "run median s", "run max s", "ms/test", "+ms/test median", "+ms/test max",
             "vs forked", "+CPU ms/test", "vs forked", "passed")]
    notes: list[str] = []
    for d in results.values():
        label, ver = str(d["label"]), str(d.get("pytest") or "8.x")
        if "skipped" in d:
            rows.append((ver, label, "skipped", "", "", "", "", "", "", "", ""))
            notes.append(f"pytest {ver} {label}: skipped: {d['skipped']}")
            continue
        passed = f"{d['runs']}/{len(d['summaries'])} runs" if d.get("summaries") else "0 runs"  # type: ignore[arg-type]
        if "run_median_s" not in d:
            rows.append((ver, label, "failed", "", "", "", "", "", "", "", passed))
        else:
            om = d.get("overhead_median_ms")
            ox = d.get("overhead_max_ms")
            ratio, cm, cr = d.get("ratio_to_forked"), d.get("cpu_overhead_median_ms"), d.get("cpu_ratio_to_forked")
            rows.append((ver, label, f"{d['run_median_s']:.3f}", f"{d['run_max_s']:.3f}", f"{d['ms_per_test']:.2f}",
                         f"{om:+.2f}" if isinstance(om, float) else "", f"{ox:+.2f}" if isinstance(ox, float) else "",
                         f"{ratio:.2f}x" if isinstance(ratio, float) else "",
                         f"{cm:+.2f}" if isinstance(cm, float) else "", f"{cr:.2f}x" if isinstance(cr, float) else "",
                         passed))
        if d.get("failures"):
            notes.append(f"pytest {ver} {label}: {d['failures']} failed runs (first: {d['first_failure']})")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = []
    for k, r in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(r[:2], widths[:2], strict=True)]
        cells += [c.rjust(w) for c, w in zip(r[2:], widths[2:], strict=True)]
        text.append("  ".join(cells).rstrip())
        if k == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text + ([""] + notes if notes else []))


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.rstrip() if out.returncode == 0 else ""


def _native_build() -> dict[str, object]:
    """Whether the imported C extension is newer than native/*.[ch] (else it is a stale build)."""
    import pytest_incarnate

    pkg = Path(pytest_incarnate.__file__).resolve().parent
    sos = sorted(pkg.glob("_native*.so"))
    srcs = list((REPO / "native").glob("*.[ch]"))
    if not sos or not srcs:
        return {"so": [str(p) for p in sos], "newer_than_sources": None}
    so_mtime = max(p.stat().st_mtime for p in sos)
    newest = max(srcs, key=lambda p: p.stat().st_mtime)
    return {"so": [str(p) for p in sos], "newer_than_sources": so_mtime >= newest.stat().st_mtime,
            "newest_source": newest.name}


def _version(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else None


# ------------------------------------------------------------------ main

PROJECT_DIR = "/var/tmp"
PROJECT_PREFIX = "bench-plugin-"


def _remove_dead_projects() -> None:
    """The projects of runs that were killed (a timeout's SIGKILL leaves no time to clean
    up): each is named after its run's pid; those whose process is gone are removed."""
    for entry in os.listdir(PROJECT_DIR):
        m = re.fullmatch(re.escape(PROJECT_PREFIX) + r"(\d+)-\w+", entry)
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(PROJECT_DIR, entry), ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--tests", type=int, default=None, help="trivial tests in the project (default 300; --quick: 20)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; --quick: 1)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="untimed rounds first (default 1; the first checks the isolation)")
    ap.add_argument("--quick", action="store_true",
                    help="the CI smoke form: 20 tests, 1 round; the pytest 8 venv is reused, or created only if that "
                         "takes under 25 s, else its lines are skipped")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write every figure as JSON to PATH; without PATH (or '-'), print the JSON on stdout "
                         "instead of the table")
    ap.add_argument("--venv", type=Path, default=VENV, help=f"the pytest 8 venv (default {VENV})")
    ap.add_argument("--fresh-venv", action="store_true", help="rebuild the pytest 8 venv even if it fits")
    ap.add_argument("--no-venv", action="store_true", help="leave out the pytest 8 lines (--forked among them)")
    ap.add_argument("--xdist", type=int, default=0, metavar="N",
                    help="also plain, --forked and --incarnate on pytest 8 with -n N (each against plain -n N)")
    ap.add_argument("--spec", action="append", default=[], metavar="LABEL:KEY=VALUE[;KEY=VALUE...]",
                    help="one more pytest 8 --incarnate line, with these --incarnate-spec values "
                         "(e.g. 'no net:namespaces=user,mount,pid,uts,ipc,cgroup'); may be repeated")
    args = ap.parse_args(argv)
    specs = []
    for arg in args.spec:
        label, sep, kvs = arg.partition(":")
        if not sep or not label or not all("=" in kv for kv in kvs.split(";")):
            ap.error(f"--spec {arg!r}: expected LABEL:KEY=VALUE[;KEY=VALUE...]")
        specs.append((label, kvs.split(";")))
    n = args.tests if args.tests is not None else (20 if args.quick else 300)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 5)
    if n < 1 or rounds < 1 or args.warmup < 0:
        ap.error("--tests and --rounds must be at least 1, --warmup at least 0")

    try:
        import pytest_incarnate  # noqa: F401
    except ImportError as e:
        print(f"pytest_incarnate cannot be imported: {e!r} (pip install -e .)", file=sys.stderr)
        return 1

    main_py = Python("9", sys.executable)
    why = inspect_python(main_py)
    if why:
        print(why, file=sys.stderr)
        return 1
    WORK.mkdir(parents=True, exist_ok=True)
    venv_py = Python("8", str(_venv_python(args.venv)))
    if args.no_venv:
        venv_py.skipped = "--no-venv"
    else:
        lock = FileLock(str(WORK / (args.venv.name + ".lock")), timeout=60 if args.quick else 900)
        try:
            with lock:
                venv_py.skipped = make_venv(args.venv, args.fresh_venv, 25.0 if args.quick else None)
        except Timeout:
            venv_py.skipped = f"another run held {lock.lock_file} (building the venv) for {lock.timeout:.0f} s"
        venv_py.skipped = venv_py.skipped or inspect_python(venv_py)
    configs = make_configs(main_py, venv_py, specs, args.xdist)
    for cfg in configs:
        if cfg.py.skipped:
            cfg.skipped = cfg.py.skipped
    if shutil.which("bwrap") is None:
        configs[2].skipped = "bwrap not found on PATH (apt-get install -y bubblewrap)"

    _remove_dead_projects()
    project = Path(tempfile.mkdtemp(prefix=f"{PROJECT_PREFIX}{os.getpid()}-", dir=PROJECT_DIR))
    started = time.time()
    load_before = os.getloadavg()
    try:
        write_project(project, n)
        log(f"{n} tests, {rounds} round(s) after {args.warmup} untimed; project {project}")
        measure(configs, project, n, rounds, args.warmup)
    finally:
        shutil.rmtree(project, ignore_errors=True)
    results = summarize(configs, n)

    dirty = _git("status", "--porcelain", "--", "pytest_incarnate", "native")
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "euid": os.geteuid(),
        "pytest_main": main_py.pytest, "pytest_venv": venv_py.pytest or None,
        "plugins_main": main_py.plugins, "plugins_venv": venv_py.plugins,
        "disabled_main": main_py.disabled(), "disabled_venv": venv_py.disabled(),
        "bwrap": _version(["bwrap", "--version"]) if shutil.which("bwrap") else None,
        "git_commit": _git("log", "-1", "--oneline"),
        "uncommitted_in_package_or_native": dirty.splitlines(),
        "native_build": _native_build(),
        "tests": n, "rounds": rounds, "warmup_rounds": args.warmup,
        "elapsed_s": round(time.time() - started, 1),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "argv": [os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]),
    }
    doc = {"env": env, "results": results}
    text = "\n".join([
        f"{n} tests per run, {rounds} interleaved round(s) after {args.warmup} untimed; Linux {env['kernel']}, "
        f"{env['cpus']} CPUs, Python {env['python']}, euid {env['euid']}; commit {env['git_commit'] or '?'}"
        + (" (+ uncommitted changes in pytest_incarnate/ or native/)" if dirty else "")
        + ("; the C extension is OLDER than native/" if env["native_build"]["newer_than_sources"] is False else ""),
        f"disabled plugins: pytest {main_py.pytest}: {' '.join(main_py.disabled()) or 'none'}"
        + (f"; pytest {venv_py.pytest}: {' '.join(venv_py.disabled()) or 'none'}" if venv_py.pytest else ""),
        ("+ms/test: (run - plain run of the same pytest, same round) / tests, wall clock; +CPU ms/test: the same "
         "with the CPU time (user + system) of the run's processes; vs forked: the median against pytest-forked's"),
        table(results),
    ])
    if args.json == "-":            # the JSON alone on stdout, the table on stderr
        log(text)
        json.dump(doc, sys.stdout, indent=2)
        print()
    else:
        print(text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(doc, f, indent=2)
                f.write("\n")
    measured = [d for d in results.values() if "skipped" not in d]
    bad = [d for d in measured if not d.get("all_passed")]
    bad += [d for k, d in results.items() if k == "incarnate9" and "skipped" in d]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
