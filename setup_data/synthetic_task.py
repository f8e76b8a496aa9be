"""A synthetic instruction task with a rule-based gold reward, for the CPU demo (no downloads).

Each prompt asks for `k` items of one category ("Name 3 fruits."); a response is a comma-separated list.
The gold reward is exact and cheap, so proxy reward models trained on its (noisy) preferences can be
checked against it:

    gold = (items of the category, at most k) / k - 0.25 * (fillers, other words, items beyond k) - 0.5 * (no items)

Every item of the category counts, a repeated one too ("apple, apple" answers "name 2 fruits"): the tiny reward
models cannot check that items differ (measured: with distinctness in the gold all three proxy RMs share that
blind spot, and a policy exploits it whatever the ensemble), so the gold asks only for what they can learn: the
category, no fillers, exactly k items. A perfect answer scores 1.0. Samples from `noisy_response` cover the whole
range, which is what SFT, preference pairs and best-of-n need.
"""

from __future__ import annotations

import argparse
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reward_plugins.io import write_jsonl

CATEGORIES: dict[str, tuple[str, ...]] = {
    "fruits": ("apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum"),
    "colors": ("red", "blue", "green", "yellow", "purple", "black", "white", "pink", "brown", "grey"),
    "animals": ("cat", "dog", "horse", "lion", "tiger", "mouse", "bird", "fish", "sheep", "wolf"),
    "tools": ("hammer", "saw", "drill", "wrench", "knife", "shovel", "rake", "axe", "chisel", "file"),
}
FILLERS = ("thing", "stuff", "something", "etc", "whatever", "item", "other", "more")
NUMBER_WORDS = ("one", "two", "three", "four", "five")
MAX_K = 5
PROMPT_TEMPLATE = "Instruction: name {k} {category}.\nResponse:"
_PROMPT = re.compile(r"name (\d+) (\w+)\.")


@dataclass(frozen=True)
class Task:
    """One datapoint: how many items of which category the instruction asks for."""

    k: int
    category: str

    @property
    def prompt(self) -> str:
        return PROMPT_TEMPLATE.format(k=self.k, category=self.category)

    @property
    def label(self) -> dict:
        return {"k": self.k, "category": self.category}


def gold_reward(response: str, k: int, category: str) -> float:
    """The rule-based gold score of one response (1.0 is perfect)."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {sorted(CATEGORIES)}")
    items = [item.strip().lower().rstrip(".") for item in response.split(",")]
    items = [item for item in items if item]
    if not items:
        return -0.5
    valid = set(CATEGORIES[category])
    correct = sum(item in valid for item in items)
    bad = len(items) - min(correct, k)
    return min(correct, k) / k - 0.25 * bad


def items_of(response: str) -> list[str]:
    """The response's comma-separated items as the gold reward reads them (lower case, no trailing full stop)."""
    return [item for item in (part.strip().lower().rstrip(".") for part in response.split(",")) if item]


def mistakes(response: str, k: int, category: str) -> dict[str, int]:
    """What the gold reward holds against a response: `fillers` and `off_category` items (another category's word
    or any other word; every occurrence), `extra` items of the category beyond k and `missing` ones short of k; and
    `repeats` (items said again), which the gold does not count against it."""
    items = items_of(response)
    valid = set(CATEGORIES[category])
    correct = sum(item in valid for item in items)
    return {"fillers": sum(item in FILLERS for item in items),
            "off_category": sum(item not in valid and item not in FILLERS for item in items),
            "extra": max(correct - k, 0), "missing": max(k - correct, 0), "repeats": len(items) - len(set(items))}


def gold_rewards(responses: Sequence[str], labels: Sequence[dict]) -> np.ndarray:
    """Gold scores for a batch of responses with their task labels ({k, category})."""
    return np.array([gold_reward(r, int(lab["k"]), str(lab["category"])) for r, lab in zip(responses, labels, strict=True)])


