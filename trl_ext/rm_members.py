"""Training the one-model ensembles: a backbone with k heads, or k LoRA adapters on one base.

Multi-head (Ahmed et al. 2024, arXiv 2406.01013; Zhang et al. 2024, arXiv 2401.16635, linear-layer ensemble):
the heads share every forward pass, so they cannot each see their own data order without k passes per step.
Member diversity therefore comes from each head's own seed twice over: its initialisation, and (with
`head_data: bootstrap`, the default) its own bootstrap of the preference pairs, drawn as Poisson(1) weights per
pair (the online bootstrap), which costs nothing extra. The papers diversify the heads through their
initialisation on shared data (`head_data: shared` does exactly that); Eisenstein et al. 2023 (arXiv 2312.09244)
find that members sharing most of their training err alike, so the bootstrap adds data diversity where the
shared backbone removes it. With `head_data: labelled` each training row names the one member it trains
(`member`: 0..k-1), e.g. the same pairs as judged by k different annotators: k RMs' data in one training run. The backbone is trained on the sum of the heads' losses (`backbone: train`) or kept
frozen (`backbone: frozen`, only the heads learn).

LoRA: adapter j is trained as one RM through TRL's RewardTrainer with peft, its seed setting the adapter's
initialisation, its own score head and its data order, one adapter after another on the shared frozen base.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F
from transformers import AutoConfig, AutoModel, PreTrainedTokenizerBase, Trainer

from reward_plugins.batching import right_pad
from reward_plugins.io import DataError, iter_jsonl
from reward_plugins.cli import loading
from reward_plugins.lora_ensemble import save_lora_index
from reward_plugins.member_info import MemberInfo
from reward_plugins.multihead import LastTokenHeads, new_heads, save_heads

from .console import use_bar_and_table
from .rm_config import RMRunConfig, encode_pairs, rm_args
from .run_dir import stop_cleanly


@dataclass
class PairCollator:
    """Chosen rows, then rejected rows, right-padded, with each pair's index for its bootstrap weights."""

    pad_token_id: int

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        input_ids, attention_mask = right_pad(ids, self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "pair_index": torch.tensor([e["pair_index"] for e in examples], dtype=torch.long)}


