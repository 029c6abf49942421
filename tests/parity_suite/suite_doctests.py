"""Doctests (the parity runs pass --doctest-modules) beside an ordinary test."""


def square(n):
    """
    >>> square(3)
    9
    >>> square(-2)
    4
    """
    return n * n


def broken_square(n):
    """
    >>> broken_square(3)
    9
    """
    return n * n + 1


def raising_doc():
    """
    >>> raising_doc()
    Traceback (most recent call last):
    ...
    ValueError: documented
    >>> {}["nope"]
    'value'
    """
    raise ValueError("documented")


def test_square():
    assert square(4) == 16
