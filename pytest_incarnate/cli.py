"""``pytest-incarnate``: probe this machine, or run a command in an incarnation.

Exit codes of ``probe``: 0 all good (or every ``--require``d item granted); 3 a required
item is not granted; 2 usage error.  ``run`` exits with the payload's status (128+N for a
death by signal N), 124 when ``--timeout`` killed it, 125 when the sandbox could not be set
up, 2 for a bad flag.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_MISSING = 3
EXIT_SETUP = 125
EXIT_TIMEOUT = 124  # as timeout(1)


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


# The flag behind each Spec field, for error messages.
_FLAG_OF = {
    "namespaces": "--ns", "hostname": "--hostname", "binds": "--bind/--ro-bind", "tmpfs": "--tmpfs", "hide": "--hide",
    "cwd": "--chdir", "env": "--setenv", "uid": "--uid", "gid": "--gid", "map_user": "--map-user", "umask": "--umask",
    "root": "--root", "layers": "--layer", "upper_size": "--upper-size", "keep_upper": "--keep-upper", "dev": "--dev",
    "rlimits": "--rlimit", "memory": "--memory", "pids": "--pids", "cpu_quota": "--cpu-quota", "cpus": "--cpus",
    "timeout": "--timeout",
}


def _spec_from_args(args: argparse.Namespace) -> Any:
    """The Spec that ``run``'s flags describe; a bad flag raises SpecError naming it."""
    from pytest_incarnate.errors import SpecError
    from pytest_incarnate.spec import NAMESPACES, Bind, Spec, Tmpfs

    ns = set(NAMESPACES)
    if args.ns:
        ns = {n for part in args.ns for n in part.split(",") if n}
    for n in args.share:
        if n not in NAMESPACES:
            raise SpecError("--share", n, f"unknown namespace; choose from {', '.join(NAMESPACES)}")
        ns.discard(n)

    def bind(text: str, readonly: bool) -> Bind:
        source, _, target = text.partition(":")
        return Bind(source, target or None, readonly)

    def tmpfs(text: str) -> Tmpfs:
        target, _, size = text.partition(":")
        return Tmpfs(target, size=size or None)

    def rlimit(text: str) -> tuple[str, Any]:
        name, sep, value = text.partition("=")
        if not sep:
            raise SpecError("--rlimit", text, "must be NAME=SOFT[:HARD], e.g. nofile=256 or cpu=5:10")
        soft, _, hard = value.partition(":")
        try:
            return name, (int(soft), int(hard)) if hard else int(soft)
        except ValueError:
            raise SpecError("--rlimit", text, "limits are integers: NAME=SOFT[:HARD]") from None

    env = None
    if args.clearenv or args.setenv or args.unsetenv:
        env = {} if args.clearenv else dict(os.environ)
        for k in args.unsetenv:
            env.pop(k, None)
        for k, v in args.setenv:
            env[k] = v
    umask = None
    if args.umask is not None:
        try:
            umask = int(args.umask, 8)
        except ValueError:
            raise SpecError("--umask", args.umask, "must be an octal mode, e.g. 022") from None
    kwargs: dict[str, Any] = dict(
        namespaces=frozenset(ns), hostname=args.hostname,
        binds=tuple([bind(b, False) for b in args.bind] + [bind(b, True) for b in args.ro_bind]),
        strict=args.strict, cwd=args.chdir, memory=args.memory, pids=args.pids, cpu_quota=args.cpu_quota,
        cpus=args.cpus, timeout=args.timeout, rlimits=dict(rlimit(r) for r in args.rlimit) or None,
        env=env, uid=args.uid, gid=args.gid, map_user=args.map_user, umask=umask,
        copy_on_write=not args.read_only_root, root=args.root, layers=tuple(args.layer),
        upper_size=args.upper_size, keep_upper=args.keep_upper, dev=args.dev, mount_proc=not args.no_proc,
        loopback=not args.no_loopback,
    )
    if args.tmpfs:
        kwargs["tmpfs"] = Spec().tmpfs + tuple(tmpfs(t) for t in args.tmpfs)
    if args.hide is not None:
        kwargs["hide"] = tuple(h for h in args.hide if h)
    return Spec(**kwargs)


