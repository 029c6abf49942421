"""skip, skipif, importorskip, xfail (strict and not), xpass."""

# ruff: noqa: B018, PLR0133  (failing on purpose: the failures are what is compared)

import sys

import pytest


@pytest.mark.skip(reason="skipped by marker")
def test_skip_marker():
    raise AssertionError("never runs")


@pytest.mark.skip
def test_skip_marker_no_reason():
    raise AssertionError("never runs")


def test_skip_imperative():
    pytest.skip("skipped from the body")


def test_skip_imperative_after_work():
    total = sum(range(10))
    if total == 45:
        pytest.skip(f"skipped after computing {total}")


@pytest.mark.skipif(sys.platform.startswith("linux"), reason="skipif true on linux")
def test_skipif_true():
    raise AssertionError("never runs")


@pytest.mark.skipif(sys.version_info < (3, 0), reason="skipif false")
def test_skipif_false_runs():
    assert True


@pytest.mark.skipif("sys.platform == 'linux'", reason="string condition")
def test_skipif_string_condition():
    raise AssertionError("never runs")


def test_importorskip():
    pytest.importorskip("a_module_that_does_not_exist_parity")


def test_importorskip_present():
    json = pytest.importorskip("json")
    assert json.dumps([1]) == "[1]"


@pytest.fixture
def skipping_fixture():
    pytest.skip("skipped in fixture setup")


def test_skip_in_fixture(skipping_fixture):
    raise AssertionError("never runs")


@pytest.mark.xfail(reason="known to fail")
def test_xfail_fails():
    assert [1, 2] == [2, 1]


@pytest.mark.xfail(reason="expected to fail but passes")
def test_xfail_passes():
    assert True


@pytest.mark.xfail(strict=True, reason="strict and passing")
def test_xfail_strict_passes():
    assert True


@pytest.mark.xfail(strict=True, reason="strict and failing")
def test_xfail_strict_fails():
    raise RuntimeError("as expected")


@pytest.mark.xfail(raises=ZeroDivisionError, reason="right exception")
def test_xfail_raises_matching():
    1 / 0


@pytest.mark.xfail(raises=ZeroDivisionError, reason="wrong exception")
def test_xfail_raises_other():
    raise KeyError("not a ZeroDivisionError")


@pytest.mark.xfail(run=False, reason="not even run")
def test_xfail_not_run():
    raise AssertionError("never runs")


@pytest.mark.xfail(False, reason="condition false: a normal test")
def test_xfail_condition_false():
    assert 1 == 2


@pytest.mark.xfail(sys.platform.startswith("linux"), reason="condition true")
def test_xfail_condition_true():
    assert "a" == "b"


def test_xfail_imperative():
    pytest.xfail("imperative xfail")


def test_xfail_imperative_with_work():
    data = {"k": 1}
    if data["k"] == 1:
        pytest.xfail("imperative xfail after work")
    raise AssertionError("not reached")


@pytest.mark.xfail(reason="fixture error is not an xfail")
def test_xfail_with_fixture_error(broken_setup_for_xfail):
    pass


@pytest.fixture
def broken_setup_for_xfail():
    raise RuntimeError("setup broke under an xfail test")


class TestSkippedClass:
    pytestmark = pytest.mark.skip(reason="whole class skipped")

    def test_one(self):
        raise AssertionError("never runs")

    def test_two(self):
        raise AssertionError("never runs")


class TestXfailClass:
    pytestmark = pytest.mark.xfail(reason="whole class xfail")

    def test_fails(self):
        assert 0

    def test_passes(self):
        assert 1
