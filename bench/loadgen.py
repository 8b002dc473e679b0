"""The load generator: one process, one Trio loop, one task per simulated client.

Run by `bench.run` in its own process (pinned to a CPU other than the server's), one scenario
per invocation, printing one JSON object on stdout:

    python -m bench.loadgen heartbeat --port P --token K --server-pid PID --conns 100

It measures the server from outside: CPU seconds from /proc/<pid>/stat, RSS from
/proc/<pid>/status, live sockets from /proc/<pid>/fd. Timing uses `time.perf_counter`, which is
what every RTT and rate is measured with; the server's own clock is never trusted.

Clients speak raw JSON over a hand-rolled WebSocket client (`bench._ws`) on plain Trio sockets,
because trio-websocket on this side would cost about as much per round trip as the server it
loads, and the generator shares the machine (its CPU share is reported as `gen_util`).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import re
import ssl
import sys
import time
from typing import TYPE_CHECKING, Any

import trio

from . import _proc
from ._ws import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    WsError,
    check_handshake_response,
    encode_close,
    encode_frame,
    encode_text,
    handshake_request,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

try:
    import orjson

    def _loads(data: bytes) -> Any:
        return orjson.loads(data)

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - orjson is in the dev venv; stdlib keeps it runnable

    def _loads(data: bytes) -> Any:
        return json.loads(data)

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


# 64 KiB stays below glibc's mmap threshold, so each recv() buffer is a cheap heap allocation.
RECV_SIZE = 65536
# Both servers put `type` then `status` first (WIRE-3), so a prefix test recognises an ack
# without decoding it; anything else is decoded and checked properly.
HEARTBEAT_OK_PREFIX = b'{"type":"heartbeat","status":"ok"'
_TYPE_RE = re.compile(rb'"type"\s*:\s*"([a-z_]+)"')


class ScenarioError(Exception):
    """The server answered something the scenario cannot continue from."""


class Closed(Exception):
    """The server closed the connection."""


class Conn:
    """One client WebSocket on a raw Trio socket."""

    __slots__ = ("_pending", "_receive", "_sock", "parser")

    def __init__(
        self,
        sock: trio.socket.SocketType,
        receive: Callable[[int], Awaitable[Any]] | None = None,
    ) -> None:
        self._sock = sock
        #: Bound once: the socket's recv, or the TLS stream's receive_some (`TlsConn`).
        self._receive = receive or sock.recv
        self.parser = FrameParser()
        self._pending: collections.deque[tuple[int, bytes]] = collections.deque()

    @classmethod
    async def open(cls, host: str, port: int, target: str) -> Conn:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            # Small request/response frames: never wait for Nagle.
            sock.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
            await sock.connect((host, port))
            conn = cls(sock)
            await conn._upgrade(host, port, target)
        except BaseException:
            sock.close()
            raise
        return conn

    async def _upgrade(self, host: str, port: int, target: str) -> None:
        """The WebSocket opening handshake; frames that came with the response are kept."""
        request, accept = handshake_request(host, port, target)
        await self.send(request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await self._receive(4096)
            if not data:
                raise Closed("closed during handshake")
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        check_handshake_response(head, accept)
        if rest:
            self._pending.extend(self.parser.feed(rest))

    async def send(self, data: bytes) -> None:
        sent = await self._sock.send(data)
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        while view:
            sent = await self._sock.send(view)
            view = view[sent:]

    async def recv(self) -> bytes:
        """The next data message's payload; answers pings on the way."""
        pending = self._pending
        while True:
            while pending:
                opcode, payload = pending.popleft()
                if opcode == OP_TEXT or opcode == OP_BINARY:
                    return payload
                if opcode == OP_PING:
                    await self.send(encode_frame(OP_PONG, payload))
                elif opcode == OP_CLOSE:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                    raise Closed(f"close {code} {payload[2:].decode(errors='replace')}")
            try:  # free unless raised; only a TLS stream raises it (a socket raises OSError)
                data = await self._receive(RECV_SIZE)
            except trio.BrokenResourceError as exc:
                raise Closed(f"TLS stream broken: {exc}") from None
            if not data:
                raise Closed("EOF")
            pending.extend(self.parser.feed(data))

    async def close(self, timeout: float = 5.0) -> None:
        """Closing handshake (bounded), then close the socket."""
        with trio.move_on_after(timeout):
            try:
                await self.send(encode_close())
                while True:
                    await self.recv()
            except (Closed, OSError, WsError):
                pass
        self._sock.close()

    def abort(self) -> None:
        self._sock.close()


