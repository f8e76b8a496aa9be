"""The OpenRLHF launcher's --monitor-config: validated before Ray starts and handed to the workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("openrlhf")

from openrlhf_ext import launch  # noqa: E402
from openrlhf_ext.settings import ENV_MONITOR, HookSettings  # noqa: E402
from reward_plugins.config import ConfigError  # noqa: E402

ROOT = Path(__file__).parents[1]
PLACED = str(ROOT / "configs" / "rewards" / "ensemble_uwo5_placed.yaml")
BASE = ["--actor.model_name_or_path", "policy", "--rollout.n_samples_per_prompt", "4",
        "--algo.advantage.estimator", "group_norm", "--reward.remote_url", launch.DEFERRED_REWARD]


def test_dry_run_carries_the_monitor_config(capsys):
    monitor = str(ROOT / "configs" / "monitor" / "openrlhf_monitor.yaml")
    assert launch.main(["--dry-run", "--reward-config", PLACED, "--monitor-config", monitor, *BASE]) == 0
    out, err = capsys.readouterr()
    assert f"'{ENV_MONITOR}': '{monitor}'" in out and "note: monitor:" in err
    settings = HookSettings.from_env({ENV_MONITOR: monitor}, eval_steps=5, output_dir="/out")
    assert settings.monitor_config == monitor


def test_bad_monitor_configs_are_refused_before_ray(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"thresholds": {"divergence": None}, "actoin": "stop"}))
    with pytest.raises(ConfigError) as caught:
        launch.main(["--dry-run", "--reward-config", PLACED, "--monitor-config", str(bad), *BASE])
    assert "bad.yaml:" in str(caught.value) and "actoin: unknown key" in str(caught.value)
    unplaced = tmp_path / "unplaced.yaml"
    unplaced.write_text(yaml.safe_dump({"shadow": str(ROOT / "configs" / "rewards" / "ensemble_uwo5.yaml")}))
    with pytest.raises(launch.LaunchError, match="holds no GPU"):
        launch.main(["--dry-run", "--reward-config", PLACED, "--monitor-config", str(unplaced), *BASE])
