import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from reward_plugins import Sample, Status
from reward_plugins.reward_model import RewardModelConfig, RewardModelPlugin, RewardModelScorer
from reward_plugins.tiny_models import build_reward_model

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "In summary: the hero leaves the village and finds the lost map. " * 3,
    "Answer politely.",
]


def scorer(path, **overrides) -> RewardModelScorer:
    return RewardModelScorer(RewardModelConfig.model_validate({"path": str(path), **overrides}))


@pytest.fixture(scope="module")
def both_formats(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("formats")
    return (
        build_reward_model(root / "hf", tokenizer_dir, seed=7, format="hf"),
        build_reward_model(root / "orlhf", tokenizer_dir, seed=7, format="openrlhf"),
    )


def test_formats_detected_and_agree(both_formats):
    hf, orlhf = scorer(both_formats[0]), scorer(both_formats[1])
    assert (hf.format, orlhf.format) == ("hf", "openrlhf")
    hf_scores, _ = hf.score_texts(TEXTS)
    np.testing.assert_allclose(orlhf.score_texts(TEXTS)[0], hf_scores, rtol=1e-5, atol=1e-5)
    assert np.ptp(hf_scores) > 0.1, "random RM should not give constant scores"


def test_batched_equals_one_at_a_time(both_formats):
    for path in both_formats:
        rm = scorer(path, batch_size=3)
        batched, _ = rm.score_texts(TEXTS)
        single = [rm.score_texts([text])[0][0] for text in TEXTS]
        np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)


def test_checkpoint_written_by_openrlhf_itself(tmp_path, rm_dirs):
    """OpenRLHF's own RewardModel class saves a checkpoint; our loader reads it and agrees with its forward."""
    pytest.importorskip("openrlhf")
    from openrlhf.models.model import _get_reward_model
    from transformers import AutoConfig, LlamaModel, LlamaPreTrainedModel

    hf_dir = rm_dirs[1]
    config = AutoConfig.from_pretrained(hf_dir)
    config.normalize_reward = True
    config.mean, config.std = 0.5, 2.0
    model_class = _get_reward_model(LlamaPreTrainedModel, LlamaModel, "value_head")
    openrlhf_model = model_class(config)
    hf_state = load_file(hf_dir / "model.safetensors")
    state = {("value_head.weight" if k == "score.weight" else k): v for k, v in hf_state.items()}
    missing, unexpected = openrlhf_model.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if k not in ("mean", "std")]
    out_dir = tmp_path / "openrlhf_rm"
    openrlhf_model.save_pretrained(out_dir)
    (out_dir / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (hf_dir / name).exists():
            (out_dir / name).write_text((hf_dir / name).read_text())

    ours = scorer(out_dir, value_head_prefix="value_head", normalize=True)
    assert ours.format == "openrlhf"
    ids, _ = ours.encode(TEXTS)
    ours_scores = ours.score_ids(ids)

    openrlhf_model.eval()
    from reward_plugins.batching import right_pad

    input_ids, mask = right_pad(ids, ours.tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = openrlhf_model(input_ids, attention_mask=mask).float().numpy()
    np.testing.assert_allclose(ours_scores, theirs, rtol=1e-5, atol=1e-5)
    hf_scores = scorer(hf_dir).score_ids(ids)
    np.testing.assert_allclose(ours_scores, (hf_scores - 0.5) / 2.0, rtol=1e-5, atol=1e-5)


def test_normalize_without_stats_is_an_error(both_formats):
    with pytest.raises(ValueError, match="normalize is on"):
        scorer(both_formats[1], normalize=True)
    rm = scorer(both_formats[1], normalize=True, mean=1.0, std=4.0)
    raw = scorer(both_formats[1]).score_texts(TEXTS)[0]
    np.testing.assert_allclose(rm.score_texts(TEXTS)[0], (raw - 1.0) / 4.0, rtol=1e-5, atol=1e-5)


def test_truncation_is_reported_and_keeps_the_end(both_formats):
    rm = scorer(both_formats[0], max_length=8)
    ids, truncated = rm.encode(TEXTS)
    assert truncated.tolist() == [True, False, True, False]
    assert all(len(seq) <= 8 for seq in ids)
    full = rm.tokenizer(TEXTS[0])["input_ids"]
    assert ids[0] == full[-8:]


def test_plugin_statuses(both_formats):
    plugin = RewardModelPlugin(RewardModelConfig.model_validate({"path": str(both_formats[0])}), "rm")
    samples = [
        Sample(prompt="Q: ", response="fine answer"),
        Sample(prompt="Q: ", response="   "),
        Sample(prompt="Q: ", response="x", label={"a": 1}),
    ]
    results = plugin.score(samples)
    assert [r.status for r in results] == [Status.OK, Status.ERROR, Status.OK]
    assert "empty response" in results[1].error
    assert set(results[0].components) == set(plugin.component_keys)


def test_label_template_and_missing_field(both_formats):
    config = {"path": str(both_formats[0]), "template": "<|user|>{label[instruction]}<|assistant|>{response}"}
    plugin = RewardModelPlugin(RewardModelConfig.model_validate(config), "rm")
    good = Sample(prompt="ignored", response="apple", label={"instruction": "list fruit"})
    bad = Sample(prompt="ignored", response="apple", label={"other": 1})
    results = plugin.score([good, bad])
    assert results[0].is_ok
    assert results[1].status is Status.ERROR and "instruction" in results[1].error
    expected = plugin.scorer.score_texts(["<|user|>list fruit<|assistant|>apple"])[0][0]
    assert results[0].reward == pytest.approx(expected, rel=1e-5)


def test_nan_from_model_is_an_error(tmp_path, tokenizer_dir):
    path = build_reward_model(tmp_path / "nan_rm", tokenizer_dir, seed=1)
    weights = load_file(path / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    plugin = RewardModelPlugin(RewardModelConfig.model_validate({"path": str(path)}), "rm")
    result = plugin.score([Sample(prompt="a", response="b")])[0]
    assert result.status is Status.ERROR and "nan" in result.error


def test_pickle_only_checkpoint_is_refused(tmp_path, both_formats):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(json.loads((both_formats[0] / "config.json").read_text())))
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors"):
        scorer(folder, format="hf", tokenizer=str(both_formats[0]))
