"""Browser-test tooling: headless Debian Chromium through Selenium, and a stand-in API server.

Driver choice: Selenium with Debian's `chromium-driver`, which Debian builds from the same source
as `chromium`, so driver and browser always match; nothing is downloaded (Playwright would need
its own browser build or hope its protocol client matches the distribution's Chromium).

`StandIn` serves the dashboard files exactly as `ufo_trio._dashboard` hands them out and answers
the JSON contract of the task-history work (/work/notes/api_contract.md) with fixed data, on
127.0.0.1 port 0 in a background thread. Phase 2 replaces it with the real server.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import urllib.parse
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import pytest

from ufo_trio._dashboard import Dashboard

if TYPE_CHECKING:
    from collections.abc import Iterator

    from selenium.webdriver.remote.webdriver import WebDriver

CHROMIUM = os.environ.get("UFO_TRIO_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("UFO_TRIO_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1366,1000",
)
XSS = "<img src=x onerror=alert(1)>"
KEY = "right-key-for-tests"


def browser_missing() -> str | None:
    """Why browser tests cannot run here, or None. In CI (CI=true) they must run: no skip."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return f"{path} not installed (.ci/run installs chromium and chromium-driver)"
    return None


def launch_chromium(user_data_dir: str) -> WebDriver:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    # Leave dialogs open instead of auto-dismissing them, so a test can see one.
    options.unhandled_prompt_behavior = "ignore"
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    # Record every dialog instead of blocking on it: `window.__dialogs` lists what was asked.
    driver.execute_cdp_cmd(
        "Page.addScriptToEvaluateOnNewDocument",
        {
            "source": "window.__dialogs = [];"
            "for (const f of ['alert', 'confirm', 'prompt']) {"
            "  window[f] = (m) => { window.__dialogs.push(f + ':' + String(m)); };"
            "}"
        },
    )
    driver.set_page_load_timeout(30)
    return driver


