"""Samples per second of a 5-member UWO ensemble placed on 1, 2 and 5 Ray replicas, and one replica per member.

    python bench/placement_throughput.py [--samples 256] [--hidden 64] [--layers 2] [--rounds 3] [--cpus 2]
    python bench/placement_throughput.py --gpu [--hidden 1024 --layers 8 --samples 1024]   # on a GPU machine

Every setup is built once on a local Ray cluster, then timed in interleaved rounds (one `score` of the same
batch per setup per round) next to the unplaced ensemble in this process; the median round is reported with
its ratio to one replica. Each replica runs torch with one thread, so on a CPU the ceiling is the number of
free cores: on 2 shared cores expect at most about 2x, whatever the replica count. `--gpu` gives each
replica a fraction of the one GPU instead (random-weight models of the given size).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from openrlhf_ext.placement import RayPlacer
from reward_plugins.config import parse_pipeline_config
from reward_plugins.pipeline import build_pipeline
from reward_plugins.tiny_models import build_reward_model, build_tokenizer

from reward_throughput import make_samples  # noqa: E402  (bench/ is the script's folder)


def ensemble_reward(root: Path, batch_size: int, device: str, **placement_fields) -> dict:
    return {
        "type": "ensemble", "name": "uwo", "objective": "uwo", "uwo_weight": 0.1,
        "path_template": str(root / "rm{seed}"), "seeds": [1, 2, 3, 4, 5],
        "member": {"batch_size": batch_size, "device": device, **placement_fields.get("member", {})},
        **({"placement": placement_fields["placement"]} if "placement" in placement_fields else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=float, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--gpu", action="store_true", help="replicas share the one GPU (fractions) instead of CPUs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = "cuda" if args.gpu else "cpu"
    sizes = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers)
    env = {"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, runtime_env=env)
    placer = RayPlacer()

    def placement(replicas: int) -> dict:
        # Small logical shares, so all 13 actors stay up together; one setup runs at a time.
        return {"num_gpus": 0.05 if args.gpu else 0, "num_cpus": 0.1, "replicas": replicas, "max_restarts": 0}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = build_tokenizer(root / "tok")
        for seed in range(1, 6):
            build_reward_model(root / f"rm{seed}", tokenizer, seed=seed, **sizes)
        setups = {"unplaced (this process)": ensemble_reward(root, args.batch_size, device)}
        for replicas in (1, 2, 5):
            setups[f"placed, {replicas} replica(s) x 5 RMs"] = ensemble_reward(
                root, args.batch_size, device, placement=placement(replicas)
            )
        setups["placed, 1 replica per member (5)"] = ensemble_reward(root, args.batch_size, device, member={"placement": placement(1)})
        pipelines = {}
        for name, reward in setups.items():
            started = time.perf_counter()
            pipelines[name] = build_pipeline(parse_pipeline_config({"reward": reward}), placer)
            print(f"built {name} in {time.perf_counter() - started:.1f} s", flush=True)

        samples = make_samples(args.samples)
        reference = None
        for pipeline in pipelines.values():
            rewards = pipeline.score(samples[:8]).rewards  # warm-up, and every setup gives the same rewards
            reference = reference or rewards
            assert all(abs(a - b) < 1e-4 for a, b in zip(rewards, reference)), "setups disagree"
        times: dict[str, list[float]] = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, pipeline in pipelines.items():
                started = time.perf_counter()
                pipeline.score(samples)
                times[name].append(time.perf_counter() - started)
        placer.close()
    ray.shutdown()

    where = "1 GPU (fractions per replica)" if args.gpu else f"CPU only, Ray cluster of {args.cpus:g} CPUs, torch 1 thread per replica"
    print(f"\n{args.samples} samples, 5 Llama RMs hidden={args.hidden} layers={args.layers}, batch_size={args.batch_size}, "
          f"{where}, median of {args.rounds} interleaved rounds, machine cores: {os.cpu_count()}")
    base = statistics.median(times["placed, 1 replica(s) x 5 RMs"])
    print(f"{'setup':<36}{'samples/s':>12}{'vs 1 replica':>14}")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"{name:<36}{args.samples / seconds:>12.1f}{base / seconds:>13.2f}x")


if __name__ == "__main__":
    main()
