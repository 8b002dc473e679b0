"""`python -m bench`: run every scenario against the limit server and ufo_trio, print the ratios.

For each scenario and each server, in one invocation:

1. start a fresh server process (`python -m bench.refserver` or `python -m ufo_trio`) pinned to
   one CPU, and read its port from the `... listening on ws://host:port/ws` line;
2. run `python -m bench.loadgen <scenario>` in its own process pinned to another CPU; it loads
   the server and measures it through /proc/<server pid>;
3. stop the server with SIGINT and check it exits 0.

A fresh server per scenario keeps one scenario's allocator state out of the next one's RSS
figures. The servers alternate order between scenarios and repetitions so neither always runs
on a "warm" or "cold" machine. The result is a Markdown table on stdout and a JSON file.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from . import _proc, loadgen

REPO = Path(__file__).resolve().parent.parent
LIMIT = "limit"
UFO = "ufo_trio"
#: ufo_trio with --tls-cert/--tls-key, run beside plain ufo_trio in the TLS scenarios.
UFO_TLS = "ufo_trio+tls"
#: ufo_trio with --no-metrics, run beside plain ufo_trio in the metrics scenarios (issue 12).
UFO_NO_METRICS = "ufo_trio--no-metrics"
_LISTEN_RE = re.compile(r"listening on wss?://(?P<host>\[[^\]]+\]|[^:/\s]+):(?P<port>\d+)/ws")


@attrs.frozen(kw_only=True)
class Scenario:
    name: str
    kind: str
    title: str
    params: dict[str, Any]
    servers: tuple[str, ...] = (LIMIT, UFO)
    timeout: float = 300.0
    #: Seconds the fake model (bench.fakemodel) holds each answer; None: no model for this one.
    model_delay: float | None = None
    #: Heartbeating devices of a probe in a process of its own (`bench.loadgen hbprobe`), beside
    #: the generator and pinned like it; 0: none (llm-concurrent's heartbeats come from there).
    probe: int = 0

    @property
    def tls(self) -> bool:
        """A TLS scenario compares ufo_trio over wss:// with ufo_trio over ws://."""
        return UFO_TLS in self.servers

    @property
    def metrics(self) -> bool:
        """A metrics scenario compares ufo_trio counting with ufo_trio --no-metrics."""
        return UFO_NO_METRICS in self.servers


#: Where a TLS scenario runs: plain and TLS ufo_trio, in the same invocation.
TLS_PAIR = (UFO, UFO_TLS)
#: Where a metrics scenario runs: ufo_trio with and without metrics, in the same invocation.
METRICS_PAIR = (UFO, UFO_NO_METRICS)


