"""Fixtures: errors in setup and teardown, yield fixtures, scopes with shared state,
usefixtures, autouse, params, request.node, finalizers."""

import pytest
from conftest import SETUPS

MODULE_SETUPS = []
CLASS_SETUPS = {}
NAMES_AT_SETUP = []


@pytest.fixture(scope="module")
def module_resource():
    MODULE_SETUPS.append("setup")
    yield {"kind": "module", "count": len(MODULE_SETUPS)}
    MODULE_SETUPS.append("teardown")


@pytest.fixture(scope="class")
def class_resource(request):
    key = request.cls.__name__ if request.cls else None
    CLASS_SETUPS[key] = CLASS_SETUPS.get(key, 0) + 1
    return {"class": key, "count": CLASS_SETUPS[key]}


@pytest.fixture
def recorded_name(request):
    NAMES_AT_SETUP.append(request.node.name)
    yield request.node.name


@pytest.fixture
def broken_setup():
    raise RuntimeError("fixture setup exploded")


@pytest.fixture
def broken_setup_assert():
    value = {"ready": False}
    assert value["ready"], "fixture precondition not met"
    return value


@pytest.fixture
def broken_teardown():
    yield "value"
    raise RuntimeError("fixture teardown exploded")


@pytest.fixture
def broken_teardown_assert():
    yield [1, 2]
    assert [1, 2] == [1, 3], "teardown comparison"


@pytest.fixture
def yield_resource():
    resource = {"open": True, "items": [1, 2, 3]}
    yield resource
    resource["open"] = False


@pytest.fixture
def finalized(request):
    state = {"finalized": False}

    def fin():
        state["finalized"] = True

    request.addfinalizer(fin)
    return state


@pytest.fixture
def failing_finalizer(request):
    def fin():
        raise ValueError("finalizer failed")

    request.addfinalizer(fin)
    return 1


@pytest.fixture
def dependent(yield_resource, module_resource):
    return (yield_resource["items"], module_resource["kind"])


@pytest.fixture(params=[1, 2, 3], ids=["one", "two", "three"])
def numbered(request):
    return request.param


@pytest.fixture(params=["ok", pytest.param("bad", marks=pytest.mark.xfail(reason="bad param"))])
def param_with_marks(request):
    return request.param


# -- passing, shared state -------------------------------------------------------------------

def _live_module_instances():
    return MODULE_SETUPS.count("setup") - MODULE_SETUPS.count("teardown")


def test_module_fixture_set_up_once(module_resource):
    # One live instance in this process (an xdist worker is a process of its own).
    assert module_resource["kind"] == "module"
    assert _live_module_instances() == 1


def test_module_fixture_still_once(module_resource):
    assert _live_module_instances() == 1


def test_module_fixture_count_fails(module_resource):
    assert _live_module_instances() == 2, f"setups seen: {MODULE_SETUPS}"


def test_session_fixture_set_up_once(session_resource):
    assert session_resource["setups"] == 1
    assert SETUPS["session"] == 1


def test_seen_records_my_name(seen, request):
    assert seen[-1] == request.node.nodeid
    assert len(seen) == len(set(seen))


def test_name_recorded_at_setup(recorded_name):
    assert NAMES_AT_SETUP[-1] == recorded_name == "test_name_recorded_at_setup"


def test_yield_fixture(yield_resource):
    assert yield_resource == {"open": True, "items": [1, 2, 3]}


def test_finalizer_registered(finalized):
    assert finalized == {"finalized": False}


def test_dependent_fixture(dependent):
    assert dependent == ([1, 2, 3], "module")


def test_numbered(numbered):
    assert numbered in (1, 2, 3)


def test_numbered_fails_for_two(numbered):
    assert numbered != 2, f"param {numbered} rejected"


def test_param_with_marks(param_with_marks):
    assert param_with_marks == "ok"


@pytest.mark.parity_tag("blue")
def test_request_node_marker(request):
    marker = request.node.get_closest_marker("parity_tag")
    assert marker.args == ("blue",)
    assert request.node.name == "test_request_node_marker"
    assert request.function.__name__ == "test_request_node_marker"


@pytest.mark.parity_tag("red")
def test_request_node_marker_fails(request):
    assert request.node.get_closest_marker("parity_tag").args == ("green",)


def test_request_fixturenames(request, yield_resource):
    assert "yield_resource" in request.fixturenames


@pytest.mark.usefixtures("recorded_name")
def test_usefixtures():
    assert NAMES_AT_SETUP[-1] == "test_usefixtures"


@pytest.mark.usefixtures("broken_setup")
def test_usefixtures_broken():
    pass


def test_getfixturevalue(request):
    value = request.getfixturevalue("yield_resource")
    assert value["open"] is True


# -- errors in setup and teardown -------------------------------------------------------------

def test_error_in_setup(broken_setup):
    pass


def test_error_in_setup_assert(broken_setup_assert):
    pass


def test_error_in_teardown(broken_teardown):
    assert broken_teardown == "value"


def test_error_in_teardown_assert(broken_teardown_assert):
    assert broken_teardown_assert == [1, 2]


def test_fail_and_error_in_teardown(broken_teardown):
    assert broken_teardown == "other value"


def test_failing_finalizer(failing_finalizer):
    assert failing_finalizer == 1


def test_missing_fixture(no_such_fixture_anywhere):
    pass


# -- class scope --------------------------------------------------------------------------

class TestClassScope:
    def test_first(self, class_resource):
        assert class_resource == {"class": "TestClassScope", "count": 1}

    def test_second(self, class_resource):
        assert CLASS_SETUPS["TestClassScope"] == 1

    def test_fails_with_resource(self, class_resource):
        assert class_resource["count"] == 2


@pytest.mark.usefixtures("class_resource")
class TestClassUsefixtures:
    def test_counted_once(self):
        assert CLASS_SETUPS["TestClassUsefixtures"] == 1

    def test_still_once(self):
        assert CLASS_SETUPS["TestClassUsefixtures"] == 1


class TestAutouse:
    @pytest.fixture(autouse=True)
    def _prepare(self, request):
        self.prepared = request.node.name

    def test_prepared(self):
        assert self.prepared == "test_prepared"

    def test_prepared_fails(self):
        assert self.prepared == "something else"
