#!/usr/bin/env bash
# One command, fresh machine: set up .venv, then lint and run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
ruff check .
exec python -m pytest -q -p no:cacheprovider "$@"