def plan(smoke: bool, duration: float) -> list[Scenario]:
    """The scenarios of issue 6; `smoke` keeps their shape at toy sizes (a few seconds total)."""
    if smoke:
        hb = {"duration": 0.5, "warmup": 0.2}
        return [
            Scenario(
                name="idle-20",
                kind="idle",
                title="idle ×20",
                params={"conns": 20, "settle": 0.1},
                timeout=30,
            ),
            Scenario(
                name="heartbeat-10",
                kind="heartbeat",
                title="heartbeat ×10",
                params={"conns": 10, **hb},
                timeout=30,
            ),
            Scenario(
                name="storm-20",
                kind="storm",
                title="registration storm ×20",
                params={"conns": 20},
                timeout=30,
            ),
            Scenario(
                name="tasks-20",
                kind="tasks",
                title="tasks ×20",
                params={"count": 20},
                servers=(UFO,),
                timeout=30,
            ),
            Scenario(
                name="bigresult-256KiB",
                kind="bigresult",
                title="256 KiB result ×2",
                params={"count": 2, "size": 256 * 1024},
                servers=(UFO,),
                timeout=30,
            ),
            Scenario(
                name="heartbeat-10-tls",
                kind="heartbeat",
                title="heartbeat ×10",
                params={"conns": 10, **hb},
                servers=TLS_PAIR,
                timeout=30,
            ),
            Scenario(
                name="idle-20-tls",
                kind="idle",
                title="idle ×20",
                params={"conns": 20, "settle": 0.1},
                servers=TLS_PAIR,
                timeout=30,
            ),
            Scenario(
                name="heartbeat-10-metrics",
                kind="heartbeat",
                title="heartbeat ×10",
                params={"conns": 10, **hb},
                servers=METRICS_PAIR,
                timeout=30,
            ),
            Scenario(
                name="llm-steps",
                kind="llmsteps",
                title="llm task, 5 steps",
                params={"steps": 5, "count": 2},
                servers=(UFO,),
                timeout=60,
                model_delay=0.0,
            ),
            Scenario(
                name="llm-concurrent",
                kind="llmconcurrent",
                title="llm tasks ×10 concurrent, 2 steps, model 0.2 s",
                params={"conns": 10, "hb-conns": 0, "steps": 2},
                servers=(UFO,),
                timeout=60,
                model_delay=0.2,
                probe=5,
            ),
        ]
    hb = {"duration": duration, "warmup": 1.0}
    return [
        Scenario(name="idle-1k", kind="idle", title="idle ×1,000", params={"conns": 1000}),
        Scenario(
            name="idle-10k", kind="idle", title="idle ×10,000", params={"conns": 10000}, timeout=600
        ),
        Scenario(
            name="heartbeat-100",
            kind="heartbeat",
            title="heartbeat ×100",
            params={"conns": 100, **hb},
        ),
        Scenario(
            name="heartbeat-1000",
            kind="heartbeat",
            title="heartbeat ×1,000",
            params={"conns": 1000, **hb},
        ),
        Scenario(
            name="storm-2000",
            kind="storm",
            title="registration storm ×2,000",
            params={"conns": 2000},
        ),
        Scenario(
            name="tasks-1000",
            kind="tasks",
            title="tasks ×1,000 (one step)",
            params={"count": 1000},
            servers=(UFO,),
        ),
        Scenario(
            name="bigresult-4MiB",
            kind="bigresult",
            title="4 MiB result ×5",
            params={"count": 5, "size": 4 * 2**20},
            servers=(UFO,),
        ),
        # Issue 13: what TLS costs, ws:// and wss:// side by side in the same run.
        Scenario(
            name="heartbeat-100-tls",
            kind="heartbeat",
            title="heartbeat ×100",
            params={"conns": 100, **hb},
            servers=TLS_PAIR,
        ),
        Scenario(
            name="idle-2000-tls",
            kind="idle",
            title="idle ×2,000",
            params={"conns": 2000},
            servers=TLS_PAIR,
        ),
        # Issue 12: what counting costs, with and without --no-metrics in the same run.
        Scenario(
            name="heartbeat-100-metrics",
            kind="heartbeat",
            title="heartbeat ×100",
            params={"conns": 100, **hb},
            servers=METRICS_PAIR,
        ),
        Scenario(
            name="llm-steps",
            kind="llmsteps",
            title="llm tasks of 50 steps ×10 (model answers at once)",
            params={"steps": 50, "count": 10},
            servers=(UFO,),
            model_delay=0.0,
        ),
        Scenario(
            name="llm-concurrent",
            kind="llmconcurrent",
            title="llm tasks ×500 concurrent, 3 steps, model 1 s",
            params={"conns": 500, "hb-conns": 0, "steps": 3},
            servers=(UFO,),
            model_delay=1.0,
            probe=100,
        ),
        # The same burst with 3 model calls per task (2 tool steps + the answer): its floor is
        # 3.0 s, so the "≤ 4 s" of issue 10 reads as "floor + 1 s" here (docs/performance.md).
        Scenario(
            name="llm-concurrent-3calls",
            kind="llmconcurrent",
            title="llm tasks ×500 concurrent, 3 model calls (2 steps + answer), model 1 s",
            params={"conns": 500, "hb-conns": 0, "model-calls": 3},
            servers=(UFO,),
            model_delay=1.0,
            probe=100,
        ),
    ]


class ServerUnavailable(Exception):
    """The server process did not come up (not implemented yet, crashed, bad flags)."""


