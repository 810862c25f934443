#!/usr/bin/env bash
# Start a SuperNode on a client machine (insecure: no TLS yet).
#
# Usage: examples/deployment/start-supernode.sh SUPERLINK_ADDRESS PARTITION_ID NUM_PARTITIONS [DATA_DIR]
#
#   SUPERLINK_ADDRESS  the SuperLink's Fleet API, e.g. 192.0.2.10:9092
#   PARTITION_ID       this client's partition, 0 .. NUM_PARTITIONS-1
#   NUM_PARTITIONS     how many clients share the data set
#   DATA_DIR           optional: this machine's folder of MNIST IDX files
#                      (used by runs with dataset='mnist')
#
# Environment (optional):
#   SUPERNODE_PORT     this SuperNode's local Runtime API port (default 9094;
#                      give each SuperNode on the same machine its own)
#   FLWR_NOISE_VENV    virtual environment with flwr-noise installed
#                      (default: the project's .venv)
#
# The ClientApp reads these values from its context.node_config under the
# keys partition-id, num-partitions and data-dir.
set -euo pipefail

usage="usage: $0 SUPERLINK_ADDRESS PARTITION_ID NUM_PARTITIONS [DATA_DIR]"
if [[ $# -lt 3 || $# -gt 4 ]]; then
  echo "$usage" >&2
  exit 2
fi
superlink_address="$1"
partition_id="$2"
num_partitions="$3"
if ! [[ "$partition_id" =~ ^[0-9]+$ && "$num_partitions" =~ ^[1-9][0-9]*$ ]] ||
  ((partition_id >= num_partitions)); then
  echo "error: PARTITION_ID=$partition_id NUM_PARTITIONS=$num_partitions is not allowed:" \
    "expected integers with 0 <= PARTITION_ID < NUM_PARTITIONS" >&2
  exit 2
fi

# Flower reads each value as TOML: strings need quotes.
node_config="partition-id=$partition_id num-partitions=$num_partitions"
if [[ $# -eq 4 ]]; then
  if [[ ! -d "$4" ]]; then
    echo "error: DATA_DIR=$4 is not allowed: expected an existing folder" >&2
    exit 2
  fi
  data_dir="$(cd "$4" && pwd)"
  if [[ "$data_dir" == *"'"* ]]; then
    echo "error: DATA_DIR=$data_dir is not allowed: expected a path without \"'\"" >&2
    exit 2
  fi
  node_config+=" data-dir='$data_dir'"
fi

project_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${FLWR_NOISE_VENV:-$project_root/.venv}"
if [[ ! -x "$venv/bin/flower-supernode" ]]; then
  echo "error: no flower-supernode in $venv/bin; install the project first:" >&2
  echo "  python3 -m venv .venv && .venv/bin/pip install -e ." >&2
  exit 1
fi
# The SuperNode starts its helpers (flower-superexec, flwr-clientapp) by name.
export PATH="$venv/bin:$PATH"

exec flower-supernode \
  --insecure \
  --superlink "$superlink_address" \
  --host 127.0.0.1 \
  --port "${SUPERNODE_PORT:-9094}" \
  --node-config "$node_config"
