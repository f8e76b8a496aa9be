"""Multi-head and LoRA ensembles against independent computations: heads applied by hand, adapters merged into the
base with peft and scored alone, the k-model `ensemble` fed the same columns, forward calls counted, bad files refused."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, LlamaForSequenceClassification, PreTrainedTokenizerFast

from reward_plugins import RewardPipeline, Sample, Status, parse_pipeline_config
from reward_plugins.ensemble import combine, member_variance
from reward_plugins.lora_ensemble import IndexedLoraLinear, IndexedLoraModel, LoraEnsembleScorer
from reward_plugins.member_info import MemberFileError
from reward_plugins.multihead import HEADS_FILE, LastTokenHeads, MultiHeadScorer
from reward_plugins.pipeline import build_pipeline
from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer, TextInputConfig

SAMPLES = [
    Sample(prompt="Write a story. ", response="The dragon learns to paint."),
    Sample(prompt="List fruit. ", response="apple, banana, cherry"),
    Sample(prompt="Q ", response="42"),
    Sample(prompt="Chapter two. ", response="A storm over the harbour and a ship in trouble, then the morning light."),
]
TEXTS = [s.prompt + s.response for s in SAMPLES]


def pipeline(reward: dict, **top):
    return build_pipeline(parse_pipeline_config({"reward": reward, **top}))


def hand_padded(tokenizer_dir, texts):
    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in ids])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
    return input_ids, mask, [len(x) - 1 for x in ids]


def test_heads_equal_linear_maps_applied_by_hand_to_the_last_hidden_state(multihead_dir, tokenizer_dir):
    scores = MultiHeadScorer(TextInputConfig(path=str(multihead_dir), device="cpu")).member_scores_texts(TEXTS)[0]
    backbone = AutoModel.from_pretrained(multihead_dir).eval()
    heads = load_file(multihead_dir / HEADS_FILE)["weight"]
    assert heads.shape == (5, 32)
    expected = []
    with torch.no_grad():
        for text in TEXTS:  # one text at a time: no padding at all
            input_ids, _, (last,) = hand_padded(tokenizer_dir, [text])
            hidden = backbone(input_ids).last_hidden_state[0, last]
            expected.append([float(hidden @ heads[h]) for h in range(5)])
    np.testing.assert_allclose(scores, np.array(expected).T, rtol=1e-4, atol=1e-4)
    assert np.unique(np.round(scores[:, 0], 3)).size == 5, "the heads must differ"


def _seq_cls_of_head(multihead_dir: Path, head: int, out: Path) -> Path:
    """Head `head` as a plain HF sequence classifier: the backbone's tensors under `model.` and one score row."""
    backbone = AutoModel.from_pretrained(multihead_dir)
    config = backbone.config
    config.num_labels = 1
    model = LlamaForSequenceClassification(config)
    state = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    state["score.weight"] = load_file(multihead_dir / HEADS_FILE)["weight"][head : head + 1]
    model.load_state_dict(state)
    model.save_pretrained(out)
    PreTrainedTokenizerFast.from_pretrained(multihead_dir).save_pretrained(out)
    return out


@pytest.mark.parametrize("objective, weight, standardize", [("uwo", 0.5, "none"), ("wco", 0.5, "none"),
                                                            ("uwo", 0.1, "reference_set")])
def test_multihead_uwo_equals_the_k_model_ensemble_fed_the_same_columns(multihead_dir, tmp_path, objective, weight,
                                                                       standardize):
    folders = [_seq_cls_of_head(multihead_dir, h, tmp_path / f"rm_head{h}") for h in range(5)]
    reference = tmp_path / "ref.jsonl"
    reference.write_text("".join(json.dumps({"prompt": f"p{i} ", "response": "word " * (i + 1)}) + "\n" for i in range(6)))
    shared = {"objective": objective, "uwo_weight": weight, "ddof": 1, "standardize": standardize}
    if standardize != "none":
        shared["reference_set"] = str(reference)
    names = [f"head{h}" for h in range(5)]
    k_models = pipeline({"type": "ensemble", "name": "uwo", "members": [
        {"name": n, "path": str(f)} for n, f in zip(names, folders)], **shared})
    one_pass = pipeline({"type": "multihead_ensemble", "name": "uwo", "path": str(multihead_dir), "heads": 5, **shared})
    assert one_pass.log_keys == k_models.log_keys
    assert one_pass.log_keys[3:] == (*(f"reward/{n}" for n in names), "reward/variance", "reward/combined")
    batch = SAMPLES + [Sample(prompt="p", response="")]
    got, want = one_pass.score(batch[:-1]), k_models.score(batch[:-1])
    np.testing.assert_allclose(got.rewards, want.rewards, rtol=1e-4, atol=1e-4)
    for a, b in zip(got.results, want.results):
        assert a.components.keys() == b.components.keys()
        np.testing.assert_allclose(list(a.components.values()), list(b.components.values()), rtol=1e-4, atol=1e-4)
    for key in got.logs:
        assert got.logs[key] == pytest.approx(want.logs[key], rel=1e-4, abs=1e-4)
    members = np.array([[r.components[n] for r in got.results] for n in names])
    if standardize == "none":  # and the combiner itself, computed here from the member columns
        np.testing.assert_allclose(got.rewards, combine(members, objective, weight, ddof=1), rtol=1e-6)
        np.testing.assert_allclose([r.components["variance"] for r in got.results], members.var(axis=0, ddof=1), rtol=1e-6)


