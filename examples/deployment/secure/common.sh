# Shared by the scripts in this folder; sourced, not run.
# shellcheck shell=bash

secure_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
project_root="$(cd "$secure_dir/../../.." && pwd)"

# use_project_venv COMMAND: put the project's virtual environment (or
# $FLWR_NOISE_VENV) first on PATH, so that Flower finds its helper commands
# (flower-superexec, flwr-serverapp, flwr-clientapp) there, after checking
# that it has COMMAND.
use_project_venv() {
  local venv="${FLWR_NOISE_VENV:-$project_root/.venv}"
  if [[ ! -x "$venv/bin/$1" ]]; then
    echo "error: no $1 in $venv/bin; install the project first:" >&2
    echo "  python3 -m venv .venv && .venv/bin/pip install -e ." >&2
    exit 1
  fi
  export PATH="$venv/bin:$PATH"
}

# require_file NAME PATH: exit 2 unless PATH is a readable file.
require_file() {
  if [[ ! -f "$2" || ! -r "$2" ]]; then
    echo "error: $1=$2 is not allowed: expected a readable file" >&2
    exit 2
  fi
}
