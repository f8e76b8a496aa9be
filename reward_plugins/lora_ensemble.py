"""The `lora_ensemble` plugin: k LoRA adapters on one base reward model, scored in one pass (Zhang et al. 2024,
arXiv 2401.16635).

A model folder holds the base backbone as `save_pretrained` writes it (config, safetensors, tokenizer), the k
adapters as peft writes them (`adapters/<name>/`, each with its own trained score head in `modules_to_save`)
and `lora_ensemble.json`: the adapters' folders and the members' record (k, seeds, held-out accuracy, pairwise
score correlation). `python -m trl_ext.train_rm --config configs/rm/lora_tiny.yaml` writes one.

Two ways to score all k adapters in one pass over a batch of B texts:
- `indexed` (the default, measured faster): the layers below the first adapted layer run once on the B rows;
  from there the batch is repeated k times, block j going through adapter j with one batched matmul per adapted
  linear for all k adapters, and block j is read by adapter j's score head. Adapters on the top layers only
  therefore cost little more than one RM.
- `peft_mixed`: peft's mixed-adapter batch, the whole batch repeated k times with `adapter_names`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from transformers import AutoModelForSequenceClassification

from .batching import last_token_index, position_ids_from_mask
from .ensemble import OneModelConfig, OneModelEnsemble
from .io import write_json
from .member_info import MemberFileError, MemberInfo, check_member_count
from .modeling import require_safetensors
from .registry import register_plugin
from .reward_model import TextInputConfig, TextScorer

INDEX_FILE = "lora_ensemble.json"
INDEX_FORMAT = "reward_plugins.lora_ensemble/1"
LoraForward = Literal["indexed", "peft_mixed"]


def save_lora_index(folder: str | Path, adapters: Sequence[str], info: MemberInfo) -> Path:
    """Write `folder/lora_ensemble.json`: the adapter folders (relative to `folder`) and the members' record."""
    if len(adapters) != info.k:
        raise ValueError(f"{len(adapters)} adapters for k={info.k}")
    path = Path(folder) / INDEX_FILE
    write_json(path, {"format": INDEX_FORMAT, "adapters": list(adapters), "members": info.as_dict()})
    return path


def read_lora_index(folder: str | Path, expected_adapters: int | None = None) -> tuple[list[Path], MemberInfo]:
    """The adapter folders and the members' record, refusing (one line naming the file) an index that does not fit."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise MemberFileError(f"{path}: missing; a LoRA ensemble folder lists its adapters there "
                              "(python -m trl_ext.train_rm with lora: ... writes one)")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MemberFileError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise MemberFileError(f"{path}: not a LoRA ensemble index (format is not {INDEX_FORMAT!r})")
    if not isinstance(index.get("members"), dict):
        raise MemberFileError(f"{path}: needs a 'members' object (k, seeds, ...)")
    info = MemberInfo.from_dict(index["members"], str(path))
    adapters = index.get("adapters")
    if not isinstance(adapters, list) or len(adapters) != info.k or not all(isinstance(a, str) for a in adapters):
        raise MemberFileError(f"{path}: 'adapters' must list {info.k} adapter folders (k={info.k})")
    folders = [Path(folder) / a for a in adapters]
    for adapter in folders:
        if not (adapter / "adapter_config.json").is_file():
            raise MemberFileError(f"{path}: adapter folder {adapter} has no adapter_config.json")
    check_member_count(info.k, expected_adapters, str(path), "adapters")
    return folders, info


def load_peft_ensemble(folder: str | Path, adapters: Sequence[Path], dtype: torch.dtype, pad_token_id: int):
    """The base sequence classifier with every adapter loaded under the names m0..m{k-1}."""
    from peft import PeftModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the base's own score head is new (each adapter brings its own)
    try:
        base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    base.config.pad_token_id = pad_token_id
    model = PeftModel.from_pretrained(base, str(adapters[0]), adapter_name="m0")
    for j, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(str(adapter), adapter_name=f"m{j}")
    return model.eval()


class IndexedLoraLinear(torch.nn.Module):
    """A linear layer plus k LoRA deltas; rows come as k blocks, block j taking adapter j's delta."""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.base = base
        self.a = torch.nn.Parameter(a, requires_grad=False)  # (k, r, in)
        self.b = torch.nn.Parameter(b, requires_grad=False)  # (k, out, r), scaling folded in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        blocks = x.reshape(self.a.shape[0], -1, x.shape[-1])
        delta = torch.bmm(torch.bmm(blocks, self.a.transpose(1, 2)), self.b.transpose(1, 2))
        return out + delta.reshape(out.shape)


