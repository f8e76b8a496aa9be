"""The `reward_model` plugin: one sequence-scoring RM, in Hugging Face or OpenRLHF format, batched.

Formats:
- `hf`: an `AutoModelForSequenceClassification` checkpoint; the score is `logits[:, label_index]` from
  the model's own forward (its own pooling).
- `openrlhf`: a base model plus a bias-free linear value head saved under `value_head_prefix`
  (OpenRLHF's `get_llm_for_sequence_regression` layout); the score is the head at the last real token,
  optionally normalised with the mean/std kept in the checkpoint config or given here.
`auto` tells them apart by the config's architectures and the saved head weight.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from .batching import length_sorted_batches, position_ids_from_mask, right_pad, truncate
from .config import Placement
from .model_ref import ModelRef
from .modeling import DTypeName, load_tokenizer, require_safetensors, resolve_device, resolve_dtype
from .registry import PluginConfig, RewardPlugin, register_plugin
from .templates import current_names
from .types import RewardResult, Sample

logger = logging.getLogger(__name__)

TEMPLATE_FIELDS = ("prompt", "response", "query", "label")


class TextInputConfig(PluginConfig):
    """How a model-backed scorer builds, tokenises and batches its texts: shared by one RM and by k-member RMs."""

    path: ModelRef
    tokenizer: ModelRef | None = None
    template: str = "{prompt}{response}"
    chat_template: bool = False
    add_special_tokens: bool = True
    max_length: int = Field(default=1024, gt=1)
    truncation_side: Literal["left", "right"] = "left"
    batch_size: int = Field(default=16, gt=0)
    max_tokens_per_batch: int | None = Field(default=None, gt=0)
    dtype: DTypeName = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    allow_empty_response: bool = False
    placement: Placement | None = None

    @field_validator("template")
    @classmethod
    def _known_fields(cls, template: str) -> str:
        template = current_names(template, "template")
        for _, field_name, _, _ in string.Formatter().parse(template):
            if field_name is None:
                continue
            root = field_name.split("[", 1)[0].split(".", 1)[0]
            if root not in TEMPLATE_FIELDS:
                raise ValueError(f"template field {{{field_name}}} is not one of {TEMPLATE_FIELDS}")
        return template


class RewardModelConfig(TextInputConfig):
    format: Literal["auto", "hf", "openrlhf"] = "auto"
    value_head_prefix: str | None = None
    label_index: int = 0
    normalize: bool = False
    mean: float | None = None
    std: float | None = Field(default=None, gt=0)


class _ValueHeadModel(torch.nn.Module):
    """An OpenRLHF-format RM: backbone hidden state at the last real token through a linear head."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear, mean: float, std: float):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mean = mean
        self.std = std

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(
            input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)
        ).last_hidden_state
        last = attention_mask.sum(dim=1) - 1
        values = self.head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1).float()
        return (values - self.mean) / self.std


