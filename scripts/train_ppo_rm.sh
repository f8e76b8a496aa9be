#!/usr/bin/env bash
# PPO (GAE) against one reward model served by our reward server (Coste et al. 2024 single-RM setting,
# translated to OpenRLHF 0.11.2). Start the server first, e.g.:
#   python -m openrlhf_ext.serve --config configs/rewards/reward_model.yaml --host 127.0.0.1 --port 5000
# The launcher installs the experience-maker hook, which writes eval files every EVAL_EVERY steps to
# $RUN_DIR/eval (prompts, answers, proxy and per-member scores, KL to the reference) for gold evaluation.
# Every variable can be overridden from the environment; DRY_RUN=1 prints the resolved command and exits.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PYTHON="${PYTHON:-$([[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python3)}"  # the project .venv when there is one
POLICY="${POLICY:-tlc4418/pythia_1.4b_sft_policy}"
DATA="${DATA:-$ROOT/data/prompts/train.jsonl}"
REWARD_URL="${REWARD_URL:-http://127.0.0.1:5000/get_reward}"
RUN_DIR="${RUN_DIR:-$ROOT/runs/ppo_rm}"
ACTOR_GPUS="${ACTOR_GPUS:-2}"
CRITIC_GPUS="${CRITIC_GPUS:-2}"
VLLM_ENGINES="${VLLM_ENGINES:-2}"
ROLLOUT_BATCH="${ROLLOUT_BATCH:-256}"                    # paper Table 3: 256 rollouts, batch 32, 4 PPO epochs
ROLLOUT_MICRO="${ROLLOUT_MICRO:-32}"
TRAIN_BATCH="${TRAIN_BATCH:-32}"
PPO_EPOCHS="${PPO_EPOCHS:-4}"
EPISODES="${EPISODES:-1}"
MAX_LEN="${MAX_LEN:-776}"                                # 520 instruction + 256 answer tokens
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-256}"
LR="${LR:-1e-6}"
KL_COEF="${KL_COEF:-0.01}"                               # fixed beta; 0.2 for single RMs in Fig. 6
EVAL_EVERY="${EVAL_EVERY:-100}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

CMD=(
  "$PYTHON" -m openrlhf_ext.launch --eval-dir "$RUN_DIR/eval" --eval-every "$EVAL_EVERY"
  --
  --actor.model_name_or_path "$POLICY"
  --reward.remote_url "$REWARD_URL"
  --actor.num_nodes 1 --actor.num_gpus_per_node "$ACTOR_GPUS"
  --ref.num_nodes 1 --ref.num_gpus_per_node "$ACTOR_GPUS" --train.colocate_actor_ref
  --critic.num_nodes 1 --critic.num_gpus_per_node "$CRITIC_GPUS"
  --vllm.num_engines "$VLLM_ENGINES" --vllm.tensor_parallel_size 1
  --ds.zero_stage 2 --ds.param_dtype bf16 --actor.gradient_checkpointing_enable
  --data.prompt_dataset "$DATA" --data.input_key prompt --data.label_key label
  --data.max_len "$MAX_LEN" --rollout.max_new_tokens "$MAX_NEW_TOKENS"
  --algo.advantage.estimator gae --algo.advantage.lambd 0.95 --actor.eps_clip 0.2
  --rollout.temperature 1.0 --rollout.top_p 1.0
  --rollout.batch_size "$ROLLOUT_BATCH" --rollout.micro_batch_size "$ROLLOUT_MICRO"
  --train.batch_size "$TRAIN_BATCH" --train.micro_batch_size 4
  --train.max_epochs "$PPO_EPOCHS" --train.num_episodes "$EPISODES" --train.seed 42
  --actor.adam.lr "$LR" --actor.adam.betas 0.9 0.95
  --algo.kl.init_coef "$KL_COEF" --algo.kl.estimator k1
  --ckpt.path "$RUN_DIR/checkpoints" --ckpt.output_dir "$RUN_DIR/final" --ckpt.save_steps 1000
  --logger.tensorboard_dir "$RUN_DIR/tensorboard"
  "${EXTRA[@]}"
)
if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
cd "$ROOT" && exec "${CMD[@]}"
