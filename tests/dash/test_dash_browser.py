"""The page in a real headless Chromium while `braid train` runs: the loss plot's point count
grows as the run writes, the screenshot is not blank, every resource comes from the dashboard's
own origin, and a run name made of HTML shows as text."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from dash_browser import (
    chromium_paths,
    open_browser,
    plot_points,
    screenshot,
    serve_in_thread,
    wait_for,
)
from dash_runs import ENV, register_run, train_command

pytestmark = pytest.mark.skipif(
    chromium_paths() is None,
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them): "
    "apt-get install chromium chromium-driver",
)
EVIL = '<img id="injected" src="x" onerror="document.title=\'pwned\'">'


def test_page_draws_a_run_while_it_trains(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    register_run(root, "evil", name=EVIL)
    # trains until stopped; metrics reach the disk every 0.3 s
    cmd = train_command(root, "live", 100_000, "--metrics.flush_seconds=0.3",
                        "--train.val_every=20")  # fmt: skip
    train = subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    url, stop = serve_in_thread(root, poll_ms=300)
    driver = open_browser(tmp_path / "profile")
    try:
        driver.get(url + "?run=live")
        first = wait_for(lambda: plot_points(driver, "plot-loss"), 180, "the first loss points")
        grown = wait_for(
            lambda: (n := plot_points(driver, "plot-loss")) >= first + 10 and n, 120, "growth"
        )
        assert grown > first
        for panel in ("plot-lr", "plot-grad_norm", "plot-load-0-1", "plot-imbalance"):
            assert plot_points(driver, panel) > 0, panel
        assert driver.execute_script("return document.getElementById('plot-fp8').hidden")

        img = screenshot(driver)
        assert img.shape[0] > 500 and img.shape[1] > 1000
        assert len(np.unique(img.reshape(-1, 3), axis=0)) > 100  # not one flat colour
        rect = driver.find_element("id", "plot-loss").rect
        plot = img[int(rect["y"]) : int(rect["y"] + rect["height"]),
                   int(rect["x"]) : int(rect["x"] + rect["width"])]  # fmt: skip
        drawn = (plot.min(axis=2) < 200).mean()  # pixels darker than the light grid lines
        assert drawn > 0.01, drawn

        origin = url.rstrip("/")
        resources = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert any(r.endswith("/static/plotly.min.js") for r in resources)
        assert all(r.startswith(origin + "/") for r in resources), resources
        # (404s for the run before it registers are network entries, expected)
        log = driver.get_log("browser")
        errors = [e for e in log if e["level"] == "SEVERE" and e["source"] != "network"]
        assert not errors, errors

        rows = driver.execute_script(
            "return [...document.querySelectorAll('#runs tbody tr')].map(r => r.textContent)"
        )
        assert any(EVIL in r for r in rows), rows
        assert driver.execute_script("return document.getElementById('injected')") is None
        assert driver.title == "braid dash"
    finally:
        driver.quit()
        stop()
        train.send_signal(signal.SIGTERM)
        _, err = train.communicate(timeout=120)
    assert train.returncode == 143, err[-2000:]
    assert "metrics not written" not in err  # the page's reads never cost the run a write
