#!/usr/bin/env bash
# Install what tests/vm/harness.py needs to boot a real Debian kernel (with the WireGuard module)
# under QEMU software emulation, on a fresh Debian 12 (or Ubuntu) machine, as root:
#   - Debian packages qemu-system-x86, busybox-static, kmod (--no-install-recommends);
#   - virtme-ng (pinned) into the given Python venv (its `vng` and `virtme-run` land in VENV/bin);
#   - the distribution's current kernel package, NOT installed but extracted with dpkg-deb into
#     $HATUN_VM_DIR/kernel/<version>/ (default /var/lib/hatun-vm), then depmod'ed there.
# Extracting leaves /boot and /lib/modules alone and skips initramfs-tools, udev and the systemd
# upgrades that installing linux-image-amd64 pulls in (even with --no-install-recommends).
# Keep HATUN_VM_DIR out of /var/cache, /var/tmp, /var/log, /run: the guest mounts tmpfs there.
#
# Usage: tests/vm/setup.sh [VENV]     (VENV default: $VIRTUAL_ENV, else the checkout's .venv)
# Idempotent: when everything is there it only checks (well under a second).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
VENV=${1:-${VIRTUAL_ENV:-$REPO/.venv}}
VM_DIR=${HATUN_VM_DIR:-/var/lib/hatun-vm}
VIRTME_NG_VERSION=1.42  # keep in step with harness.VIRTME_NG_VERSION
say() { echo "vm-setup: $*"; }

if [[ $(id -u) -ne 0 ]]; then
  say "run as root (apt-get, and $VM_DIR)" >&2
  exit 1
fi
if [[ $(uname -m) != x86_64 ]]; then
  say "only x86_64 hosts are supported (this is $(uname -m))" >&2
  exit 1
fi
if [[ ! -x $VENV/bin/python ]]; then
  say "no Python venv at $VENV (give its path as the first argument)" >&2
  exit 1
fi
case $VM_DIR in
  /var/cache|/var/cache/*|/var/tmp|/var/tmp/*|/var/log|/var/log/*|/run|/run/*|/var/lib/apt|/var/lib/apt/*)
    say "HATUN_VM_DIR=$VM_DIR is hidden inside the guest (virtme-ng mounts tmpfs there)" >&2
    exit 1;;
esac

export DEBIAN_FRONTEND=noninteractive
apt_updated=0
apt_update_once() {
  if ((apt_updated == 0)); then
    say "apt-get update"
    apt-get update -qq
    apt_updated=1
  fi
}

# 1. Debian packages. qemu-system-x86 runs the VM; virtme-ng builds its initramfs around a static
# busybox; kmod gives depmod (the extracted kernel has no modules.dep) and modprobe (the guest
# runs the host's binaries). file, iproute2 are in the base image but cheap to make sure of.
PACKAGES=(qemu-system-x86 busybox-static kmod file iproute2)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt_update_once
  say "apt-get install --no-install-recommends ${missing[*]}"
  t0=$SECONDS
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  say "  done in $((SECONDS - t0)) s"
else
  say "packages present: ${PACKAGES[*]}"
fi

# 2. virtme-ng into the venv.
have=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("virtme-ng"))' 2>/dev/null || true)
if [[ $have != "$VIRTME_NG_VERSION" || ! -x $VENV/bin/vng || ! -x $VENV/bin/virtme-run ]]; then
  say "pip install virtme-ng==$VIRTME_NG_VERSION into $VENV${have:+ (had $have)}"
  t0=$SECONDS
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "virtme-ng==$VIRTME_NG_VERSION" 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$VENV/bin/vng" --version >/dev/null
  say "  done in $((SECONDS - t0)) s"
else
  say "virtme-ng $have present in $VENV"
fi

# 3. A kernel with wireguard.ko, extracted into $VM_DIR/kernel/<version>.
have_kernel() {
  local d
  for d in "$VM_DIR"/kernel/*/lib/modules/*/kernel/drivers/net/wireguard; do
    if compgen -G "$d/wireguard.ko*" >/dev/null && [[ -f ${d%/kernel/drivers/net/wireguard}/modules.dep ]]; then
      echo "${d%/kernel/drivers/net/wireguard}"
      return 0
    fi
  done
  return 1
}
if moddir=$(have_kernel); then
  say "kernel present: $(basename "$moddir") in $VM_DIR/kernel"
else
  apt_update_once
  . /etc/os-release
  if [[ ${ID:-} == ubuntu ]]; then
    meta=linux-image-generic
  else
    meta=linux-image-amd64
  fi
  # The metapackage depends on the current ABI's package, e.g. linux-image-6.1.0-56-amd64.
  image_pkg=$(apt-cache depends "$meta" | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ {print $2; exit}')
  if [[ -z $image_pkg ]]; then
    say "cannot tell which kernel package $meta stands for (apt-cache depends $meta)" >&2
    exit 1
  fi
  kver=${image_pkg#linux-image-}
  kver=${kver%-unsigned}
  pkgs=("$image_pkg")
  if [[ ${ID:-} == ubuntu ]]; then
    # Ubuntu splits the modules out of the image package (not tried here: the dev machines are Debian).
    pkgs+=("linux-modules-$kver")
    apt-cache show "linux-modules-extra-$kver" >/dev/null 2>&1 && pkgs+=("linux-modules-extra-$kver")
  fi
  say "downloading ${pkgs[*]} (extracted, not installed)"
  t0=$SECONDS
  dl=$(mktemp -d)
  trap 'rm -rf "$dl"' EXIT
  # apt's download sandbox user must be able to write there, or apt warns and runs unsandboxed.
  chown _apt "$dl" 2>/dev/null || true
  (cd "$dl" && apt-get download -qq "${pkgs[@]}")
  mkdir -p "$VM_DIR/kernel"
  staging="$VM_DIR/kernel/.staging-$kver"
  rm -rf "$staging"
  mkdir -p "$staging"
  for deb in "$dl"/*.deb; do
    dpkg-deb -x "$deb" "$staging"
  done
  rm -rf "$staging/usr/share/doc" "$staging/usr/share/lintian" "$staging/usr/share/bug"
  image=$(compgen -G "$staging/boot/vmlinuz-*" | head -n1 || true)
  if [[ -z $image ]]; then
    say "no vmlinuz in ${pkgs[*]}" >&2
    exit 1
  fi
  kver=${image##*/vmlinuz-}
  # Some distributions ship modules under usr/lib/modules only; vng looks in lib/modules.
  if [[ ! -d $staging/lib/modules/$kver && -d $staging/usr/lib/modules/$kver ]]; then
    mkdir -p "$staging/lib/modules"
    mv "$staging/usr/lib/modules/$kver" "$staging/lib/modules/$kver"
  fi
  if ! compgen -G "$staging/lib/modules/$kver/kernel/drivers/net/wireguard/wireguard.ko*" >/dev/null; then
    say "kernel $kver has no wireguard module" >&2
    exit 1
  fi
  depmod -b "$staging" "$kver"
  rm -rf "${VM_DIR:?}/kernel/$kver"
  mv "$staging" "$VM_DIR/kernel/$kver"
  say "  kernel $kver ready in $VM_DIR/kernel/$kver ($((SECONDS - t0)) s)"
fi

say "ready"
