"""VR-CLI that learns on a CPU in minutes: `python -m trl_ext.demo_vrcli` (also a stage of `make demo`).

A synthetic next-chapter task where a plan really helps a tiny frozen reference LM:
- every story names a clue; a hidden map of this world sends each clue to the thing the hero finds in the
  next chapter ("story : bob walks to the lake . clue : red ." -> "bob finds the crow .");
- one tiny LM is trained on three kinds of text: the policy's prompt answered by "In summary: <a thing>",
  the no-plan scoring input followed by a chapter, and the with-plan scoring input followed by a chapter that
  finds a thing the plan names. Clues and things are drawn independently, so it learns the formats and to use
  the plan's things, never the hidden map. It is both the initial policy and, frozen, the VR-CLI reference
  (as in the paper), so a plan naming the right thing lowers the gold chapter's perplexity and a wrong one
  raises it;
- the baselines come from `setup_data/compute_baseline_perplexity.py` (fingerprinted), and GRPO through TRL
  (`trl_ext.train`) with the `vrcli` reward learns the map. The held-out curve (mean improvement, share of
  plans that improved, reward on unseen stories) is written as `curve.csv` / `curve.png` and a summary row.
"""

from __future__ import annotations

import argparse
import csv
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reward_plugins.cli import help_first


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trl_ext.demo_vrcli", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/vrcli")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a size, e.g. grpo_steps=20")
    return parser


if __name__ == "__main__":
    help_first(build_parser)

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from evaluation.eval_files import list_eval_files, read_eval_file
from reward_plugins import tiny_models
from reward_plugins.batching import right_pad
from reward_plugins.io import write_json, write_jsonl
from reward_plugins.vrcli import VRCLIPrompt

CLUES = ("red", "blue", "green", "gold", "north", "south", "east", "west")
THINGS = ("apple", "river", "sword", "lamp", "crow", "bell", "rope", "coin")
NAMES = ("bob", "ann", "tom", "eve", "sam", "kim", "joe", "amy")
PLACES = ("lake", "hill", "town", "cave", "farm", "wood", "port", "mill")
SCORING = VRCLIPrompt(system=None, plan_token_reserve=16)  # the reward's prompt settings (append layout)


class VRCLIDemoConfig(BaseModel):
    """Sizes of the stage; the defaults take about two minutes on 2 busy CPU cores (LM ~50 s, GRPO ~50 s)."""

    model_config = ConfigDict(extra="forbid")

    out: str = "runs/demo/vrcli"
    seed: int = 0
    threads: int = Field(default=1, gt=0)
    n_lm: int = 3000
    lm_steps: int = 500
    lm_batch: int = 64
    lm_lr: float = 4e-3
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    n_rl: int = 256
    n_eval: int = 32
    grpo_steps: int = 80
    grpo_batch: int = 64
    grpo_generations: int = 8
    grpo_lr: float = 1.5e-3
    grpo_beta: float = 0.04
    reward_threshold: float = 10.0  # percent; see reward_yaml
    max_new_tokens: int = 6
    eval_every: int = 10


def hidden_map(seed: int) -> dict[str, str]:
    """This world's clue -> thing map (what the policy has to discover)."""
    things = list(THINGS)
    random.Random(seed).shuffle(things)
    return dict(zip(CLUES, things))


def context_text(name: str, place: str, clue: str) -> str:
    return f"story : {name} walks to the {place} . clue : {clue} ."


def gold_text(name: str, thing: str) -> str:
    return f"{name} finds the {thing} ."


def policy_user_turn(context: str, name: str) -> str:
    return f"{context} what will {name} find next ? plan it ."


def corpus() -> list[str]:
    """Every word and format the task uses, for the tokenizer."""
    lines = [context_text(n, p, c) + " " + gold_text(n, t) for n in NAMES for p in PLACES for c, t in zip(CLUES, THINGS)]
    lines += [policy_user_turn("x", n) + " In summary: " + t for n, t in zip(NAMES, THINGS)]
    lines += ["### Detailed Plan for the Next Chapter ###", "In summary: " + " ".join(THINGS)]
    return lines * 4


def stories(rng: random.Random, n: int, world: dict[str, str]) -> list[dict[str, Any]]:
    """Prompt rows: the policy prompt (chat-rendered later) and the label the reward reads."""
    rows = []
    for _ in range(n):
        name, place, clue = rng.choice(NAMES), rng.choice(PLACES), rng.choice(CLUES)
        context = context_text(name, place, clue)
        rows.append({"user": policy_user_turn(context, name),
                     "label": {"context": context, "gold": gold_text(name, world[clue]), "system": None}})
    return rows