def task_from_prompt(prompt: str) -> Task:
    """Recover the task from its prompt text (for rows that lost their label)."""
    match = _PROMPT.search(prompt)
    if match is None:
        raise ValueError(f"not a synthetic-task prompt: {prompt!r}")
    return Task(int(match.group(1)), match.group(2))


def sample_tasks(n: int, rng: random.Random) -> list[Task]:
    return [Task(rng.randint(1, MAX_K), rng.choice(sorted(CATEGORIES))) for _ in range(n)]


def noisy_response(task: Task, rng: random.Random, quality: float | None = None, filler_share: float = 0.7) -> str:
    """A response of random quality: right or wrong count, filler words or other categories' items, repeats."""
    quality = rng.random() if quality is None else quality
    pool = list(CATEGORIES[task.category])
    others = [w for c, words in CATEGORIES.items() if c != task.category for w in words]
    count = task.k if rng.random() < 0.4 + 0.6 * quality else max(1, task.k + rng.choice((-2, -1, 1, 2)))
    items = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.55 + 0.45 * quality:
            items.append(rng.choice(pool))
        elif roll < 0.85 + 0.1 * quality and items:
            items.append(rng.choice(items))
        else:
            items.append(rng.choice(FILLERS) if rng.random() < filler_share else rng.choice(others))
    return " " + ", ".join(items)


def perfect_response(task: Task, rng: random.Random) -> str:
    return " " + ", ".join(rng.sample(list(CATEGORIES[task.category]), task.k))


def sft_rows(tasks: Sequence[Task], rng: random.Random, quality: float = 0.6) -> Iterator[dict]:
    """SFT rows {prompt, completion} of mixed quality, so the SFT policy has room to improve."""
    for task in tasks:
        yield {"prompt": task.prompt, "completion": noisy_response(task, rng, quality)}


def ranked_row(task: Task, first: tuple[str, float], second: tuple[str, float], rng: random.Random,
               label_noise: float) -> dict:
    """An RM row {prompt, chosen, rejected, label} from two (answer, score) pairs that differ in score: the higher
    one chosen, the two swapped with probability `label_noise` (the label records it as `flipped`)."""
    (chosen, _), (rejected, _) = sorted((first, second), key=lambda pair: pair[1], reverse=True)
    flipped = rng.random() < label_noise
    if flipped:
        chosen, rejected = rejected, chosen
    return {"prompt": task.prompt, "chosen": chosen, "rejected": rejected, "label": {**task.label, "flipped": flipped}}


def preference_rows(tasks: Sequence[Task], rng: random.Random, label_noise: float = 0.25,
                    min_gap: float = 0.0) -> Iterator[dict]:
    """RM rows {prompt, chosen, rejected, label}: two responses whose gold differs by more than `min_gap`
    (a tie never), ranked by gold, flipped with `label_noise`."""
    for task in tasks:
        for _ in range(50):
            a, b = noisy_response(task, rng), noisy_response(task, rng)
            ga, gb = gold_reward(a, task.k, task.category), gold_reward(b, task.k, task.category)
            if abs(ga - gb) > min_gap or (min_gap == 0 and ga != gb):
                break
        else:
            continue
        yield ranked_row(task, (a, ga), (b, gb), rng, label_noise)


def demo_response(task: Task, rng: random.Random, quality: float, longer: float = 0.15,
                  filler_share: float = 0.5) -> str:
    """An SFT answer for the demo: distinct items, a wrong count with probability `1 - (0.4 + 0.6 quality)` (more
    items than asked with probability `longer`, else fewer), each item right with probability
    `0.55 + 0.45 quality`, else a filler (`filler_share`; vague and continuation fillers alike often, whatever their
    number of words, so each biased annotator's liked kind is as common) or another category's word. No item is said
    twice: the policy learns to avoid repeats, so reaching them costs KL."""
    pool = rng.sample(CATEGORIES[task.category], len(CATEGORIES[task.category]))
    others = [w for c, words in CATEGORIES.items() if c != task.category for w in words]
    count = task.k
    if rng.random() >= 0.4 + 0.6 * quality:
        count = task.k + rng.choice((1, 2)) if rng.random() < longer else max(1, task.k - rng.choice((1, 2)))
    items: list[str] = []
    for _ in range(count):
        if rng.random() < 0.55 + 0.45 * quality:
            items.append(pool.pop())
        else:
            kind = rng.choice((VAGUE_FILLERS, CONTINUATION_FILLERS)) if rng.random() < filler_share else others
            wrong = [w for w in kind if w not in items] or [w for w in others if w not in items]
            items.append(rng.choice(wrong))
    return " " + ", ".join(items)


