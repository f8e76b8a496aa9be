import numpy as np
import pytest

from reward_plugins.vrcli import extract_plan, find_plan, improvement, shape, strip_special_tokens


def test_improvement_formula_vectorised():
    np.testing.assert_allclose(improvement([10.0, 10.0, 4.0], [9.0, 11.0, 4.0]), [10.0, -10.0, 0.0])


@pytest.mark.parametrize("baseline", [0.0, -1.0, np.nan, np.inf])
def test_improvement_rejects_bad_baselines(baseline):
    with pytest.raises(ValueError, match="baseline"):
        improvement([baseline], [1.0])


@pytest.mark.parametrize(
    "value, expected",
    [
        (-5.0, 0.0),
        (0.0, 0.0),
        (0.049999, 0.0),
        (0.05, 0.5),  # thresholds are inclusive and in percent units
        (0.999999, 0.5),
        (1.0, 0.9),
        (1.999999, 0.9),
        (2.0, 1.0),
        (50.0, 1.0),
    ],
)
def test_stepped_boundaries(value, expected):
    assert shape([value], "stepped")[0] == expected


def test_stepped_custom_thresholds_and_nan_passthrough():
    out = shape([0.5, 3.0, np.nan], "stepped", thresholds=[1.0, 3.0], levels=[0.25, 0.75], below=-1.0)
    assert out[0] == -1.0 and out[1] == 0.75 and np.isnan(out[2])


def test_other_schemes():
    values = np.array([-1.0, 0.0, 2.5, 10.0])
    np.testing.assert_array_equal(shape(values, "binary"), [0.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(shape(values, "binary", binary_threshold=1.0), [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(shape(values, "clipped_linear", clip_max=5.0), [0.0, 0.0, 0.5, 1.0])
    np.testing.assert_array_equal(shape(values, "raw"), values)
    with pytest.raises(ValueError, match="unknown shaping"):
        shape(values, "cubic")
    with pytest.raises(ValueError, match="ascending"):
        shape(values, "stepped", thresholds=[2.0, 1.0], levels=[1.0, 0.5])


def test_plan_after_last_marker():
    text = "In summary: draft one. More thoughts. In summary: the real plan."
    assert extract_plan(text) == "the real plan."


def test_plan_marker_chain_as_the_paper():
    assert extract_plan("thinking... In summary, go north.") == "go north."
    assert extract_plan("Detailed Plan: a then b") == "a then b"
    # The chain goes on inside what the previous marker left (ray_utils.py's three splits on the last occurrence).
    assert extract_plan("In summary: x. Detailed Plan: y") == "y"
    assert extract_plan("In summary: A. In summary, B") == "B"
    assert extract_plan("Detailed Plan: X. In summary: Y") == "Y"
    assert extract_plan("In summary, a. In summary: b. In summary, c") == "c"
    assert find_plan("  just prose  ") == ("just prose", False)
    assert find_plan("x In summary: y") == ("y", True)


def test_plan_missing_or_empty():
    assert extract_plan("no marker here") == "no marker here"  # the paper's fallback: the whole response
    with pytest.raises(ValueError, match="no plan marker"):
        extract_plan("no marker here", whole_response_fallback=False)
    with pytest.raises(ValueError, match="empty plan"):
        extract_plan("In summary:   ")
    with pytest.raises(ValueError, match="empty plan"):
        extract_plan("   ")


def test_strip_special_tokens():
    """Anywhere in the response, as the original's decode(skip_special_tokens=True).strip()."""
    assert strip_special_tokens("go north.<|im_end|>\n<|endoftext|>", ["<|im_end|>", "<|endoftext|>"]) == "go north."
    assert strip_special_tokens("keep <|im_end|> inside", ["<|im_end|>"]) == "keep  inside"
    assert strip_special_tokens("<|im_start|>In summary: go<|im_end|>", ["<|im_end|>", "<|im_start|>"]) == "In summary: go"
    assert strip_special_tokens("<eos>", ["<eos>"]) == ""
    assert strip_special_tokens("a<|im_end|>b", ["<|im_end|>", "<|im_end"]) == "ab"  # the longest match first


def test_improvement_is_float64_whatever_the_inputs():
    # a label may carry an integer too large for int64; float32 inputs must not lose digits to float32 arithmetic
    np.testing.assert_allclose(improvement([10**20], [10**19]), [90.0])
    out = improvement(np.array([3.0], dtype=np.float32), np.array([10**20], dtype=object))
    assert out.dtype == np.float64 and out[0] == pytest.approx(100.0 * (3.0 - 1e20) / 3.0)
    # a perplexity is at least 1, and exactly 1 is a valid baseline (the gold tokens predicted with certainty)
    np.testing.assert_allclose(improvement([1.0, 0.5], [1.0, 0.25]), [0.0, 50.0])
    with pytest.raises(ValueError, match="^baseline perplexities must be finite and positive$"):
        improvement([0.0], [1.0])


def test_shape_defaults_and_refusals_by_hand():
    assert shape([1.5]).tolist() == [0.9]  # stepped is the default: 0.9 from 1 % up to 2 %
    assert shape([2.5], "clipped_linear").tolist() == [0.5]  # clip_max defaults to 5 (percent)
    assert shape([0.25], "clipped_linear", clip_max=0.5).tolist() == [0.5]  # any positive clip_max, also below 1
    assert shape([10**20], "stepped").tolist() == [1.0]  # huge integers are numbers, not objects
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="^clip_max must be positive$"):
            shape([1.0], "clipped_linear", clip_max=bad)
    with pytest.raises(ValueError, match="^stepped shaping needs ascending thresholds, one level per threshold$"):
        shape([1.0], thresholds=[1.0], levels=[0.5, 1.0])


def test_plan_errors_name_the_markers_and_the_cause():
    assert extract_plan("Plan: go west", markers=("Plan:",)) == "go west"  # the markers given are used
    with pytest.raises(ValueError, match=r"^no plan marker \('A:', 'B:'\) in the response$"):
        extract_plan("go west", markers=("A:", "B:"), whole_response_fallback=False)
    with pytest.raises(ValueError, match="^empty plan after the last marker$"):
        extract_plan("text In summary:  ")
    with pytest.raises(ValueError, match="^empty plan: the response is empty$"):
        extract_plan("   ")
