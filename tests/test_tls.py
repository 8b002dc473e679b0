"""Built-in TLS (issue 13): wss:// and https:// on the one port, SIGHUP reload, SDK verification.

Certificates are made at test time by trustme. Real sockets only on 127.0.0.1 port 0; the
stalled-handshake cases run over memory streams with the autojump clock (LIM-2 at exact times).
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import signal
import ssl
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio.testing
import trustme
from cryptography import x509

from ufo_trio import ConfigError, ServerConfig
from ufo_trio._tls import server_context
from ufo_trio.client import (
    Command,
    ConnectFailed,
    Plan,
    TLSError,
    list_clients,
    open_constellation,
    open_device,
)
from ufo_trio.client._cli import add_subcommands
from ufo_trio.client._http import get_json
from ufo_trio.client._tls import client_context
from ufo_trio.testing import TEST_KEY, connect, open_memory_server, open_server

if TYPE_CHECKING:
    from pathlib import Path

WAIT = 30.0
HOSTS = ("127.0.0.1", "localhost")


class Pair:
    """A certificate + key written to files, and the CA file that trusts it."""

    def __init__(self, tmp_path: Path, name: str, ca: trustme.CA, leaf: trustme.LeafCert) -> None:
        self.cert = tmp_path / f"{name}-cert.pem"
        self.key = tmp_path / f"{name}-key.pem"
        self.ca_file = tmp_path / f"{name}-ca.pem"
        self.leaf = leaf
        for blob in leaf.cert_chain_pems:
            with self.cert.open("ab") as f:
                f.write(blob.bytes())
        leaf.private_key_pem.write_to_path(str(self.key))
        ca.cert_pem.write_to_path(str(self.ca_file))

    @property
    def serial(self) -> int:
        return x509.load_pem_x509_certificate(self.leaf.cert_chain_pems[0].bytes()).serial_number

    def config(self, **overrides: Any) -> dict[str, Any]:
        return {"tls_cert": str(self.cert), "tls_key": str(self.key), **overrides}

    def context(self) -> ssl.SSLContext:
        return client_context(str(self.ca_file))


def make_pair(tmp_path: Path, name: str = "gen1", *identities: str, **kw: Any) -> Pair:
    ca = trustme.CA()
    return Pair(tmp_path, name, ca, ca.issue_cert(*(identities or HOSTS), **kw))


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path)


def plan() -> Plan:
    return Plan.of(Command(tool_name="echo", parameters={"text": "over tls"}))


# ------------------------------------------------------------------------------- happy paths


async def test_device_and_constellation_run_a_task_over_wss(pair: Pair) -> None:
    """A device and a constellation register over wss:// and run a task; the URL says wss://."""
    async with open_server(**pair.config()) as server:
        assert server.url.startswith("wss://127.0.0.1:")
        context = pair.context()
        with trio.fail_after(WAIT):
            async with (
                open_device(server.url, "dev-1", api_key=TEST_KEY, ssl_context=context),
                open_constellation(
                    server.url, "orch", target_id="dev-1", api_key=TEST_KEY, ssl_context=context
                ) as constellation,
            ):
                outcome = await constellation.run_task("dev-1", plan())
                assert outcome.ok, outcome
                assert outcome.result[0]["results"][0]["result"] == "over tls"


async def test_http_api_over_https_and_clients_command(
    pair: Pair, capsys: pytest.CaptureFixture[str]
) -> None:
    """The HTTP API answers on the same port over https://, from the SDK and the CLI (with
    --ca for the private CA, and with an https:// URL)."""
    async with open_server(**pair.config()) as server:
        context = pair.context()
        https = server.url.replace("wss://", "https://").removesuffix("/ws")
        with trio.fail_after(WAIT):
            health = await get_json(https, "/api/health", api_key=TEST_KEY, ssl_context=context)
            assert health.status == 200
            async with open_device(server.url, "dev-1", api_key=TEST_KEY, ssl_context=context):
                assert await list_clients(server.url, api_key=TEST_KEY, ssl_context=context) == [
                    "dev-1"
                ]
                for url in (server.url, https):
                    code = await trio.to_thread.run_sync(
                        run_cli,
                        ["clients", "--url", url, "--api-key", TEST_KEY, "--ca", str(pair.ca_file)],
                    )
                    assert code == 0
                    assert capsys.readouterr().out.splitlines() == ["dev-1"]


def run_cli(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="ufo-trio")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


