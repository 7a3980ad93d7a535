"""Write dashboards/hatun.json, hatun's Grafana dashboard, from the panel list below.

Run `python dashboards/build.py` after changing this file and commit both; tests/test_dashboard.py
fails while hatun.json differs from what this script writes.

The dashboard is built with Grafana's foundation SDK (PyPI `grafana-foundation-sdk`), which is
published once per Grafana version: this file needs the build for Grafana 11.6 (see SDK_PIN).

The JSON is Grafana's classic dashboard model as "Export for sharing externally" writes it: on import
Grafana asks for a Prometheus data source for the input DS_PROMETHEUS and substitutes it for every
"${DS_PROMETHEUS}". Panels query through the `datasource` variable, which that input only presets, so
a viewer can switch between Prometheus servers.
"""

from __future__ import annotations

import json
import sys
from importlib import metadata
from pathlib import Path

OUTPUT = Path(__file__).with_name("hatun.json")

GRAFANA_VERSION = "11.6.0"
SDK_PIN = f"grafana-foundation-sdk==1769699379!{GRAFANA_VERSION}"

# A bare `pip install grafana-foundation-sdk` picks the build for Grafana 10.1, which writes an older
# schema version and other defaults: refuse any build but the one for GRAFANA_VERSION.
try:
    SDK_VERSION = metadata.version("grafana-foundation-sdk")
except metadata.PackageNotFoundError:
    raise ModuleNotFoundError(f"grafana-foundation-sdk is not installed: pip install '{SDK_PIN}'",
                              name="grafana_foundation_sdk") from None
if SDK_VERSION.partition("!")[2] != GRAFANA_VERSION:
    raise RuntimeError(f"grafana-foundation-sdk {SDK_VERSION} is installed, the build for Grafana "
                       f"{GRAFANA_VERSION} is needed: pip install '{SDK_PIN}'")

from grafana_foundation_sdk.builders import bargauge, stat, statetimeline, timeseries  # noqa: E402
from grafana_foundation_sdk.builders.common import (  # noqa: E402
    GraphThresholdsStyleConfig, ReduceDataOptions, StackingConfig, VizLegendOptions, VizTooltipOptions)
from grafana_foundation_sdk.builders.dashboard import (  # noqa: E402
    AnnotationQuery, Dashboard, DatasourceVariable, FieldColor, QueryVariable, Row, ThresholdsConfig)
from grafana_foundation_sdk.builders.prometheus import Dataquery  # noqa: E402
from grafana_foundation_sdk.cog.encoder import JSONEncoder  # noqa: E402
from grafana_foundation_sdk.models import common  # noqa: E402
from grafana_foundation_sdk.models.dashboard import (  # noqa: E402
    DashboardCursorSync, DataSourceRef, DynamicConfigValue, FieldColorModeId, Threshold, ThresholdsMode,
    ValueMap, ValueMappingResult, VariableHide, VariableOption, VariableRefresh, VariableSort)
from grafana_foundation_sdk.models.prometheus import QueryEditorMode  # noqa: E402

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label filters from the template variables. Their "All" value is ".*" (see `variable`).
INSTANCE = 'instance=~"$instance"'
TUNNEL = 'instance=~"$instance", tunnel=~"$tunnel"'
PER_TUNNEL = "{{tunnel}} @ {{instance}}"

# hatun_tunnel_state has one series per state; the state timeline needs one series per tunnel, so
# each state is weighted by a code (the current state's series is 1, the others 0) and the codes
# are mapped back to names and colours.
STATE_CODES = {"init": 1, "up": 2, "draining": 3, "down": 4}
STATE_COLORS = {"init": "blue", "up": "green", "draining": "yellow", "down": "red"}

# The panel builders of the SDK share these setters but no base class.
PanelBuilder = timeseries.Panel | stat.Panel | statetimeline.Panel | bargauge.Panel


def target(expr: str, legend: str, instant: bool = False) -> Dataquery:
    """A PromQL query; `panel` numbers it (refId A, B, ...)."""
    query = (Dataquery().datasource(DATASOURCE).editor_mode(QueryEditorMode.CODE)
             .expr(expr).legend_format(legend))
    return query.instant() if instant else query.range()


def panel(builder: PanelBuilder, title: str, description: str, targets: list[Dataquery], *,
          unit: str) -> PanelBuilder:
    builder.title(title).description(description).datasource(DATASOURCE).unit(unit)
    for i, t in enumerate(targets):
        builder.with_target(t.ref_id(chr(ord("A") + i)))
    return builder


def thresholds(*steps: tuple[float | None, str]) -> ThresholdsConfig:
    """Absolute thresholds; the first step's value is None (from -Infinity)."""
    return (ThresholdsConfig().mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(value=v, color=c) for v, c in steps]))


