"""What a reward-model training run is: one RM, one backbone with k heads, or k LoRA adapters on one base; and how
its preference pairs become token ids (exactly as the reward plugins build their inputs at scoring time)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from reward_plugins.batching import truncate
from reward_plugins.config import ConfigError
from reward_plugins.model_ref import ModelRef
from reward_plugins.templates import current_names

from .config import CPU_DEFAULTS, ExistingPath, unknown_fields
from .data import answer_text, as_text

# RewardConfig fields beyond TrainingArguments that only TRL's RewardTrainer reads: a multi-head run trains
# through our own loss, which implements center_rewards_coefficient and disable_dropout and refuses the rest.
MULTIHEAD_REFUSED = ("model_init_kwargs", "trust_remote_code", "chat_template_path", "dataset_num_proc", "eos_token",
                     "max_length", "pad_to_multiple_of", "activation_offloading", "pad_token")


class LoraSettings(BaseModel):
    """k LoRA adapters on the base, each with its own seed (initialisation, score head, data order)."""

    model_config = ConfigDict(extra="forbid")

    adapters: int = Field(ge=1)
    r: int = Field(default=8, ge=1)
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"], min_length=1)
    top_layers: int | None = Field(default=None, ge=1)  # adapt only the last N decoder layers (None: all)


class RMRunConfig(BaseModel):
    """One RM (default), a multi-head RM (`heads: k`) or a LoRA ensemble (`lora: {adapters: k, ...}`) from one base,
    preference data, a seed, and how texts are built (must match the plugin's config)."""

    model_config = ConfigDict(extra="forbid")
    CONFIG_KIND: ClassVar[str] = "RM"

    base: ModelRef
    tokenizer: ModelRef | None = None
    train_data: ExistingPath
    test_data: ExistingPath | None = None
    output_root: str = "models"
    name: str = "rm"
    seed: int = 1
    heads: int | None = Field(default=None, ge=1)
    backbone: Literal["train", "frozen"] = "train"
    head_data: Literal["bootstrap", "shared", "labelled"] = "bootstrap"  # labelled: each row's `member` (0..k-1)
    lora: LoraSettings | None = None
    template: str = "{prompt}{response}"  # the reward_model plugin's fields; {answer} is read as {response}, deprecated
    max_length: int = Field(default=1024, gt=1)
    truncation_side: Literal["left", "right"] = "left"
    torch_threads: int | None = Field(default=None, gt=0)
    trl: dict[str, Any] = Field(default_factory=dict)

    @field_validator("template")
    @classmethod
    def _current_names(cls, template: str) -> str:
        return current_names(template, "template")

    @model_validator(mode="after")
    def _one_kind(self) -> RMRunConfig:
        if self.heads is not None and self.lora is not None:
            raise ValueError("give heads (one backbone, k heads) or lora (k adapters), not both")
        multihead_only = {"backbone": "train", "head_data": "bootstrap"}
        if self.heads is None:
            for key, default in multihead_only.items():
                if getattr(self, key) != default and not (key == "head_data" and self.lora is not None
                                                          and self.head_data == "labelled"):
                    also = " (labelled: also to LoRA adapters)" if key == "head_data" else ""
                    raise ValueError(f"{key} applies to a multi-head RM{also}; set heads: k")
        return self

    def config_problems(self) -> list[tuple[tuple[str, ...], str]]:
        from trl import RewardConfig

        problems = unknown_fields(RewardConfig, self.trl)
        if self.heads is not None:
            problems += [(("trl", key), "not used by multi-head training (TRL's RewardTrainer only)")
                         for key in MULTIHEAD_REFUSED if key in self.trl]
        return problems

    @property
    def kind(self) -> Literal["single", "multihead", "lora"]:
        return "multihead" if self.heads is not None else "lora" if self.lora is not None else "single"

    @property
    def member_seeds(self) -> list[int]:
        """Each head's or adapter's own seed, derived from the run seed (seed 1: 1001, 1002, ...)."""
        k = self.heads if self.heads is not None else self.lora.adapters if self.lora is not None else 1
        return [self.seed * 1000 + member + 1 for member in range(k)] if self.kind != "single" else [self.seed]

    @property
    def output_dir(self) -> Path:
        return Path(self.output_root) / f"{self.name}_seed{self.seed}"


def text_rows(rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase) -> list[dict]:
    """Rows with chat-message prompts and answers turned into text (chat template; answer contents)."""
    return [{**r, "prompt": as_text(r["prompt"], tokenizer), "chosen": answer_text(r["chosen"]),
             "rejected": answer_text(r["rejected"])} for r in rows]


def pair_texts(rows: Sequence[dict], cfg: RMRunConfig, side: str) -> list[str]:
    """The `side` ("chosen" / "rejected") answers of `rows` as the reward plugin's template renders them."""
    return [cfg.template.format(prompt=r["prompt"], response=r[side], query=r["prompt"] + r[side], label=r.get("label"))
            for r in rows]


def encode_pairs(rows: Sequence[dict], tokenizer: PreTrainedTokenizerBase, cfg: RMRunConfig) -> dict[str, list]:
    """`chosen_ids` / `rejected_ids` built as the reward_model plugin builds its inputs."""
    out: dict[str, list] = {}
    for side in ("chosen", "rejected"):
        ids = tokenizer(pair_texts(rows, cfg, side), add_special_tokens=True)["input_ids"]
        out[f"{side}_ids"] = [truncate(x, cfg.max_length, cfg.truncation_side)[0] for x in ids]
    return out


def rm_args(cfg: RMRunConfig, output_dir: str | Path | None = None, seed: int | None = None, **fixed: Any):
    """TRL's RewardConfig for this run, from `rm_values`."""
    from trl import RewardConfig

    known = {f.name for f in dataclasses.fields(RewardConfig)}
    unknown = sorted(set(cfg.trl) - known)
    if unknown:
        raise ConfigError([f"trl.{key}: unknown RewardConfig field" for key in unknown], "RM")
    try:
        return RewardConfig(**rm_values(cfg, output_dir, seed, **fixed))
    except (TypeError, ValueError) as exc:
        raise ConfigError([f"trl: {exc}"], "RM") from exc


def rm_values(cfg: RMRunConfig, output_dir: str | Path | None = None, seed: int | None = None,
              **fixed: Any) -> dict[str, Any]:
    """What `rm_args` passes to RewardConfig: our defaults (CPU ones without a GPU), then the preset's `trl`
    section, then `fixed` (what a multi-member run needs whatever the preset says); `seed` is a member's own."""
    seed = cfg.seed if seed is None else seed
    values: dict[str, Any] = {"output_dir": str(output_dir or cfg.output_dir), "report_to": ["tensorboard"],
                              "seed": seed, "data_seed": seed, "max_length": None, "save_strategy": "no",
                              "logging_steps": 10}
    if not torch.cuda.is_available():
        values.update(CPU_DEFAULTS)
    values.update(cfg.trl)
    values.update(fixed)
    return values
