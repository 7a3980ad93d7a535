"""Classic BPF socket filters: the kernel drops what a socket would only read to throw away.

A flood that is none of hatun's business (foreign echo replies on the shared raw ICMP sockets, route
changes of other tables on the netlink event socket) then costs no wakeup and no Python at all.
Programs are small and loop-free (classic BPF jumps only forward). A filter drops only what hatun
has no use for; where it cannot tell (an attribute not where it usually is), it accepts, and the
Python code behind it, which checks everything again, decides.
"""

from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_FILTER = 26

# Opcodes (linux/filter.h: class | size | mode).
LD_W_ABS, LD_H_ABS, LD_B_ABS = 0x20, 0x28, 0x30
LD_W_IND, LD_H_IND, LD_B_IND = 0x40, 0x48, 0x50
LD_LEN = 0x80
LDX_B_MSH = 0xB1  # X = 4 * (P[k] & 0xf): an IPv4 header's length
JEQ, JGT, JGE = 0x15, 0x25, 0x35
LSH_K, OR_X = 0x64, 0x4C
TAX = 0x07
RET_K = 0x06

ACCEPT, DROP = "accept", "drop"  # labels every program has (`Program.assemble` adds them)
_INSN = struct.Struct("=HBBI")  # struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}


class Program:
    """A classic BPF program under construction; jumps name labels further down."""

    def __init__(self) -> None:
        self._insns: list[tuple[int, str | None, str | None, int]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"BPF label {name!r} defined twice")
        self._labels[name] = len(self._insns)

    def op(self, code: int, k: int = 0) -> None:
        self._insns.append((code, None, None, k & 0xFFFFFFFF))

    def jump(self, code: int, k: int, true: str | None, false: str | None) -> None:
        """Jump to label TRUE / FALSE (None: the next instruction) on the comparison of A with K."""
        self._insns.append((code, true, false, k & 0xFFFFFFFF))

    def goto(self, label: str) -> None:
        self.jump(JEQ, 0, label, label)

    def jump_unless_in(self, values: range, false: str, true: str | None = None) -> None:
        """Go on (or to TRUE) when A is in VALUES (a range with step 1), else to FALSE."""
        if values.step != 1:
            raise ValueError("BPF range checks need a range with step 1")
        if not values:
            self.goto(false)
            return
        self.jump(JGE, values.start, None, false)
        self.jump(JGT, values.stop - 1, false, true)

    def load_u32_host(self, offset: int) -> None:
        """A = the u32 at OFFSET in host byte order (BPF loads are big-endian; netlink is host-endian)."""
        if struct.pack("=I", 1) == struct.pack(">I", 1):
            self.op(LD_W_ABS, offset)
            return
        self.op(LD_B_ABS, offset + 3)
        for i in (2, 1, 0):
            self.op(LSH_K, 8)
            self.op(TAX)
            self.op(LD_B_ABS, offset + i)
            self.op(OR_X)

    def assemble(self) -> bytes:
        """The program as the kernel takes it, ending in `accept` (whole packet) and `drop` labels."""
        insns = list(self._insns)
        labels = dict(self._labels)
        labels.setdefault(ACCEPT, len(insns))
        insns.append((RET_K, None, None, 0xFFFFFFFF))
        labels.setdefault(DROP, len(insns))
        insns.append((RET_K, None, None, 0))
        out = bytearray()
        for i, (code, true, false, k) in enumerate(insns):
            jt, jf = (_offset(labels, i, name) for name in (true, false))
            out += _INSN.pack(code, jt, jf, k)
        return bytes(out)


def _offset(labels: dict[str, int], at: int, name: str | None) -> int:
    if name is None:
        return 0
    distance = labels[name] - at - 1
    if not 0 <= distance <= 255:
        raise ValueError(f"BPF jump to {name!r} out of reach ({distance})")
    return distance


def host16(value: int) -> int:
    """VALUE as a big-endian 16-bit load (`LD_H_ABS`) of a host-endian u16 field reads it."""
    return int.from_bytes(struct.pack("=H", value), "big")


def host32(value: int) -> int:
    """VALUE as a big-endian 32-bit load (`LD_W_ABS`) of a host-endian u32 field reads it."""
    return int.from_bytes(struct.pack("=I", value), "big")


def attach(sock: socket.socket, program: bytes) -> None:
    """Attach PROGRAM (from `Program.assemble`) to SOCK, replacing any filter. Raises OSError."""
    buf = ctypes.create_string_buffer(program, len(program))
    # struct sock_fprog {unsigned short len; struct sock_filter *filter}: the kernel copies it now.
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("HP", len(program) // _INSN.size,
                                                                     ctypes.addressof(buf)))