def _merged_scores(lora_dir: Path, adapter: Path, out: Path, texts) -> np.ndarray:
    from peft import PeftModel

    base = LlamaForSequenceClassification.from_pretrained(lora_dir, num_labels=1)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.config.pad_token_id = PreTrainedTokenizerFast.from_pretrained(lora_dir).pad_token_id
    merged.save_pretrained(out)
    PreTrainedTokenizerFast.from_pretrained(lora_dir).save_pretrained(out)
    return RewardModelScorer(RewardModelConfig(path=str(out), device="cpu")).score_texts(texts)[0]


@pytest.mark.parametrize("forward", ["indexed", "peft_mixed"])
def test_lora_members_equal_each_adapter_merged_into_the_base_and_scored_alone(lora_dir, tmp_path, forward):
    scorer = LoraEnsembleScorer(TextInputConfig(path=str(lora_dir), device="cpu", batch_size=3), forward=forward)
    scores = scorer.member_scores_texts(TEXTS)[0]
    index = json.loads((lora_dir / "lora_ensemble.json").read_text())
    expected = np.stack([_merged_scores(lora_dir, lora_dir / a, tmp_path / f"merged{j}", TEXTS)
                         for j, a in enumerate(index["adapters"])])
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4)
    assert np.unique(np.round(scores[:, 0], 3)).size == 5, "the adapters must differ"


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda mod, args, kwargs: calls.append(
        (args[0] if args else kwargs["input_ids"]).shape[0]), with_kwargs=True)
    return calls


@pytest.mark.parametrize("kind", ["multihead", "lora_indexed", "lora_peft_mixed"])
def test_one_pass_is_one_pass(multihead_dir, lora_dir, kind):
    config = TextInputConfig(path=str(multihead_dir if kind == "multihead" else lora_dir), device="cpu", batch_size=2)
    scorer = (MultiHeadScorer(config) if kind == "multihead"
              else LoraEnsembleScorer(config, forward=kind.removeprefix("lora_")))
    calls = _count_calls(scorer.backbone)
    scores = scorer.member_scores_texts(TEXTS + TEXTS[:1])[0]
    assert scores.shape == (5, 5)
    assert len(calls) == 3, "5 texts in batches of 2: three backbone calls, not three per member"
    rows = [2, 2, 1] if kind != "lora_peft_mixed" else [10, 10, 5]  # peft's mixed batch repeats the whole batch
    assert sorted(calls, reverse=True) == rows


def test_k_model_ensemble_tokenises_once_for_members_that_read_alike(models_env, monkeypatch):
    plugin = pipeline({"type": "ensemble", "path_template": f"{models_env}/rm_seed{{seed}}", "seeds": [1, 2, 3],
                       "member": {"batch_size": 2}}).root
    encoded = []
    for member in plugin.members:
        original = member.encode
        monkeypatch.setattr(member, "encode", lambda texts, original=original: encoded.append(len(texts)) or original(texts))
    separate = np.stack([m.score_texts(TEXTS)[0] for m in plugin.members])
    encoded.clear()
    np.testing.assert_allclose(plugin.member_scores(SAMPLES), separate, rtol=1e-6)
    assert encoded == [len(SAMPLES)], "three members with one tokenizer and one template: one tokenisation"
    odd = pipeline({"type": "ensemble", "members": [{"path": str(models_env / "rm_seed1")},
                                                    {"path": str(models_env / "rm_seed2"), "max_length": 4}]}).root
    assert len({m.encoding_key for m in odd.members}) == 2, "a different max_length tokenises on its own"