class IndexedLoraModel(torch.nn.Module):
    """The backbone with k adapters folded into indexed linears; (B, k) scores, one pass per batch."""

    def __init__(self, backbone: torch.nn.Module, layers: torch.nn.ModuleList, first: int, heads: torch.Tensor,
                 bias: torch.Tensor, pad_token_id: int):
        super().__init__()
        self.backbone = backbone
        self.heads = torch.nn.Parameter(heads, requires_grad=False)  # (k, hidden)
        self.bias = torch.nn.Parameter(bias, requires_grad=False)  # (k,): zeros for bias-free score heads
        self.pad_token_id = pad_token_id
        self.batch = 0
        for layer in list(layers)[first:]:
            layer.register_forward_pre_hook(self._repeat_inputs, with_kwargs=True)

    def _repeat(self, value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(self._repeat(v) for v in value)
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == self.batch:
            return value.repeat(self.heads.shape[0], *([1] * (value.ndim - 1)))
        return value

    def _repeat_inputs(self, module, args, kwargs):
        """Inputs of an adapted layer that still have B rows (the hidden state entering the first one, masks and
        position embeddings at each) get k blocks of them."""
        return self._repeat(tuple(args)), {name: self._repeat(value) for name, value in kwargs.items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.batch, k = input_ids.shape[0], self.heads.shape[0]
        hidden = self.backbone(input_ids, attention_mask=attention_mask,
                               position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        blocks = hidden.reshape(k, self.batch, *hidden.shape[1:])
        rows = torch.arange(self.batch, device=hidden.device)
        last = blocks[:, rows, last_token_index(input_ids, self.pad_token_id)]  # (k, B, hidden)
        return torch.einsum("kbh,kh->bk", last, self.heads.to(last.dtype)) + self.bias.to(last.dtype)


def _decoder_layers(backbone: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The backbone's list of transformer blocks: the ModuleList with one entry per hidden layer."""
    count = getattr(backbone.config, "num_hidden_layers", None)
    for name, module in backbone.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return name, module
    raise ValueError(f"cannot find the {count} decoder layers of {type(backbone).__name__}")


def indexed_model(peft_model, folder: str | Path, pad_token_id: int) -> IndexedLoraModel:
    """Fold the k adapters of a peft model into one indexed model (the peft wrappers are removed)."""
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    names = [f"m{j}" for j in range(len(peft_model.peft_config))]
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    heads = None
    prefix = "base_model.model."
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            if not isinstance(module.get_base_layer(), torch.nn.Linear) or any(
                module.lora_variant.get(n) is not None or module.lora_bias.get(n) for n in names
            ):
                raise MemberFileError(f"{folder}: {name}: only plain LoRA on linear layers can be scored in one pass")
            if any(n not in module.lora_A for n in names) or len({module.r[n] for n in names}) != 1:
                raise MemberFileError(f"{folder}: {name}: every adapter must adapt the same modules with the same rank")
            dtype = module.get_base_layer().weight.dtype  # peft keeps adapters in float32 on a bf16 base
            a = torch.stack([module.lora_A[n].weight.detach().to(dtype) for n in names])
            b = torch.stack([(module.lora_B[n].weight.detach().float() * module.scaling[n]).to(dtype) for n in names])
            deltas[name.removeprefix(prefix)] = (a, b)
        elif isinstance(module, ModulesToSaveWrapper):
            trained = [module.modules_to_save[n] if n in module.modules_to_save else None for n in names]
            if heads is not None or any(t is None or getattr(t, "weight", None) is None or t.weight.shape[0] != 1
                                        for t in trained):
                raise MemberFileError(f"{folder}: each adapter must train exactly one one-output score head "
                                      "(modules_to_save)")
            heads = torch.cat([t.weight.detach().float() for t in trained])
            bias = torch.cat([t.bias.detach().float() if t.bias is not None else torch.zeros(1) for t in trained])
    if heads is None:
        raise MemberFileError(f"{folder}: the adapters carry no trained one-output score head (modules_to_save)")
    if not deltas:
        raise MemberFileError(f"{folder}: the adapters adapt no layer")
    model = peft_model.unload()
    backbone = model.base_model
    layer_path, layers = _decoder_layers(backbone)
    backbone_prefix = model.base_model_prefix + "."
    first = len(layers)
    for name, (a, b) in deltas.items():
        inner = name.removeprefix(backbone_prefix)
        parent_name, _, attribute = inner.rpartition(".")
        if not inner.startswith(layer_path + "."):
            raise MemberFileError(f"{folder}: {name} lies outside the decoder layers; only layers can be adapted here")
        first = min(first, int(inner[len(layer_path) + 1 :].split(".", 1)[0]))
        parent = backbone.get_submodule(parent_name)
        setattr(parent, attribute, IndexedLoraLinear(getattr(parent, attribute), a, b))
    return IndexedLoraModel(backbone, layers, first, heads, bias, pad_token_id)


class LoraEnsembleConfig(OneModelConfig):
    """A LoRA ensemble folder; `adapters` is the k it must hold, `forward` how the adapters share a pass."""

    COUNT_KEY: ClassVar[str] = "adapters"
    MEMBER_PREFIX: ClassVar[str] = "adapter"

    adapters: int = Field(ge=1)
    forward: LoraForward = "indexed"


class LoraEnsembleScorer(TextScorer):
    """k adapters on one base: (k, N) scores for N texts in one pass per length bucket."""

    def __init__(self, config: TextInputConfig, expected_adapters: int | None = None, forward: LoraForward = "indexed"):
        super().__init__(config)
        require_safetensors(config.path)
        adapters, self.info = read_lora_index(config.path, expected_adapters)
        self.members = self.info.k
        self.mode = forward
        peft_model = load_peft_ensemble(config.path, adapters, self.dtype, self.tokenizer.pad_token_id)
        if forward == "indexed":
            self.model = indexed_model(peft_model, config.path, self.tokenizer.pad_token_id).to(self.device).eval()
        else:
            self.model = peft_model.to(self.device)
            self.adapter_names = [f"m{j}" for j in range(self.members)]

    @property
    def backbone(self) -> torch.nn.Module:
        return self.model.backbone if self.mode == "indexed" else self.model.base_model.model.base_model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "indexed":
            return self.model(input_ids, attention_mask)
        batch, k = input_ids.shape[0], self.members
        names = [name for name in self.adapter_names for _ in range(batch)]
        logits = self.model(input_ids=input_ids.repeat(k, 1), attention_mask=attention_mask.repeat(k, 1),
                            adapter_names=names, use_cache=False).logits
        return logits.reshape(k, batch).T


@register_plugin("lora_ensemble")
class LoraEnsemblePlugin(OneModelEnsemble):
    """k LoRA adapters on one base, combined with mean / WCO / UWO like k separate reward models."""

    Config = LoraEnsembleConfig

    def __init__(self, config: LoraEnsembleConfig, name: str):
        super().__init__(config, name)
        self.scorer = LoraEnsembleScorer(config, config.adapters, config.forward)
        self.load_reference_statistics()
