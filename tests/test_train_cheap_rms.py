"""Training multi-head RMs and LoRA ensembles on real tiny models: per-member seeds, frozen or trained backbone,
bootstrap weights, the held-out record checked against scores computed here, and the folders load in the plugins."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from reward_plugins import RewardPipeline, Sample
from reward_plugins.config import ConfigError
from reward_plugins.io import DataError, write_jsonl
from reward_plugins.lora_ensemble import read_lora_index
from reward_plugins.multihead import HEADS_FILE, read_heads
from setup_data import synthetic_task as st
from trl_ext import rm_members, train_rm
from trl_ext.config import load_config

TRL = "trl={num_train_epochs: 2, per_device_train_batch_size: 8, learning_rate: 0.005, gradient_checkpointing: false}"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs")
    rng = random.Random(0)
    write_jsonl(path / "prefs.jsonl", st.preference_rows(st.sample_tasks(48, rng), rng, label_noise=0.0))
    write_jsonl(path / "test.jsonl", st.preference_rows(st.sample_tasks(16, rng), rng, label_noise=0.0))
    return path


def _config(data, lm_dir, root, *overrides):
    return load_config(train_rm.RMRunConfig, None, [
        f"base={lm_dir}", f"train_data={data / 'prefs.jsonl'}", f"test_data={data / 'test.jsonl'}",
        f"output_root={root}", "max_length=64", TRL, *overrides])


def _held_out_by_hand(folder, data, plugin: dict) -> tuple[np.ndarray, np.ndarray]:
    """(k, N) member scores of the held-out chosen and rejected answers, through a reward pipeline built here."""
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    pipe = RewardPipeline.from_yaml(_reward_yaml(folder, plugin))
    names = pipe.root.config.member_names
    sides = []
    for side in ("chosen", "rejected"):
        results = pipe.score([Sample(r["prompt"], r[side]) for r in rows]).results
        sides.append(np.array([[res.components[n] for res in results] for n in names]))
    return sides[0], sides[1]


def _reward_yaml(folder, plugin: dict):
    path = folder.parent / f"{folder.name}.yaml"
    path.write_text(yaml.safe_dump({"reward": {"path": str(folder), "max_length": 64, "objective": "mean", **plugin}}))
    return path


def test_multihead_heads_have_their_own_seeds_and_the_record_matches_the_scores(data, lm_dir, tmp_path):
    report = train_rm.train_rm(_config(data, lm_dir, tmp_path, "name=mh", "seed=2", "heads=3"))
    folder = tmp_path / "mh_seed2"
    assert report["path"] == str(folder) and report["kind"] == "multihead" and report["member_seeds"] == [2001, 2002, 2003]
    assert report["train_seconds"] > 0
    weight, info = read_heads(folder)
    assert info.seeds == [2001, 2002, 2003] and info.training["backbone"] == "train"
    assert not torch.allclose(weight[0], weight[1]) and not torch.allclose(weight[1], weight[2])
    chosen, rejected = _held_out_by_hand(folder, data, {"type": "multihead_ensemble", "heads": 3})
    accuracy = ((chosen > rejected) + 0.5 * (chosen == rejected)).mean(axis=1)
    np.testing.assert_allclose(info.accuracy, accuracy, atol=1e-9)
    np.testing.assert_allclose(info.correlation, np.corrcoef(np.concatenate([chosen, rejected], axis=1)), atol=1e-5)
    mean_acc = ((chosen.mean(0) > rejected.mean(0)) + 0.5 * (chosen.mean(0) == rejected.mean(0))).mean()
    assert report["accuracy"] == pytest.approx(mean_acc) and report["member_accuracy"] == pytest.approx(list(accuracy))
    assert json.loads((folder / train_rm.EVAL_FILE).read_text())["correlation"] == info.correlation
    assert report["accuracy"] > 0.6, "clean synthetic pairs are learnable"
    # The trained backbone moved away from the base it started from.
    base = load_file(lm_dir / "model.safetensors")
    moved = load_file(folder / "model.safetensors")
    assert any(not torch.equal(base[f"model.{k}"], v) for k, v in moved.items() if f"model.{k}" in base)


def test_frozen_backbone_keeps_the_base_and_the_same_seed_gives_the_same_heads(data, lm_dir, tmp_path):
    frozen = _config(data, lm_dir, tmp_path / "a", "name=mh", "heads=2", "backbone=frozen", "head_data=shared")
    train_rm.train_rm(frozen)
    again = frozen.model_copy(update={"output_root": str(tmp_path / "b")})
    train_rm.train_rm(again)
    base = load_file(lm_dir / "model.safetensors")
    kept = load_file(tmp_path / "a" / "mh_seed1" / "model.safetensors")
    assert all(torch.equal(base[f"model.{k}"], v) for k, v in kept.items())
    first, second = (load_file(tmp_path / r / "mh_seed1" / HEADS_FILE)["weight"] for r in ("a", "b"))
    assert torch.equal(first, second)
    assert read_heads(tmp_path / "a" / "mh_seed1")[1].training == {
        "base": str(lm_dir), "seed": 1, "train_data": str(data / "prefs.jsonl"), "backbone": "frozen", "head_data": "shared"}


def test_bootstrap_weights_and_loss_by_hand():
    weights = rm_members.bootstrap_weights(2000, [11, 12])
    column = torch.poisson(torch.ones(2000), generator=torch.Generator().manual_seed(11))
    assert torch.equal(weights[:, 0], column) and not torch.equal(weights[:, 0], weights[:, 1])
    assert abs(weights.mean().item() - 1.0) < 0.05 and (weights == 0).float().mean().item() == pytest.approx(np.exp(-1), abs=0.03)
    scores = torch.tensor([[1.0, 0.0], [0.5, 2.0], [0.0, 1.0], [0.5, -1.0]])  # 2 pairs x 2 heads, chosen rows first
    w = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    softplus = lambda x: float(np.log1p(np.exp(-x)))  # -log sigmoid(x)
    head0 = (2 * softplus(1.0) + 1 * softplus(0.0)) / 2
    head1 = (0 * softplus(-1.0) + 1 * softplus(3.0)) / 2
    assert rm_members.multihead_loss(scores, w).item() == pytest.approx(head0 + head1, rel=1e-6)
    centred = rm_members.multihead_loss(scores, None, center=0.1).item()
    plain = (softplus(1.0) + softplus(0.0)) / 2 + (softplus(-1.0) + softplus(3.0)) / 2
    assert centred == pytest.approx(plain + 0.1 * (1.0 + 1.0), rel=1e-6)  # (chosen + rejected) is 1 for every pair


def test_lora_adapters_have_their_own_seeds_and_load_in_the_plugin(data, lm_dir, tmp_path):
    cfg = _config(data, lm_dir, tmp_path, "name=lora", "lora={adapters: 2, r: 4, top_layers: 1}")
    report = train_rm.train_rm(cfg)
    folder = tmp_path / "lora_seed1"
    adapters, info = read_lora_index(folder)
    assert [a.name for a in adapters] == ["seed1001", "seed1002"] and info.seeds == [1001, 1002]
    assert not list((folder / "adapters").glob(".train_*")), "scratch folders are removed"
    first, second = (load_file(a / "adapter_model.safetensors") for a in adapters)
    lora_keys = [k for k in first if "lora_A" in k]
    assert lora_keys and all(".layers.1." in k for k in lora_keys), "top_layers: 1 adapts the last layer only"
    assert not torch.equal(first[lora_keys[0]], second[lora_keys[0]])
    chosen, rejected = _held_out_by_hand(folder, data, {"type": "lora_ensemble", "adapters": 2})
    np.testing.assert_allclose(info.accuracy, ((chosen > rejected) + 0.5 * (chosen == rejected)).mean(axis=1))
    assert report["member_accuracy"] == info.accuracy and len(report["correlation"]) == 2


def test_settings_that_cannot_apply_are_refused(data, lm_dir, tmp_path):
    with pytest.raises(ConfigError, match="give heads .* or lora .*, not both"):
        _config(data, lm_dir, tmp_path, "heads=2", "lora={adapters: 2}")
    with pytest.raises(ConfigError, match="backbone applies to a multi-head RM; set heads: k"):
        _config(data, lm_dir, tmp_path, "backbone=frozen")
    with pytest.raises(ConfigError, match=r"trl.max_length: not used by multi-head training"):
        _config(data, lm_dir, tmp_path, "heads=2", "trl={max_length: 64}")
    with pytest.raises(ConfigError, match=r"lora.adapters"):
        _config(data, lm_dir, tmp_path, "lora={r: 4}")


def test_multihead_loss_runs_on_the_meta_device():
    """The bootstrap counts start on the CPU; the loss must move them to the scores' device (meta here, CUDA in use)."""
    trainer = rm_members.MultiHeadTrainer.__new__(rm_members.MultiHeadTrainer)
    trainer.weights, trainer.center = rm_members.bootstrap_weights(10, [1, 2, 3]), 0.01
    inputs = {"input_ids": torch.zeros(4, 5, dtype=torch.long, device="meta"),
              "attention_mask": torch.ones(4, 5, dtype=torch.long, device="meta"),
              "pair_index": torch.tensor([3, 7], device="meta")}
    loss = trainer.compute_loss(lambda ids, mask: torch.zeros(ids.shape[0], 3, device=ids.device), inputs)
    assert loss.device.type == "meta" and loss.shape == ()


