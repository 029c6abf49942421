#!/usr/bin/env python3
"""Start-up cost of one sandboxed ``/bin/true``: pytest-incarnate against its peers.

Every line is measured in the same run, interleaved round-robin (one call of each line
per round, the starting line rotating from round to round) after a warmup, so that what
the machine does meanwhile (other load, frequency changes, page cache) falls on all
lines alike.  Each sample is the wall time of one whole call, from Python, measured with
``time.perf_counter_ns``.

Lines:

  incarnate run     Sandbox(spec).run(["/bin/true"]): stdin /dev/null, stdout and stderr
                    captured through pipes, read to EOF, waited for.
  incarnate spawn   Sandbox(spec).spawn(["/bin/true"]).wait(): inherited stdio, like
                    the peers below.
  incarnate cow     Sandbox().spawn(["/bin/true"]).wait(): the default Spec, all seven
                    namespaces, the host's root copy-on-write.
  incarnate ro      Sandbox(Spec(copy_on_write=False)).spawn(["/bin/true"]).wait(): all
                    seven namespaces, the host's root read-only.
  subprocess        subprocess.run(["/bin/true"]): no sandbox, the floor.
  unshare           subprocess.run(["unshare", "-Urmpfn", "--mount-proc", "/bin/true"])
  bwrap             subprocess.run(["bwrap", "--unshare-all", "--dev-bind", "/", "/",
                    "/bin/true"])
  bwrap ro          subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/",
                    "--tmpfs", "/tmp", "--proc", "/proc", "--dev", "/dev", "/bin/true"]):
                    the nearest bwrap equivalent of the read-only root.
  bwrap overlay     the same with "--overlay-src / --tmp-overlay /" in place of
                    "--ro-bind / /", if the installed bwrap has those options (bubblewrap
                    0.11.0 and later); otherwise reported as skipped, with the reason.

spec = Spec(namespaces={"user", "mount", "pid", "uts", "ipc", "net"}) with the other
fields at their defaults, which now include the copy-on-write host root (overlays on a
sandbox-private tmpfs, fresh /proc, minimal /dev, read-only /sys, /run hidden, scratch
/tmp and /dev/shm), lo up and hostname "incarnate".

The table gives each median as a ratio to three references: bwrap --dev-bind / / (the
original peer), bwrap's read-only equivalent (the peer for the cow and ro lines) and
subprocess.run.

Usage: python bench/bench_core.py [--runs N] [--warmup N] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

TRUE = "/bin/true"
NAMESPACES = frozenset({"user", "mount", "pid", "uts", "ipc", "net"})


@dataclass
class Line:
    key: str            # stable name, used in the JSON
    label: str          # what the table shows
    command: str        # what one sample does
    call: Callable[[], int] | None   # one sample; returns the exit status
    skipped: str = ""   # why the line was not measured
    samples_ns: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr).strip() else "unknown"


def _subprocess_line(key: str, label: str, argv: list[str], install_hint: str = "") -> Line:
    cmd = " ".join(argv)
    exe = shutil.which(argv[0])
    if exe is None:
        why = f"{argv[0]} not found on PATH"
        if install_hint:
            why += f" (install it: {install_hint})"
        return Line(key, label, cmd, None, skipped=why)
    full = [exe] + argv[1:]

    def call() -> int:
        return subprocess.run(full).returncode

    return Line(key, label, cmd, call)


BWRAP_RO = ["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--tmpfs", "/tmp", "--proc", "/proc",
            "--dev", "/dev", TRUE]
BWRAP_OVERLAY = ["bwrap", "--unshare-all", "--overlay-src", "/", "--tmp-overlay", "/", "--tmpfs", "/tmp",
                 "--proc", "/proc", "--dev", "/dev", TRUE]


def bwrap_overlay_missing() -> str:
    """Why the bwrap overlay line cannot run here ("" if it can): bubblewrap has
    --overlay-src/--tmp-overlay since 0.11.0 (NEWS.md), not in older versions."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bwrap not found on PATH (install it: apt-get install -y bubblewrap)"
    try:
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap --help failed ({e})"
    text = out.stdout + out.stderr
    missing = [o for o in ("--overlay-src", "--tmp-overlay") if o not in text]
    if missing:
        return (f"{_version([exe, '--version'])} has no {' or '.join(missing)} in its --help "
                "(bubblewrap added the overlay options in 0.11.0)")
    return ""


