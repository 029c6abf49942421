"""The benchmark script runs and writes its figures (never a claim about speed)."""

from __future__ import annotations

import json
import subprocess
import sys
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
