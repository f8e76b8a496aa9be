import numpy as np
import pytest

from reward_plugins.ensemble import combine, member_variance, standardize

# Three members, two samples, values chosen so every statistic is easy to do by hand.
SCORES = np.array([[1.0, 0.0], [2.0, 4.0], [6.0, 2.0]])
# sample 0: mean 3, min 1, population var ((4 + 1 + 9) / 3) = 14/3, sample var 14/2 = 7
# sample 1: mean 2, min 0, population var ((4 + 4 + 0) / 3) = 8/3,  sample var 8/2 = 4


def test_mean_and_wco_by_hand():
    np.testing.assert_allclose(combine(SCORES, "mean"), [3.0, 2.0])
    np.testing.assert_allclose(combine(SCORES, "wco"), [1.0, 0.0])


def test_uwo_population_variance_by_default():
    np.testing.assert_allclose(combine(SCORES, "uwo", uwo_weight=0.5), [3.0 - 0.5 * 14 / 3, 2.0 - 0.5 * 8 / 3])


def test_uwo_sample_variance_with_ddof_1():
    np.testing.assert_allclose(combine(SCORES, "uwo", uwo_weight=0.1, ddof=1), [3.0 - 0.7, 2.0 - 0.4])


def test_uwo_weight_zero_means_zero_not_one():
    np.testing.assert_allclose(combine(SCORES, "uwo", uwo_weight=0.0), combine(SCORES, "mean"))


def test_variance_and_single_member():
    np.testing.assert_allclose(member_variance(SCORES), [14 / 3, 8 / 3])
    single = np.array([[0.3, -1.0]])
    np.testing.assert_allclose(combine(single, "uwo", uwo_weight=2.0), [0.3, -1.0])
    np.testing.assert_allclose(combine(single, "wco"), [0.3, -1.0])


def test_standardize_rows():
    z = standardize(SCORES, means=[1.0, 2.0, 4.0], stds=[1.0, 2.0, 2.0])
    np.testing.assert_allclose(z, [[0.0, -1.0], [0.0, 1.0], [1.0, -1.0]])


@pytest.mark.parametrize("bad", [np.zeros(3), np.zeros((0, 3)), np.zeros((2, 2, 2))])
def test_shape_errors(bad):
    with pytest.raises(ValueError, match="shape"):
        combine(bad, "mean")


def test_unknown_objective():
    with pytest.raises(ValueError, match="unknown ensemble objective 'median'"):
        combine(SCORES, "median")


def test_default_uwo_weight_is_one_half():
    np.testing.assert_allclose(combine(SCORES, "uwo"), [3.0 - 0.5 * 14 / 3, 2.0 - 0.5 * 8 / 3])


def test_uwo_weight_none_is_refused_with_its_reason():
    with pytest.raises(ValueError) as info:
        combine(SCORES, "uwo", uwo_weight=None)
    assert str(info.value) == "uwo needs a uwo_weight (0 is allowed and means plain mean)"


def test_sample_variance_needs_two_members():
    np.testing.assert_allclose(member_variance([[1.0, 5.0], [3.0, 5.0]], ddof=1), [2.0, 0.0])
    single = [[0.3, -1.0, 4.0]]
    assert member_variance(single, ddof=1).tolist() == [0.0, 0.0, 0.0]  # no spread to measure, never NaN
    assert member_variance(single, ddof=2).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_results_are_float64_whatever_the_input(dtype):
    scores = np.array([[1, 0], [2, 4], [6, 2]], dtype=dtype)
    for objective in ("mean", "wco", "uwo"):
        assert combine(scores, objective).dtype == np.float64
    assert member_variance(scores).dtype == np.float64
    z = standardize(scores, np.array([1, 2, 4], dtype=dtype), np.array([3, 3, 3], dtype=dtype))
    assert z.dtype == np.float64
    np.testing.assert_array_equal(z, (np.array([[1, 0], [2, 4], [6, 2]], dtype=np.float64)
                                      - np.array([[1.0], [2.0], [4.0]])) / 3.0)
