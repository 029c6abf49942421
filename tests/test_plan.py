"""Planning from a capability set.

This machine cannot produce Ubuntu 24.04's AppArmor restriction (its kernel has no AppArmor), so
these tests inject a capability set shaped like the probe's answer there. Everything that this
machine can produce for real is tested in test_degradations.py instead.
"""

from __future__ import annotations

import pytest

from pytest_incarnate import Spec, probe
from pytest_incarnate.errors import NamespaceCapMissing, NamespaceSkipped, UserNsRestrictedByLsm
from pytest_incarnate.probe import APPARMOR_FIX, Capabilities, Capability
from pytest_incarnate.sandbox import make_plan

APPARMOR_REASON = (
    "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1): "
    "the namespace is created but mount-tmpfs fails with EACCES (Permission denied)"
)


def ubuntu_2404_unprivileged() -> Capabilities:
    """Injected: what the probe reports for an unprivileged user on Ubuntu 24.04."""
    items = [Capability("ns.user", False, APPARMOR_REASON, APPARMOR_FIX)]
    for ns in ("mount", "pid", "net", "uts", "ipc", "cgroup"):
        items.append(Capability(f"ns.{ns}", False, "creating it needs CAP_SYS_ADMIN (not root); no user namespace to fall back on"))
    return Capabilities(tuple(items), 1000, "6.8.0-generic", {"kernel.apparmor_restrict_unprivileged_userns": "1"})


def test_strict_apparmor_raises_the_lsm_error_with_its_fix() -> None:
    with pytest.raises(UserNsRestrictedByLsm) as exc:
        make_plan(Spec(strict=True), ubuntu_2404_unprivileged())
    assert exc.value.ns == "user"
    assert exc.value.lsm == "AppArmor"
    assert "kernel.apparmor_restrict_unprivileged_userns=0" in str(exc.value)


def test_not_strict_apparmor_skips_every_namespace_with_reasons() -> None:
    plan = make_plan(Spec(), ubuntu_2404_unprivileged())
    assert plan.namespaces == ()
    assert [d.ns for d in plan.degradations] == ["user", "mount", "pid", "net", "uts", "ipc", "cgroup"]
    assert all(isinstance(d, NamespaceSkipped) for d in plan.degradations)
    assert "AppArmor" in plan.degradations[0].reason and APPARMOR_FIX in plan.degradations[0].reason
    assert plan.uid_map is None


def test_strict_other_namespace_names_it() -> None:
    with pytest.raises(NamespaceCapMissing) as exc:
        make_plan(Spec(namespaces={"net"}, strict=True), ubuntu_2404_unprivileged())
    assert exc.value.ns == "net" and "CAP_SYS_ADMIN" in exc.value.reason


def test_real_probe_on_this_machine_grants_the_default_spec() -> None:
    caps = probe()
    assert probe() is caps  # cached per process
    assert probe(refresh=True) is not caps
    plan = make_plan(Spec(strict=True), caps)
    assert set(plan.namespaces) == {"user", "mount", "pid", "net", "uts", "ipc", "cgroup"}
    assert plan.degradations == ()
    assert caps.to_dict()["capabilities"]["ns.user"]["granted"] is True
