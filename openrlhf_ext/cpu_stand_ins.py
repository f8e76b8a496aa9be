"""Stand-in modules for `flash_attn` and `vllm`, so OpenRLHF 0.11.2's GPU modules import on a CPU (tests and `launch --dry-run`).

Installed into `sys.modules` only when the real package is absent. Every stand-in has a real
`__spec__` (transformers calls `importlib.util.find_spec`) and tolerates any attribute access, because
OpenRLHF does `from vllm import SamplingParams` and similar at import time. Calling anything from them
fails loudly: they exist to import, never to compute.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types


class _Unavailable:
    """Any attribute is another stand-in; calling one raises."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, item: str) -> _Unavailable:
        if item.startswith("__"):
            raise AttributeError(item)
        return _Unavailable(f"{self._name}.{item}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a CPU test stand-in and cannot be called")

    def __mro_entries__(self, bases):
        return (object,)


class _StandInModule(types.ModuleType):
    def __getattr__(self, item: str):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Unavailable(f"{self.__name__}.{item}")


def _module(name: str, package: bool, **attrs) -> types.ModuleType:
    module = _StandInModule(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=package)
    if package:
        module.__path__ = []
    module.__dict__.update(attrs)
    return module


def _raiser(name: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"flash_attn.{name} is a CPU test stand-in")

    return fail


def install() -> None:
    """Put the stand-ins in `sys.modules` unless the real packages are importable."""
    if importlib.util.find_spec("flash_attn") is None and "flash_attn" not in sys.modules:
        modules = {
            "flash_attn": _module("flash_attn", True, __version__="2.8.3"),
            "flash_attn.bert_padding": _module(
                "flash_attn.bert_padding",
                False,
                **{n: _raiser(n) for n in ("index_first_axis", "pad_input", "rearrange", "unpad_input")},
            ),
            "flash_attn.utils": _module("flash_attn.utils", True),
            "flash_attn.utils.distributed": _module("flash_attn.utils.distributed", False, all_gather=_raiser("all_gather")),
        }
        sys.modules.update(modules)
    if importlib.util.find_spec("vllm") is None and "vllm" not in sys.modules:
        names = [
            ("vllm", True),
            ("vllm.inputs", False),
            ("vllm.utils", True),
            ("vllm.distributed", True),
            ("vllm.distributed.utils", False),
            ("vllm.distributed.device_communicators", True),
            ("vllm.distributed.device_communicators.pynccl", False),
        ]
        sys.modules.update({name: _module(name, package, __version__="0.29.0") for name, package in names})


def hide_from_trl() -> None:
    """TRL takes any importable `vllm` for the real one and then imports modules it lacks; tell it there is none."""
    from trl import import_utils

    import_utils.is_vllm_available = lambda *args, **kwargs: False
