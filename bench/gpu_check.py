"""One prepared GPU check: the project's GPU paths on random-weight models, one table, under 8 minutes.

    python bench/gpu_check.py                 # one H100 / H200 (bf16, sdpa); writes nothing outside --work
    python bench/gpu_check.py --dry-run       # the same code paths on CPU at tiny sizes (run by `make test`)

Needs torch, transformers, accelerate and peft, pydantic (trl for the GRPO row, tensorboard for the PPO row; a
missing one turns its row into a note). No network: models are built from configs with random weights and a
word-level tokenizer made on the spot, saved, and loaded back through the code users use. Rows:

- reward model (`reward_plugins.reward_model`, ~1.5B in Qwen2.5-1.5B's shape, bf16, sdpa): samples/s batched and one
  sample per call, and the batched share of the card's dense bf16 peak, from counted FLOPs (2 x non-embedding
  parameters per real token, plus causal attention 2 x layers x hidden x length^2 per sequence);
- VR-CLI scorer (`reward_plugins.vrcli`, the same shape as a causal LM): scored tokens/s, and the baseline
  precompute (`baseline_perplexities`) in rows/s;
- one PPO step (`trl_ext.ppo`) and one GRPO step (TRL through `trl_ext.train`) with a ~0.5B policy (Qwen2.5-0.5B's shape) and a rule
  reward (so the trainer is what is timed): seconds per step (mean of two) and peak GPU memory;
- the multi-head ensemble (`reward_plugins.multihead`, k = 5 heads on the RM's own backbone, UWO) against that
  one RM (`reward_model`), both through their reward plugins on the same samples, timed in turns: samples/s,
  the ratio (median of the paired ratios; issue 18's target is >= 0.9x) and the ratio of parameter memory.

Time on one H100, estimated from FLOP counts at a pessimistic 25 % of the bf16 peak (989 TFLOP/s), plus loading:
the RM rows score 256 texts of ~384 tokens (2 x 1.3B non-embedding parameters x 98k tokens = 2.6e14 FLOPs, ~1 s
a pass; about 5 passes with the multi-head row's turns); VR-CLI scores 32 rows of ~2.7k tokens twice (weights,
attention and the kept logits: ~5e14 FLOPs, ~2 s); PPO and GRPO (fp32, as `trl_ext` loads the policy) are bound
by 128 sequential decoding steps of a 0.5B model (~15 ms each: ~2 s per rollout, 2 steps each, plus updates of
~1e13 FLOPs: under 10 s a step). Building and saving four model folders (two 1.5B, the multi-head copy of the
RM's backbone, 0.5B: 10 GB of safetensors) and importing TRL take the most, one to two minutes. The whole
check: about 2-3 minutes, well within the 8 required.

What the GPU machine lacks travels as wheels (4.5 MiB, `make gpu-check-wheels`; README, "Benchmarks"): pydantic (with
pydantic-core, annotated-types, typing-inspection) for every row, trl, datasets, dill and multiprocess for
the GRPO row. Tensorboard (the PPO row's writer), rich, PyYAML and the rest are already there.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project, installed or not (a bare GPU image)

# Dense bf16 peak (no sparsity) by card name, from the vendors' data sheets.
BF16_PEAK = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12))


@dataclass(frozen=True)
class Sizes:
    """Model shapes and workload sizes of one run (GPU or dry run)."""

    vocab: int
    rm: dict
    policy: dict
    rm_texts: int
    rm_tokens: int
    single_texts: int
    vrcli_samples: int
    story_tokens: int
    gold_tokens: int
    new_tokens: int
    rl_batch: int


GPU = Sizes(
    vocab=151_936,
    rm=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2),
    policy=dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2),
    rm_texts=256, rm_tokens=512, single_texts=32, vrcli_samples=32, story_tokens=2048, gold_tokens=512,
    new_tokens=128, rl_batch=8,
)
DRY = Sizes(
    vocab=512,
    rm=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    policy=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    rm_texts=8, rm_tokens=24, single_texts=4, vrcli_samples=4, story_tokens=40, gold_tokens=12, new_tokens=4, rl_batch=4,
)


@dataclass
class Row:
    name: str
    figure: str
    detail: str = ""


class Bench:
    """Builds the models of one run and holds what the measurements share."""

    def __init__(self, sizes: Sizes, work: Path, device: torch.device, seed: int = 0):
        self.sizes, self.work, self.device = sizes, work, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.rng = random.Random(seed)
        self.params: dict[str, float] = {}  # billions of parameters per built model
        self.tokenizer_dir = self._tokenizer()

    def _tokenizer(self) -> Path:
        """A word-level tokenizer over `t3 ... tN` (ids = the word's number), so random ids decode and re-encode."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"t{i}": i for i in range(3, self.sizes.vocab)}}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
        fast.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}t3 {% endif %}"
                              "{{ m['content'] }} <eos> {% endfor %}{% if add_generation_prompt %}t3 {% endif %}")
        out = self.work / "tokenizer"
        fast.save_pretrained(out)
        return out

    def text(self, tokens: int) -> str:
        return " ".join(f"t{self.rng.randrange(3, self.sizes.vocab)}" for _ in range(tokens))

    def model(self, name: str, kind: str, shape: dict) -> Path:
        """A random-weight model of Qwen2.5's shape (as a Llama config: transformers loads the word-level tokenizer
        as written for it) built on the device, saved as safetensors, with the tokenizer."""
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

        out = self.work / name
        if out.exists():
            return out
        config = LlamaConfig(vocab_size=self.sizes.vocab, max_position_embeddings=8192, tie_word_embeddings=True,
                             pad_token_id=0, eos_token_id=1, bos_token_id=1, num_labels=1, head_dim=shape["hidden_size"] // shape["num_attention_heads"], **shape)
        cls = LlamaForSequenceClassification if kind == "rm" else LlamaForCausalLM
        torch.manual_seed(0)
        with torch.device(self.device):
            model = cls(config).to(self.dtype)
        self.params[name] = sum(p.numel() for p in model.parameters()) / 1e9
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(self.tokenizer_dir).save_pretrained(out)
        del model
        return out


def non_embedding_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if "embed" not in name)


