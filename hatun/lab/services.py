"""The lab's service host in the private LAN: TCP echo, a tiny HTTP responder, a UDP echo.

Run as `python -m hatun.lab.services ADDRESS [ADDRESS6]` inside the LAN namespace. Every reply says
which gateway carried the request (its LAN address: the gateways masquerade), so a client can see
its traffic move between tunnels.

- TCP 7: a greeting line "via GW\n" naming the gateway, then an echo (long-lived connections for
  failover tests)
- TCP 80: HTTP, one line: "hatun lab: reached ADDRESS via gateway GW"
- UDP 9000: echo of each datagram with the sender's address appended ("|198.19.77.2"): the
  traffic generator uses it to measure loss per flow and which tunnel each flow used.
"""

from __future__ import annotations

import sys
from functools import partial

import trio

GATEWAY_BY_OCTET = "gw{}"  # gateway I has LAN address .I


def gateway_of(address: str) -> str:
    """The lab gateway behind a LAN source address (198.19.77.I or 2001:2:0:77::I)."""
    last = address.rsplit(":", 1)[-1] if ":" in address else address.rsplit(".", 1)[-1]
    try:
        return GATEWAY_BY_OCTET.format(int(last, 16 if ":" in address else 10))
    except ValueError:
        return address


async def _echo(stream: trio.SocketStream) -> None:
    try:
        await stream.send_all(f"via {gateway_of(stream.socket.getpeername()[0])}\n".encode())
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            await stream.send_all(data)
    except trio.BrokenResourceError:
        pass


async def _http(stream: trio.SocketStream) -> None:
    try:
        with trio.move_on_after(5):
            request = b""
            while b"\r\n\r\n" not in request and len(request) < 8192:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            peer = stream.socket.getpeername()[0]
            local = stream.socket.getsockname()[0]
            body = f"hatun lab: reached {local} via gateway {gateway_of(peer)} ({peer})\n".encode()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def _udp_echo(address: str) -> None:
    family = trio.socket.AF_INET6 if ":" in address else trio.socket.AF_INET
    sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
    await sock.bind((address, 9000))
    while True:
        data, peer = await sock.recvfrom(65536)
        try:
            await sock.sendto(data + b"|" + peer[0].encode(), peer)
        except (BlockingIOError, OSError):
            pass  # a full buffer drops a reply, as a network would


async def serve(addresses: list[str]) -> None:
    async with trio.open_nursery() as nursery:
        for address in addresses:
            nursery.start_soon(partial(trio.serve_tcp, _echo, 7, host=address))
            nursery.start_soon(partial(trio.serve_tcp, _http, 80, host=address))
            nursery.start_soon(_udp_echo, address)


if __name__ == "__main__":
    trio.run(serve, sys.argv[1:])
