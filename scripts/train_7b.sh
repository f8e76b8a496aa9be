#!/usr/bin/env bash
# GRPO with the VR-CLI reward scored on the reference model (Gurung & Lapata 2025, rl_training/train_7b.sh),
# translated to OpenRLHF 0.11.2 flags and run through openrlhf_ext.launch. 8 GPUs: actor 4 + reference 4
# (colocated), vLLM 2 engines x TP 2. Every variable below can be overridden from the environment;
# DRY_RUN=1 prints the resolved command and exits. EXTRA_ARGS is appended (word-split).
#
# Two stages (STAGE): `baselines` computes the baseline perplexities with the numerics the reference model
# trains with (PARAM_DTYPE, ATTN: the fingerprint records them and the reward refuses other values):
#   setup_rl_data.py (story records or chat lines with the paper's sections) -> rl_data/,
#   STAGE=baselines scripts/train_7b.sh -> rl_data_with_baseline/ (fingerprinted for vrcli_reference.yaml);
# `train` (the default) runs GRPO on rl_data_with_baseline/.
#
# Held-out evaluation, scored in the trainer by the same reward (eval/vrcli_reward, eval/vrcli_improvement,
# eval/vrcli_improved_share), has two presets (EVAL_PRESET):
# - paper (the default here, because these scripts reproduce the paper and its eval curves were measured
#   this way): as the authors' fork evaluated (its rl_training/ray_utils.py and experience_maker.py): the
#   test split (its --eval_split never reached the data loader, whose default is "test"), one sample per
#   prompt at T 0.7, top_p 0.8, top_k 20, and an eval before training. Not reproduced: vLLM's best_of 2 (the
#   likelier of two samples), which neither OpenRLHF 0.11.2 nor vLLM's V1 engine offers.
# - ours: the validation split at the rollout temperature without top-p/top-k, so the test split stays
#   untouched for the final evaluation and the eval KL estimates are unbiased; recommended for new work.
# Remaining differences from the paper's rl_training/train_7b.sh, and why:
# - --torch_compile has no 0.11.2 flag.
# - OpenRLHF 0.11.2 instead of the authors' 0.6.1 fork: same estimator (group_norm), loss (PPO clip, now
#   with --actor.loss_agg_mode seq-mean-token-mean: per-sequence token mean, then the mean over sequences,
#   as the paper), k3 KL loss, scheduler (cosine_with_min_lr, warmup 0.03, min 0.1 lr), Adam betas and clip.
# - The reward-side differences (context cut at 16384 tokens, empty plan = error) are listed in
#   configs/rewards/vrcli_reference.yaml.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PYTHON="${PYTHON:-$([[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python3)}"  # the project .venv when there is one
STAGE="${STAGE:-train}"                                   # baselines | train
POLICY="${POLICY:-Qwen/Qwen2.5-7B-Instruct-1M}"
NICE_NAME="${NICE_NAME:-$(basename "$POLICY")}"           # file names of the baseline table
RAW_DATA="${RAW_DATA:-$ROOT/rl_data}"                     # setup_rl_data.py's output
DATA="${DATA:-json@$ROOT/rl_data_with_baseline}"         # {prompt: messages, label: {gold, baseline_ppl, ...}}
REWARD_CONFIG="${REWARD_CONFIG:-$ROOT/configs/rewards/vrcli_reference.yaml}"
RUN_DIR="${RUN_DIR:-$ROOT/runs/grpo_vrcli_7b}"
PARAM_DTYPE="${PARAM_DTYPE:-bf16}"                        # the reference model's weights (--ds.param_dtype)
ATTN="${ATTN:-flash_attention_2}"                         # its attention kernel (--ds.attn_implementation)
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
EVAL_PRESET="${EVAL_PRESET:-paper}"                      # paper | ours (see above)
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

case "$PARAM_DTYPE" in bf16) TORCH_DTYPE=bfloat16 ;; fp16) TORCH_DTYPE=float16 ;; *) TORCH_DTYPE="$PARAM_DTYPE" ;; esac
case "$EVAL_PRESET" in
  paper) EVAL=(--eval.split test --eval.temperature 0.7 --eval.n_samples_per_prompt 1)
         HOOK_EVAL=(--eval-top-p 0.8 --eval-top-k 20 --eval-before-training) ;;
  ours)  EVAL=(--eval.split validation --eval.temperature "$TEMPERATURE" --eval.n_samples_per_prompt 1)
         HOOK_EVAL=() ;;
  *) echo "EVAL_PRESET must be paper or ours, got '$EVAL_PRESET'" >&2; exit 2 ;;
esac

case "$STAGE" in
  baselines)
    CMD=(
      "$PYTHON" "$ROOT/setup_data/compute_baseline_perplexity.py" --model_name "$POLICY" --nice_model_name "$NICE_NAME"
      --data_dir "$RAW_DATA" --reward_config "$REWARD_CONFIG" --temperature "$TEMPERATURE"
      --torch_dtype "$TORCH_DTYPE" --attn_implementation "$ATTN"
      "${EXTRA[@]}"
    ) ;;
  train)
    CMD=(
      "$PYTHON" -m openrlhf_ext.launch
      --reward-config "$REWARD_CONFIG" --eval-dir "$RUN_DIR/eval" --eval-every "$EVAL_EVERY" "${HOOK_EVAL[@]}"
      --
      --actor.model_name_or_path "$POLICY"
      --reward.remote_url "$ROOT/openrlhf_ext/deferred_reward.py"
      --actor.num_nodes 1 --actor.num_gpus_per_node "$ACTOR_GPUS"
      --ref.num_nodes 1 --ref.num_gpus_per_node "$ACTOR_GPUS" --train.colocate_actor_ref --ref.offload
      --vllm.num_engines "$VLLM_ENGINES" --vllm.tensor_parallel_size "$VLLM_TP"
      --vllm.gpu_memory_utilization 0.9 --vllm.enable_prefix_caching
      --ds.zero_stage 3 --ds.adam_offload --ds.param_dtype "$PARAM_DTYPE" --ds.attn_implementation "$ATTN"
      --ds.use_liger_kernel --actor.gradient_checkpointing_enable
      --data.prompt_dataset "$DATA" --data.input_key prompt --data.label_key label --data.apply_chat_template
      --data.max_samples "$MAX_SAMPLES" --data.max_len "$MAX_LEN" --rollout.max_new_tokens "$MAX_NEW_TOKENS"
      --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt "$N_SAMPLES"
      --rollout.temperature "$TEMPERATURE" --rollout.top_p 1.0
      --rollout.batch_size "$ROLLOUT_BATCH" --rollout.micro_batch_size 1
      --train.batch_size "$TRAIN_BATCH" --train.micro_batch_size 1
      --train.max_epochs 1 --train.num_episodes "$EPISODES" --train.seed 42
      --actor.adam.lr "$LR" --actor.loss_agg_mode seq-mean-token-mean
      --eval.dataset "$DATA" --eval.steps "$EVAL_EVERY" "${EVAL[@]}"
      --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef "$KL_COEF"
      --ckpt.path "$RUN_DIR/checkpoints" --ckpt.output_dir "$RUN_DIR/final" --ckpt.save_steps "$SAVE_STEPS"
      --ckpt.load_enable
      --logger.tensorboard_dir "$RUN_DIR/tensorboard"
      "${EXTRA[@]}"
    ) ;;
  *) echo "STAGE must be baselines or train, got '$STAGE'" >&2; exit 2 ;;
esac
if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
cd "$ROOT" && exec "${CMD[@]}"
