"""The benchmark script runs and writes its figures (never a claim about speed)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_core.py"


def test_bench_core_runs_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--runs", "5", "--warmup", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    results = json.loads(out.read_text())["results"]
    for key in ("incarnate_run", "incarnate_spawn", "incarnate_cow", "incarnate_ro", "subprocess"):
        assert results[key].get("median_ms", 0) > 0, (key, results[key])
        assert results[key]["failures"] == 0, (key, results[key])
    for key in ("unshare", "bwrap", "bwrap_ro", "bwrap_overlay"):   # measured, or skipped with a reason
        assert "median_ms" in results[key] or results[key].get("skipped"), (key, results[key])
        if "median_ms" in results[key]:
            assert results[key]["median_ms"] > 0, (key, results[key])


PLUGIN_BENCH = BENCH.parent / "bench_plugin.py"
PLUGIN_LINES = ("plain9", "incarnate9", "bwrap9", "plain8", "forked8", "incarnate8")


def _summary_counts(line: str) -> dict[str, int]:
    """pytest's final summary line ("20 passed in 0.41s", "1 failed, 19 passed, 1 warning in ...") as
    counts, warnings left out."""
    return {word: int(num) for num, word in re.findall(r"(\d+) ([a-z]+)", line) if not word.startswith("warning")}


def test_bench_plugin_quick_runs_every_configuration() -> None:
    # A project left by a killed run (its pid gone) is removed by the next run; a live run's stays.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(tempfile.mkdtemp(prefix=f"bench-plugin-{dead.pid}-", dir="/var/tmp"))
    (stale / "test_trivial.py").write_text("def test_0000():\n    pass\n")
    live = Path(tempfile.mkdtemp(prefix=f"bench-plugin-{os.getpid()}-", dir="/var/tmp"))
    try:
        proc = subprocess.run(
            [sys.executable, str(PLUGIN_BENCH), "--quick", "--json"],
            capture_output=True, text=True, check=False, timeout=180,
        )
        assert not stale.exists() and live.exists()
    finally:
        shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(live, ignore_errors=True)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    doc = json.loads(proc.stdout)   # --json without a path: the JSON alone on stdout
    env, results = doc["env"], doc["results"]
    n = env["tests"]
    assert n == 20 and env["rounds"] == 1, env
    assert env["pytest_main"] and env["git_commit"], env
    assert set(results) == set(PLUGIN_LINES), sorted(results)
    for key in PLUGIN_LINES:
        d = results[key]
        if (key.endswith("8") or key == "bwrap9") and "skipped" in d:   # no venv in time, or no bwrap: says why
            assert d["skipped"], (key, d)
            continue
        assert "skipped" not in d, (key, d)
        assert d["all_passed"] and d["failures"] == 0 and d["runs"] == 1, (key, d)
        assert d["argv"][-1] == d["testfile"], (key, d)
        for line in d["summaries"]:   # every timed run: all n tests passed, nothing else
            assert _summary_counts(line) == {"passed": n}, (key, line)
        assert d["run_median_s"] > 0, (key, d)
        if key.startswith("plain"):
            assert d["baseline"] is None, (key, d)
        else:   # measured against its plain line: a figure, never a claim about which is faster
            assert d["baseline"] == "plain" + key[-1], (key, d)
            assert isinstance(d["overhead_median_ms"], float), (key, d)
            assert len(d["overhead_ms_per_test"]) == 1, (key, d)
    for key in ("incarnate9", "incarnate8"):   # the untimed round checked the isolation from the ledger
        if "skipped" in results[key]:
            continue
        iso = results[key]["isolation"]
        assert iso["tests"] == n and iso["full_default_isolation"] == n, (key, iso)
        assert iso["roots"] == ["overlay"] and not iso["degradations"], (key, iso)
        assert iso["namespaces"] == ["cgroup", "ipc", "mount", "net", "pid", "user", "uts"], (key, iso)
    if "skipped" not in results["forked8"]:
        assert env["pytest_venv"].startswith("8."), env
        assert all("ratio_to_forked" in d for d in results.values())
