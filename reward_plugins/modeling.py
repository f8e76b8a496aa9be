"""Device, dtype and tokenizer loading shared by the model-backed plugins."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]


def resolve_device(name: str) -> torch.device:
    """"auto" picks the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: DTypeName, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on a GPU and float32 on a CPU (CPU half precision is slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (falling back to EOS as the pad token, with a warning)."""
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an EOS token; cannot batch")
        logger.warning("tokenizer at %s has no pad token; padding with EOS", path)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def require_safetensors(path: str) -> None:
    """Refuse pickle-based weight files: we load weights only from safetensors."""
    folder = Path(path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        raise ValueError(f"{path} has no *.safetensors weights; convert the checkpoint (we never load pickle files)")
