#!/usr/bin/env bash
# Set everything up, then show hatun at work. Until the lab lands this checks the example config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hatun check --skip-secrets config/hatun.example.toml
