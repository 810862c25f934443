#!/usr/bin/env bash
# Start a SuperNode that verifies the SuperLink over TLS and authenticates
# itself with its key (client machine).
#
# Usage: examples/deployment/secure/start-supernode-secure.sh SUPERLINK_ADDRESS PRIVATE_KEY [extra flower-supernode flags]
#
#   SUPERLINK_ADDRESS  the SuperLink's Fleet API, e.g. superlink.example.org:9092;
#                      the name or IP must be one of its certificate's names
#   PRIVATE_KEY        this SuperNode's private key from generate-supernode-keys.sh;
#                      its public key must be registered at the SuperLink
#   extra flags        e.g. --node-config "partition-id=0 num-partitions=2"
#
# Environment (optional):
#   CA_CERT            the CA certificate that signed the SuperLink's
#                      certificate (default: certificates/ca.crt beside this script)
#   SUPERNODE_PORT     this SuperNode's local Runtime API port (default 9094;
#                      give each SuperNode on the same machine its own)
#   FLWR_NOISE_VENV    virtual environment with flwr-noise installed
#                      (default: the project's .venv)
set -euo pipefail

if [[ $# -lt 2 ]]; then
  echo "usage: $0 SUPERLINK_ADDRESS PRIVATE_KEY [extra flower-supernode flags]" >&2
  exit 2
fi
superlink_address="$1"
private_key="$2"
shift 2

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
ca_cert="${CA_CERT:-$secure_dir/certificates/ca.crt}"
require_file PRIVATE_KEY "$private_key"
require_file CA_CERT "$ca_cert"
use_project_venv flower-supernode

# The Runtime API (--host/--port) is this SuperNode's own, on loopback: its
# ClientApp processes talk to it unencrypted, as they never leave the machine.
exec flower-supernode \
  --superlink "$superlink_address" \
  --root-certificates "$ca_cert" \
  --auth-supernode-private-key "$private_key" \
  --host 127.0.0.1 \
  --port "${SUPERNODE_PORT:-9094}" \
  "$@"
