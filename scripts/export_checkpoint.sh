#!/usr/bin/env bash
# Usage: scripts/export_checkpoint.sh CKPT_DIR OUT_DIR [TAG]
# An OpenRLHF checkpoint (--ckpt.path, or its _actor folder) to a Hugging Face model folder. Uses the
# global_stepN_hf folder when OpenRLHF saved one, else DeepSpeed's zero_to_fp32 on the ZeRO shards with the
# config and tokenizer of BASE_MODEL. Env: BASE_MODEL, DTYPE (float32|bfloat16|float16), PYTHON,
# EXTRA_ARGS (e.g. "--from-zero --overwrite"). DRY_RUN=1 prints the resolved command and exits.
set -euo pipefail
if [[ $# -lt 2 || $# -gt 3 ]]; then echo "usage: $0 CKPT_DIR OUT_DIR [TAG]" >&2; exit 2; fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$([[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python3)}"  # the project .venv when there is one
DTYPE="${DTYPE:-float32}"
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"

CMD=("$PYTHON" -m openrlhf_ext.export "$1" "$2" --dtype "$DTYPE")
[[ $# -eq 3 ]] && CMD+=(--tag "$3")
[[ -n "${BASE_MODEL:-}" ]] && CMD+=(--base-model "$BASE_MODEL")
CMD+=("${EXTRA[@]}")
if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
