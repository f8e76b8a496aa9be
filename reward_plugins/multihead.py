"""The `multihead_ensemble` plugin: one backbone, k linear heads on its last hidden state, all scored in one pass.

Ahmed et al. 2024 (arXiv 2406.01013) and Zhang et al. 2024 (arXiv 2401.16635, "linear-layer ensemble"): a
shared encoder with separate linear heads mitigates over-optimisation close to k full reward models at the
cost of one. A model folder is the backbone as `save_pretrained` writes it (config, safetensors weights,
tokenizer), loaded with `AutoModel.from_pretrained`, plus `heads.safetensors`: a (k, hidden) `weight` whose
metadata records k, each head's seed, held-out accuracy and the heads' pairwise score correlation.
`python -m trl_ext.train_rm --config configs/rm/multihead_tiny.yaml` writes one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from pydantic import Field
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from transformers import AutoConfig, AutoModel

from .batching import last_token_index, position_ids_from_mask
from .ensemble import OneModelConfig, OneModelEnsemble
from .io import atomic_open
from .member_info import MemberFileError, MemberInfo, check_member_count
from .modeling import require_safetensors
from .registry import register_plugin
from .reward_model import TextInputConfig, TextScorer

HEADS_FILE = "heads.safetensors"
HEADS_FORMAT = "reward_plugins.multihead/1"


def save_heads(folder: str | Path, weight: torch.Tensor, info: MemberInfo) -> Path:
    """Write `folder/heads.safetensors` atomically: the (k, hidden) head weights and `info` as JSON metadata."""
    if weight.ndim != 2 or weight.shape[0] != info.k:
        raise ValueError(f"head weights of shape {tuple(weight.shape)} do not match k={info.k}")
    path = Path(folder) / HEADS_FILE
    metadata = {"format": HEADS_FORMAT, "members": json.dumps(info.as_dict())}
    data = safetensors_bytes({"weight": weight.detach().to("cpu", torch.float32).contiguous()}, metadata=metadata)
    with atomic_open(path, "wb") as handle:
        handle.write(data)
    return path


def read_heads(folder: str | Path, hidden_size: int | None = None,
               expected_heads: int | None = None) -> tuple[torch.Tensor, MemberInfo]:
    """The head weights and their record, refusing (one line naming the file) a file that does not fit:
    no heads file, a k that disagrees with the weights or with `expected_heads`, or heads of another width."""
    path = Path(folder) / HEADS_FILE
    if not path.is_file():
        raise MemberFileError(f"{path}: missing; a multi-head reward model folder holds its heads there "
                              "(python -m trl_ext.train_rm with heads: k writes one)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            weight = handle.get_tensor("weight") if "weight" in handle.keys() else None
    except (SafetensorError, OSError) as exc:
        raise MemberFileError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    if metadata.get("format") != HEADS_FORMAT:
        raise MemberFileError(f"{path}: not a multi-head heads file (metadata format is not {HEADS_FORMAT!r})")
    try:
        record = json.loads(metadata.get("members", ""))
    except json.JSONDecodeError:
        raise MemberFileError(f"{path}: the 'members' metadata is not valid JSON") from None
    if not isinstance(record, dict):
        raise MemberFileError(f"{path}: the 'members' metadata must be a JSON object")
    info = MemberInfo.from_dict(record, str(path))
    if weight is None or weight.ndim != 2:
        raise MemberFileError(f"{path}: needs a 2-D 'weight' tensor of shape (k, hidden)")
    if weight.shape[0] != info.k:
        raise MemberFileError(f"{path}: its metadata says k={info.k} but 'weight' holds {weight.shape[0]} heads")
    if hidden_size is not None and weight.shape[1] != hidden_size:
        raise MemberFileError(f"{path}: the heads are {weight.shape[1]} wide but the backbone's hidden size is "
                              f"{hidden_size}; these heads belong to another backbone")
    check_member_count(info.k, expected_heads, str(path), "heads")
    return weight, info


def read_member_info(folder: str | Path) -> MemberInfo:
    """The heads file's record alone (no weights read beyond the check): k, seeds, accuracy, correlation."""
    hidden = getattr(AutoConfig.from_pretrained(folder), "hidden_size", None)
    return read_heads(folder, hidden)[1]


class LastTokenHeads(torch.nn.Module):
    """Backbone hidden state at the last non-pad token through k bias-free linear heads: (B, k) scores."""

    def __init__(self, backbone: torch.nn.Module, heads: torch.nn.Linear, pad_token_id: int):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.pad_token_id = pad_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return self.heads(hidden[rows, last_token_index(input_ids, self.pad_token_id)])


def new_heads(hidden_size: int, seeds: Sequence[int], std: float, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    """k heads, head h drawn from N(0, std) with its own seed, so a head's start does not depend on k."""
    heads = torch.nn.Linear(hidden_size, len(seeds), bias=False, dtype=dtype)
    with torch.no_grad():
        for row, seed in enumerate(seeds):
            generator = torch.Generator().manual_seed(int(seed))
            heads.weight[row] = torch.randn(hidden_size, generator=generator, dtype=torch.float32).to(dtype) * std
    return heads


class MultiHeadConfig(OneModelConfig):
    """A multi-head RM folder; `heads` is the k it must hold."""

    COUNT_KEY: ClassVar[str] = "heads"
    MEMBER_PREFIX: ClassVar[str] = "head"

    heads: int = Field(ge=1)


class MultiHeadScorer(TextScorer):
    """The backbone once per length bucket, then k heads: (k, N) scores for N texts."""

    def __init__(self, config: TextInputConfig, expected_heads: int | None = None):
        super().__init__(config)
        require_safetensors(config.path)
        backbone = AutoModel.from_pretrained(config.path, dtype=self.dtype, trust_remote_code=config.trust_remote_code)
        weight, self.info = read_heads(config.path, backbone.config.hidden_size, expected_heads)
        self.members = self.info.k
        heads = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=self.dtype)
        heads.weight.data.copy_(weight)
        self.model = LastTokenHeads(backbone, heads, self.tokenizer.pad_token_id).to(self.device).eval()

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)


@register_plugin("multihead_ensemble")
class MultiHeadEnsemblePlugin(OneModelEnsemble):
    """k heads on one backbone, combined with mean / WCO / UWO like k separate reward models."""

    Config = MultiHeadConfig

    def __init__(self, config: MultiHeadConfig, name: str):
        super().__init__(config, name)
        self.scorer = MultiHeadScorer(config, config.heads)
        self.load_reference_statistics()