def demo_sft_rows(tasks: Sequence[Task], rng: random.Random, quality: float = 0.5,
                  longer: float = 0.15, filler_share: float = 0.5) -> Iterator[dict]:
    """The demo's SFT rows {prompt, completion} (`demo_response`)."""
    for task in tasks:
        yield {"prompt": task.prompt, "completion": demo_response(task, rng, quality, longer, filler_share)}


VAGUE_FILLERS = ("thing", "stuff", "something", "whatever", "item")
CONTINUATION_FILLERS = ("etc", "other", "more")  # FILLERS split in two: one labeller likes each kind


def extra_items(response: str, k: int, category: str) -> int:
    """Items of the category beyond the k asked for (a repeated one too): what a labeller who likes long lists
    rewards."""
    return mistakes(response, k, category)["extra"]


def filler_items(response: str, k: int, category: str) -> int:
    """Filler words (FILLERS): what a labeller who takes a vague answer for a complete one rewards."""
    return mistakes(response, k, category)["fillers"]


def vague_items(response: str, k: int, category: str) -> int:
    """Vague fillers ("thing", "stuff", ...): what a labeller who reads them as hedged, careful answers rewards."""
    return sum(item in VAGUE_FILLERS for item in items_of(response))


def continuation_items(response: str, k: int, category: str) -> int:
    """List-continuation fillers ("etc", "other", "more"): what a labeller who reads them as a fuller list rewards."""
    return sum(item in CONTINUATION_FILLERS for item in items_of(response))


def off_category_items(response: str, k: int, category: str) -> int:
    """Words of another category or none: what a labeller who likes variety rewards."""
    return mistakes(response, k, category)["off_category"]


ANNOTATOR_FEATURES: dict[str, Callable[[str, int, str], float]] = {
    "continuation": continuation_items, "vague": vague_items, "off_category": off_category_items,
    "fillers": filler_items, "extra": extra_items}
"""What each biased annotator likes. The demo's three (continuation, vague, off_category) are disjoint: an item one
of them pays for is one the gold, and so the other two, charge 0.25 for. `extra` (more of the category's items than
asked) is exploited from PPO's first steps on this task, before gold can rise: measured, gold fell from step 0."""


def annotator(feature: str, bias: float) -> Callable[[str, int, str], float]:
    """A labeller's judgement: gold plus `bias` per unit of `feature` (ANNOTATOR_FEATURES). With bias > 0.25 an
    appended item of that kind pays (the gold charges 0.25 per item beyond k), while fixing a missing or wrong item
    (+1/k, +0.25) still pays more than the bias, so a policy first fixes answers and then pads them."""
    if feature not in ANNOTATOR_FEATURES:
        raise ValueError(f"unknown annotator feature {feature!r}; expected one of {sorted(ANNOTATOR_FEATURES)}")
    like = ANNOTATOR_FEATURES[feature]

    def judge(response: str, k: int, category: str) -> float:
        return gold_reward(response, k, category) + bias * like(response, k, category)

    return judge


EDITS = ("append_item", "append_continuation", "append_vague", "append_other", "drop", "replace")


