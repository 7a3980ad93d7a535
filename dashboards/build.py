"""Write dashboards/hatun.json, hatun's Grafana dashboard, from the panel list below.

Run `python dashboards/build.py` after changing this file and commit both; tests/test_dashboard.py
fails while hatun.json differs from what this script writes.

The JSON is Grafana's classic dashboard model as "Export for sharing externally" writes it: on import
Grafana asks for a Prometheus data source for the input DS_PROMETHEUS and substitutes it for every
"${DS_PROMETHEUS}". Panels query through the `datasource` variable, which that input only presets, so
a viewer can switch between Prometheus servers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUTPUT = Path(__file__).with_name("hatun.json")

# Grafana 11.6 introduced schema version 41; no migration after it touches what this file uses.
SCHEMA_VERSION = 41
GRAFANA_VERSION = "11.6.0"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# Label filters from the template variables. Their "All" value is ".*" (see `variable`).
INSTANCE = 'instance=~"$instance"'
TUNNEL = 'instance=~"$instance", tunnel=~"$tunnel"'
PER_TUNNEL = "{{tunnel}} @ {{instance}}"

# hatun_tunnel_state has one series per state; the state timeline needs one series per tunnel, so
# each state is weighted by a code (the current state's series is 1, the others 0) and the codes
# are mapped back to names and colours.
STATE_CODES = {"init": 1, "up": 2, "draining": 3, "down": 4}
STATE_COLORS = {"init": "blue", "up": "green", "draining": "yellow", "down": "red"}


def target(expr: str, legend: str = "", instant: bool = False) -> dict:
    """A PromQL query; `panel` numbers it (refId A, B, ...)."""
    return {
        "datasource": DATASOURCE,
        "editorMode": "code",
        "expr": expr,
        "instant": instant,
        "legendFormat": legend,
        "range": not instant,
    }


def panel(kind: str, title: str, description: str, targets: list[dict], *, unit: str = "short",
          defaults: dict | None = None, options: dict | None = None, overrides: list | None = None) -> dict:
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit, **(defaults or {})}, "overrides": overrides or []},
        "options": options or {},
    }


def thresholds(*steps: tuple[float | None, str]) -> dict:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def value_names(names: dict[int, tuple[str, str]]) -> list[dict]:
    """Value mapping: number -> (text, colour)."""
    return [{"type": "value", "options": {
        str(value): {"text": text, "color": color, "index": i}
        for i, (value, (text, color)) in enumerate(sorted(names.items()))}}]


LEGEND_TABLE = {"showLegend": True, "displayMode": "table", "placement": "right",
                "calcs": ["mean", "max", "lastNotNull"]}


def timeseries(title: str, description: str, targets: list[dict], *, unit: str, stack: bool = False,
               step: bool = False, custom: dict | None = None, defaults: dict | None = None,
               overrides: list | None = None) -> dict:
    custom = {
        "drawStyle": "line",
        "lineInterpolation": "stepAfter" if step else "linear",
        "lineWidth": 1,
        "fillOpacity": 30 if stack else 10,
        "showPoints": "never",
        "spanNulls": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        **(custom or {}),
    }
    return panel("timeseries", title, description, targets, unit=unit,
                 defaults={"custom": custom, "color": {"mode": "palette-classic"}, **(defaults or {})},
                 options={"legend": LEGEND_TABLE, "tooltip": {"mode": "multi", "sort": "desc"}},
                 overrides=overrides)


def stat(title: str, description: str, targets: list[dict], *, unit: str = "short",
         defaults: dict | None = None, text_mode: str = "auto", graph: bool = False) -> dict:
    return panel("stat", title, description, targets, unit=unit, defaults=defaults, options={
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "background" if defaults and "thresholds" in defaults else "none",
        "graphMode": "area" if graph else "none",
        "textMode": text_mode,
        "justifyMode": "auto",
        "orientation": "auto",
    })


def bars(title: str, description: str, targets: list[dict]) -> dict:
    """Horizontal bars of counts over the dashboard's time range (instant queries over $__range)."""
    return panel("bargauge", title, description, targets, unit="none",
                 defaults={"decimals": 0, "min": 0, "color": {"mode": "thresholds"},
                           "thresholds": thresholds((None, "blue"))},
                 options={"orientation": "horizontal", "displayMode": "basic", "showUnfilled": True,
                          "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}})


def state_expr() -> str:
    terms = [f'hatun_tunnel_state{{state="{state}", {TUNNEL}}} * {code}'
             for state, code in STATE_CODES.items()]
    return "max by (instance, tunnel) (\n    " + "\n  or ".join(terms) + "\n)"


def rtt_quantile(q: float) -> str:
    return (f"histogram_quantile({q}, sum by (instance, tunnel, le) ("
            f"rate(hatun_tunnel_probe_rtt_seconds_bucket{{{TUNNEL}}}[$__rate_interval])))")


def throughput(direction: str) -> str:
    return (f"sum by (instance, tunnel) ("
            f"rate(hatun_tunnel_{direction}_bytes_total{{{TUNNEL}}}[$__rate_interval]))")


# (row title, [(panel, width, height), ...]); Grafana's grid is 24 columns wide.
LAYOUT = [
    ("Overview", [
        (stat("Tunnels in service", "Tunnels in the multipath route now (hatun_route_tunnels_in_service).",
              [target(f"hatun_route_tunnels_in_service{{{INSTANCE}}}", "{{instance}}")],
              graph=True, defaults={"color": {"mode": "thresholds"},
                                    "thresholds": thresholds((None, "red"), (1, "orange"), (2, "green"))}),
         5, 8),
        (panel("state-timeline", "Tunnel state",
               "State of each tunnel: init until the probes rose, up (in service), draining (taken out "
               "by an operator), down (probes fell).",
               [target(state_expr(), PER_TUNNEL)],
               defaults={"color": {"mode": "thresholds"}, "thresholds": thresholds((None, "text")),
                         "custom": {"fillOpacity": 80, "lineWidth": 0},
                         "mappings": value_names({0: ("unknown", "text"), **{
                             code: (state, STATE_COLORS[state]) for state, code in STATE_CODES.items()}})},
               options={"mergeValues": True, "showValue": "auto", "alignValue": "left", "rowHeight": 0.9,
                        "legend": {"showLegend": True, "displayMode": "list", "placement": "bottom"},
                        "tooltip": {"mode": "single", "sort": "none"}}),
         19, 8),
    ]),
    ("Traffic", [
        (timeseries("Receive throughput", "Bytes per second received from each tunnel's peer.",
                    [target(throughput("receive"), PER_TUNNEL)], unit="Bps", stack=True), 12, 8),
        (timeseries("Transmit throughput", "Bytes per second sent to each tunnel's peer.",
                    [target(throughput("transmit"), PER_TUNNEL)], unit="Bps", stack=True), 12, 8),
        (timeseries("Traffic share (transmit)",
                    "Each tunnel's share of its instance's transmitted bytes, all tunnels of the instance "
                    "counted. Compare with the effective weights.",
                    [target(f"100 * {throughput('transmit')}\n/ ignoring (tunnel) group_left\n"
                            f"sum by (instance) (rate(hatun_tunnel_transmit_bytes_total{{{INSTANCE}}}"
                            f"[$__rate_interval]))", PER_TUNNEL)],
                    unit="percent", stack=True, defaults={"min": 0, "max": 100}), 12, 8),
        (timeseries("Effective weights",
                    "Weight of each tunnel in the multipath route (0 when out of it); dashed: configured.",
                    [target(f"hatun_tunnel_weight{{{TUNNEL}}}", PER_TUNNEL),
                     target(f"hatun_tunnel_configured_weight{{{TUNNEL}}}", PER_TUNNEL + " configured")],
                    unit="none", step=True, defaults={"min": 0},
                    overrides=[{"matcher": {"id": "byRegexp", "options": ".* configured$"},
                                "properties": [{"id": "custom.lineStyle",
                                                "value": {"fill": "dash", "dash": [10, 10]}}]}]), 12, 8),
    ]),
    ("Health", [
        (timeseries("Probe RTT p50 / p99", "Round-trip time of the probes through each tunnel.",
                    [target(rtt_quantile(0.5), PER_TUNNEL + " p50"),
                     target(rtt_quantile(0.99), PER_TUNNEL + " p99")], unit="s"), 12, 8),
        (timeseries("Probe loss", "Moving average of lost probes, as hatun's health check sees it.",
                    [target(f"hatun_tunnel_probe_loss_ratio{{{TUNNEL}}}", PER_TUNNEL)],
                    unit="percentunit", defaults={"min": 0, "max": 1}), 12, 8),
        (timeseries("Probes by result", "Probes per second, by result: shows that probing goes on at all.",
                    [target(f"sum by (instance, tunnel, result) ("
                            f"rate(hatun_tunnel_probes_total{{{TUNNEL}}}[$__rate_interval]))",
                            PER_TUNNEL + " {{result}}")],
                    unit="short", custom={"axisLabel": "probes/s"}, defaults={"min": 0}), 8, 8),
        (timeseries("Handshake age",
                    "Time since each tunnel's last WireGuard handshake; the line is HatunHandshakeStale's "
                    "3m. Tunnels that never completed a handshake are not drawn.",
                    [target(f"time() - (hatun_tunnel_last_handshake_timestamp_seconds{{{TUNNEL}}} > 0)",
                            PER_TUNNEL)],
                    unit="s", custom={"thresholdsStyle": {"mode": "line"}},
                    defaults={"min": 0, "thresholds": thresholds((None, "green"), (180, "red"))}), 8, 8),
        (bars("State transitions", "Transitions of each tunnel in the time range, by new state.",
              [target(f"sum by (instance, tunnel, to) ("
                      f"increase(hatun_tunnel_transitions_total{{{TUNNEL}}}[$__range]))",
                      PER_TUNNEL + " to {{to}}", instant=True)]), 8, 8),
    ]),
    ("Control", [
        (stat("Last config reload", "Whether the last configuration reload succeeded.",
              [target(f"hatun_config_last_reload_successful{{{INSTANCE}}}", "{{instance}}")],
              defaults={"color": {"mode": "thresholds"},
                        "thresholds": thresholds((None, "red"), (1, "green")),
                        "mappings": value_names({0: ("failed", "red"), 1: ("ok", "green")})}), 6, 6),
        (bars("Config reloads", "Configuration reloads in the time range, by result.",
              [target(f"sum by (instance, result) ("
                      f"increase(hatun_config_reloads_total{{{INSTANCE}}}[$__range]))",
                      "{{instance}} {{result}}", instant=True)]), 6, 6),
        (bars("Route repairs", "Drift repaired by hatun in the time range, by kernel object.",
              [target(f"sum by (instance, object) ("
                      f"increase(hatun_route_repairs_total{{{INSTANCE}}}[$__range]))",
                      "{{instance}} {{object}}", instant=True)]), 6, 6),
        (stat("Version", "hatun version and WireGuard backend of each instance.",
              [target(f"hatun_build_info{{{INSTANCE}}}", "{{instance}}: {{version}} ({{backend}})",
                      instant=True)], text_mode="name"), 6, 6),
    ]),
]


def variable(name: str, label: str, query: str) -> dict:
    """A multi-value query variable with "All" matching everything (also values added later)."""
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"PrometheusVariableQueryEditor-{name}"},
        "refresh": 2,  # on time range change, so that new instances and tunnels appear
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
    }


