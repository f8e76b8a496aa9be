"""Ray `worker_process_setup_hook`: swap OpenRLHF's `RemoteExperienceMaker` for ours in every worker.

The trainer is a Ray actor, so a swap done in the driver never reaches it. `install` runs in every worker
process of the job (vLLM and model actors included), so it must be cheap: it imports nothing from
openrlhf, it only arranges for `openrlhf.trainer.ppo_trainer` to be patched the moment it is imported
(or at once if it already is). Repeated calls are harmless.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import sys
from types import ModuleType

TARGET_MODULE = "openrlhf.trainer.ppo_trainer"
_MARK = "_reward_plugins_patched"


def install() -> None:
    """Patch the trainer module now if loaded, else as soon as it is imported."""
    module = sys.modules.get(TARGET_MODULE)
    if module is not None:
        patch_trainer_module(module)
        return
    if not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


def installed_in_this_process() -> bool:
    """True when `install` ran here (the patch is pending or applied)."""
    module = sys.modules.get(TARGET_MODULE)
    return bool(module is not None and getattr(module, _MARK, False)) or any(
        isinstance(finder, _PatchOnImport) for finder in sys.meta_path
    )


def patch_trainer_module(module: ModuleType) -> None:
    """Point the module's `RemoteExperienceMaker` at ours, let it see the trainer's global step and score held-out eval."""
    if getattr(module, _MARK, False):
        return
    from openrlhf_ext.experience_maker import PluginExperienceMaker, plugin_evaluate

    module.RemoteExperienceMaker = PluginExperienceMaker
    trainer = module.BasePPOTrainer
    trainer.train_step = _with_global_step(trainer.train_step)
    if hasattr(module, "PPOTrainer"):
        ppo = trainer_class(module.PPOTrainer)
        ppo.evaluate = plugin_evaluate(ppo.evaluate)
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
    """Finds the trainer module through the other finders and patches it right after it executes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET_MODULE:
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
            patch_trainer_module(module)

        loader.exec_module = exec_module
        return spec