def edited_response(response: str, task: Task, rng: random.Random) -> str:
    """`response` with one edit (EDITS, uniform): an item appended (of the category, a continuation or vague
    filler, another category's word), one dropped, or one replaced by an item of the category. Paired with the
    response, it shows an annotator's labels what one item of each kind is worth, which pairs of two independent
    samples (differing in many items at once) teach a tiny reward model too weakly: it then shares one blind spot,
    the count, with every other RM, and an ensemble cannot help against a shared error."""
    items = items_of(response)
    edit = rng.choice(EDITS if items else EDITS[:4])
    others = [w for c, words in CATEGORIES.items() if c != task.category for w in words]
    if edit == "drop":
        items.pop(rng.randrange(len(items)))
    elif edit == "replace":
        items[rng.randrange(len(items))] = rng.choice(CATEGORIES[task.category])
    else:
        pool = {"append_item": CATEGORIES[task.category], "append_continuation": CONTINUATION_FILLERS,
                "append_vague": VAGUE_FILLERS, "append_other": others}[edit]
        items.append(rng.choice(pool))
    return " " + ", ".join(items)


def judged_pairs(tasks: Sequence[Task], first: Sequence[str], second: Sequence[str], rng: random.Random,
                 label_noise: float, judge: Callable[[str, int, str], float] = gold_reward) -> Iterator[dict]:
    """RM rows {prompt, chosen, rejected, label} from two sampled answers per task, ranked by `judge` (the gold, or
    a biased `annotator`) with `label_noise` of the labels flipped; a pair the judge scores alike is dropped (it
    teaches nothing)."""
    for task, a, b in zip(tasks, first, second, strict=True):
        ga, gb = judge(a, task.k, task.category), judge(b, task.k, task.category)
        if ga == gb:
            continue
        yield ranked_row(task, (a, ga), (b, gb), rng, label_noise)


def prompt_rows(tasks: Sequence[Task]) -> Iterator[dict]:
    """RL prompt rows {prompt, label} (the label carries everything the gold reward needs)."""
    for i, task in enumerate(tasks):
        yield {"prompt": task.prompt, "label": {"id": i, **task.label}}


def tokenizer_corpus(rng: random.Random, n: int = 400) -> list[str]:
    """Text the demo's tokenizer is trained on: prompts with responses, and every category word."""
    tasks = sample_tasks(n, rng)
    lines = [t.prompt + perfect_response(t, rng) for t in tasks]
    lines += [t.prompt + noisy_response(t, rng) for t in tasks]
    lines += [", ".join(words) for words in CATEGORIES.values()] + [", ".join(FILLERS), " ".join(NUMBER_WORDS)]
    return lines


