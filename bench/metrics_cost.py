"""What counting costs: `python -m bench.metrics_cost [--quick]` prints ns per call and µs per scrape.

Compares the hot-path calls of `ufo_trio._metrics.Metrics` (plain ints) with prometheus-client's
own `Counter.inc` / `Histogram.observe` (which take a lock per call), and times one `/metrics`
render. Figures only; nothing is asserted (speed targets are judged by a person on a quiet
machine). For scale: one heartbeat round trip costs the server about 90 µs of CPU
(docs/performance.md), and it makes two frame counts and one histogram observation.
"""

from __future__ import annotations

import sys
import timeit

from prometheus_client import CollectorRegistry, Counter
from prometheus_client import Histogram as LibHistogram

from ufo_trio._messages import ClientMessageType, ServerMessageType
from ufo_trio._metrics import HEARTBEAT_BUCKETS, Metrics, MetricsExporter, NullMetrics

#: Calls per timing; `--quick` (the smoke test) uses 1 % of it.
NUMBER = 200_000


def per_call_ns(stmt: str, env: dict[str, object]) -> float:
    best = min(timeit.repeat(stmt, globals=env, number=NUMBER, repeat=5))
    return best / NUMBER * 1e9


def main() -> None:
    global NUMBER
    if "--quick" in sys.argv[1:]:
        NUMBER //= 100
    metrics = Metrics()
    null = NullMetrics()
    registry = CollectorRegistry()
    counter = Counter("frames", "frames", ["type"], registry=registry)
    child = counter.labels("heartbeat")
    lib_hist = LibHistogram("hb", "hb", buckets=HEARTBEAT_BUCKETS, registry=registry)
    env: dict[str, object] = {
        "m": metrics,
        "null": null,
        "counter": counter,
        "child": child,
        "lib_hist": lib_hist,
        "HB": ClientMessageType.HEARTBEAT,
        "SHB": ServerMessageType.HEARTBEAT,
    }
    rows = [
        ("plain int attribute += 1", "m.commands_sent += 1"),
        ("Metrics.frame_received(enum)", "m.frame_received(HB)"),
        ("Metrics.frame_sent(enum)", "m.frame_sent(SHB)"),
        ("Metrics.heartbeat_handled (bisect)", "m.heartbeat_handled(0.00004)"),
        ("NullMetrics.frame_received (disabled)", "null.frame_received(HB)"),
        ("prometheus Counter child .inc()", "child.inc()"),
        ("prometheus Counter .labels().inc()", "counter.labels('heartbeat').inc()"),
        ("prometheus Histogram .observe()", "lib_hist.observe(0.00004)"),
    ]
    print(f"{'operation':42} {'ns/call':>9}")
    for label, stmt in rows:
        print(f"{label:42} {per_call_ns(stmt, env):9.1f}")
    per_heartbeat = sum(
        per_call_ns(s, env)
        for s in ("m.frame_received(HB)", "m.frame_sent(SHB)", "m.heartbeat_handled(0.00004)")
    )
    lib_per_heartbeat = 2 * per_call_ns("child.inc()", env) + per_call_ns(
        "lib_hist.observe(0.00004)", env
    )
    print(f"\nper heartbeat round trip (2 counts + 1 observation): Metrics {per_heartbeat:.0f} ns, "
          f"prometheus-client {lib_per_heartbeat:.0f} ns (of ~90,000 ns server CPU)")
    exporter = MetricsExporter(metrics)
    scrapes = max(1, NUMBER // 1000)
    scrape_us = min(timeit.repeat(exporter.render, number=scrapes, repeat=3)) / scrapes * 1e6
    print(f"one /metrics render (incl. process collector): {scrape_us:.0f} µs, "
          f"{len(exporter.render()[1])} bytes")


if __name__ == "__main__":
    main()