@pytest.mark.parametrize("kind, count_key, member", [("multihead", "heads", "head"), ("lora", "adapters", "adapter")])
def test_shipped_configs_score_and_refuse_empty_responses_like_the_ensemble(models_env, kind, count_key, member):
    pipe = RewardPipeline.from_yaml(f"configs/rewards/{kind}_uwo5.yaml")
    keys = [f"{member}{j}" for j in range(5)]
    assert pipe.log_keys[3:] == (*(f"reward/{k}" for k in keys), "reward/variance", "reward/combined")
    out = pipe.score([Sample(prompt="p", response=" "), SAMPLES[0]])
    assert out.results[0].status is Status.ERROR and out.rewards[0] == -1.0 and out.results[1].is_ok
    members = np.array([out.results[1].components[k] for k in keys])
    assert out.rewards[1] == pytest.approx(members.mean() - 0.1 * members.var(), rel=1e-6)
    templated = pipeline({"type": pipe.root.type_name, "path": pipe.root.config.path, count_key: 5,
                          "template": "{label[missing]} {response}"}, on_error="penalty", error_penalty=-2.0)
    failed = templated.score([Sample(prompt="p", response="x", label={})] * 2)
    assert failed.rewards == [-2.0, -2.0] and "needs 'missing' from the sample/label" in failed.results[0].error


def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def one_line(exc: BaseException) -> str:
    message = str(exc)
    assert "\n" not in message, message
    return message


def test_bad_heads_file_or_wrong_k_is_refused_naming_the_file(multihead_dir, tmp_path):
    with pytest.raises(MemberFileError) as wrong_k:
        pipeline({"type": "multihead_ensemble", "path": str(multihead_dir), "heads": 3})
    assert one_line(wrong_k.value) == (f"{multihead_dir / HEADS_FILE}: holds 5 members but the reward config asks for "
                                       "heads: 3")
    folder = _copy_folder(multihead_dir, tmp_path / "mh")
    heads = folder / HEADS_FILE
    weights = load_file(heads)["weight"]
    from safetensors import safe_open

    with safe_open(str(heads), "pt") as handle:
        metadata = handle.metadata()
    cases = {
        "fewer rows than k": ({"weight": weights[:3].contiguous()}, metadata, "its metadata says k=5 but 'weight' holds 3 heads"),
        "wider than the backbone": ({"weight": torch.zeros(5, 48)}, metadata, "the heads are 48 wide but the backbone's hidden size is 32"),
        "no metadata": ({"weight": weights}, None, "not a multi-head heads file"),
        "seeds short": ({"weight": weights}, {**metadata, "members": json.dumps({"k": 5, "seeds": [1, 2]})},
                        "seeds must list 5 integers"),
    }
    for name, (tensors, meta, message) in cases.items():
        save_file(tensors, str(heads), metadata=meta)
        with pytest.raises(MemberFileError) as caught:
            MultiHeadScorer(TextInputConfig(path=str(folder), device="cpu"))
        assert one_line(caught.value).startswith(f"{heads}: ") and message in str(caught.value), name
    heads.write_bytes(b"not safetensors")
    with pytest.raises(MemberFileError, match="not a readable safetensors file") as caught:
        MultiHeadScorer(TextInputConfig(path=str(folder), device="cpu"))
    one_line(caught.value)
    heads.unlink()
    with pytest.raises(MemberFileError, match=f"{heads}: missing"):
        MultiHeadScorer(TextInputConfig(path=str(folder), device="cpu"))


def test_bad_lora_index_or_wrong_k_is_refused_naming_the_file(lora_dir, tmp_path):
    index_file = lora_dir / "lora_ensemble.json"
    with pytest.raises(MemberFileError) as wrong_k:
        pipeline({"type": "lora_ensemble", "path": str(lora_dir), "adapters": 4})
    assert one_line(wrong_k.value) == f"{index_file}: holds 5 members but the reward config asks for adapters: 4"
    folder = _copy_folder(lora_dir, tmp_path / "lora")
    index = json.loads((folder / "lora_ensemble.json").read_text())
    for change, message in [({"adapters": index["adapters"][:4]}, "'adapters' must list 5 adapter folders"),
                            ({"adapters": index["adapters"][:4] + ["adapters/nowhere"]}, "has no adapter_config.json"),
                            ({"format": "other"}, "not a LoRA ensemble index")]:
        (folder / "lora_ensemble.json").write_text(json.dumps({**index, **change}))
        with pytest.raises(MemberFileError) as caught:
            LoraEnsembleScorer(TextInputConfig(path=str(folder), device="cpu"))
        assert one_line(caught.value).startswith(f"{folder / 'lora_ensemble.json'}: ") and message in str(caught.value)


def test_config_checks_need_no_model(tmp_path):
    base = {"type": "multihead_ensemble", "path": str(tmp_path), "heads": 2}
    from reward_plugins import ConfigError

    with pytest.raises(ConfigError, match="ddof=2 needs more than 2 member\\(s\\) for a variance; this ensemble has 2"):
        parse_pipeline_config({"reward": {**base, "objective": "uwo", "ddof": 2}})
    with pytest.raises(ConfigError, match="one {mean, std} per member"):
        parse_pipeline_config({"reward": {**base, "standardize": "reference_stats", "reference_stats": [{"mean": 0, "std": 1}]}})
    with pytest.raises(ConfigError, match="member_names must be unique, one per member"):
        parse_pipeline_config({"reward": {**base, "member_names": ["a"]}})
    spec = parse_pipeline_config({"reward": {"type": "lora_ensemble", "path": str(tmp_path), "adapters": 3}}).reward
    assert spec.config.member_names == ["adapter0", "adapter1", "adapter2"]


