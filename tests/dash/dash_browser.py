"""Headless Chromium for the dashboard tests: Debian's chromium + chromedriver through selenium.

Contract: `chromium_paths()` is (chromium, chromedriver) or None when either is missing;
`open_browser(profile_dir)` starts a fresh headless browser (no network services of its own,
a new profile in `profile_dir`) and the caller quits it; `serve_in_thread(root)` runs the
dashboard on a free loopback port and returns (url, stop). No browser is ever downloaded: the
driver path is given, so selenium's driver manager never runs.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1900",
    "--hide-scrollbars",
)


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def open_browser(profile_dir: Path) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    assert paths is not None, "chromium and chromedriver are needed"
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for flag in FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={profile_dir}")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=paths[1]))


def serve_in_thread(root: Path, poll_ms: int = 500) -> tuple[str, Callable[[], None]]:
    from werkzeug.serving import make_server

    from braid.dash.app import create_app

    server = make_server("127.0.0.1", 0, create_app(root, poll_ms=poll_ms), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    return f"http://127.0.0.1:{server.port}/", stop


def plot_points(driver: Any, plot_id: str) -> int:
    """Points of the first trace Plotly holds for the element `plot_id` (0 if none yet)."""
    return int(
        driver.execute_script(
            "const d = document.getElementById(arguments[0]);"
            "return d && d.data && d.data.length ? d.data[0].x.length : 0;",
            plot_id,
        )
    )
