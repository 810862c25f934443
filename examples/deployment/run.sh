#!/usr/bin/env bash
# Run the flwr-noise App on a running deployment and stream its logs.
#
# Usage: examples/deployment/run.sh [CONTROL_ADDRESS] [extra `flwr run` flags]
#
#   CONTROL_ADDRESS  the SuperLink's Control API (default 127.0.0.1:8000)
#
# It writes (or updates) the connection [superlink.flwr-noise-deployment]
# (name: $FLWR_CONNECTION) with that address and `insecure = true` in the
# Flower configuration file ($FLWR_HOME/config.toml, default ~/.flwr), then
# runs `flwr run <project> flwr-noise-deployment --stream`. For example:
#
#   examples/deployment/run.sh 127.0.0.1:8000 \
#     --run-config "num-server-rounds=10 dataset='mnist' data-dir='/data/mnist'"
set -euo pipefail

control_address="127.0.0.1:8000"
if [[ $# -gt 0 && "$1" != -* ]]; then
  control_address="$1"
  shift
fi
connection="${FLWR_CONNECTION:-flwr-noise-deployment}"
project_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${FLWR_NOISE_VENV:-$project_root/.venv}"
export PATH="$venv/bin:$PATH"

# `flwr config list` creates the default configuration file when it is missing.
flwr config list >/dev/null
python - "$connection" "$control_address" <<'PYTHON'
import sys

import tomli
import tomli_w
from flwr.supercore.utils import get_flwr_home

name, address = sys.argv[1:]
path = get_flwr_home() / "config.toml"
config = tomli.loads(path.read_text())
config.setdefault("superlink", {})[name] = {"address": address, "insecure": True}
path.write_text(tomli_w.dumps(config))
print(f"Connection [superlink.{name}] -> {address} (insecure) in {path}")
PYTHON

exec flwr run "$project_root" "$connection" --stream "$@"
