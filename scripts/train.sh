#!/usr/bin/env bash
# Main job: pre-train lm_tiny (a byte-level Llama-style LM) on the Python
# standard library's sources, on 8 fake CPU devices (FSDP x tensor), then print
# a sample from the final checkpoint.
# WORKDIR (default: a new directory under /tmp) holds config.json,
# metrics.jsonl, TensorBoard events and checkpoints; rerunning with the same
# WORKDIR resumes. Extra arguments go to launch.train (e.g. --config.steps=100).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
WORKDIR="${WORKDIR:-$(mktemp -d /tmp/spmdnnx-lm_tiny.XXXXXX)}"
python -m launch.train --config=configs/lm_tiny.py --workdir="$WORKDIR" --fake_devices=8 "$@"
python -m launch.sample --workdir="$WORKDIR" --prompt="def " --max_new_tokens=200 \
  --fake_devices=8
