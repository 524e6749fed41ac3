#!/usr/bin/env bash
# Main job: train the default model on 8 fake CPU devices (FSDP x tensor).
# Extra arguments go to launch/train.py (e.g. --steps=200 --mesh=data=2,fsdp=2,tensor=2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
exec python -m launch.train "$@"