class TlsConn(Conn):
    """The same client over TLS (`wss://`): trio's SSLStream on a TCP stream.

    The generator pays for its side of TLS too; its CPU share is reported as usual.
    """

    __slots__ = ("_stream",)

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        super().__init__(stream.transport_stream.socket, stream.receive_some)
        self._stream = stream

    @classmethod
    async def open_tls(
        cls, host: str, port: int, target: str, context: ssl.SSLContext
    ) -> TlsConn:
        tcp = await trio.open_tcp_stream(host, port)  # TCP_NODELAY is trio's default
        stream = trio.SSLStream(tcp, context, server_hostname=host, https_compatible=True)
        try:
            await stream.do_handshake()
            conn = cls(stream)
            await conn._upgrade(host, port, target)
        except trio.BrokenResourceError as exc:
            tcp.socket.close()
            raise Closed(f"TLS handshake failed: {exc.__cause__ or exc}") from None
        except BaseException:
            tcp.socket.close()
            raise
        return conn

    async def send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise Closed(f"TLS stream broken: {exc}") from None


def sniff_type(frame: bytes) -> str | None:
    m = _TYPE_RE.search(frame, 0, 64)
    return m.group(1).decode() if m else None


# ---------------------------------------------------------------------------------------------
# Frames. Shaped like the real clients' (they send every ClientMessage key, nulls included),
# so the server decodes what it would decode in production.


def _client_message(**fields: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": None,
        "status": "ok",
        "client_type": "device",
        "session_id": None,
        "task_name": None,
        "client_id": None,
        "target_id": None,
        "request": None,
        "action_results": None,
        "timestamp": "2026-01-01T12:00:00.000000+00:00",
        "request_id": None,
        "prev_response_id": None,
        "error": None,
        "metadata": None,
    }
    msg.update(fields)
    return msg


def register_device(client_id: str) -> bytes:
    system_info = {
        "device_id": client_id,
        "platform": "linux",
        "os_version": "6.8.0-49-generic",
        "cpu_count": 8,
        "memory_total_gb": 31.2,
        "hostname": f"host-{client_id}",
        "ip_address": "10.0.0.17",
        "supported_features": ["gui", "cli", "browser", "file_system", "office"],
        "platform_type": "computer",
        "schema_version": "1.0",
    }
    return encode_text(
        _dumps(
            _client_message(
                type="register",
                client_id=client_id,
                metadata={
                    "platform": "linux",
                    "registration_time": "2026-01-01T12:00:00.000000+00:00",
                    "system_info": system_info,
                },
            )
        )
    )


def register_constellation(client_id: str, target_id: str) -> bytes:
    return encode_text(
        _dumps(
            _client_message(
                type="register",
                client_type="constellation",
                client_id=client_id,
                target_id=target_id,
                metadata={
                    "type": "constellation_client",
                    "targeted_device_id": target_id,
                    "capabilities": ["task_distribution", "session_management"],
                    "version": "2.0",
                },
            )
        )
    )


def heartbeat(client_id: str, client_type: str = "device") -> bytes:
    return encode_text(
        _dumps(_client_message(type="heartbeat", client_id=client_id, client_type=client_type))
    )


ONE_STEP_PLAN = json.dumps(
    {"steps": [[{"tool_name": "echo", "tool_type": "action", "parameters": {}}]]},
    separators=(",", ":"),
)


def task(client_id: str, target_id: str, session_id: str, request: str) -> bytes:
    return encode_text(
        _dumps(
            _client_message(
                type="task",
                status="continue",
                client_type="constellation",
                client_id=client_id,
                target_id=target_id,
                session_id=session_id,
                task_name=f"bench/{session_id}",
                request=request,
            )
        )
    )


def command_results(client_id: str, command: dict[str, Any], result: Any) -> bytes:
    results = [
        {
            "status": "success",
            "error": None,
            "result": result,
            "namespace": "bench",
            "call_id": action.get("call_id"),
        }
        for action in command.get("actions") or ()
    ]
    return encode_text(
        _dumps(
            _client_message(
                type="command_results",
                status="continue",
                client_id=client_id,
                session_id=command.get("session_id"),
                prev_response_id=command.get("response_id"),
                action_results=results,
            )
        )
    )


