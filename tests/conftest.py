"""Shared helpers: counting what a run could leave behind on the host."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from _procs import descendants


@dataclass(frozen=True)
class HostState:
    descendants: int
    mounts: int
    fds: int
    tmp_entries: frozenset[str]


def host_state() -> HostState:
    with open("/proc/self/mountinfo") as f:
        mounts = len(f.readlines())
    return HostState(
        descendants=len(descendants(os.getpid())),
        mounts=mounts,
        fds=len(os.listdir("/proc/self/fd")),
        tmp_entries=frozenset(os.listdir("/tmp")),
    )


@pytest.fixture
def leak_check():
    """Yields a function returning the host state; asserts nothing leaked at the end."""
    before = host_state()
    yield host_state
    after = host_state()
    assert after.descendants == before.descendants, "sandbox processes left behind"
    assert after.mounts == before.mounts, "mounts left behind in the host's mount namespace"
    assert after.fds == before.fds, f"file descriptors leaked: {sorted(os.listdir('/proc/self/fd'))}"
    new_tmp = after.tmp_entries - before.tmp_entries
    assert not {e for e in new_tmp if "incarnate" in e}, f"temp entries left: {new_tmp}"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reliability", "reliability and security suite")
    group.addoption("--fuzz-examples", type=int, default=2000, metavar="N",
                    help="hypothesis examples per property in tests/test_fuzz.py (default 2000, as in CI)")
    group.addoption("--reliability-full", action="store_true", default=False,
                    help="run the long, exhaustive forms of the reliability suite (tests/test_faults.py: every "
                         "syscall x 3 errnos x every occurrence; tests/test_reliability.py: soaks of 10,000 "
                         "sandboxed tests, 2,000 sandboxed calls from a threaded process; "
                         "tests/test_kill_matrix.py: 20 kills per stage, under xdist at every stage too)")
