#!/usr/bin/env bash
# Make an authentication key pair for each SuperNode.
#
# Usage: examples/deployment/secure/generate-supernode-keys.sh OUTPUT_DIR NAME [NAME ...]
#
#   OUTPUT_DIR  where the keys go (e.g. keys/)
#   NAME        one per SuperNode, e.g. supernode-0 supernode-1
#
# Writes, for each NAME, an elliptic-curve (NIST P-384) key pair in OpenSSH
# format, the format Flower 1.39 reads:
#   OUTPUT_DIR/NAME      private key: stays on that SuperNode's machine, given
#                        to `flower-supernode --auth-supernode-private-key`
#   OUTPUT_DIR/NAME.pub  public key: registered at the SuperLink with
#                        `flwr supernode register OUTPUT_DIR/NAME.pub CONNECTION`
#
# Better still, run it on each client machine for that machine's SuperNode
# and send only the .pub file to whoever registers SuperNodes.
set -euo pipefail

usage="usage: $0 OUTPUT_DIR NAME [NAME ...]"
if [[ $# -lt 2 ]]; then
  echo "$usage" >&2
  exit 2
fi
out_dir="$1"
shift
if ! command -v ssh-keygen >/dev/null; then
  echo "error: ssh-keygen is not installed (package openssh-client)" >&2
  exit 1
fi
for name in "$@"; do
  if ! [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]]; then
    echo "error: NAME=$name is not allowed: expected letters, digits, '.', '_', '-'" >&2
    exit 2
  fi
  if [[ -e "$out_dir/$name" ]]; then
    echo "error: $out_dir/$name exists already: remove it or choose another NAME" >&2
    exit 2
  fi
done

mkdir -p "$out_dir"
for name in "$@"; do
  # -N '': no passphrase (the SuperNode reads the key unattended); -C: a label.
  ssh-keygen -q -t ecdsa -b 384 -N '' -C "$name" -f "$out_dir/$name"
  echo "SuperNode key pair: $out_dir/$name (private), $out_dir/$name.pub (public)"
done
