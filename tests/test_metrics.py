"""Issue 12: the Prometheus exposition of `_metrics` (counting, names, HELP, bounded labels).

The exposition is parsed back with prometheus-client's own parser, so a malformed line fails.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ufo_trio._messages import ClientMessageType, ClientType, ServerMessageType
from ufo_trio._metrics import (
    CLOSE_CODES,
    ERROR_CODES,
    LIMIT_FLAGS,
    REGISTRATION_OUTCOMES,
    Histogram,
    Metrics,
    MetricsExporter,
    NullMetrics,
)

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

EXPECTED_FAMILIES = {
    "ufo_trio_connections": "gauge",
    "ufo_trio_live_sessions": "gauge",
    "ufo_trio_http_connections": "gauge",
    "ufo_trio_registrations": "counter",
    "ufo_trio_disconnects": "counter",
    "ufo_trio_frames_received": "counter",
    "ufo_trio_frames_sent": "counter",
    "ufo_trio_error_frames": "counter",
    "ufo_trio_limit_refusals": "counter",
    "ufo_trio_tasks_ended": "counter",
    "ufo_trio_commands_sent": "counter",
    "ufo_trio_command_timeouts": "counter",
    "ufo_trio_model_calls": "counter",
    "ufo_trio_task_duration_seconds": "histogram",
    "ufo_trio_command_round_trip_seconds": "histogram",
    "ufo_trio_model_call_seconds": "histogram",
    "ufo_trio_heartbeat_handling_seconds": "histogram",
    "ufo_trio_build_info": "gauge",
}


def scrape(exporter: MetricsExporter) -> dict[str, Metric]:
    content_type, body = exporter.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def value(family: Metric, suffix: str = "", **labels: str) -> float:
    found = [
        s.value
        for s in family.samples
        if s.name == family.name + suffix and s.labels == labels
    ]
    assert len(found) == 1, (family.name, suffix, labels, family.samples)
    return found[0]


def test_every_family_is_there_with_help_and_prefix() -> None:
    families = scrape(MetricsExporter(Metrics()))
    for name, kind in EXPECTED_FAMILIES.items():
        assert families[name].type == kind, name
        assert families[name].documentation.strip(), name
    # The library's process collector, under our prefix too: nothing unprefixed is exported.
    assert "ufo_trio_process_resident_memory_bytes" in families
    assert "ufo_trio_process_cpu_seconds" in families
    assert all(name.startswith("ufo_trio_") for name in families)


def test_registry_is_private() -> None:
    from prometheus_client import REGISTRY

    MetricsExporter(Metrics())
    names = {f.name for f in REGISTRY.collect()}
    assert not any(name.startswith("ufo_trio") for name in names)


def test_counts_are_right() -> None:
    m = Metrics(agents=("script", "llm"))
    for _ in range(3):
        m.frame_received(ClientMessageType.HEARTBEAT)
        m.frame_sent(ServerMessageType.HEARTBEAT)
    m.frame_received("binary")
    m.frame_received("invalid")
    m.registration("ok")
    m.registration("duplicate_client_id")
    m.disconnect(1001)
    m.disconnect(None)
    m.error_sent("rate_limited")
    m.limit_refused("max-connections")
    m.task_ended("completed", "script", 2.0)
    m.task_ended("failed", "llm", 7.0)
    m.commands_out(3)
    m.command_answered(0.02)
    m.command_timed_out()
    m.model_call("timeout", 30.0)
    m.ws_opened()
    m.ws_opened()
    m.ws_opened()
    m.ws_closed()
    m.http_opened()
    m.heartbeat_handled(0.00004)
    f = scrape(
        MetricsExporter(
            m,
            registered=lambda: {ClientType.DEVICE: 1, ClientType.CONSTELLATION: 0},
            live_sessions=lambda: 5,
        )
    )
    assert value(f["ufo_trio_frames_received"], "_total", type="heartbeat") == 3
    assert value(f["ufo_trio_frames_received"], "_total", type="binary") == 1
    assert value(f["ufo_trio_frames_received"], "_total", type="invalid") == 1
    assert value(f["ufo_trio_frames_received"], "_total", type="task") == 0
    assert value(f["ufo_trio_frames_sent"], "_total", type="heartbeat") == 3
    assert value(f["ufo_trio_registrations"], "_total", outcome="ok") == 1
    assert value(f["ufo_trio_registrations"], "_total", outcome="duplicate_client_id") == 1
    assert value(f["ufo_trio_disconnects"], "_total", code="1001") == 1
    assert value(f["ufo_trio_disconnects"], "_total", code="1006") == 1
    assert value(f["ufo_trio_error_frames"], "_total", code="rate_limited") == 1
    assert value(f["ufo_trio_limit_refusals"], "_total", limit="max-connections") == 1
    assert value(f["ufo_trio_tasks_ended"], "_total", status="completed", agent="script") == 1
    assert value(f["ufo_trio_tasks_ended"], "_total", status="failed", agent="llm") == 1
    assert value(f["ufo_trio_tasks_ended"], "_total", status="failed", agent="script") == 0
    assert value(f["ufo_trio_commands_sent"], "_total") == 3
    assert value(f["ufo_trio_command_timeouts"], "_total") == 1
    assert value(f["ufo_trio_model_calls"], "_total", outcome="timeout") == 1
    # Gauges: one registered device among three open WebSocket connections, one closed.
    assert value(f["ufo_trio_connections"], role="device") == 1
    assert value(f["ufo_trio_connections"], role="constellation") == 0
    assert value(f["ufo_trio_connections"], role="unregistered") == 1
    assert value(f["ufo_trio_live_sessions"]) == 5
    assert value(f["ufo_trio_http_connections"]) == 1
    # Histograms: cumulative buckets, count and sum.
    td = f["ufo_trio_task_duration_seconds"]
    assert value(td, "_count") == 2
    assert value(td, "_sum") == 9.0
    assert value(td, "_bucket", le="1.0") == 0
    assert value(td, "_bucket", le="2.5") == 1
    assert value(td, "_bucket", le="10.0") == 2
    assert value(td, "_bucket", le="+Inf") == 2
    hb = f["ufo_trio_heartbeat_handling_seconds"]
    assert value(hb, "_bucket", le="2.5e-05") == 0
    assert value(hb, "_bucket", le="5e-05") == 1


def test_hostile_values_land_in_other_and_label_sets_stay_fixed() -> None:
    m = Metrics(agents=("script",))
    before = {
        (s.name, tuple(sorted(s.labels.items())))
        for fam in scrape(MetricsExporter(m, process=False)).values()
        for s in fam.samples
    }
    for i in range(500):
        hostile = f'<img src=x onerror=alert({i})>"\n'
        m.error_sent(hostile)
        m.registration(hostile)
        m.limit_refused(hostile)
        m.model_call(hostile, 1.0)
        m.task_ended(hostile, hostile, 1.0)
        m.disconnect(3000 + i)
    families = scrape(MetricsExporter(m, process=False))
    after = {
        (s.name, tuple(sorted(s.labels.items())))
        for fam in families.values()
        for s in fam.samples
    }
    assert after == before
    assert value(families["ufo_trio_error_frames"], "_total", code="other") == 500
    assert value(families["ufo_trio_registrations"], "_total", outcome="other") == 500
    assert value(families["ufo_trio_limit_refusals"], "_total", limit="other") == 500
    assert value(families["ufo_trio_model_calls"], "_total", outcome="other") == 500
    assert value(families["ufo_trio_disconnects"], "_total", code="other") == 500
    assert value(families["ufo_trio_tasks_ended"], "_total", status="failed", agent="other") == 500
    # The label sets are the fixed tuples of the module (plus `other`).
    codes = {s.labels["code"] for s in families["ufo_trio_error_frames"].samples}
    assert codes == {*ERROR_CODES, "other"}
    outcomes = {s.labels["outcome"] for s in families["ufo_trio_registrations"].samples}
    assert outcomes == {*REGISTRATION_OUTCOMES, "other"}
    limits = {s.labels["limit"] for s in families["ufo_trio_limit_refusals"].samples}
    assert limits == {*LIMIT_FLAGS, "other"}
    close = {s.labels["code"] for s in families["ufo_trio_disconnects"].samples}
    assert close == {*(str(c) for c in CLOSE_CODES), "other"}


def test_histogram_buckets_are_le() -> None:
    h = Histogram((1, 2, 5))
    for v in (0.5, 1, 1.5, 2, 5, 6):
        h.observe(v)
    assert h.cumulative() == [("1.0", 2), ("2.0", 4), ("5.0", 5), ("+Inf", 6)]
    assert h.total == 16.0
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((1, 1, 2))


def test_null_metrics_count_nothing() -> None:
    m = NullMetrics()
    m.frame_received(ClientMessageType.HEARTBEAT)
    m.task_ended("completed", "script", 1.0)
    m.ws_opened()
    f = scrape(MetricsExporter(m, process=False))
    assert value(f["ufo_trio_frames_received"], "_total", type="heartbeat") == 0
    assert value(f["ufo_trio_task_duration_seconds"], "_count") == 0
    assert value(f["ufo_trio_connections"], role="unregistered") == 0


def test_a_thousand_scrapes_while_counting_keep_memory_bounded() -> None:
    # The "1,000 scrapes during a heartbeat load", at unit level: counting between
    # scrapes, every body parses, and the exporter holds nothing per scrape.
    # (Live objects rather than tracemalloc: the same check at a tenth of the time.)
    import gc

    m = Metrics()
    exporter = MetricsExporter(m)
    sizes = []
    for i in range(1000):
        for _ in range(10):
            m.frame_received(ClientMessageType.HEARTBEAT)
            m.frame_sent(ServerMessageType.HEARTBEAT)
            m.heartbeat_handled(0.00005)
        _, body = exporter.render()
        if i % 100 == 0:
            assert list(text_string_to_metric_families(body.decode()))
        if i == 99:
            gc.collect()
            baseline = len(gc.get_objects())
        sizes.append(len(body))
    gc.collect()
    grown = len(gc.get_objects()) - baseline
    assert grown < 50, grown
    assert max(sizes) - min(sizes) < 200  # same series every time; only the digits change
    families = scrape(MetricsExporter(m, process=False))
    assert value(families["ufo_trio_frames_received"], "_total", type="heartbeat") == 10_000
