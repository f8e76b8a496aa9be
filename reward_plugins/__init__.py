"""Pluggable rewards for RLHF: batch-first plugins, a YAML-configured pipeline, honest failures."""

from .config import ConfigError, load_pipeline_config, parse_pipeline_config
from .pipeline import RewardError, RewardPipeline, ScoredBatch, build_pipeline
from .registry import PluginConfig, RewardPlugin, available_plugins, register_plugin
from .types import RewardResult, Sample, Status

__all__ = [
    "ConfigError",
    "PluginConfig",
    "RewardError",
    "RewardPipeline",
    "RewardPlugin",
    "RewardResult",
    "Sample",
    "ScoredBatch",
    "Status",
    "available_plugins",
    "build_pipeline",
    "load_pipeline_config",
    "parse_pipeline_config",
    "register_plugin",
]