def value_names(names: dict[int, tuple[str, str]]) -> list[ValueMap]:
    """Value mapping: number -> (text, colour)."""
    return [ValueMap(options={str(value): ValueMappingResult(text=text, color=color, index=i)
                              for i, (value, (text, color)) in enumerate(sorted(names.items()))})]


def reduce_to_last() -> ReduceDataOptions:
    return ReduceDataOptions().calcs(["lastNotNull"]).fields("").values(False)


def timeseries_panel(title: str, description: str, targets: list[Dataquery], *, unit: str,
                     stack: bool = False, step: bool = False, min_val: float | None = None,
                     max_val: float | None = None, axis_label: str | None = None,
                     threshold_line: ThresholdsConfig | None = None,
                     dashed: str | None = None) -> timeseries.Panel:
    """A graph with a table legend. `threshold_line` is drawn as lines; series whose name matches the
    regular expression `dashed` are drawn dashed."""
    p = (panel(timeseries.Panel(), title, description, targets, unit=unit)
         .color_scheme(FieldColor().mode(FieldColorModeId.PALETTE_CLASSIC))
         .draw_style(common.GraphDrawStyle.LINE)
         .line_interpolation(common.LineInterpolation.STEP_AFTER if step else common.LineInterpolation.LINEAR)
         .line_width(1)
         .fill_opacity(30 if stack else 10)
         .show_points(common.VisibilityMode.NEVER)
         .span_nulls(False)
         .stacking(StackingConfig().mode(common.StackingMode.NORMAL if stack else common.StackingMode.NONE)
                   .group("A"))
         .legend(VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.TABLE)
                 .placement(common.LegendPlacement.RIGHT).calcs(["mean", "max", "lastNotNull"]))
         .tooltip(VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                  .sort(common.SortOrder.DESCENDING)))
    if min_val is not None:
        p.min(min_val)
    if max_val is not None:
        p.max(max_val)
    if axis_label is not None:
        p.axis_label(axis_label)
    if threshold_line is not None:
        p.thresholds(threshold_line).thresholds_style(
            GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.LINE))
    if dashed is not None:
        p.override_by_regexp(dashed, [DynamicConfigValue(id_val="custom.lineStyle",
                                                         value=common.LineStyle(fill="dash", dash=[10, 10]))])
    return p


def stat_panel(title: str, description: str, targets: list[Dataquery], *,
               colors: ThresholdsConfig | None = None, mappings: list[ValueMap] | None = None,
               text_mode: common.BigValueTextMode = common.BigValueTextMode.AUTO,
               graph: bool = False) -> stat.Panel:
    """The last value; with `colors`, on a background coloured by those thresholds."""
    p = (panel(stat.Panel(), title, description, targets, unit="short")
         .reduce_options(reduce_to_last())
         .color_mode(common.BigValueColorMode.BACKGROUND if colors else common.BigValueColorMode.NONE)
         .graph_mode(common.BigValueGraphMode.AREA if graph else common.BigValueGraphMode.NONE)
         .text_mode(text_mode)
         .justify_mode(common.BigValueJustifyMode.AUTO)
         .orientation(common.VizOrientation.AUTO))
    if colors is not None:
        p.color_scheme(FieldColor().mode(FieldColorModeId.THRESHOLDS)).thresholds(colors)
    if mappings is not None:
        p.mappings(mappings)
    return p


def state_panel(title: str, description: str, targets: list[Dataquery],
                mappings: list[ValueMap]) -> statetimeline.Panel:
    """One band per series, coloured by `mappings` from its value."""
    return (panel(statetimeline.Panel(), title, description, targets, unit="short")
            .color_scheme(FieldColor().mode(FieldColorModeId.THRESHOLDS))
            .thresholds(thresholds((None, "text")))
            .fill_opacity(80)
            .line_width(0)
            .mappings(mappings)
            .merge_values(True)
            .show_value(common.VisibilityMode.AUTO)
            .align_value(common.TimelineValueAlignment.LEFT)
            .row_height(0.9)
            .legend(VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                    .placement(common.LegendPlacement.BOTTOM))
            .tooltip(VizTooltipOptions().mode(common.TooltipDisplayMode.SINGLE).sort(common.SortOrder.NONE)))


def bars(title: str, description: str, targets: list[Dataquery]) -> bargauge.Panel:
    """Horizontal bars of counts over the dashboard's time range (instant queries over $__range)."""
    return (panel(bargauge.Panel(), title, description, targets, unit="none")
            .decimals(0)
            .min(0)
            .color_scheme(FieldColor().mode(FieldColorModeId.THRESHOLDS))
            .thresholds(thresholds((None, "blue")))
            .orientation(common.VizOrientation.HORIZONTAL)
            .display_mode(common.BarGaugeDisplayMode.BASIC)
            .show_unfilled(True)
            .reduce_options(reduce_to_last()))


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


