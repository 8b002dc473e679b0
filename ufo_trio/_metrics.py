"""Prometheus metrics (issue 12): plain ints on the hot path, the library's format at scrape time.

The hot path never touches prometheus-client. It calls a `Metrics` method, which adds 1 to an int
in a dict whose keys are fixed when the object is built (an enum member or a string from a fixed
tuple), or drops a number into a fixed bucket array (`Histogram.observe`, one `bisect`). At scrape
time `MetricsExporter.render()` asks a private `CollectorRegistry` for the text exposition; its one
custom collector turns those ints into `CounterMetricFamily`/`GaugeMetricFamily`/
`HistogramMetricFamily` values, and the library's `ProcessCollector` adds CPU, memory and fds.
prometheus-client's own `Counter.inc` takes a lock per call (bench/metrics_cost.py prints the
difference); here everything runs on the one Trio thread, so no lock is needed.

Bounded cardinality: no label value ever comes from a client. Values that a client can influence
(a peer's close code, an error code, an agent name) are mapped onto the fixed set built here, and
anything outside it is counted under `"other"`. Every series exists from the start (value 0), so
`rate()` works from the first scrape and the label sets are visible before anything happens.

`render()` runs on the Trio thread: the custom collector only reads ints and calls the gauge
callables (which read the registry and the session store, so they must not run in a thread), and
the process collector reads three files under /proc, which the kernel answers from memory without
ever waiting on a disk (bench/metrics_cost.py prints what a scrape costs).
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING, Final, Literal

import trio
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from ._messages import ClientMessageType, ClientType, ServerMessageType
from ._version import __version__

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping, Sequence

    from prometheus_client.metrics_core import Metric

#: `Content-Type` of `/metrics` (the text format prometheus-client's own handler sends by default).
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
PREFIX: Final = "ufo_trio"
OTHER: Final = "other"

#: `registrations_total{outcome}`: `ok` and every refusal code of REG-1…REG-4 and DUP-2.
REGISTRATION_OUTCOMES: Final = (
    "ok",
    "invalid_message",
    "not_registered",
    "invalid_registration",
    "registration_timeout",
    "unknown_target",
    "duplicate_client_id",
    "binary_not_supported",
)
#: `error_frames_total{code}`: every `code` of Appendix A plus `rate_limited` of `--message-rate`.
ERROR_CODES: Final = (
    "invalid_message",
    "unknown_type",
    "not_registered",
    "invalid_registration",
    "registration_timeout",
    "unknown_target",
    "duplicate_client_id",
    "identity_mismatch",
    "missing_target",
    "not_authorized",
    "invalid_target",
    "session_owned",
    "session_running",
    "rate_limited",
    "unsupported_platform",
    "shutting_down",
    "invalid_results",
    "binary_not_supported",
    "client_error",
    "internal_error",
)
#: `disconnects_total{code}`: the close codes of §2.3, 1000 (normal), 1005 (no code) and 1006
#: (no close frame: aborted or dropped). A peer may close with any code; others count as `other`.
CLOSE_CODES: Final = (1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 4001, 4002, 4003)
#: `limit_refusals_total{limit}`: the flag names `log_refusal` logs (§2.2, issue 5).
LIMIT_FLAGS: Final = (
    "max-connections",
    "message-rate",
    "max-sessions-per-client",
    "registration-timeout",
    "max-header-size",
    "max-message-size",
    "max-body-size",
)
TASK_STATUSES: Final = ("completed", "failed")
#: `model_calls_total{outcome}` (the llm agent).
ModelOutcome = Literal["ok", "error", "timeout"]
MODEL_OUTCOMES: Final[tuple[ModelOutcome, ...]] = ("ok", "error", "timeout")
#: `frames_received_total{type}` besides the client types: binary frames (DISP-2) and text
#: frames that failed WIRE-6 before their type was known.
FrameKind = ClientMessageType | Literal["binary", "invalid"]

# Bucket upper bounds in seconds. Fixed: a bucket array is allocated once per histogram.
TASK_DURATION_BUCKETS: Final = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
COMMAND_ROUND_TRIP_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip
MODEL_CALL_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
HEARTBEAT_BUCKETS: Final = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.1,
)  # fmt: skip


class Histogram:
    """Fixed buckets of plain ints. `observe` is one `bisect` and two additions.

    `counts[i]` holds the observations in (bounds[i-1], bounds[i]]; the last slot is +Inf.
    Counts are per bucket here; the cumulative `le` form is built at scrape time.
    """

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram bounds must be strictly increasing")
        self.bounds: tuple[float, ...] = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: the first bound >= value, as Prometheus's `le` (less than or equal).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs ending with +Inf, as `HistogramMetricFamily` takes them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            out.append((_le(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def _le(bound: float) -> str:
    return repr(bound)


class Metrics:
    """The counters the server bumps. One per server, built at start, used from the Trio thread.

    Every method is O(1) and never raises for a value outside the fixed label sets: such a value
    is counted as `other` (or, for agent names, as `other` beyond the names given here).
    """

    __slots__ = (
        "_agents",
        "_disconnects",
        "_errors",
        "_limits",
        "_model_calls",
        "_received",
        "_registrations",
        "_sent",
        "_tasks",
        "command_round_trip",
        "command_timeouts",
        "commands_sent",
        "heartbeat_handling",
        "http_connections",
        "model_call_latency",
        "now",
        "task_duration",
        "ws_connections",
    )

    def __init__(self, *, agents: Sequence[str] = ("script",)) -> None:
        """`agents`: the agent names the server can run (from its configuration, never a client)."""
        self._agents = frozenset(agents)
        self._received: dict[FrameKind, int] = dict.fromkeys(
            [*ClientMessageType, "binary", "invalid"], 0
        )
        self._sent = dict.fromkeys(ServerMessageType, 0)
        self._registrations = dict.fromkeys(REGISTRATION_OUTCOMES, 0)
        self._registrations[OTHER] = 0
        self._errors = dict.fromkeys(ERROR_CODES, 0)
        self._errors[OTHER] = 0
        self._disconnects: dict[int | str, int] = dict.fromkeys(CLOSE_CODES, 0)
        self._disconnects[OTHER] = 0
        self._limits = dict.fromkeys(LIMIT_FLAGS, 0)
        self._limits[OTHER] = 0
        labels = [*sorted(self._agents), OTHER]
        self._tasks = {(status, agent): 0 for status in TASK_STATUSES for agent in labels}
        self._model_calls: dict[str, int] = dict.fromkeys(MODEL_OUTCOMES, 0)
        self._model_calls[OTHER] = 0
        #: Gauges kept by counting: open WebSocket connections (any state) and HTTP connections.
        self.ws_connections = 0
        self.http_connections = 0
        self.commands_sent = 0
        self.command_timeouts = 0
        self.task_duration = Histogram(TASK_DURATION_BUCKETS)
        self.command_round_trip = Histogram(COMMAND_ROUND_TRIP_BUCKETS)
        self.model_call_latency = Histogram(MODEL_CALL_BUCKETS)
        self.heartbeat_handling = Histogram(HEARTBEAT_BUCKETS)
        #: The clock of the per-frame timing (`heartbeat_handled`): trio's, or a constant in
        #: `NullMetrics`, so that metrics off also means no clock reads on the hot path.
        self.now: Callable[[], float] = trio.current_time

    # --- per frame (hot path) ----------------------------------------------------------------
    def frame_received(self, kind: FrameKind) -> None:
        """A data frame arrived: its decoded type, `"binary"`, or `"invalid"` (failed WIRE-6)."""
        self._received[kind] += 1

    def frame_sent(self, kind: ServerMessageType) -> None:
        """A frame was written (after the write succeeded)."""
        self._sent[kind] += 1

    def heartbeat_handled(self, seconds: float) -> None:
        """Time from taking a heartbeat off the queue to its ack being written."""
        self.heartbeat_handling.observe(seconds)

    # --- per event ---------------------------------------------------------------------------
    def error_sent(self, code: str) -> None:
        """An ERROR frame with this `code` was sent (also counted by `frame_sent`)."""
        key = code if code in self._errors else OTHER
        self._errors[key] += 1

    def registration(self, outcome: str) -> None:
        """A registration ended: `"ok"` or the refusal code of its ERROR."""
        key = outcome if outcome in self._registrations else OTHER
        self._registrations[key] += 1

    def disconnect(self, code: int | None) -> None:
        """A WebSocket connection ended with this close code (None: no close frame, 1006)."""
        key: int | str = 1006 if code is None else code
        if key not in self._disconnects:
            key = OTHER
        self._disconnects[key] += 1

    def limit_refused(self, flag: str) -> None:
        """A limit refused work; `flag` is the flag name that `log_refusal` logs."""
        key = flag if flag in self._limits else OTHER
        self._limits[key] += 1

    def task_ended(self, status: str, agent: str, seconds: float) -> None:
        """A session ended `completed` or `failed` (cancelled included) after `seconds`."""
        label = agent if agent in self._agents else OTHER
        key = (status if status in TASK_STATUSES else "failed", label)
        self._tasks[key] += 1
        self.task_duration.observe(seconds)

    def commands_out(self, count: int) -> None:
        """A COMMAND frame carrying `count` tool calls was sent."""
        self.commands_sent += count

    def command_answered(self, seconds: float) -> None:
        """COMMAND_RESULTS arrived `seconds` after its COMMAND was sent."""
        self.command_round_trip.observe(seconds)

    def command_timed_out(self) -> None:
        """A COMMAND got no results within `--command-timeout` (CMD-6)."""
        self.command_timeouts += 1

    def model_call(self, outcome: str, seconds: float) -> None:
        """The llm agent's model call ended: `ok`, `error` or `timeout`."""
        key = outcome if outcome in self._model_calls else OTHER
        self._model_calls[key] += 1
        self.model_call_latency.observe(seconds)

    def ws_opened(self) -> None:
        self.ws_connections += 1

    def ws_closed(self) -> None:
        self.ws_connections -= 1

    def http_opened(self) -> None:
        self.http_connections += 1

    def http_closed(self) -> None:
        self.http_connections -= 1


