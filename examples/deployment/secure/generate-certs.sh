#!/usr/bin/env bash
# Make a private certificate authority (CA) and a TLS certificate for the SuperLink.
#
# Usage: examples/deployment/secure/generate-certs.sh [OUTPUT_DIR] [NAME_OR_IP ...]
#
#   OUTPUT_DIR   where the files go (default: certificates/ beside this script);
#                it must not hold any of them already (remove them to start
#                over). They are built in a temporary folder beside it and
#                moved there only when all of them were made.
#   NAME_OR_IP   the server machine's DNS names and IP addresses, one per
#                argument and nothing else, as the SuperNodes and `flwr` will
#                address it, e.g. superlink.example.org 192.0.2.10.
#                localhost and 127.0.0.1 are always included: the SuperLink's
#                own helpers reach its Runtime API on loopback with the same
#                certificate.
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
for file in ca.crt ca.key server.pem server.key; do
  if [[ -e "$out_dir/$file" ]]; then
    echo "error: OUTPUT_DIR=$out_dir already holds $file (a CA or a certificate): remove it first" >&2
    exit 2
  fi
done

# Each argument is exactly one IPv4 address, IPv6 address or DNS name. Nothing
# else (no ',', '/', '=', ':' outside an IPv6 address, spaces or newlines)
# reaches openssl's SAN list or subject, so no argument can add a name or an
# extension.
octet='(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])'
ipv4="^($octet\.){3}$octet\$"
ipv6_full='^([0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}$'
ipv6_short='^([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4})*)?::([0-9A-Fa-f]{1,4}(:[0-9A-Fa-f]{1,4})*)?$'
label='[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?'
dns="^(\*\.)?$label(\.$label)*\$"
san="DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
  if [[ "$name" =~ $ipv4 || "$name" =~ $ipv6_full ]] ||
    [[ "$name" =~ $ipv6_short && ${#name} -le 39 ]]; then
    san+=",IP:$name"
  elif [[ "$name" =~ $dns && ${#name} -le 253 && ! "$name" =~ ^[0-9.]+$ ]]; then
    san+=",DNS:$name"
  else
    printf 'error: NAME_OR_IP=%q is not allowed: expected one DNS name (letters, digits, '"'-'"' and '"'.'"') or one IP address per argument\n' "$name" >&2
    exit 2
  fi
done
common_name="${1:-localhost}"

# Build in a private folder beside OUTPUT_DIR (same file system: the moves are
# renames), removed on any exit, so a failure never leaves a half CA.
parent="$(dirname "$out_dir")"
mkdir -p "$parent"
work="$(mktemp -d "$parent/.generate-certs.XXXXXX")"
trap 'rm -rf -- "$work"' EXIT
umask 077 # the private keys are readable by their owner only

# 1. The CA: a self-signed certificate that may sign others (and nothing else).
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha256 -days "$days" \
  -keyout "$work/ca.key" -out "$work/ca.crt" \
  -subj "/O=flwr-noise/CN=flwr-noise deployment CA" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign"

# 2. The SuperLink's key and certificate signing request.
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -sha256 \
  -keyout "$work/server.key" -out "$work/server.csr" \
  -subj "/O=flwr-noise/CN=$common_name"

# 3. The CA signs it, for TLS server use, valid for the names in $san.
printf '%s\n' \
  "basicConstraints=critical,CA:FALSE" \
  "keyUsage=critical,digitalSignature" \
  "extendedKeyUsage=serverAuth" \
  "subjectAltName=$san" >"$work/server.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.crt" \
  -CAkey "$work/ca.key" -CAcreateserial -sha256 -days "$days" \
  -extfile "$work/server.ext" -out "$work/server.pem"
chmod 644 "$work/ca.crt" "$work/server.pem"
openssl verify -CAfile "$work/ca.crt" "$work/server.pem" >/dev/null

(umask 022 && mkdir -p "$out_dir")
# ca.key last: it is what marks OUTPUT_DIR as holding a CA.
for file in server.key server.pem ca.crt ca.key; do
  mv "$work/$file" "$out_dir/$file"
done

echo "CA certificate:        $out_dir/ca.crt"
echo "SuperLink certificate: $out_dir/server.pem (key: $out_dir/server.key)"
echo "Valid for:             ${san//,/ }"
