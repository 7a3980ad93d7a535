#!/usr/bin/env bash
# Set up everything hatun needs on a fresh Debian/Ubuntu machine (as root): system packages and a
# Python virtual environment in .venv with hatun and its test tools. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
  echo "setup: run as root (hatun manages network interfaces and routes)" >&2
  exit 1
fi

# wireguard-go: user-space WireGuard for kernels without the module; wireguard-tools (wg) is only
# used by tests to cross-check; prometheus brings promtool and the server the metrics tests use;
# bird2 is the BFD baseline of the failover benchmark; iptables adds the NFQUEUE target that the lab's
# delay fault uses (this kernel's nftables has no queue expression). systemd-container (systemd-nspawn,
# and systemd itself) boots the systemd that tests/test_systemd.py runs hatun's unit under, in which
# hatun is installed as users do: a venv made by Debian's python3 (python3-venv). nodejs runs the
# GitHub Action's steps in tests/test_action.py.
PACKAGES=(iproute2 nftables iputils-ping wireguard-go wireguard-tools iperf3 prometheus procps ca-certificates
  bird2 iptables systemd-container python3-venv nodejs)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done

pick_python() {
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "$py" >/dev/null && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}
PY=$(pick_python || true)
if [[ -z $PY ]] || ! "$PY" -m venv --help >/dev/null 2>&1 || ! "$PY" -c 'import ensurepip' >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
fi

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: wireguard-tools would otherwise pull in systemd and a kernel image.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The prometheus package starts a server where systemd runs; the tests start their own.
  systemctl disable --now prometheus prometheus-node-exporter bird >/dev/null 2>&1 || true
fi
PY=$(pick_python)

if [[ ! -x .venv/bin/python ]]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.hatun-installed
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
  echo "setup: installing hatun and its Python dependencies into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c 'import hatun, trio, pyroute2, pydantic, prometheus_client, pytest_trio' 
  touch "$stamp"
fi
# A VM with a real kernel WireGuard for the kernel backend's tests (qemu, a Debian kernel unpacked
# into /var/lib/hatun-vm, virtme-ng in .venv). HATUN_NO_VM=1 skips it.
if [[ ${HATUN_NO_VM:-0} != 1 && $(uname -m) == x86_64 ]]; then
  bash tests/vm/setup.sh "$PWD/.venv" | sed 's/^/  /' || echo "setup: the test VM could not be set up; its tests will be skipped"
fi
echo "setup: ready ($(.venv/bin/hatun --version), $(wireguard-go --version 2>/dev/null | head -1))"
