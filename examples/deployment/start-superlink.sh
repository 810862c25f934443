#!/usr/bin/env bash
# Start the SuperLink on the server machine (insecure: no TLS yet).
#
# Usage: examples/deployment/start-superlink.sh [extra flower-superlink flags]
#
# Environment (all optional):
#   FLEET_API_ADDRESS   where the SuperNodes connect over gRPC (default 0.0.0.0:9092)
#   CONTROL_API_HOST    where `flwr run` connects (default 127.0.0.1: this machine only)
#   CONTROL_API_PORT    (default 8000)
#   FLWR_NOISE_VENV     virtual environment with flwr-noise installed
#                       (default: the project's .venv)
#
# Stop it with Ctrl-C. Extra flags go to flower-superlink, e.g.
# `--database superlink.db` to keep runs across restarts.
set -euo pipefail

project_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${FLWR_NOISE_VENV:-$project_root/.venv}"
if [[ ! -x "$venv/bin/flower-superlink" ]]; then
  echo "error: no flower-superlink in $venv/bin; install the project first:" >&2
  echo "  python3 -m venv .venv && .venv/bin/pip install -e ." >&2
  exit 1
fi
# The SuperLink starts its helpers (flower-superexec, flwr-serverapp) by name,
# and the ServerApp must run in this environment: no `uv sync` of the App's
# dependencies (several GB of PyTorch) into a fresh one.
export PATH="$venv/bin:$PATH"
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

exec flower-superlink \
  --insecure \
  --disable-runtime-dependency-installation \
  --fleet-api-address "${FLEET_API_ADDRESS:-0.0.0.0:9092}" \
  --host "${CONTROL_API_HOST:-127.0.0.1}" \
  --port "${CONTROL_API_PORT:-8000}" \
  "$@"