def chromium_session() -> Iterator[WebDriver]:
    """Body of the session fixture `chromium` (tests/conftest.py): one headless Chromium for the
    whole run, with an empty profile of its own. Skips when Chromium is missing, except in CI."""
    reason = browser_missing()
    if reason is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    profile = tempfile.mkdtemp(prefix="ufo-trio-chromium-")
    driver = launch_chromium(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


# --- stand-in server -----------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.isoformat()


def sample_data(now: datetime | None = None) -> dict[str, Any]:
    """Fixed fleet data in the contract's shapes: 3 devices (one hostile), 1 constellation."""
    now = now or datetime.now(UTC)
    ago = lambda **kw: _iso(now - timedelta(**kw))  # noqa: E731
    devices = [
        {
            "client_id": "lab-win-01", "role": "device", "platform": "windows",
            "hostname": "LAB-WIN-01", "online": True, "connected_at": ago(hours=3),
            "last_heartbeat": ago(seconds=12), "sessions_running": 1, "target_id": None,
            "first_seen": ago(days=4), "last_seen": ago(seconds=12),
            "last_disconnect_reason": None,
        },
        {
            "client_id": XSS, "role": "device", "platform": "linux", "hostname": XSS,
            "online": True, "connected_at": ago(minutes=5), "last_heartbeat": ago(seconds=3),
            "sessions_running": 0, "target_id": None, "first_seen": ago(minutes=5),
            "last_seen": ago(seconds=3), "last_disconnect_reason": None,
        },
        {
            "client_id": "kiosk-7", "role": "device", "platform": "windows",
            "hostname": "KIOSK-7", "online": False, "connected_at": None,
            "last_heartbeat": None, "sessions_running": 0, "target_id": None,
            "first_seen": ago(days=2), "last_seen": ago(minutes=42),
            "last_disconnect_reason": "keepalive ping timeout",
        },
        {
            "client_id": "galaxy-main", "role": "constellation", "platform": None,
            "hostname": None, "online": True, "connected_at": ago(hours=1),
            "last_heartbeat": ago(seconds=20), "sessions_running": 0,
            "target_id": "lab-win-01", "first_seen": ago(days=4), "last_seen": ago(seconds=20),
            "last_disconnect_reason": None,
        },
    ]
    tasks = [
        {
            "session_id": "s-running", "task_name": "open-notepad", "requester_id": "galaxy-main",
            "requester_type": "constellation", "executor_id": "lab-win-01",
            "platform": "windows", "agent": "script", "status": "running", "error": None,
            "created_at": ago(seconds=95), "acked_at": ago(seconds=95), "ended_at": None,
            "commands": 3, "last_tool": "click_input",
        }
    ]
    for i in range(24):
        failed = i % 5 == 3
        tasks.append({
            "session_id": f"s-{i}", "task_name": f"nightly-check-{i}",
            "requester_id": "galaxy-main", "requester_type": "constellation",
            "executor_id": "lab-win-01" if i % 2 else "kiosk-7", "platform": "windows",
            "agent": "script", "status": "failed" if failed else "completed",
            "error": "step 1 failed: element not found" if failed else None,
            "created_at": ago(minutes=2 * i + 3, seconds=20), "acked_at": ago(minutes=2 * i + 3),
            "ended_at": ago(minutes=2 * i + 3), "commands": 2, "last_tool": "type_keys",
        })
    details = {
        t["session_id"]: {
            **t, "request": '{"steps": [[{"tool_name": "type_keys"}]]}',
            "result": {"ok": not t["error"]},
            "steps": [{
                "index": 0, "sent_at": t["created_at"],
                "commands": [{"tool_name": "type_keys", "tool_type": "action",
                              "parameters": {"text": "hello"}, "call_id": "c0"}],
                "results": [{"status": "success", "error": None, "result": None, "call_id": "c0"}],
                "received_at": t["ended_at"], "timed_out": False,
            }],
        }
        for t in tasks
    }
    return {"devices": devices, "tasks": tasks, "details": details}


class StandIn:
    """The dashboard files plus the JSON API with fixed data, behind the API key (AUTH-4)."""

    def __init__(self, *, history: bool = True, csp: bool = True, key: str = KEY) -> None:
        self.history = history
        self.csp = csp
        self.key = key
        self.data = sample_data()
        self.dashboard = Dashboard()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> StandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def api(self, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        if path == "/api/devices" and self.history:
            return 200, {"devices": self.data["devices"]}
        if path == "/api/tasks" and self.history:
            tasks = self.data["tasks"]
            if "status" in query:
                tasks = [t for t in tasks if t["status"] == query["status"][0]]
            if "since" in query:
                since = datetime.fromisoformat(query["since"][0])
                tasks = [t for t in tasks if datetime.fromisoformat(t["created_at"]) >= since]
            limit = int(query.get("limit", ["50"])[0])
            return 200, {"tasks": tasks[:limit], "next_cursor": None}
        if path.startswith("/api/tasks/") and self.history:
            detail = self.data["details"].get(urllib.parse.unquote(path[len("/api/tasks/") :]))
            return (200, detail) if detail else (404, {"detail": "Task not found"})
        if path == "/api/clients":
            online = [d["client_id"] for d in self.data["devices"] if d["online"]]
            return 200, {"online_clients": online}
        if path == "/api/sessions":
            return 200, {"sessions": [
                {k: t[k] for k in ("session_id", "task_name", "requester_id", "requester_type",
                                   "executor_id")} | {"started_at": t["created_at"]}
                for t in self.data["tasks"] if t["status"] == "running"
            ]}
        return 404, {"detail": "Not Found"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                standin.requests.append((self.path, dict(self.headers.items())))
                static = standin.dashboard.lookup(url.path)
                if static is not None:
                    headers = [
                        h for h in static.headers
                        if standin.csp or h[0] != "Content-Security-Policy"
                    ]
                    return self._send(200, headers, static.body)
                if not url.path.startswith("/api/"):
                    return self._send(404, [("Content-Type", "application/json")],
                                      b'{"detail":"Not Found"}')
                auth = self.headers.get("Authorization", "")
                if not auth:
                    status, body = 401, {"detail": "Missing API key"}
                elif auth != f"Bearer {standin.key}":
                    status, body = 401, {"detail": "Invalid API key"}
                else:
                    status, body = standin.api(url.path, urllib.parse.parse_qs(url.query))
                headers = [("Content-Type", "application/json")]
                if status == 401:
                    headers.append(("WWW-Authenticate", "Bearer"))
                self._send(status, headers, json.dumps(body).encode())

        return Handler
