"""Take docs/img/dashboard.png: `python tests/screenshot.py [--out PATH]`.

Runs the REAL server (`ufo_trio.testing.open_server`, 127.0.0.1, a free port) with real SDK
devices and a constellation (`ufo_trio.client`), opens the dashboard in headless Chromium with the
key, runs a few tasks while the page watches (two complete, one fails, one is still running when
the picture is taken) and saves the screenshot. Needs Debian's chromium and chromium-driver
(.ci/run installs them). Takes about 15 s.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import KEY, browser_missing, launch_chromium

from ufo_trio.client import (
    Command,
    Plan,
    ToolError,
    ToolRegistry,
    default_tools,
    open_constellation,
    open_device,
)
from ufo_trio.testing import open_server

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

ROOT = Path(__file__).resolve().parent.parent


def wait_for(driver: WebDriver, script: str, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not driver.execute_script(script):
        if time.monotonic() > deadline:
            rows = driver.execute_script(
                "return Array.from(document.querySelectorAll('tbody tr')).map(tr => tr.textContent)"
            )
            raise RuntimeError(f"the dashboard did not show {what}: {rows}")
        time.sleep(0.1)


def running(name: str) -> str:
    return (
        "return Array.from(document.querySelectorAll('#running tbody tr'))"
        f".some(tr => tr.cells[0].textContent === {name!r})"
    )


def ended(name: str) -> str:
    return (
        "return Array.from(document.querySelectorAll('#recent tbody tr'))"
        f".some(tr => tr.cells.length > 1 && tr.cells[1].textContent === {name!r}"
        " && tr.cells[0].textContent !== 'running')"
    )


async def shoot(driver: WebDriver, out: Path) -> None:
    gates = {name: trio.Event() for name in ("inventory", "update-agent", "nightly-check", "report")}
    tools: ToolRegistry = default_tools()

    @tools.tool("step", tool_type="action")
    async def step(gate: str, fail: bool = False) -> str:
        """Wait until the script lets this step finish."""
        await gates[gate].wait()
        if fail:
            raise ToolError("installer exited with status 1603")
        return "ok"

    in_browser = trio.to_thread.run_sync

    async with open_server(api_key=KEY) as server:
        url = f"http://127.0.0.1:{server.port}/"
        async with (
            open_device(server.url, "lab-win-01", api_key=KEY, tools=tools, platform="windows"),
            open_device(server.url, "lab-linux-02", api_key=KEY, tools=tools, platform="linux"),
            open_device(server.url, "kiosk-07", api_key=KEY, tools=tools, platform="windows"),
            open_constellation(server.url, "galaxy-main", api_key=KEY) as galaxy,
            trio.open_nursery() as nursery,  # the tasks end before the constellation closes
        ):

            def open_page() -> None:
                driver.set_window_size(1366, 1000)
                driver.get(url)
                driver.execute_script(
                    "sessionStorage.setItem('ufo_trio.api_key', arguments[0])", KEY
                )
                driver.get(url)
                wait_for(
                    driver,
                    "return document.querySelectorAll('#devices tbody tr').length >= 3",
                    "the devices",
                )

            await in_browser(open_page)

            async def run(device: str, name: str, fail: bool = False) -> None:
                plan = Plan.of(Command(tool_name="step", parameters={"gate": name, "fail": fail}))
                await galaxy.run_task(device, plan, task_name=name)

            try:
                tasks: list[tuple[str, str, bool]] = [
                    ("lab-win-01", "inventory", False),
                    ("kiosk-07", "update-agent", True),
                    ("lab-linux-02", "nightly-check", False),
                    ("lab-win-01", "report", False),
                ]
                for device, name, fail in tasks:
                    nursery.start_soon(run, device, name, fail)
                    await in_browser(functools.partial(wait_for, driver, running(name), name))
                for _, name, _ in tasks[:3]:  # "report" is still running in the picture
                    gates[name].set()
                    await in_browser(functools.partial(wait_for, driver, ended(name), name))

                def take() -> None:
                    script = "return document.documentElement.scrollHeight"
                    height = int(driver.execute_script(script))
                    driver.set_window_size(1366, min(height + 40, 2400))
                    time.sleep(0.5)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    driver.save_screenshot(str(out))

                await in_browser(take)
            finally:  # let every task end, even after an error, so the blocks can close
                for gate in gates.values():
                    gate.set()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    args = parser.parse_args()
    reason = browser_missing()
    if reason is not None:
        print(f"screenshot: {reason}", file=sys.stderr)
        return 1
    profile = tempfile.mkdtemp(prefix="ufo-trio-shot-")
    driver: Any = launch_chromium(profile)
    try:
        trio.run(shoot, driver, args.out)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
