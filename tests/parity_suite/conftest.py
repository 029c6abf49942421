"""The parity suite is not part of the project's own run (its tests fail, skip and xfail on
purpose): tests/test_parity.py runs a copy of it.  Nothing here is collected, not even with
--doctest-modules."""

collect_ignore_glob = ["*"]
