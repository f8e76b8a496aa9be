"""Model references: a local folder, or a hub id (`org/name`, `org/name@revision`) resolved through huggingface_hub.

Every config field and flag that names a model (policy, reward models, ensemble members, value model, VR-CLI
scorer, tokenizers) is a `ModelRef`, resolved once by `resolve_model`: a local folder stays as it is; a hub id
becomes the local snapshot folder of its resolved commit (downloaded once, then read from the hub cache), so
the loading code only ever sees folders. `describe(path)` gives back `org/name@commit` for run metadata and
fingerprints. Offline (`HF_HUB_OFFLINE=1`) or with no such repo, resolution fails within seconds with one line
naming the key, the id and `HF_HUB_OFFLINE`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, ValidationInfo

from .config_loader import expand_path

# Files a model folder needs here (weights are safetensors only; no remote code unless asked).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
HUB_TIMEOUT_S = 4.0
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$|^[A-Za-z0-9][\w.-]*@[\w./-]+$")
_TRUE = {"1", "ON", "YES", "TRUE"}


class ModelNotFound(ValueError):
    """A model reference that is neither a local folder nor a hub id that can be had; one line, naming the key.
    `local`: it was meant as a local path (nothing was asked of the hub)."""

    def __init__(self, message: str, local: bool = False):
        super().__init__(message)
        self.local = local


@dataclass(frozen=True)
class ResolvedModel:
    """Where a reference loads from (`path`), as written (`ref`), and the hub commit (None for a local folder)."""

    path: str
    ref: str
    repo: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        return f"{self.repo}@{self.revision}" if self.repo else self.path


_RESOLVED: dict[str, ResolvedModel] = {}  # snapshot folder -> how it was resolved, for describe()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def looks_like_hub_id(text: str) -> bool:
    """`org/name`, `org/name@rev` or `name@rev`; not `./x`, `/x`, `~/x`, `a/b/c`, or a path whose first part exists."""
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):
        return False
    return "/" not in text or not Path(text.split("/", 1)[0]).is_dir()


def resolve_model(ref: str, key: str) -> ResolvedModel:
    """A local folder as it is, or a hub id as the snapshot folder of its resolved commit; `ModelNotFound` naming
    `key` (the config key or flag) otherwise."""
    try:
        return _resolve(ref)
    except ModelNotFound as exc:
        raise ModelNotFound(f"{key}: {exc}", exc.local) from None


def _resolve(ref: str) -> ResolvedModel:
    expanded = expand_path(ref)
    if Path(expanded).exists():
        return ResolvedModel(expanded, ref)
    if not looks_like_hub_id(expanded):
        raise ModelNotFound(f"path does not exist: {expanded}", local=True)
    repo, _, revision = expanded.partition("@")
    resolved = _from_hub(repo, revision or None)
    _RESOLVED[resolved.path] = resolved
    return resolved


def _from_hub(repo: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import HfApi, snapshot_download  # noqa: PLC0415 - only for hub ids
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError  # noqa: PLC0415

    name = f"{repo}@{revision}" if revision else repo
    if not hub_offline():
        try:
            commit = HfApi().model_info(repo, revision=revision, timeout=HUB_TIMEOUT_S).sha
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise ModelNotFound(f"{name}: no such model on the hub ({type(exc).__name__}); a local folder "
                                "needs ./ or an absolute path") from None
        except Exception as exc:  # noqa: BLE001 - no network: the cache may still hold it
            cached = _cached(repo, revision)
            if cached is not None:
                return ResolvedModel(cached, name, repo, Path(cached).name)
            raise ModelNotFound(f"{name} could not be reached on the hub ({_first_line(exc)}) and is not in "
                                "the local hub cache (nor a local folder); check the network, or set HF_HUB_OFFLINE=1 to use the cache "
                                "only") from None
        folder = snapshot_download(repo, revision=commit, allow_patterns=ALLOW_PATTERNS)
        return ResolvedModel(folder, name, repo, commit)
    cached = _cached(repo, revision)
    if cached is None:
        raise ModelNotFound(f"{name} is not a local folder, nor in the local hub cache, and "
                            "HF_HUB_OFFLINE=1 (nothing is downloaded): download it once online, or give a local folder")
    return ResolvedModel(cached, name, repo, Path(cached).name)


def _cached(repo: str, revision: str | None) -> str | None:
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    try:
        return snapshot_download(repo, revision=revision, local_files_only=True, allow_patterns=ALLOW_PATTERNS)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(path: str | os.PathLike | None) -> str | None:
    """`org/name@commit` for a folder resolved from a hub id, else the path itself (None stays None)."""
    if path is None:
        return None
    resolved = _RESOLVED.get(str(path))
    return resolved.describe() if resolved else str(path)


def repo_of(path: str | os.PathLike) -> str:
    """The hub repo a folder was resolved from (`org/name`), else the path itself."""
    resolved = _RESOLVED.get(str(path))
    return resolved.repo if resolved and resolved.repo else str(path)


def revision_of(path: str | os.PathLike | None) -> str | None:
    """The hub commit a folder was resolved to (None for a local folder)."""
    resolved = _RESOLVED.get(str(path)) if path is not None else None
    return resolved.revision if resolved else None


def _validate(value: str, info: ValidationInfo) -> str:
    """The loader adds file, line and key to the message."""
    if not (info.context or {}).get("check_paths", True):
        return expand_path(value)
    return _resolve(value).path


ModelRef = Annotated[str, AfterValidator(_validate)]
"""A model (or tokenizer) as a local folder or a hub id (`org/name[@revision]`); validated into a local folder."""
