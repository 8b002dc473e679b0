"""Issue 12: the dashboard page in a real headless Chromium.

Against the REAL server with real SDK devices (`open_server`, `open_device`): the page loads with
the key and lists the devices, a task run during the test shows as running and then completed, a
device that disconnects leaves the list (or turns offline where the server has `/api/devices`),
a wrong key gets a clear message, and a hostile device id renders as text. Selenium calls block,
so they run in a worker thread (`trio.to_thread.run_sync`) while the server answers on the Trio
thread.

Against a stand-in of the JSON API (tests/browser.py) with fixed data in the shapes of the task
history (issue 11): the history views (offline devices, recent tasks, the chart, transcripts)
and a hostile hostname without the CSP. Few tests, one browser for the run: CI stays fast.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any

import trio
from browser import KEY, XSS, StandIn

from ufo_trio.client import Command, Plan, ToolRegistry, open_constellation, open_device
from ufo_trio.testing import open_server

if TYPE_CHECKING:
    from collections.abc import Callable

    from selenium.webdriver.remote.webdriver import WebDriver


def wait_for(condition: Callable[[], object], what: str, timeout: float = 15.0) -> object:
    """Poll the browser until `condition()` is truthy (browser time is real time, not Trio's)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def visible(driver: WebDriver, element_id: str) -> bool:
    return bool(driver.execute_script(f"return !document.getElementById('{element_id}').hidden"))


def text_of(driver: WebDriver, element_id: str) -> str:
    return str(driver.execute_script(f"return document.getElementById('{element_id}').textContent"))


def rows(driver: WebDriver, table: str) -> list[list[str]]:
    return list(driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' tbody tr'))"
        ".map(tr => Array.from(tr.cells).map(td => td.textContent))",
        f"#{table}",
    ))


def sign_in(driver: WebDriver, key: str) -> None:
    from selenium.webdriver.common.by import By

    wait_for(lambda: visible(driver, "login"), "the key prompt")
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()


def csp_violations(driver: WebDriver) -> list[str]:
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"]
    ]


def test_page_asks_for_the_key_then_shows_the_fleet(chromium: WebDriver) -> None:
    with StandIn() as server:
        chromium.get(server.url + "/")
        # No key yet: the prompt, and no API request was made without one.
        wait_for(lambda: visible(chromium, "login"), "the key prompt")
        assert not visible(chromium, "board")
        sign_in(chromium, KEY)
        wait_for(lambda: visible(chromium, "board"), "the dashboard")
        wait_for(lambda: len(rows(chromium, "devices")) == 3, "three device rows")
        devices = {row[0]: row for row in rows(chromium, "devices")}
        assert devices["lab-win-01"][1:4] == ["online", "windows", "LAB-WIN-01"]
        assert devices["lab-win-01"][6] == "1"  # sessions running
        assert devices["kiosk-7"][1] == "offline"
        assert devices["kiosk-7"][7].endswith("ago")  # last seen
        # The constellation is listed apart, with its target.
        assert rows(chromium, "constellations")[0][:3] == ["galaxy-main", "online", "lab-win-01"]
        running = rows(chromium, "running")
        assert running[0][0] == "open-notepad"
        assert running[0][1] == "galaxy-main → lab-win-01"
        assert running[0][4:] == ["3", "click_input"]
        # Tiles: 2 devices online; 24 tasks ended in the hour, every fifth from the fourth failed.
        assert text_of(chromium, "n-devices") == "2"
        assert text_of(chromium, "n-running") == "1"
        assert text_of(chromium, "n-completed") == "19"
        assert text_of(chromium, "n-failed") == "5"
        assert int(chromium.execute_script("return document.querySelectorAll('#chart rect').length")) == 24
        recent = rows(chromium, "recent")
        assert recent[0][:2] == ["running", "open-notepad"]
        assert ["failed", "nightly-check-3"] in [r[:2] for r in recent]
        # A click opens the transcript of that task.
        chromium.execute_script(
            "Array.from(document.querySelectorAll('#recent tbody tr'))"
            ".find(tr => tr.cells[1].textContent === 'nightly-check-3').click()"
        )
        wait_for(lambda: "type_keys" in text_of(chromium, "transcript-steps"), "the transcript")
        assert "element not found" in text_of(chromium, "transcript-meta")
        # The page keeps polling (every 2 s) and the key never travels in a URL.
        seen = len(server.requests)
        wait_for(lambda: len(server.requests) > seen + 4, "the next poll")
        assert all(KEY not in path for path, _ in server.requests)
        api = [headers for path, headers in server.requests if path.startswith("/api/")]
        assert api
        assert all(h.get("Authorization") == f"Bearer {KEY}" for h in api)
        assert csp_violations(chromium) == []