def dashboard() -> dict:
    panels, y, next_id = [], 0, 1
    kinds = set()
    for row_title, row_panels in LAYOUT:
        panels.append({"type": "row", "title": row_title, "id": next_id, "collapsed": False,
                       "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        next_id, y, x, line_height = next_id + 1, y + 1, 0, 0
        for p, w, h in row_panels:
            if x + w > 24:
                x, y, line_height = 0, y + line_height, 0
            p = dict(p, id=next_id, gridPos={"x": x, "y": y, "w": w, "h": h})
            panels.append(p)
            kinds.add(p["type"])
            next_id, x, line_height = next_id + 1, x + w, max(line_height, h)
        y += line_height

    panel_names = {"bargauge": "Bar gauge", "stat": "Stat", "state-timeline": "State timeline",
                   "timeseries": "Time series"}
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "description": "",
                      "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "__elements": {},
        "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": GRAFANA_VERSION},
                       {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}]
                      + [{"type": "panel", "id": k, "name": panel_names[k], "version": ""}
                         for k in sorted(kinds)],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts",
            "type": "dashboard"}]},
        "description": "hatun: WireGuard tunnels, their health and the multipath route over them.",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["hatun", "wireguard"],
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
             "current": {"selected": False, "text": "${DS_PROMETHEUS}", "value": "${DS_PROMETHEUS}"},
             "options": [], "regex": "", "refresh": 1, "hide": 0, "includeAll": False, "multi": False},
            variable("instance", "Instance", "label_values(hatun_build_info, instance)"),
            variable("tunnel", "Tunnel", 'label_values(hatun_tunnel_up{instance=~"$instance"}, tunnel)'),
        ]},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "hatun",
        "uid": "hatun",
        "version": 1,
        "weekStart": "",
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    OUTPUT.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
