"""The experience-maker hook on CPU: one local Ray session, fake actor groups running tiny real models.

The fake groups answer `async_run_method_batch("forward", ...)` the way OpenRLHF's model actors do
(chunks spread over the effective actors, log-probs of the last `action_mask.shape[1]` positions at the
rollout temperature), so OpenRLHF's real `RemoteExperienceMaker` code runs unchanged around ours. The last
test shows the Ray setup hook swapping the class inside a worker process.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

ray = pytest.importorskip("ray")
pytest.importorskip("openrlhf")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from evaluation.eval_files import list_eval_files, read_eval_file  # noqa: E402
from openrlhf_ext.launch import DEFERRED_REWARD, parse_openrlhf_args, runtime_env  # noqa: E402
from openrlhf_ext.ref_scorer import ReferenceModelError  # noqa: E402
from openrlhf_ext.settings import ENV_CONFIG, HookSettings  # noqa: E402
from reward_plugins import tiny_models  # noqa: E402
from reward_plugins.logprobs import HFLogProbScorer  # noqa: E402
from reward_plugins.pipeline import RewardPipeline  # noqa: E402
from reward_plugins.types import Sample  # noqa: E402
from reward_plugins.vrcli import VRCLIPrompt, baseline_perplexities  # noqa: E402

STAND_INS = str(Path(__file__).with_name("openrlhf_stand_ins.py"))
WORKER_CONFIG = "/nonexistent/worker-probe.yaml"


def _probe_worker(stand_ins_path: str):
    """Runs in a Ray worker: was the hook installed at start-up, and does the trainer module get our class?"""
    from openrlhf_ext import hooks

    installed_at_start = hooks.installed_in_this_process()
    spec = importlib.util.spec_from_file_location("worker_openrlhf_stand_ins", stand_ins_path)
    stand_ins = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stand_ins)
    stand_ins.install()
    import openrlhf.trainer.ppo_trainer as trainer

    maker = trainer.RemoteExperienceMaker
    return installed_at_start, f"{maker.__module__}.{maker.__name__}", os.environ.get(ENV_CONFIG), os.getpid()


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module, started the way the launcher starts it (setup hook + env vars)."""
    env = runtime_env(HookSettings(WORKER_CONFIG, None, None), environ={})
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, runtime_env=env)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    probe = ray.remote(_probe_worker).remote(STAND_INS)  # imports openrlhf in the worker while we work here
    yield SimpleNamespace(probe=probe)
    ray.shutdown()


