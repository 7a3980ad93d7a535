"""Prometheus metrics and the HTTP endpoint: /metrics, /healthz (alive), /readyz (a tunnel in service).

hatun's own behaviour (probes, RTTs, transitions, reloads, repairs) is counted as it happens, in plain
integers of its own objects (a probe result must cost next to nothing: hundreds arrive each second),
and exported from there; the state of WireGuard (byte counters, handshakes) is read fresh from the
devices at scrape time, so throughput per tunnel is exactly what WireGuard counted. One custom
collector yields it all.
"""

from __future__ import annotations

import functools
import logging

import h11
import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest

from hatun.health import RTT_BUCKETS, State
from hatun.serving import serve_bounded

log = logging.getLogger("hatun.metrics")

STATES = [str(s) for s in State]
TRANSITION_TARGETS = ("up", "down", "draining")
REQUEST_TIMEOUT = 10.0  # a client has this long to send its request and read the answer
SCRAPE_MAX_AGE = 1.0  # device counters read this recently are reused by a scrape
MAX_REQUEST_BYTES = 16384  # request line and headers; more is not a scrape


class Metrics:
    """The registry of one supervisor, with the collector that reads it at scrape time."""

    def __init__(self, sup) -> None:
        self.sup = sup
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_StateCollector(sup))

    async def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition for a scrape. WireGuard counters are read first (all devices at once, under
        one deadline; reads younger than SCRAPE_MAX_AGE are reused)."""
        await self.sup.refresh_statuses(max_age=SCRAPE_MAX_AGE)
        try:
            encoder, content_type = choose_encoder(accept or "")
        except Exception:  # noqa: BLE001 - e.g. TypeError for "text/plain; version=x": use the default format
            encoder, content_type = generate_latest, CONTENT_TYPE_LATEST
        return encoder(self.registry), content_type


class _StateCollector:
    """State read at scrape time: tunnel states, weights, WireGuard counters, route, reloads."""

    def __init__(self, sup) -> None:
        self.sup = sup

    def describe(self):
        return []

    def collect(self):
        status = self.sup.status()
        up = GaugeMetricFamily("hatun_tunnel_up", "1 when the tunnel is in service (state up)", labels=["tunnel"])
        state = GaugeMetricFamily("hatun_tunnel_state", "Tunnel state: 1 for the current one", labels=["tunnel", "state"])
        rx = CounterMetricFamily("hatun_tunnel_receive_bytes", "Bytes received from the gateway (WireGuard counter)", labels=["tunnel"])
        tx = CounterMetricFamily("hatun_tunnel_transmit_bytes", "Bytes sent to the gateway (WireGuard counter)", labels=["tunnel"])
        hs = GaugeMetricFamily("hatun_tunnel_last_handshake_timestamp_seconds", "Time of the last WireGuard handshake (0: never)", labels=["tunnel"])
        loss = GaugeMetricFamily("hatun_tunnel_probe_loss_ratio", "Share of the last 20 probes that failed", labels=["tunnel"])
        weight = GaugeMetricFamily("hatun_tunnel_weight", "Effective weight in the route (0: out of the route for new flows)", labels=["tunnel"])
        cweight = GaugeMetricFamily("hatun_tunnel_configured_weight", "Configured weight", labels=["tunnel"])
        probes = CounterMetricFamily("hatun_tunnel_probes", "Probes sent through the tunnel, by result",
                                     labels=["tunnel", "result"])
        rtt = HistogramMetricFamily("hatun_tunnel_probe_rtt_seconds", "Round-trip time of probes through the tunnel",
                                    labels=["tunnel"])
        transitions = CounterMetricFamily("hatun_tunnel_transitions", "State changes of the tunnel, by new state",
                                          labels=["tunnel", "to"])
        # Every tunnel of the status (draining ones too), in every family: one set of series per tunnel.
        for t in status.tunnels:
            name = t.name
            up.add_metric([name], 1.0 if t.state == "up" else 0.0)
            for s in STATES:
                state.add_metric([name, s], 1.0 if t.state == s else 0.0)
            if t.rx_bytes is not None and t.tx_bytes is not None:
                rx.add_metric([name], float(t.rx_bytes))
                tx.add_metric([name], float(t.tx_bytes))
            hs.add_metric([name], float(t.last_handshake or 0.0))
            loss.add_metric([name], t.loss)
            weight.add_metric([name], float(t.weight))
            cweight.add_metric([name], float(t.configured_weight))
            probes.add_metric([name, "success"], float(t.probes_ok))
            probes.add_metric([name, "failure"], float(t.probes_failed))
            buckets, total = [], 0
            for bound, count in zip((*RTT_BUCKETS, float("inf")), t.rtt_counts):
                total += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
            rtt.add_metric([name], buckets, t.rtt_sum)
            for to in TRANSITION_TARGETS:
                transitions.add_metric([name, to], float(t.transitions.get(to, 0)))
        yield from (up, state, rx, tx, hs, loss, weight, cweight, probes, rtt, transitions)
        in_service = GaugeMetricFamily("hatun_route_tunnels_in_service", "Tunnels carrying new flows")
        in_service.add_metric([], float(len(status.route.members)) if status.in_service else 0.0)
        yield in_service
        reloads = CounterMetricFamily("hatun_config_reloads", "Config reloads, by result", labels=["result"])
        for result in ("success", "failure"):
            reloads.add_metric([result], float(status.reload.counts.get(result, 0)))
        yield reloads
        last = GaugeMetricFamily("hatun_config_last_reload_successful", "1 when the last reload worked (or none was tried)")
        last.add_metric([], 1.0 if status.reload.ok else 0.0)
        yield last
        repairs = CounterMetricFamily("hatun_route_repairs", "Kernel objects repaired after a change behind hatun's back", labels=["object"])
        for obj in ("route", "nexthop", "rule", "address", "link"):
            repairs.add_metric([obj], float(status.repairs.get(obj, 0)))
        yield repairs
        info = GaugeMetricFamily("hatun_build_info", "hatun's version and WireGuard backend", labels=["version", "backend"])
        info.add_metric([status.version, status.backend or "unknown"], 1.0)
        yield info


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> h11.Request | None:
    """The request's head, or None when the client closed first. Raises h11.RemoteProtocolError."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            conn.receive_data(data)
            if not data and conn.their_state is not h11.DONE:
                return None
            continue
        if isinstance(event, h11.Request):
            return event
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


