"""Models by hub id (`org/name`, `org/name@revision`) through one reference type and resolver, read from a local
folder laid out as the Hugging Face hub cache (nothing is downloaded): resolution, the one-line offline error
within 5 s, and the resolved commit in run settings and VR-CLI fingerprints."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import huggingface_hub
import pytest
import yaml

from reward_plugins import ConfigError, RewardPipeline, Sample, load_pipeline_config
from reward_plugins import model_ref
from reward_plugins.cli import UsageError, check_model_dir
from reward_plugins.model_ref import ModelNotFound, describe, looks_like_hub_id, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, source: Path, commit: str = COMMIT) -> Path:
    """`source`'s files as the hub cache holds repo `repo` at `commit` (refs/main points at it)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch, rm_dirs, lm_dir):
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache_repo(cache, "tiny-org/rm", rm_dirs[1])
    cache_repo(cache, "tiny-org/lm", lm_dir)
    return cache


@pytest.mark.parametrize("text, hub", [
    ("org/name", True), ("org/name@main", True), ("name@v1.0", True), ("org/na.me-2@refs/pr/1", True),
    ("./org/name", False), ("/abs/path", False), ("~/models/x", False), ("a/b/c", False), ("plain", False),
])
def test_what_counts_as_a_hub_id(text, hub):
    assert looks_like_hub_id(text) is hub


def test_a_local_folder_whose_parent_exists_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert not looks_like_hub_id("models/rm_seed1") and looks_like_hub_id("elsewhere/rm_seed1")
    with pytest.raises(ModelNotFound, match=r"^reward.path: path does not exist: models/rm_seed1$"):
        resolve_model("models/rm_seed1", "reward.path")


def test_hub_ids_resolve_to_the_cached_snapshot(hub_cache):
    snapshot = hub_cache / "models--tiny-org--rm" / "snapshots" / COMMIT
    for text in ("tiny-org/rm", "tiny-org/rm@main", f"tiny-org/rm@{COMMIT}"):
        resolved = resolve_model(text, "reward.path")
        assert Path(resolved.path) == snapshot and resolved.revision == COMMIT and resolved.repo == "tiny-org/rm"
        assert describe(resolved.path) == f"tiny-org/rm@{COMMIT}"
    local = resolve_model(str(snapshot.parent.parent.parent), "k")
    assert local.revision is None and describe(local.path) == local.path and describe(None) is None


def test_offline_without_the_repo_is_one_line_within_5_s(hub_cache):
    began = time.perf_counter()
    with pytest.raises(ModelNotFound) as info:
        resolve_model("tiny-org/missing", "policy")
    assert time.perf_counter() - began < 5
    assert str(info.value) == ("policy: tiny-org/missing is not a local folder, nor in the local hub cache, and "
                               "HF_HUB_OFFLINE=1 (nothing is downloaded): download it once online, or give a local folder")
    with pytest.raises(ModelNotFound, match=r"^policy: tiny-org/rm@v9 is not a local folder.*HF_HUB_OFFLINE=1"):
        resolve_model("tiny-org/rm@v9", "policy")