def cmd_run(args: argparse.Namespace) -> int:
    import json

    from pytest_incarnate.errors import IncarnateError, SpecError
    from pytest_incarnate.sandbox import Sandbox

    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("pytest-incarnate run: give a command after --", file=sys.stderr)
        return 2
    if args.json is not None:
        where = os.path.dirname(os.path.abspath(args.json))
        if not os.path.isdir(where) or not os.access(where, os.W_OK):
            print(f"pytest-incarnate run: --json: cannot write {args.json!r} ({where} is not a writable directory)",
                  file=sys.stderr)
            return 2
    try:
        spec = _spec_from_args(args)
    except SpecError as e:
        flag = _FLAG_OF.get(e.field.split("[")[0].split(".")[0], "")
        print(f"pytest-incarnate run: {flag + ': ' if flag and not e.field.startswith('--') else ''}{e}", file=sys.stderr)
        return 2
    except IncarnateError as e:  # a bad root directory, a layer that cannot be built
        print(f"pytest-incarnate run: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    timed_out = False
    try:
        handle = Sandbox(spec).spawn(argv)
        for d in handle.degradations:
            print(f"pytest-incarnate: degraded: {d.describe()}", file=sys.stderr)
        try:
            code = handle.wait(timeout=spec.timeout)
        except TimeoutError:
            timed_out = True
            handle.kill()
            code = handle.wait()
            print(f"pytest-incarnate run: timed out after {spec.timeout} s; the sandbox was killed", file=sys.stderr)
        if handle.stats is not None and handle.stats.oom_killed:
            print(f"pytest-incarnate run: {handle.stats.describe_oom()}", file=sys.stderr)
    except IncarnateError as e:
        print(f"pytest-incarnate run: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_SETUP
    status = EXIT_TIMEOUT if timed_out else 128 + handle.signal if handle.signal else code
    if args.json:
        changes = handle.changes
        doc = {
            "argv": argv, "status": status, "returncode": code, "signal": handle.signal, "timed_out": timed_out,
            "namespaces": list(handle.plan.namespaces),
            "degradations": [{"type": type(d).__name__, "detail": d.describe()} for d in handle.degradations],
            "stats": _plain(handle.stats),
            "changes": [{"path": c.path, "kind": c.kind} for c in changes] if changes is not None else None,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
    return status


def _plain(obj: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else None


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
    r = sub.add_parser("run", help="run a command in a fresh incarnation: run [options] -- CMD ...",
                       description="Run CMD in a fresh incarnation. The flags are the Spec's fields; exit status: "
                                   "the command's, 128+N for a death by signal N, 124 after --timeout, 125 when the "
                                   "sandbox could not be set up, 2 for a bad flag.")
    g = r.add_argument_group("namespaces and identity")
    g.add_argument("--ns", action="append", default=[], metavar="A,B", help="namespaces to create (default: all)")
    g.add_argument("--share", action="append", default=[], metavar="NS", help="a namespace not to create")
    g.add_argument("--hostname", default="incarnate")
    g.add_argument("--map-user", choices=("root", "self"), default="root",
                   help="root inside (default), or keep the caller's own ids")
    g.add_argument("--uid", type=int, default=None, help="switch to this uid inside after setup")
    g.add_argument("--gid", type=int, default=None, help="switch to this gid inside after setup")
    g.add_argument("--strict", action="store_true", help="fail instead of degrading")
    g = r.add_argument_group("filesystem")
    g.add_argument("--bind", action="append", default=[], metavar="SRC[:DST]", help="read-write bind")
    g.add_argument("--ro-bind", action="append", default=[], metavar="SRC[:DST]", help="read-only bind")
    g.add_argument("--tmpfs", action="append", default=[], metavar="DST[:SIZE]", help="an extra tmpfs")
    g.add_argument("--hide", action="append", default=None, metavar="PATH",
                   help="cover PATH with an empty tmpfs (default: /run; give --hide '' to hide nothing)")
    g.add_argument("--read-only-root", action="store_true", help="the host root read-only instead of copy-on-write")
    g.add_argument("--root", default=None, metavar="DIR", help="a directory tree as the root (copy-on-write)")
    g.add_argument("--layer", action="append", default=[], metavar="PATH",
                   help="a root layer (directory or tar archive), top first; cached")
    g.add_argument("--upper-size", default=None, metavar="SIZE", help="limit what the sandbox may write (64m)")
    g.add_argument("--keep-upper", default=None, metavar="DIR", help="keep what the sandbox wrote under DIR")
    g.add_argument("--dev", choices=("minimal", "host"), default="minimal", help="/dev: minimal or the host's")
    g.add_argument("--no-proc", action="store_true", help="do not mount a fresh /proc")
    g.add_argument("--no-loopback", action="store_true", help="leave lo down")
    g.add_argument("--chdir", default=None, metavar="DIR")
    g = r.add_argument_group("process")
    g.add_argument("--setenv", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    g.add_argument("--unsetenv", action="append", default=[], metavar="NAME")
    g.add_argument("--clearenv", action="store_true", help="start from an empty environment")
    g.add_argument("--umask", default=None, metavar="OCTAL")
    g.add_argument("--rlimit", action="append", default=[], metavar="NAME=SOFT[:HARD]",
                   help="as, nofile, nproc, core, cpu, fsize, stack")
    g = r.add_argument_group("limits")
    g.add_argument("--memory", default=None, help="memory limit, e.g. 64M")
    g.add_argument("--pids", type=int, default=None, help="process limit")
    g.add_argument("--cpu-quota", type=float, default=None, metavar="CPUS", help="CPU time, in CPUs (0.5)")
    g.add_argument("--cpus", default=None, metavar="LIST", help="cpuset, e.g. 0 or 0-1")
    g.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="kill the whole sandbox after this wall-clock time")
    r.add_argument("--json", default=None, metavar="PATH",
                   help="write the result (status, degradations, stats, changes) as JSON to PATH")
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