# ---------------------------------------------------------------------------------------------
# Measurement helpers


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def latency_summary(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {
        "n": len(s),
        "p50_ms": percentile(s, 50) * 1e3,
        "p90_ms": percentile(s, 90) * 1e3,
        "p99_ms": percentile(s, 99) * 1e3,
        "max_ms": (s[-1] * 1e3) if s else math.nan,
    }


class Meter:
    """CPU of server and generator plus wall time between `start()` and `stop()`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._c0 = self._g0 = self._s0 = self._t0 = 0.0
        self.server_cpu = self.gen_cpu = self.other_cpu = self.wall = 0.0

    def start(self) -> None:
        self._c0 = _proc.cpu_seconds(self.pid)
        self._g0 = _proc.self_cpu_seconds()
        self._s0 = _proc.system_busy_seconds()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self.wall = time.perf_counter() - self._t0
        self.server_cpu = _proc.cpu_seconds(self.pid) - self._c0
        self.gen_cpu = _proc.self_cpu_seconds() - self._g0
        busy = _proc.system_busy_seconds() - self._s0
        # Tick granularity can make this slightly negative on a quiet machine.
        self.other_cpu = max(0.0, busy - self.server_cpu - self.gen_cpu)

    def report(self, ops: int, unit: str) -> dict[str, float]:
        return {
            "wall_s": self.wall,
            "server_cpu_s": self.server_cpu,
            f"server_cpu_us_per_{unit}": self.server_cpu / ops * 1e6 if ops else math.nan,
            "server_util": self.server_cpu / self.wall if self.wall else math.nan,
            "gen_util": self.gen_cpu / self.wall if self.wall else math.nan,
            "other_util": self.other_cpu / self.wall if self.wall else math.nan,
            f"{unit}_per_s": ops / self.wall if self.wall else math.nan,
        }


class Target:
    """Where the server is and how to reach it."""

    def __init__(
        self, host: str, port: int, token: str, pid: int, tls_ca: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.path = f"/ws?token={token}" if token else "/ws"
        self.pid = pid
        #: With a CA file the server is reached over TLS (wss://), verified against that CA.
        self.tls = ssl.create_default_context(cafile=tls_ca) if tls_ca else None

    async def connect(self) -> Conn:
        if self.tls is not None:
            return await TlsConn.open_tls(self.host, self.port, self.path, self.tls)
        return await Conn.open(self.host, self.port, self.path)

    async def join(self, register_frame: bytes) -> Conn:
        """Connect, register, and return once the confirmation (REG-7) arrived."""
        conn = await self.connect()
        try:
            await conn.send(register_frame)
            first = await conn.recv()
            if not first.startswith(HEARTBEAT_OK_PREFIX):
                msg = _loads(first)
                if msg.get("type") != "heartbeat" or msg.get("status") != "ok":
                    raise ScenarioError(f"registration refused: {first[:200]!r}")
        except BaseException:
            conn.abort()
            raise
        return conn


async def join_many(
    target: Target,
    frames: list[bytes],
    concurrency: int,
    latencies: list[float] | None = None,
) -> tuple[dict[int, Conn], list[str]]:
    """Register one client per frame, at most `concurrency` handshakes in flight.

    Returns the connections keyed by the index of their frame: they complete in any order, and
    a client must keep sending under the identity it registered (ID-1).
    """
    conns: dict[int, Conn] = {}
    failures: list[str] = []
    limiter = trio.CapacityLimiter(concurrency)

    async def one(index: int, frame: bytes) -> None:
        async with limiter:
            t0 = time.perf_counter()
            try:
                conns[index] = await target.join(frame)
            except (OSError, Closed, WsError, ScenarioError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                return
            if latencies is not None:
                latencies.append(time.perf_counter() - t0)

    async with trio.open_nursery() as nursery:
        for index, frame in enumerate(frames):
            nursery.start_soon(one, index, frame)
    return conns, failures


async def close_many(conns: list[Conn], concurrency: int = 512) -> None:
    limiter = trio.CapacityLimiter(concurrency)

    async def one(conn: Conn) -> None:
        async with limiter:
            await conn.close()

    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(one, conn)


async def hold_idle(conn: Conn) -> None:
    """Keep an idle client alive: answer pings, ignore anything else, stop if closed."""
    try:
        while True:
            await conn.recv()
    except (Closed, OSError, WsError):
        pass


async def wait_for_fds(pid: int, at_most: int, timeout: float) -> bool:
    """Wait until the server holds at most `at_most` fds, i.e. it has closed our sockets."""
    with trio.move_on_after(timeout):
        while _proc.fd_count(pid) > at_most:
            await trio.sleep(0.05)
        return True
    return False


# ---------------------------------------------------------------------------------------------
# Scenarios


async def scenario_idle(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """N idle registered devices, twice: RSS per device and growth across the two cycles."""
    pid = target.pid
    n = args.conns
    frames = [register_device(f"bench-idle-{i}") for i in range(n)]

    # Warm-up cycle: first-connection costs (lazy imports, caches, allocator arenas) are not
    # per-device costs, so they must land in the baseline.
    base_fds = _proc.fd_count(pid)
    warm, _ = await join_many(target, frames[: min(16, n)], args.concurrency)
    await close_many(list(warm.values()))
    await wait_for_fds(pid, base_fds, 10)
    await trio.sleep(args.settle)
    rss0 = _proc.rss_bytes(pid)

    cycles: list[dict[str, Any]] = []
    for _ in range(args.cycles):
        t0 = time.perf_counter()
        joined, failures = await join_many(target, frames, args.concurrency)
        conns = list(joined.values())
        join_s = time.perf_counter() - t0
        async with trio.open_nursery() as nursery:
            # Idle clients must still answer pings, or liveness would close them mid-run.
            for conn in conns:
                nursery.start_soon(hold_idle, conn)
            await trio.sleep(args.settle)
            loaded_rss = _proc.rss_bytes(pid)
            loaded_fds = _proc.fd_count(pid)
            nursery.cancel_scope.cancel()
        await close_many(conns)
        drained = await wait_for_fds(pid, base_fds, 60)
        await trio.sleep(args.settle)
        cycles.append(
            {
                "registered": len(conns),
                "failures": len(failures),
                "failure_sample": failures[:3],
                "join_s": join_s,
                "loaded_rss": loaded_rss,
                "loaded_fds": loaded_fds,
                "left_rss": _proc.rss_bytes(pid),
                "drained": drained,
            }
        )

    first = cycles[0]
    per_device = (first["loaded_rss"] - rss0) / max(1, first["registered"])
    out: dict[str, Any] = {
        "conns": n,
        "baseline_rss": rss0,
        "baseline_fds": base_fds,
        "cycles": cycles,
        "rss_per_device_kib": per_device / 1024,
        "failures": sum(c["failures"] for c in cycles),
    }
    if len(cycles) >= 2:
        left1, left2 = cycles[0]["left_rss"], cycles[1]["left_rss"]
        out["cycle_growth_pct"] = (left2 - left1) / left1 * 100
        # What is left after a leave depends on how much the allocators hand back to the OS,
        # which varies from cycle to cycle even for the bare server; the loaded peaks do not,
        # so they are the steadier leak signal and are reported beside the criterion.
        peak1, peak2 = cycles[0]["loaded_rss"], cycles[1]["loaded_rss"]
        out["loaded_growth_pct"] = (peak2 - peak1) / peak1 * 100
    return out


async def scenario_heartbeat(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Closed-loop heartbeats on N connections: server CPU per round trip at saturation."""
    n = args.conns
    ids = [f"bench-hb-{i}" for i in range(n)]
    joined, failures = await join_many(target, [register_device(i) for i in ids], args.concurrency)
    conns = list(joined.values())
    if not conns:
        raise ScenarioError(f"no connection registered: {failures[:3]}")

    recording = False
    count = 0
    errors = 0
    rtts: list[float] = []
    error_sample: list[str] = []
    append = rtts.append
    perf = time.perf_counter

    async def loop(conn: Conn, frame: bytes) -> None:
        nonlocal count, errors
        send = conn.send
        recv = conn.recv
        while True:
            t0 = perf()
            await send(frame)
            reply = await recv()
            t1 = perf()
            if not reply.startswith(HEARTBEAT_OK_PREFIX):
                errors += 1
                if len(error_sample) < 3:
                    error_sample.append(reply[:300].decode(errors="replace"))
            if recording:
                count += 1
                append(t1 - t0)

    meter = Meter(target.pid)
    async with trio.open_nursery() as nursery:
        for index, conn in joined.items():
            nursery.start_soon(loop, conn, heartbeat(ids[index]))
        await trio.sleep(args.warmup)
        meter.start()
        recording = True
        await trio.sleep(args.duration)
        recording = False
        meter.stop()
        nursery.cancel_scope.cancel()
    await close_many(conns)
    out: dict[str, Any] = {"conns": len(conns), "failures": len(failures), "errors": errors}
    out["error_sample"] = error_sample
    out["round_trips"] = count
    out.update(meter.report(count, "rt"))
    out["rtt"] = latency_summary(rtts)
    return out


async def scenario_storm(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """N devices connect and register at once: connect + first-reply rate."""
    n = args.conns
    frames = [register_device(f"bench-storm-{i}") for i in range(n)]
    latencies: list[float] = []
    meter = Meter(target.pid)
    meter.start()
    # No concurrency cap: every client starts at once, as after a server restart.
    joined, failures = await join_many(target, frames, n, latencies)
    meter.stop()
    conns = list(joined.values())
    await close_many(conns)
    out: dict[str, Any] = {"conns": n, "registered": len(conns), "failures": len(failures)}
    out["failure_sample"] = failures[:3]
    out.update(meter.report(len(conns), "reg"))
    out["latency"] = latency_summary(latencies)
    return out


class TaskPair:
    """A device and a constellation targeting it; the device answers every COMMAND."""

    def __init__(self, target: Target, result: Any) -> None:
        self.target = target
        self.result = result
        self.device_id = "bench-dev-0"
        self.const_id = "bench-const-0"
        self.device: Conn | None = None
        self.const: Conn | None = None
        self.device_task_ends = 0
        self.results_sent_at = 0.0

    async def open(self) -> None:
        self.device = await self.target.join(register_device(self.device_id))
        self.const = await self.target.join(register_constellation(self.const_id, self.device_id))

    async def serve_device(self) -> None:
        assert self.device is not None
        conn = self.device
        while True:
            frame = await conn.recv()
            kind = sniff_type(frame)
            if kind == "command":
                reply = command_results(self.device_id, _loads(frame), self.result)
                self.results_sent_at = time.perf_counter()
                await conn.send(reply)
            elif kind == "task_end":
                self.device_task_ends += 1

    async def run_task(self, session_id: str, frame: bytes) -> float:
        """Send one TASK and return the time from sending it to its TASK_END."""
        assert self.const is not None
        conn = self.const
        t0 = time.perf_counter()
        await conn.send(frame)
        acked = False
        while True:
            reply = await conn.recv()
            kind = sniff_type(reply)
            if kind == "heartbeat":
                acked = True
            elif kind == "task_end":
                t1 = time.perf_counter()
                if not acked:
                    raise ScenarioError("TASK_END before the ACK")
                head = reply[:200]
                if b'"status":"completed"' not in head:
                    raise ScenarioError(f"task failed: {_loads(reply).get('error')!r}")
                return t1 - t0
            elif kind == "error":
                raise ScenarioError(f"task refused: {_loads(reply).get('error')!r}")

    async def heartbeat_rtts(self, n: int) -> list[float]:
        assert self.const is not None
        conn = self.const
        frame = heartbeat(self.const_id, "constellation")
        rtts = []
        for _ in range(n):
            t0 = time.perf_counter()
            await conn.send(frame)
            reply = await conn.recv()
            rtts.append(time.perf_counter() - t0)
            if not reply.startswith(HEARTBEAT_OK_PREFIX):
                raise ScenarioError(f"bad heartbeat ack: {reply[:200]!r}")
        return rtts

    async def close(self) -> None:
        await close_many([c for c in (self.const, self.device) if c is not None])


async def scenario_tasks(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Sequential one-step tasks, constellation → device: TASK → TASK_END latency."""
    pair = TaskPair(target, "ok")
    await pair.open()
    warmup = max(1, args.count // 10)
    frames = [
        task(pair.const_id, pair.device_id, f"bench-s-{i}", ONE_STEP_PLAN)
        for i in range(warmup + args.count)
    ]
    meter = Meter(target.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.serve_device)
        # Heartbeat RTT on the same connection, same conditions: the yardstick for the target.
        await pair.heartbeat_rtts(warmup)
        hb = await pair.heartbeat_rtts(args.count)
        for i in range(warmup):
            await pair.run_task(f"bench-s-{i}", frames[i])
        meter.start()
        rtts = [
            await pair.run_task(f"bench-s-{i}", frames[i])
            for i in range(warmup, warmup + args.count)
        ]
        meter.stop()
        # The device's copy of the last TASK_END is queued after the requester's (END-3).
        with trio.move_on_after(5):
            while pair.device_task_ends < warmup + args.count:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    await pair.close()
    out: dict[str, Any] = {"tasks": len(rtts), "device_task_ends": pair.device_task_ends}
    out.update(meter.report(len(rtts), "task"))
    out["task_rtt"] = latency_summary(rtts)
    out["heartbeat_rtt"] = latency_summary(hb)
    out["task_over_heartbeat_p50"] = out["task_rtt"]["p50_ms"] / out["heartbeat_rtt"]["p50_ms"]
    return out


async def scenario_bigresult(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """A device returns a `size`-byte result; time from its COMMAND_RESULTS to the TASK_END."""
    pair = TaskPair(target, "x" * args.size)
    await pair.open()
    elapsed: list[float] = []
    meter = Meter(target.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pair.serve_device)
        meter.start()
        for i in range(args.count):
            frame = task(pair.const_id, pair.device_id, f"bench-big-{i}", ONE_STEP_PLAN)
            await pair.run_task(f"bench-big-{i}", frame)
            elapsed.append(time.perf_counter() - pair.results_sent_at)
        meter.stop()
        nursery.cancel_scope.cancel()
    await pair.close()
    s = sorted(elapsed)
    p50 = percentile(s, 50)
    out: dict[str, Any] = {"size": args.size, "tasks": len(elapsed)}
    out.update(meter.report(len(elapsed), "task"))
    out["results_to_end"] = latency_summary(elapsed)
    # The result crosses the server three times: in from the device, out in both TASK_ENDs.
    out["mib_per_s"] = args.size / p50 / 2**20 if p50 > 0 else math.nan
    return out


# ---------------------------------------------------------------------------------------------
# The llm agent (issue 10). The server runs with --llm-base-url pointing at bench.fakemodel,
# whose rule reads `steps=<n>` from the task text.

BENCH_TOOLS = [
    {
        "tool_key": "action::bench_tool",
        "tool_name": "bench_tool",
        "namespace": "bench",
        "tool_type": "action",
        "description": "Does nothing, quickly.",
        "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": []},
        "output_schema": {"type": "object", "properties": {}},
    }
]


def answer_command(client_id: str, frame: bytes, result: Any) -> bytes:
    """COMMAND_RESULTS: the tool descriptors for `list_tools`, else `result` for every call."""
    command = _loads(frame)
    actions = command.get("actions") or []
    if actions and actions[0].get("tool_name") == "list_tools":
        return command_results(client_id, command, BENCH_TOOLS)
    return command_results(client_id, command, result)


def device_task(client_id: str, request: str) -> bytes:
    return encode_text(
        _dumps(
            _client_message(
                type="task", status="continue", client_id=client_id, request=request,
                request_id=f"bench-{client_id}", metadata={"platform": "linux"},
            )
        )
    )  # fmt: skip


async def run_llm_pair_task(pair: TaskPair, session_id: str, request: str) -> None:
    await pair.run_task(session_id, task(pair.const_id, pair.device_id, session_id, request))


async def scenario_llmsteps(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """Server CPU per step: one llm task of `steps` steps (one tool call each; the model answers
    at once and runs in another process) against one script task of as many steps."""
    pair = TaskPair(target, "ok")
    await pair.open()
    script = json.dumps(
        {"steps": [[{"tool_name": "bench_tool", "tool_type": "action", "parameters": {"n": i}}]
                   for i in range(args.steps)]}
    )  # fmt: skip
    llm_request = f"steps={args.steps}"

    async def serve_device() -> None:
        assert pair.device is not None
        while True:
            frame = await pair.device.recv()
            if sniff_type(frame) == "command":
                await pair.device.send(answer_command(pair.device_id, frame, "ok"))

    llm_meter, script_meter = Meter(target.pid), Meter(target.pid)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_device)
        await run_llm_pair_task(pair, "warm-llm", "steps=2")  # warm the model connection
        await pair.run_task("warm-script", task(pair.const_id, pair.device_id, "warm-script", script))
        llm_meter.start()
        for i in range(args.count):
            await run_llm_pair_task(pair, f"llm-{i}", llm_request)
        llm_meter.stop()
        script_meter.start()
        for i in range(args.count):
            sid = f"script-{i}"
            await pair.run_task(sid, task(pair.const_id, pair.device_id, sid, script))
        script_meter.stop()
        nursery.cancel_scope.cancel()
    await pair.close()
    steps = args.steps * args.count
    # The llm task also sends list_tools and makes one model call more than it has steps.
    llm_us = llm_meter.server_cpu / steps * 1e6
    script_us = script_meter.server_cpu / steps * 1e6
    return {
        "steps": steps,
        "llm_cpu_us_per_step": llm_us,
        "script_cpu_us_per_step": script_us,
        "llm_over_script": llm_us / script_us if script_us else math.nan,
        "llm_wall_s": llm_meter.wall,
        "script_wall_s": script_meter.wall,
    }


async def beat_loop(
    conn: Conn, frame: bytes, phase: float, interval: float, record: Callable[[float, float], None]
) -> None:
    """Heartbeat every `interval` s at fixed times (`phase` into each period, no drift), calling
    `record(sent, rtt)` (perf_counter seconds) per answer. A slot missed because the answer came
    late is skipped, not made up. Spread phases keep N devices from beating all at once: in step,
    the probe's own load is N heartbeats in the same millisecond every period, and the idle p99
    measured the server's queue behind that burst, not the server at rest."""
    perf = time.perf_counter
    send, recv = conn.send, conn.recv
    due = trio.current_time() + phase
    while True:
        await trio.sleep_until(due)
        t0 = perf()
        await send(frame)
        while not (await recv()).startswith(HEARTBEAT_OK_PREFIX):
            pass
        t1 = perf()
        record(t0, t1 - t0)
        due += interval
        now = trio.current_time()
        if due < now:  # late: the next slot of the grid, not a catch-up burst
            due += math.ceil((now - due) / interval) * interval


def beat_phase(index: int, n: int, interval: float, spread: bool) -> float:
    return index * interval / n if spread else 0.0


async def scenario_hbprobe(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """The heartbeat probe of `llmconcurrent`, in a process of its own (`bench.run` starts it
    beside the generator, pinned like it): `conns` devices heartbeat every `interval` s until
    stdin closes. Prints one line `{"ready": true}` once every device is registered, then the
    usual JSON line with every sample as [sent, rtt] in `time.perf_counter` seconds, which is
    CLOCK_MONOTONIC and so comparable with the generator's timestamps (same machine)."""
    joined, failures = await join_many(
        target, [register_device(f"bench-probe-{i}") for i in range(args.conns)], args.concurrency
    )
    if failures:
        raise ScenarioError(f"{len(failures)} probe registrations failed: {failures[0]}")
    samples: list[tuple[float, float]] = []

    def record(sent: float, rtt: float) -> None:
        samples.append((sent, rtt))

    cpu0 = _proc.self_cpu_seconds()
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for index, conn in joined.items():
            phase = beat_phase(index, len(joined), args.interval, args.spread)
            frame = heartbeat(f"bench-probe-{index}")
            nursery.start_soon(beat_loop, conn, frame, phase, args.interval, record)
        sys.stdout.write('{"ready": true}\n')
        sys.stdout.flush()
        # Until bench.run closes our stdin (the generator is done).
        await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
        nursery.cancel_scope.cancel()
    wall = time.perf_counter() - t0
    cpu = _proc.self_cpu_seconds() - cpu0
    await close_many(list(joined.values()))
    return {"conns": len(joined), "samples": samples, "probe_util": cpu / wall if wall else 0.0}


def llm_wall_report(
    out: dict[str, Any], wall: float, steps: int, delay: float | None
) -> dict[str, Any]:
    """Wall time against its floor: a task of `steps` tool turns makes steps + 1 model calls
    (the last one answers), each held `delay` s by the fake model, one after another."""
    calls = steps + 1
    out["model_calls"] = calls
    if delay is not None:
        out["model_delay_s"] = delay
        out["floor_s"] = calls * delay
        out["overhead_s"] = wall - calls * delay
    return out


def split_probe(
    samples: list[tuple[float, float]],
    idle_t0: float,
    burst_t0: float,
    burst_t1: float,
    listed_t: float | None = None,
) -> dict[str, Any]:
    """The probe's samples by when they were sent: idle before the burst, during it, and
    (`hb_rounds`) during it after its start (from `listed_t`, when the generator had answered
    every list_tools: only model rounds left), to tell the two bursts apart."""
    idle = [rtt for sent, rtt in samples if idle_t0 <= sent < burst_t0]
    during = [rtt for sent, rtt in samples if burst_t0 <= sent <= burst_t1]
    out: dict[str, Any] = {"hb_idle": latency_summary(idle), "hb_during": latency_summary(during)}
    out["hb_p99_ratio"] = out["hb_during"]["p99_ms"] / out["hb_idle"]["p99_ms"]
    if listed_t is not None:
        rounds = [rtt for sent, rtt in samples if listed_t <= sent <= burst_t1]
        out["hb_rounds"] = latency_summary(rounds)
    return out


async def scenario_llmconcurrent(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    """`conns` devices each run one llm task of `steps` steps at once (the model answers every
    call after its delay); `hb_conns` other devices heartbeat all along. Wall time to finish all
    (and its floor: model calls × delay), heartbeat RTT p99 idle vs during.

    With `--hb-conns 0` the heartbeats come from a probe in another process (`hbprobe`, how
    `bench.run` runs it, so the RTT measures the server and not this loop's own backlog of 500
    COMMANDs): the result then carries the idle window and the burst (`idle_t0`, `burst_t0`,
    `burst_t1`, perf_counter seconds) for `split_probe`."""
    steps = args.model_calls - 1 if args.model_calls else args.steps
    if steps < 0:
        raise ScenarioError("--model-calls must be at least 1")
    hb_conns, failures = await join_many(
        target, [register_device(f"bench-hb-{i}") for i in range(args.hb_conns)], args.concurrency
    )
    workers, more = await join_many(
        target, [register_device(f"bench-llm-{i}") for i in range(args.conns)], args.concurrency
    )
    failures += more
    if failures:
        raise ScenarioError(f"{len(failures)} registrations failed: {failures[0]}")
    idle: list[float] = []
    during: list[float] = []
    phase = {"samples": idle}

    def record(sent: float, rtt: float) -> None:
        phase["samples"].append(rtt)

    ends: list[float] = []
    #: When each device answered its first COMMAND (list_tools): the last of them ends the
    #: start of the burst (500 TASK frames, session starts, tool lists), before any model call.
    listed: list[float] = []

    async def work(index: int, conn: Conn) -> None:
        client_id = f"bench-llm-{index}"
        await conn.send(device_task(client_id, f"steps={steps}"))
        first = True
        while True:
            frame = await conn.recv()
            kind = sniff_type(frame)
            if kind == "command":
                await conn.send(answer_command(client_id, frame, "ok"))
                if first:
                    listed.append(time.perf_counter())
                    first = False
            elif kind == "task_end":
                if b'"status":"completed"' not in frame[:200]:
                    raise ScenarioError(f"task failed: {_loads(frame).get('error')!r}")
                ends.append(time.perf_counter())
                return

    meter = Meter(target.pid)
    async with trio.open_nursery() as nursery:
        for index, conn in hb_conns.items():
            beat_at = beat_phase(index, len(hb_conns), args.interval, args.spread)
            frame = heartbeat(f"bench-hb-{index}")
            nursery.start_soon(beat_loop, conn, frame, beat_at, args.interval, record)
        idle_t0 = time.perf_counter()
        await trio.sleep(2.0)
        phase["samples"] = during
        meter.start()
        burst_t0 = time.perf_counter()
        async with trio.open_nursery() as tasks:
            for index, conn in workers.items():
                tasks.start_soon(work, index, conn)
        burst_t1 = time.perf_counter()
        meter.stop()
        nursery.cancel_scope.cancel()
    await close_many([*hb_conns.values(), *workers.values()])
    out: dict[str, Any] = {"tasks": len(ends), "steps": steps}
    out.update(meter.report(len(ends), "task"))
    llm_wall_report(out, meter.wall, steps, args.model_delay)
    if hb_conns:
        out["hb_idle"] = latency_summary(idle)
        out["hb_during"] = latency_summary(during)
        out["hb_p99_ratio"] = out["hb_during"]["p99_ms"] / out["hb_idle"]["p99_ms"]
    else:
        listed_t = max(listed, default=burst_t0)
        out.update(idle_t0=idle_t0, burst_t0=burst_t0, listed_t=listed_t, burst_t1=burst_t1)
    return out


SCENARIOS: dict[str, Callable[[Target, argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "idle": scenario_idle,
    "heartbeat": scenario_heartbeat,
    "storm": scenario_storm,
    "tasks": scenario_tasks,
    "bigresult": scenario_bigresult,
    "llmsteps": scenario_llmsteps,
    "llmconcurrent": scenario_llmconcurrent,
    "hbprobe": scenario_hbprobe,
}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(args.host, args.port, args.token, args.server_pid, args.tls_ca)
    with trio.fail_after(args.timeout):
        return await SCENARIOS[args.scenario](target, args)


def describe(exc: BaseException) -> str:
    """One line for an exception, looking through exception groups to the first leaf."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--token", default="")
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--count", type=int, default=1000, help="tasks to run")
    parser.add_argument("--size", type=int, default=4 * 2**20, help="bigresult bytes")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per llm task")
    parser.add_argument("--hb-conns", type=int, default=100, help="heartbeating devices")
    parser.add_argument(
        "--model-calls", type=int, default=0,
        help="model calls per llm task (steps + 1: the last call answers); overrides --steps",
    )
    parser.add_argument(
        "--model-delay", type=float, default=None,
        help="the fake model's delay per call (reported: floor = model calls × delay)",
    )
    parser.add_argument("--interval", type=float, default=0.05, help="heartbeat period, s")
    parser.add_argument(
        "--spread", action=argparse.BooleanOptionalAction, default=True,
        help="spread the heartbeat devices' phases over the period (--no-spread: all at once)",
    )
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=256, help="handshakes in flight")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--tls-ca", default=None, help="connect over TLS, trusting this CA file")
    args = parser.parse_args(argv)
    _proc.raise_nofile_limit()
    try:
        result = trio.run(run, args)
    except (trio.TooSlowError, ScenarioError, Closed, WsError, OSError) as exc:
        result = {"error": describe(exc)}
    except BaseExceptionGroup as group:
        # A failure inside a nursery (e.g. the device responder) arrives wrapped; report it
        # as one line rather than a traceback, since the orchestrator shows it in the table.
        result = {"error": describe(group)}
    result["scenario"] = args.scenario
    sys.stdout.write(json.dumps(result) + "\n")
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