def test_hostile_ids_render_as_text_even_without_csp(chromium: WebDriver) -> None:
    # Without the CSP header the rendering itself must be safe (textContent, never innerHTML);
    # the stand-in also serves a hostile hostname, which only the task history's /api/devices
    # carries. The real server's test below covers the id with the CSP on.
    with StandIn(csp=False) as server:
        chromium.get(server.url + "/dashboard")
        sign_in(chromium, KEY)
        wait_for(lambda: any(r[0] == XSS for r in rows(chromium, "devices")), "the hostile row")
        row = next(r for r in rows(chromium, "devices") if r[0] == XSS)
        assert row[3] == XSS  # hostname, shown literally
        assert chromium.execute_script("return document.querySelectorAll('main img').length") == 0
        time.sleep(0.5)  # give a would-be onerror handler (GET /x → 404) time to fire
        assert chromium.execute_script("return window.__dialogs") == []
        # Control: the dialog trap does catch a dialog.
        chromium.execute_script("alert('canary')")
        assert chromium.execute_script("return window.__dialogs") == ["alert:canary"]


# ------------------------------------------------------------------------- the real server


async def in_browser(function: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking Selenium step in a worker thread; the server keeps serving meanwhile."""
    return await trio.to_thread.run_sync(functools.partial(function, *args))


def device_ids(driver: WebDriver) -> list[str]:
    return [row[0] for row in rows(driver, "devices") if not row[0].startswith("No devices")]


async def test_real_server_devices_a_task_and_a_disconnect(chromium: WebDriver) -> None:
    release = trio.Event()
    tools = ToolRegistry()

    @tools.tool("hold")
    async def hold() -> str:
        """Wait until the test lets the task finish."""
        await release.wait()
        return "released"

    async with open_server(api_key=KEY) as server, trio.open_nursery() as nursery:
        url = f"http://127.0.0.1:{server.port}"
        async with open_device(server.url, "lab-1", api_key=KEY, tools=tools):
            lab2_done = trio.Event()

            async def lab2() -> None:
                async with open_device(server.url, "lab-2", api_key=KEY):
                    await lab2_done.wait()

            nursery.start_soon(lab2)
            async with open_constellation(server.url, "galaxy", api_key=KEY) as galaxy:
                with trio.fail_after(10):
                    while len(server.registry) < 3:
                        await trio.sleep(0.01)

                def load_page_with_a_wrong_key_then_the_right_one() -> None:
                    chromium.get(url + "/")
                    sign_in(chromium, "not-the-key")
                    wait_for(lambda: "401" in text_of(chromium, "login-message"), "the 401")
                    assert "Wrong API key" in text_of(chromium, "login-message")
                    assert not visible(chromium, "board")
                    assert chromium.execute_script("return sessionStorage.length") == 0
                    sign_in(chromium, KEY)
                    wait_for(lambda: visible(chromium, "board"), "the dashboard")
                    wait_for(
                        lambda: {"lab-1", "lab-2"} <= set(device_ids(chromium)), "both devices"
                    )

                await in_browser(load_page_with_a_wrong_key_then_the_right_one)

                outcome: list[Any] = []

                async def run_task() -> None:
                    plan = Plan.of(Command(tool_name="hold"))
                    outcome.append(await galaxy.run_task("lab-1", plan, task_name="nightly-check"))

                nursery.start_soon(run_task)

                def running_row() -> list[str] | None:
                    return next(
                        (r for r in rows(chromium, "running") if r[0] == "nightly-check"), None
                    )

                row = await in_browser(wait_for, running_row, "the running task")
                assert row[1] == "galaxy → lab-1"
                assert text_of(chromium, "n-running") == "1"
                release.set()

                def completed_row() -> list[str] | None:
                    # The task history lists the task while it runs too: wait for its end.
                    return next(
                        (
                            r
                            for r in rows(chromium, "recent")
                            if r[1:2] == ["nightly-check"] and r[0] != "running"
                        ),
                        None,
                    )

                row = await in_browser(wait_for, completed_row, "the completed task")
                assert row[0] == "completed"
                assert rows(chromium, "running")[0][0] == "No session is running."
                assert text_of(chromium, "n-completed") == "1"
                with trio.fail_after(5):  # the constellation's TASK_END, too
                    while not outcome:
                        await trio.sleep(0.01)
                assert outcome[0].status == "completed"

                # lab-2 disconnects: it stays in the list (the task history's /api/devices),
                # marked offline.
                lab2_done.set()

                def lab2_state() -> str | None:
                    row = next((r for r in rows(chromium, "devices") if r[0] == "lab-2"), None)
                    return row[1] if row is not None and row[1] == "offline" else None

                await in_browser(wait_for, lab2_state, "lab-2 to turn offline")
                lab1 = next(r for r in rows(chromium, "devices") if r[0] == "lab-1")
                assert lab1[1] == "online"
                assert text_of(chromium, "n-devices") == "1"  # lab-1 (galaxy is a constellation)
                assert csp_violations(chromium) == []
                # The key never travelled in a URL.
                assert KEY not in chromium.current_url


async def test_real_server_hostile_device_id_renders_as_text(chromium: WebDriver) -> None:
    async with open_server(api_key=KEY) as server:
        async with open_device(server.url, XSS, api_key=KEY):

            def check() -> None:
                chromium.get(f"http://127.0.0.1:{server.port}/dashboard")
                sign_in(chromium, KEY)
                wait_for(lambda: XSS in device_ids(chromium), "the hostile row")
                assert chromium.execute_script("return document.querySelectorAll('main img').length") == 0
                time.sleep(0.5)  # give a would-be onerror handler time to fire
                assert chromium.execute_script("return window.__dialogs") == []
                assert csp_violations(chromium) == []

            await in_browser(check)
