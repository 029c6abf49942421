"""``pytest-incarnate``: probe this machine, or run a command in an incarnation.

Exit codes of ``probe``: 0 all good (or every ``--require``d item granted); 3 a required
item is not granted; 2 usage error.  ``run`` exits with the payload's status (128+N for a
death by signal N), 125 when the sandbox could not be set up.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

EXIT_MISSING = 3
EXIT_SETUP = 125


def _annotate(line: str) -> str:
    """On GitHub Actions, a refusal becomes a warning annotation carrying the fix."""
    return f"::warning title=pytest-incarnate::{line}" if os.environ.get("GITHUB_ACTIONS") == "true" else line


def cmd_probe(args: argparse.Namespace) -> int:
    from pytest_incarnate.probe import probe

    caps = probe()
    required = [r for part in args.require for r in part.split(",") if r]
    unknown = [r for r in required if r not in caps.names()]
    if unknown:
        print(f"pytest-incarnate probe: unknown capability {', '.join(unknown)}; known: {', '.join(caps.names())}",
              file=sys.stderr)
        return 2
    missing = [r for r in required if not caps.granted(r)]
    if args.json:
        d = caps.to_dict()
        d["required"] = required
        d["missing"] = missing
        import json

        print(json.dumps(d, indent=2, sort_keys=True))
    else:
        print(f"kernel {caps.kernel}, euid {caps.euid}")
        for name, value in sorted(caps.sysctls.items()):
            print(f"  sysctl {name} = {value}")
        for c in caps:
            print(_annotate(c.line()) if not c.granted else c.line())
        if missing:
            print(f"missing required: {', '.join(missing)}", file=sys.stderr)
    return EXIT_MISSING if missing else 0


def cmd_run(args: argparse.Namespace) -> int:
    from pytest_incarnate.errors import IncarnateError
    from pytest_incarnate.sandbox import Sandbox
    from pytest_incarnate.spec import NAMESPACES, Bind, Spec

    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("pytest-incarnate run: give a command after --", file=sys.stderr)
        return 2
    from pytest_incarnate.errors import SpecError

    ns = set(NAMESPACES)
    if args.ns:
        ns = {n for part in args.ns for n in part.split(",") if n}
    try:
        for n in args.share:
            if n not in NAMESPACES:
                raise SpecError("--share", n, f"unknown namespace; choose from {', '.join(NAMESPACES)}")
            ns.discard(n)

        def bind(text: str, readonly: bool) -> Bind:
            source, _, target = text.partition(":")
            return Bind(source, target or None, readonly)

        binds = [bind(b, False) for b in args.bind] + [bind(b, True) for b in args.ro_bind]
        spec = Spec(namespaces=frozenset(ns), hostname=args.hostname, binds=tuple(binds),
                    strict=args.strict, cwd=args.chdir, memory=args.memory, pids=args.pids)
    except SpecError as e:
        print(f"pytest-incarnate run: {e}", file=sys.stderr)
        return 2
    try:
        handle = Sandbox(spec).spawn(argv)
        for d in handle.degradations:
            print(f"pytest-incarnate: degraded: {d.describe()}", file=sys.stderr)
        code = handle.wait()
        if handle.stats is not None and handle.stats.oom_killed:
            print(f"pytest-incarnate run: {handle.stats.describe_oom()}", file=sys.stderr)
    except IncarnateError as e:
        print(f"pytest-incarnate run: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_SETUP
    return 128 + handle.signal if handle.signal else code


def cmd_sweep(args: argparse.Namespace) -> int:
    from pytest_incarnate.cgroups import sweep

    removed = sweep()
    for d in removed:
        print(f"removed {d}")
    print(f"{len(removed)} cgroup run director{'y' if len(removed) == 1 else 'ies'} of dead runs removed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pytest-incarnate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("probe", help="what this machine grants, with reasons and fixes")
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.add_argument("--require", action="append", default=[], metavar="A,B",
                    help="exit 3 unless these capabilities are granted (e.g. ns.user,overlay)")
    pr.set_defaults(func=cmd_probe)
    r = sub.add_parser("run", help="run a command in a fresh incarnation: run [options] -- CMD ...")
    r.add_argument("--ns", action="append", default=[], help="namespaces to create (default: all)")
    r.add_argument("--share", action="append", default=[], help="a namespace not to create")
    r.add_argument("--hostname", default="incarnate")
    r.add_argument("--bind", action="append", default=[], metavar="SRC[:DST]", help="read-write bind")
    r.add_argument("--ro-bind", action="append", default=[], metavar="SRC[:DST]", help="read-only bind")
    r.add_argument("--chdir", default=None)
    r.add_argument("--strict", action="store_true", help="fail instead of degrading")
    r.add_argument("--memory", default=None, help="memory limit, e.g. 64M")
    r.add_argument("--pids", type=int, default=None, help="process limit")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    r.set_defaults(func=cmd_run)
    sw = sub.add_parser("sweep", help="remove the cgroups that killed runs left behind")
    sw.set_defaults(func=cmd_sweep)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
