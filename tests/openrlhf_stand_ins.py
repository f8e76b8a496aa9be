"""The CPU stand-ins for `flash_attn` and `vllm` (they live in `openrlhf_ext.cpu_stand_ins`, which `launch --dry-run` uses too)."""

from openrlhf_ext.cpu_stand_ins import hide_from_trl, install

__all__ = ["hide_from_trl", "install"]
