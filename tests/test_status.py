"""The typed status: read back safely, rendered for people, diagnosed, exported (pure)."""

from __future__ import annotations

import dataclasses

import pytest

from hatun.metrics import Metrics
from hatun.render import status_text
from hatun.runner import diagnose
from hatun.status import ReloadStatus, RouteStatus, Status, StatusError, TunnelStatus


def tunnel(name: str = "gw1", **kw) -> TunnelStatus:
    fields = dict(
        name=name, interface=f"hat-{name}", state="up", health="up", drained=False, removing=False, since=1.8e9,
        for_seconds=12.0, rtt_seconds=0.002, rtt_last_seconds=0.0021, loss=0.0, weight=1, configured_weight=1,
        priority=0, in_route=True, pinned=False, rx_bytes=1000, tx_bytes=2000, rx_rate=10.0, tx_rate=20.0,
        last_handshake=1.8e9, handshake_age_seconds=5.0, endpoint="198.18.1.2:51820",
        endpoint_configured="198.18.1.2:51820", endpoint_error=None, probe="icmp://198.18.101.1",
        last_failure=None, probes_ok=100, probes_failed=1, present=True, last_error=None, restarts=0,
        congested=0, late_replies=0, transitions={"up": 1}, rtt_counts=(0, 0, 0, 5) + (0,) * 9, rtt_sum=0.01)
    fields.update(kw)
    return TunnelStatus(**fields)


def status(*tunnels: TunnelStatus, members=("gw1",), all_down=False) -> Status:
    return Status(version="0.1.0", pid=42, config="/etc/hatun/hatun.toml", backend="userspace", mode="resilient",
                  started=1.8e9, ready=True,
                  route=RouteStatus(["198.19.77.0/24"], list(members), 0, False, all_down, None),
                  reload=ReloadStatus(True, None, {"success": 2}), tunnels=list(tunnels or (tunnel(),)),
                  repairs={"route": 1})


def test_json_round_trip_keeps_everything_but_internal_fields():
    st = status(tunnel(), tunnel("gw2", state="down", in_route=False, weight=0))
    doc = st.to_json()
    assert "rtt_counts" not in doc["tunnels"][0] and "rtt_sum" not in doc["tunnels"][0]
    back = Status.from_json(doc)
    assert back == dataclasses.replace(st, tunnels=[dataclasses.replace(t, rtt_counts=(), rtt_sum=0.0)
                                                    for t in st.tunnels])


def test_unknown_keys_from_a_newer_hatun_are_ignored():
    doc = status().to_json()
    doc["new_thing"] = {"x": 1}
    doc["tunnels"][0]["new_field"] = 3
    assert Status.from_json(doc).tunnels[0].name == "gw1"


@pytest.mark.parametrize("mutate", [
    lambda d: d.pop("route"),
    lambda d: d["tunnels"][0].pop("state"),
    lambda d: d.update(tunnels="gw1"),
    lambda d: d["tunnels"][0].update(loss="lots"),
    lambda d: d["route"].update(members=None),
    lambda d: d.update(pid=[1]),
])
def test_a_status_that_does_not_fit_is_a_clear_error(mutate):
    doc = status().to_json()
    mutate(doc)
    with pytest.raises(StatusError, match="does not fit"):
        Status.from_json(doc)


@pytest.mark.parametrize("doc", [None, [], "status", 7, {"tunnels": []}])
def test_not_a_status_at_all(doc):
    with pytest.raises(StatusError):
        Status.from_json(doc)


def test_text_shows_each_tunnel_and_why_one_is_down():
    text = status(tunnel(), tunnel("gw2", state="down", in_route=False, weight=0, last_failure="3 probes failed"),
                  tunnel("gw3", state="draining", drained=True, in_route=False, pinned=True)).to_json()
    out = status_text(Status.from_json(text))
    lines = out.splitlines()
    assert "198.19.77.0/24 -> gw1 (tier 0)" in lines[1]
    assert any(line.startswith("gw2") and "3 probes failed" in line for line in lines)
    assert any(line.startswith("gw3") and "pinned" in line for line in lines)


@pytest.mark.parametrize("kw, words", [
    ({}, "healthy"),
    ({"state": "down", "endpoint_error": "cannot resolve gw.example.net: timeout"}, "DNS name"),
    ({"state": "down", "present": False, "last_error": "EPERM"}, "device is missing (EPERM)"),
    ({"state": "down", "handshake_age_seconds": None}, "no handshake with the gateway at 198.18.1.2:51820"),
    ({"state": "down", "last_failure": "timeout"}, "does not forward into the private network"),
])
def test_diagnoses(kw, words):
    assert words in diagnose(tunnel(**kw))


async def test_metrics_export_every_tunnel_of_the_status_in_every_family():
    class Sup:
        async def refresh_statuses(self, max_age=0.0):
            pass

        def status(self):
            return status(tunnel(), tunnel("gw2@hat-old", state="draining", removing=True, in_route=False, weight=0))

    body, _ = await Metrics(Sup()).render(None)
    text = body.decode()
    for family in ("hatun_tunnel_up", "hatun_tunnel_probes_total", "hatun_tunnel_probe_rtt_seconds_count",
                   "hatun_tunnel_transitions_total", "hatun_tunnel_weight"):
        for name in ("gw1", "gw2@hat-old"):
            assert any(line.startswith(family + "{") and f'tunnel="{name}"' in line for line in text.splitlines()), \
                (family, name)
    assert "hatun_route_tunnels_in_service 1.0" in text
    assert 'hatun_route_repairs_total{object="route"} 1.0' in text


async def test_a_runner_in_the_status_shows_its_state_and_no_secret():
    from hatun.status import tunnel_status
    from tests.fakes import make_runner

    runner = make_runner("gw1")
    runner.last_error = f"apply failed: key {runner.key.private.base64} refused"
    t = tunnel_status(runner, "gw1", in_route=False, pinned=False)
    assert (t.name, t.interface, t.state, t.weight, t.present) == ("gw1", "hat-gw1", "init", 0, False)
    assert runner.key.private.base64 not in str(Status.from_json(status(t).to_json()))
    assert tunnel_status(runner, "gw1", in_route=True, pinned=True).weight == 1
