"""Text rendering for people: tables and summaries. Pure functions returning strings."""

from __future__ import annotations

from collections.abc import Sequence

from hatun.status import Status


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """A left-aligned text table; columns are as wide as their widest cell."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def check_summary(config, secrets, source: str, skipped_secrets: bool) -> str:
    """What `hatun check` prints for a valid config. Values that come from the file as text (endpoints,
    paths) are shown redacted and on one line: a key pasted there is never repeated."""
    from hatun.durations import format_duration
    from hatun.logs import safe_text

    r = config.routing
    lines = [f"{source}: valid"]
    src = ", ".join(str(s) for s in r.source) or (
        "each tunnel's own address (new flows masqueraded: enrolled tunnels)" if any(t.enrolled for t in config.tunnels)
        else "none (kernel picks per tunnel)")
    lines.append(f"  prefixes: {', '.join(str(p) for p in r.prefixes)}")
    lines.append(f"  source: {src}; steering: {r.mode}; when all tunnels are down: {r.when_all_down}")
    h = config.health
    q = h.quality()
    gray = []
    if q.max_loss is not None:
        gray.append(f"loss over {q.max_loss:.0%} (back at {q.recover_loss:.0%})")
    if q.max_rtt is not None:
        gray.append(f"rtt over {q.max_rtt} (back at {q.recover_rtt_limit})")
    lines.append(
        f"  health: profile {h.profile}: probe every {format_duration(h.interval)}, timeout"
        f" {format_duration(h.min_timeout)}-{format_duration(h.timeout)} from the RTT, rise {h.rise}, fall {h.fall};"
        f" degraded ({q.action}) by {' or '.join(gray) or 'nothing'}, recovery {format_duration(q.recover_time)}"
    )
    lines.append(f"  backend: {config.backend}; metrics: {config.metrics.listen or 'off'};"
                 f" control socket: {safe_text(config.control.socket)}")
    rows = []
    for t in config.tunnels:
        if t.enrolled:
            rows.append((t.name, t.ifname, safe_text(f"enroll {t.enroll}"), t.weight, t.priority,
                         str(t.probe) if t.probe else "(the gateway)", "(made at start, in memory)"))
            continue
        if skipped_secrets:
            pub = "(not checked: --skip-secrets)"
        else:
            pub = secrets.keys[t.name].private.public_key.base64
        rows.append((t.name, t.ifname, safe_text(str(t.endpoint)), t.weight, t.priority, str(t.probe_target), pub))
    lines.append(f"  {len(config.tunnels)} tunnel{'s' if len(config.tunnels) != 1 else ''}"
                 " (paste each public key into its gateway's [Peer] PublicKey):")
    lines.append(table(("name", "interface", "endpoint", "weight", "tier", "probe", "public key"), rows, indent="    "))
    return "\n".join(lines)


def _rate(bps: float | None) -> str:
    """Bytes per second as bits per second, human units."""
    if bps is None:
        return "-"
    bits = bps * 8
    for unit, size in (("Gb/s", 1e9), ("Mb/s", 1e6), ("kb/s", 1e3)):
        if bits >= size:
            return f"{bits / size:.1f} {unit}"
    return f"{bits:.0f} b/s"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}ms" if seconds < 0.1 else f"{seconds * 1000:.0f}ms"


def status_text(status: Status, watch: bool = False) -> str:
    """`hatun status` for people: one line per tunnel, then the route."""
    import time

    route = status.route
    if route.unreachable:
        route_line = "UNREACHABLE (no tunnel in service)"
    elif route.all_down:
        route_line = f"all tunnels down; kept on {', '.join(route.members)}"
    else:
        route_line = f"{', '.join(route.members)} (tier {route.tier})"
    lines = [
        f"hatun {status.version} (pid {status.pid}), {status.backend} WireGuard, {status.mode} steering"
        + ("" if status.ready else ", starting"),
        f"prefixes {', '.join(route.prefixes)} -> {route_line}",
    ]
    if route.last_error:
        lines.append(f"route problem: {route.last_error}")
    rows = []
    for t in status.tunnels:
        state = t.state + (" (drained)" if t.drained and t.state != "draining" else "")
        note = t.last_failure if t.state == "down" and t.last_failure else ""
        if t.endpoint_error:
            note = t.endpoint_error
        elif t.last_error and t.state != "up":
            note = t.last_error
        route_col = "yes" if t.in_route else ("pinned" if t.pinned else "no")
        rows.append((t.name, state, _age(t.for_seconds), _ms(t.rtt_seconds), f"{t.loss * 100:.0f}%",
                     t.weight, route_col, _rate(t.rx_rate), _rate(t.tx_rate),
                     _age(t.handshake_age_seconds), note or ""))
    lines.append(table(("tunnel", "state", "for", "rtt", "loss", "weight", "route", "rx", "tx", "handshake", ""), rows))
    if watch:
        lines.append(time.strftime("%H:%M:%S") + "  (Ctrl-C to stop)")
    return "\n".join(lines)
