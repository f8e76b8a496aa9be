"""PPO with a value model on one machine, in one readable file (CleanRL-style; our own code on transformers pieces).

    python -m trl_ext.train --config configs/train/ppo_rm.yaml
    torchrun --nproc_per_node 2 -m trl_ext.train --config configs/train/ppo_rm.yaml   # or accelerate launch --multi_gpu --num_processes 2

One step: sample one response per prompt from exactly the policy's distribution (`generation.sample`: the
checkpoint's own generation settings never apply), keep every sampled token (no EOS: the whole sampled row),
score it with the reward pipeline (any reward config, through `PipelineRewardFunc`), subtract
`missing_eos_penalty` from responses without EOS, build per-token rewards `-beta * (log pi - log pi_ref)` with
the score added at the last response token, GAE advantages (whitened with the unbiased variance, as TRL) and
returns, then `ppo_epochs` passes of shuffled mini-batches with clipped policy and value losses. The KL
coefficient beta is fixed, or adaptive towards `kl_target` (Ziegler et al.). A sample the reward skips
(`on_error: skip`) leaves its batch: its tokens get mask 0, so it is not trained on (not towards reward 0)
and no metric counts it. Metrics carry TRL PPOv2's names (`objective/kl`, `policy/clipfrac_avg`, ...) plus
every reward component, go to TensorBoard (`OUT/runs/`) and `OUT/metrics.jsonl`; sample-completion tables
are printed with rich and saved (`OUT/completions/`); eval files as GRPO writes them (`OUT/eval/`);
checkpoints `OUT/checkpoint-STEP/` (policy, value, optimizer in safetensors, state JSON) are resumed from.
Models run with dropout off (eval mode) so old and new log-probs agree before the first update, as in PPOv2.

Where our metrics mean something else than PPOv2's (TRL 0.11.4): `policy/approxkl_avg`, `val/ratio`,
`policy/entropy_avg` and `objective/entropy` average (or sum) over real response tokens only, where PPOv2
also counts padding positions (ratio 1, log-ratio 0, entropy of the padded logits; -1 per padded token in
`objective/entropy`); `val/num_eos_tokens` counts EOS among real tokens (PPOv2 counts padding when pad == eos).
Every tensor is made on its inputs' device; the maths is tested on the `meta` device (tests/test_meta_device.py).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from reward_plugins.batching import position_ids_from_mask
from reward_plugins.config import ConfigError
from reward_plugins.io import write_json
from reward_plugins.monitor import Alarm
from reward_plugins.monitor_session import STATE_FILE

from .console import advance, close_bar, progress_bar
from .data import as_text
from .generation import sample
from .run_dir import ResumeMode, open_run_dir, ppo_settings
from .monitor_hooks import copy_folder, watch_step

if TYPE_CHECKING:
    from .run_config import PPOSettings, RunInputs, TrainConfig

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# ---------------------------------------------------------------- maths (pure functions, no I/O)

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (0 when the mask is empty)."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of `x` over the masked positions (n / (n - 1) times the population one, as TRL's);
    one position has variance 0, none has variance 0."""
    n = mask.sum()
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """`x` standardised over the masked positions (unbiased variance, as TRL); masked-out positions become 0."""
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """The EOS trick: responses that never emitted EOS (truncated) lose `penalty` from their score."""
    if penalty is None:
        return scores
    return scores - penalty * (~has_eos).to(scores.dtype)


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, non_score): `-kl_coef * (log pi - log pi_ref)` at every response token, plus the score at the last one."""
    non_score = -kl_coef * (logprobs - ref_logprobs) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = non_score.clone()
    rewards[torch.arange(len(scores), device=scores.device), last] += scores * (mask.sum(1) > 0)
    return rewards, non_score


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns; the value after the last response token is 0."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    width = rewards.shape[1]
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate `max(-A r, -A clip(r, 1-c, 1+c))`, its clip fraction, approx KL and ratio."""
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
             "approxkl": 0.5 * masked_mean(log_ratio**2, mask), "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss `0.5 * max((v - R)^2, (clip(v, v_old +- c) - R)^2)` and its clip fraction."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_plain, loss_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_plain, loss_clipped), mask)
    return loss, masked_mean((loss_clipped > loss_plain).float(), mask)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the softmax over the vocabulary."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_has_eos(response_tokens: torch.Tensor, mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Whether each response emitted EOS among its real tokens (padding never counts, even when pad == eos)."""
    return ((response_tokens == eos_id) & mask.bool()).any(1)


