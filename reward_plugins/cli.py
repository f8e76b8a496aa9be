"""Shared command-line plumbing: user errors exit with status 2 and one message (a traceback only with --debug),
and model folders are checked up front, naming the config key or flag that pointed there."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .config_loader import ConfigError
from .io import DataError
from .model_ref import ModelNotFound, describe, resolve_model

DEBUG_FLAG = "--debug"
DEBUG_ENV = "REWARD_PLUGINS_DEBUG"
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


class UsageError(RuntimeError):
    """The command cannot run as asked (a missing or wrong model folder, an unusable option); the message says why."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with the one line to print (e.g. where the same command resumes)."""


INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report it


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, UsageError, FileNotFoundError)


def looks_local(name: str) -> bool:
    """Whether a model name is meant as a local path rather than a hub id (`org/name` or `name`)."""
    if name.startswith((".", "/", "~")) or name.strip("/").count("/") > 1:
        return True
    return "/" in name and Path(name.split("/", 1)[0]).is_dir()


def resolve_folder(path: str, key: str) -> str:
    """A local folder, or a hub id (`org/name[@revision]`) resolved to its snapshot folder; `UsageError` naming
    `key` when neither can be had (offline: within seconds, naming HF_HUB_OFFLINE)."""
    try:
        return resolve_model(path, key).path
    except ModelNotFound as exc:
        if exc.local:
            raise UsageError(f"{key}: {path} does not exist (a local path; nothing is downloaded)") from None
        raise UsageError(str(exc)) from None


def check_model_dir(path: str, key: str, *, causal_lm: bool = False) -> str:
    """`path` (a folder or hub id) as a usable local model folder, or a `UsageError` naming `key` and the model."""
    folder = Path(resolve_folder(path, key))
    shown = describe(path)
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise UsageError(f"{key}: {shown} is not a Hugging Face model folder (no config.json)")
    if causal_lm:
        try:
            architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"{key}: {shown}/config.json cannot be read: {exc}") from None
        if architectures and not any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
            raise UsageError(f"{key}: {shown} is a {', '.join(architectures)}, not a causal language model "
                             "(a reward model cannot be the policy)")
    return str(folder)


def check_tokenizer_dir(path: str, key: str) -> str:
    """A tokenizer folder (or a hub id, resolved to its folder) that exists, else a `UsageError` naming `key`."""
    folder = Path(resolve_folder(path, key))
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UsageError(f"{key}: {describe(path)} holds no tokenizer (no tokenizer.json or tokenizer_config.json)")
    return str(folder)


@contextlib.contextmanager
def loading(key: str, path: str) -> Iterator[None]:
    """Turn a failure to load a model or tokenizer folder (missing weights, corrupt files) into a `UsageError`
    naming the config key or flag that pointed there."""
    try:
        yield
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{key}: {path} cannot be loaded: {first}") from exc


def help_first(build_parser: Callable[[], argparse.ArgumentParser]) -> None:
    """Answer `-h` / `--help` at once; a CLI calls this under `if __name__ == "__main__"` above its heavy imports
    (torch, transformers), so help comes back in well under 2 s."""
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        build_parser().parse_args(["--help"])


def strip_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """argv without `--debug`, and whether it (or REWARD_PLUGINS_DEBUG=1) was given."""
    argv = list(argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    return [a for a in argv if a != DEBUG_FLAG], debug


def run_cli(main: Callable[[list[str]], Any], prog: str, argv: Sequence[str] | None = None,
            user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Call `main(argv)`; a user error prints `prog: error: ...` and gives 2, Ctrl-C one line and 130 (rank 0
    prints, under torchrun); `--debug` re-raises either."""
    args, debug = strip_debug(sys.argv[1:] if argv is None else argv)
    try:
        result = main(args)
    except (*USER_ERRORS, *user_errors) as exc:
        if debug:
            raise
        if main_process():
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if debug:
            raise
        close_progress_bars()
        if main_process():
            print(f"{prog}: {exc if isinstance(exc, Interrupted) and str(exc) else 'interrupted'}", file=sys.stderr)
        return INTERRUPTED_EXIT
    return result if isinstance(result, int) else 0


def close_progress_bars() -> None:
    """End open tqdm bars on their own line, so the next message starts on a fresh one."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def main_process() -> bool:
    """Rank 0 under torchrun / accelerate (or no launcher): the one process that prints."""
    return os.environ.get("RANK", "0") == "0"