async def _answer(request: h11.Request, metrics: Metrics) -> tuple[int, bytes, str]:
    path = request.target.decode(errors="replace").split("?", 1)[0]
    headers = {k.decode(errors="replace").lower(): v.decode(errors="replace") for k, v in request.headers}
    if request.method not in (b"GET", b"HEAD"):
        return 405, b"method not allowed\n", "text/plain; charset=utf-8"
    if path == "/metrics":
        body, ctype = await metrics.render(headers.get("accept"))
        return 200, body, ctype
    if path == "/healthz":
        return 200, b"ok\n", "text/plain; charset=utf-8"
    if path == "/readyz":
        route = metrics.sup.status().route
        if route.members and not route.all_down:
            return 200, f"ready: {len(route.members)} tunnels in service\n".encode(), "text/plain; charset=utf-8"
        return 503, b"not ready: no tunnel in service\n", "text/plain; charset=utf-8"
    if path == "/":
        return 200, b"hatun: see /metrics, /healthz, /readyz\n", "text/plain; charset=utf-8"
    return 404, b"not found\n", "text/plain; charset=utf-8"


async def _respond(stream: trio.abc.Stream, metrics: Metrics) -> None:
    """Serve one connection: one request, one answer. Whatever the request holds, the answer is a
    status code: 400 for a malformed request, 500 (logged) when producing the answer failed."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
    with trio.move_on_after(REQUEST_TIMEOUT):
        try:
            request = await _read_request(stream, conn)
        except h11.RemoteProtocolError:
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        if request is None:
            return
        try:
            status, body, ctype = await _answer(request, metrics)
        except Exception as e:  # noqa: BLE001 - a request must never take hatun down
            log.error("%s %s failed: %s: %s", request.method.decode(errors="replace"),
                      request.target[:200].decode(errors="replace"), type(e).__name__, e,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            status, body, ctype = 500, b"internal error (see hatun's log)\n", "text/plain; charset=utf-8"
        response = h11.Response(status_code=status, headers=[
            ("Content-Type", ctype), ("Content-Length", str(len(body))), ("Connection", "close")])
        await stream.send_all(conn.send(response))
        if request.method != b"HEAD":
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))


async def _serve_connection(stream: trio.abc.Stream, metrics: Metrics) -> None:
    try:
        await _respond(stream, metrics)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away


async def open_metrics_listeners(config) -> list:
    """The listening sockets for [metrics] listen. Raises OSError (e.g. the port is taken)."""
    host, port = config.metrics.address
    return await trio.open_tcp_listeners(port, host=host)


async def serve_metrics(sup, listeners: list | None = None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve /metrics, /healthz and /readyz on LISTENERS (default: opened here) until cancelled."""
    host, port = sup.config.metrics.address
    metrics = Metrics(sup)
    listeners = listeners or await open_metrics_listeners(sup.config)
    log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            await nursery.start(functools.partial(serve_bounded, listener, lambda s: _serve_connection(s, metrics),
                                                  name="metrics"))
        task_status.started(metrics)