@dataclass
class Targets:
    """What one rollout batch trains towards: the training mask (skipped samples zeroed), per-token rewards and
    their KL part, whitened advantages and value targets."""

    mask: torch.Tensor
    rewards: torch.Tensor
    non_score: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def training_targets(scores: torch.Tensor, valid: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                     values: torch.Tensor, mask: torch.Tensor, *, kl_coef: float, gamma: float, lam: float,
                     whiten_rewards: bool = False) -> Targets:
    """Rewards, GAE advantages (whitened over the batch's trained tokens) and returns for one rollout batch.

    A sample the reward skipped (`valid` 0, `on_error: skip`) leaves the batch: its tokens get mask 0, so it
    adds nothing to the losses, to the whitening statistics or to the metrics, and its placeholder score is
    never used (it is not trained towards reward 0).
    """
    mask = mask * valid.to(mask.dtype).unsqueeze(1)
    rewards, non_score = per_token_rewards(scores * valid.to(scores.dtype), logprobs, ref_logprobs, mask, kl_coef)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return Targets(mask, rewards, non_score, masked_whiten(advantages, mask), returns)


MINIBATCH_STATS = ("approxkl", "clipfrac", "pg_loss", "vf_loss", "vf_clipfrac", "entropy", "ratio")
ROLLOUT_SUMS = ("kl", "neg_logprob", "non_score", "scores", "samples", "eos_tokens")


