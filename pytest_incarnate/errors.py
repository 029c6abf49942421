"""Errors and degradations.

The error tree mirrors the seed crate's error enum; every error says what failed and,
where there is one, what to change.  Degradations are not errors: they are the typed
record of isolation that was asked for and not granted, attached to a result.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = [
    "IncarnateError",
    "SpecError",
    "InvalidArgv",
    "InvalidRootfsPath",
    "NamespaceCapMissing",
    "UserNsDisabledBySysctl",
    "UserNsRestrictedByLsm",
    "CgroupNotWritable",
    "NonExecutablePayload",
    "CloneFailed",
    "PipeFailed",
    "SetupStepFailed",
    "SandboxIOFailed",
    "SandboxCrashed",
    "SandboxTimeout",
    "Degradation",
    "NamespaceSkipped",
    "CgroupSkipped",
    "CpuAffinitySkipped",
    "UidMapFailed",
    "OverlaySkipped",
    "ProcSkipped",
    "OverlayUnavailable",
]


def _errname(err: int) -> str:
    return _errno.errorcode.get(err, f"errno {err}")


class IncarnateError(Exception):
    """Base class of every error raised by pytest-incarnate."""


class SpecError(IncarnateError, ValueError):
    """A Spec field (or marker keyword, or option) has a bad value."""

    def __init__(self, field: str, value: Any, problem: str) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"{field}: {problem} (got {value!r})")


class InvalidArgv(SpecError):
    """The command to run is not a non-empty sequence of strings without NUL bytes."""

    def __init__(self, value: Any, problem: str) -> None:
        super().__init__("argv", value, problem)


class InvalidRootfsPath(SpecError):
    """The root filesystem path is not an existing absolute directory."""

    def __init__(self, value: Any, problem: str) -> None:
        super().__init__("root", value, problem)


class NamespaceCapMissing(IncarnateError):
    """A namespace was required (strict) and this process cannot create it."""

    def __init__(self, ns: str, reason: str, fix: str = "") -> None:
        self.ns = ns
        self.reason = reason
        self.fix = fix
        msg = f"cannot create the {ns} namespace: {reason}"
        if fix:
            msg += f"; fix: {fix}"
        super().__init__(msg)


class UserNsDisabledBySysctl(NamespaceCapMissing):
    """User namespaces are turned off by a sysctl (or its limit is 0)."""

    def __init__(self, sysctl: str, value: str, fix: str = "") -> None:
        self.sysctl = sysctl
        self.value = value
        super().__init__(
            "user",
            f"{sysctl} is {value}",
            fix or f"sysctl -w {sysctl}={'1' if 'clone' in sysctl else '10000'}",
        )


class UserNsRestrictedByLsm(NamespaceCapMissing):
    """A user namespace can be created but an LSM (AppArmor on Ubuntu 24.04) strips it."""

    def __init__(self, lsm: str, reason: str, fix: str = "") -> None:
        self.lsm = lsm
        super().__init__("user", f"{lsm}: {reason}", fix)


class OverlayUnavailable(IncarnateError):
    """A copy-on-write root was required (strict) and this machine cannot overlay it."""

    def __init__(self, reason: str, fix: str = "") -> None:
        self.reason = reason
        self.fix = fix
        super().__init__(f"cannot give the sandbox a copy-on-write root: {reason}" + (f"; fix: {fix}" if fix else ""))


class CgroupNotWritable(IncarnateError):
    """A cgroup directory the sandbox needs cannot be written."""

    def __init__(self, path: str, reason: str = "") -> None:
        self.path = path
        super().__init__(f"cgroup {path} is not writable" + (f": {reason}" if reason else ""))


class _OSLike(IncarnateError, OSError):
    """An IncarnateError that is also an OSError with a real errno."""

    def __init__(self, err: int, message: str, path: str | None = None) -> None:
        OSError.__init__(self, err, message)
        self.errno = err
        self.strerror = os.strerror(err) if err else message
        self.filename = path
        self._message = message

    def __str__(self) -> str:
        return self._message

    def __reduce__(self) -> Any:
        # errno/strerror/filename live in OSError's slots, not in __dict__.
        return (_rebuild, (type(self), self.errno, self.filename, dict(self.__dict__)))


def _rebuild(cls: type[OSError], err: int, filename: str | None, state: dict[str, Any]) -> Any:
    obj = cls.__new__(cls)
    OSError.__init__(obj, err, state.get("_message", ""))
    obj.errno = err
    obj.strerror = os.strerror(err) if err else state.get("_message", "")
    obj.filename = filename
    obj.__dict__.update(state)
    return obj


class NonExecutablePayload(_OSLike):
    """The program to run is missing or cannot be executed."""

    def __init__(self, path: str, err: int) -> None:
        self.path = path
        super().__init__(err, f"cannot execute {path!r}: {_errname(err)} ({os.strerror(err)})", path)


class CloneFailed(_OSLike):
    """clone3/clone refused to create the child."""

    def __init__(self, err: int, namespaces: tuple[str, ...] = (), hint: str = "") -> None:
        self.namespaces = namespaces
        ns = ", ".join(namespaces) or "none"
        msg = f"clone failed with {_errname(err)} ({os.strerror(err)}); namespaces: {ns}"
        if hint:
            msg += f"; {hint}"
        super().__init__(err, msg)


class PipeFailed(_OSLike):
    """The parent could not create its sync or error pipe."""

    def __init__(self, err: int) -> None:
        super().__init__(err, f"cannot create the sandbox pipes: {_errname(err)} ({os.strerror(err)})")


class SetupStepFailed(_OSLike):
    """A setup step failed in the child (or the parent) before the payload ran."""

    def __init__(self, step: str, err: int, path: str | None = None, detail: str = "") -> None:
        self.step = step
        self.path = path
        msg = f"setup step {step!r} failed with {_errname(err)} ({os.strerror(err)})"
        if path:
            msg += f" at {path!r}"
        if detail:
            msg += f"; {detail}"
        super().__init__(err, msg, path)


@contextlib.contextmanager
def setup_step(step: str, path: str | None = None, detail: str = "") -> Iterator[None]:
    """A setup step of the parent's (a pipe, a file to open, a cgroup to make, the host's
    mount table to read): a plain ``OSError`` from it becomes ``SetupStepFailed`` naming the
    step, the errno and the path (the ``OSError``'s own file name when it has one, else
    ``path``).  Errors that are already typed pass through."""
    try:
        yield
    except IncarnateError:
        raise
    except OSError as e:
        if not e.errno:  # an OSError made without one: its text says what happened
            detail = f"{detail}; {e}" if detail else str(e)
        where = e.filename if e.filename is not None else path
        raise SetupStepFailed(step, e.errno or _errno.EIO, where, detail=detail) from e


class SandboxIOFailed(_OSLike):
    """The parent could not read from (or write to) a sandbox it started: the payload's
    output or input, the init's status record, a sandboxed call's result.  By the time this
    is raised the sandbox has ended (killed if it was still running) and been reaped, its
    descriptors are closed and its cgroup released; what it would have sent is lost."""

    def __init__(self, step: str, err: int, detail: str = "") -> None:
        self.step = step
        msg = f"{step} failed with {_errname(err)} ({os.strerror(err)})"
        if detail:
            msg += f"; {detail}"
        super().__init__(err, msg)


class SandboxCrashed(IncarnateError):
    """A sandboxed callable died without sending its result back."""

    def __init__(self, cause: str, returncode: int | None = None, signal: int | None = None) -> None:
        self.cause = cause
        self.returncode = returncode
        self.signal = signal
        super().__init__(cause)

    def __reduce__(self) -> Any:
        return (type(self), (self.cause, self.returncode, self.signal))


class SandboxTimeout(SandboxCrashed):
    """A sandboxed call ran past its timeout; the whole sandbox was killed."""

    def __init__(self, timeout: float, killed: int) -> None:
        self.timeout = timeout
        self.killed = killed
        super().__init__(f"timed out after {timeout:.1f} s; {killed} process{'es' if killed != 1 else ''} killed", None, 9)

    def __reduce__(self) -> Any:
        return (type(self), (self.timeout, self.killed))


# ----------------------------------------------------------------------- degradations


class Degradation:
    """Isolation that was asked for and not granted; carried on a Result."""

    reason: str

    def describe(self) -> str:
        return self.reason


@dataclass(frozen=True)
class NamespaceSkipped(Degradation):
    ns: str
    reason: str

    def describe(self) -> str:
        return f"{self.ns} namespace skipped: {self.reason}"


@dataclass(frozen=True)
class CgroupSkipped(Degradation):
    path: str
    reason: str

    def describe(self) -> str:
        return f"cgroup {self.path} skipped: {self.reason}"


@dataclass(frozen=True)
class CpuAffinitySkipped(Degradation):
    reason: str

    def describe(self) -> str:
        return f"CPU affinity skipped: {self.reason}"


@dataclass(frozen=True)
class UidMapFailed(Degradation):
    reason: str

    def describe(self) -> str:
        return f"uid map reduced: {self.reason}"


@dataclass(frozen=True)
class OverlaySkipped(Degradation):
    reason: str

    def describe(self) -> str:
        return f"copy-on-write root skipped, the root is read-only with tmpfs on the writable places: {self.reason}"


@dataclass(frozen=True)
class ProcSkipped(Degradation):
    reason: str

    def describe(self) -> str:
        return (f"fresh /proc skipped, the enclosing one is bound instead (it shows the enclosing pid "
                f"namespace's processes): {self.reason}")
