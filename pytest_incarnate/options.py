"""Command-line options and ini keys, and how they merge into a test's Spec.

Precedence, high to low: the test's ``@pytest.mark.incarnate(...)`` keywords, then the
command line (``--incarnate-spec KEY=VALUE``, ``--incarnate-strict``), then the ini file
(``incarnate_spec``, ``incarnate_strict``).  A bad value's error names where it came from.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

import pytest

POLICIES = ("skip", "xfail", "fail", "run")

HELP_ALL = "sandbox every test's call phase with the default spec (the incarnate marker's keywords still apply)"
HELP_STRICT = "make every sandbox strict: a capability the machine cannot grant is an error, not a degradation"
HELP_ON_DEGRADED = (
    "what a degradation (a namespace, copy-on-write root or cgroup limit the machine cannot grant) does to a "
    "sandboxed test: skip (default), xfail, fail, or run with what was granted"
)
HELP_KEEP_UPPER = (
    "keep what each failed sandboxed test wrote (its upper layers: a manifest and the contents) under DIR "
    "(default: incarnate-upper in pytest's base temporary directory)"
)
HELP_REPORT = "write a JSON ledger of the sandboxed tests (spec, granted isolation, degradations, stats, changes) to PATH"
HELP_SPEC = "default Spec keywords for sandboxed tests, one KEY=VALUE each (for example memory=256M, hostname=box)"


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("incarnate", "test isolation (pytest-incarnate)")
    group.addoption("--incarnate", action="store_true", default=None, dest="incarnate", help=HELP_ALL)
    parser.addini("incarnate", HELP_ALL, type="bool", default=False)
    group.addoption("--incarnate-strict", action="store_true", default=None, dest="incarnate_strict", help=HELP_STRICT)
    parser.addini("incarnate_strict", HELP_STRICT, type="bool", default=False)
    group.addoption("--incarnate-on-degraded", action="store", default=None, dest="incarnate_on_degraded",
                    metavar="|".join(POLICIES), help=HELP_ON_DEGRADED)
    parser.addini("incarnate_on_degraded", HELP_ON_DEGRADED, default="skip")
    group.addoption("--incarnate-keep-upper", action="store", nargs="?", const="", default=None,
                    dest="incarnate_keep_upper", metavar="DIR", help=HELP_KEEP_UPPER)
    parser.addini("incarnate_keep_upper", HELP_KEEP_UPPER, default="")
    group.addoption("--incarnate-report", action="store", default=None, dest="incarnate_report", metavar="PATH",
                    help=HELP_REPORT)
    parser.addini("incarnate_report", HELP_REPORT, default="")
    group.addoption("--incarnate-spec", action="append", default=[], dest="incarnate_spec", metavar="KEY=VALUE",
                    help=HELP_SPEC)
    parser.addini("incarnate_spec", HELP_SPEC, type="linelist", default=[])


def parse_value(text: str) -> Any:
    """An ini or command-line value: a Python literal (64, 0.5, True, ("a", "b")) or else
    the text itself (256M, user,mount)."""
    low = text.strip().lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text.strip()


@dataclass(frozen=True)
class Source:
    """Spec keywords from one place (for error messages)."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


def parse_pairs(lines: list[str], source: str) -> Source:
    out: dict[str, Any] = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise pytest.UsageError(f"{source}: {line!r} is not KEY=VALUE (for example memory=256M)")
        out[key] = parse_value(value)
    return Source(source, out)


@dataclass(frozen=True)
class Settings:
    """The plugin's settings for this run, from the command line over the ini file."""

    all_tests: bool = False
    on_degraded: str = "skip"
    keep_upper: str | None = None
    report: str | None = None
    ini: Source = Source("ini incarnate_spec")
    cli: Source = Source("--incarnate-spec")

    @classmethod
    def from_config(cls, config: pytest.Config) -> Settings:
        def opt(name: str) -> Any:
            return config.getoption(name, None)

        all_tests = bool(opt("incarnate")) or bool(config.getini("incarnate"))
        cli_policy = opt("incarnate_on_degraded")
        policy, where = (cli_policy, "--incarnate-on-degraded") if cli_policy is not None else (
            str(config.getini("incarnate_on_degraded")).strip(), "ini incarnate_on_degraded")
        if policy not in POLICIES:
            raise pytest.UsageError(f"{where}: {policy!r} is not one of {', '.join(POLICIES)}")
        keep = opt("incarnate_keep_upper")
        if keep is None:
            keep = str(config.getini("incarnate_keep_upper")).strip() or None
        report = opt("incarnate_report") or str(config.getini("incarnate_report")).strip() or None
        ini = parse_pairs(list(config.getini("incarnate_spec")), "ini incarnate_spec")
        cli = parse_pairs(list(opt("incarnate_spec") or []), "--incarnate-spec")
        if config.getini("incarnate_strict"):
            ini.kwargs.setdefault("strict", True)
        if opt("incarnate_strict"):
            cli.kwargs["strict"] = True
        settings = cls(all_tests, policy, keep, report, ini, cli)
        settings.check()
        return settings

    def check(self) -> None:
        """Each source's keywords must make a valid Spec on their own (over the defaults)."""
        from pytest_incarnate.errors import IncarnateError
        from pytest_incarnate.spec import Spec

        for src in (self.ini, self.cli):
            try:
                Spec.from_kwargs(src.name, **src.kwargs)
            except IncarnateError as e:
                raise pytest.UsageError(f"{src.name}: {e}") from None

    def spec_kwargs(self, marker_kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """The merged keywords, and for each the source it came from."""
        kwargs: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for src in (self.ini, self.cli, Source("@pytest.mark.incarnate", marker_kwargs)):
            for k, v in src.kwargs.items():
                kwargs[k] = v
                origin[k] = src.name
        return kwargs, origin
