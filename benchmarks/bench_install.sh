#!/usr/bin/env bash
# Install time and installed size from scratch: the library alone vs the App.
#
# Each variant gets a fresh virtual environment and one `pip install` of a
# clean copy of the project, with whatever indexes pip is configured to use
# (on the project's machines torch comes from local disk). Prints seconds,
# MiB added to the environment and the number of packages.
# The library into an environment that already holds torch and Flower is
# measured by .ci/compat (its "library installed" line).
# Usage: bash benchmarks/bench_install.sh [library] [app]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/flwr-noise-install.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT

mkdir "$SCRATCH/src"
tar -C "$ROOT" --exclude='./.venv*' --exclude=./build --exclude='*.egg-info' \
    --exclude=./.git --exclude=__pycache__ --exclude=./results -cf - . |
    tar -C "$SCRATCH/src" -xf -

measure() {
    local name=$1 target=$2
    local venv=$SCRATCH/$name
    python3 -m venv "$venv"
    local before start
    before=$(du -sk "$venv" | cut -f1)
    start=$SECONDS
    "$venv/bin/python" -m pip install --quiet "$target" \
        2> >(grep -v "is neither a file nor a directory" >&2)
    local seconds=$((SECONDS - start)) after
    after=$(du -sk "$venv" | cut -f1)
    echo "install $name ($target): ${seconds} s, $(((after - before) / 1024)) MiB," \
        "$("$venv/bin/python" -m pip list --format=freeze | wc -l) packages;" \
        "$("$venv/bin/python" -m pip list --format=freeze |
            grep -iE '^(flwr|torch|torchvision|numpy)==' | tr '\n' ' ')"
    rm -rf "$venv"
}

for variant in "${@:-library app}"; do
    for name in $variant; do
        case $name in
        library) measure library "$SCRATCH/src" ;;
        app) measure app "$SCRATCH/src[app]" ;;
        *) echo "variant $name is not allowed: expected library or app" >&2 && exit 2 ;;
        esac
    done
done
