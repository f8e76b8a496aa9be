#!/usr/bin/env bash
# PPO against the 5-member UWO ensemble (Coste et al. 2024: mean - 0.1 * variance) served by our reward
# server; otherwise the train_ppo_rm.sh recipe. Start the server first, e.g.:
#   python -m openrlhf_ext.serve --config configs/rewards/ensemble_uwo5.yaml --host 127.0.0.1 --port 5000
# Eval files then carry every member's score and the ensemble variance. DRY_RUN=1 prints the command.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export REWARD_URL="${REWARD_URL:-http://127.0.0.1:5000/get_reward}"
export RUN_DIR="${RUN_DIR:-$(dirname "$HERE")/runs/ppo_ensemble_uwo0.1}"
exec "$HERE/train_ppo_rm.sh" "$@"
