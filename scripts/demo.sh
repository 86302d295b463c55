#!/usr/bin/env bash
# One command, fresh machine: set up .venv, then run the whole pipeline on the built-in corpus (offline).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
exec pretrain demo "$@"
