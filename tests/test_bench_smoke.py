"""Keep bench/ working: a tiny `python -m bench --smoke` run, plus its sans-IO client codec.

Nothing here asserts a timing or a ratio; those belong to docs/performance.md, measured on a
quiet machine. The checks are that every scenario runs to completion, without errors, and that
the figures the table is built from are present.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # bench/ is not part of the installed package: make it importable however pytest started.
    sys.path.insert(0, str(REPO))

from bench._ws import (  # noqa: E402
    OP_CLOSE,
    OP_PING,
    OP_TEXT,
    FrameParser,
    WsError,
    check_handshake_response,
    encode_text,
    handshake_request,
)


def run_smoke(tmp_path: Path, servers: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--servers", servers, "--json-out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record: dict[str, Any] = json.loads(out.read_text())
    return record


def check_common(results: dict[str, Any], server: str) -> None:
    idle = results["idle-20"][server][0]
    assert [c["registered"] for c in idle["cycles"]] == [20, 20]
    assert all(c["drained"] for c in idle["cycles"])
    assert "rss_per_device_kib" in idle
    hb = results["heartbeat-10"][server][0]
    assert hb["errors"] == 0
    assert hb["round_trips"] > 0
    # CPU time comes in 10 ms clock ticks, so a tiny run may honestly measure 0.
    assert hb["server_cpu_us_per_rt"] >= 0
    storm = results["storm-20"][server][0]
    assert storm["registered"] == 20
    for per_server in results.values():
        for result in per_server.get(server, []):
            assert "error" not in result
            assert result["server_exit"] == 0


def test_smoke_against_limit_server(tmp_path: Path) -> None:
    record = run_smoke(tmp_path, "limit")
    assert set(record["results"]) == {"idle-20", "heartbeat-10", "storm-20"}
    check_common(record["results"], "limit")
    assert "| heartbeat ×10 | server CPU µs / round trip |" in record["table"]


def test_smoke_against_ufo_trio(tmp_path: Path) -> None:
    record = run_smoke(tmp_path, "limit,ufo_trio")
    results = record["results"]
    check_common(results, "ufo_trio")
    tasks = results["tasks-20"]["ufo_trio"][0]
    assert tasks["tasks"] == 20
    assert tasks["device_task_ends"] == 22  # 2 warm-up tasks + 20 measured, END-1
    big = results["bigresult-256KiB"]["ufo_trio"][0]
    assert big["tasks"] == 2
    # Issue 13: the TLS scenarios run ufo_trio over ws:// and over wss:// in the same run.
    for kind in ("ufo_trio", "ufo_trio+tls"):
        hb_tls = results["heartbeat-10-tls"][kind][0]
        assert "error" not in hb_tls
        assert hb_tls["errors"] == 0
        assert hb_tls["round_trips"] > 0
        idle_tls = results["idle-20-tls"][kind][0]
        assert [c["registered"] for c in idle_tls["cycles"]] == [20, 20]
        assert hb_tls["server_exit"] == idle_tls["server_exit"] == 0
    assert "| heartbeat ×10 (TLS) | server CPU µs / round trip |" in record["table"]
    assert "| ufo_trio ws:// | ufo_trio wss:// |" in record["table"]
    # Issue 12: heartbeats with metrics on and with --no-metrics in the same run.
    for kind in ("ufo_trio", "ufo_trio--no-metrics"):
        hb_metrics = results["heartbeat-10-metrics"][kind][0]
        assert hb_metrics["errors"] == 0
        assert hb_metrics["round_trips"] > 0
        assert hb_metrics["server_exit"] == 0
    assert "| ufo_trio --no-metrics | ufo_trio (metrics on) |" in record["table"]
    llm = results["llm-steps"]["ufo_trio"][0]  # issue 10: 2 llm tasks of 5 steps, 2 script ones
    assert llm["steps"] == 10
    assert llm["llm_cpu_us_per_step"] >= 0
    concurrent = results["llm-concurrent"]["ufo_trio"][0]
    assert concurrent["tasks"] == 10
    assert concurrent["hb_during"]["n"] > 0


def test_client_codec_round_trip() -> None:
    request, accept = handshake_request("127.0.0.1", 5000, "/ws?token=K")
    assert request.startswith(b"GET /ws?token=K HTTP/1.1\r\n")
    check_handshake_response(
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: " + accept, accept
    )
    with pytest.raises(WsError):
        check_handshake_response(b"HTTP/1.1 403 Forbidden", accept)

    # Server frames are unmasked: build them by hand, split them awkwardly, and reassemble.
    big = b"x" * 70000
    stream = (
        bytes((0x81, 5))
        + b"hello"
        + bytes((0x01, 3))
        + b"par"  # first fragment of a text message
        + bytes((0x89, 1))
        + b"p"  # a ping between fragments
        + bytes((0x80, 2))
        + b"ts"  # final continuation
        + bytes((0x81, 127))
        + len(big).to_bytes(8, "big")
        + big
        + bytes((0x88, 2))
        + (1000).to_bytes(2, "big")
    )
    parser = FrameParser()
    events = []
    for i in range(0, len(stream), 7):
        events += parser.feed(stream[i : i + 7])
    assert events == [
        (OP_TEXT, b"hello"),
        (OP_PING, b"p"),
        (OP_TEXT, b"parts"),
        (OP_TEXT, big),
        (OP_CLOSE, b"\x03\xe8"),
    ]

    # Client frames carry the mask bit with an all-zero key, so the payload is sent as is.
    assert encode_text(b"{}") == bytes((0x81, 0x82)) + b"\x00\x00\x00\x00{}"


def test_metrics_cost_bench_runs() -> None:
    # Issue 12: the counting micro-benchmark prints its table (figures are not judged here).
    done = subprocess.run(
        [sys.executable, "-m", "bench.metrics_cost", "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Metrics.frame_received(enum)" in done.stdout
    assert "prometheus Counter child .inc()" in done.stdout
    assert "one /metrics render" in done.stdout


def test_llm_profile_runs() -> None:
    """`python -m bench.llm_profile` (client-side CPU of an llm step) runs to completion."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.llm_profile", "--steps", "3", "--tasks", "2", "--cprofile",
         "--top", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("client CPU per llm step (agent + model call): ")
    assert lines[1] == "self time by package (under cProfile):"
    assert len(lines) == 5
