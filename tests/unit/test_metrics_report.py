"""write_report: HTML and PNGs from synthetic metrics, skipped sections, user errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import numpy as np
import pytest

from braid.errors import BraidError
from braid.metrics import MetricsWriter, metrics_path, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _synthetic_run(run: Path, steps: int = 60, layers: int = 2, experts: int = 4) -> None:
    rng = np.random.default_rng(0)
    with MetricsWriter(run, 0, flush_every=25) as w:
        for s in range(1, steps + 1):
            w.log(
                s,
                {
                    "train/loss": 3.0 * math.exp(-s / 30) + 2.0 + rng.normal(0, 0.05),
                    "train/lr": 1e-3 * min(1.0, s / 10),
                    "train/tokens_per_s": 1e4 + rng.normal(0, 100),
                    "train/grad_norm": 1.0 + rng.random(),
                },
            )
            if s % 20 == 0:
                w.log(s, {"val/loss": 3.0 * math.exp(-s / 30) + 2.1})
            if s % 5 == 0:
                for layer in range(layers):
                    share = rng.random(experts) + 0.5
                    w.log_expert_load(s, layer, share / share.sum())
                    w.log(
                        s,
                        {
                            f"overlap/exchange_ms/layer{layer}": 2.0,
                            f"overlap/exposed_ms/layer{layer}": 0.5,
                        },
                    )
    (run / "config.json").write_text(json.dumps({"run": {"name": "synthetic <moe>"}}))
    (run / "summary.json").write_text(json.dumps({"final_val_loss": 2.34567}))


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_full_report(tmp_path: Path) -> None:
    _synthetic_run(tmp_path)
    path = write_report(tmp_path)
    assert path == tmp_path / "report.html"
    page = path.read_text()
    for png in (
        "loss.png",
        "lr.png",
        "tokens_per_s.png",
        "grad_norm.png",
        "expert_load.png",
        "expert_imbalance.png",
    ):
        assert _is_png(tmp_path / "report" / png), png
        assert f'src="report/{png}"' in page
    assert "synthetic &lt;moe&gt;" in page  # config shown, escaped
    assert "2.34567" in page  # summary.json
    assert "Communication per layer" in page and "75.0%" in page  # 0.5 of 2.0 ms exposed
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "report").glob(".*"))


def test_sections_without_metrics_are_skipped(tmp_path: Path) -> None:
    report = tmp_path / "report"
    report.mkdir()
    (report / "expert_load.png").write_bytes(PNG_MAGIC)  # left by an older report
    with MetricsWriter(tmp_path, 0) as w:
        for s in range(5):
            w.log(s, {"train/loss": 5.0 - s})
    page = write_report(tmp_path).read_text()
    assert _is_png(report / "loss.png")
    assert sorted(p.name for p in report.iterdir()) == ["loss.png"]
    assert "expert_load" not in page and "Communication" not in page and "Config" not in page


def test_empty_run_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(BraidError, match="no metrics"):
        write_report(tmp_path)
    path = metrics_path(tmp_path, 0)
    path.parent.mkdir(parents=True)
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE metrics (step BIGINT, name VARCHAR, value DOUBLE, wall_time DOUBLE)")
    con.close()
    with pytest.raises(BraidError, match="no metrics rows"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_every_names_panel_the_run_logged_gets_a_png(tmp_path: Path) -> None:
    from braid.metrics import names

    with MetricsWriter(tmp_path, 0) as w:
        for s in range(30):
            w.log(s, {p.metric: 1.0 + s % 3 for p in names.SERIES_PANELS})
    page = write_report(tmp_path).read_text()
    for p in names.SERIES_PANELS:
        assert _is_png(tmp_path / "report" / p.file), p.file
        assert f'src="report/{p.file}"' in page and p.title in page