# --- tensor code on the meta device: a tensor made on the wrong device fails here as it would on CUDA ---------


class _Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = torch.nn.Linear(width, width)

    def forward(self, hidden, attention_mask=None, position_embeddings=None):
        gate = attention_mask[:, 0, 0, :, None].to(hidden.dtype)
        return hidden + torch.tanh(self.proj(hidden)) * gate + position_embeddings[0]


class _StandInBackbone(torch.nn.Module):
    """A two-layer stand-in that passes a 4-D mask and a position-embedding tuple to each layer, as HF decoders do."""

    def __init__(self, vocab: int = 11, width: int = 6, layers: int = 2):
        super().__init__()
        self.config = SimpleNamespace(num_hidden_layers=layers)
        self.embed = torch.nn.Embedding(vocab, width)
        self.layers = torch.nn.ModuleList(_Block(width) for _ in range(layers))

    def forward(self, input_ids, attention_mask, position_ids, use_cache=False):
        hidden = self.embed(input_ids)
        mask = attention_mask[:, None, None, :]
        cos = position_ids[..., None].to(hidden.dtype).expand(*position_ids.shape, hidden.shape[-1]) * 0.01
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=(cos, cos))
        return SimpleNamespace(last_hidden_state=hidden)


def _indexed_stand_in(k: int, device: str, seed: int = 0):
    """An indexed model with k adapters on layer 1 of the stand-in, and the plain stand-in it started from."""
    import copy

    torch.manual_seed(seed)
    backbone = _StandInBackbone()
    plain = copy.deepcopy(backbone)
    a, b, heads = torch.randn(k, 2, 6), torch.randn(k, 6, 2), torch.randn(k, 6)
    backbone.layers[1].proj = IndexedLoraLinear(backbone.layers[1].proj, a, b)
    model = IndexedLoraModel(backbone, backbone.layers, 1, heads, torch.arange(k) * 0.5, pad_token_id=0).to(device)
    return model, (a, b, heads, plain)


def test_indexed_lora_blocks_match_each_adapter_computed_alone():
    model, (a, b, heads, plain) = _indexed_stand_in(k=3, device="cpu")
    input_ids = torch.tensor([[3, 4, 5, 0], [6, 7, 0, 0]])
    mask = (input_ids != 0).long()
    got = model(input_ids, mask)
    weight = plain.layers[1].proj.weight.detach().clone()
    for j in range(3):
        with torch.no_grad():
            plain.layers[1].proj.weight.copy_(weight + b[j] @ a[j])  # adapter j merged, the batch run alone
            hidden = plain(input_ids, mask, mask.cumsum(-1) - 1).last_hidden_state
        torch.testing.assert_close(got[:, j], hidden[[0, 1], [2, 1]] @ heads[j] + 0.5 * j, rtol=1e-5, atol=1e-5)


def test_one_pass_models_run_on_the_meta_device():
    model, _ = _indexed_stand_in(k=4, device="meta")
    input_ids = torch.zeros(3, 5, dtype=torch.long, device="meta")
    out = model(input_ids, torch.ones(3, 5, dtype=torch.long, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 4)
    heads = LastTokenHeads(_StandInBackbone(), torch.nn.Linear(6, 5, bias=False), pad_token_id=0).to("meta")
    out = heads(input_ids, torch.ones(3, 5, dtype=torch.long, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 5)


@pytest.mark.parametrize("kind", ["multihead", "lora_indexed", "lora_peft_mixed"])
def test_bfloat16_scores_follow_float32(multihead_dir, lora_dir, kind):
    """On a GPU the models load in bf16 while peft keeps adapters in float32: every tensor must meet in one dtype."""
    def scores(dtype):
        config = TextInputConfig(path=str(multihead_dir if kind == "multihead" else lora_dir), device="cpu", dtype=dtype)
        scorer = (MultiHeadScorer(config) if kind == "multihead"
                  else LoraEnsembleScorer(config, forward=kind.removeprefix("lora_")))
        return scorer.member_scores_texts(TEXTS)[0]

    full, half = scores("float32"), scores("bfloat16")
    np.testing.assert_allclose(half, full, rtol=0.1, atol=0.1 * np.abs(full).max())
    assert np.corrcoef(half.ravel(), full.ravel())[0, 1] > 0.99