class NullMetrics(Metrics):
    """Counts nothing: the "metrics disabled" build the benchmark compares against."""

    __slots__ = ()

    def __init__(self, *, agents: Sequence[str] = ("script",)) -> None:
        super().__init__(agents=agents)
        self.now = _zero

    def frame_received(self, kind: FrameKind) -> None:
        pass

    def frame_sent(self, kind: ServerMessageType) -> None:
        pass

    def heartbeat_handled(self, seconds: float) -> None:
        pass

    def error_sent(self, code: str) -> None:
        pass

    def registration(self, outcome: str) -> None:
        pass

    def disconnect(self, code: int | None) -> None:
        pass

    def limit_refused(self, flag: str) -> None:
        pass

    def task_ended(self, status: str, agent: str, seconds: float) -> None:
        pass

    def commands_out(self, count: int) -> None:
        pass

    def command_answered(self, seconds: float) -> None:
        pass

    def command_timed_out(self) -> None:
        pass

    def model_call(self, outcome: str, seconds: float) -> None:
        pass

    def ws_opened(self) -> None:
        pass

    def ws_closed(self) -> None:
        pass

    def http_opened(self) -> None:
        pass

    def http_closed(self) -> None:
        pass


def _zero() -> float:
    return 0.0


def _no_registered() -> Mapping[ClientType, int]:
    return {}