class TextScorer:
    """Formats samples, tokenises every text once and runs `forward` in length-sorted batches.

    `forward(input_ids, attention_mask)` gives a (B, members) tensor: one column for a single RM, k for a
    multi-head or LoRA ensemble, so every member scores the same tokens in the same pass.
    """

    members = 1

    def __init__(self, config: TextInputConfig):
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.tokenizer = load_tokenizer(config.tokenizer or config.path, config.trust_remote_code)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray]:
        """Token ids per text, truncated to `max_length`, and which ones were truncated."""
        encoded = self.tokenizer(list(texts), add_special_tokens=self.config.add_special_tokens)["input_ids"]
        pairs = [truncate(ids, self.config.max_length, self.config.truncation_side) for ids in encoded]
        return [ids for ids, _ in pairs], np.array([cut for _, cut in pairs], dtype=bool)

    @torch.inference_mode()
    def member_score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """(members, N) float64 scores of token sequences, computed in length-sorted batches."""
        scores = np.empty((self.members, len(sequences)), dtype=np.float64)
        batches = length_sorted_batches([len(s) for s in sequences], self.config.batch_size, self.config.max_tokens_per_batch)
        for batch in batches:
            input_ids, attention_mask = right_pad([sequences[i] for i in batch], self.tokenizer.pad_token_id)
            values = self.forward(input_ids.to(self.device), attention_mask.to(self.device))
            scores[:, batch] = values.float().cpu().numpy().reshape(len(batch), self.members).T
        return scores

    def member_scores_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(members, N) scores and (N,) truncation flags for already-formatted inputs."""
        ids, truncated = self.encode(texts)
        return self.member_score_ids(ids), truncated

    def format_sample(self, sample: Sample) -> str:
        """The text this RM reads for a sample: its template, optionally through its own chat template."""
        if self.config.chat_template:
            messages = [{"role": "user", "content": sample.prompt}, {"role": "assistant", "content": sample.response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self.config.template.format(
            prompt=sample.prompt, response=sample.response, query=sample.full_text, label=sample.label
        )

    @functools.cached_property
    def encoding_key(self) -> tuple:
        """Equal for scorers that turn a sample into the same token ids, so an ensemble tokenises once for them."""
        cfg = self.config
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        vocabulary = hashlib.sha256(backend.to_str().encode()).hexdigest() if backend is not None else id(self.tokenizer)
        template = self.tokenizer.chat_template if cfg.chat_template else cfg.template
        return (vocabulary, cfg.chat_template, template, cfg.add_special_tokens, cfg.max_length, cfg.truncation_side,
                str(self.tokenizer.special_tokens_map))


class RewardModelScorer(TextScorer):
    """Scores plain texts with one RM; the reusable core of the plugin (best-of-n uses it directly)."""

    def __init__(self, config: RewardModelConfig):
        super().__init__(config)
        self.format = detect_format(config.path, config.value_head_prefix) if config.format == "auto" else config.format
        self.model = self._load_model().to(self.device).eval()

    def _load_model(self) -> torch.nn.Module:
        cfg = self.config
        require_safetensors(cfg.path)
        kwargs = {"dtype": self.dtype, "trust_remote_code": cfg.trust_remote_code}
        if self.format == "hf":
            model = AutoModelForSequenceClassification.from_pretrained(cfg.path, **kwargs)
            if model.config.pad_token_id is None:
                model.config.pad_token_id = self.tokenizer.pad_token_id
            if cfg.normalize:
                raise ValueError(f"{cfg.path}: normalize applies to OpenRLHF-format RMs; use standardize in an ensemble")
            return model
        prefix = cfg.value_head_prefix or getattr(AutoConfig.from_pretrained(cfg.path), "value_head_prefix", "score")
        head_weight = load_tensor(cfg.path, f"{prefix}.weight")
        backbone = AutoModel.from_pretrained(cfg.path, **kwargs)
        head = torch.nn.Linear(head_weight.shape[1], 1, bias=False, dtype=self.dtype)
        head.weight.data.copy_(head_weight)
        mean, std = 0.0, 1.0
        if cfg.normalize:
            mean, std = self._normalisation(backbone.config)
        return _ValueHeadModel(backbone, head, mean, std)

    def _normalisation(self, model_config) -> tuple[float, float]:
        mean = self.config.mean if self.config.mean is not None else getattr(model_config, "mean", None)
        std = self.config.std if self.config.std is not None else getattr(model_config, "std", None)
        if mean is None or std is None:
            raise ValueError(
                f"{self.config.path}: normalize is on but neither this config nor the checkpoint's config.json "
                "has mean and std (OpenRLHF would silently skip normalisation here)"
            )
        return float(mean), float(std)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.format == "hf":
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, self.config.label_index]
        return self.model(input_ids, attention_mask)

    def score_ids(self, sequences: Sequence[Sequence[int]]) -> np.ndarray:
        """One float64 score per token sequence, computed in length-sorted batches."""
        return self.member_score_ids(sequences)[0]

    def score_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Scores and truncation flags for already-formatted RM inputs."""
        ids, truncated = self.encode(texts)
        return self.score_ids(ids), truncated


@register_plugin("reward_model")
class RewardModelPlugin(RewardPlugin):
    """Scores each sample with one reward model; components: `score` and `truncated` (0/1)."""

    Config = RewardModelConfig

    def __init__(self, config: RewardModelConfig, name: str):
        super().__init__(config, name)
        self.scorer = RewardModelScorer(config)

    @property
    def component_keys(self) -> tuple[str, ...]:
        return ("score", "truncated")

    def score(self, samples: Sequence[Sample]) -> list[RewardResult]:
        results: list[RewardResult | None] = [None] * len(samples)
        texts, positions = [], []
        for i, sample in enumerate(samples):
            if not sample.response.strip() and not self.config.allow_empty_response:
                results[i] = RewardResult.failed(f"{self.name}: empty response")
                continue
            try:
                texts.append(self.scorer.format_sample(sample))
            except (KeyError, IndexError, TypeError) as exc:
                results[i] = RewardResult.failed(f"{self.name}: template needs {exc} from the sample/label")
                continue
            positions.append(i)
        if texts:
            scores, truncated = self.scorer.score_texts(texts)
            for i, value, cut in zip(positions, scores, truncated):
                components = {"score": float(value), "truncated": float(cut)}
                if np.isfinite(value):
                    results[i] = RewardResult.ok(value, components)
                else:
                    results[i] = RewardResult.failed(f"{self.name}: model returned {value}", {"truncated": float(cut)})
        return results  # type: ignore[return-value]


def detect_format(path: str, value_head_prefix: str | None) -> Literal["hf", "openrlhf"]:
    """Tell an HF sequence classifier from an OpenRLHF value-head checkpoint."""
    architectures = AutoConfig.from_pretrained(path).architectures or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return "hf"
    prefix = value_head_prefix or getattr(AutoConfig.from_pretrained(path), "value_head_prefix", "score")
    if f"{prefix}.weight" in safetensors_keys(path):
        return "openrlhf"
    raise ValueError(
        f"{path}: neither a *ForSequenceClassification checkpoint nor one with a '{prefix}.weight' value head; "
        "set format and value_head_prefix explicitly"
    )


def _weight_files(path: str) -> dict[str, Path]:
    folder = Path(path)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: folder / name for key, name in weight_map.items()}
    keys: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            keys.update({key: file for key in handle.keys()})
    return keys


def safetensors_keys(path: str) -> set[str]:
    return set(_weight_files(path))


def load_tensor(path: str, key: str) -> torch.Tensor:
    """Read one named tensor from a (possibly sharded) safetensors checkpoint."""
    files = _weight_files(path)
    if key not in files:
        raise KeyError(f"{path}: no tensor named {key!r} in the safetensors weights")
    with safe_open(files[key], framework="pt") as handle:
        return handle.get_tensor(key)