def test_unreachable_hub_uses_the_cache_or_says_why(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    calls = []

    def no_network(self, repo, **kwargs):
        calls.append((repo, kwargs.get("timeout")))
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    assert resolve_model("tiny-org/lm", "policy").revision == COMMIT
    began = time.perf_counter()
    with pytest.raises(ModelNotFound) as info:
        resolve_model("tiny-org/absent", "value_model")
    assert time.perf_counter() - began < 5 and calls[-1] == ("tiny-org/absent", model_ref.HUB_TIMEOUT_S)
    assert str(info.value) == ("value_model: tiny-org/absent could not be reached on the hub ([Errno -2] Name or "
                               "service not known) and is not in the local hub cache (nor a local folder); check the "
                               "network, or set HF_HUB_OFFLINE=1 to use the cache only")


def test_no_such_repo_online(hub_cache, monkeypatch):
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def missing(self, repo, **kwargs):
        raise RepositoryNotFoundError("404", response=httpx.Response(404, request=httpx.Request("GET", "http://x")))

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", missing)
    with pytest.raises(ModelNotFound, match=r"^policy: tiny-org/nope: no such model on the hub"):
        resolve_model("tiny-org/nope", "policy")


def test_a_hub_id_in_a_reward_config_loads_and_scores_like_the_folder(hub_cache, rm_dirs, tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text("reward:\n  type: reward_model\n  path: tiny-org/rm\n")
    spec = load_pipeline_config(path).reward
    assert describe(spec.config.path) == f"tiny-org/rm@{COMMIT}"
    sample = [Sample(prompt="Tell me ", response="a story")]
    by_id = RewardPipeline.from_yaml(path).score(sample).rewards
    path.write_text(f"reward:\n  type: reward_model\n  path: {rm_dirs[1]}\n")
    assert by_id == RewardPipeline.from_yaml(path).score(sample).rewards


def test_a_missing_hub_id_in_a_reward_config_names_file_line_key_and_offline(hub_cache, tmp_path):
    path = tmp_path / "reward.yaml"
    path.write_text(yaml.safe_dump({"reward": {"type": "ensemble", "members": [
        {"name": "a", "path": "tiny-org/rm"}, {"name": "b", "path": "tiny-org/gone@v2"}]}}, sort_keys=False))
    began = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(path)
    assert time.perf_counter() - began < 5
    assert info.value.problems == [f"{path}:7: reward.members.1.path: tiny-org/gone@v2 is not a local folder, nor "
                                   "in the local hub cache, and HF_HUB_OFFLINE=1 (nothing is downloaded): download it "
                                   "once online, or give a local folder"]


def test_command_line_model_flags_resolve_hub_ids(hub_cache):
    folder = check_model_dir("tiny-org/lm", "--policy", causal_lm=True)
    assert Path(folder).name == COMMIT
    with pytest.raises(UsageError, match=r"^--gold-rm: tiny-org/gone is not a local folder.*HF_HUB_OFFLINE=1"):
        check_model_dir("tiny-org/gone", "--gold-rm")
    with pytest.raises(UsageError, match=r"--policy: tiny-org/rm@main is a .*not a causal language model"):
        check_model_dir("tiny-org/rm@main", "--policy", causal_lm=True)


def test_vrcli_fingerprint_records_the_scorer_commit(hub_cache, lm_dir, tmp_path):
    from reward_plugins.vrcli import VRCLIPlugin

    def fingerprint(model):
        path = tmp_path / "vrcli.yaml"
        path.write_text(f"reward:\n  type: vrcli\n  scorer:\n    model: {model}\n")
        spec = load_pipeline_config(path).reward
        return VRCLIPlugin(spec.config, "vrcli", scorer=None).fingerprint()

    by_id = fingerprint("tiny-org/lm")
    assert by_id["revision"] == COMMIT and by_id["model"] == "lm"
    assert "revision" not in fingerprint(lm_dir)  # a local folder has no hub commit; old baselines still match


def test_train_config_policy_by_hub_id_is_recorded_with_its_commit(hub_cache, tmp_path):
    from trl_ext.run_config import TrainConfig
    from trl_ext.run_dir import SETTINGS_FILE, open_run_dir, ppo_settings

    reward = tmp_path / "r.yaml"
    reward.write_text("reward:\n  type: format_check\n  pattern: a\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "x", "label": {}}\n')
    cfg = TrainConfig.model_validate({"algorithm": "ppo", "policy": "tiny-org/lm", "reward_config": str(reward),
                                      "train_data": str(prompts), "output_dir": str(tmp_path / "out"),
                                      "ppo": {"value_init": "reward_model", "value_model": "tiny-org/rm@main"}})
    assert Path(cfg.policy).name == COMMIT
    settings = ppo_settings(cfg)
    assert settings["policy"] == f"tiny-org/lm@{COMMIT}" and settings["value_model"] == f"tiny-org/rm@{COMMIT}"
    open_run_dir(cfg.output_dir, settings)
    assert f"tiny-org/lm@{COMMIT}" in (tmp_path / "out" / SETTINGS_FILE).read_text()