def layout() -> list[tuple[str, list[tuple[PanelBuilder, int, int]]]]:
    """(row title, [(panel, width, height), ...]); Grafana's grid is 24 columns wide.

    A function rather than a constant: the SDK's builders are mutable and `Dashboard` positions the
    panels it is given in place.
    """
    return [
        ("Overview", [
            (stat_panel("Tunnels in service",
                        "Tunnels in the multipath route now (hatun_route_tunnels_in_service).",
                        [target(f"hatun_route_tunnels_in_service{{{INSTANCE}}}", "{{instance}}")],
                        graph=True, colors=thresholds((None, "red"), (1, "orange"), (2, "green"))), 5, 8),
            (state_panel("Tunnel state",
                         "State of each tunnel: init until the probes rose, up (in service), draining (taken "
                         "out by an operator), down (probes fell).",
                         [target(state_expr(), PER_TUNNEL)],
                         value_names({0: ("unknown", "text"), **{
                             code: (state, STATE_COLORS[state]) for state, code in STATE_CODES.items()}})),
             19, 8),
        ]),
        ("Traffic", [
            (timeseries_panel("Receive throughput", "Bytes per second received from each tunnel's peer.",
                              [target(throughput("receive"), PER_TUNNEL)], unit="Bps", stack=True), 12, 8),
            (timeseries_panel("Transmit throughput", "Bytes per second sent to each tunnel's peer.",
                              [target(throughput("transmit"), PER_TUNNEL)], unit="Bps", stack=True), 12, 8),
            (timeseries_panel("Traffic share (transmit)",
                              "Each tunnel's share of its instance's transmitted bytes, all tunnels of the "
                              "instance counted. Compare with the effective weights.",
                              [target(f"100 * {throughput('transmit')}\n/ ignoring (tunnel) group_left\n"
                                      "sum by (instance) (rate("
                                      f"hatun_tunnel_transmit_bytes_total{{{INSTANCE}}}[$__rate_interval]))",
                                      PER_TUNNEL)],
                              unit="percent", stack=True, min_val=0, max_val=100), 12, 8),
            (timeseries_panel("Effective weights",
                              "Weight of each tunnel in the multipath route (0 when out of it); dashed: "
                              "configured.",
                              [target(f"hatun_tunnel_weight{{{TUNNEL}}}", PER_TUNNEL),
                               target(f"hatun_tunnel_configured_weight{{{TUNNEL}}}",
                                      PER_TUNNEL + " configured")],
                              unit="none", step=True, min_val=0, dashed=".* configured$"), 12, 8),
        ]),
        ("Health", [
            (timeseries_panel("Probe RTT p50 / p99", "Round-trip time of the probes through each tunnel.",
                              [target(rtt_quantile(0.5), PER_TUNNEL + " p50"),
                               target(rtt_quantile(0.99), PER_TUNNEL + " p99")], unit="s"), 12, 8),
            (timeseries_panel("Probe loss", "Moving average of lost probes, as hatun's health check sees it.",
                              [target(f"hatun_tunnel_probe_loss_ratio{{{TUNNEL}}}", PER_TUNNEL)],
                              unit="percentunit", min_val=0, max_val=1), 12, 8),
            (timeseries_panel("Probes by result",
                              "Probes per second, by result: shows that probing goes on at all.",
                              [target(f"sum by (instance, tunnel, result) ("
                                      f"rate(hatun_tunnel_probes_total{{{TUNNEL}}}[$__rate_interval]))",
                                      PER_TUNNEL + " {{result}}")],
                              unit="short", axis_label="probes/s", min_val=0), 8, 8),
            (timeseries_panel("Handshake age",
                              "Time since each tunnel's last WireGuard handshake; the line is "
                              "HatunHandshakeStale's 3m. Tunnels that never completed a handshake are not "
                              "drawn.",
                              [target("time() - ("
                                      f"hatun_tunnel_last_handshake_timestamp_seconds{{{TUNNEL}}} > 0)",
                                      PER_TUNNEL)],
                              unit="s", min_val=0,
                              threshold_line=thresholds((None, "green"), (180, "red"))), 8, 8),
            (bars("State transitions", "Transitions of each tunnel in the time range, by new state.",
                  [target(f"sum by (instance, tunnel, to) ("
                          f"increase(hatun_tunnel_transitions_total{{{TUNNEL}}}[$__range]))",
                          PER_TUNNEL + " to {{to}}", instant=True)]), 8, 8),
        ]),
        ("Control", [
            (stat_panel("Last config reload", "Whether the last configuration reload succeeded.",
                        [target(f"hatun_config_last_reload_successful{{{INSTANCE}}}", "{{instance}}")],
                        colors=thresholds((None, "red"), (1, "green")),
                        mappings=value_names({0: ("failed", "red"), 1: ("ok", "green")})), 6, 6),
            (bars("Config reloads", "Configuration reloads in the time range, by result.",
                  [target(f"sum by (instance, result) ("
                          f"increase(hatun_config_reloads_total{{{INSTANCE}}}[$__range]))",
                          "{{instance}} {{result}}", instant=True)]), 6, 6),
            (bars("Route repairs", "Drift repaired by hatun in the time range, by kernel object.",
                  [target(f"sum by (instance, object) ("
                          f"increase(hatun_route_repairs_total{{{INSTANCE}}}[$__range]))",
                          "{{instance}} {{object}}", instant=True)]), 6, 6),
            (stat_panel("Version", "hatun version and WireGuard backend of each instance.",
                        [target(f"hatun_build_info{{{INSTANCE}}}", "{{instance}}: {{version}} ({{backend}})",
                                instant=True)], text_mode=common.BigValueTextMode.NAME), 6, 6),
        ]),
    ]


