"""The suite's own order and units of work (tests/durations.py): long tests alone and first, the other tests
with their module, the heaviest module first."""

from tests.durations import OWN_UNIT_S, UNRECORDED_S, longest_first, unit_of


def test_a_long_test_is_a_unit_of_its_own_and_any_other_goes_with_its_module():
    durations = {"m.py::long": OWN_UNIT_S, "m.py::nearly": OWN_UNIT_S - 0.1}
    assert unit_of("m.py::long", durations) == "m.py::long"
    assert unit_of("m.py::nearly", durations) == "m.py"
    assert unit_of("m.py::new[param]", durations) == "m.py"


def test_the_heaviest_unit_runs_first_and_a_module_keeps_its_order():
    nodeids = ["a.py::x", "a.py::y", "b.py::quick", "b.py::long", "c.py::one", "c.py::two", "c.py::three"]
    durations = {"b.py::long": 60.0, "a.py::x": 2.0, "c.py::one": 1.5, "c.py::two": 1.5}
    order = [nodeids[i] for i in longest_first(nodeids, durations)]
    # b.py::long (60) alone; then c.py (1.5 + 1.5 + 0.2) before a.py (2.0 + 0.2); b.py's quick test last.
    assert order == ["b.py::long", "c.py::one", "c.py::two", "c.py::three", "a.py::x", "a.py::y", "b.py::quick"]
    assert UNRECORDED_S < 1.0


def test_without_recorded_durations_the_collection_order_stands():
    nodeids = ["a.py::1", "b.py::1", "a.py::2"]
    assert longest_first(nodeids, {}) == [0, 2, 1]  # modules contiguous, in the order they first appear
    assert longest_first(["a.py::1", "a.py::2"], {"gone.py::t": 99.0}) == [0, 1]
