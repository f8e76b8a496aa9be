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
    for name, wrap in (("save_logs_and_checkpoints", monitor_checkpoints), ("init_checkpoint_states", monitor_resume)):
        if hasattr(trainer, name):
            setattr(trainer, name, wrap(getattr(trainer, name)))
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


MONITOR_STATE_KEY = "reward_plugins_monitor"


def monitor_checkpoints(save):
    """Wrap `BasePPOTrainer.save_logs_and_checkpoints(global_step, logs_dict, client_states)`: every checkpoint carries
    the monitor's state in its client states; the monitor's `checkpoint` / `stop` save one at the alarm (OpenRLHF's
    own tag, `global_step{N}`), and `stop` keeps the best-scored one and ends the run (the prompt loader reports
    exhaustion, so `fit` closes its loggers and returns)."""

    @functools.wraps(save)
    def wrapped(self, global_step, logs_dict=None, client_states=None):
        maker = getattr(self, "experience_maker", None)
        session = getattr(maker, "monitor", None)
        if session is None:
            return save(self, global_step, logs_dict, client_states)
        client_states = dict(client_states or {})
        regular = global_step % self.args.ckpt.save_steps == 0
        if regular:
            client_states[MONITOR_STATE_KEY] = session.checkpoint_state(global_step)
        result = save(self, global_step, logs_dict, client_states)
        request, maker.monitor_request = maker.monitor_request, None
        if request is None:
            return result
        if not regular:
            client_states[MONITOR_STATE_KEY] = session.checkpoint_state(global_step)
            save_checkpoint_now(self, f"global_step{global_step}", client_states)
        if request.action == "stop":
            keep_best_checkpoint(self, session, request)
            self.samples_generator.generate_samples = lambda **kwargs: ([], 0.0, 0, True)
        return result

    return wrapped


def save_checkpoint_now(trainer, tag: str, client_states: dict) -> None:
    """A DeepSpeed checkpoint of actor (and critic) now, through their actor groups, as OpenRLHF's own saves do."""
    import ray

    refs = trainer.actor_model_group.async_run_method(method_name="save_checkpoint", tag=tag, client_states=client_states)
    if trainer.critic_model_group is not None:
        refs.extend(trainer.critic_model_group.async_run_method(method_name="save_checkpoint", tag=tag))
    ray.get(refs)


def keep_best_checkpoint(trainer, session, alarm) -> None:
    """Keep the best-scored checkpoint: later tags move under `monitor/after_stop/`, DeepSpeed's `latest` names it."""
    from pathlib import Path

    root = Path(trainer.args.ckpt.path)
    kept = session.keep_best(lambda step: root / "_actor" / f"global_step{step}", alarm,
                             lambda step: [root / "_critic" / f"global_step{step}"])
    if kept is not None and session.main:
        for folder in (root / "_actor", root / "_critic"):
            if folder.is_dir():
                (folder / "latest").write_text(kept.name)


def monitor_resume(init_checkpoint_states):
    """Wrap `BasePPOTrainer.init_checkpoint_states()`: a resumed run's monitor continues from the checkpoint's state,
    with every earlier `adapt_kl` applied again to the KL controller."""

    @functools.wraps(init_checkpoint_states)
    def wrapped(self):
        states = init_checkpoint_states(self)
        maker = getattr(self, "experience_maker", None)
        session = getattr(maker, "monitor", None)
        step = int(states.get("global_step", 0) or 0)
        if session is not None and step > 0:
            if MONITOR_STATE_KEY not in states:
                from reward_plugins.monitor import MonitorError

                raise MonitorError(f"the checkpoint of step {step} was saved without the monitor; start a fresh run "
                                   "to monitor it")
            session.restore_state(states[MONITOR_STATE_KEY], step)
            maker.kl_ctl.value *= session.monitor.kl_scale
        return states

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
