#!/usr/bin/env bash
# Set everything up, then show hatun at work: the built-in lab (a runner, three gateways and a
# private LAN in network namespaces), hatun on it, steady traffic, and gateways failing and healing
# one after another, live. Everything is removed at the end (also on Ctrl-C).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hatun lab demo "$@"