def _incarnate_spawn_call(make_box: Callable[[], object], want_root: str) -> Callable[[], int]:
    """spawn(["/bin/true"]).wait() on a fresh Sandbox; a degraded plan or a root other than
    the one meant (overlay or readonly) is a failure, not a sample."""
    def call() -> int:
        h = make_box().spawn([TRUE])  # type: ignore[attr-defined]
        if h.degradations or h.plan.root != want_root:
            h.wait()
            raise RuntimeError(f"root {h.plan.root!r}, degraded: {[str(d) for d in h.degradations]}")
        return h.wait()
    return call


def make_lines() -> list[Line]:
    lines: list[Line] = []
    try:
        from pytest_incarnate import Sandbox, Spec
    except Exception as e:  # reported, not raised
        why = f"pytest_incarnate cannot be imported: {e!r} (pip install -e .)"
        lines.append(Line("incarnate_run", "incarnate run (pipes)", "Sandbox(spec).run([...])", None, skipped=why))
        lines.append(Line("incarnate_spawn", "incarnate spawn().wait()", "Sandbox(spec).spawn([...]).wait()", None,
                          skipped=why))
        lines.append(Line("incarnate_cow", "incarnate cow spawn().wait()", "Sandbox().spawn([...]).wait()", None,
                          skipped=why))
        lines.append(Line("incarnate_ro", "incarnate ro spawn().wait()",
                          "Sandbox(Spec(copy_on_write=False)).spawn([...]).wait()", None, skipped=why))
    else:
        spec = Spec(namespaces=NAMESPACES)

        def run_piped() -> int:
            r = Sandbox(spec).run([TRUE])
            if r.degradations:
                raise RuntimeError(f"degraded: {[str(d) for d in r.degradations]}")
            return r.returncode

        def spawn_wait() -> int:
            h = Sandbox(spec).spawn([TRUE])
            if h.degradations:
                h.wait()
                raise RuntimeError(f"degraded: {[str(d) for d in h.degradations]}")
            return h.wait()

        ns = ",".join(sorted(NAMESPACES))
        lines.append(Line("incarnate_run", "incarnate run (pipes)",
                          f"Sandbox(Spec(namespaces={{{ns}}})).run(['{TRUE}'])", run_piped))
        lines.append(Line("incarnate_spawn", "incarnate spawn().wait()",
                          f"Sandbox(Spec(namespaces={{{ns}}})).spawn(['{TRUE}']).wait()", spawn_wait))
        ro_spec = Spec(copy_on_write=False)
        lines.append(Line("incarnate_cow", "incarnate cow spawn().wait()",
                          f"Sandbox().spawn(['{TRUE}']).wait()  (default Spec: 7 namespaces, copy-on-write root)",
                          _incarnate_spawn_call(lambda: Sandbox(), "overlay")))
        lines.append(Line("incarnate_ro", "incarnate ro spawn().wait()",
                          f"Sandbox(Spec(copy_on_write=False)).spawn(['{TRUE}']).wait()  (7 namespaces, read-only root)",
                          _incarnate_spawn_call(lambda: Sandbox(ro_spec), "readonly")))
    lines.append(_subprocess_line("subprocess", "subprocess.run", [TRUE]))
    lines.append(_subprocess_line("unshare", "unshare -Urmpfn", ["unshare", "-Urmpfn", "--mount-proc", TRUE],
                                  "apt-get install -y util-linux"))
    lines.append(_subprocess_line("bwrap", "bwrap --unshare-all", ["bwrap", "--unshare-all", "--dev-bind", "/", "/", TRUE],
                                  "apt-get install -y bubblewrap"))
    lines.append(_subprocess_line("bwrap_ro", "bwrap --ro-bind / /", BWRAP_RO, "apt-get install -y bubblewrap"))
    why = bwrap_overlay_missing()
    if why:
        lines.append(Line("bwrap_overlay", "bwrap --tmp-overlay /", " ".join(BWRAP_OVERLAY), None, skipped=why))
    else:
        lines.append(_subprocess_line("bwrap_overlay", "bwrap --tmp-overlay /", BWRAP_OVERLAY))
    return lines


def _sample(line: Line) -> tuple[int, str]:
    """One timed call: (nanoseconds, failure text or "")."""
    assert line.call is not None
    t0 = time.perf_counter_ns()
    try:
        rc = line.call()
    except Exception as e:  # a failing line is reported, not fatal
        return time.perf_counter_ns() - t0, f"{type(e).__name__}: {e}"
    dt = time.perf_counter_ns() - t0
    return dt, "" if rc == 0 else f"exit status {rc}"


