"""Ray `worker_process_setup_hook`: swap OpenRLHF's `RemoteExperienceMaker` and HTTP reward client for ours.

The trainer and the rollout engines are Ray actors, so a swap done in the driver never reaches them. `install`
runs in every worker process of the job (vLLM and model actors included), so it must be cheap: it imports
nothing from openrlhf, it only arranges for `openrlhf.trainer.ppo_trainer` (experience maker) and
`openrlhf.utils.agent` (`SingleTurnAgentExecutor._fetch_rewards_via_http`, see `reward_client`) to be
patched the moment they are imported (or at once if they already are). Repeated calls are harmless.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from types import ModuleType

TARGET_MODULE = "openrlhf.trainer.ppo_trainer"
AGENT_MODULE = "openrlhf.utils.agent"
_MARK = "_reward_plugins_patched"


def install() -> None:
    """Patch the target modules now if loaded, else as soon as each is imported."""
    pending = False
    for name, patch in _patches().items():
        module = sys.modules.get(name)
        if module is not None:
            patch(module)
        else:
            pending = True
    if pending and not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def installed_in_this_process() -> bool:
    """True when `install` ran here (the patch is pending or applied)."""
    module = sys.modules.get(TARGET_MODULE)
    return bool(module is not None and getattr(module, _MARK, False)) or any(
        isinstance(finder, _PatchOnImport) for finder in sys.meta_path
    )


def patch_agent_module(module: ModuleType) -> None:
    """Replace `SingleTurnAgentExecutor._fetch_rewards_via_http` with `reward_client.fetch_rewards_via_http`."""
    executor = module.SingleTurnAgentExecutor
    if getattr(executor, _MARK, False):
        return
    from openrlhf_ext.reward_client import fetch_rewards_via_http

    executor._fetch_rewards_via_http = fetch_rewards_via_http
    setattr(executor, _MARK, True)


def _patches():
    return {TARGET_MODULE: patch_trainer_module, AGENT_MODULE: patch_agent_module}


def patch_trainer_module(module: ModuleType) -> None:
    """Point the module's `RemoteExperienceMaker` at ours, let it see the trainer's global step and score held-out eval."""
    if getattr(module, _MARK, False):
        return
    from openrlhf_ext.experience_maker import PluginExperienceMaker, evaluate_before_training, plugin_evaluate

    module.RemoteExperienceMaker = PluginExperienceMaker
    trainer = module.BasePPOTrainer
    trainer.train_step = _with_global_step(trainer.train_step)
    if hasattr(module, "PPOTrainer"):
        ppo = trainer_class(module.PPOTrainer)
        ppo.evaluate = plugin_evaluate(ppo.evaluate)
        if hasattr(ppo, "fit"):
            ppo.fit = evaluate_before_training(ppo.fit)
    setattr(module, _MARK, True)


def trainer_class(cls):
    """The plain class behind a `@ray.remote` trainer (patching the Ray wrapper would not reach the actor)."""
    metadata = getattr(cls, "__ray_metadata__", None)
    return metadata.modified_class.__ray_actor_class__ if metadata is not None else cls


def _with_global_step(train_step):
    """Wrap `BasePPOTrainer.train_step(rollout_samples, global_step)` to hand the step to our experience maker."""

    @functools.wraps(train_step)
    def wrapped(self, rollout_samples, global_step, *args, **kwargs):
        maker = getattr(self, "experience_maker", None)
        if hasattr(maker, "global_step"):
            maker.global_step = global_step
        return train_step(self, rollout_samples, global_step, *args, **kwargs)

    return wrapped


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds a target module through the other finders and patches it right after it executes."""

    def find_spec(self, fullname, path=None, target=None):
        patch = _patches().get(fullname)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            execute(module)
            patch(module)

        loader.exec_module = exec_module
        return spec