def rollout_sums(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, non_score: torch.Tensor,
                 mask: torch.Tensor, response_tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """This process's sums for the rollout metrics (`ROLLOUT_SUMS`), over trained samples and their real tokens.

    Summed across processes and divided by the sample count they give `objective/kl` (sequence KL),
    `objective/entropy` (sequence -log pi), `objective/non_score_reward`, `objective/scores`; the EOS count is
    `val/num_eos_tokens` (real tokens only: PPOv2 also counts padding when pad == eos).
    """
    trained = (mask.sum(1) > 0).to(scores.dtype)
    return torch.stack([
        ((logprobs - ref_logprobs) * mask).sum(), (-logprobs * mask).sum(), non_score.sum(),
        (scores * trained).sum(), trained.sum(), ((response_tokens == eos_id) * mask).sum(),
    ]).float()


@dataclass
class KLController:
    """Fixed beta, or Ziegler et al.'s adaptive one: beta *= 1 + clip(KL/target - 1, +-0.2) * n / horizon."""

    value: float
    target: float | None = None
    horizon: int = 10000

    def update(self, kl: float, n_steps: int) -> None:
        if self.target is None:
            return
        error = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon


# ---------------------------------------------------------------- models

class PolicyAndValue(nn.Module):
    """Policy and value model in one module, so one DDP wrapper and one optimizer cover both."""

    def __init__(self, policy: nn.Module, value: nn.Module):
        super().__init__()
        self.policy = policy
        self.value = value
        prefix = getattr(value, "base_model_prefix", "model")
        if not hasattr(value, prefix) or not isinstance(getattr(value, "score", None), nn.Linear):
            raise ConfigError([f"value model {type(value).__name__}: expected a sequence classifier with "
                               f"`{prefix}` and a linear `score` head"])
        self.value_backbone = getattr(value, prefix)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Response-position logits (divided by the sampling temperature) and values."""
        position_ids = position_ids_from_mask(attention_mask)
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        hidden = self.value_backbone(input_ids=input_ids, attention_mask=attention_mask,
                                     position_ids=position_ids).last_hidden_state
        values = self.value.score(hidden).squeeze(-1)
        return logits[:, start - 1 : -1] / temperature, values[:, start - 1 : -1]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Log-probability of each taken token under `logits`."""
    return torch.gather(F.log_softmax(logits, dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def ref_logprobs(ref: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                 temperature: float) -> torch.Tensor:
    """Response-token log-probs under the frozen initial policy, at the sampling temperature."""
    position_ids = position_ids_from_mask(attention_mask)
    logits = ref(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return token_logprobs(logits[:, start - 1 : -1] / temperature, input_ids[:, start:])


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """[left-padded prompt | right-padded response] ids, attention mask, response mask, prompt width."""
    width_p = max(len(p) for p in prompt_ids)
    width_r = max(len(r) for r in response_ids)
    ids = torch.full((len(prompt_ids), width_p + width_r), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        ids[i, width_p - len(p) : width_p] = torch.tensor(p)
        ids[i, width_p : width_p + len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, width_p - len(p) : width_p + len(r)] = 1
    return ids, attention, attention[:, width_p:].float(), width_p


# ---------------------------------------------------------------- checkpoints (safetensors + JSON, no pickle)

def save_checkpoint(folder: Path, bundle: PolicyAndValue, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                    tokenizer, extra_json: dict[str, Any] | None = None) -> None:
    """Policy and value in HF format, the optimizer's tensors in safetensors, the rest (and `extra_json`, file name ->
    document) in JSON; written then renamed."""
    from safetensors.torch import save_file

    tmp = folder.with_name(folder.name + ".tmp")
    bundle.policy.save_pretrained(tmp / "policy")
    tokenizer.save_pretrained(tmp / "policy")
    bundle.value.save_pretrained(tmp / "value")
    tensors, meta = {}, {"param_groups": [], "state_keys": {}}
    for index, param_state in optimizer.state_dict()["state"].items():
        meta["state_keys"][str(index)] = sorted(param_state)
        for key, value in param_state.items():
            tensors[f"{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta["param_groups"] = optimizer.state_dict()["param_groups"]
    save_file(tensors, tmp / "optimizer.safetensors")
    write_json(tmp / "optimizer.json", meta)
    write_json(tmp / "trainer_state.json", state)
    for name, document in (extra_json or {}).items():
        write_json(tmp / name, document)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)


def load_optimizer(folder: Path, optimizer: torch.optim.Optimizer) -> None:
    """Restore the optimizer state written by `save_checkpoint`."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "optimizer.safetensors")
    meta = json.loads((folder / "optimizer.json").read_text())
    state = {int(i): {k: tensors[f"{i}.{k}"] for k in keys} for i, keys in meta["state_keys"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def last_checkpoint(out: Path) -> Path | None:
    """The highest complete `checkpoint-N` folder (a half-written `.tmp` one never counts)."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := CHECKPOINT.match(p.name))
             and (p / "trainer_state.json").exists()]
    return max(found)[1] if found else None


# ---------------------------------------------------------------- the trainer

def prompt_indices(step: int, rank: int, world: int, batch: int, n_rows: int, seed: int) -> list[int]:
    """The rows this process trains on at `step`: a seeded permutation per pass over the data, sliced by rank."""
    start = (step * world + rank) * batch
    out, epoch_cache = [], {}
    for position in range(start, start + batch):
        epoch, offset = divmod(position, n_rows)
        if epoch not in epoch_cache:
            epoch_cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n_rows)
        out.append(int(epoch_cache[epoch][offset]))
    return out


def learning_rate(ppo: PPOSettings, step: int) -> float:
    """Constant, or decayed linearly to 0 at `max_steps`."""
    if ppo.lr_schedule == "constant":
        return ppo.learning_rate
    return ppo.learning_rate * max(0.0, 1.0 - step / ppo.max_steps)


def keep_metrics_up_to(path: Path, step: int) -> None:
    """On resume, drop metric records logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    from reward_plugins.io import atomic_open

    with atomic_open(path) as handle:
        handle.write("".join(line + "\n" for line in lines))


def load_models(cfg: TrainConfig, ppo: PPOSettings, tokenizer,
                checkpoint: Path | None = None) -> tuple[nn.Module, nn.Module, nn.Module]:
    """Policy, frozen reference (the initial policy) and value model (from the policy or a reward model); policy
    and value from `checkpoint` when resuming."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = AutoModelForCausalLM.from_pretrained(checkpoint / "policy" if checkpoint else cfg.policy, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(cfg.policy, dtype=torch.float32).eval().requires_grad_(False)
    if checkpoint is not None:
        return policy, ref, AutoModelForSequenceClassification.from_pretrained(checkpoint / "value", dtype=torch.float32)
    source = ppo.value_model if ppo.value_init == "reward_model" else cfg.policy
    if ppo.value_init == "reward_model":
        refuse_lora_ensemble_value(source)
    value = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    if ppo.value_init == "reward_model":
        start_from_mean_head(value, source)
    value.config.pad_token_id = tokenizer.pad_token_id
    if value.config.vocab_size < len(tokenizer):
        raise ConfigError([f"ppo.value_model {source}: vocabulary of {value.config.vocab_size} tokens is smaller than "
                           f"the policy tokenizer's {len(tokenizer)}; the value model must share the policy's tokenizer"])
    return policy, ref, value


def start_from_mean_head(value: nn.Module, folder: str) -> None:
    """A multi-head RM folder (`heads.safetensors`) holds a backbone and k heads but no `score` layer: the value
    head starts at the mean of the k heads, whose output is the mean of the k head scores (the ensemble's `mean`
    reward), instead of at random. Any other folder is left as loaded."""
    from reward_plugins.multihead import HEADS_FILE, read_heads

    if not (Path(folder) / HEADS_FILE).is_file():
        return
    weight, _ = read_heads(folder, value.config.hidden_size)
    with torch.no_grad():
        value.score.weight.copy_(weight.mean(0, keepdim=True).to(value.score.weight.dtype))
        if value.score.bias is not None:
            value.score.bias.zero_()


def refuse_lora_ensemble_value(folder: str) -> None:
    """A LoRA ensemble folder's base has no trained score head (each adapter has its own): refused in one line."""
    from reward_plugins.lora_ensemble import INDEX_FILE

    if (Path(folder) / INDEX_FILE).is_file():
        raise ConfigError([f"ppo.value_model {folder}: a LoRA ensemble folder (its base model has no trained score "
                           "head); give one reward model's folder, a multi-head RM folder, or value_init: policy"],
                          "train")


def print_samples(console, step: int, prompts: list[str], responses: list[str], scores: list[float], rows: int) -> None:
    """PPOv2's sample table (query, response, score) on the console."""
    from rich.table import Table

    table = Table(title=f"PPO samples, step {step}", show_lines=True)
    for column in ("query", "response", "score"):
        table.add_column(column)
    for p, r, s in list(zip(prompts, responses, scores))[:rows]:
        table.add_row(p, r, f"{s:.3f}")
    console.print(table)


def train_ppo(cfg: TrainConfig, inputs: RunInputs, mode: ResumeMode = "auto") -> Path:
    """Train with PPO (resuming from the last checkpoint of a run with the same settings, see `run_dir`); returns
    the final policy folder."""
    from accelerate import Accelerator
    from rich.console import Console
    from torch.utils.tensorboard import SummaryWriter

    ppo: PPOSettings = cfg.ppo
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    out = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    tokenizer, reward_fn, rows = inputs.tokenizer, inputs.reward_fn, inputs.rows
    start_step, state = 0, {"step": 0, "episode": 0, "kl_coef": ppo.kl_coef}
    checkpoint = open_run_dir(out, ppo_settings(cfg), mode, last_checkpoint)
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        start_step = int(state["step"])
        if main:
            keep_metrics_up_to(out / "metrics.jsonl", start_step)
    policy, ref, value = load_models(cfg, ppo, tokenizer, checkpoint)
    bundle = PolicyAndValue(policy, value).eval()
    optimizer = torch.optim.AdamW(bundle.parameters(), lr=ppo.learning_rate, weight_decay=ppo.weight_decay)
    if checkpoint is not None:
        load_optimizer(checkpoint, optimizer)
    bundle, optimizer = accelerator.prepare(bundle, optimizer)
    ref.to(accelerator.device)
    kl_ctl = KLController(float(state["kl_coef"]), ppo.kl_target, ppo.kl_horizon)
    monitor = inputs.monitor
    if monitor is not None and checkpoint is not None:
        monitor.restore(checkpoint, start_step)

    pipeline = inputs.pipeline
    evaluator = None
    if inputs.eval_rows and main:
        evaluator = inputs.eval_callback(cfg, cfg.eval_max_new_tokens or ppo.max_new_tokens, ppo.temperature,
                                         "trl_ext.ppo", ref_model=ref)
    writer = SummaryWriter(str(out / "runs")) if main else None
    console = Console(stderr=True)
    unwrapped = accelerator.unwrap_model(bundle)

    def save(step: int, state: dict[str, Any]) -> None:
        """checkpoint-STEP: the policy that samples step STEP (after STEP updates), with the monitor's state."""
        accelerator.wait_for_everyone()
        extra = {STATE_FILE: monitor.checkpoint_state(step)} if monitor is not None else None
        if main:
            save_checkpoint(out / f"checkpoint-{step}", unwrapped, optimizer, state, tokenizer, extra)

    def evaluate(step: int) -> None:
        if evaluator is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or step in (0, ppo.max_steps)):
            evaluator.write(step, unwrapped.policy, tokenizer)

    if start_step == 0:
        evaluate(0)
        if monitor is not None and monitor.config.action == "stop":
            save(0, state)  # the initial policy: what `stop` keeps when no later checkpoint scores better
    began, episodes_at_start = time.perf_counter(), int(state["episode"])
    bar, record = progress_bar(ppo.max_steps, start_step), {}
    stopped: Alarm | None = None
    for step in range(start_step, ppo.max_steps):
        batch_rows = [rows[i] for i in prompt_indices(step, rank, world, ppo.batch_size, len(rows), cfg.seed)]
        prompts = [as_text(r["prompt"], tokenizer) for r in batch_rows]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(ppo, step)
        gens = sample(unwrapped.policy, tokenizer, prompts, ppo.max_new_tokens, ppo.temperature,
                      batch_size=max(ppo.batch_size, 1), seed=cfg.seed * 1_000_003 + step * world + rank)
        responses = gens.completion_ids  # exactly what was sampled: never empty, pads sampled as tokens kept
        metrics: dict[str, float] = {}
        rewards_out = reward_fn(prompts=prompts, completions=gens.texts, completion_ids=responses,
                                **{cfg.label_key: [r[cfg.label_key] for r in batch_rows]},
                                trainer_state=SimpleNamespace(global_step=step),
                                log_metric=lambda key, value: metrics.__setitem__(key, value))
        device = accelerator.device
        valid = torch.tensor([r is not None for r in rewards_out], dtype=torch.float32, device=device)
        raw_scores = torch.tensor([r if r is not None else 0.0 for r in rewards_out], dtype=torch.float32, device=device)
        ids, attention, mask, start = (t.to(device) if torch.is_tensor(t) else t
                                       for t in pack(gens.prompt_ids, responses, tokenizer.pad_token_id))
        response_tokens = ids[:, start:]
        has_eos = response_has_eos(response_tokens, mask, tokenizer.eos_token_id)
        scores = apply_missing_eos_penalty(raw_scores, has_eos, ppo.missing_eos_penalty)
        with torch.no_grad():
            logits, old_values = bundle(ids, attention, start, ppo.temperature)
            old_logprobs = token_logprobs(logits, response_tokens)
            del logits
            old_ref = ref_logprobs(ref, ids, attention, start, ppo.temperature)
            alarm = None
            if monitor is not None:  # before the update: adapt_kl acts on this very batch, stop before it is learnt
                alarm = watch_step(monitor, accelerator, step, ((old_logprobs - old_ref) * mask).sum(1), valid,
                                   ppo.batch_size)
                if alarm is not None and alarm.action == "adapt_kl":
                    kl_ctl.value *= monitor.apply_kl(step)
            targets = training_targets(scores, valid, old_logprobs, old_ref, old_values, mask, kl_coef=kl_ctl.value,
                                       gamma=ppo.gamma, lam=ppo.lam, whiten_rewards=ppo.whiten_rewards)
        if alarm is not None and alarm.action in ("checkpoint", "stop"):
            save(step, state)
            if alarm.action == "stop":
                stopped = alarm
                break
        mask, advantages, returns = targets.mask, targets.advantages, targets.returns
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in MINIBATCH_STATS}
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        for _ in range(ppo.ppo_epochs):
            order = torch.randperm(ppo.batch_size, generator=generator).to(device)
            for first in range(0, ppo.batch_size, ppo.mini_batch_size):
                mb = order[first : first + ppo.mini_batch_size]
                logits, values = bundle(ids[mb], attention[mb], start, ppo.temperature)
                logprobs = token_logprobs(logits, response_tokens[mb])
                pg, pg_stats = policy_loss(logprobs, old_logprobs[mb], advantages[mb], mask[mb], ppo.cliprange)
                vf, vf_clip = value_loss(values, old_values[mb], returns[mb], mask[mb], ppo.cliprange_value)
                accelerator.backward(pg + ppo.vf_coef * vf)
                if ppo.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(bundle.parameters(), ppo.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                with torch.no_grad():
                    entropy = masked_mean(entropy_from_logits(logits), mask[mb])
                for key, v in zip(MINIBATCH_STATS, (pg_stats["approxkl"], pg_stats["clipfrac"], pg, vf, vf_clip,
                                                    entropy, pg_stats["ratio"])):
                    stats[key].append(v.detach())

        sums = rollout_sums(scores, old_logprobs, old_ref, targets.non_score, mask, response_tokens,
                            tokenizer.eos_token_id)
        ratios = torch.stack(stats["ratio"])
        local = torch.cat([
            sums, torch.stack([torch.stack(stats[k]).mean() for k in MINIBATCH_STATS]).float(),
            ratios.var(unbiased=False).float().reshape(1),
            torch.tensor([float(metrics[k]) for k in pipeline.log_keys], dtype=torch.float32, device=device),
        ])
        total = accelerator.gather(local.unsqueeze(0))
        width = len(ROLLOUT_SUMS)
        sums, means = total[:, :width].sum(0).tolist(), total[:, width:].mean(0).tolist()
        n = max(sums[4], 1.0)
        kl_mean = sums[0] / n
        episode = int(state["episode"]) + ppo.batch_size * world
        state = {"step": step + 1, "episode": episode, "kl_coef": kl_ctl.value}
        record = {
            "step": step + 1, "episode": episode,
            "eps": (episode - episodes_at_start) / max(time.perf_counter() - began, 1e-9),
            "objective/kl": kl_mean, "objective/entropy": sums[1] / n,
            "objective/non_score_reward": sums[2] / n, "objective/scores": sums[3] / n,
            "objective/rlhf_reward": (sums[3] + sums[2]) / n, "objective/kl_coef": kl_ctl.value,
            "policy/approxkl_avg": means[0], "policy/clipfrac_avg": means[1],
            "loss/policy_avg": means[2], "loss/value_avg": means[3], "val/clipfrac_avg": means[4],
            "policy/entropy_avg": means[5], "val/ratio": means[6], "val/ratio_var": means[7],
            "val/num_eos_tokens": sums[5], "lr": optimizer.param_groups[0]["lr"],
        }
        record.update(dict(zip(pipeline.log_keys, means[8:])))  # one gather per step
        if monitor is not None:
            record.update(monitor.logs())
        kl_ctl.update(kl_mean, ppo.batch_size * world)
        state["kl_coef"] = kl_ctl.value
        if main:
            if (step + 1) % ppo.logging_steps == 0 or step + 1 == ppo.max_steps:
                for key, v in record.items():
                    if key != "step":
                        writer.add_scalar(key, v, step + 1)
                with open(out / "metrics.jsonl", "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if cfg.table_every and step % cfg.table_every == 0 and ppo.sample_rows:
                print_samples(console, step, prompts, gens.texts, scores.tolist(), ppo.sample_rows)
        advance(bar, record)
        evaluate(step + 1)
        if (ppo.save_steps and (step + 1) % ppo.save_steps == 0) or step + 1 == ppo.max_steps:
            save(step + 1, state)
    accelerator.wait_for_everyone()
    final = out / "final"
    if main:
        close_bar(bar, record)
    kept = monitor.keep_best(lambda s: out / f"checkpoint-{s}", stopped) if stopped is not None else None
    if main and kept is not None:  # stop: the final model is the kept checkpoint's
        copy_folder(kept / "policy", final)
        copy_folder(kept / "value", out / "value")
    elif main:
        unwrapped.policy.save_pretrained(final)
        tokenizer.save_pretrained(final)
        unwrapped.value.save_pretrained(out / "value")
        (out / "train_config.json").write_text(json.dumps(cfg.model_dump(), indent=2))
        writer.close()
    return final
