#!/usr/bin/env bash
# Make a private certificate authority (CA) and a TLS certificate for the SuperLink.
#
# Usage: examples/deployment/secure/generate-certs.sh [OUTPUT_DIR] [NAME_OR_IP ...]
#
#   OUTPUT_DIR   where the files go (default: certificates/ beside this script);
#                it must not hold a CA already (remove it to start over)
#   NAME_OR_IP   the server machine's DNS names and IP addresses, as the
#                SuperNodes and `flwr` will address it, e.g. superlink.example.org
#                192.0.2.10. localhost and 127.0.0.1 are always included: the
#                SuperLink's own helpers reach its Runtime API on loopback with
#                the same certificate.
#
# Writes, in OUTPUT_DIR:
#   ca.crt       the CA certificate: copy it to every SuperNode machine and to
#                wherever `flwr` runs (it is public)
#   ca.key       the CA's private key: keep it offline; only needed to sign
#   server.pem   the SuperLink's certificate, signed by the CA, with the names
#                above as subject alternative names (SANs)
#   server.key   the SuperLink's private key: stays on the server machine
#
# For prototypes and research clusters. In production, use your organization's
# CA and its rules for key sizes, lifetimes and revocation.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
out_dir="${1:-$secure_dir/certificates}"
if [[ $# -gt 0 ]]; then shift; fi
days="${CERT_DAYS:-365}"

if ! command -v openssl >/dev/null; then
  echo "error: openssl is not installed" >&2
  exit 1
fi
if [[ -e "$out_dir/ca.key" ]]; then
  echo "error: OUTPUT_DIR=$out_dir already holds a CA (ca.key): remove it first" >&2
  exit 2
fi

# subjectAltName: loopback first, then every argument as IP: or DNS:.
ipv4='^([0-9]{1,3}\.){3}[0-9]{1,3}$'
san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
  if [[ "$name" =~ $ipv4 || "$name" == *:* ]]; then
    san+=",IP:$name"
  elif [[ "$name" =~ ^[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]]; then
    san+=",DNS:$name"
  else
    echo "error: NAME_OR_IP=$name is not allowed: expected a DNS name or an IP address" >&2
    exit 2
  fi
done
common_name="${1:-localhost}"

mkdir -p "$out_dir"
umask 077 # the private keys are readable by their owner only

# 1. The CA: a self-signed certificate that may sign others (and nothing else).
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha256 -days "$days" \
  -keyout "$out_dir/ca.key" -out "$out_dir/ca.crt" \
  -subj "/O=flwr-noise/CN=flwr-noise deployment CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign"

# 2. The SuperLink's key and certificate signing request.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha256 \
  -keyout "$out_dir/server.key" -out "$out_dir/server.csr" \
  -subj "/O=flwr-noise/CN=$common_name"

# 3. The CA signs it, for TLS server use, valid for the names in $san.
extensions="$out_dir/server.ext"
cat >"$extensions" <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$san
EOF
openssl x509 -req -in "$out_dir/server.csr" -CA "$out_dir/ca.crt" \
  -CAkey "$out_dir/ca.key" -CAcreateserial -sha256 -days "$days" \
  -extfile "$extensions" -out "$out_dir/server.pem"
rm -f "$out_dir/server.csr" "$extensions" "$out_dir/ca.srl"
chmod 644 "$out_dir/ca.crt" "$out_dir/server.pem"

openssl verify -CAfile "$out_dir/ca.crt" "$out_dir/server.pem" >/dev/null
echo "CA certificate:        $out_dir/ca.crt"
echo "SuperLink certificate: $out_dir/server.pem (key: $out_dir/server.key)"
echo "Valid for:             ${san//,/ }"