def lm_examples(tokenizer, rng: random.Random, n: int) -> list[list[int]]:
    """Token ids of the three kinds of text the tiny LM learns (clue and thing drawn independently)."""
    eos = tokenizer.eos_token_id
    out = []
    for i in range(n):
        name, place, clue, thing = rng.choice(NAMES), rng.choice(PLACES), rng.choice(CLUES), rng.choice(THINGS)
        context = context_text(name, place, clue)
        label = {"context": context, "gold": gold_text(name, thing)}
        kind = (0, 1, 2, 2)[i % 4]
        if kind == 0:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": policy_user_turn(context, name)}],
                                                   add_generation_prompt=True, tokenize=False)
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids += tokenizer(f"In summary: {rng.choice(THINGS)}", add_special_tokens=False)["input_ids"]
        else:
            plan = None
            if kind == 2:  # a plan naming the chapter's thing (or, one time in five, a wrong one: plans can err)
                named = [thing, *rng.sample([t for t in THINGS if t != thing], rng.choice((0, 0, 1)))]
                if rng.random() < 0.2:
                    named = rng.sample([t for t in THINGS if t != thing], len(named))
                rng.shuffle(named)
                plan = " ".join(named)
            scored = SCORING.scored_input(tokenizer, label, plan)
            ids = scored.context + scored.gold
        out.append(ids + [eos])
    return out


def train_lm(path: Path, tokenizer_dir: Path, cfg: VRCLIDemoConfig) -> None:
    """The tiny LM: random init, then next-token training on `lm_examples` (AdamW, cosine schedule)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = path.with_name(path.name + "_init")
    tiny_models.build_causal_lm(base, tokenizer_dir, seed=cfg.seed, hidden_size=cfg.hidden_size,
                                intermediate_size=2 * cfg.hidden_size, max_position_embeddings=128,
                                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                num_key_value_heads=cfg.heads // 2)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).train()
    examples = lm_examples(tokenizer, random.Random(cfg.seed + 1), cfg.n_lm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lm_lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, cfg.lm_steps // 20), cfg.lm_steps)
    rng = np.random.default_rng(cfg.seed)
    for _ in range(cfg.lm_steps):
        batch = [examples[i] for i in rng.choice(len(examples), cfg.lm_batch, replace=False)]
        ids, mask = right_pad(batch, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(path)
    tokenizer.save_pretrained(path)


def reward_yaml(path: Path, ref: Path, threshold: float) -> Path:
    """The stage's reward file: VR-CLI on the tiny reference, append layout, no system turn.

    Shaping is `binary` at `threshold` percent instead of the paper's steps at 0.05 / 1 / 2 percent: on a
    six-token chapter an uninformative plan moves the perplexity by a few percent either way, and the paper's
    0.05 % step pays such noise half the time, which a tiny policy learns to farm (it stops planning).
    """
    path.write_text(f"""# written by trl_ext.demo_vrcli
on_error: penalty
error_penalty: 0.0
reward:
  type: vrcli
  name: vrcli
  fingerprint: require
  scorer: {{backend: hf, model: "{ref}", device: cpu, batch_size: 64, max_length: 128, temperature: 1.0}}
  prompt: {{layout: append, system: null, chat_template: true, plan_token_reserve: {SCORING.plan_token_reserve}}}
  plan: {{whole_response_fallback: true}}
  shaping: {{scheme: binary, binary_threshold: {threshold}}}
""")
    return path


def write_prompts(data_dir: Path, tokenizer_dir: Path, cfg: VRCLIDemoConfig) -> None:
    """`train.jsonl` and `val.jsonl` in setup_rl_data's layout (prompt rendered with the chat template)."""
    from transformers import AutoTokenizer

    from setup_data.validation import stable_id

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    world, rng = hidden_map(cfg.seed), random.Random(cfg.seed + 2)
    for split, n in (("train", cfg.n_rl), ("val", cfg.n_eval)):
        rows = []
        for i, row in enumerate(stories(rng, n, world)):
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["user"]}],
                                                   add_generation_prompt=True, tokenize=False)
            label = {"id": stable_id([split, i, row["label"]]), **row["label"]}
            rows.append({"prompt": prompt, "label": label})
        write_jsonl(data_dir / f"{split}.jsonl", rows)


