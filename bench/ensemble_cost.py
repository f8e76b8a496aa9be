"""What an ensemble costs: one RM, k separate RMs, one multi-head RM and one LoRA ensemble, samples/s and memory.

    python bench/ensemble_cost.py                      # tiny and ~100M parameters, random weights, CPU, one thread
    python bench/ensemble_cost.py --sizes tiny --rounds 2 --no-peak
    python bench/ensemble_cost.py --gpu                # ~1.5B parameters in bf16 on one GPU (+ fraction of bf16 peak)

Every variant scores the same samples through its reward plugin (template, one tokenisation, length-sorted
batches, forward, UWO combiner) on a backbone of the same size: `reward_model` (one RM), `ensemble` of k copies
of that RM (k separate RMs), `multihead_ensemble` with k heads, `lora_ensemble` with k adapters on the top
quarter of the layers, timed both ways (indexed, peft_mixed). For each k, every round times each variant right
after one RM (the order alternating between rounds), so the two timings of a pair see the same machine load;
samples/s is the median over rounds and the ratio to one RM the median of the paired ratios. Parameter memory counts each variant's weights (shared tensors
once); peak memory is what loading the variant and scoring the samples once adds to the resident set of a fresh
child process, sampled every 2 ms (on a GPU: the peak allocated while loading and scoring). The
last line prints the k=5 ratios against the targets: multi-head >= 0.9x one RM's samples/s and <= 1.1x its
parameter memory, LoRA ensemble >= 0.4x its samples/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward_plugins.config import parse_pipeline_config  # noqa: E402
from reward_plugins.member_info import MemberInfo  # noqa: E402
from reward_plugins.multihead import read_heads, save_heads  # noqa: E402
from reward_plugins.lora_ensemble import read_lora_index, save_lora_index  # noqa: E402
from reward_plugins.pipeline import build_plugin  # noqa: E402
from reward_plugins.tiny_models import build_lora_ensemble, build_multihead_rm, build_reward_model, build_tokenizer  # noqa: E402

from reward_throughput import make_samples  # noqa: E402  (bench/ is the script's folder)

SIZES = {  # backbone shapes (Llama layout); the tokenizer is tiny, so the parameters are the layers'
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
}
WORKLOAD = {"tiny": (128, 16), "100m": (8, 8), "1.5b": (64, 16)}  # default samples scored per round, batch size
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, without sparsity
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VARIANTS = ("one RM", "k separate RMs", "multi-head", "LoRA indexed", "LoRA peft_mixed")


def build_models(root: Path, size: str, k_max: int) -> dict[str, Path]:
    """One RM, a k_max-head RM and a k_max-adapter LoRA ensemble, all with random weights of the same shape."""
    shape = {**SIZES[size], "max_position_embeddings": 512}
    tokenizer = build_tokenizer(root / "tokenizer")
    layers = shape["num_hidden_layers"]
    return {
        "rm": build_reward_model(root / "rm", tokenizer, seed=1, **shape),
        "multihead": build_multihead_rm(root / "multihead", tokenizer, k=k_max, seed=1, **shape),
        "lora": build_lora_ensemble(root / "lora", tokenizer, k=k_max, seed=1, r=8, top_layers=max(1, layers // 4),
                                    target_modules=LORA_TARGETS, **shape),
    }


def first_members(models: dict[str, Path], k: int, root: Path) -> dict[str, Path]:
    """Folders holding the first k heads / adapters: the backbone files linked, the member record rewritten."""
    out = {}
    for kind in ("multihead", "lora"):
        folder = root / f"{kind}_k{k}"
        folder.mkdir(exist_ok=True)
        for item in models[kind].iterdir():
            if item.name not in ("heads.safetensors", "lora_ensemble.json") and not (folder / item.name).exists():
                (folder / item.name).symlink_to(item)
        if kind == "multihead":
            weight, info = read_heads(models[kind])
            save_heads(folder, weight[:k], MemberInfo(info.seeds[:k]))
        else:
            adapters, info = read_lora_index(models[kind])
            save_lora_index(folder, [str(a.relative_to(models[kind])) for a in adapters[:k]], MemberInfo(info.seeds[:k]))
        out[kind] = folder
    return out


def variant_config(variant: str, k: int, models: dict[str, Path], folders: dict[str, Path], text: dict) -> dict:
    """The reward YAML (as a dict) of one variant."""
    combiner = {"objective": "uwo", "uwo_weight": 0.1}
    if variant == "one RM":
        return {"type": "reward_model", "path": str(models["rm"]), **text}
    if variant == "k separate RMs":
        return {"type": "ensemble", "members": [{"path": str(models["rm"])}] * k, "member": text, **combiner}
    if variant == "multi-head":
        return {"type": "multihead_ensemble", "path": str(folders["multihead"]), "heads": k, **text, **combiner}
    forward = variant.split()[1]
    return {"type": "lora_ensemble", "path": str(folders["lora"]), "adapters": k, "forward": forward, **text, **combiner}


def parameter_bytes(plugin) -> int:
    """Bytes of every weight the plugin holds, each tensor once."""
    modules = [getattr(plugin, "scorer", None)] + [m for m in getattr(plugin, "members", [])]
    seen, total = set(), 0
    for holder in modules:
        model = getattr(holder, "model", None)
        if model is None:
            continue
        for tensor in [*model.parameters(), *model.buffers()]:
            key = (tensor.data_ptr(), tensor.numel())
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


def executed_flops(variant: str, k: int, one_rm, samples) -> float:
    """Forward FLOPs a variant runs on the samples: 2 x parameters x real tokens per backbone pass it makes
    (k passes for k models or peft's repeated batch; the adapted quarter of the layers k times for indexed LoRA)."""
    scorer = one_rm.scorer
    tokens = sum(len(ids) for ids in scorer.encode([scorer.format_sample(s) for s in samples])[0])
    parameters = sum(p.numel() for p in scorer.model.parameters())
    passes = {"one RM": 1, "k separate RMs": k, "multi-head": 1, "LoRA peft_mixed": k, "LoRA indexed": 1 + (k - 1) / 4}
    return 2 * parameters * tokens * passes[variant]


def timed_score(plugin, samples) -> float:
    start = time.perf_counter()
    plugin.score(samples)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def child_peak(config: dict, samples_count: int) -> float:
    """Peak resident MiB that building `config` and scoring the samples once adds to a fresh process."""
    payload = json.dumps({"config": config, "samples": samples_count})
    result = subprocess.run([sys.executable, __file__, "--child", payload], capture_output=True, text=True, check=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    return float(result.stdout.strip().splitlines()[-1])


def resident_mib() -> float:
    """This process's resident set now (Linux /proc)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_child(payload: str) -> None:
    """Load one variant and score the samples once while a thread samples the resident set every 2 ms; print the
    peak above the resident set before loading (imports excluded)."""
    import peft  # noqa: F401  (imports that loading would trigger are not the variant's memory)
    import transformers.models.llama.modeling_llama  # noqa: F401

    torch.set_num_threads(1)
    request = json.loads(payload)
    samples = make_samples(request["samples"])
    before, peak, done = resident_mib(), [0.0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], resident_mib())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    plugin = build_plugin(parse_pipeline_config({"reward": request["config"]}).reward)
    plugin.score(samples)
    done.set()
    watcher.join()
    print(max(peak[0], resident_mib()) - before)


def measure_size(size: str, ks: list[int], args: argparse.Namespace, root: Path) -> list[dict]:
    device = "cuda" if args.gpu else "cpu"
    count, batch_size = args.samples or WORKLOAD[size][0], args.batch_size or WORKLOAD[size][1]
    text = {"batch_size": batch_size, "max_length": 512, "device": device, "dtype": "bfloat16" if args.gpu else "float32"}
    start = time.perf_counter()
    models = build_models(root / size, size, max(ks))
    print(f"[{size}] models built in {time.perf_counter() - start:.0f} s", flush=True)
    samples = make_samples(count, seed=0)
    rows: list[dict] = []
    for k in ks:
        folders = first_members(models, k, root / size)
        configs = {v: variant_config(v, k, models, folders, text) for v in VARIANTS}
        plugins, params, peaks = {}, {}, {}
        for variant, config in configs.items():
            if args.gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            plugins[variant] = build_plugin(parse_pipeline_config({"reward": config}).reward)
            plugins[variant].score(samples[:batch_size])  # warm-up
            params[variant] = parameter_bytes(plugins[variant]) / 2**20
            if args.gpu:
                plugins[variant].score(samples)
                peaks[variant] = torch.cuda.max_memory_allocated() / 2**20
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for round_index in range(args.rounds):
            others = VARIANTS[1:] if round_index % 2 == 0 else tuple(reversed(VARIANTS[1:]))
            for variant in others:  # each variant right after one RM: the ratio of a pair sees the same load
                one = timed_score(plugins["one RM"], samples)
                seconds = timed_score(plugins[variant], samples)
                times["one RM"].append(one)
                times[variant].append(seconds)
                ratios[variant].append(one / seconds)
        ratios["one RM"] = [1.0]
        if args.peak and not args.gpu:
            peaks = {v: child_peak(configs[v], count) for v in VARIANTS}
        for variant in VARIANTS:
            seconds = statistics.median(times[variant])
            rows.append({"size": size, "k": k, "variant": variant, "samples_per_s": count / seconds,
                         "speed_ratio": statistics.median(ratios[variant]), "param_mib": params[variant],
                         "param_ratio": params[variant] / params["one RM"], "peak_mib": peaks.get(variant),
                         "tflops": None})
            if args.gpu:
                rows[-1]["tflops"] = executed_flops(variant, k, plugins["one RM"], samples) / seconds / 1e12
        del plugins
        gc.collect()
        print(f"[{size}] k={k} done", flush=True)
    return rows


def print_table(rows: list[dict], peak_tflops: float | None) -> None:
    header = f"{'size':>5} {'k':>2} {'variant':<16} {'samples/s':>10} {'vs one RM':>9} {'params MiB':>10} {'vs one':>7} {'peak MiB':>9}"
    if peak_tflops:
        header += f" {'of bf16 peak':>12}"
    print(header)
    for r in rows:
        peak = f"{r['peak_mib']:9.0f}" if r["peak_mib"] is not None else f"{'-':>9}"
        line = (f"{r['size']:>5} {r['k']:>2} {r['variant']:<16} {r['samples_per_s']:10.2f} {r['speed_ratio']:8.2f}x "
                f"{r['param_mib']:10.1f} {r['param_ratio']:6.2f}x {peak}")
        if peak_tflops:
            line += f" {100 * r['tflops'] / peak_tflops:11.1f}%"
        print(line)


def target_line(rows: list[dict]) -> str:
    """The k=5 ratios of the largest size measured, against the targets."""
    size = rows[-1]["size"]
    at5 = {r["variant"]: r for r in rows if r["size"] == size and r["k"] == 5}
    if not at5:
        return "k=5 not measured: no target ratios"
    head, lora = at5["multi-head"], max((at5["LoRA indexed"], at5["LoRA peft_mixed"]), key=lambda r: r["speed_ratio"])
    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    return (f"k=5 ({size}): multi-head {head['speed_ratio']:.2f}x one RM's samples/s (target >= 0.9, "
            f"{verdict(head['speed_ratio'] >= 0.9)}), {head['param_ratio']:.2f}x its parameter memory (target <= 1.1, "
            f"{verdict(head['param_ratio'] <= 1.1)}); LoRA ensemble ({lora['variant'].split()[1]}) "
            f"{lora['speed_ratio']:.2f}x one RM's samples/s (target >= 0.4, {verdict(lora['speed_ratio'] >= 0.4)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma list of tiny,100m,1.5b (default: tiny,100m; --gpu: 1.5b)")
    parser.add_argument("--ks", default="1,3,5,8")
    parser.add_argument("--samples", type=int, default=None, help="scored per round (default: tiny 128, 100m 8, 1.5b 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: tiny 16, 100m 8, 1.5b 16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peak", action=argparse.BooleanOptionalAction, default=True, help="measure peak memory")
    parser.add_argument("--gpu", action="store_true", help="score on the GPU in bf16 (default size 1.5b)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args.child)
    torch.set_num_threads(1)
    sizes = (args.sizes or ("1.5b" if args.gpu else "tiny,100m")).split(",")
    ks = [int(k) for k in args.ks.split(",")]
    peak_tflops = None
    if args.gpu:
        name = torch.cuda.get_device_name()
        peak_tflops = args.peak_tflops or next((v for key, v in BF16_PEAK_TFLOPS.items() if key in name), None)
        print(f"device: {name}, bf16 peak {peak_tflops} TFLOP/s")
    else:
        print(f"device: CPU, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores visible")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            rows += measure_size(size, ks, args, Path(tmp))
    print_table(rows, peak_tflops)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(target_line(rows))


if __name__ == "__main__":
    main()