@attrs.define(eq=False)
class ServerProc:
    """One running server under test."""

    kind: str
    proc: subprocess.Popen[bytes]
    host: str
    port: int
    token: str
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGINT, as an operator would; returns the exit status (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return None
        return self.proc.returncode


@attrs.frozen(kw_only=True)
class Options:
    json_lib: str
    server_cpu: int | None
    gen_cpu: int | None
    ufo_args: tuple[str, ...]
    logdir: Path
    #: Interpreter options before `-m <server>`, e.g. ("-m", "cProfile", "-o", path).
    python_args: tuple[str, ...] = ()
    #: Generation-0 threshold of the cyclic GC in both servers (None: Python's default, 700).
    gc_threshold: int | None = None
    #: Nice value for the server and the generator (None: inherit).
    priority: int | None = None
    #: (certificate, key, CA) files for UFO_TLS, made by `make_tls_files`.
    tls_files: tuple[Path, Path, Path] | None = None
    #: ufo_trio's --db: ":memory:" (default, comparable with older runs) or "file" for a fresh
    #: SQLite file per server start in the log directory (issue 11: file vs memory).
    db: str = ":memory:"


def _db_path(opts: Options) -> str:
    if opts.db == ":memory:":
        return opts.db
    path = opts.logdir / "history.db"
    for suffix in ("", "-wal", "-shm"):  # a fresh file for every server start
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return str(path)


def make_tls_files(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a certificate for 127.0.0.1 (trustme, from the test extra)."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = directory / "cert.pem", directory / "key.pem", directory / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file


def server_command(kind: str, opts: Options, token: str) -> list[str]:
    if kind == LIMIT:
        module, args = "bench.refserver", ["--port", "0", "--json", opts.json_lib]
    else:
        module = "ufo_trio"
        args = [
            "--port", "0",
            f"--api-key={token}",  # `=` form: a random token may start with "-"
            "--log-level", "WARNING",
            # A closed loop on one connection outruns the default per-connection message rate
            # (1,000/s); keep the check on the hot path, where it costs, but out of reach.
            "--message-rate", "1000000", "--message-burst", "1000000",
            "--db", _db_path(opts),
            *opts.ufo_args,
        ]  # fmt: skip
        if kind == UFO_TLS:
            assert opts.tls_files is not None
            args += ["--tls-cert", str(opts.tls_files[0]), "--tls-key", str(opts.tls_files[1])]
        elif kind == UFO_NO_METRICS:
            args.append("--no-metrics")
    if opts.gc_threshold is None:
        return [sys.executable, *opts.python_args, "-m", module, *args]
    # The same server, started through runpy so the collector is tuned before it imports
    # anything: the process and its pid are still the server itself.
    prelude = (
        f"import gc, runpy; gc.set_threshold({opts.gc_threshold}, 20, 100); "
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    )
    return [sys.executable, *opts.python_args, "-c", prelude, *args]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Run the checkout's code (bench and ufo_trio) whatever the caller's working directory.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def start_server(kind: str, opts: Options, label: str, startup_timeout: float = 30.0) -> ServerProc:
    token = secrets.token_urlsafe(16)
    log = opts.logdir / f"{label}.log"
    # Output goes to a file, not a pipe: a server that logs a lot must never block on a full
    # pipe that nobody reads while the generator is measuring it.
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            server_command(kind, opts, token),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
            env=child_env(),
            # Its own session = its own scheduler autogroup, so --priority touches nothing else.
            start_new_session=opts.priority is not None,
        )
    _proc.pin(proc.pid, opts.server_cpu)
    _proc.set_nice(proc.pid, opts.priority)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        m = _LISTEN_RE.search(log.read_text(errors="replace"))
        if m:
            host = m.group("host").strip("[]")
            return ServerProc(
                kind=kind, proc=proc, host=host, port=int(m.group("port")), token=token, log=log
            )
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    tail = log.read_text(errors="replace").strip().splitlines()[-3:]
    raise ServerUnavailable(f"{kind} did not start (exit {proc.returncode}): {' | '.join(tail)}")


def start_loadgen(
    server: ServerProc, scenario: Scenario, opts: Options, stdin: int = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "bench.loadgen", scenario.kind,
        "--host", server.host, "--port", str(server.port),
        f"--token={server.token}",  # `=` form: the token may start with "-"
        "--server-pid", str(server.pid), "--timeout", str(scenario.timeout),
    ]  # fmt: skip
    for key, value in scenario.params.items():
        cmd.append(f"--{key}={value}")
    if scenario.kind == "llmconcurrent" and scenario.model_delay is not None:
        cmd.append(f"--model-delay={scenario.model_delay}")  # for the floor it reports
    if server.kind == UFO_TLS:
        assert opts.tls_files is not None
        cmd.append(f"--tls-ca={opts.tls_files[2]}")
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=stdin,
        cwd=REPO,
        env=child_env(),
        start_new_session=opts.priority is not None,
    )
    _proc.pin(proc.pid, opts.gen_cpu)
    _proc.set_nice(proc.pid, opts.priority)
    return proc


