#!/usr/bin/env bash
# GRPO with the VR-CLI reward scored on the reference model (Gurung & Lapata 2025, rl_training/train_7b.sh),
# translated to OpenRLHF 0.11.2 flags and run through openrlhf_ext.launch. 8 GPUs: actor 4 + reference 4
# (colocated), vLLM 2 engines x TP 2. Every variable below can be overridden from the environment;
# DRY_RUN=1 prints the resolved command and exits. EXTRA_ARGS is appended (word-split).
# Data: setup_rl_data.py on the paper's story records (prompts ask for a plan), then
# compute_baseline_perplexity.py --model_name "$POLICY" (writes rl_data_with_baseline/, fingerprinted for
# configs/rewards/vrcli_reference.yaml). Held-out evaluation: the validation split every EVAL_EVERY steps,
# scored in the trainer by the same reward (eval/vrcli_reward, eval/vrcli_improvement, eval/vrcli_improved_share).
# Remaining differences from the paper's rl_training/train_7b.sh, and why:
# - --torch_compile has no 0.11.2 flag.
# - Held-out eval samples EVAL_SAMPLES (1) answer per prompt at --eval.temperature TEMPERATURE; the paper's
#   fork evaluated with its rollout settings (its exact eval sampling is not recorded in the scripts).
# - OpenRLHF 0.11.2 instead of the authors' 0.6.1 fork: same estimator (group_norm), loss (PPO clip, now
#   with --actor.loss_agg_mode seq-mean-token-mean: per-sequence token mean, then the mean over sequences,
#   as the paper), k3 KL loss, scheduler (cosine_with_min_lr, warmup 0.03, min 0.1 lr), Adam betas and clip.
# - The reward-side differences (context cut at 16384 tokens, gold-only scored tokens, empty plan = error)
#   are listed in configs/rewards/vrcli_reference.yaml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PYTHON="${PYTHON:-$([[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python3)}"  # the project .venv when there is one
POLICY="${POLICY:-Qwen/Qwen2.5-7B-Instruct-1M}"
DATA="${DATA:-json@$ROOT/rl_data_with_baseline}"         # {prompt: messages, label: {gold, baseline_ppl, ...}}
REWARD_CONFIG="${REWARD_CONFIG:-$ROOT/configs/rewards/vrcli_reference.yaml}"
RUN_DIR="${RUN_DIR:-$ROOT/runs/grpo_vrcli_7b}"
ACTOR_GPUS="${ACTOR_GPUS:-4}"
VLLM_ENGINES="${VLLM_ENGINES:-2}"
VLLM_TP="${VLLM_TP:-2}"
N_SAMPLES="${N_SAMPLES:-8}"
ROLLOUT_BATCH="${ROLLOUT_BATCH:-64}"
TRAIN_BATCH="${TRAIN_BATCH:-64}"
EPISODES="${EPISODES:-20}"
MAX_SAMPLES="${MAX_SAMPLES:-100000}"
MAX_LEN="${MAX_LEN:-14048}"                              # prompt 12000 + generation 2048
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-2048}"
LR="${LR:-5e-7}"
KL_COEF="${KL_COEF:-1e-6}"                               # > 0 keeps the reference model that VR-CLI scores with
TEMPERATURE="${TEMPERATURE:-1.0}"                        # must equal the baselines' temperature
SAVE_STEPS="${SAVE_STEPS:-16}"
EVAL_EVERY="${EVAL_EVERY:-8}"
EVAL_SAMPLES="${EVAL_SAMPLES:-1}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

CMD=(
  "$PYTHON" -m openrlhf_ext.launch
  --reward-config "$REWARD_CONFIG" --eval-dir "$RUN_DIR/eval" --eval-every "$EVAL_EVERY"
  --
  --actor.model_name_or_path "$POLICY"
  --reward.remote_url "$ROOT/openrlhf_ext/deferred_reward.py"
  --actor.num_nodes 1 --actor.num_gpus_per_node "$ACTOR_GPUS"
  --ref.num_nodes 1 --ref.num_gpus_per_node "$ACTOR_GPUS" --train.colocate_actor_ref --ref.offload
  --vllm.num_engines "$VLLM_ENGINES" --vllm.tensor_parallel_size "$VLLM_TP"
  --vllm.gpu_memory_utilization 0.9 --vllm.enable_prefix_caching
  --ds.zero_stage 3 --ds.adam_offload --ds.param_dtype bf16 --ds.attn_implementation flash_attention_2
  --ds.use_liger_kernel --actor.gradient_checkpointing_enable
  --data.prompt_dataset "$DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template
  --data.max_samples "$MAX_SAMPLES" --data.max_len "$MAX_LEN" --rollout.max_new_tokens "$MAX_NEW_TOKENS"
  --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt "$N_SAMPLES"
  --rollout.temperature "$TEMPERATURE" --rollout.top_p 1.0
  --rollout.batch_size "$ROLLOUT_BATCH" --rollout.micro_batch_size 1
  --train.batch_size "$TRAIN_BATCH" --train.micro_batch_size 1
  --train.max_epochs 1 --train.num_episodes "$EPISODES" --train.seed 42
  --actor.adam.lr "$LR" --actor.loss_agg_mode seq-mean-token-mean
  --eval.dataset "$DATA" --eval.split validation --eval.steps "$EVAL_EVERY"
  --eval.temperature "$TEMPERATURE" --eval.n_samples_per_prompt "$EVAL_SAMPLES"
  --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef "$KL_COEF"
  --ckpt.path "$RUN_DIR/checkpoints" --ckpt.output_dir "$RUN_DIR/final" --ckpt.save_steps "$SAVE_STEPS"
  --ckpt.load_enable
  --logger.tensorboard_dir "$RUN_DIR/tensorboard"
  "${EXTRA[@]}"
)
if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
cd "$ROOT" && exec "${CMD[@]}"
