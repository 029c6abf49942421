"""parametrize (ids, stacked, marks, indirect), classes with setup/teardown methods,
unittest.TestCase."""

# ruff: noqa: PLW0129  (failing on purpose: the failures are what is compared)

import unittest

import pytest

CLASS_LOG = []


@pytest.mark.parametrize("a,b,expected", [(1, 2, 3), (2, 3, 5), (10, -1, 9), (2, 2, 5)])
def test_add(a, b, expected):
    assert a + b == expected


@pytest.mark.parametrize(
    "word,length",
    [("alpha", 5), ("beta", 4), ("gamma", 6)],
    ids=["alpha-5", "beta-4", "gamma-wrong"],
)
def test_word_length(word, length):
    assert len(word) == length


@pytest.mark.parametrize("value", [[1, 2], {"k": "v"}, "text", None], ids=lambda v: type(v).__name__)
def test_ids_callable(value):
    assert value is not None, "None is rejected"


@pytest.mark.parametrize("x", [0, 1])
@pytest.mark.parametrize("y", ["a", "b"])
def test_stacked(x, y):
    assert (x, y) != (1, "b")


@pytest.mark.parametrize(
    "n",
    [
        1,
        pytest.param(2, marks=pytest.mark.xfail(reason="two is odd here"), id="xfail-two"),
        pytest.param(3, marks=pytest.mark.skip(reason="three skipped"), id="skip-three"),
        pytest.param(4, marks=pytest.mark.xfail(strict=True, reason="four strict"), id="strict-four"),
        pytest.param(5, id="five"),
    ],
)
def test_param_marks(n):
    assert n % 2 == 1


@pytest.fixture
def doubled(request):
    return request.param * 2


@pytest.mark.parametrize("doubled", [1, 2, 3], indirect=True)
def test_indirect(doubled):
    assert doubled in (2, 4)


@pytest.mark.parametrize("data", [{"a": [1, 2]}, {"a": [1, 3]}], ids=["match", "mismatch"])
def test_param_dicts(data):
    assert data == {"a": [1, 2]}


@pytest.mark.parametrize("text", ["ok", "ünïcödé", "with space", ""])
def test_param_strings(text):
    assert text == text.strip() and text


class TestWithSetupMethod:
    def setup_method(self, method):
        self.items = [method.__name__]

    def teardown_method(self, method):
        self.items.clear()

    def test_setup_ran(self):
        assert self.items == ["test_setup_ran"]

    def test_setup_fail(self):
        assert self.items == ["something else"]

    @pytest.mark.parametrize("k", [1, 2])
    def test_param_in_class(self, k):
        assert self.items == ["test_param_in_class"] and k in (1, 2)


class TestSetupClass:
    @classmethod
    def setup_class(cls):
        CLASS_LOG.append("setup_class")
        cls.shared = {"created": len(CLASS_LOG)}

    @classmethod
    def teardown_class(cls):
        CLASS_LOG.append("teardown_class")

    def test_shared_one(self):
        assert CLASS_LOG.count("setup_class") - CLASS_LOG.count("teardown_class") == 1
        assert "created" in self.shared

    def test_shared_two(self):
        assert self.shared["created"] >= 1

    def test_shared_fails(self):
        assert self.shared == {"created": -1}


class TestBrokenSetupMethod:
    def setup_method(self, method):
        raise RuntimeError(f"setup_method broke for {method.__name__}")

    def test_never_reached(self):
        pass


class TestBrokenTeardownMethod:
    def teardown_method(self, method):
        raise RuntimeError("teardown_method broke")

    def test_passes_but_teardown_breaks(self):
        assert True


class TestOuter:
    class TestInner:
        def test_inner_pass(self):
            assert "inner"

        def test_inner_fail(self):
            assert ["inner"] == ["outer"]

    def test_outer(self):
        assert True


# -- unittest --------------------------------------------------------------------------------

class ParityTestCase(unittest.TestCase):

    @classmethod
    def setUpClass(cls):
        cls.resource = {"shared": True}

    def setUp(self):
        self.value = 10

    def test_pass(self):
        self.assertEqual(self.value, 10)

    def test_assert_equal_fail(self):
        self.assertEqual([1, 2, 3], [1, 2, 4])

    def test_assert_dict_fail(self):
        self.assertDictEqual({"a": 1}, {"a": 2}, "dicts differ")

    def test_plain_assert_fail(self):
        assert self.value == 11

    def test_raises(self):
        with self.assertRaises(KeyError):
            {}["x"]

    def test_error(self):
        raise OSError("unittest error")

    def test_class_resource(self):
        self.assertTrue(self.resource["shared"])

    @unittest.skip("unittest skip decorator")
    def test_skipped(self):
        raise AssertionError("never runs")

    def test_skip_test(self):
        self.skipTest("skipTest called")

    @unittest.expectedFailure
    def test_expected_failure(self):
        self.assertEqual(1, 2)

    @unittest.expectedFailure
    def test_unexpected_success(self):
        self.assertEqual(1, 1)

    def test_subtests_pass(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertLess(i, 3)


class BrokenSetUpCase(unittest.TestCase):
    def setUp(self):
        raise ValueError("setUp failed")

    def test_never(self):
        pass


class BrokenTearDownCase(unittest.TestCase):
    def tearDown(self):
        raise ValueError("tearDown failed")

    def test_body_ok(self):
        pass


class BrokenSetUpClassCase(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        raise RuntimeError("setUpClass failed")

    def test_never(self):
        pass


@unittest.skip("whole TestCase skipped")
class SkippedCase(unittest.TestCase):
    def test_skipped(self):
        pass


class CleanupCase(unittest.TestCase):
    def test_cleanup_fails(self):
        def cleanup():
            raise RuntimeError("cleanup failed")

        self.addCleanup(cleanup)


@pytest.mark.skipif(int(pytest.__version__.split(".")[0]) < 9, reason="the subtests fixture is pytest 9's")
def test_subtests_fixture(request):
    subtests = request.getfixturevalue("subtests")
    for i in range(3):
        with subtests.test(msg="each", i=i):
            assert i != 1, f"subtest {i} rejected"
