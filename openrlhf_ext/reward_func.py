"""Shim for `--reward.remote_url openrlhf_ext/reward_func.py`; OpenRLHF loads this file outside sys.modules.

All logic lives in the installed package (`openrlhf_ext.shim`); configure it with $REWARD_PLUGINS_CONFIG.
"""

from openrlhf_ext.shim import reward_func

__all__ = ["reward_func"]
