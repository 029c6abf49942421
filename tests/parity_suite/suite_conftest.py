"""Shared fixtures of the parity suite (written as ``conftest.py`` next to the suite modules).

Every fixture runs in the pytest process, with or without ``--incarnate``: only the call phase
is sandboxed.  So what a fixture records at setup (counters, lists of test names) is shared
across tests the same way in every mode; what a test body changes is not (it runs in a forked
child), and the suite never depends on it.
"""

import logging

import pytest

SETUPS = {"session": 0, "module": {}, "class": {}}
SESSION_SEEN = []


@pytest.fixture(scope="session")
def session_resource():
    SETUPS["session"] += 1
    yield {"name": "session-resource", "setups": SETUPS["session"]}


@pytest.fixture(scope="session", autouse=True)
def _session_seen(request):
    yield SESSION_SEEN


@pytest.fixture
def seen(request, _session_seen):
    # Setup runs in the pytest process: the list grows the same way in every mode.
    _session_seen.append(request.node.nodeid)
    return _session_seen


@pytest.fixture
def shared_logger():
    return logging.getLogger("parity.shared")


def pytest_configure(config):
    config.addinivalue_line("markers", "parity_tag(name): a tag read back through request.node")
