"""hatun's Grafana dashboard and alerting rules against a real Prometheus.

The structure tests read dashboards/hatun.json alone, except two that compare it with what
dashboards/build.py writes with Grafana's foundation SDK (skipped where that is not installed). The
others start Prometheus (tests/promutil.py) scraping stand-ins of hatun's metrics endpoint, one
healthy and one degraded, plus an address where nothing listens, and check that every query of the
dashboard and every alerting rule parses and returns data, and that exactly the expected alerts
trigger.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from tests.promutil import (ALERTS, DASHBOARD, REPO, Prometheus, PrometheusError, dashboard_exprs,
                            exprs_without_data, grafana_variables, have_prometheus, open_prometheus,
                            rule_exprs, substitute, variable_selectors, wait_for_scrapes, wait_until)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def build_py():
    """dashboards/build.py as a module. It builds with Grafana's foundation SDK; a build of the SDK
    for another Grafana version makes it raise (a failure, not a skip)."""
    pytest.importorskip("grafana_foundation_sdk",
                        reason="grafana-foundation-sdk not installed, dashboards/build.py needs it: "
                               "pip install 'grafana-foundation-sdk==1769699379!11.6.0'")
    spec = importlib.util.spec_from_file_location("dashboard_build", REPO / "dashboards" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return build


def content_panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def essentials(dashboard: dict) -> dict:
    """What a viewer of DASHBOARD gets, without the defaults a writer may or may not spell out: the
    dashboard's identity and settings, the import input, the variables, and per panel its place,
    queries, legends, units, colours, thresholds, mappings and display options."""

    def legend(options: dict) -> dict | None:
        if not (options.get("legend") or {}).get("showLegend"):
            return None  # hidden, whatever else it says
        return {"calcs": [], **options["legend"]}

    def panel(p: dict) -> dict:
        if p["type"] == "row":
            return {"type": "row", "id": p["id"], "gridPos": p["gridPos"], "collapsed": p["collapsed"]}
        defaults = p["fieldConfig"]["defaults"]
        options = p["options"]
        return {
            "type": p["type"], "id": p["id"], "gridPos": p["gridPos"],
            "description": p["description"], "datasource": p["datasource"],
            "targets": [{"refId": t["refId"], "expr": t["expr"], "legendFormat": t["legendFormat"],
                         "instant": t.get("instant", False) and not t.get("range", False),
                         "datasource": t["datasource"], "editorMode": t.get("editorMode")}
                        for t in p["targets"]],
            "defaults": {k: defaults.get(k) for k in ("unit", "min", "max", "decimals", "color",
                                                      "thresholds", "mappings", "custom")},
            "overrides": p["fieldConfig"]["overrides"],
            "options": {"legend": legend(options),
                        **{k: options.get(k) for k in (
                            "tooltip", "reduceOptions", "colorMode", "graphMode", "textMode",
                            "justifyMode", "orientation", "displayMode", "showUnfilled", "mergeValues",
                            "showValue", "alignValue", "rowHeight", "perPage")}},
        }

    def variable(v: dict) -> dict:
        query = v.get("query")
        return {
            "type": v["type"], "label": v.get("label"), "datasource": v.get("datasource"),
            "query": query.get("query") if isinstance(query, dict) else query,
            "definition": v.get("definition"), "current": v.get("current", {}).get("value"),
            "multi": v.get("multi", False), "includeAll": v.get("includeAll", False),
            "allValue": v.get("allValue"), "regex": v.get("regex", ""), "sort": v.get("sort", 0),
            "hide": v.get("hide", 0),
            # Grafana loads a data source variable's options with the dashboard, refresh or not.
            "refresh": v.get("refresh", 1 if v["type"] == "datasource" else None),
        }

    return {
        **{k: dashboard.get(k) for k in ("uid", "title", "description", "tags", "schemaVersion", "refresh",
                                         "time", "timezone", "weekStart", "graphTooltip", "editable")},
        "inputs": [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]],
        "requires": sorted((r["type"], r["id"]) for r in dashboard["__requires"]),
        "annotations": [(a["name"], a.get("builtIn")) for a in dashboard["annotations"]["list"]],
        "variables": {v["name"]: variable(v) for v in dashboard["templating"]["list"]},
        "panel order": [p["title"] for p in dashboard["panels"]],
        "panels": {p["title"]: panel(p) for p in dashboard["panels"]},
    }


# --- Structure ---------------------------------------------------------------------------------------


def test_build_py_writes_this_dashboard_in_substance(build_py, dashboard):
    # Names what changed in substance (a panel, a query, a threshold) when hatun.json is stale; a
    # change in defaults only (as another build of the SDK may write) fails only the check below.
    assert essentials(build_py.dashboard()) == essentials(dashboard)


def test_json_is_what_build_py_writes(build_py):
    assert DASHBOARD.read_text() == build_py.render(), \
        "dashboards/hatun.json is stale: run python dashboards/build.py"


def test_dashboard_targets_grafana_11_6(dashboard):
    assert dashboard["schemaVersion"] == 41
    assert {r["id"]: r["version"] for r in dashboard["__requires"]}["grafana"] == "11.6.0"


def test_panel_ids_are_unique(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids


def test_panels_fit_the_grid_without_overlap(dashboard):
    cells = {}
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[x, y]!r}"
                cells[x, y] = p["title"]


def test_every_panel_and_query_uses_the_datasource_variable(dashboard):
    for p in content_panels(dashboard):
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, (p["title"], t["refId"])


def test_datasource_is_an_import_input_and_a_variable(dashboard):
    assert [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == [
        ("DS_PROMETHEUS", "datasource", "prometheus")]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    # The import input presets the variable: Grafana substitutes "${DS_PROMETHEUS}" on import.
    assert ds["current"]["value"] == "${DS_PROMETHEUS}"
    for name in ("instance", "tunnel"):
        v = variables[name]
        assert (v["type"], v["multi"], v["includeAll"], v["datasource"]) == ("query", True, True, DATASOURCE)
        assert v["definition"].startswith("label_values(hatun_"), v["definition"]


def test_state_timeline_is_not_paginated(dashboard):
    # A page size (the foundation SDK's default is 20) turns on pagination, which draws a pager
    # under the timeline even for a single page.
    for p in content_panels(dashboard):
        if p["type"] == "state-timeline":
            assert "perPage" not in p["options"], p["title"]


def test_panels_cover_what_operators_watch(dashboard):
    exprs = " ".join(e.expr for e in dashboard_exprs(dashboard))
    for needle in ("rate(hatun_tunnel_receive_bytes_total", "rate(hatun_tunnel_transmit_bytes_total",
                   "hatun_tunnel_state", "histogram_quantile(0.5,", "histogram_quantile(0.99,",
                   "hatun_tunnel_probe_loss_ratio", "hatun_tunnel_weight",
                   "increase(hatun_tunnel_transitions_total", "time() - (hatun_tunnel_last_handshake",
                   "hatun_route_tunnels_in_service", "hatun_config_reloads_total"):
        assert needle in exprs, needle
    assert "state-timeline" in {p["type"] for p in content_panels(dashboard)}


# --- A stand-in for hatun's metrics endpoint -------------------------------------------------------


RTT_CDF = {0.0005: 0, 0.001: 0, 0.0025: 0.02, 0.005: 0.1, 0.01: 0.5, 0.025: 0.9, 0.05: 0.97,
           0.1: 0.99, 0.25: 1, 0.5: 1, 1.0: 1, 2.5: 1}
STATES = ("init", "up", "down", "draining")


class StandInHatun(Collector):
    """hatun's metrics for tunnels fra and ams, filled by hand; counters grow with time so that
    rate() and increase() see real traffic.

    Healthy: both tunnels up and carrying traffic. Degraded: every alert of config/alerts.yml has
    a reason to trigger: fra down, flapping (one more down per second) and with a handshake 10
    minutes old; ams drained, losing 40% of its probes and never handshaken; no tunnel in
    service; the last reload failed.
    """

    def __init__(self, healthy: bool):
        self.healthy = healthy
        self.started = time.monotonic()

    def tunnels(self, t: float, now: float) -> dict[str, dict]:
        if self.healthy:
            return {"fra": dict(state="up", weight=3, handshake=now - 20, loss=0.0, downs=0),
                    "ams": dict(state="up", weight=1, handshake=now - 70, loss=0.02, downs=1)}
        return {"fra": dict(state="down", weight=3, handshake=now - 600, loss=1.0, downs=int(t)),
                "ams": dict(state="draining", weight=1, handshake=0, loss=0.4, downs=0)}

    def collect(self):
        t, now = time.monotonic() - self.started, time.time()
        tunnels = self.tunnels(t, now)

        def family(kind, name, doc, labels=("tunnel",)):
            return kind(name, doc, labels=list(labels))

        up = family(GaugeMetricFamily, "hatun_tunnel_up", "1 while the tunnel is in service")
        state = family(GaugeMetricFamily, "hatun_tunnel_state", "current state", ("tunnel", "state"))
        rx = family(CounterMetricFamily, "hatun_tunnel_receive_bytes", "bytes received")
        tx = family(CounterMetricFamily, "hatun_tunnel_transmit_bytes", "bytes sent")
        handshake = family(GaugeMetricFamily, "hatun_tunnel_last_handshake_timestamp_seconds", "0 = never")
        rtt = family(HistogramMetricFamily, "hatun_tunnel_probe_rtt_seconds", "probe round-trip time")
        probes = family(CounterMetricFamily, "hatun_tunnel_probes", "probes sent", ("tunnel", "result"))
        loss = family(GaugeMetricFamily, "hatun_tunnel_probe_loss_ratio", "moving average")
        weight = family(GaugeMetricFamily, "hatun_tunnel_weight", "effective weight")
        configured = family(GaugeMetricFamily, "hatun_tunnel_configured_weight", "configured weight")
        transitions = family(CounterMetricFamily, "hatun_tunnel_transitions", "state changes",
                             ("tunnel", "to"))
        for name, tun in tunnels.items():
            in_service = tun["state"] == "up"
            up.add_metric([name], int(in_service))
            for s in STATES:
                state.add_metric([name, s], int(s == tun["state"]))
            sent = int(t * 10)  # 10 probes a second
            answered = int(sent * (1 - tun["loss"]))
            rx.add_metric([name], 2e5 * tun["weight"] * t * in_service)
            tx.add_metric([name], 1e5 * tun["weight"] * t * in_service)
            handshake.add_metric([name], tun["handshake"])
            rtt.add_metric([name], [(str(le), int(answered * f)) for le, f in RTT_CDF.items()]
                           + [("+Inf", answered)], sum_value=answered * 0.012)
            probes.add_metric([name, "success"], answered)
            probes.add_metric([name, "failure"], sent - answered)
            loss.add_metric([name], tun["loss"])
            weight.add_metric([name], tun["weight"] * in_service)
            configured.add_metric([name], tun["weight"])
            transitions.add_metric([name, "up"], 1 + tun["downs"] * in_service)
            transitions.add_metric([name, "down"], tun["downs"])
            transitions.add_metric([name, "draining"], int(tun["state"] == "draining"))
        yield from (up, state, rx, tx, handshake, rtt, probes, loss, weight, configured, transitions)

        yield GaugeMetricFamily("hatun_route_tunnels_in_service", "tunnels in the route",
                                sum(tun["state"] == "up" for tun in tunnels.values()))
        reloads = CounterMetricFamily("hatun_config_reloads", "reloads", labels=["result"])
        reloads.add_metric(["success"], 2)
        reloads.add_metric(["failure"], 0 if self.healthy else 1 + int(t))
        yield reloads
        yield GaugeMetricFamily("hatun_config_last_reload_successful", "1 if it was", int(self.healthy))
        info = GaugeMetricFamily("hatun_build_info", "build", labels=["version", "backend"])
        info.add_metric(["0.1.0", "kernel" if self.healthy else "userspace"], 1)
        yield info
        repairs = CounterMetricFamily("hatun_route_repairs", "drift repaired", labels=["object"])
        for obj, n in {"route": 1, "nexthop": 0, "rule": 0, "link": int(t) // 5}.items():
            repairs.add_metric([obj], n)
        yield repairs


@contextmanager
def open_stand_in(healthy: bool) -> Iterator[str]:
    """Serve a StandInHatun on a free port of 127.0.0.1; yields "127.0.0.1:PORT"."""
    registry = CollectorRegistry()
    registry.register(StandInHatun(healthy))
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
@pytest.mark.parametrize("healthy", [True, False], ids=["healthy", "degraded"])
def test_stand_in_passes_promtool_lint(healthy):
    registry = CollectorRegistry()
    registry.register(StandInHatun(healthy))
    res = subprocess.run(["promtool", "check", "metrics"], input=generate_latest(registry),
                         capture_output=True, timeout=30)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


# --- Against a real Prometheus -------------------------------------------------------------------------


@dataclass
class Scraping:
    prom: Prometheus
    healthy: str
    degraded: str
    dead: str
    started: float  # time.time() when Prometheus was ready

    def variables(self) -> dict[str, str]:
        # The dashboard's "All" for instance and tunnel is ".*".
        return grafana_variables(self.prom.scrape_interval, time.time() - self.started,
                                 instance=".*", tunnel=".*")


@pytest.fixture(scope="module")
def scraping() -> Iterator[Scraping]:
    if not have_prometheus():
        pytest.skip("prometheus not installed (Debian: apt-get install prometheus)")
    # A bound socket that does not listen: connections to it are refused, a target that is down.
    with open_stand_in(True) as healthy, open_stand_in(False) as degraded, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{closed.getsockname()[1]}"
        with open_prometheus([healthy, degraded, dead], rule_files=[ALERTS]) as prom:
            started = time.time()
            wait_for_scrapes(prom, targets=3, scrapes=5)
            yield Scraping(prom, healthy, degraded, dead, started)


def test_prometheus_reports_a_parse_error(scraping):
    with pytest.raises(PrometheusError, match="parse error"):
        scraping.prom.query("rate(hatun_tunnel_probes_total[")


def test_every_dashboard_query_parses(scraping, dashboard):
    errors = []
    for e in dashboard_exprs(dashboard):
        try:
            scraping.prom.query(substitute(e.expr, scraping.variables()))
        except PrometheusError as err:
            errors.append(f"{e.where}: {err}")
    assert not errors, "\n".join(errors)


def test_every_dashboard_query_returns_data(scraping, dashboard):
    empty = exprs_without_data(scraping.prom, dashboard_exprs(dashboard), scraping.variables(),
                               scraping.started)
    assert not empty, "no finite value from:\n" + "\n".join(empty)


def test_variable_queries_find_instances_and_tunnels(scraping, dashboard):
    found = {}
    for e, label in variable_selectors(dashboard):
        series = scraping.prom.query(substitute(e.expr, scraping.variables()))
        found[e.where] = {s["metric"].get(label) for s in series}
    assert found == {"variable 'instance'": {scraping.healthy, scraping.degraded},
                     "variable 'tunnel'": {"fra", "ams"}}


ALERT_NAMES = {"HatunTunnelDown", "HatunAllTunnelsDown", "HatunTunnelFlapping", "HatunProbeLossHigh",
               "HatunHandshakeStale", "HatunConfigReloadFailed", "HatunDown"}


def test_every_alerting_rule_returns_data_and_evaluates(scraping):
    assert {r["name"] for r in scraping.prom.rules()} == ALERT_NAMES
    empty = exprs_without_data(scraping.prom, rule_exprs(scraping.prom), {}, scraping.started)
    assert not empty, "no finite value from:\n" + "\n".join(empty)
    # A rule not evaluated yet has lastEvaluation "0001-01-01T00:00:00Z" and health "unknown".
    wait_until(lambda: all(r["health"] != "unknown" for r in scraping.prom.rules()), "rules evaluated", 10)
    bad = [(r["name"], r["health"], r.get("lastError")) for r in scraping.prom.rules() if r["health"] != "ok"]
    assert not bad


def test_exactly_the_expected_alerts_trigger(scraping):
    expected = {
        ("HatunTunnelDown", scraping.degraded, "fra"),
        ("HatunAllTunnelsDown", scraping.degraded, None),
        ("HatunTunnelFlapping", scraping.degraded, "fra"),
        ("HatunProbeLossHigh", scraping.degraded, "ams"),
        ("HatunHandshakeStale", scraping.degraded, "fra"),  # 10 minutes old
        ("HatunHandshakeStale", scraping.degraded, "ams"),  # never
        ("HatunConfigReloadFailed", scraping.degraded, None),
        ("HatunDown", scraping.dead, None),
    }

    def triggered() -> set:  # pending (waiting out `for`) or firing
        return {(a["labels"]["alertname"], a["labels"]["instance"], a["labels"].get("tunnel"))
                for a in scraping.prom.alerts()}

    try:
        wait_until(lambda: triggered() == expected, "expected alerts", timeout=20)
    except AssertionError:
        got = triggered()
        pytest.fail(f"missing: {sorted(expected - got, key=str)}; "
                    f"unexpected: {sorted(got - expected, key=str)}")
