#!/usr/bin/env bash
# Set everything up, then run hatun's whole test suite (as root: tests build real tunnels in
# network namespaces that they create and remove). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
