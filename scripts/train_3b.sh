#!/usr/bin/env bash
# GRPO + VR-CLI for Qwen2.5-3B-Instruct: the 7B recipe with 16 samples per prompt (the paper's only change).
# Every variable of train_7b.sh can still be overridden (STAGE=baselines, EVAL_PRESET=paper|ours, ...);
# DRY_RUN=1 prints the resolved command.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export POLICY="${POLICY:-Qwen/Qwen2.5-3B-Instruct}"
export N_SAMPLES="${N_SAMPLES:-16}"
export RUN_DIR="${RUN_DIR:-$(dirname "$HERE")/runs/grpo_vrcli_3b}"
exec "$HERE/train_7b.sh" "$@"
