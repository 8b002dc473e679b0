"""Take docs/img/dashboard.png: `python tests/screenshot.py [--out PATH]`.

Phase 1 shoots the page against the stand-in API of tests/browser.py (fixed, realistic data);
phase 2 retakes it against the real server with devices connected. Needs Debian's chromium and
chromium-driver (.ci/run installs them).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from browser import KEY, StandIn, browser_missing, launch_chromium

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "dashboard.png")
    args = parser.parse_args()
    reason = browser_missing()
    if reason is not None:
        print(f"screenshot: {reason}", file=sys.stderr)
        return 1
    profile = tempfile.mkdtemp(prefix="ufo-trio-shot-")
    driver = launch_chromium(profile)
    try:
        with StandIn() as server:
            driver.set_window_size(1366, 1000)
            driver.get(server.url + "/")
            driver.execute_script("sessionStorage.setItem('ufo_trio.api_key', arguments[0])", KEY)
            driver.get(server.url + "/")
            deadline = time.monotonic() + 15
            while not driver.execute_script(
                "return document.querySelectorAll('#devices tbody tr').length >= 3"
            ):
                if time.monotonic() > deadline:
                    print("screenshot: the dashboard did not render", file=sys.stderr)
                    return 1
                time.sleep(0.1)
            height = int(driver.execute_script("return document.documentElement.scrollHeight"))
            driver.set_window_size(1366, min(height + 40, 2400))
            time.sleep(0.3)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
