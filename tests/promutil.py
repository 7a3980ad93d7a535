"""A real Prometheus for tests, and the PromQL that hatun's dashboard and alerting rules run.

`open_prometheus` starts the `prometheus` binary in a temporary directory, listening on a free port of
127.0.0.1 and scraping the targets it is given (a stand-in exporter in the tests, a real hatun in the
lab); it stops that process, by its PID, however the test ends. Queries go through the HTTP API, so
a PromQL parse error comes back as `PrometheusError` with Prometheus' own message.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.labutil import wait_until

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "dashboards" / "hatun.json"
ALERTS = REPO / "config" / "alerts.yml"



class PrometheusError(Exception):
    """The Prometheus API answered with an error (e.g. "bad_data: 1:5: parse error: ...")."""


def have_prometheus() -> bool:
    return shutil.which("prometheus") is not None


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Prometheus:
    """A running Prometheus: its base URL, PID and scrape interval (seconds)."""

    url: str
    pid: int
    scrape_interval: float

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/PATH with PARAMS and return its `data`; raise PrometheusError for an error answer."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as e:
            # 400 (bad query), 422 (execution error) and 503 carry the JSON error body too.
            try:
                body = json.load(e)
            except ValueError:
                raise PrometheusError(f"{url}: HTTP {e.code}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """Instant query: the result vector (or [scalar] / [string])."""
        data = self.api("query", query=expr, **({"time": at} if at is not None else {}))
        return data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """Range query: the result matrix."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def rules(self) -> list[dict]:
        """Every loaded rule (all groups), as /api/v1/rules describes it."""
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def alerts(self) -> list[dict]:
        """Active alerts, pending and firing."""
        return self.api("alerts")["alerts"]


def finite_values(result: list[dict]) -> list[float]:
    """The finite sample values of a query result (vector or matrix); NaN and ±Inf left out."""
    values = []
    for series in result:
        samples = series["values"] if "values" in series else [series["value"]]
        values += [v for v in (float(s[1]) for s in samples) if math.isfinite(v)]
    return values


def prometheus_config(targets: Sequence[str], rule_files: Sequence[Path], job: str,
                      scrape_interval: float) -> str:
    # JSON is YAML, so no YAML writer is needed.
    return json.dumps({
        "global": {"scrape_interval": f"{scrape_interval:g}s", "evaluation_interval": f"{scrape_interval:g}s",
                   "scrape_timeout": f"{scrape_interval:g}s"},
        "rule_files": [str(Path(p).resolve()) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}]}],
    }, indent=2)


@contextmanager
def open_prometheus(targets: Sequence[str], *, rule_files: Sequence[Path] = (), job: str = "hatun",
                    scrape_interval: float = 1.0, ready_timeout: float = 30.0) -> Iterator[Prometheus]:
    """Run Prometheus scraping TARGETS ("host:port") as job JOB, with RULE_FILES loaded.

    Its data and config live in a temporary directory removed afterwards; it listens on 127.0.0.1
    only. Raises RuntimeError (with the end of its log) if it exits or is not ready in time.
    """
    with tempfile.TemporaryDirectory(prefix="hatun-prometheus-") as tmp:
        config = Path(tmp, "prometheus.yml")
        config.write_text(prometheus_config(targets, rule_files, job, scrape_interval))
        log_path = Path(tmp, "prometheus.log")
        address = f"127.0.0.1:{free_port()}"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp}/data",
                 f"--web.listen-address={address}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        prom = Prometheus(url=f"http://{address}", pid=proc.pid, scrape_interval=scrape_interval)
        try:
            _wait_ready(prom, proc, log_path, ready_timeout)
            yield prom
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _wait_ready(prom: Prometheus, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=1) as resp:
                return resp.status == 200
        except OSError:  # refused while starting, 503 while the TSDB opens
            return False

    try:
        wait_until(ready, f"prometheus ready on {prom.url}", timeout)
    except AssertionError as e:
        raise RuntimeError(f"{e}\n{_tail(log_path)}") from None


def _tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_for_scrapes(prom: Prometheus, targets: int, scrapes: int, timeout: float = 30.0) -> None:
    """Wait until Prometheus has scraped each of TARGETS targets SCRAPES times (successful or not)."""
    def done() -> bool:
        counts = prom.query("count_over_time(up[1h])")
        return len(counts) >= targets and all(float(c["value"][1]) >= scrapes for c in counts)

    wait_until(done, f"{scrapes} scrapes of {targets} targets", timeout)


# --- The PromQL of the dashboard and of the alerting rules -----------------------------------------


@dataclass(frozen=True)
class Expr:
    """One PromQL expression and where it comes from (for messages)."""

    where: str
    expr: str
    instant: bool = True


def dashboard_exprs(dashboard: dict) -> list[Expr]:
    """Every target expression of the dashboard's panels (also inside rows), with Grafana variables."""
    exprs = []
    for panel in _panels(dashboard):
        for t in panel.get("targets", []):
            if "expr" in t:
                exprs.append(Expr(f"panel {panel['title']!r} {t['refId']}", t["expr"],
                                  instant=t.get("instant", False) and not t.get("range", False)))
    return exprs


def _panels(container: dict) -> Iterator[dict]:
    for panel in container.get("panels", []):
        yield panel
        yield from _panels(panel)


def variable_selectors(dashboard: dict) -> list[tuple[Expr, str]]:
    """(series selector, label) of each label_values(selector, label) template variable."""
    found = []
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else query or ""
        if m := re.fullmatch(r"\s*label_values\((.+),\s*(\w+)\s*\)\s*", query):
            found.append((Expr(f"variable {var['name']!r}", m.group(1)), m.group(2)))
    return found


def rule_exprs(prom: Prometheus) -> list[Expr]:
    """The expression of every rule that PROM loaded (e.g. from config/alerts.yml).

    Read back from Prometheus rather than parsed from the YAML: Prometheus' own loader is the
    authority on what a rule file means, and the tests need no YAML parser.
    """
    return [Expr(f"{r['type']} {r['name']} {r.get('labels', {})}", r["query"]) for r in prom.rules()]


def exprs_without_data(prom: Prometheus, exprs: Sequence[Expr], variables: dict[str, str],
                       start: float) -> list[str]:
    """Those of EXPRS (Grafana variables substituted) that return no finite value, as messages.

    An instant expression is evaluated now; a range one as Grafana draws a graph: from START to
    now, one step per scrape interval. A parse error raises PrometheusError.
    """
    empty, now = [], time.time()
    for e in exprs:
        expr = substitute(e.expr, variables)
        if e.instant:
            result = prom.query(expr, at=now)
        else:
            result = prom.query_range(expr, start, now, prom.scrape_interval)
        if not finite_values(result):
            empty.append(f"{e.where}: {expr}")
    return empty


def grafana_variables(scrape_interval: float, time_range: float, **template: str) -> dict[str, str]:
    """Values for Grafana's built-in variables as Grafana computes them for a panel whose step is
    the scrape interval ($__rate_interval is then 4 scrape intervals), plus TEMPLATE variables."""
    return {
        "__interval": f"{scrape_interval:g}s",
        "__rate_interval": f"{4 * scrape_interval:g}s",
        "__range": f"{math.ceil(time_range)}s",
        **template,
    }


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Replace $name and ${name} (and ${name:format}) in EXPR; ValueError names an unknown variable."""
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise ValueError(f"unknown Grafana variable ${name} in {expr!r}")
        return variables[name]

    return re.sub(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))", value, expr)
