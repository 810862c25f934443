#!/usr/bin/env bash
# Start the SuperLink with TLS and SuperNode authentication (server machine).
#
# Usage: examples/deployment/secure/start-superlink-secure.sh [extra flower-superlink flags]
#
# Environment (all optional):
#   CERTS_DIR           ca.crt, server.pem and server.key from generate-certs.sh
#                       (default: certificates/ beside this script)
#   FLEET_API_ADDRESS   where the SuperNodes connect over gRPC (default 0.0.0.0:9092)
#   CONTROL_API_HOST    where `flwr` connects over HTTPS (default 127.0.0.1:
#                       this machine only)
#   CONTROL_API_PORT    (default 8000)
#   FLWR_NOISE_VENV     virtual environment with flwr-noise installed
#                       (default: the project's .venv)
#
# Every API (Fleet, Control, and the Runtime API its ServerApps use) is served
# with TLS. Only SuperNodes whose public keys were registered with
# `flwr supernode register` may connect. Stop it with Ctrl-C.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
certs_dir="${CERTS_DIR:-$secure_dir/certificates}"
require_file "CERTS_DIR/ca.crt" "$certs_dir/ca.crt"
require_file "CERTS_DIR/server.pem" "$certs_dir/server.pem"
require_file "CERTS_DIR/server.key" "$certs_dir/server.key"
use_project_venv flower-superlink
# The ServerApp runs in this environment: no `uv sync` into a fresh one.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

exec flower-superlink \
  --ssl-ca-certfile "$certs_dir/ca.crt" \
  --ssl-certfile "$certs_dir/server.pem" \
  --ssl-keyfile "$certs_dir/server.key" \
  --enable-supernode-auth \
  --disable-runtime-dependency-installation \
  --fleet-api-address "${FLEET_API_ADDRESS:-0.0.0.0:9092}" \
  --host "${CONTROL_API_HOST:-127.0.0.1}" \
  --port "${CONTROL_API_PORT:-8000}" \
  "$@"
