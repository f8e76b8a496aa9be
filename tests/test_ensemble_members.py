"""The ensemble's member plumbing: scores that fail one sample only, members placed through a placer (an in-process
stand-in for Ray's), and reference sets read with their labels. Expected values are written out by hand or come
from each RM scoring one text alone with plain transformers."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from reward_plugins import Sample, Status, parse_pipeline_config
from reward_plugins.ensemble import CombinerConfig, MemberEnsemble, read_reference_samples
from reward_plugins.io import DataError
from reward_plugins.pipeline import build_pipeline

SAMPLES = [Sample(prompt="Q ", response="apple"), Sample(prompt="Q ", response="two words"),
           Sample(prompt="Q ", response="x y z")]


class FixedMembers(MemberEnsemble):
    """Members whose (k, B) scores are given: the combiner path alone, no model."""

    def __init__(self, scores, **fields):
        super().__init__(CombinerConfig(**fields), "ens")
        self.scores = np.asarray(scores, dtype=np.float64)

    @property
    def allows_empty_response(self) -> bool:
        return False

    def member_scores(self, samples):
        return self.scores[:, : len(samples)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy's variance of a NaN column
def test_a_non_finite_member_score_fails_its_sample_only_and_names_the_member():
    plugin = FixedMembers([[1.0, 2.0, 4.0], [math.nan, 2.5, 3.0], [0.0, -math.inf, 5.0]],
                          member_names=["a", "b", "c"], objective="uwo", uwo_weight=0.5)
    first, second, third = plugin.score(SAMPLES)
    assert first.status is Status.ERROR and first.error == "ens: non-finite score from b"
    assert second.status is Status.ERROR and second.error == "ens: non-finite score from c"
    (both,) = FixedMembers([[1.0], [math.inf], [math.nan]], member_names=["a", "b", "c"]).score(SAMPLES[:1])
    assert both.error == "ens: non-finite score from b, c"
    assert third.status is Status.OK  # the batch goes on after a failed sample
    column = [4.0, 3.0, 5.0]
    assert third.components == pytest.approx({"a": 4.0, "b": 3.0, "c": 5.0, "variance": 2 / 3, "combined": 4.0 - 1 / 3})
    assert third.reward == pytest.approx(sum(column) / 3 - 0.5 * 2 / 3)


def test_combined_variance_and_raw_components_with_given_reference_stats():
    plugin = FixedMembers([[2.0], [10.0]], member_names=["a", "b"], objective="wco", standardize="reference_stats",
                          reference_stats=[{"mean": 1.0, "std": 2.0}, {"mean": 4.0, "std": 3.0}])
    plugin.load_reference_statistics()
    (result,) = plugin.score(SAMPLES[:1])
    z = [(2.0 - 1.0) / 2.0, (10.0 - 4.0) / 3.0]  # 0.5 and 2.0
    assert result.components == pytest.approx({"a": 2.0, "b": 10.0, "variance": 0.5625, "combined": 0.5})
    assert result.reward == pytest.approx(min(z))


def test_empty_responses_fail_and_the_rest_are_scored():
    plugin = FixedMembers([[1.0, 3.0], [2.0, 5.0]], member_names=["a", "b"])
    empty, scored = plugin.score([Sample(prompt="Q", response="  "), SAMPLES[0]])
    assert empty.status is Status.ERROR and empty.error == "ens: empty response"
    assert scored.reward == pytest.approx(1.5)  # the first column: only the valid sample reached the members


def test_a_template_key_missing_from_the_label_names_the_plugin_and_the_key(rm_dirs):
    reward = {"type": "ensemble", "name": "uwo", "members": [
        {"path": str(rm_dirs[1]), "template": "{prompt}{response} ({label[topic]})"},
        {"path": str(rm_dirs[2])}]}
    pipeline = build_pipeline(parse_pipeline_config({"reward": reward}))
    with pytest.raises(ValueError, match=r"^uwo: a member template needs 'topic' from the sample/label$"):
        pipeline.root.score([Sample(prompt="Q ", response="a", label={"other": 1})])


@torch.no_grad()
def _logit(folder, text: str) -> float:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    return float(model(**tokenizer(text, return_tensors="pt")).logits[0, 0])


class InProcessPlacer:
    """The `Placer` protocol without a cluster: each placed object is built here; calls run at once."""

    def __init__(self):
        self.placed: list[tuple[str, object]] = []
        self.checked: list = []

    def check(self, requests):
        self.checked.extend(requests)

    def place(self, factory, placement, name):
        self.placed.append((name, placement))
        target = factory()

        def submit(method, items):
            result = getattr(target, method)(items)
            return SimpleNamespace(result=lambda: result)

        return SimpleNamespace(submit=submit, call_one=lambda method, *args: getattr(target, method)(*args),
                               close=lambda: None)


def test_members_placed_one_by_one_score_like_local_ones_in_member_order(rm_dirs):
    """Member b in replicas (through the placer, under its ensemble-qualified name), a and c here."""
    placement = {"num_gpus": 0, "num_cpus": 1}
    reward = {"type": "ensemble", "name": "uwo", "objective": "mean", "members": [
        {"name": "a", "path": str(rm_dirs[1])}, {"name": "b", "path": str(rm_dirs[2]), "placement": placement},
        {"name": "c", "path": str(rm_dirs[3])}]}
    placer = InProcessPlacer()
    pipeline = build_pipeline(parse_pipeline_config({"reward": reward}), placer)
    assert [name for name, _ in placer.placed] == ["uwo.b"] and placer.placed[0][1].num_gpus == 0
    results = pipeline.root.score(SAMPLES)
    for sample, result in zip(SAMPLES, results):
        text = sample.prompt + sample.response
        expected = {name: _logit(rm_dirs[seed], text) for name, seed in (("a", 1), ("b", 2), ("c", 3))}
        assert {k: result.components[k] for k in expected} == pytest.approx(expected, abs=1e-4)
        assert result.reward == pytest.approx(sum(expected.values()) / 3, abs=1e-4)


def test_from_spec_with_a_plain_build_function_loads_members_here(rm_dirs):
    """`from_spec` takes any `build` callable; one without a placer (not the pipeline's builder) places nothing."""
    from reward_plugins.ensemble import EnsemblePlugin

    spec = parse_pipeline_config({"reward": {"type": "ensemble", "name": "e", "members": [
        {"name": "a", "path": str(rm_dirs[1])}, {"name": "b", "path": str(rm_dirs[2])}]}}).reward
    plugin = EnsemblePlugin.from_spec(spec, lambda child: None)
    (result,) = plugin.score(SAMPLES[:1])
    assert result.components["a"] == pytest.approx(_logit(rm_dirs[1], "Q apple"), abs=1e-4)


def test_a_placement_without_a_placer_loads_the_member_here_and_says_so(rm_dirs, caplog):
    reward = {"type": "ensemble", "name": "uwo", "members": [
        {"name": "a", "path": str(rm_dirs[1])}, {"name": "b", "path": str(rm_dirs[2]), "placement": {"num_gpus": 0}}]}
    with caplog.at_level(logging.WARNING, logger="reward_plugins.placement"):
        pipeline = build_pipeline(parse_pipeline_config({"reward": reward}))
    assert [r.getMessage().split(" ")[0] for r in caplog.records] == ["uwo.b"]
    (result,) = pipeline.root.score(SAMPLES[:1])
    assert result.components["b"] == pytest.approx(_logit(rm_dirs[2], "Q apple"), abs=1e-4)


def test_reference_samples_keep_their_labels_and_bad_rows_name_their_line(tmp_path):
    good = tmp_path / "ref.jsonl"
    good.write_text('{"prompt": "p", "response": "r", "label": {"topic": "cats"}}\n{"prompt": "q", "response": "s"}\n')
    samples = read_reference_samples(str(good))
    assert [(s.prompt, s.response, s.label) for s in samples] == [("p", "r", {"topic": "cats"}), ("q", "s", None)]
    for line in ('{"prompt": 5, "response": "r"}', '{"prompt": "p", "response": 5}', '["p", "r"]'):
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "p", "response": "r"}\n' + line + "\n")
        with pytest.raises(DataError, match=r"bad.jsonl:2: expected an object with string prompt and response"):
            read_reference_samples(str(bad))
