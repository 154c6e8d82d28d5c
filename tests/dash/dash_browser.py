"""Headless Chromium for the dashboard tests: Debian's chromium + chromedriver through selenium.

Contract: `chromium_paths()` is (chromium, chromedriver) or None when either is missing;
`open_browser(profile_dir)` starts a fresh headless browser (no network services of its own,
a new profile in `profile_dir`) and the caller quits it; `serve_in_thread(root)` runs the
dashboard on a free loopback port and returns (url, stop). No browser is ever downloaded: the
driver path is given, so selenium's driver manager never runs.

Run as a script it writes the README's screenshot of a real run:
    PYTHONPATH=src python tests/dash/dash_browser.py docs/dash.png
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

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


def wait_for(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `fn` every 0.2 s until it returns something truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def screenshot(driver: Any) -> np.ndarray:
    """The browser's viewport as an RGB array [H, W, 3]."""
    from PIL import Image

    png = driver.get_screenshot_as_png()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def main() -> None:
    """Write the README's screenshot: two runs of a few hundred steps trained on the CPU that
    differ in the learning rate, both picked, after training (a real run, not a mock-up)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for harness
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import argparse
    import subprocess
    import tempfile

    from dash_runs import ENV, train_command
    from PIL import Image

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("out", type=Path, help="the PNG to write, e.g. docs/dash.png")
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    out = args.out.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)  # the page shows the root as given: a relative name, no machine path
        for name, extra in (("lr3e-3", []), ("lr1e-3", ["--train.lr=1e-3"])):
            cmd = train_command(Path("runs"), name, args.steps, "--train.val_every=25", *extra)
            subprocess.run(cmd, env=ENV, check=True, capture_output=True)
        url, stop = serve_in_thread(Path("runs"))
        driver = open_browser(Path(tmp) / "profile")
        try:
            driver.set_window_size(1400, 2250)
            driver.get(url + "?run=lr3e-3&run=lr1e-3")
            wait_for(lambda: plot_points(driver, "plot-loss") >= args.steps, 60, "the loss plot")
            time.sleep(2)  # let Plotly finish its layout
            img = Image.fromarray(screenshot(driver))
        finally:
            driver.quit()
            stop()
    img.quantize(colors=96, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