def warm_up(lines: list[Line], rounds: int) -> None:
    """Untimed rounds (the probe, imports, page cache); a line whose first call fails is
    skipped with the reason."""
    for line in lines:
        if line.call is None:
            continue
        _, err = _sample(line)
        if err:
            line.skipped = f"its first call failed ({err})"
            line.call = None
    live = [ln for ln in lines if ln.call is not None]
    for _ in range(max(0, rounds - 1)):
        for line in live:
            _sample(line)


def measure(lines: list[Line], runs: int) -> None:
    live = [ln for ln in lines if ln.call is not None]
    n = len(live)
    for i in range(runs):
        for j in range(n):
            line = live[(i + j) % n]   # rotate the starting line: no line always goes first
            dt, err = _sample(line)
            if err:
                line.failures.append(err)
            else:
                line.samples_ns.append(dt)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (like numpy's default)."""
    s = sorted(values)
    if not s:
        raise ValueError("no samples")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(lines: list[Line]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for line in lines:
        d: dict[str, object] = {"label": line.label, "command": line.command}
        if line.call is None:
            d["skipped"] = line.skipped
        else:
            ms = [x / 1e6 for x in line.samples_ns]
            d["n"] = len(ms)
            d["failures"] = len(line.failures)
            if line.failures:
                d["first_failure"] = line.failures[0]
            if ms:
                d.update(median_ms=percentile(ms, 0.5), p90_ms=percentile(ms, 0.9),
                         min_ms=min(ms), max_ms=max(ms), mean_ms=sum(ms) / len(ms))
        out[line.key] = d
    for ref in ("bwrap", "bwrap_ro", "subprocess"):
        base = out.get(ref, {}).get("median_ms")
        for d in out.values():
            med = d.get("median_ms")
            d[f"ratio_to_{ref}"] = (med / base) if isinstance(med, float) and isinstance(base, float) and base else None
    return out


def _fmt_ratio(x: object) -> str:
    return f"{x:.2f}x" if isinstance(x, float) else "n/a"


def table(results: dict[str, dict[str, object]]) -> str:
    rows = [("line", "median ms", "p90 ms", "vs bwrap", "vs bwrap ro", "vs subprocess", "n")]
    notes = []
    for d in results.values():
        if "skipped" in d:
            rows.append((str(d["label"]), "skipped", "", "", "", "", ""))
            notes.append(f"{d['label']}: skipped: {d['skipped']}")
            continue
        if "median_ms" not in d:
            rows.append((str(d["label"]), "failed", "", "", "", "", "0"))
        else:
            rows.append((str(d["label"]), f"{d['median_ms']:.3f}", f"{d['p90_ms']:.3f}",
                         _fmt_ratio(d["ratio_to_bwrap"]), _fmt_ratio(d["ratio_to_bwrap_ro"]),
                         _fmt_ratio(d["ratio_to_subprocess"]), str(d["n"])))
        if d.get("failures"):
            notes.append(f"{d['label']}: {d['failures']} failed calls (first: {d['first_failure']})")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    text = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        text.append("  ".join(cells).rstrip())
        if k == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=300, help="timed calls per line (default 300)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed rounds first (default 20)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")

    lines = make_lines()
    started = time.time()
    warm_up(lines, max(1, args.warmup))
    measure(lines, args.runs)
    elapsed = time.time() - started
    results = summarize(lines)

    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "euid": os.geteuid(),
        "bwrap": _version(["bwrap", "--version"]) if shutil.which("bwrap") else None,
        "unshare": _version(["unshare", "--version"]) if shutil.which("unshare") else None,
        "runs": args.runs,
        "warmup_rounds": args.warmup,
        "elapsed_s": round(elapsed, 3),
        "argv": [os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:]),
    }
    print(f"/bin/true, {args.runs} interleaved runs per line after {args.warmup} warmup rounds; "
          f"Linux {env['kernel']}, {env['cpus']} CPUs, Python {env['python']}, euid {env['euid']}")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "results": results}, f, indent=2)
            f.write("\n")
    bad = [d for k, d in results.items() if k.startswith("incarnate") and "skipped" not in d and d.get("failures")]
    bad += [d for k, d in results.items() if k.startswith("incarnate") and "skipped" in d]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
