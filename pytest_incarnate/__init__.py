"""pytest-incarnate: run each test, or a subprocess it starts, in a fresh incarnation.

Public API::

    from pytest_incarnate import Spec, Sandbox, Result, probe, Capabilities
"""

from pytest_incarnate.probe import Capabilities, Capability, probe
from pytest_incarnate.sandbox import DEVNULL, PIPE, Handle, Plan, Result, Sandbox
from pytest_incarnate.spec import NAMESPACES, Bind, Overlay, Spec, Tmpfs

__version__ = "0.1.0"

__all__ = [
    "Bind",
    "Capabilities",
    "Capability",
    "DEVNULL",
    "Handle",
    "NAMESPACES",
    "Overlay",
    "PIPE",
    "Plan",
    "Result",
    "Sandbox",
    "Spec",
    "Tmpfs",
    "probe",
]
