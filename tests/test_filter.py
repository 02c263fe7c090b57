"""The Parzen-window test, exactly."""

import array_api_strict
import numpy as np
import pytest

from dask_asgd.filter import FULL_WINDOW_SIZE, UpdateFilter, moves_towards


def test_state_the_step_moves_towards_is_accepted():
    before = np.array([0.0, 0.0])
    after = np.array([1.0, 0.0])  # the local step went +x
    assert moves_towards(before, after, np.array([3.0, 0.0]))


def test_state_the_step_moves_away_from_is_rejected():
    before = np.array([0.0, 0.0])
    after = np.array([1.0, 0.0])
    assert not moves_towards(before, after, np.array([-3.0, 0.0]))


def test_boundary_is_rejected():
    # Equal distances: the step does not move towards it, so it is not merged.
    before, after = np.array([0.0, 0.0]), np.array([1.0, 0.0])
    assert not moves_towards(before, after, np.array([0.5, 7.0]))


def test_closed_form_on_random_states():
    rng = np.random.default_rng(1)
    for _ in range(200):
        before, after, received = rng.normal(size=(3, 10))
        expected = np.sum((after - received) ** 2) < np.sum((before - received) ** 2)
        assert moves_towards(before, after, received) == expected


def test_filter_counts_and_none_accepts_all():
    # States well inside the window around the local state (filter.WINDOW, for
    # FULL_WINDOW_SIZE parameters), so the Parzen test alone decides.
    step = np.eye(FULL_WINDOW_SIZE)[0]
    before = np.full(FULL_WINDOW_SIZE, 10.0)
    after = before + step
    toward, away = after + step, before - 2 * step
    parzen = UpdateFilter("parzen")
    assert parzen.accept(before, after, toward) and not parzen.accept(before, after, away)
    assert (parzen.accepted, parzen.rejected) == (1, 1)
    everything = UpdateFilter(None)
    assert everything.accept(before, after, away) and everything.accept(before, after, toward)
    assert (everything.accepted, everything.rejected) == (2, 0)


def test_unknown_filter_is_refused():
    with pytest.raises(ValueError, match="update_filter='median' is not known"):
        UpdateFilter("median")


@pytest.mark.parametrize("device", ["CPU_DEVICE", "device1"])
def test_filter_in_array_api_strict(device):
    # "device1" stands in for a GPU: no implicit NumPy conversion, no mixing with
    # the default device (see test_models.py).
    xp = array_api_strict
    on = xp.Device(device)
    rng = np.random.default_rng(2)
    for _ in range(50):
        before, after, received = rng.normal(size=(3, 10))
        expected = moves_towards(before, after, received)
        assert moves_towards(*(xp.asarray(a, device=on) for a in (before, after, received))) == expected
    f = UpdateFilter("parzen")
    before, after = xp.asarray([10.0, 1.0], device=on), xp.asarray([10.5, 1.0], device=on)
    assert f.accept(before, after, xp.asarray([10.8, 1.0], device=on))
    assert not f.accept(before, after, xp.asarray([9.8, 1.0], device=on))
    assert (f.accepted, f.rejected) == (1, 1)