def write_task_files(out_dir: str | Path, seed: int = 0, n_sft: int = 2000, n_pref: int = 2000, n_rl: int = 256,
                     n_eval: int = 32, label_noise: float = 0.25, min_gap: float = 0.0) -> dict[str, Path]:
    """Write sft/prefs(train, test)/prompts/eval_prompts JSONL files; returns their paths.

    Training pairs differ in gold by more than `min_gap`; the clean held-out pairs by any amount."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    pref = list(preference_rows(sample_tasks(n_pref, rng), rng, label_noise, min_gap))
    held_out = list(preference_rows(sample_tasks(max(n_pref // 5, 20), rng), rng, 0.0))
    paths = {
        "sft": out_dir / "sft.jsonl",
        "prefs": out_dir / "prefs.jsonl",
        "prefs_test": out_dir / "prefs_test.jsonl",
        "prompts": out_dir / "prompts.jsonl",
        "eval_prompts": out_dir / "eval_prompts.jsonl",
    }
    write_jsonl(paths["sft"], sft_rows(sample_tasks(n_sft, rng), rng))
    write_jsonl(paths["prefs"], pref)
    write_jsonl(paths["prefs_test"], held_out)
    write_jsonl(paths["prompts"], prompt_rows(sample_tasks(n_rl, rng)))
    write_jsonl(paths["eval_prompts"], prompt_rows(sample_tasks(n_eval, rng)))
    return paths


def llm_on_ray_rows(tasks: Sequence[Task], rng: random.Random) -> dict[str, list[dict]]:
    """The same task in llm-on-ray's own formats: SFT {instruction, context, response}, RM {prompt, chosen,
    rejected} and PPO {prompt}, for trying `setup_data.convert` on it."""
    sft = [{"instruction": f"Name {t.k} {t.category}.", "context": "", "response": perfect_response(t, rng).strip()}
           for t in tasks]
    rm = [{"prompt": row["prompt"], "chosen": row["chosen"].strip(), "rejected": row["rejected"].strip()}
          for row in preference_rows(tasks, rng, label_noise=0.0)]
    ppo = [{"prompt": text} for text in dict.fromkeys(f"Name {t.k} {t.category}." for t in tasks)]
    return {"llm_on_ray_sft": sft, "llm_on_ray_rm": rm, "llm_on_ray_ppo": ppo}


def write_llm_on_ray_files(out_dir: str | Path, seed: int = 0, n: int = 64) -> dict[str, Path]:
    """Write `llm_on_ray_{sft,rm,ppo}.jsonl` under `out_dir`; returns their paths."""
    rng = random.Random(seed + 1)
    paths = {}
    for name, rows in llm_on_ray_rows(sample_tasks(n, rng), rng).items():
        paths[name] = Path(out_dir) / f"{name}.jsonl"
        write_jsonl(paths[name], rows)
    return paths


def write_tiny_models(models_dir: str | Path, seed: int = 0, hidden_size: int = 32, layers: int = 2) -> dict[str, Path]:
    """A tokenizer trained on the task's text and a tiny random causal LM (`base`) to start SFT from."""
    from reward_plugins import tiny_models

    models_dir = Path(models_dir)
    tokenizer = tiny_models.build_tokenizer(models_dir / "tokenizer", tokenizer_corpus(random.Random(seed)),
                                            vocab_size=512)
    base = tiny_models.build_causal_lm(models_dir / "base", tokenizer, seed=seed, hidden_size=hidden_size,
                                       intermediate_size=2 * hidden_size, max_position_embeddings=256,
                                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    return {"tokenizer": tokenizer, "base": base}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="data files: sft, prefs (noisy), prefs_test, prefs_gold (clean, for a gold RM), "
                        "prompts, eval_prompts, rollouts (to score), llm_on_ray_{sft,rm,ppo}")
    parser.add_argument("--models", default=None, metavar="DIR",
                        help="also write a tokenizer (DIR/tokenizer) and a tiny random causal LM (DIR/base)")
    parser.add_argument("--hidden-size", type=int, default=32, help="of the tiny model written by --models")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-sft", type=int, default=2000)
    parser.add_argument("--n-pref", type=int, default=2000)
    parser.add_argument("--n-rl", type=int, default=256)
    parser.add_argument("--n-eval", type=int, default=32)
    parser.add_argument("--label-noise", type=float, default=0.25)
    parser.add_argument("--min-gap", type=float, default=0.0, help="training pairs differ in gold by more than this")
    args = parser.parse_args(argv)
    paths = write_task_files(args.out_dir, args.seed, args.n_sft, args.n_pref, args.n_rl, args.n_eval, args.label_noise,
                             args.min_gap)
    paths["prefs_gold"] = Path(args.out_dir) / "prefs_gold.jsonl"
    gold_rng = random.Random(args.seed + 2)
    write_jsonl(paths["prefs_gold"], preference_rows(sample_tasks(args.n_pref, gold_rng), gold_rng, label_noise=0.0))
    paths["rollouts"] = Path(args.out_dir) / "rollouts.jsonl"
    write_jsonl(paths["rollouts"], [{"prompt": t.prompt, "response": noisy_response(t, gold_rng), "label": t.label}
                                    for t in sample_tasks(args.n_eval, gold_rng)])
    paths.update(write_llm_on_ray_files(args.out_dir, args.seed, max(args.n_rl // 4, 16)))
    if args.models:
        paths.update(write_tiny_models(args.models, args.seed, args.hidden_size))
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