def variable(name: str, label: str, query: str) -> QueryVariable:
    """A multi-value query variable with "All" matching everything (also values added later)."""
    return (QueryVariable(name).label(label).datasource(DATASOURCE)
            .query({"query": query, "refId": f"PrometheusVariableQueryEditor-{name}"})
            # On time range change, so that new instances and tunnels appear.
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True).include_all(True).all_value(".*")
            .current(VariableOption(selected=True, text=["All"], value=["$__all"]))
            .options([]).regex("").sort(VariableSort.ALPHABETICAL_ASC).hide(VariableHide.DONT_HIDE))


def build() -> Dashboard:
    """The dashboard as the SDK's builder (no export envelope, see `dashboard`)."""
    board = (
        Dashboard("hatun").uid("hatun")
        .description("hatun: WireGuard tunnels, their health and the multipath route over them.")
        .tags(["hatun", "wireguard"])
        .editable()
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .time("now-6h", "now")
        # "" = the viewer's own settings (the SDK would default to "browser").
        .timezone("").week_start("")
        .fiscal_year_start_month(0)
        .refresh("30s")
        .version(1)
        .links([])
        .annotation(AnnotationQuery().built_in(1)
                    .datasource(DataSourceRef(type_val="grafana", uid="-- Grafana --"))
                    .enable(True).hide(True).icon_color("rgba(0, 211, 255, 1)").name("Annotations & Alerts")
                    .type("dashboard"))
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus")
                       .current(VariableOption(selected=False, text="${DS_PROMETHEUS}",
                                               value="${DS_PROMETHEUS}"))
                       .regex("").hide(VariableHide.DONT_HIDE).include_all(False).multi(False))
        .with_variable(variable("instance", "Instance", "label_values(hatun_build_info, instance)"))
        .with_variable(variable("tunnel", "Tunnel",
                                'label_values(hatun_tunnel_up{instance=~"$instance"}, tunnel)'))
    )
    # Rows stay expanded, their panels follow them at the top level; the SDK lays them out left to
    # right, starting a new line when one is full.
    next_id = 1
    for row_title, row_panels in layout():
        board.with_row(Row(row_title).id(next_id))
        next_id += 1
        for p, w, h in row_panels:
            board.with_panel(p.id(next_id).span(w).height(h))
            next_id += 1
    return board


def dashboard() -> dict:
    """The dashboard as Grafana's "Export for sharing externally" writes it."""
    board = build().build()
    # The SDK writes the schema's default page size (20) into every state timeline, which turns on
    # pagination and draws a pager under the panel; Grafana's panel editor leaves it unset: no pages.
    for p in board.panels:
        if p.type_val == "state-timeline":
            p.options.per_page = None
    model = json.loads(json.dumps(board, cls=JSONEncoder))
    # The SDK's variable model has no `definition`: Grafana shows it in the variable list.
    for var in model["templating"]["list"]:
        if var["type"] == "query":
            var["definition"] = var["query"]["query"]
    panel_names = {"bargauge": "Bar gauge", "stat": "Stat", "state-timeline": "State timeline",
                   "timeseries": "Time series"}
    kinds = sorted({p["type"] for p in model["panels"]} - {"row"})
    # The export envelope is not part of the dashboard model, so the SDK does not write it.
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "description": "",
                      "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "__elements": {},
        "__requires": [{"type": "grafana", "id": "grafana", "name": "Grafana", "version": GRAFANA_VERSION},
                       {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"}]
                      + [{"type": "panel", "id": k, "name": panel_names[k], "version": ""} for k in kinds],
        "id": None,
        **model,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    OUTPUT.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
