"""Text rendering for people: tables and summaries. Pure functions returning strings."""

from __future__ import annotations

from collections.abc import Sequence


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> str:
    """A left-aligned text table; columns are as wide as their widest cell."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for r in cells:
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def check_summary(config, secrets, source: str, skipped_secrets: bool) -> str:
    """What `hatun check` prints for a valid config."""
    from hatun.durations import format_duration

    r = config.routing
    lines = [f"{source}: valid"]
    src = ", ".join(str(s) for s in r.source) or "none (kernel picks per tunnel)"
    lines.append(f"  prefixes: {', '.join(str(p) for p in r.prefixes)}")
    lines.append(f"  source: {src}; steering: {r.mode}; when all tunnels are down: {r.when_all_down}")
    h = config.health
    lines.append(
        f"  health: probe every {format_duration(h.interval)}, timeout {format_duration(h.timeout)},"
        f" rise {h.rise}, fall {h.fall}"
    )
    lines.append(f"  backend: {config.backend}; metrics: {config.metrics.listen or 'off'}; control socket: {config.control.socket}")
    rows = []
    for t in config.tunnels:
        if skipped_secrets:
            pub = "(not checked: --skip-secrets)"
        else:
            pub = secrets.keys[t.name].public_key.base64
        rows.append((t.name, t.ifname, str(t.endpoint), t.weight, t.priority, str(t.probe_target), pub))
    lines.append(f"  {len(config.tunnels)} tunnel{'s' if len(config.tunnels) != 1 else ''}"
                 " (paste each public key into its gateway's [Peer] PublicKey):")
    lines.append(table(("name", "interface", "endpoint", "weight", "tier", "probe", "public key"), rows, indent="    "))
    return "\n".join(lines)