async def test_memory_server_over_tls_registers(pair: Pair) -> None:
    """TLS works over in-memory streams too (what the MockClock tests below rely on)."""
    async with open_memory_server(**pair.config()) as mem:
        client = await mem.connect(ssl_context=pair.context())
        verdict = await client.register("dev-1")
        assert (verdict["type"], verdict["status"]) == ("heartbeat", "ok")


# ------------------------------------------------------------------------------- refusals


async def test_plain_ws_and_http_against_the_tls_port_get_a_clean_refusal(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """A ws:// upgrade gets its handshake refused with 400 at once (no hang); the SDK names the
    cause in one line; plain HTTP gets the same 400 with a JSON detail. The log has one INFO
    line per refusal and no traceback."""
    caplog.set_level(logging.DEBUG, logger="ufo_trio")
    async with open_server(**pair.config()) as server:
        plain = server.url.replace("wss://", "ws://")
        with trio.fail_after(WAIT):
            upgrade = (
                b"GET /ws?token=test-key HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            status, _ = await plain_request(server.port, upgrade)
            assert status.startswith(b"HTTP/1.1 400 ")
            with pytest.raises(TLSError) as refused:
                async with open_device(plain, "dev-1", api_key=TEST_KEY):
                    pass
            assert str(refused.value) == (
                f"{plain} speaks TLS on this port: use a wss:// URL"
            )
            head, body = await plain_request(
                server.port, b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
            assert head.startswith(b"HTTP/1.1 400 ")
            assert json.loads(body) == {
                "detail": "This port speaks TLS: use wss:// or https:// URLs"
            }
            # The server is still fine for TLS clients afterwards.
            async with connect(server.url, ssl_context=pair.context()) as client:
                assert (await client.register("dev-2"))["status"] == "ok"
    refusals = [r for r in caplog.records if "plain-text request on the TLS port" in r.message]
    assert len(refusals) == 3
    assert all(r.levelno == logging.INFO for r in refusals)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def plain_request(port: int, request: bytes) -> tuple[bytes, bytes]:
    """Send *request* in plain text; the response head and body, read until the server closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("case", ["expired", "wrong-host", "unknown-ca"])
async def test_sdk_refuses_bad_certificates_with_one_clear_line(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An expired, wrong-host or untrusted certificate: the SDK raises TLSError with one line
    naming the reason, for devices, constellations and the HTTP API; the server logs the failed
    handshake at INFO without a traceback."""
    caplog.set_level(logging.INFO, logger="ufo_trio")
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    if case == "expired":
        bad = make_pair(tmp_path, "bad", not_before=past - datetime.timedelta(days=30), not_after=past)
        expected = "certificate has expired"
    elif case == "wrong-host":
        bad = make_pair(tmp_path, "bad", "example.org")
        expected = "mismatch"
    else:
        bad = make_pair(tmp_path, "bad")
        expected = "unable to get local issuer certificate (for a private CA use --ca FILE"
    context = None if case == "unknown-ca" else bad.context()
    async with open_server(**bad.config()) as server:
        with trio.fail_after(WAIT):
            with pytest.raises(TLSError) as device_error:
                async with open_device(server.url, "dev-1", api_key=TEST_KEY, ssl_context=context):
                    pass
            with pytest.raises(TLSError) as const_error:
                async with open_constellation(
                    server.url, "orch", api_key=TEST_KEY, ssl_context=context
                ):
                    pass
            with pytest.raises(TLSError) as http_error:
                await list_clients(server.url, api_key=TEST_KEY, ssl_context=context)
    for error in (device_error.value, const_error.value, http_error.value):
        message = str(error)
        assert "\n" not in message
        assert "the server's TLS certificate was refused: " in message
        assert expected in message, message
    failed = [r for r in caplog.records if "TLS handshake failed" in r.message]
    assert len(failed) == 3
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_device_does_not_retry_a_refused_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A device that lost its connection and then meets a certificate it cannot verify stops
    with TLSError after one attempt instead of retrying (no reconnection storm). Live
    connections survive the reload that brought the bad certificate in."""
    caplog.set_level(logging.INFO, logger="ufo_trio")
    ca = trustme.CA()
    pair = Pair(tmp_path, "gen1", ca, ca.issue_cert(*HOSTS))
    wrong = Pair(tmp_path, "wrong", ca, ca.issue_cert("example.org"))
    async with open_server(**pair.config()) as server:
        assert server.tls is not None
        tls = server.tls

        async def run_device() -> None:
            async with open_device(
                server.url, "dev-1", api_key=TEST_KEY, ssl_context=pair.context()
            ) as device:
                # The same files now hold a certificate for another host name.
                pair.cert.write_bytes(wrong.cert.read_bytes())
                pair.key.write_bytes(wrong.key.read_bytes())
                assert await tls.reload()
                # The live connection is untouched by the reload.
                assert server.registry.online_ids() == ["dev-1"]
                await device.wait_registered(1)
                for conn in list(server.connections):
                    conn.close(1001, "bye")
                await trio.sleep_forever()

        with trio.fail_after(WAIT), pytest.raises(TLSError, match="mismatch"):
            await run_device()
    failed = [r for r in caplog.records if "TLS handshake failed" in r.message]
    assert len(failed) == 1


async def test_connection_cap_with_tls_closes_without_plain_text(
    pair: Pair, caplog: pytest.LogCaptureFixture
) -> None:
    """Over --max-connections a TLS port closes before the handshake (a plain-text 503 would
    read as a TLS failure); the SDK reports a retryable ConnectFailed, not a TLSError."""
    caplog.set_level(logging.INFO, logger="ufo_trio")
    async with open_server(**pair.config(max_connections=1)) as server:
        with trio.fail_after(WAIT):
            holder = await trio.open_tcp_stream("127.0.0.1", server.port)
            async with holder:
                while server.open_streams < 1:
                    await trio.sleep(0.01)
                with pytest.raises(ConnectFailed) as refused:
                    async with open_device(
                        server.url, "dev-1", api_key=TEST_KEY, ssl_context=pair.context()
                    ):
                        pass
    assert not isinstance(refused.value, TLSError)
    assert str(refused.value).endswith("the server closed the connection during the TLS handshake")
    assert any("limit max-connections reached (1)" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------- LIM-2


@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["silent", "half-hello"])
async def test_stalled_tls_handshake_is_dropped_at_the_lim2_deadline(
    pair: Pair, autojump_clock: trio.testing.MockClock, sent: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """LIM-2: a client that never completes the TLS handshake is disconnected exactly
    --registration-timeout after it connected, like a slow HTTP head."""
    caplog.set_level(logging.INFO, logger="ufo_trio")
    async with open_memory_server(**pair.config(registration_timeout=7.0)) as mem:
        client, server_side = trio.testing.memory_stream_pair()
        start = trio.current_time()
        mem.server.spawn_connection(server_side)
        if sent:
            await client.send_all(sent)
        assert await client.receive_some() == b""  # EOF: the server closed
        assert trio.current_time() - start == 7.0
        await trio.testing.wait_all_tasks_blocked()
        assert mem.connection_tasks() == 0
    assert any("limit registration-timeout reached" in r.message for r in caplog.records)


# ------------------------------------------------------------------------------- config


def test_config_needs_both_files() -> None:
    with pytest.raises(ConfigError, match="tls-cert and tls-key must be given together"):
        ServerConfig(tls_cert="c.pem")
    with pytest.raises(ConfigError, match="tls-cert and tls-key must be given together"):
        ServerConfig(tls_key="k.pem")


def test_server_context_is_tls12_or_newer(pair: Pair, tmp_path: Path) -> None:
    context = server_context(str(pair.cert), str(pair.key))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_RENEGOTIATION
    other = make_pair(tmp_path, "other")
    with pytest.raises(ConfigError, match="the key does not belong to the certificate"):
        server_context(str(pair.cert), str(other.key))
    with pytest.raises(ConfigError, match="no such file"):
        server_context(str(tmp_path / "missing.pem"), str(pair.key))


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ufo_trio", "--port", "0", "--api-key", "K", *args]


async def run_to_exit(*args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT):
        result: subprocess.CompletedProcess[bytes] = await trio.run_process(
            serve_cmd(*args), capture_stdout=True, capture_stderr=True, check=False,
            env=clean_env(**env),
        )
    return result


def clean_env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("UFO_TRIO_")}
    env.update(extra)
    return env


async def test_bad_tls_flags_exit_2_with_one_line(pair: Pair, tmp_path: Path) -> None:
    """Only one of the pair, a missing file, a non-PEM file or a key of another certificate:
    one line on stderr, exit 2, no start-up line."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    other = make_pair(tmp_path, "other")
    cases = {
        ("--tls-cert", str(pair.cert)): "tls-cert and tls-key must be given together",
        ("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(pair.key)): "no such file",
        ("--tls-cert", str(garbage), "--tls-key", str(pair.key)): "not a PEM certificate",
        ("--tls-cert", str(pair.cert), "--tls-key", str(other.key)): "does not belong",
    }
    results = [(await run_to_exit(*args), text) for args, text in cases.items()]
    # The environment works like the flags: UFO_TRIO_TLS_KEY alone is refused too.
    results.append(
        (
            await run_to_exit(UFO_TRIO_TLS_KEY=str(pair.key)),
            "tls-cert and tls-key must be given together",
        )
    )
    for result, text in results:
        err = result.stderr.decode()
        assert result.returncode == 2, err
        assert err.count("\n") == 1, err
        assert text in err, err
        assert "Traceback" not in err
        assert b"listening" not in result.stdout


async def test_client_cli_ca_and_insecure(
    pair: Pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--ca with a missing file is a usage error (exit 2); --insecure connects to an untrusted
    certificate but warns on every start; without either, the untrusted certificate is refused
    in one line (exit 1)."""
    async with open_server(**pair.config()) as server:
        base = ["clients", "--url", server.url, "--api-key", TEST_KEY]
        code = await trio.to_thread.run_sync(run_cli, [*base, "--ca", str(tmp_path / "none.pem")])
        assert code == 2
        assert capsys.readouterr().err.startswith("ufo_trio clients: error: CA file not found")
        code = await trio.to_thread.run_sync(run_cli, base)
        err = capsys.readouterr().err
        assert code == 1
        assert err.count("\n") == 1, err
        assert "certificate was refused" in err, err
        for _ in range(2):
            code = await trio.to_thread.run_sync(run_cli, [*base, "--insecure"])
            captured = capsys.readouterr()
            assert code == 0
            assert captured.err.startswith("ufo_trio clients: warning: --insecure")
            assert captured.out == "no clients online\n"


# ------------------------------------------------------------------------------- SIGHUP


LINE = re.compile(r"listening on (?P<url>wss://127\.0\.0\.1:(?P<port>\d+)/ws)")


async def peer_serial(port: int, context: ssl.SSLContext) -> int:
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context)
    async with stream:
        await stream.do_handshake()
        der = stream.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def wait_for_log(path: Path, text: str, count: int) -> None:
    with trio.fail_after(WAIT):
        while (await trio.Path(path).read_text()).count(text) < count:
            await trio.sleep(0.05)


async def test_sighup_reloads_the_certificate_for_new_connections(tmp_path: Path) -> None:
    """SIGHUP loads the files again: new connections get the second generation, a live one
    keeps working; a reload of broken files is logged and the second generation stays."""
    gen1 = make_pair(tmp_path, "gen1")
    gen2 = make_pair(tmp_path, "gen2")
    both = ssl.create_default_context(cafile=str(gen1.ca_file))
    both.load_verify_locations(cafile=str(gen2.ca_file))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(gen1.cert.read_bytes())
    key.write_bytes(gen1.key.read_bytes())
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        process = await trio.lowlevel.open_process(
            serve_cmd(),  # the pair from the environment this time
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
            env=clean_env(UFO_TRIO_TLS_CERT=str(cert), UFO_TRIO_TLS_KEY=str(key)),
        )
    assert process.stdout is not None
    try:
        with trio.fail_after(WAIT):
            line = b""
            while b"\n" not in line:
                line += await process.stdout.receive_some(4096)
            match = LINE.search(line.decode())
            assert match is not None, line
            port = int(match["port"])
            async with connect(match["url"], token="K", ssl_context=both) as live:
                assert (await live.register("dev-1"))["status"] == "ok"
                assert await peer_serial(port, both) == gen1.serial

                cert.write_bytes(gen2.cert.read_bytes())
                key.write_bytes(gen2.key.read_bytes())
                process.send_signal(signal.SIGHUP)
                await wait_for_log(stderr, "TLS certificate reloaded", 1)
                assert await peer_serial(port, both) == gen2.serial

                cert.write_text("garbage\n")
                process.send_signal(signal.SIGHUP)
                await wait_for_log(stderr, "TLS reload failed, keeping the previous certificate", 1)
                assert await peer_serial(port, both) == gen2.serial

                # The connection accepted before both reloads is still served.
                await live.send({"type": "heartbeat", "status": "ok", "client_id": "dev-1"})
                assert (await live.recv())["type"] == "heartbeat"
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
        await process.stdout.aclose()
    assert "Traceback" not in stderr.read_text()