def bootstrap_weights(pairs: int, seeds: Sequence[int]) -> torch.Tensor:
    """(pairs, k) Poisson(1) counts, column h drawn with head h's seed: how often head h sees each pair."""
    columns = [torch.poisson(torch.ones(pairs), generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(columns, dim=1)


def labelled_weights(rows: Sequence[dict], k: int, path: str | Path) -> torch.Tensor:
    """(rows, k) one-hot weights from each row's `member` (head_data: labelled); a missing or out-of-range
    member, or a member with no rows, is refused naming the file (and line)."""
    members = []
    for (line, _), row in zip(iter_jsonl(path), rows):
        member = row.get("member")
        if isinstance(member, bool) or not isinstance(member, int) or not 0 <= member < k:
            raise DataError(f"{path}:{line}: 'member' must be an integer from 0 to {k - 1} (head_data: labelled "
                            f"names the one member each row trains), got {member!r}")
        members.append(member)
    empty = sorted(set(range(k)) - set(members))
    if empty:
        raise DataError(f"{path}: no rows for member(s) {empty} of {k} (head_data: labelled)")
    return F.one_hot(torch.tensor(members), k).to(torch.float32)


def merge_labelled(rows: Sequence[dict], k: int, path: str | Path) -> tuple[list[dict], torch.Tensor]:
    """The labelled rows with each pair once, and (pairs, k) signed weights: +1 where the member prefers the stored
    chosen answer, -1 where it prefers the other, 0 where it did not label the pair. k annotators judging the same
    pairs then cost one pass per pair, not k."""
    onehot = labelled_weights(rows, k, path)
    merged: list[dict] = []
    weights: list[torch.Tensor] = []
    where: dict[tuple, int] = {}
    for row, member in zip(rows, onehot.argmax(1).tolist()):
        key = (repr(row["prompt"]), *sorted((repr(row["chosen"]), repr(row["rejected"]))))
        if key not in where:
            where[key] = len(merged)
            merged.append(row)
            weights.append(torch.zeros(k))
        first = merged[where[key]]
        weights[where[key]][member] += 1.0 if row["chosen"] == first["chosen"] else -1.0
    return merged, torch.stack(weights)


def multihead_loss(scores: torch.Tensor, weights: torch.Tensor | None, center: float | None = None) -> torch.Tensor:
    """Sum over heads of each head's Bradley-Terry loss on (2B, k) scores (chosen rows first), each pair weighted
    by that head's weight: a bootstrap count, or for labelled pairs +1 / -1 (the head prefers the chosen / the
    rejected answer) and 0 (not its pair); plus TRL's reward-centring term per head when `center` is set."""
    chosen, rejected = scores.chunk(2)
    if weights is None:
        per_pair = -F.logsigmoid(chosen - rejected)
    else:
        per_pair = -F.logsigmoid(weights.sign() * (chosen - rejected)) * weights.abs()
    loss = per_pair.mean(dim=0).sum()
    if center is not None:
        loss = loss + center * ((chosen + rejected) ** 2).mean(dim=0).sum()
    return loss


class TrainableHeads(LastTokenHeads):
    """The scoring module, with the backbone's gradient checkpointing switch for the Trainer."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


class MultiHeadTrainer(Trainer):
    """transformers' Trainer with the multi-head loss; every TrainingArguments setting applies as usual."""

    def __init__(self, *args: Any, weights: torch.Tensor | None, center: float | None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.weights = weights
        self.center = center

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        scores = model(inputs["input_ids"], inputs["attention_mask"])
        weights = None
        if self.weights is not None:
            self.weights = self.weights.to(scores.device)  # once: the counts live where the scores are
            weights = self.weights[inputs["pair_index"].to(scores.device)].to(scores.dtype)
        loss = multihead_loss(scores, weights, self.center)
        return (loss, scores) if return_outputs else loss


def train_multihead(cfg: RMRunConfig, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict],
                    resume_from: str | Path | None = None) -> float:
    """Train k heads (and the backbone unless frozen), save backbone + heads file; returns training seconds."""
    from datasets import Dataset
    from trl.trainer.utils import disable_dropout_in_model

    args = rm_args(cfg, remove_unused_columns=False)
    seeds = cfg.member_seeds
    torch.manual_seed(cfg.seed)
    with loading("base", cfg.base):
        backbone = AutoModel.from_pretrained(cfg.base, dtype=torch.float32)
    heads = new_heads(backbone.config.hidden_size, seeds, std=getattr(backbone.config, "initializer_range", 0.02))
    model = TrainableHeads(backbone, heads, tokenizer.pad_token_id)
    if cfg.backbone == "frozen":
        backbone.requires_grad_(False)
    if args.disable_dropout:
        disable_dropout_in_model(model)
    weights = None
    if cfg.head_data == "bootstrap":
        weights = bootstrap_weights(len(rows), seeds)
    elif cfg.head_data == "labelled":
        rows, weights = merge_labelled(rows, len(seeds), cfg.train_data)
    data = {**encode_pairs(rows, tokenizer, cfg), "pair_index": list(range(len(rows)))}
    trainer = MultiHeadTrainer(model=model, args=args, train_dataset=Dataset.from_dict(data),
                               data_collator=PairCollator(tokenizer.pad_token_id), weights=weights,
                               center=args.center_rewards_coefficient)
    use_bar_and_table(trainer)
    out = cfg.output_dir
    start = time.perf_counter()
    with stop_cleanly(out, lambda: trainer.state.global_step):
        trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - start
    backbone.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_heads(out, heads.weight, MemberInfo(seeds, training=_training_record(cfg)))
    return seconds


def train_lora(cfg: RMRunConfig, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict]) -> float:
    """Train the k adapters one after another on the frozen base, save base + adapters + index; returns seconds.
    A rerun keeps the adapters already saved and resumes the next from its last checkpoint."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification
    from transformers.trainer_utils import get_last_checkpoint
    from trl import RewardTrainer

    settings = cfg.lora
    out = cfg.output_dir
    with loading("base", cfg.base):
        AutoModel.from_pretrained(cfg.base, dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    layers = None
    if settings.top_layers is not None:
        total = AutoConfig.from_pretrained(cfg.base).num_hidden_layers
        layers = list(range(max(0, total - settings.top_layers), total))
    dataset = Dataset.from_dict(encode_pairs(rows, tokenizer, cfg))
    member_of = labelled_weights(rows, len(cfg.member_seeds), cfg.train_data).argmax(1).tolist() \
        if cfg.head_data == "labelled" else None
    names, seconds = [], 0.0
    for member, seed in enumerate(cfg.member_seeds):
        names.append(f"adapters/seed{seed}")
        if (out / names[-1] / "adapter_config.json").is_file():
            continue  # trained by an earlier run of these settings (the run folder checked them)
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(cfg.base, num_labels=1, dtype=torch.float32)
        model.config.pad_token_id = tokenizer.pad_token_id
        lora = LoraConfig(task_type="SEQ_CLS", r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                          target_modules=list(settings.target_modules), layers_to_transform=layers)
        scratch = out / "adapters" / f".train_seed{seed}"
        own = dataset if member_of is None else dataset.select([i for i, m in enumerate(member_of) if m == member])
        trainer = RewardTrainer(model=model, args=rm_args(cfg, scratch, seed), train_dataset=own,
                                processing_class=tokenizer, peft_config=lora)
        use_bar_and_table(trainer)
        start = time.perf_counter()
        with stop_cleanly(out, lambda: trainer.state.global_step):
            trainer.train(resume_from_checkpoint=get_last_checkpoint(str(scratch)) if scratch.is_dir() else None)
        seconds += time.perf_counter() - start
        trainer.model.save_pretrained(out / names[-1])
        shutil.rmtree(scratch, ignore_errors=True)
    save_lora_index(out, names, MemberInfo(cfg.member_seeds, training=_training_record(cfg)))
    return seconds


def _training_record(cfg: RMRunConfig) -> dict[str, Any]:
    record: dict[str, Any] = {"base": cfg.base, "seed": cfg.seed, "train_data": cfg.train_data}
    if cfg.kind == "multihead":
        record.update(backbone=cfg.backbone, head_data=cfg.head_data)
    else:
        record.update(lora=cfg.lora.model_dump(), head_data=cfg.head_data)
    return record


def record_held_out(folder: str | Path, kind: str, info: MemberInfo) -> None:
    """Rewrite the folder's member record with the held-out accuracy and correlation now in `info`."""
    if kind == "multihead":
        from reward_plugins.multihead import read_heads

        weight, _ = read_heads(folder)
        save_heads(folder, weight, info)
    else:
        from reward_plugins.lora_ensemble import read_lora_index

        adapters, _ = read_lora_index(folder)
        save_lora_index(folder, [str(a.relative_to(folder)) for a in adapters], info)
