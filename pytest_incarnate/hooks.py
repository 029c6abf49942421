"""Hook specifications of pytest-incarnate (implement them in a conftest.py or a plugin)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_incarnate.errors import Degradation
    from pytest_incarnate.runner import IsolationRecord


def pytest_incarnate_adjust_spec(item: pytest.Item, kwargs: dict[str, Any]) -> None:
    """Change, in place, the Spec keywords of a sandboxed test (ini, command line and marker merged)."""


@pytest.hookspec(firstresult=True)
def pytest_incarnate_degraded(item: pytest.Item, degradations: tuple[Degradation, ...], policy: str) -> str | None:
    """Decide what degradations do to a test: return "skip", "xfail", "fail" or "run" (None: the policy)."""


def pytest_incarnate_result(item: pytest.Item, record: IsolationRecord) -> None:
    """See what a sandboxed test was granted and used, after its call."""
