"""Captured output (capsys, capfd, plain prints), logging (caplog), warnings."""

# ruff: noqa: PLR0133  (failing on purpose: the failures are what is compared)

import logging
import os
import sys
import warnings

import pytest

log = logging.getLogger("parity.output")


class ParityWarning(UserWarning):
    pass


# -- captured output ------------------------------------------------------------------------

def test_print_pass():
    print("printed by a passing test")


def test_print_fail():
    print("printed before failing")
    print("second line", file=sys.stderr)
    assert [1, 2] == [1, 2, 3]


def test_capsys_read(capsys):
    print("hello capsys")
    out, err = capsys.readouterr()
    assert out == "hello capsys\n"
    assert err == ""


def test_capsys_fail(capsys):
    print("to stdout")
    sys.stderr.write("to stderr\n")
    captured = capsys.readouterr()
    print("after readouterr")
    assert captured.out == "to stdout, but different\n"


def test_capsys_disabled_then_enabled(capsys):
    print("captured line")
    assert capsys.readouterr().out == "captured line\n"


def test_capfd_read(capfd):
    os.write(1, b"fd one\n")
    os.write(2, b"fd two\n")
    out, err = capfd.readouterr()
    assert (out, err) == ("fd one\n", "fd two\n")


def test_capfd_fail(capfd):
    os.write(1, b"raw fd output\n")
    out, _ = capfd.readouterr()
    os.write(2, b"raw fd error after read\n")
    assert out == "raw fd output, expected otherwise\n"


def test_fd_output_without_fixture_fail():
    os.write(1, b"written to fd 1 directly\n")
    os.write(2, b"written to fd 2 directly\n")
    raise RuntimeError("after fd writes")


def test_capsysbinary(capsysbinary):
    print("bytes please")
    assert capsysbinary.readouterr().out == b"bytes please\n"


def test_print_many_lines_fail():
    for i in range(50):
        print(f"line {i:02d}")
    assert 0, "after fifty lines"


# -- logging --------------------------------------------------------------------------------

def test_caplog_records(caplog):
    with caplog.at_level(logging.INFO, logger="parity.output"):
        log.info("info message %d", 1)
        log.warning("warning message")
    assert [r.getMessage() for r in caplog.records] == ["info message 1", "warning message"]


def test_caplog_fail(caplog):
    caplog.set_level(logging.DEBUG)
    log.debug("debug detail")
    log.error("an error was logged")
    assert caplog.messages == ["debug detail"]


def test_log_on_failure():
    log.warning("warning logged before the failure")
    log.error("error logged before the failure")
    assert {"status": "ok"} == {"status": "failed"}


def test_caplog_text(caplog):
    log.warning("text check")
    assert "text check" in caplog.text
    assert caplog.records[0].levelname == "WARNING"


def test_caplog_clear(caplog, shared_logger):
    shared_logger.warning("first")
    caplog.clear()
    shared_logger.warning("second")
    assert caplog.messages == ["second"]


def test_log_pass():
    log.warning("a passing test logs a warning")


# -- warnings -------------------------------------------------------------------------------

def test_pytest_warns():
    with pytest.warns(ParityWarning, match="expected"):
        warnings.warn("expected warning", ParityWarning)


def test_pytest_warns_did_not_warn():
    with pytest.warns(ParityWarning):
        pass


def test_pytest_warns_wrong_match():
    with pytest.warns(UserWarning, match="^exact$"):
        warnings.warn("not exact at all", UserWarning)


def test_deprecated_call():
    with pytest.deprecated_call():
        warnings.warn("old api", DeprecationWarning)


def test_recwarn(recwarn):
    warnings.warn("recorded one", UserWarning)
    assert len(recwarn) == 1
    assert str(recwarn.pop(UserWarning).message) == "recorded one"


def test_warning_in_summary():
    warnings.warn("this warning goes to the summary", ParityWarning)


def test_two_warnings_in_summary():
    warnings.warn("summary warning one", UserWarning)
    warnings.warn("summary warning two", DeprecationWarning)


def test_warning_then_fail():
    warnings.warn("warned before failing", ParityWarning)
    assert "warning" == "failure"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_filterwarnings_ignore():
    warnings.warn("ignored by the marker", UserWarning)


@pytest.mark.filterwarnings("error::UserWarning")
def test_filterwarnings_error():
    warnings.warn("turned into an error", UserWarning)


@pytest.fixture
def warning_in_setup():
    warnings.warn("warned in fixture setup", ParityWarning)
    return 1


def test_warning_from_fixture(warning_in_setup):
    assert warning_in_setup == 1
