"""`--reward.remote_url openrlhf_ext/deferred_reward.py`: a rollout-side placeholder when the trainer scores.

With the launcher's `--reward-config`, the experience maker replaces every reward in the trainer; OpenRLHF
still needs a `remote_url` so that it builds no reward-model actor group. Without that setting (the
launcher was bypassed) it raises, so the run fails instead of training on zeros.
"""

import os


def reward_func(queries, prompts, labels, **kwargs):
    if not os.environ.get("REWARD_PLUGINS_TRAINER_CONFIG"):
        raise RuntimeError("deferred_reward.py needs the launcher's --reward-config (REWARD_PLUGINS_TRAINER_CONFIG is unset)")
    return {"rewards": 0.0, "scores": 0.0, "extra_logs": {}}
