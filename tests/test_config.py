import importlib.metadata
import textwrap
from pathlib import Path

import pytest

from reward_plugins import ConfigError, RewardPipeline, Sample, load_pipeline_config, registry
from reward_plugins.pipeline import build_pipeline

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "rewards"
SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "reward.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(path) -> str:
    with pytest.raises(ConfigError) as info:
        load_pipeline_config(path)
    return str(info.value)


def test_shipped_configs_cover_every_builtin_plugin():
    assert len(SHIPPED) >= 5
    used = set()
    for path in SHIPPED:
        spec = load_pipeline_config(path, check_paths=False).reward
        stack = [spec]
        while stack:
            node = stack.pop()
            used.add(node.type)
            stack.extend(node.children.values())
    builtin = {n for n in registry.available_plugins() if registry.plugin_class(n).__module__.startswith("reward_plugins.")}
    assert len(builtin) >= 7 and used >= builtin


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_build_and_score(path, models_env):
    pipeline = RewardPipeline.from_yaml(path)
    sample = Sample(prompt="Tell a story", response="It was fine. In summary: the hero leaves<eos>",
                    label={"context": "A story.", "gold": "She smiled.", "baseline_ppl": 100.0})
    out = pipeline.score([sample, sample])
    assert len(out.rewards) == 2
    assert list(out.logs) == list(pipeline.log_keys)


def test_uwo5_config_expands_seed_template(models_env):
    spec = load_pipeline_config(CONFIG_DIR / "ensemble_uwo5.yaml").reward
    assert spec.config.member_names == [f"seed{s}" for s in range(1, 6)]
    assert spec.config.members[2].path == str(models_env / "rm_seed3")
    assert (spec.config.objective, spec.config.uwo_weight, spec.config.ddof) == ("uwo", 0.1, 0)


def test_unknown_plugin_names_file_and_line(tmp_path):
    path = write(tmp_path, """\
        on_error: raise
        reward:
          type: weighted_sum
          terms:
            - weight: 1.0
              plugin:
                type: reward_modle
        """)
    message = problems(path)
    assert f"{path}:7: reward.terms.0.plugin.type: unknown plugin type 'reward_modle'" in message
    assert "reward_model" in message  # the known types are listed


def test_unknown_key_wrong_type_missing_path(tmp_path):
    path = write(tmp_path, """\
        reward:
          type: reward_model
          path: /nonexistent/rm
          batch_size: lots
          temprature: 1.0
        """)
    message = problems(path)
    assert f"{path}:3: reward.path: path does not exist: /nonexistent/rm" in message
    assert f"{path}:4: reward.batch_size: Input should be a valid integer" in message
    assert f"{path}:5: reward.temprature: unknown key" in message


def test_unset_env_var_and_default(tmp_path, monkeypatch, models_env):
    monkeypatch.delenv("NO_SUCH_DIR", raising=False)
    path = write(tmp_path, "reward:\n  type: reward_model\n  path: ${NO_SUCH_DIR}/rm\n")
    assert "environment variable NO_SUCH_DIR is not set" in problems(path)
    path = write(tmp_path, f"reward:\n  type: reward_model\n  path: ${{NO_SUCH_DIR:-{models_env}}}/rm_seed1\n")
    assert load_pipeline_config(path).reward.config.path == str(models_env / "rm_seed1")


def test_pipeline_level_errors(tmp_path):
    path = write(tmp_path, "on_error: penalty\nreward:\n  type: format_check\n  pattern: x\n")
    assert "on_error: penalty needs error_penalty" in problems(path)
    path = write(tmp_path, "on_error: ignore\nreward:\n  type: format_check\n  pattern: x\n")
    assert f"{path}:1: on_error:" in problems(path)
    path = write(tmp_path, "reward:\n  type: format_check\n  pattern: '(('\n")
    assert "invalid regular expression" in problems(path)
    path = write(tmp_path, "reward: [1, 2\n")
    assert "not valid YAML" in problems(path)


def test_ensemble_validation(tmp_path, models_env):
    path = write(tmp_path, f"""\
        reward:
          type: ensemble
          objective: uwo
          uwo_weight: -1
          path_template: {models_env}/rm_seed{{seed}}
          seeds: [1, 9]
        """)
    message = problems(path)
    assert "reward.uwo_weight: Input should be greater than or equal to 0" in message
    assert "reward.members.1.path: path does not exist" in message and "rm_seed9" in message
    path = write(tmp_path, "reward:\n  type: ensemble\n  objective: median\n  path_template: x{seed}\n  seeds: [1]\n")
    assert "reward.objective" in problems(path)


def test_every_error_is_reported_at_once(tmp_path):
    path = write(tmp_path, """\
        reward:
          type: weighted_sum
          terms:
            - weight: 1.0
              plugin: {type: length_penalty, coef: -1}
            - weight: x
              plugin: {type: format_check, pattern: a}
        """)
    message = problems(path)
    assert "reward.terms.0.plugin.coef" in message and "reward.terms.1.weight" in message


class EchoLengthPlugin(registry.RewardPlugin):
    """A third-party plugin: reward = number of characters."""

    class Config(registry.PluginConfig):
        scale: float = 1.0

    @property
    def component_keys(self):
        return ()

    def score(self, samples):
        from reward_plugins import RewardResult

        return [RewardResult.ok(self.config.scale * len(s.response)) for s in samples]


def test_entry_point_plugins_register(monkeypatch, tmp_path):
    entry_point = importlib.metadata.EntryPoint(
        name="echo_length", value=f"{__name__}:EchoLengthPlugin", group=registry.ENTRY_POINT_GROUP
    )
    real = importlib.metadata.entry_points

    def fake(**kwargs):
        return [entry_point] if kwargs.get("group") == registry.ENTRY_POINT_GROUP else real(**kwargs)

    import sys

    monkeypatch.setitem(sys.modules, __name__, sys.modules[EchoLengthPlugin.__module__])
    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    path = write(tmp_path, "reward:\n  type: echo_length\n  scale: 2.0\n")
    pipeline = build_pipeline(load_pipeline_config(path))
    assert pipeline.score([Sample(prompt="", response="abc")]).rewards == [6.0]