def _no_sessions() -> int:
    return 0


class _UfoTrioCollector(Collector):
    """Turns a `Metrics` and two gauge callables into metric families at scrape time."""

    def __init__(
        self,
        metrics: Metrics,
        registered: Callable[[], Mapping[ClientType, int]],
        live_sessions: Callable[[], int],
    ) -> None:
        self._m = metrics
        self._registered = registered
        self._live_sessions = live_sessions

    def collect(self) -> Iterator[Metric]:
        m = self._m
        registered = self._registered()
        devices = registered.get(ClientType.DEVICE, 0)
        constellations = registered.get(ClientType.CONSTELLATION, 0)
        conns = GaugeMetricFamily(
            f"{PREFIX}_connections",
            "Open WebSocket connections by role; unregistered: not (or no longer) registered.",
            labels=["role"],
        )
        conns.add_metric(["device"], devices)
        conns.add_metric(["constellation"], constellations)
        conns.add_metric(["unregistered"], max(0, m.ws_connections - devices - constellations))
        yield conns
        yield GaugeMetricFamily(
            f"{PREFIX}_live_sessions", "Sessions running now.", value=self._live_sessions()
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_http_connections",
            "Open plain HTTP connections (API, dashboard, metrics).",
            value=m.http_connections,
        )
        yield _counter(
            "registrations", "Registrations by outcome: ok or the refusal code.", "outcome",
            m._registrations,
        )  # fmt: skip
        yield _counter(
            "disconnects", "WebSocket connections ended, by close code.", "code", m._disconnects
        )
        yield _counter(
            "frames_received", "Data frames received, by type.", "type",
            {_kind(k): v for k, v in m._received.items()},
        )  # fmt: skip
        yield _counter(
            "frames_sent", "Frames sent, by type.", "type",
            {k.value: v for k, v in m._sent.items()},
        )  # fmt: skip
        yield _counter("error_frames", "ERROR frames sent, by code.", "code", m._errors)
        yield _counter(
            "limit_refusals", "Work refused by a limit, by its flag.", "limit", m._limits
        )
        tasks = CounterMetricFamily(
            f"{PREFIX}_tasks_ended",
            "Sessions ended, by status (cancelled counts as failed) and agent.",
            labels=["status", "agent"],
        )
        for (status, agent), value in m._tasks.items():
            tasks.add_metric([status, agent], value)
        yield tasks
        yield CounterMetricFamily(
            f"{PREFIX}_commands_sent", "Tool calls sent in COMMAND frames.", value=m.commands_sent
        )
        yield CounterMetricFamily(
            f"{PREFIX}_command_timeouts",
            "COMMANDs that got no results within --command-timeout.",
            value=m.command_timeouts,
        )
        yield _counter(
            "model_calls", "Model calls of the llm agent, by outcome.", "outcome", m._model_calls
        )
        yield _histogram("task_duration_seconds", "Session duration.", m.task_duration)
        yield _histogram(
            "command_round_trip_seconds",
            "Time from a COMMAND to its COMMAND_RESULTS.",
            m.command_round_trip,
        )
        yield _histogram(
            "model_call_seconds", "Latency of the llm agent's model calls.", m.model_call_latency
        )
        yield _histogram(
            "heartbeat_handling_seconds",
            "Server time from taking a heartbeat off the queue to its ack written.",
            m.heartbeat_handling,
        )
        info = GaugeMetricFamily(
            f"{PREFIX}_build_info", "The running ufo_trio version (always 1).", labels=["version"]
        )
        info.add_metric([__version__], 1)
        yield info


def _kind(kind: FrameKind) -> str:
    return kind if isinstance(kind, str) else kind.value


def _counter(
    name: str, doc: str, label: str, values: Mapping[str, int] | Mapping[int | str, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
    for key, value in values.items():
        family.add_metric([str(key)], value)
    return family


def _histogram(name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        f"{PREFIX}_{name}", doc, buckets=histogram.cumulative(), sum_value=histogram.total
    )


class MetricsExporter:
    """The `/metrics` body: a private `CollectorRegistry` (never the library's global one).

    `registered` returns the number of REGISTERED clients per role; `live_sessions` the number
    of live sessions. Both are called at scrape time on the Trio thread.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        registered: Callable[[], Mapping[ClientType, int]] = _no_registered,
        live_sessions: Callable[[], int] = _no_sessions,
        process: bool = True,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_UfoTrioCollector(metrics, registered, live_sessions))
        if process:
            ProcessCollector(namespace=PREFIX, registry=self.registry)

    def render(self) -> tuple[str, bytes]:
        """(content type, body) of one scrape."""
        return CONTENT_TYPE, generate_latest(self.registry)