def forward_flops(model: torch.nn.Module, lengths: list[int]) -> float:
    """FLOPs of one forward over sequences of these real lengths: weights and causal attention."""
    config = model.config
    per_token = 2 * non_embedding_params(model)
    attention = sum(2 * config.num_hidden_layers * config.hidden_size * n * n for n in lengths)
    return per_token * sum(lengths) + attention


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK if key in name), None)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def rm_scoring(bench: Bench) -> list[Row]:
    from reward_plugins.logprobs import dtype_name
    from reward_plugins.reward_model import RewardModelConfig, RewardModelScorer

    sizes = bench.sizes
    path = bench.model("rm", "rm", sizes.rm)
    scorer = RewardModelScorer(RewardModelConfig(path=str(path), max_length=sizes.rm_tokens + 8, batch_size=32,
                                                 dtype="bfloat16" if bench.device.type == "cuda" else "float32",
                                                 device=str(bench.device)))
    texts = [bench.text(bench.rng.randint(sizes.rm_tokens // 2, sizes.rm_tokens)) for _ in range(sizes.rm_texts)]
    scorer.score_texts(texts[:4])  # warm-up: kernels, allocator
    batched = timed(lambda: scorer.score_texts(texts), bench.device)
    single_texts = texts[: sizes.single_texts]
    single = timed(lambda: [scorer.score_texts([t]) for t in single_texts], bench.device)
    lengths = [len(ids) for ids in scorer.encode(texts)[0]]
    peak = peak_flops(bench.device)
    share = f"{forward_flops(scorer.model, lengths) / batched / peak:.1%} of bf16 peak" if peak else "peak: n/a"
    attention = getattr(getattr(scorer.model, "config", None), "_attn_implementation", "?")
    rate, one = len(texts) / batched, len(single_texts) / single
    return [Row(f"RM scoring ({bench.params['rm']:.3g}B, {dtype_name(scorer.dtype)}, {attention})",
                f"{rate:.1f} samples/s batched",
                f"{one:.1f} one at a time ({rate / one:.1f}x); {share}")]


def vrcli_scoring(bench: Bench) -> list[Row]:
    from reward_plugins import Sample
    from reward_plugins.vrcli import VRCLIConfig, VRCLIPlugin, baseline_perplexities

    sizes = bench.sizes
    path = bench.model("scorer", "lm", sizes.rm)
    config = VRCLIConfig.model_validate({
        "scorer": {"model": str(path), "batch_size": 4, "max_length": sizes.story_tokens + sizes.gold_tokens + 512,
                   "dtype": "bfloat16" if bench.device.type == "cuda" else "float32", "device": str(bench.device)},
        "prompt": {"system": None}, "shaping": {"scheme": "raw"}})
    plugin = VRCLIPlugin(config, "vrcli")
    labels = [{"context": bench.text(sizes.story_tokens), "gold": bench.text(sizes.gold_tokens)}
              for _ in range(sizes.vrcli_samples)]
    baseline_perplexities(plugin.scorer, config.prompt, labels[:2])  # warm-up
    start = time.perf_counter()
    baselines = baseline_perplexities(plugin.scorer, config.prompt, labels)
    baseline_s = time.perf_counter() - start
    samples = [Sample(prompt="p", response="In summary: " + bench.text(64), label={**label, "baseline_ppl": float(b)})
               for label, b in zip(labels, baselines)]
    scored_s = timed(lambda: plugin.score(samples), bench.device)
    tokenizer = plugin.scorer.tokenizer
    tokens = sum(len(c) + len(g) for c, g in (config.prompt.token_ids(tokenizer, s.label, s.response.split(": ", 1)[1])
                                               for s in samples))
    return [Row(f"VR-CLI scorer ({bench.params['scorer']:.3g}B causal LM, {plugin.scorer.dtype}, "
                f"{plugin.scorer.attn_implementation})", f"{tokens / scored_s:,.0f} tokens/s",
                f"baseline precompute {len(labels) / baseline_s:.1f} rows/s")]


def _rl_inputs(bench: Bench) -> tuple[Path, Path, Path]:
    from reward_plugins.io import write_jsonl

    policy = bench.model("policy", "lm", bench.sizes.policy)
    reward = bench.work / "rule.yaml"
    reward.write_text("reward:\n  type: length_penalty\n  name: short\n  coef: 0.01\n  unit: chars\n")
    prompts = bench.work / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": bench.text(64), "label": {"id": i}} for i in range(4 * bench.sizes.rl_batch)])
    return policy, reward, prompts


def _peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "peak memory n/a on CPU"
    return f"peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"


def ppo_step(bench: Bench) -> list[Row]:
    from trl_ext import train
    from trl_ext.run_config import TrainConfig

    policy, reward, prompts = _rl_inputs(bench)
    sizes = bench.sizes
    ppo = {"max_steps": 2, "batch_size": sizes.rl_batch, "mini_batch_size": sizes.rl_batch // 2, "ppo_epochs": 2,
           "max_new_tokens": sizes.new_tokens, "learning_rate": 1e-6, "kl_coef": 0.05, "sample_rows": 0}
    out = bench.work / "ppo"
    cfg = TrainConfig.model_validate({"algorithm": "ppo", "policy": str(policy), "reward_config": str(reward),
                                      "train_data": str(prompts), "output_dir": str(out), "eval_every": 0,
                                      "table_every": 0, "ppo": ppo})
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    train.run(cfg)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    seconds = last["episode"] / last["eps"] / ppo["max_steps"]  # eps: episodes per second since the first step
    return [Row(f"PPO step ({bench.params['policy']:.3g}B policy + value, batch {sizes.rl_batch}, {sizes.new_tokens} new tokens)",
                f"{seconds:.2f} s/step", _peak_memory(bench.device))]


def grpo_step(bench: Bench) -> list[Row]:
    from transformers import TrainerCallback

    from trl_ext import train
    from trl_ext.run_config import TrainConfig

    policy, reward, prompts = _rl_inputs(bench)
    sizes = bench.sizes
    trl = {"max_steps": 2, "per_device_train_batch_size": sizes.rl_batch, "num_generations": 4,
           "max_completion_length": sizes.new_tokens, "learning_rate": 1e-6, "save_strategy": "no", "report_to": []}
    cfg = TrainConfig.model_validate({"policy": str(policy), "reward_config": str(reward), "train_data": str(prompts),
                                      "output_dir": str(bench.work / "grpo"), "eval_every": 0, "table_every": 0, "trl": trl})
    steps: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            steps.append(time.perf_counter() - self.start)

    trainer = train.build_trainer(cfg)
    trainer.add_callback(StepTimer())
    if bench.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(bench.device)
    trainer.train()
    return [Row(f"GRPO step ({bench.params['policy']:.3g}B policy, {sizes.rl_batch} completions, {sizes.new_tokens} new tokens)",
                f"{sum(steps) / len(steps):.2f} s/step", _peak_memory(bench.device))]


def multihead_folder(bench: Bench, rm: Path, k: int) -> Path:
    """A multi-head RM folder as `train_rm` writes one: the RM's own backbone and k random heads (own seeds)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from reward_plugins.member_info import MemberInfo
    from reward_plugins.multihead import new_heads, save_heads

    out = bench.work / f"multihead_k{k}"
    model = AutoModelForSequenceClassification.from_pretrained(rm, dtype=bench.dtype)
    model.model.save_pretrained(out)
    AutoTokenizer.from_pretrained(rm).save_pretrained(out)
    del model
    hidden = bench.sizes.rm["hidden_size"]
    seeds = list(range(1, k + 1))
    save_heads(out, new_heads(hidden, seeds, std=hidden**-0.5).weight, MemberInfo(seeds))
    return out


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def multihead_ensemble(bench: Bench, k: int = 5, rounds: int = 2) -> list[Row]:
    """The multi-head RM (k heads, UWO) against one RM on the same backbone and samples, through their plugins,
    timed in turns (one RM, then multi-head, `rounds` times): samples/s, paired ratio, parameter memory."""
    from reward_plugins import Sample, parse_pipeline_config
    from reward_plugins.pipeline import build_plugin

    sizes = bench.sizes
    rm = bench.model("rm", "rm", sizes.rm)
    text = {"max_length": sizes.rm_tokens + 8, "batch_size": 32, "device": str(bench.device),
            "dtype": "bfloat16" if bench.device.type == "cuda" else "float32"}
    configs = {"one RM": {"type": "reward_model", "path": str(rm), **text},
               "multi-head": {"type": "multihead_ensemble", "path": str(multihead_folder(bench, rm, k)), "heads": k,
                              "objective": "uwo", "uwo_weight": 0.1, **text}}
    plugins = {name: build_plugin(parse_pipeline_config({"reward": config}).reward) for name, config in configs.items()}
    samples = []
    for _ in range(sizes.rm_texts):
        n = bench.rng.randint(sizes.rm_tokens // 2, sizes.rm_tokens)
        samples.append(Sample(prompt=bench.text(n // 2) + " ", response=bench.text(n - n // 2)))
    seconds: dict[str, list[float]] = {name: [] for name in plugins}
    for plugin in plugins.values():
        plugin.score(samples[:4])  # warm-up: kernels, allocator
    for _ in range(rounds):
        for name, plugin in plugins.items():
            seconds[name].append(timed(lambda plugin=plugin: plugin.score(samples), bench.device))
    ratio = statistics.median(one / multi for one, multi in zip(seconds["one RM"], seconds["multi-head"]))
    rate = {name: len(samples) / min(times) for name, times in seconds.items()}
    memory = parameter_bytes(plugins["multi-head"].scorer.model) / parameter_bytes(plugins["one RM"].scorer.model)
    return [Row(f"multi-head ensemble k={k} vs one RM ({bench.params['rm']:.3g}B backbone, UWO)",
                f"{ratio:.2f}x one RM's samples/s",
                f"{rate['multi-head']:.1f} vs {rate['one RM']:.1f} samples/s; parameter memory {memory:.4f}x "
                "(targets >= 0.9x, <= 1.1x)")]


MEASUREMENTS: tuple[Callable[[Bench], list[Row]], ...] = (rm_scoring, vrcli_scoring, ppo_step, grpo_step, multihead_ensemble)


def run(measurements, bench: Bench) -> list[Row]:
    """Every measurement's rows; one that cannot run on this machine (a missing package) becomes a note."""
    rows = []
    for measure in measurements:
        try:
            rows.extend(measure(bench))
        except ModuleNotFoundError as exc:
            rows.append(Row(measure.__name__, "not run", f"needs the {exc.name} package"))
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def table(rows: list[Row], header: str) -> str:
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("name", "figure")]
    lines = [header, "-" * len(header)]
    lines += [f"{r.name:<{widths[0]}}  {r.figure:>{widths[1]}}  {r.detail}".rstrip() for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on CPU at tiny sizes")
    parser.add_argument("--work", default=None, help="scratch folder for the saved models (default: a temporary one)")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no GPU here; --dry-run runs the same code paths on CPU at tiny sizes", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes = DRY if args.dry_run else GPU
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        bench = Bench(sizes, Path(work), device)
        rows = run(MEASUREMENTS, bench)
    card = "CPU dry run (tiny sizes: figures mean nothing)" if args.dry_run else torch.cuda.get_device_name(device)
    print(table(rows, f"gpu_check on {card}, torch {torch.__version__}, {time.perf_counter() - began:.0f} s in all"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
