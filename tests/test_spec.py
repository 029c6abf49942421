"""Every bad Spec field raises SpecError naming the field and the bad value."""

from __future__ import annotations

import pathlib

import pytest

from pytest_incarnate import Bind, Overlay, Sandbox, Spec, Tmpfs
from pytest_incarnate.errors import InvalidArgv, InvalidRootfsPath, NonExecutablePayload, SpecError


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"namespaces": {"user", "bogus"}}, "namespaces"),
        ({"namespaces": {"user", 3}}, "namespaces"),
        ({"namespaces": 5}, "namespaces"),
        ({"hostname": 12}, "hostname"),
        ({"hostname": "a\x00b"}, "hostname"),
        ({"hostname": "x" * 65}, "hostname"),
        ({"root": "relative/dir"}, "root"),
        ({"root": "/no/such/dir"}, "root"),
        ({"root": "/tm\x00p"}, "root"),
        ({"binds": ["relative"]}, "binds.source"),
        ({"binds": [("/tmp", "rel")]}, "binds.target"),
        ({"binds": [("/tmp", "/x\x00")]}, "binds.target"),
        ({"binds": [("/tmp", "/x", "rx")]}, "binds"),
        ({"binds": [42]}, "binds"),
        ({"binds": "/tmp"}, "binds"),
        ({"binds": [(b"/tmp", "/x")]}, "binds.source"),
        ({"tmpfs": ["tmp"]}, "tmpfs.target"),
        ({"tmpfs": [{"target": "/t", "size": -1}]}, "tmpfs.size"),
        ({"tmpfs": [{"target": "/t", "size": "12q"}]}, "tmpfs.size"),
        ({"tmpfs": [{"target": "/t", "mode": 0o17777}]}, "tmpfs.mode"),
        ({"tmpfs": [7]}, "tmpfs"),
        ({"overlays": [{"target": "/m", "lower": []}]}, "overlays.lower"),
        ({"overlays": [{"target": "/m", "lower": ["/a"], "upper": "/u"}]}, "overlays.upper"),
        ({"overlays": [{"target": "m", "lower": ["/a", "/b"]}]}, "overlays.target"),
        ({"overlays": [{"target": "/m", "lower": ["/a,b", "/c"]}]}, "overlays.lower"),
        ({"overlays": ["nope"]}, "overlays"),
        ({"env": {"A": 1}}, "env['A']"),
        ({"env": {"A=B": "1"}}, "env"),
        ({"env": {"A": "x\x00"}}, "env['A']"),
        ({"env": ["A=1"]}, "env"),
        ({"cwd": "relative"}, "cwd"),
        ({"cwd": 3}, "cwd"),
        ({"map_user": "nobody"}, "map_user"),
        ({"uid": -1}, "uid"),
        ({"gid": "0"}, "gid"),
        ({"uid": True}, "uid"),
        ({"strict": "yes"}, "strict"),
        ({"loopback": 1}, "loopback"),
        ({"umask": 0o1777}, "umask"),
    ],
)
def test_bad_field_names_the_field(kwargs, field):
    with pytest.raises(SpecError) as exc:
        Spec(**kwargs)
    assert exc.value.field == field
    assert str(exc.value).startswith(field + ":")
    assert repr(exc.value.value) in str(exc.value)


def test_invalid_root_is_its_own_type():
    with pytest.raises(InvalidRootfsPath) as exc:
        Spec(root="/definitely/missing")
    assert exc.value.field == "root"


def test_unknown_keyword_is_named():
    with pytest.raises(SpecError) as exc:
        Spec.from_kwargs("@pytest.mark.incarnate", hostnme="x")
    assert exc.value.field == "hostnme"
    assert "unknown @pytest.mark.incarnate keyword" in str(exc.value)


def test_spec_is_frozen_and_normalised(tmp_path: pathlib.Path):
    s = Spec(namespaces="user,mount pid", binds=[str(tmp_path), (str(tmp_path), "/data", "ro")],
             tmpfs=["/tmp/"], env={"A": "1"})
    assert s.namespaces == frozenset({"user", "mount", "pid"})
    assert s.binds == (Bind(str(tmp_path)), Bind(str(tmp_path), "/data", True))
    assert s.tmpfs == (Tmpfs("/tmp"),)
    with pytest.raises(AttributeError):
        s.hostname = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.env["B"] = "2"  # type: ignore[index]
    assert hash(s) == hash(Spec(namespaces="user,mount pid", binds=s.binds, tmpfs=["/tmp"], env={"A": "1"}))
    assert s.replace(hostname="y").hostname == "y"
    assert Overlay("/m", ["/a", "/b"]).lower == ("/a", "/b")


@pytest.mark.parametrize(
    "argv", ["/bin/true", [], ["/bin/true", 3], ["/bin/tr\x00ue"], None, b"/bin/true"]
)
def test_bad_argv(argv, leak_check):
    with pytest.raises(InvalidArgv) as exc:
        Sandbox().run(argv)
    assert exc.value.field == "argv"


def test_bad_input_type():
    with pytest.raises(SpecError) as exc:
        Sandbox().run(["/bin/true"], input="text")  # type: ignore[arg-type]
    assert exc.value.field == "input"


@pytest.mark.parametrize("argv0", ["/no/such/program", "no-such-program-xyz"])
def test_missing_executable_names_the_path(argv0, leak_check):
    with pytest.raises(NonExecutablePayload) as exc:
        Sandbox().run([argv0])
    assert exc.value.path == argv0
    assert exc.value.errno == 2
    assert argv0 in str(exc.value)


def test_non_executable_file(tmp_path, leak_check):
    f = tmp_path / "script"
    f.write_text("#!/bin/sh\n")
    f.chmod(0o644)
    with pytest.raises(NonExecutablePayload) as exc:
        Sandbox().run([str(f)])
    assert exc.value.errno == 13
