#!/usr/bin/env bash
# PPO against a 5-member UWO ensemble (Coste et al. 2024: mean - 0.1 * variance); otherwise the train_ppo_rm.sh recipe.
# ENSEMBLE picks the ensemble:
#   models     (default) 5 separate RMs served by our reward server; start it first, e.g.
#              python -m openrlhf_ext.serve --config configs/rewards/ensemble_uwo5.yaml --host 127.0.0.1 --port 5000
#   multihead  one RM with 5 heads (configs/rewards/multihead_uwo5_placed.yaml), scored in one pass by a GPU actor
#              of the training job itself: no server to start
#   lora       5 LoRA adapters on one base (configs/rewards/lora_uwo5_placed.yaml), likewise
# REWARD_CONFIG overrides the placed file for multihead / lora. Eval files carry every member's score and the
# ensemble variance. DRY_RUN=1 prints the command.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
ENSEMBLE="${ENSEMBLE:-models}"
case "$ENSEMBLE" in
  models)
    export REWARD_URL="${REWARD_URL:-http://127.0.0.1:5000/get_reward}"
    export RUN_DIR="${RUN_DIR:-$ROOT/runs/ppo_ensemble_uwo0.1}" ;;
  multihead|lora)
    export REWARD_URL="$ROOT/openrlhf_ext/deferred_reward.py"   # the trainer scores; rollouts carry no reward
    export EXTRA_ARGS="--reward-config ${REWARD_CONFIG:-$ROOT/configs/rewards/${ENSEMBLE}_uwo5_placed.yaml} ${EXTRA_ARGS:-}"
    export RUN_DIR="${RUN_DIR:-$ROOT/runs/ppo_${ENSEMBLE}_uwo0.1}" ;;
  *)
    echo "train_ppo_ensemble.sh: ENSEMBLE must be models, multihead or lora, got '$ENSEMBLE'" >&2
    exit 2 ;;
esac
exec "$HERE/train_ppo_rm.sh" "$@"
