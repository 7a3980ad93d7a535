"""The VM harness (tests/vm/harness.py): a real kernel with WireGuard, reached from the host.

One boot runs a probe script that checks, inside the guest, what the kernel-backend tests rely on
(the wireguard module loads, a WireGuard link can be made in a fresh namespace, the host venv's
Python imports trio and pyroute2 and finds the kernel's WireGuard family) and then exits 7, so the
same boot also shows that a failing command fails on the host. Skipped where no VM can start.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests.vm.harness import VMTimeout, find_kernel, run_in_vm, vm_available

REPO = Path(__file__).resolve().parent.parent
PROBE_EXIT = 7

PROBE = r"""
check() {
    name=$1; shift
    if out=$("$@" 2>&1); then echo "CHECK $name ok"; else echo "CHECK $name FAILED: $out"; fi
}
echo "KERNEL $(uname -r)"
check modprobe modprobe wireguard
ns=hatun-vm-probe
check netns ip netns add $ns
check wg-link ip -n $ns link add wgprobe0 type wireguard
check wg-link-kind sh -c "ip -n $ns -d link show wgprobe0 | grep -qw wireguard"
# One Python start (several seconds under emulation) for all the Python checks, inside the
# namespace so that pyroute2 can also read the link back from the kernel module.
ip netns exec $ns python - <<'PY' 2>&1
import sys
print("PYTHON", sys.executable)
import trio, pyroute2
print("CHECK venv-imports ok", trio.__version__, pyroute2.__version__)
from pyroute2 import WireGuard
wg = WireGuard()
print("CHECK pyroute2-wireguard ok")
# info() returns the private key among its attributes: print only the interface name.
names = [m.get_attr("WGDEVICE_A_IFNAME") for m in wg.info("wgprobe0")]
print("CHECK pyroute2-wireguard-info ok" if names == ["wgprobe0"] else f"CHECK pyroute2-wireguard-info FAILED: {names}")
wg.close()
PY
exit 7
"""


@pytest.fixture(scope="module")
def probe():
    ok, why = vm_available()
    if not ok:
        pytest.skip(f"no test VM here: {why}")
    return run_in_vm(PROBE, timeout=600, cwd=REPO)


def check(probe, name: str) -> None:
    lines = [line for line in probe.output.splitlines() if line.startswith(f"CHECK {name} ")]
    assert lines, f"probe printed no result for {name!r}:\n{probe.output}"
    assert lines[0].startswith(f"CHECK {name} ok"), lines[0]


@pytest.mark.vm
@pytest.mark.slow
def test_guest_runs_the_wanted_kernel(probe):
    kernel, _ = find_kernel()
    assert f"KERNEL {kernel.version}" in probe.output.splitlines()


@pytest.mark.vm
@pytest.mark.slow
def test_wireguard_module_loads(probe):
    check(probe, "modprobe")


@pytest.mark.vm
@pytest.mark.slow
def test_wireguard_link_in_fresh_netns(probe):
    check(probe, "netns")
    check(probe, "wg-link")
    check(probe, "wg-link-kind")


@pytest.mark.vm
@pytest.mark.slow
def test_host_venv_python_imports_trio_and_pyroute2(probe):
    assert f"PYTHON {sys.executable}" in probe.output.splitlines(), probe.output
    check(probe, "venv-imports")


@pytest.mark.vm
@pytest.mark.slow
def test_pyroute2_finds_kernel_wireguard(probe):
    check(probe, "pyroute2-wireguard")
    check(probe, "pyroute2-wireguard-info")


@pytest.mark.vm
@pytest.mark.slow
def test_failing_command_fails_on_the_host(probe):
    assert probe.returncode == PROBE_EXIT, probe.output


def live_processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


@pytest.mark.vm
@pytest.mark.slow
def test_timeout_kills_the_vm():
    ok, why = vm_available()
    if not ok:
        pytest.skip(f"no test VM here: {why}")
    # Killed while still booting: a few seconds of CPU, no full boot.
    with pytest.raises(VMTimeout) as info:
        run_in_vm("sleep 600", timeout=5)
    assert info.value.rundir
    assert live_processes_mentioning(info.value.rundir) == []


def test_unusable_kernel_is_reported(monkeypatch, tmp_path):
    monkeypatch.delenv("HATUN_IN_VM", raising=False)
    monkeypatch.setenv("HATUN_VM_KERNEL", str(tmp_path / "vmlinuz-0.0.0-none"))
    kernel, why = find_kernel()
    assert kernel is None
    assert "vmlinuz-0.0.0-none" in why


def test_no_nested_vm(monkeypatch):
    monkeypatch.setenv("HATUN_IN_VM", "1")
    ok, why = vm_available()
    assert not ok
    assert "inside the test VM" in why
