"""Issue 12: the dashboard page in a real headless Chromium, against a stand-in of the JSON API.

The stand-in (tests/browser.py) serves the package's own files with the headers of
`ufo_trio._dashboard` and answers the contract of /work/notes/api_contract.md with fixed data.
The same checks against the real server, with devices connected, are phase 2.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from browser import KEY, XSS, StandIn

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


@pytest.mark.parametrize("csp", [True, False], ids=["with-csp", "without-csp"])
def test_hostile_ids_render_as_text(chromium: WebDriver, csp: bool) -> None:
    # Without the CSP header the rendering itself must be safe (textContent, never innerHTML).
    with StandIn(csp=csp) as server:
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


def test_wrong_key_shows_a_clear_message(chromium: WebDriver) -> None:
    with StandIn() as server:
        chromium.get(server.url + "/")
        sign_in(chromium, "not-the-key")
        wait_for(lambda: "401" in text_of(chromium, "login-message"), "the 401 message")
        assert "Wrong API key" in text_of(chromium, "login-message")
        assert not visible(chromium, "board")
        # The wrong key is not kept; the right one then works.
        assert chromium.execute_script("return sessionStorage.length") == 0
        sign_in(chromium, KEY)
        wait_for(lambda: visible(chromium, "board"), "the dashboard")
        assert text_of(chromium, "login-message") == ""


def test_falls_back_to_clients_and_sessions(chromium: WebDriver) -> None:
    # A server without the task history (404 on /api/devices and /api/tasks).
    with StandIn(history=False) as server:
        chromium.get(server.url + "/")
        sign_in(chromium, KEY)
        wait_for(lambda: visible(chromium, "board"), "the dashboard")
        wait_for(lambda: len(rows(chromium, "running")) == 1, "the running session")
        assert rows(chromium, "running")[0][:2] == ["open-notepad", "galaxy-main → lab-win-01"]
        ids = [r[0] for r in rows(chromium, "devices")]
        assert "lab-win-01" in ids
        assert XSS in ids
        assert "task history" in rows(chromium, "recent")[0][0]
