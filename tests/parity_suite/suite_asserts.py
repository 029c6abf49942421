"""Assertions with rewriting (rich failure messages), exceptions, pytest.fail."""

# ruff: noqa: B018, PLR0133, C419  (failing on purpose: the failures are what is compared)

import dataclasses
import sys

import pytest


@dataclasses.dataclass
class Point:
    x: int
    y: int
    label: str = "p"


class ParityError(Exception):
    pass


def helper_sum(values):
    return sum(values) + 1


def nested_call(depth):
    if depth == 0:
        raise ValueError("bottom of the stack reached")
    return nested_call(depth - 1)


# -- passing -------------------------------------------------------------------------------

def test_pass_int():
    assert 1 + 1 == 2


def test_pass_list():
    assert [1, 2, 3] == [1, 2, 3]


def test_pass_dict():
    assert {"a": 1, "b": [2, 3]} == {"b": [2, 3], "a": 1}


def test_pass_string():
    assert "parity".upper() == "PARITY"


def test_pass_approx():
    assert 0.1 + 0.2 == pytest.approx(0.3)


def test_pass_raises():
    with pytest.raises(ZeroDivisionError, match="division"):
        1 / 0


def test_pass_dataclass():
    assert Point(1, 2) == Point(1, 2)


def test_pass_set():
    assert {3, 1, 2} == {1, 2, 3}


# -- failing comparisons ------------------------------------------------------------------

def test_fail_int():
    assert 6 * 7 == 43


def test_fail_list():
    assert [1, 2, 3, 4] == [1, 2, 5, 4]


def test_fail_list_length():
    assert [1, 2, 3] == [1, 2, 3, 4, 5]


def test_fail_dict():
    assert {"a": 1, "b": 2, "c": 3} == {"a": 1, "b": 20, "d": 4}


def test_fail_nested_dict():
    got = {"user": {"name": "ada", "roles": ["admin", "dev"]}, "active": True}
    assert got == {"user": {"name": "ada", "roles": ["dev"]}, "active": True}


def test_fail_string():
    assert "the quick brown fox" == "the quick brown cat"


def test_fail_multiline_string():
    left = "line one\nline two\nline three\nline four"
    right = "line one\nline 2\nline three\nline four\nline five"
    assert left == right


def test_fail_long_string():
    assert "x" * 60 + "a" + "y" * 60 == "x" * 60 + "b" + "y" * 60


def test_fail_set():
    assert {1, 2, 3, 4} == {2, 3, 4, 5}


def test_fail_tuple():
    assert (1, "two", 3.0) == (1, "two", 3.5)


def test_fail_bytes():
    assert b"\x00\x01abc" == b"\x00\x02abc"


def test_fail_dataclass():
    assert Point(1, 2, "a") == Point(1, 3, "b")


def test_fail_in():
    assert "needle" in "a haystack without it"


def test_fail_not_in():
    assert 3 not in [1, 2, 3, 4]


def test_fail_approx():
    assert [0.1 + 0.2, 1.0] == pytest.approx([0.3, 1.1])


def test_fail_comparison_ops():
    a, b = 10, 20
    assert a > b


def test_fail_is_none():
    value = {"k": 1}.get("k")
    assert value is None


def test_fail_with_message():
    items = ["a", "b"]
    assert len(items) == 3, f"expected three items, got {items!r}"


def test_fail_helper_call():
    assert helper_sum([1, 2, 3]) == 6


def test_fail_boolean_chain():
    x, y = 1, 0
    assert x and y


def test_fail_not():
    assert not [0]


def test_fail_plain_false():
    assert False


def test_fail_isinstance():
    assert isinstance("3", int)


def test_fail_all():
    assert all([n % 2 == 0 for n in [2, 4, 5]])


def test_fail_unicode():
    assert "naïve café" == "naive cafe"


# -- exceptions and explicit failures ---------------------------------------------------

def test_raise_value_error():
    raise ValueError("bad value: 42")


def test_raise_key_error():
    {"a": 1}["missing"]


def test_raise_attribute_error():
    None.attribute


def test_raise_custom():
    raise ParityError("custom failure with detail")


def test_raise_chained():
    try:
        int("not a number")
    except ValueError as e:
        raise RuntimeError("conversion failed") from e


def test_raise_deep_stack():
    nested_call(5)


def test_raise_zero_division():
    1 / 0


def test_raise_group():
    raise ExceptionGroup("two problems", [ValueError("first"), TypeError("second")])  # noqa: F821 (3.11+)


def test_pytest_fail():
    pytest.fail("explicit failure via pytest.fail")


def test_pytest_fail_no_trace():
    pytest.fail("failure without traceback", pytrace=False)


def test_raises_wrong_type():
    with pytest.raises(KeyError):
        raise IndexError("not the expected one")


def test_raises_did_not_raise():
    with pytest.raises(ValueError):
        pass


def test_raises_no_match():
    with pytest.raises(ValueError, match="expected text"):
        raise ValueError("something else entirely")


def test_system_exit():
    sys.exit(3)


def test_assertion_error_raised_directly():
    raise AssertionError("raised by hand")