def finish_loadgen(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """Wait for the generator and return its JSON result (or an `error` entry)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"error": "load generator did not finish in time"}
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = err.decode(errors="replace").strip().splitlines()[-3:]
        return {"error": f"load generator failed (exit {proc.returncode}): {' | '.join(tail)}"}
    return result


def run_loadgen(server: ServerProc, scenario: Scenario, opts: Options) -> dict[str, Any]:
    return finish_loadgen(start_loadgen(server, scenario, opts), scenario.timeout + 60)


def start_probe(server: ServerProc, scenario: Scenario, opts: Options) -> subprocess.Popen[bytes]:
    """`bench.loadgen hbprobe` (scenario.probe devices), pinned and prioritised like the
    generator; returns once its devices are registered and beating."""
    probe = attrs.evolve(scenario, kind="hbprobe", params={"conns": scenario.probe})
    proc = start_loadgen(server, probe, opts, stdin=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.readline()  # `{"ready": true}`, or its error line if it failed
    if not first.startswith(b'{"ready"'):
        proc.kill()
        proc.communicate()
        text = first.decode(errors="replace").strip()[-300:] or f"exit {proc.returncode}"
        raise ServerUnavailable(f"the heartbeat probe did not start: {text}")
    return proc


def merge_probe(result: dict[str, Any], probe: dict[str, Any]) -> None:
    """The probe's samples split into idle and during by the generator's window."""
    if "error" in probe:
        result.setdefault("error", f"probe: {probe['error']}")
        return
    if "error" in result or "burst_t0" not in result:
        return
    result.update(
        loadgen.split_probe(
            [(sent, rtt) for sent, rtt in probe["samples"]],
            result["idle_t0"],
            result["burst_t0"],
            result["burst_t1"],
            result.get("listed_t"),
        )
    )
    result["probe_util"] = probe["probe_util"]
    result["probe_conns"] = probe["conns"]


def start_fake_model(delay: float, opts: Options, label: str) -> tuple[subprocess.Popen[bytes], str]:
    """bench.fakemodel in its own process (its CPU is not the server's); returns its base URL."""
    log = opts.logdir / f"{label}-model.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.fakemodel", f"--delay={delay}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=REPO, env=child_env(),
        )  # fmt: skip
    _proc.pin(proc.pid, opts.gen_cpu)
    # Same priority as the generator it shares its CPU with: at nice 0 beside two processes at
    # -15 on a shared machine, the fake model (not the server) set the pace of llm-concurrent.
    _proc.set_nice(proc.pid, opts.priority)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = re.search(r"listening on (\S+)", log.read_text(errors="replace"))
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise ServerUnavailable(f"the fake model did not start: {log.read_text(errors='replace')[-300:]}")


def llm_args(base_url: str) -> tuple[str, ...]:
    """The server flags of the llm scenarios: the fake model, limits out of the way."""
    return (
        "--llm-base-url", base_url, "--llm-model", "bench",
        "--llm-max-steps", "1000", "--llm-max-connections", "1000",
    )  # fmt: skip


def run_one(kind: str, scenario: Scenario, opts: Options, label: str) -> dict[str, Any]:
    model: subprocess.Popen[bytes] | None = None
    if scenario.model_delay is not None:
        model, base_url = start_fake_model(scenario.model_delay, opts, label)
        opts = attrs.evolve(opts, ufo_args=(*opts.ufo_args, *llm_args(base_url)))
    try:
        server = start_server(kind, opts, label)
    except BaseException:
        if model is not None:
            model.kill()
            model.wait()
        raise
    model_cpu0 = 0.0 if model is None else _proc.cpu_seconds(model.pid)
    probe: subprocess.Popen[bytes] | None = None
    try:
        if scenario.probe:
            probe = start_probe(server, scenario, opts)
        result = run_loadgen(server, scenario, opts)
        if probe is not None:  # closing its stdin (communicate) stops it
            probed = finish_loadgen(probe, 60)
            probe = None
            merge_probe(result, probed)
            # Every sample, for a look at when the slow ones happened (the table has p99s).
            (opts.logdir / f"{label}-probe.json").write_text(
                json.dumps({"probe": probed, **{k: v for k, v in result.items() if "_t" in k}})
            )
        if model is not None:  # the fake model shares the generator's CPU: is it the pace?
            result["model_cpu_s"] = _proc.cpu_seconds(model.pid) - model_cpu0
            wall = result.get("wall_s")
            if wall:
                result["model_util"] = result["model_cpu_s"] / wall
    finally:
        if probe is not None:  # the generator failed: stop the probe too
            probe.kill()
            probe.communicate()
        status = server.stop()
        if model is not None:
            model.send_signal(signal.SIGINT)
            try:
                model.wait(10)
            except subprocess.TimeoutExpired:
                model.kill()
                model.wait()
    result["server_exit"] = status
    if status != 0 and "error" not in result:
        result["error"] = f"server exit status {status} after SIGINT (expected 0)"
    return result


# ---------------------------------------------------------------------------------------------
# Figures: what the table shows, pulled from the generator's JSON.


@attrs.frozen(kw_only=True)
class Figure:
    kind: str
    label: str
    get: Callable[[dict[str, Any]], float | None]
    fmt: str = "{:.1f}"
    #: (max ratio ufo/limit, text) or None: checked against the ratio column.
    ratio_target: tuple[float, str] | None = None
    #: (max absolute ufo value, text) or None.
    abs_target: tuple[float, str] | None = None
    #: False where ufo_trio / limit means nothing (percentages, CPU shares).
    ratio: bool = True


def _path(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    def get(result: dict[str, Any]) -> float | None:
        value: Any = result
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value) if isinstance(value, int | float) else None

    return get


FIGURES: list[Figure] = [
    Figure(
        kind="heartbeat",
        label="server CPU µs / round trip",
        get=_path("server_cpu_us_per_rt"),
        ratio_target=(1.10, "≤ 1.10×"),
    ),
    Figure(
        kind="heartbeat",
        label="round trips / s",
        get=_path("rt_per_s"),
        fmt="{:,.0f}",
    ),
    Figure(kind="heartbeat", label="RTT p50 ms", get=_path("rtt", "p50_ms"), fmt="{:.2f}"),
    Figure(kind="heartbeat", label="RTT p99 ms", get=_path("rtt", "p99_ms"), fmt="{:.2f}"),
    Figure(
        kind="heartbeat",
        label="server CPU use (saturation)",
        get=_path("server_util"),
        fmt="{:.0%}",
        ratio=False,
    ),
    Figure(
        kind="heartbeat",
        label="generator CPU use",
        get=_path("gen_util"),
        fmt="{:.0%}",
        ratio=False,
    ),
    Figure(
        kind="heartbeat",
        label="other processes' CPU use (of 1 CPU)",
        get=_path("other_util"),
        fmt="{:.0%}",
        ratio=False,
    ),
    Figure(
        kind="idle",
        label="RSS KiB / idle device",
        get=_path("rss_per_device_kib"),
        abs_target=(40.0, "≤ 40 KiB (stretch 25)"),
    ),
    Figure(
        kind="idle",
        label="RSS growth, 2nd cycle vs 1st",
        get=_path("cycle_growth_pct"),
        fmt="{:+.1f} %",
        ratio=False,
        abs_target=(5.0, "within 5 %"),
    ),
    Figure(
        kind="idle",
        label="loaded RSS growth, 2nd cycle vs 1st",
        get=_path("loaded_growth_pct"),
        fmt="{:+.1f} %",
        ratio=False,
    ),
    Figure(kind="idle", label="baseline RSS MiB", get=lambda r: _mib(r.get("baseline_rss"))),
    Figure(
        kind="storm",
        label="registrations / s (connect + first reply)",
        get=_path("reg_per_s"),
        fmt="{:,.0f}",
    ),
    Figure(
        kind="storm",
        label="server CPU µs / registration",
        get=_path("server_cpu_us_per_reg"),
        fmt="{:.0f}",
    ),
    Figure(kind="storm", label="connect → first reply p50 ms", get=_path("latency", "p50_ms")),
    Figure(kind="storm", label="connect → first reply p99 ms", get=_path("latency", "p99_ms")),
    Figure(
        kind="tasks", label="TASK → TASK_END p50 ms", get=_path("task_rtt", "p50_ms"), fmt="{:.2f}"
    ),
    Figure(
        kind="tasks", label="TASK → TASK_END p99 ms", get=_path("task_rtt", "p99_ms"), fmt="{:.2f}"
    ),
    Figure(
        kind="tasks",
        label="heartbeat RTT p50 ms (same connection)",
        get=_path("heartbeat_rtt", "p50_ms"),
        fmt="{:.3f}",
    ),
    Figure(
        kind="tasks",
        label="task p50 / heartbeat p50",
        get=_path("task_over_heartbeat_p50"),
        fmt="{:.2f}×",
        abs_target=(3.0, "≤ 3×"),
    ),
    Figure(
        kind="tasks",
        label="server CPU µs / task",
        get=_path("server_cpu_us_per_task"),
        fmt="{:.0f}",
    ),
    Figure(
        kind="bigresult",
        label="result MiB/s (device → server → both TASK_ENDs)",
        get=_path("mib_per_s"),
        fmt="{:.0f}",
    ),
    Figure(
        kind="bigresult",
        label="COMMAND_RESULTS → TASK_END p50 ms",
        get=_path("results_to_end", "p50_ms"),
    ),
    Figure(
        kind="bigresult",
        label="server CPU ms / task",
        get=lambda r: _scale(r.get("server_cpu_us_per_task"), 1e-3),
    ),
    Figure(
        kind="llmsteps",
        label="server CPU µs / llm step (model excluded)",
        get=_path("llm_cpu_us_per_step"),
        fmt="{:.0f}",
    ),
    Figure(
        kind="llmsteps",
        label="server CPU µs / script step",
        get=_path("script_cpu_us_per_step"),
        fmt="{:.0f}",
    ),
    Figure(
        kind="llmsteps",
        label="llm step / script step (CPU)",
        get=_path("llm_over_script"),
        fmt="{:.2f}×",
        abs_target=(2.0, "≤ 2×"),
    ),
    Figure(
        kind="llmconcurrent",
        label="all tasks complete, wall s",
        get=_path("wall_s"),
        fmt="{:.2f}",
    ),
    Figure(
        kind="llmconcurrent",
        label="model calls per task (the last one answers)",
        get=_path("model_calls"),
        fmt="{:.0f}",
    ),
    Figure(
        kind="llmconcurrent",
        label="floor: model calls × model delay, s",
        get=_path("floor_s"),
        fmt="{:.2f}",
    ),
    Figure(
        kind="llmconcurrent",
        label="overhead above the floor, s",
        get=_path("overhead_s"),
        fmt="{:.2f}",
    ),
    Figure(
        kind="llmconcurrent",
        label="server CPU use during the burst",
        get=_path("server_util"),
        fmt="{:.0%}",
    ),
    Figure(
        kind="llmconcurrent",
        label="fake model CPU use (shares the generator's CPU)",
        get=_path("model_util"),
        fmt="{:.0%}",
    ),
    Figure(
        kind="llmconcurrent",
        label="generator CPU use",
        get=_path("gen_util"),
        fmt="{:.0%}",
    ),
    Figure(
        kind="llmconcurrent",
        label="heartbeat probe CPU use (own process, generator's CPU)",
        get=_path("probe_util"),
        fmt="{:.0%}",
    ),
    Figure(
        kind="llmconcurrent",
        label="heartbeat RTT p99 ms, idle",
        get=_path("hb_idle", "p99_ms"),
        fmt="{:.2f}",
    ),
    Figure(
        kind="llmconcurrent",
        label="heartbeat RTT p99 ms, during",
        get=_path("hb_during", "p99_ms"),
        fmt="{:.2f}",
    ),
    Figure(
        kind="llmconcurrent",
        label="heartbeat RTT p99 ms, during the model rounds (after every list_tools)",
        get=_path("hb_rounds", "p99_ms"),
        fmt="{:.2f}",
    ),
    Figure(
        kind="llmconcurrent",
        label="heartbeat p99 during / idle",
        get=_path("hb_p99_ratio"),
        fmt="{:.2f}×",
        abs_target=(2.0, "≤ 2×"),
    ),
]


def _mib(value: Any) -> float | None:
    return value / 2**20 if isinstance(value, int | float) else None


def _scale(value: Any, factor: float) -> float | None:
    return value * factor if isinstance(value, int | float) else None


def median_figure(results: list[dict[str, Any]], figure: Figure) -> tuple[float | None, str]:
    """Median over repetitions, and the range as text when there were several."""
    values = [v for v in (figure.get(r) for r in results if "error" not in r) if v is not None]
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return None, ""
    med = statistics.median(values)
    spread = ""
    if len(values) > 1:
        spread = f" ({figure.fmt.format(min(values))}–{figure.fmt.format(max(values))})"
    return med, spread


def table(
    scenarios: list[Scenario], results: dict[str, dict[str, list[dict[str, Any]]]], json_lib: str
) -> str:
    """The Markdown table: one row per figure, the ratio ufo_trio / limit, and the target."""
    head = [
        f"| scenario | figure | limit (bare trio-websocket, {json_lib}) | ufo_trio | ratio | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    rows: list[str] = []
    for scenario in scenarios:
        if scenario.tls or scenario.metrics:
            continue  # in `tls_table` / `metrics_table`
        per_server = results.get(scenario.name, {})
        errors = [
            f"{kind}: {r['error']}" for kind, rs in per_server.items() for r in rs if "error" in r
        ]
        for figure in FIGURES:
            if figure.kind != scenario.kind:
                continue
            cells: dict[str, tuple[float | None, str]] = {
                kind: median_figure(per_server.get(kind, []), figure) for kind in (LIMIT, UFO)
            }
            text = {
                kind: ("–" if v is None else figure.fmt.format(v) + spread)
                for kind, (v, spread) in cells.items()
            }
            if LIMIT not in scenario.servers:
                text[LIMIT] = "n/a"
            lim, ufo = cells[LIMIT][0], cells[UFO][0]
            ratio = ""
            if figure.ratio and lim and ufo is not None:
                ratio = f"{ufo / lim:.2f}×"
            target = ""
            if figure.ratio_target and lim and ufo is not None:
                ok = ufo / lim <= figure.ratio_target[0]
                target = f"{figure.ratio_target[1]} {'✅' if ok else '❌'}"
            elif figure.abs_target and ufo is not None:
                ok = (
                    abs(ufo) <= figure.abs_target[0]
                    if "%" in figure.fmt
                    else ufo <= figure.abs_target[0]
                )
                target = f"{figure.abs_target[1]} {'✅' if ok else '❌'}"
            elif figure.abs_target or figure.ratio_target:
                target = (figure.abs_target or figure.ratio_target or (0, ""))[1]
            rows.append(
                f"| {scenario.title} | {figure.label} | {text[LIMIT]} | {text[UFO]} | {ratio} | {target} |"
            )
        for error in errors:
            rows.append(f"| {scenario.title} | **error** | {error} | | | |")
    return "\n".join(head + rows)


#: What the TLS scenarios report: (kind, label, get, format, max wss:// value or None).
TLS_FIGURES: list[tuple[str, str, Callable[[dict[str, Any]], float | None], str, float | None]] = [
    ("heartbeat", "server CPU µs / round trip", _path("server_cpu_us_per_rt"), "{:.1f}", None),
    ("heartbeat", "round trips / s", _path("rt_per_s"), "{:,.0f}", None),
    ("heartbeat", "RTT p50 ms", _path("rtt", "p50_ms"), "{:.2f}", None),
    ("heartbeat", "generator CPU use", _path("gen_util"), "{:.0%}", None),
    ("idle", "RSS KiB / idle device", _path("rss_per_device_kib"), "{:.1f}", 60.0),
]


def pair_table(
    scenarios: list[Scenario],
    results: dict[str, dict[str, list[dict[str, Any]]]],
    *,
    pick: Callable[[Scenario], bool],
    base: tuple[str, str],
    other: tuple[str, str],
    suffix: str,
    ratio_head: str,
    ratio_fmt: str,
    target: Callable[[str, float | None, float | None, float | None], str],
) -> str:
    """Two ufo_trio variants side by side in the same run (`base` and `other`: server kind and
    column label), one row per figure of `TLS_FIGURES`; `target(label, base, other, limit)`
    fills the last column."""
    head = [
        f"| scenario | figure | {base[1]} | {other[1]} | {ratio_head} | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    rows: list[str] = []
    for scenario in scenarios:
        if not pick(scenario):
            continue
        per_server = results.get(scenario.name, {})
        for kind, label, get, fmt, limit in TLS_FIGURES:
            if kind != scenario.kind:
                continue
            figure = Figure(kind=kind, label=label, get=get, fmt=fmt)
            a, spread_a = median_figure(per_server.get(base[0], []), figure)
            b, spread_b = median_figure(per_server.get(other[0], []), figure)
            cell_a = "–" if a is None else fmt.format(a) + spread_a
            cell_b = "–" if b is None else fmt.format(b) + spread_b
            ratio = ratio_fmt.format(b / a) if a and b is not None and "%" not in fmt else ""
            rows.append(
                f"| {scenario.title}{suffix} | {label} | {cell_a} | {cell_b} | {ratio} "
                f"| {target(label, a, b, limit)} |"
            )
        for kind_, rs in per_server.items():
            for r in rs:
                if "error" in r:
                    rows.append(f"| {scenario.title}{suffix} | **error** | {kind_}: {r['error']} | | | |")
    return "\n".join(head + rows) if rows else ""


def _tls_target(label: str, plain: float | None, tls: float | None, limit: float | None) -> str:
    if limit is None or tls is None:
        return ""
    return f"wss:// ≤ {limit:g} {'✅' if tls <= limit else '❌'}"


def _metrics_target(label: str, off: float | None, on: float | None, limit: float | None) -> str:
    if not label.startswith("server CPU") or not off or on is None:
        return ""
    return f"≤ 1.05× {'✅' if on / off <= 1.05 else '❌'}"


def tls_table(scenarios: list[Scenario], results: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """ufo_trio over ws:// and over wss://, same run: what TLS costs (issue 13)."""
    return pair_table(
        scenarios, results, pick=lambda s: s.tls, base=(UFO, "ufo_trio ws://"),
        other=(UFO_TLS, "ufo_trio wss://"), suffix=" (TLS)", ratio_head="wss / ws", ratio_fmt="{:.2f}×",
        target=_tls_target,
    )  # fmt: skip


def metrics_table(
    scenarios: list[Scenario], results: dict[str, dict[str, list[dict[str, Any]]]]
) -> str:
    """ufo_trio counting vs ufo_trio --no-metrics, same run: what metrics cost (issue 12)."""
    return pair_table(
        scenarios, results, pick=lambda s: s.metrics, base=(UFO_NO_METRICS, "ufo_trio --no-metrics"),
        other=(UFO, "ufo_trio (metrics on)"), suffix="", ratio_head="on / off", ratio_fmt="{:.3f}×",
        target=_metrics_target,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Environment


def detect_json_lib() -> str:
    """Which JSON library ufo_trio's codec uses: orjson if importing it pulls orjson in."""
    probe = "import sys, ufo_trio._codec; print('orjson' if 'orjson' in sys.modules else 'stdlib')"
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,
            cwd=REPO,
            env=child_env(),
            timeout=60,
            check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return "stdlib"
    return out.stdout.decode().strip() or "stdlib"


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    versions: dict[str, str | None] = {}
    for dist in ("trio", "trio-websocket", "wsproto", "h11", "orjson", "cattrs", "attrs"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "commit": commit,
        "nofile": _proc.raise_nofile_limit(),
    }


def background_load(seconds: float = 1.0) -> float:
    """CPUs' worth of work other processes did over `seconds` before the run (0.0 = quiet)."""
    busy0, own0, t0 = _proc.system_busy_seconds(), _proc.self_cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    busy = _proc.system_busy_seconds() - busy0 - (_proc.self_cpu_seconds() - own0)
    return max(0.0, busy / (time.monotonic() - t0))


def choose_cpus(no_pin: bool) -> tuple[int | None, int | None]:
    if no_pin or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    parser.add_argument(
        "--servers", default=f"{LIMIT},{UFO}", help=f"comma-separated subset of {LIMIT},{UFO}"
    )
    parser.add_argument(
        "--scenarios", default="", help="comma-separated scenario names (default: all)"
    )
    parser.add_argument(
        "--json",
        choices=("auto", "stdlib", "orjson"),
        default="auto",
        help="JSON library of the limit server (auto: the one ufo_trio uses)",
    )
    parser.add_argument(
        "--duration", type=float, default=5.0, help="measured seconds per heartbeat scenario"
    )
    parser.add_argument("--repeat", type=int, default=1, help="repetitions of every scenario")
    parser.add_argument(
        "--ufo-arg",
        action="append",
        default=[],
        help="extra argument for python -m ufo_trio (repeatable)",
    )
    parser.add_argument(
        "--db",
        choices=(":memory:", "file"),
        default=":memory:",
        help="ufo_trio's task history: in memory (default) or a fresh SQLite file per run",
    )
    parser.add_argument(
        "--gc-threshold",
        type=int,
        default=None,
        help="run both servers with gc.set_threshold(N, 20, 100) (an experiment knob)",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="nice value for server and generator, e.g. -15 on a shared machine (needs root)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--json-out", type=Path, default=REPO / "bench" / "results" / "latest.json")
    args = parser.parse_args(argv)

    servers = [s for s in args.servers.split(",") if s]
    for s in servers:
        if s not in (LIMIT, UFO):
            parser.error(f"unknown server {s!r}")
    scenarios = plan(args.smoke, args.duration)
    if args.scenarios:
        wanted = set(args.scenarios.split(","))
        unknown = wanted - {s.name for s in scenarios}
        if unknown:
            parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
        scenarios = [s for s in scenarios if s.name in wanted]

    # Children inherit the raised limit: ufo_trio cannot be told to raise its own.
    info = machine()
    info["background_load_before"] = round(background_load(), 2)
    if info["background_load_before"] > 0.1:
        # Contention changes batching and caches, so per-round-trip figures drift: say so.
        print(
            f"warning: other processes are using {info['background_load_before']:.0%} of a CPU; "
            "figures will be noisy",
            file=sys.stderr,
        )
    json_lib = detect_json_lib() if args.json == "auto" else args.json
    server_cpu, gen_cpu = choose_cpus(args.no_pin)
    logdir = Path(tempfile.mkdtemp(prefix="ufo-bench-"))
    # The TLS scenarios run ufo_trio twice, over ws:// and over wss://.
    runnable = [*servers, UFO_TLS, UFO_NO_METRICS] if UFO in servers else servers
    wants_tls = any(s.tls for s in scenarios) and UFO in servers
    opts = Options(
        json_lib=json_lib,
        server_cpu=server_cpu,
        gen_cpu=gen_cpu,
        ufo_args=tuple(args.ufo_arg),
        logdir=logdir,
        gc_threshold=args.gc_threshold,
        priority=args.priority,
        db=args.db,
        tls_files=make_tls_files(logdir) if wants_tls else None,
    )
    print(
        f"# ufo_trio benchmark — {info['cpu_model']}, {info['cpus']} CPUs, Python "
        f"{info['python']}, limit JSON: {json_lib}, server CPU {server_cpu}, "
        f"generator CPU {gen_cpu}, logs in {logdir}",
        file=sys.stderr,
    )

    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    unavailable: dict[str, str] = {}
    flip = False
    for scenario in scenarios:
        for rep in range(args.repeat):
            order = [s for s in runnable if s in scenario.servers]
            if flip:
                order.reverse()
            flip = not flip
            for kind in order:
                if kind in unavailable:
                    continue
                label = f"{scenario.name}-{kind}-{rep}"
                t0 = time.monotonic()
                try:
                    result = run_one(kind, scenario, opts, label)
                except ServerUnavailable as exc:
                    unavailable[kind] = str(exc)
                    print(f"  {kind}: unavailable: {exc}", file=sys.stderr)
                    continue
                results.setdefault(scenario.name, {}).setdefault(kind, []).append(result)
                status = result.get("error", "ok")
                print(f"  {label}: {status} ({time.monotonic() - t0:.1f} s)", file=sys.stderr)

    text = table(scenarios, results, json_lib)
    tls_text = tls_table(scenarios, results)
    if tls_text:
        text += "\n\nTLS (issue 13): ufo_trio over ws:// and over wss://, same run\n\n" + tls_text
    metrics_text = metrics_table(scenarios, results)
    if metrics_text:
        text += "\n\nMetrics (issue 12): ufo_trio with and without --no-metrics, same run\n\n"
        text += metrics_text
    print(text)
    for kind, reason in unavailable.items():
        print(f"\n{kind} unavailable: {reason}")

    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "options": {
            "smoke": args.smoke,
            "servers": servers,
            "json_lib": json_lib,
            "server_cpu": server_cpu,
            "generator_cpu": gen_cpu,
            "repeat": args.repeat,
            "duration": args.duration,
            "ufo_args": args.ufo_arg,
            "db": args.db,
            "gc_threshold": args.gc_threshold,
            "priority": args.priority,
        },
        "scenarios": [attrs.asdict(s) for s in scenarios],
        "unavailable": unavailable,
        "results": results,
        "table": text,
    }
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nJSON written to {args.json_out}", file=sys.stderr)

    failed = bool(unavailable) or any(
        "error" in r for per in results.values() for rs in per.values() for r in rs
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