def openrlhf_forward(model, sequences, action_mask, attention_mask, temperature):
    """What OpenRLHF's Actor.forward returns for reference/policy actors (non-packed path)."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions.masked_fill_(attention_mask == 0, 1)
    logits = model(sequences, attention_mask=attention_mask, position_ids=positions).logits.float() / temperature
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, sequences[:, 1:, None]).squeeze(-1)
    return logprobs[:, -action_mask.shape[1] :] * action_mask.float()


class FakeGroup:
    """Duck-typed RayActorGroup: `effective_actors` chunks, each answered with a Ray ref to a list of results."""

    def __init__(self, model_dir, temperature, effective_actors=2):
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.temperature = temperature
        self.effective_actors = effective_actors
        self.calls = []

    @torch.no_grad()
    def async_run_method_batch(self, method_name, **kwargs):
        assert method_name == "forward"
        total = len(next(iter(kwargs.values())))
        assert total >= self.effective_actors, "OpenRLHF refuses fewer micro-batches than actors"
        self.calls.append(total)
        size = math.ceil(total / self.effective_actors)
        refs = []
        for start in range(0, size * self.effective_actors, size):
            chunk = range(start, min(start + size, total))
            out = [
                openrlhf_forward(
                    self.model,
                    kwargs["sequences"][i],
                    kwargs["action_mask"][i],
                    kwargs["attention_mask"][i],
                    self.temperature,
                )
                for i in chunk
            ]
            refs.append(ray.put(out))
        return refs

    def async_run_method(self, method_name, **kwargs):
        return [ray.put(None)]


@pytest.fixture(scope="module")
def models(tiny_dir, tokenizer_dir, lm_dir):
    actor_dir = tiny_models.build_causal_lm(tiny_dir / "policy_lm", tokenizer_dir, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "left"
    return SimpleNamespace(actor=actor_dir, ref=lm_dir, tokenizer=tokenizer)


STORIES = [
    ("Chapter two begins with a storm over the harbour.", "She opened the door and smiled at the morning light."),
    ("The quick brown fox jumps over the lazy dog.", "The hero leaves the village and finds the lost map."),
]
RESPONSES = [
    "In summary: the hero leaves the village.",
    "Detailed Plan: introduce the villain, reveal the secret.",
    "In summary: a ship in trouble, a storm over the harbour.",
    "In summary, she looked at the sea and smiled.",
]


def openrlhf_args(models, tmp_path, *extra):
    return parse_openrlhf_args(
        [
            "--actor.model_name_or_path", str(models.actor),
            "--reward.remote_url", DEFERRED_REWARD,
            "--rollout.n_samples_per_prompt", "2",
            "--rollout.batch_size", "2",
            "--rollout.micro_batch_size", "2",
            "--actor.num_gpus_per_node", "2",
            "--ref.num_gpus_per_node", "2",
            "--ckpt.output_dir", str(tmp_path / "ckpt"),
            *extra,
        ]
    )  # fmt: skip


def rollouts(models, labels, rewards=None, extra_logs=None):
    """Rollout Experiences built by OpenRLHF's own SamplesGenerator code, two samples per prompt."""
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    tok = models.tokenizer
    out = []
    for i, response in enumerate(RESPONSES):
        prompt = tok.apply_chat_template([{"role": "user", "content": STORIES[i // 2][0]}], add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        answer = {
            "observation_tokens": prompt_ids + response_ids,
            "action_ranges": [(len(prompt_ids), len(prompt_ids) + len(response_ids))],
            "reward": 0.0 if rewards is None else rewards[i],
            "scores": 0.0 if rewards is None else rewards[i],
            "extra_logs": {} if extra_logs is None else extra_logs[i],
            "prompt": prompt,
            "label": labels[i // 2],
            "rollout_log_probs": None,
            "truncated": False,
        }
        out.append(SamplesGenerator._process_response_into_experience(None, answer, max_len=512))
    return out


def make_maker(models, args, settings, reference=True):
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController

    from openrlhf_ext.experience_maker import PluginExperienceMaker

    temperature = args.rollout.temperature
    return PluginExperienceMaker(
        FakeGroup(models.actor, temperature),
        None,
        None,
        FakeGroup(models.ref, temperature) if reference else None,
        FixedKLController(args.algo.kl.init_coef),
        SimpleNamespace(args=args),
        models.tokenizer,
        settings=settings,
    )


VRCLI_YAML = """
on_error: raise
reward:
  type: vrcli
  name: vrcli
  scorer:
    backend: {backend}
    {model_line}
    batch_size: 2
    max_length: 512
    temperature: 1.0
  plan:
    markers: ["In summary:", "In summary,", "Detailed Plan:"]
  shaping:
    scheme: stepped
"""


@pytest.fixture(scope="module")
def vrcli(models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vrcli")
    external = folder / "vrcli_reference.yaml"
    external.write_text(VRCLI_YAML.format(backend="external", model_line=""))
    local = folder / "vrcli_hf.yaml"
    local.write_text(VRCLI_YAML.format(backend="hf", model_line=f"model: {models.ref}"))
    scorer = HFLogProbScorer(str(models.ref), temperature=1.0, max_length=512)
    labels = [{"context": context, "gold": gold} for context, gold in STORIES]
    baselines = baseline_perplexities(scorer, VRCLIPrompt(), labels)
    for label, baseline in zip(labels, baselines):
        label.update(baseline_ppl=float(baseline), baseline_temperature=1.0)
    return SimpleNamespace(external=str(external), local=str(local), labels=labels)


def grpo_args(models, tmp_path, *extra):
    return openrlhf_args(
        models, tmp_path,
        "--algo.advantage.estimator", "group_norm",
        "--algo.kl.use_loss", "--algo.kl.estimator", "k3", "--algo.kl.init_coef", "1e-6",
        *extra,
    )  # fmt: skip


def test_vrcli_on_reference_actors_matches_local_scorer(ray_session, models, vrcli, tmp_path):
    args = grpo_args(models, tmp_path)
    eval_dir = tmp_path / "eval"
    maker = make_maker(models, args, HookSettings(vrcli.external, str(eval_dir), 1))
    experiences = maker.make_experience_batch(rollouts(models, vrcli.labels))

    assert len(experiences) == 2 and all(e.advantages is not None for e in experiences)
    assert maker.initial_model_group.calls[0] >= 2, "VR-CLI micro-batches must cover every reference actor"
    info_keys = [list(e.info) for e in experiences]
    assert info_keys[0] == info_keys[1]
    assert {"reward", "reward/mean", "reward/errors", "reward/improvement", "reward/baseline_ppl"} <= set(info_keys[0])

    # The same reward computed locally with the HF scorer on the same frozen model.
    tok = models.tokenizer
    samples = [
        Sample(
            prompt=e.prompts[row],
            response=tok.decode(e.sequences[row][-e.action_mask.shape[1] :][e.action_mask[row].bool()].tolist()),
            label=e.labels[row],
        )
        for e in experiences
        for row in range(len(e.sequences))
    ]
    expected = RewardPipeline.from_yaml(vrcli.local).score(samples)
    got_improvement = torch.cat([e.info["reward/improvement"] for e in experiences]).numpy()
    want_improvement = [r.components["improvement"] for r in expected.results]
    np.testing.assert_allclose(got_improvement, want_improvement, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(torch.cat([e.rewards for e in experiences]).numpy(), expected.rewards, atol=1e-6)
    assert any(abs(v) > 1e-3 for v in want_improvement), "the plan must actually change the gold perplexity"

    (path,) = list_eval_files(eval_dir)
    written = read_eval_file(path)
    assert written.step == 0 and len(written.rows) == 4
    manual_kl = torch.cat(
        [((e.action_log_probs - e.base_action_log_probs) * e.action_mask).sum(-1) for e in experiences]
    ).tolist()
    np.testing.assert_allclose([row.kl for row in written.rows], manual_kl, rtol=1e-5)
    assert all(abs(k) > 0 for k in manual_kl), "policy and reference differ, so the KL cannot be zero"
    assert written.kl_history == [pytest.approx(np.mean(manual_kl))]
    assert [row.components["improvement"] for row in written.rows] == pytest.approx(want_improvement, rel=1e-4, abs=1e-3)
    assert written.rows[0].answer == "In summary: the hero leaves the village.", "special tokens stripped"

    maker.make_experience_batch(rollouts(models, vrcli.labels))  # step 1: interval 1 records again
    assert [read_eval_file(p).step for p in list_eval_files(eval_dir)] == [0, 1]
    assert len(read_eval_file(list_eval_files(eval_dir)[1]).kl_history) == 2


def test_refuses_vrcli_without_reference_model(ray_session, models, vrcli, tmp_path):
    args = grpo_args(models, tmp_path)
    with pytest.raises(ReferenceModelError, match="init_coef"):
        make_maker(models, args, HookSettings(vrcli.external, None, None), reference=False)


def test_refuses_temperature_mismatch(ray_session, models, vrcli, tmp_path):
    cold = grpo_args(models, tmp_path, "--rollout.temperature", "0.7")
    with pytest.raises(ReferenceModelError, match="temperature"):
        make_maker(models, cold, HookSettings(vrcli.external, None, None))
    maker = make_maker(models, grpo_args(models, tmp_path), HookSettings(vrcli.external, None, None))
    labels = [dict(label, baseline_temperature=0.7) for label in vrcli.labels]
    with pytest.raises(ReferenceModelError, match=r"temperature \[0.7\]"):
        maker.make_experience_batch(rollouts(models, labels))


class FakeTracker:
    def __init__(self):
        self.logged = []

    def log_eval(self, global_step, logs):
        self.logged.append((global_step, dict(logs)))


def test_held_out_eval_is_scored_by_the_pipeline(ray_session, models, vrcli, tmp_path):
    """OpenRLHF's real `PPOTrainer.evaluate`, wrapped by our hook, on a fake trainer: the eval samples get the
    pipeline's rewards (not the rollout placeholder's 0) and the VR-CLI metrics reach the loggers and a file."""
    from openrlhf.trainer.ppo_trainer import PPOTrainer

    from openrlhf_ext.experience_maker import plugin_evaluate
    from openrlhf_ext.hooks import trainer_class

    args = grpo_args(models, tmp_path, "--eval.steps", "8")
    maker = make_maker(models, args, HookSettings(vrcli.external, str(tmp_path / "eval"), None))
    eval_samples = rollouts(models, vrcli.labels)
    prompts = [e.prompts[0] for e in eval_samples]
    tensorboard = FakeTracker()
    trainer = SimpleNamespace(
        experience_maker=maker,
        samples_generator=SimpleNamespace(generate_eval_samples=lambda **kwargs: eval_samples),
        eval_dataloader=[(["stories"] * len(prompts), prompts, [e.labels[0] for e in eval_samples], None)],
        wandb_logger=None, tensorboard_logger=tensorboard,
    )
    logs = plugin_evaluate(trainer_class(PPOTrainer).evaluate)(trainer, 8, n_samples_per_prompt=2, temperature=1.0)

    tok = models.tokenizer
    local = [Sample(prompt=e.prompts[0], label=e.labels[0],
                    response=tok.decode(e.sequences[0][-e.action_mask.shape[1]:][e.action_mask[0].bool()].tolist()))
             for e in eval_samples]
    expected = RewardPipeline.from_yaml(vrcli.local).score(local)
    gains = np.array([r.components["improvement"] for r in expected.results])
    want = {"vrcli_reward": np.mean(expected.rewards), "vrcli_improvement": gains.mean(),
            "vrcli_improved_share": float(np.sum(gains > 0)) / len(gains)}
    assert 0 < want["vrcli_improved_share"] < 1 or want["vrcli_reward"] > 0
    for key, value in want.items():
        assert logs[key] == pytest.approx(value, rel=1e-4, abs=1e-3)
    assert logs["eval_stories_pass1"] == pytest.approx(np.mean(expected.rewards), abs=1e-6)  # OpenRLHF's own metric
    ((step, logged),) = tensorboard.logged[1:]  # the trainer's own metrics first, then ours
    assert step == 8 and set(want) <= set(logged)
    (path,) = list_eval_files(tmp_path / "eval" / "heldout")
    written = read_eval_file(path)
    assert written.step == 8 and [row.proxy_score for row in written.rows] == pytest.approx(expected.rewards, abs=1e-6)
    assert written.meta["metrics"]["vrcli_improvement"] == pytest.approx(want["vrcli_improvement"], rel=1e-4, abs=1e-3)


def test_mismatched_baselines_stop_the_first_batch(ray_session, models, vrcli, tmp_path):
    from reward_plugins.vrcli import BaselineMismatchError

    maker = make_maker(models, grpo_args(models, tmp_path), HookSettings(vrcli.external, None, None))
    stamp = {"model": "policy_lm", "temperature": 1.0, "max_length": 512, "prompt_hash": VRCLIPrompt().settings_hash(),
             "dtype": "bfloat16", "attn_implementation": "flash_attention_2"}  # OpenRLHF's --ds.param_dtype / attn defaults
    matching = [dict(label, baseline_fingerprint=stamp) for label in vrcli.labels]
    assert len(maker.make_experience_batch(rollouts(models, matching))) == 2
    for change in ({"max_length": 4096}, {"model": "ref_lm"}, {"dtype": "float32"}, {"attn_implementation": "sdpa"}):
        labels = [dict(label, baseline_fingerprint={**stamp, **change}) for label in vrcli.labels]
        with pytest.raises(BaselineMismatchError, match=next(iter(change))):
            maker.make_experience_batch(rollouts(models, labels))


def test_rollout_rewards_are_kept_and_recorded_with_members(ray_session, models, tmp_path):
    """PPO with our reward server: rewards and `reward/*` logs come from the rollouts; the hook records them."""
    args = openrlhf_args(models, tmp_path, "--algo.advantage.estimator", "reinforce_baseline", "--eval.steps", "1")
    rewards = [0.5, -0.25, 1.0, 0.125]
    logs = [{"reward/mean": r, "reward/errors": 0.0, "reward/seed1": r + 0.1, "reward/seed2": r - 0.1, "reward/variance": 0.01} for r in rewards]
    maker = make_maker(models, args, None)
    assert maker.settings.eval_every == 1 and maker.pipeline is None
    experiences = maker.make_experience_batch(rollouts(models, [{"id": 0}, {"id": 1}], rewards, logs))

    assert torch.cat([e.rewards.flatten() for e in experiences]).tolist() == rewards
    (path,) = list_eval_files(tmp_path / "ckpt" / "eval")
    written = read_eval_file(path)
    assert [row.proxy_score for row in written.rows] == rewards
    assert written.rows[2].components == pytest.approx({"seed1": 1.1, "seed2": 0.9, "variance": 0.01})
    assert written.rows[2].ensemble_variance == pytest.approx(0.01)
    # Without --algo.kl.use_loss the KL comes from OpenRLHF's logprobs_diff: mean times response length.
    assert all(row.kl is not None and math.isfinite(row.kl) and row.kl != 0 for row in written.rows)
    assert written.meta["reward_scored_in"] == "rollout"


def test_ensemble_config_scores_whole_batch(ray_session, models, models_env, tmp_path):
    config = str(Path(__file__).parents[1] / "configs" / "rewards" / "ensemble_uwo5.yaml")
    args = openrlhf_args(models, tmp_path, "--algo.advantage.estimator", "reinforce_baseline", "--algo.kl.init_coef", "0")
    maker = make_maker(models, args, HookSettings(config, str(tmp_path / "eval"), 1), reference=False)
    experiences = maker.make_experience_batch(rollouts(models, [{"id": 0}, {"id": 1}]))

    tok = models.tokenizer
    samples = [
        Sample(
            prompt=e.prompts[row],
            response=tok.decode(e.sequences[row][-e.action_mask.shape[1] :][e.action_mask[row].bool()].tolist()),
        )
        for e in experiences
        for row in range(len(e.sequences))
    ]
    expected = RewardPipeline.from_yaml(config).score(samples)
    np.testing.assert_allclose(torch.cat([e.info["reward"] for e in experiences]).numpy(), expected.rewards, rtol=1e-5)
    assert len(set(expected.rewards)) == 4, "distinct answers must get distinct rewards"
    (path,) = list_eval_files(tmp_path / "eval")
    rows = read_eval_file(path).rows
    assert set(rows[0].components) == {"seed1", "seed2", "seed3", "seed4", "seed5", "variance", "combined"}
    assert [r.kl for r in rows] == [None] * 4, "no reference model, no KL"


def test_setup_hook_swaps_experience_maker_in_worker(ray_session):
    installed_at_start, maker, config, pid = ray.get(ray_session.probe, timeout=120)
    assert pid != os.getpid()
    assert installed_at_start, "worker_process_setup_hook did not run in the worker"
    assert maker == "openrlhf_ext.experience_maker.PluginExperienceMaker"
    assert config == WORKER_CONFIG


def test_patch_wraps_the_plain_trainer_class_evaluate():
    from types import ModuleType

    from openrlhf_ext import hooks

    class Base:
        def train_step(self, rollout_samples, global_step):
            return {}, global_step

    class Trainer(Base):
        def evaluate(self, global_step, **kwargs):
            return {"plain": 1.0}

    module = ModuleType("fake_trainer_module")
    module.BasePPOTrainer, module.PPOTrainer = Base, ray.remote(Trainer)
    hooks.patch_trainer_module(module)
    assert Trainer.evaluate.__wrapped__.__name__ == "evaluate"
    fake = SimpleNamespace(experience_maker=None)
    assert Trainer.evaluate(fake, 3) == {"plain": 1.0}  # no trainer-side pipeline: the original runs unchanged


# ---------------------------------------------------------------- the over-optimisation monitor in the hook

ALWAYS = {"divergence": -1000.0, "disagreement_rise": None, "worst_member_drop": None}  # over it from the first full window (step 1 with window 2)


def monitor_settings(tmp_path, action, **extra):
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump({"window": 2, "patience": 1, "thresholds": ALWAYS, "action": action, **extra}))
    config = str(Path(__file__).parents[1] / "configs" / "rewards" / "ensemble_uwo5.yaml")
    return HookSettings(config, str(tmp_path / "eval"), 1, monitor_config=str(path))


class FakeSaver:
    """An actor group whose `save_checkpoint` records its arguments and makes the tag's folder, as DeepSpeed would."""

    def __init__(self, root):
        self.root, self.saved = Path(root), []

    def async_run_method(self, method_name, **kwargs):
        assert method_name == "save_checkpoint"
        self.saved.append(kwargs)
        (self.root / "_actor" / kwargs["tag"]).mkdir(parents=True, exist_ok=True)
        return [ray.put(None)]


def fake_trainer(maker, args):
    return SimpleNamespace(experience_maker=maker, args=args, actor_model_group=FakeSaver(args.ckpt.path),
                           critic_model_group=None, wandb_logger=None, tensorboard_logger=None,
                           samples_generator=SimpleNamespace(generate_samples=lambda **kwargs: "real rollouts"),
                           best_eval_metric_key="", best_eval_metric_value=float("-inf"), _latest_eval_metric_value=None)


def test_monitor_logs_every_step_and_adapt_kl_raises_the_controller(ray_session, models, models_env, tmp_path):
    from reward_plugins.monitor import monitor_keys

    args = grpo_args(models, tmp_path, "--algo.kl.init_coef", "0.01")  # the KL in the loss: kl_ctl.value weighs it
    maker = make_maker(models, args, monitor_settings(tmp_path, "adapt_kl", kl_factor=3.0))
    controller = maker.kl_ctl  # the object PPOTrainer shares: it passes `kl_ctl.value` to the actors' fit (KL loss)
    keys = []
    for step in range(3):
        experiences = maker.make_experience_batch(rollouts(models, [{"id": 0}, {"id": 1}]))
        keys += [tuple(k for k in e.info if k.startswith("monitor/")) for e in experiences]
        assert maker.kl_ctl.value == pytest.approx(0.01 if step == 0 else 0.03)  # the alarm fires at step 1
    assert controller is maker.kl_ctl and len(set(keys)) == 1 and set(keys[0]) == set(monitor_keys(False))
    assert float(experiences[0].info["monitor/kl_scale"][0]) == 3.0 and float(experiences[0].info["monitor/alarm"][0]) == 1.0
    steps = [json.loads(line) for line in (tmp_path / "ckpt" / "monitor" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [0, 1, 2]
    manual_kl = np.mean([k for e in experiences for k in ((e.action_log_probs - e.base_action_log_probs) * e.action_mask).sum(-1).tolist()])
    assert steps[-1]["kl"] == pytest.approx(manual_kl, rel=1e-5)
    written = read_eval_file(list_eval_files(tmp_path / "eval")[-1])
    assert set(written.meta["monitor"]) == set(monitor_keys(False))
    # each eval's worst member: the eval rows' member components, standardised by the first eval's, by hand
    evals = [json.loads(line) for line in (tmp_path / "ckpt" / "monitor" / "evals.jsonl").read_text().splitlines()]
    eval_files = [read_eval_file(p) for p in list_eval_files(tmp_path / "eval")]
    members = json.loads((tmp_path / "ckpt" / "monitor" / "config.json").read_text())["member_keys"]
    scores = [np.array([[row.components[k] for row in f.rows] for k in members]) for f in eval_files]
    means, stds = scores[0].mean(axis=1), scores[0].std(axis=1)
    assert [r["step"] for r in evals] == [f.step for f in eval_files] and len(evals) == 3
    assert [r["worst_member"] for r in evals] == pytest.approx(
        [min(((x[i] - means[i]) / stds[i]).mean() for i in range(len(members))) for x in scores], abs=1e-9)


def test_monitor_stop_saves_keeps_and_resumes_through_the_trainer(ray_session, models, models_env, tmp_path):
    from openrlhf.trainer.ppo_trainer import BasePPOTrainer

    from openrlhf_ext import hooks

    args = openrlhf_args(models, tmp_path, "--algo.advantage.estimator", "reinforce_baseline",
                         "--ckpt.save_steps", "3", "--ckpt.path", str(tmp_path / "ds"))
    maker = make_maker(models, args, monitor_settings(tmp_path, "stop"))
    trainer = fake_trainer(maker, args)
    save = hooks.monitor_checkpoints(BasePPOTrainer.save_logs_and_checkpoints)
    for step in range(2):  # OpenRLHF: train_step(rollouts, global_step) then save_logs_and_checkpoints(global_step + 1)
        maker.global_step = step
        maker.make_experience_batch(rollouts(models, [{"id": 0}, {"id": 1}]))
        save(trainer, step + 1, {}, {"global_step": step + 1, "episode": 0})
    # the alarm fired at step 1; step 2 is not a save step (3), so the hook saved one at the alarm, with the monitor state
    (saved,) = trainer.actor_model_group.saved
    assert saved["tag"] == "global_step2" and saved["client_states"]["global_step"] == 2
    assert saved["client_states"][hooks.MONITOR_STATE_KEY]["series"]["steps"] == [0, 1]
    assert (tmp_path / "ds" / "_actor" / "latest").read_text() == "global_step2"
    stop = json.loads((tmp_path / "ckpt" / "monitor" / "stop.json").read_text())
    assert stop["kept_step"] == 2 and stop["alarm"]["step"] == 1
    assert trainer.samples_generator.generate_samples() == ([], 0.0, 0, True)  # fit's loop ends

    # Resume (--ckpt.load_enable): the actors return the kept checkpoint's client states; the monitor continues.
    resumed = make_maker(models, args, monitor_settings(tmp_path, "warn"))
    trainer = fake_trainer(resumed, args)
    restore = hooks.monitor_resume(lambda self: saved["client_states"])
    assert restore(trainer)["global_step"] == 2
    assert resumed.monitor.monitor.series.steps == [0, 1] and resumed.monitor.monitor.alarm.step == 1  # fired before
    resumed.global_step = 2
    resumed.make_experience_batch(rollouts(models, [{"id": 0}, {"id": 1}]))
    steps = [json.loads(line)["step"] for line in (tmp_path / "ckpt" / "monitor" / "steps.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


def test_launcher_refuses_a_monitor_without_reference_model(tmp_path, models):
    from openrlhf_ext.launch import LaunchError, preflight_monitor

    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump({"action": "warn"}))
    args = openrlhf_args(models, tmp_path, "--algo.kl.init_coef", "0")
    with pytest.raises(LaunchError, match="needs the KL to the reference model"):
        preflight_monitor(args, "reward.yaml", str(path))
    with pytest.raises(LaunchError, match="name the member components"):
        preflight_monitor(openrlhf_args(models, tmp_path), None, str(path))


def test_monitor_reads_members_from_the_rollout_side(ray_session, models, tmp_path):
    """With our reward server the members arrive as `reward/<member>` logs; `members` names them."""
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump({"members": ["seed1", "seed2"], "window": 2}))
    args = grpo_args(models, tmp_path, "--algo.kl.init_coef", "0.01")
    maker = make_maker(models, args, HookSettings(None, str(tmp_path / "eval"), 1, monitor_config=str(path)))
    rewards = [0.5, -0.25, 1.0, 0.125]
    logs = [{"reward/mean": r, "reward/seed1": r + 0.1 * i, "reward/seed2": r - 0.2 * i} for i, r in enumerate(rewards)]
    maker.make_experience_batch(rollouts(models, [{"id": 0}, {"id": 1}], rewards, logs))
    (record,) = [json.loads(line) for line in (tmp_path / "ckpt" / "monitor" / "steps.jsonl").read_text().splitlines()]
    # standardised by their own step-0 mean and std, the members differ by the 0.1 i and -0.2 i offsets
    members = np.array([[r + 0.1 * i for i, r in enumerate(rewards)], [r - 0.2 * i for i, r in enumerate(rewards)]])
    z = (members - members.mean(axis=1, keepdims=True)) / members.std(axis=1, keepdims=True)
    assert record["disagreement"] == pytest.approx(np.mean(np.abs(z[0] - z[1]) / 2))  # std of two values: half the gap
    assert record["disagreement"] > 0 and record["proxy"] == 0.0


@pytest.mark.parametrize("config, members", [("multihead_uwo5.yaml", "head"), ("lora_uwo5.yaml", "adapter")])
def test_one_pass_ensembles_score_the_whole_batch(ray_session, models, models_env, tmp_path, config, members):
    """The multi-head and LoRA ensembles in the experience maker: rewards as the pipeline gives them, members recorded."""
    config = str(Path(__file__).parents[1] / "configs" / "rewards" / config)
    args = openrlhf_args(models, tmp_path, "--algo.advantage.estimator", "reinforce_baseline", "--algo.kl.init_coef", "0")
    maker = make_maker(models, args, HookSettings(config, str(tmp_path / "eval"), 1), reference=False)
    experiences = maker.make_experience_batch(rollouts(models, [{"id": 0}, {"id": 1}]))
    tok = models.tokenizer
    samples = [
        Sample(prompt=e.prompts[row],
               response=tok.decode(e.sequences[row][-e.action_mask.shape[1] :][e.action_mask[row].bool()].tolist()))
        for e in experiences
        for row in range(len(e.sequences))
    ]
    expected = RewardPipeline.from_yaml(config).score(samples)
    np.testing.assert_allclose(torch.cat([e.info["reward"] for e in experiences]).numpy(), expected.rewards, rtol=1e-5)
    (path,) = list_eval_files(tmp_path / "eval")
    rows = read_eval_file(path).rows
    assert set(rows[0].components) == {*(f"{members}{i}" for i in range(5)), "variance", "combined"}
