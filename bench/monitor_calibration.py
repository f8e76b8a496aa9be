"""Runs to calibrate and measure the over-optimisation monitor on the demo's synthetic task, then its table.

    python bench/monitor_calibration.py --out runs/mon [--steps 200] [--seeds 1 2 3] [--kinds overopt control adapt_kl]

Reuses the demo's stages for data, SFT, pairs and proxy RMs (`python -m trl_ext.demo`'s `data`, `sft`, `pairs`,
`rms`; finished ones are kept: give `--out` as the demo was given it), then trains PPO runs with the demo's
`monitor:` section (its thresholds; gold: the task's rule, at every eval):

- `overopt`: one proxy RM (seed s) at a small KL coefficient, watched by a shadow UWO ensemble of the 3 RMs;
- `control`: the UWO ensemble at a strong KL coefficient (its own members watched), whose gold should not fall;
- `adapt_kl`: the `overopt` run with `action: adapt_kl`, paired with it for the gold kept.

Finished runs are skipped. At the end it prints `evaluation.monitor_eval`'s table over every run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from evaluation import monitor_eval
from trl_ext import demo
from trl_ext.run_config import TrainConfig

GOLD = "setup_data.synthetic_task:gold_rewards"


def run_config(cfg: demo.DemoConfig, paths: demo.Paths, kind: str, seed: int, args) -> TrainConfig:
    """One calibration run: the demo's PPO run of its objective (one proxy RM watched by the demo's shadow ensemble,
    or the UWO ensemble watched by its own members) with this kind's steps, KL coefficient and action."""
    objective = "uwo" if kind == "control" else "single_rm"
    base = demo.rl_config(cfg, paths, objective, seed).model_dump()
    base["output_dir"] = str(paths.out / "monitor_runs" / kind / f"seed{seed}")
    base["eval_every"] = args.eval_every
    base["ppo"].update(max_steps=args.steps, kl_coef=args.kl_control if kind == "control" else args.kl,
                       logging_steps=1, save_steps=args.eval_every)
    base["monitor"].update(action="adapt_kl" if kind == "adapt_kl" else "warn", kl_factor=args.kl_factor,
                           gold={"function": GOLD})
    return TrainConfig.model_validate(base)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/mon")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--kl", type=float, default=0.002, help="KL coefficient of the over-optimising runs")
    parser.add_argument("--kl-control", type=float, default=0.1, help="KL coefficient of the control runs")
    parser.add_argument("--kl-factor", type=float, default=10.0, help="adapt_kl's multiplier")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--kinds", nargs="+", default=["overopt", "control", "adapt_kl"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a demo setting (DemoConfig)")
    return parser


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = demo.load_config(demo.DemoConfig, None, [f"out={args.out}", f"workers={args.workers}", *args.set])
    demo.seed_everything(cfg)
    paths = demo.Paths(cfg.out)
    for stage in (demo.stage_data, demo.stage_sft, demo.stage_pairs, demo.stage_rms):
        stage(cfg, paths)
    configs = [run_config(cfg, paths, kind, seed, args) for kind in args.kinds for seed in args.seeds]
    demo.run_side_by_side(demo.train_rl_run, [(c,) for c in configs], cfg, "monitor runs")
    runs = [Path(c.output_dir) for c in configs]
    pairs = [f"{paths.out / 'monitor_runs' / 'adapt_kl' / f'seed{s}'}={paths.out / 'monitor_runs' / 'overopt' / f'seed{s}'}"
             for s in args.seeds if "adapt_kl" in args.kinds and "overopt" in args.kinds]
    argv_eval = [str(r) for r in runs if "adapt_kl" not in r.parts] + [arg for p in pairs for arg in ("--pair", p)]
    table = monitor_eval.main(argv_eval)
    return table


if __name__ == "__main__":
    main()
