"""Tiny random-weight models and a tokenizer trained on the spot, for smoke runs, tests and benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few lines with `tokenizers`, the
models are small Llama configs with random weights, and everything is written with `save_pretrained`
so it loads back through exactly the code users use.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short story about a dragon who learns to paint.",
    "In summary: the hero leaves the village and finds the lost map.",
    "Chapter two begins with a storm over the harbour and a ship in trouble.",
    "Answer the question politely and explain your reasoning step by step.",
    "Numbers like 1, 2, 3, 42 and 1000 appear in many answers.",
    "She opened the door, looked at the sea, and smiled at the morning light.",
    "Instruction: list three fruits. Response: apple, banana, cherry.",
    "The reward model scores the answer; the policy learns from the reward.",
    "Detailed Plan: introduce the villain, reveal the secret, end on a cliffhanger.",
]


def build_tokenizer(out_dir: str | Path, corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 400) -> Path:
    """Train a byte-level BPE tokenizer on `corpus` and save it as a Hugging Face fast tokenizer."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(list(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    fast.save_pretrained(out_dir)
    return out_dir


def tiny_llama_config(tokenizer_dir: str | Path, **overrides) -> LlamaConfig:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def build_reward_model(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    seed: int = 0,
    format: Literal["hf", "openrlhf"] = "hf",
    **config_overrides,
) -> Path:
    """A random tiny RM saved in HF (`LlamaForSequenceClassification`) or OpenRLHF value-head layout.

    Both layouts store the same tensors (`model.*` plus a bias-free `score.weight`), so the same seed gives
    the same weights in either format.
    """
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer_dir, num_labels=1, **config_overrides)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)
    out_dir = Path(out_dir)
    if format == "openrlhf":
        model.config.architectures = ["LlamaModel"]
        model.config.value_head_prefix = "score"
        model.save_pretrained(out_dir)
        _strip_architectures(out_dir)
    else:
        model.save_pretrained(out_dir)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def _strip_architectures(out_dir: Path) -> None:
    import json

    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["architectures"] = ["RewardModel"]
    config.pop("id2label", None)
    config.pop("label2id", None)
    config_file.write_text(json.dumps(config, indent=2))


def build_causal_lm(out_dir: str | Path, tokenizer_dir: str | Path, seed: int = 0, **config_overrides) -> Path:
    """A random tiny causal LM (for VR-CLI scoring and policy smoke runs)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tokenizer_dir, **config_overrides))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def build_multihead_rm(out_dir: str | Path, tokenizer_dir: str | Path, k: int = 3, seed: int = 0,
                       **config_overrides) -> Path:
    """A random tiny multi-head RM folder: a Llama backbone and `heads.safetensors` with k random heads."""
    from transformers import LlamaModel

    from .member_info import MemberInfo
    from .multihead import new_heads, save_heads

    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer_dir, **config_overrides)
    out_dir = Path(out_dir)
    LlamaModel(config).save_pretrained(out_dir)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    seeds = [seed * 1000 + h + 1 for h in range(k)]
    save_heads(out_dir, new_heads(config.hidden_size, seeds, std=1.0).weight, MemberInfo(seeds))
    return out_dir


def build_lora_ensemble(out_dir: str | Path, tokenizer_dir: str | Path, k: int = 3, seed: int = 0, r: int = 4,
                        top_layers: int = 1, target_modules: tuple[str, ...] = ("q_proj", "v_proj", "up_proj"),
                        **config_overrides) -> Path:
    """A random tiny LoRA ensemble folder: a Llama backbone and k peft adapters with random (non-zero) weights on
    the top `top_layers` layers, each with its own score head."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaModel

    from .lora_ensemble import save_lora_index
    from .member_info import MemberInfo

    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer_dir, **config_overrides)
    out_dir = Path(out_dir)
    LlamaModel(config).save_pretrained(out_dir)
    PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    layers = config.num_hidden_layers
    seeds = [seed * 1000 + j + 1 for j in range(k)]
    names = []
    for member_seed in seeds:
        torch.manual_seed(member_seed)
        base = LlamaForSequenceClassification.from_pretrained(out_dir, num_labels=1)
        lora = LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r, target_modules=list(target_modules),
                          layers_to_transform=list(range(layers - top_layers, layers)))
        model = get_peft_model(base, lora)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:  # a delta about as large as the layer's own weights
                    param.normal_(0.0, param.shape[1] ** -0.5 * (1.0 if "lora_A" in name else 2.0))
                elif "modules_to_save" in name:
                    param.normal_(0.0, 1.0)
        names.append(f"adapters/seed{member_seed}")
        model.save_pretrained(out_dir / names[-1])
    save_lora_index(out_dir, names, MemberInfo(seeds))
    return out_dir
