"""The C core under AddressSanitizer and UndefinedBehaviorSanitizer.

``INCARNATE_SANITIZE=1 python native/build_ffi.py`` builds the core with
``-fsanitize=address,undefined``.  Here that build is made in a copy of the package (never
over the package's own extension), checked to be instrumented, shown to catch a real
overflow (a positive control), and then the core's own tests (tests/test_sandbox.py) run
against it, with libasan preloaded into the (uninstrumented) Python, leak detection off
(Python leaks by design), and every report written to a log directory that must stay empty.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ERRORS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer", "SUMMARY: UndefinedBehaviorSanitizer")


def _runtime(name: str) -> str | None:
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        return None
    path = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


LIBASAN = _runtime("libasan.so")
LIBUBSAN = _runtime("libubsan.so")
pytestmark = pytest.mark.skipif(
    LIBASAN is None or LIBUBSAN is None,
    reason="the C compiler has no AddressSanitizer/UBSan runtime (gcc -print-file-name=libasan.so, libubsan.so)",
)


@pytest.fixture(scope="module")
def sanitized() -> Iterator[dict[str, object]]:
    """A copy of the package with the core built by ``INCARNATE_SANITIZE=1 native/build_ffi.py``.

    It lives under /var/tmp, not /tmp (the sandboxes hide /tmp).  The sanitizers' reports go
    to files /dev/shm/incarnate-sanitize-<token>.<pid>: a log file is opened by whichever
    process reports, and /dev/shm is writable in every sandbox too (a fresh tmpfs there, so
    a report from inside a sandbox is lost: that is why every sanitizer error also aborts,
    failing the test).  Payloads started by the tests inherit LD_PRELOAD; their libasan
    only warns about the payload's own stack (see test_core_tests_pass_under_the_sanitizers)."""
    root = Path(tempfile.mkdtemp(prefix="incarnate-sanitize-", dir="/var/tmp"))
    try:
        ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.o")
        shutil.copytree(REPO / "pytest_incarnate", root / "pytest_incarnate", ignore=ignore)
        shutil.copytree(REPO / "native", root / "native", ignore=ignore)
        env = dict(os.environ, INCARNATE_SANITIZE="1")
        build = subprocess.run([sys.executable, str(root / "native" / "build_ffi.py")], cwd=root, env=env,
                               capture_output=True, text=True, timeout=300)
        assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
        libs = list((root / "pytest_incarnate").glob("_native*.so"))
        assert len(libs) == 1, libs
        logs = f"/dev/shm/incarnate-sanitize-{root.name.rsplit('-', 1)[-1]}"
        run_env = dict(
            os.environ,
            PYTHONPATH=str(root),
            LD_PRELOAD=str(LIBASAN),
            ASAN_OPTIONS=f"detect_leaks=0:halt_on_error=1:log_path={logs}",
            UBSAN_OPTIONS=f"print_stacktrace=1:halt_on_error=1:log_path={logs}",
            PYTHONMALLOC="malloc",  # cffi's buffers from malloc, so that ASan puts redzones around them
        )
        yield {"root": root, "lib": libs[0], "build": build.stdout + build.stderr, "env": run_env, "logs": logs}
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for p in glob.glob("/dev/shm/incarnate-sanitize-*"):
            if p.startswith(f"/dev/shm/incarnate-sanitize-{root.name.rsplit('-', 1)[-1]}."):
                os.unlink(p)


def test_the_switch_builds_with_both_sanitizers(sanitized: dict[str, object]) -> None:
    # What the library holds, not what the build printed (newer setuptools do not echo the
    # compiler's command lines): linked against both runtimes, and instrumented by both.
    needed = subprocess.run(["ldd", str(sanitized["lib"])], capture_output=True, text=True).stdout
    assert "libasan.so" in needed and "libubsan.so" in needed, needed
    symbols = subprocess.run(["nm", "-D", "--undefined-only", str(sanitized["lib"])],
                             capture_output=True, text=True, check=True).stdout
    assert "__asan_report_" in symbols, symbols[-2000:]      # loads and stores are checked
    assert "__ubsan_handle_" in symbols, symbols[-2000:]     # undefined behaviour is checked
    symbols = subprocess.run(["nm", "-D", "--undefined-only", str(sanitized["lib"])], capture_output=True, text=True).stdout
    assert "__asan_report_" in symbols and "__ubsan_handle_" in symbols  # instrumented code calls them


def _run(sanitized: dict[str, object], args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    # Not from the repository's root, whose own package would come first on sys.path.
    return subprocess.run([sys.executable, *args], cwd=REPO / "tests", env=sanitized["env"],  # type: ignore[arg-type]
                          capture_output=True, text=True, timeout=timeout)


def _reports(sanitized: dict[str, object]) -> str:
    return "".join(Path(p).read_text(errors="replace") for p in sorted(glob.glob(f"{sanitized['logs']}.*")))


def test_the_sanitized_core_is_the_one_imported(sanitized: dict[str, object]) -> None:
    r = _run(sanitized, ["-c", "import pytest_incarnate._native as n; print(n.__file__)"], 60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(sanitized["lib"])


def test_positive_control_an_overflow_is_reported(sanitized: dict[str, object], tmp_path: Path) -> None:
    """An id map without its terminating NUL: the core's strlen reads past the buffer, and
    AddressSanitizer says so (in a scratch log directory, not the one the suite checks)."""
    logs = tmp_path / "control"
    logs.mkdir()
    env = dict(sanitized["env"], ASAN_OPTIONS=f"detect_leaks=0:log_path={logs}/asan")  # type: ignore[arg-type]
    code = textwrap.dedent("""
        from pytest_incarnate import _ffi
        n = _ffi.Native(ns=("user",), ops=[], uid_map="0 0 1", gid_map="0 0 1", use_init=False)
        spec = n.build()
        bad = _ffi.ffi.new("char[5]", b"0 0 1")  # no room for the NUL
        spec.uid_map = bad
        res = _ffi.ffi.new("struct inc_result *")
        _ffi.lib.inc_spawn(spec, res)
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO / "tests", env=env, capture_output=True, text=True,
                       timeout=60)
    report = "".join(p.read_text(errors="replace") for p in logs.iterdir())
    assert r.returncode != 0
    assert "ERROR: AddressSanitizer: heap-buffer-overflow" in report, (r.stderr[-2000:], report[-2000:])
    assert "parent_write_file" in report or "parent_id_maps" in report, report[-3000:]


def test_core_tests_pass_under_the_sanitizers(sanitized: dict[str, object]) -> None:
    r = _run(sanitized, ["-m", "pytest", "test_sandbox.py", "-q", "-p", "no:cacheprovider", "-x"], 300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]
    reports = _reports(sanitized)
    for marker in ERRORS:
        assert marker not in out, out[-5000:]
        assert marker not in reports, reports[-5000:]