def curve(eval_dir: Path) -> list[dict[str, float]]:
    """Held-out metrics at every eval step."""
    points = []
    for path in list_eval_files(eval_dir):
        eval_file = read_eval_file(path)  # the eval callback stored the VR-CLI metrics with each file
        points.append({"step": eval_file.step, **eval_file.meta["metrics"], "kl": float(eval_file.kl or 0.0)})
    return points


def plot(points: list[dict[str, float]], out: Path) -> None:
    """`curve.csv` and `curve.png`: held-out improvement and improved share against the GRPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(out / "curve.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(points[0]))
        writer.writeheader()
        writer.writerows(points)
    steps = [p["step"] for p in points]
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(steps, [p["vrcli_improvement"] for p in points], marker="o", color="tab:blue")
    left.set_xlabel("GRPO step")
    left.set_ylabel("mean improvement (%)", color="tab:blue")
    right = left.twinx()
    right.plot(steps, [p["vrcli_improved_share"] for p in points], marker="s", color="tab:orange")
    right.set_ylabel("share of plans that improved", color="tab:orange")
    right.set_ylim(0, 1)
    left.set_title("VR-CLI on held-out stories (tiny frozen reference, CPU)")
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=100)
    plt.close(fig)


def summary_rows(points: list[dict[str, float]]) -> str:
    """The markdown section: improvement, improved share and reward at the first and last evaluation."""
    a, b = points[0], points[-1]
    return ("## VR-CLI (synthetic next-chapter task; held-out stories, tiny frozen reference LM)\n\n"
            "| run | steps | improvement % first -> last | improved share first -> last | reward first -> last |\n"
            "|---|---|---|---|---|\n"
            f"| grpo_vrcli | {b['step']} | {a['vrcli_improvement']:.1f} -> {b['vrcli_improvement']:.1f} | "
            f"{a['vrcli_improved_share']:.2f} -> {b['vrcli_improved_share']:.2f} | "
            f"{a['vrcli_reward']:.2f} -> {b['vrcli_reward']:.2f} |\n")


def run_stage(cfg: VRCLIDemoConfig) -> str:
    """Every step, each skipped when its output exists; returns the markdown summary section."""
    from setup_data import compute_baseline_perplexity as cbp

    from . import train as train_mod
    from .run_config import TrainConfig

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    models, data = out / "models", out / "data"
    tokenizer_dir, ref = models / "tokenizer", models / "ref_lm"
    if not (tokenizer_dir / "tokenizer.json").exists():
        tiny_models.build_tokenizer(tokenizer_dir, corpus(), vocab_size=640)
    if not (ref / "model.safetensors").exists():
        train_lm(ref, tokenizer_dir, cfg)
    reward = reward_yaml(out / "reward.yaml", ref.resolve(), cfg.reward_threshold)
    scored = data.with_name(data.name + "_with_baseline")
    if not (scored / "val.jsonl").exists():
        write_prompts(data, tokenizer_dir, cfg)
        cbp.run(cbp.parse_args(["--model_name", str(ref), "--nice_model_name", "demo_ref", "--data_dir", str(data),
                                "--splits", "train", "val", "--reward_config", str(reward), "--quiet"]))
    run_dir = out / "grpo"
    if not (run_dir / "final" / "model.safetensors").exists():
        train_mod.run(TrainConfig(
            algorithm="grpo", policy=str(ref), reward_config=str(reward), train_data=str(scored / "train.jsonl"),
            eval_data=str(scored / "val.jsonl"), output_dir=str(run_dir), eval_every=cfg.eval_every,
            table_every=cfg.eval_every, seed=cfg.seed, torch_threads=cfg.threads,
            trl={"max_steps": cfg.grpo_steps, "per_device_train_batch_size": cfg.grpo_batch,
                 "num_generations": cfg.grpo_generations, "max_completion_length": cfg.max_new_tokens,
                 "learning_rate": cfg.grpo_lr, "beta": cfg.grpo_beta, "loss_type": "grpo", "logging_steps": 5,
                 "save_steps": cfg.grpo_steps, "save_only_model": True, "disable_tqdm": True},
        ))
    points = curve(run_dir / "eval")
    plot(points, out)
    section = summary_rows(points)
    write_json(out / "summary.json", {"points": points, "map": hidden_map(cfg.seed)})
    (out / "summary.md").write_text(section)
    return section


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .config import load_config

    cfg = load_config(VRCLIDemoConfig, None, [f"out={args.out}", *args.set])
    start = time.perf_counter()
    print(run_stage(cfg))
    print(f"VR-CLI stage finished in {time.perf_counter() - start:.0f} s; curve in {cfg.out}/curve.png")


if __name__ == "__main__":
    main()