def test_lora_rerun_keeps_saved_adapters_and_trains_the_missing_one(data, lm_dir, tmp_path):
    cfg = _config(data, lm_dir, tmp_path, "name=lora", "lora={adapters: 2, r: 4, top_layers: 1}")
    train_rm.train_rm(cfg)
    adapters, _ = read_lora_index(tmp_path / "lora_seed1")
    first = adapters[0] / "adapter_model.safetensors"
    stamp, weights = first.stat().st_mtime_ns, load_file(adapters[1] / "adapter_model.safetensors")
    import shutil

    shutil.rmtree(adapters[1])  # as if the run had stopped while training the second adapter
    train_rm.train_rm(cfg)
    assert first.stat().st_mtime_ns == stamp, "the finished adapter is kept, not retrained"
    again = load_file(adapters[1] / "adapter_model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights), "the missing one is retrained from its own seed"


def _labelled(data, path):
    """Every training pair twice: member 0 as labelled, member 1 with chosen and rejected swapped."""
    rows = [json.loads(line) for line in (data / "prefs.jsonl").read_text().splitlines()]
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"], "member": 1} for r in rows]
    write_jsonl(path, [{**r, "member": 0} for r in rows] + swapped)
    return path


@pytest.mark.parametrize("kind", ["heads=2", "lora={adapters: 2, r: 4, top_layers: 1}"])
def test_labelled_rows_train_only_their_own_member(data, lm_dir, tmp_path, kind):
    train = _labelled(data, tmp_path / "labelled.jsonl")
    report = train_rm.train_rm(_config(data, lm_dir, tmp_path, "name=m", kind, "head_data=labelled",
                                       f"train_data={train}", "trl.num_train_epochs=12"))
    right, reversed_ = report["member_accuracy"]  # on the clean held-out pairs
    # trained on its own rows only: member 1 learns the reversed preference (all rows would leave both near 0.5,
    # member 0's rows alone both near member 0's accuracy)
    assert right >= 0.6 and reversed_ <= 0.4, report["member_accuracy"]


def test_labelled_rows_are_checked_against_k(data, lm_dir, tmp_path):
    rows = [json.loads(line) for line in (data / "prefs.jsonl").read_text().splitlines()]
    write_jsonl(tmp_path / "bad.jsonl", [{**rows[0], "member": 0}, {**rows[1], "member": 2}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'member' must be an integer from 0 to 1 .* got 2"):
        train_rm.train_rm(_config(data, lm_dir, tmp_path, "name=m", "heads=2", "head_data=labelled",
                                  f"train_data={tmp_path / 'bad.jsonl'}"))
    write_jsonl(tmp_path / "one.jsonl", [{**rows[0], "member": 0}, {**rows[1], "member": True}])
    with pytest.raises(DataError, match=r"one.jsonl:2: 'member' .* got True"):
        rm_members.labelled_weights([{**rows[0], "member": 0}, {**rows[1], "member": True}], 2, tmp_path / "one.jsonl")
    write_jsonl(tmp_path / "gap.jsonl", [{**rows[0], "member": 0}])
    with pytest.raises(DataError, match=r"gap.jsonl: no rows for member\(s\) \[1\] of 2"):
        rm_members.labelled_weights([{**rows[0], "member": 0}], 2, tmp_path / "gap.jsonl")
    with pytest.raises(ConfigError, match="head_data applies to a multi-head RM"):
        _config(data, lm_dir, tmp_path, "head_data=labelled")


def test_labelled_pairs_are_merged_with_signed_weights_and_the_loss_follows_the_sign(tmp_path):
    a = {"prompt": "p", "chosen": "x", "rejected": "y"}
    rows = [{**a, "member": 0}, {**a, "chosen": "y", "rejected": "x", "member": 1},
            {"prompt": "q", "chosen": "u", "rejected": "v", "member": 1}, {**a, "member": 2}]
    write_jsonl(tmp_path / "m.jsonl", rows)
    merged, weights = rm_members.merge_labelled(rows, 3, tmp_path / "m.jsonl")
    assert [(r["prompt"], r["chosen"]) for r in merged] == [("p", "x"), ("q", "u")]
    assert weights.tolist() == [[1.0, -1.0, 1.0], [0.0, 1.0, 0.0]]
    scores = torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.5, 0.5, 0.5]])  # chosen rows first
    softplus = lambda x: float(np.log1p(np.exp(-x)))  # -log sigmoid(x)
    by_hand = softplus(1.0) / 2 + (softplus(-1.0) + softplus(-0.5)) / 2 + softplus(1.0) / 2  # per head: mean over pairs
    assert rm_members.multihead_loss(scores, weights).item() == pytest.approx(by_hand, rel=1e-6)
