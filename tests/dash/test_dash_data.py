"""The dashboard's endpoints against runs made by `braid train`, against the full readers of
braid.metrics (the report's path) as the reference: series, smoothing, expert load, overlap,
config diff; incremental reads while a writer appends; a locked file; ids that try to leave the
run root; the loopback-only host check; the CLI's bind and missing-extras refusals."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from dash_runs import ENV, register_run

from braid.dash import data as dash_data
from braid.dash.app import create_app
from braid.metrics import (
    ExperimentsDB,
    MetricsWriter,
    metrics_path,
    names,
    queries,
    read_expert_load,
    read_metrics,
)


def _none_nan(values: list) -> list[float]:
    return [math.nan if v is None else v for v in values]


def _same(got: list, want) -> None:
    np.testing.assert_array_equal(np.array(_none_nan(got), dtype=float), np.asarray(want, float))


@pytest.fixture(scope="module")
def client(trained):
    return create_app(trained).test_client()


def test_runs_lists_the_registry(client, trained) -> None:
    got = client.get("/api/runs").get_json()["runs"]
    want = ExperimentsDB(trained).list_runs()
    assert [r["id"] for r in got] == [r["id"] for r in want][::-1] == ["b", "a"]
    for g, w in zip(got, want[::-1], strict=True):
        assert g["status"] == w["status"] == "finished"
        assert g["step"] == w["step"] == 30
        assert g["last_loss"] == w["last_loss"] and 0 < g["last_loss"] < 10


def test_series_and_load_match_the_full_readers(client, trained) -> None:
    for run in ("a", "b"):
        answer = client.get(f"/api/data?run={run}").get_json()
        assert not answer["stale"] and answer["note"] is None and answer["last_step"] == 30
        want = read_metrics(trained / run)
        plotted = {n for n in want if names.overlap_parts(n) is None}
        assert set(answer["series"]) == plotted
        for name in plotted:
            s = answer["series"][name]
            assert s["x"] == [step for step, _ in want[name]], name
            _same(s["y"], [v for _, v in want[name]])
            if name in (names.TRAIN_LOSS, names.GRAD_NORM):  # smoothed panels
                _same(s["smooth"], queries.smooth(np.array([v for _, v in want[name]])))
        loads = read_expert_load(trained / run)
        assert [entry["layer"] for entry in answer["load"]] == sorted(loads) == [1, 2]
        for entry in answer["load"]:
            steps, grid = loads[entry["layer"]]
            assert entry["x"] == steps.tolist() and len(entry["z"]) == grid.shape[1] == 8
            for e, row in enumerate(entry["z"]):
                _same(row, grid[:, e])
            ratio = [max(r) / (sum(r) / len(r)) for r in grid.tolist()]
            np.testing.assert_allclose(_none_nan(entry["imbalance"]["y"]), ratio, rtol=1e-12)


def test_the_names_module_matches_what_the_trainer_logs(client) -> None:
    series = client.get("/api/data?run=a").get_json()["series"]
    panels = {p.metric for p in names.SERIES_PANELS} - {names.MFU}  # MFU needs a known GPU
    assert panels | {names.TRAIN_LOSS, names.VAL_LOSS} <= set(series)
    layout = client.get("/api/layout").get_json()
    assert [p["metric"] for p in layout["panels"]] == [p.metric for p in names.SERIES_PANELS]


def test_overlap_table_is_the_median_per_layer(client, trained) -> None:
    assert client.get("/api/data?run=a").get_json()["overlap"] == []  # report off
    got = client.get("/api/data?run=b").get_json()["overlap"]
    want = read_metrics(trained / "b")
    assert [o["layer"] for o in got] == [1, 2]
    for o in got:
        for kind in (names.OVERLAP_EXCHANGE, names.OVERLAP_EXPOSED):
            vals = sorted(v for _, v in want[names.overlap_name(kind, o["layer"])])
            n = len(vals)
            median = vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2
            assert o[kind] == pytest.approx(median, rel=1e-12)
        assert o["hidden_ms"] == pytest.approx(max(o["exchange_ms"] - o["exposed_ms"], 0.0))


def test_config_diff_lists_exactly_the_keys_that_differ(client, trained) -> None:
    got = client.get("/api/diff?a=a&b=b").get_json()["diff"]
    db = ExperimentsDB(trained)
    ca, cb = (dash_data._flatten(db.get_run(r)["config"]) for r in ("a", "b"))
    want = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
    assert [d["key"] for d in got] == want
    assert {"train.lr", "overlap.report", "run.name"} <= set(want)
    lr = next(d for d in got if d["key"] == "train.lr")
    assert lr["a"] == 3e-3 and lr["b"] == 1e-3
    assert client.get("/api/diff?a=a&b=a").get_json()["diff"] == []


def _synthetic_step(w: MetricsWriter, step: int, rng: np.random.Generator, scale: float) -> None:
    w.log(step, {"train/loss": scale * step + 0.5, "train/lr": 1e-3, "fp8/amax/layer0": 2.0})
    for layer in (0, 3):
        share = rng.random(4) + 0.1
        w.log_expert_load(step, layer, share / share.sum())


def test_incremental_reads_equal_a_full_read_across_flushes_and_a_resume(tmp_path) -> None:
    register_run(tmp_path, "syn")
    run = tmp_path / "syn"
    data = dash_data.DashData(tmp_path, min_read_interval_s=0)
    rng = np.random.default_rng(0)

    def check() -> None:
        answer = data.run_data("syn")
        want = read_metrics(run)
        assert set(answer["series"]) == set(want)
        for name, series in want.items():
            assert answer["series"][name]["x"] == [s for s, _ in series], name
            _same(answer["series"][name]["y"], [v for _, v in series])
        loads = read_expert_load(run)
        assert [e["layer"] for e in answer["load"]] == sorted(loads)
        for e in answer["load"]:
            steps, grid = loads[e["layer"]]
            assert e["x"] == steps.tolist()
            _same([x for row in e["z"] for x in row], grid.T.ravel())

    with MetricsWriter(run, 0) as w:
        for step in range(1, 11):
            _synthetic_step(w, step, rng, 1.0)
            if step % 4 == 0:
                w.flush()
                check()
        w.log(11, {"train/loss": math.nan})
        w.flush()
        check()
    time.sleep(0.01)
    with MetricsWriter(run, 0) as w:  # a resume from step 6: steps 7.. logged again
        for step in range(7, 14):
            _synthetic_step(w, step, rng, 2.0)
        w.flush()
        check()
    assert data.run_data("syn")["series"]["train/loss"]["y"][-1] == 2.0 * 13 + 0.5


def test_a_locked_file_answers_the_last_data_at_once(tmp_path) -> None:
    register_run(tmp_path, "busy")
    run = tmp_path / "busy"
    data = dash_data.DashData(tmp_path, min_read_interval_s=0)
    with MetricsWriter(run, 0) as w:
        w.log(1, {"train/loss": 3.0})
    assert data.run_data("busy")["series"]["train/loss"]["x"] == [1]
    with MetricsWriter(run, 0) as w:
        w.log(2, {"train/loss": 2.0})
    # another process holds the file open for writing, as the trainer does during a flush
    hold = subprocess.Popen(
        [sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
         "print('held', flush=True); time.sleep(60)", str(metrics_path(run))],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert hold.stdout.readline().strip() == "held"
        start = time.monotonic()
        answer = data.run_data("busy")
        took = time.monotonic() - start
        assert answer["stale"] and "busy" in answer["note"]
        assert answer["series"]["train/loss"]["x"] == [1]  # the last data read
        assert took < dash_data.LOCK_WAIT_S + 1.0
    finally:
        hold.kill()
        hold.wait()
    answer = data.run_data("busy")
    assert not answer["stale"] and answer["series"]["train/loss"]["x"] == [1, 2]


def test_a_file_is_read_at_most_once_per_interval(tmp_path) -> None:
    register_run(tmp_path, "often")
    data = dash_data.DashData(tmp_path, min_read_interval_s=60.0)
    with MetricsWriter(tmp_path / "often", 0) as w:
        w.log(1, {"train/loss": 3.0})
        w.flush()
        first = data.run_data("often")
        w.log(2, {"train/loss": 2.0})
        w.flush()
        soon = data.run_data("often")  # the file changed, but it was read just now
        data.min_read_interval_s = 0.0  # the interval has passed
        later = data.run_data("often")
    assert first["series"]["train/loss"]["x"] == soon["series"]["train/loss"]["x"] == [1]
    assert soon["read_at"] == first["read_at"] and not soon["stale"]
    assert later["series"]["train/loss"]["x"] == [1, 2]


def test_a_page_holding_the_latest_read_gets_unchanged(tmp_path) -> None:
    register_run(tmp_path, "u")
    client = create_app(tmp_path).test_client()
    with MetricsWriter(tmp_path / "u", 0) as w:
        w.log(1, {"train/loss": 3.0})
    first = client.get("/api/data?run=u").get_json()
    same = client.get(f"/api/data?run=u&have={first['read_at']!r}").get_json()
    assert same["unchanged"] and "series" not in same and same["read_at"] == first["read_at"]
    old = client.get(f"/api/data?run=u&have={first['read_at'] - 1!r}").get_json()
    assert not old["unchanged"] and old["series"] == first["series"]
    assert client.get("/api/data?run=u&have=soon").status_code == 400


def test_ids_that_leave_the_run_root_are_refused(tmp_path) -> None:
    root, outside = tmp_path / "runs", tmp_path / "outside"
    with MetricsWriter(outside / "secret", 0) as w:
        w.log(1, {"train/loss": 123.0})
    root.mkdir()
    (root / "link").symlink_to(outside / "secret")  # a run dir that is a symlink out
    (root / "metalink").mkdir()
    (root / "metalink" / "metrics").symlink_to(outside / "secret" / "metrics")
    evil = ["../outside/secret", str(outside / "secret"), "a/../../outside/secret", "link",
            "metalink", "./link", "a\\..\\b", ""]  # fmt: skip
    for run_id in evil[:-1]:
        register_run(root, run_id)
    client = create_app(root).test_client()
    for run_id in evil:
        resp = client.get("/api/data", query_string={"run": run_id})
        assert resp.status_code == 400, (run_id, resp.get_json())
        assert b"123" not in resp.data
        if run_id not in ("link", "metalink"):  # a diff reads the registry, not the files
            resp = client.get("/api/diff", query_string={"a": run_id, "b": "link"})
            assert resp.status_code == 400, run_id
    assert client.get("/api/data?run=never-registered").status_code == 404
    assert client.get("/api/data?run=link&rank=x").status_code == 400
    assert client.get("/static/..%2fdata.py").status_code == 404


def test_run_names_travel_as_json_text(tmp_path) -> None:
    name = '<img src=x onerror="document.title=1">'
    register_run(tmp_path, "x", name=name)
    resp = create_app(tmp_path).test_client().get("/api/runs")
    assert resp.content_type == "application/json"
    assert resp.get_json()["runs"][0]["name"] == name


def test_loopback_server_refuses_other_host_headers(trained) -> None:
    local = create_app(trained).test_client()
    assert local.get("/api/runs", headers={"Host": "127.0.0.1:8050"}).status_code == 200
    assert local.get("/api/runs", headers={"Host": "[::1]:8050"}).status_code == 200
    assert local.get("/api/runs", headers={"Host": "attacker.example:8050"}).status_code == 403
    remote = create_app(trained, local_only=False).test_client()
    assert remote.get("/api/runs", headers={"Host": "box.example:8050"}).status_code == 200
    page = local.get("/")
    assert "default-src 'self'" in page.headers["Content-Security-Policy"]
    assert re.findall(r'src="([^"]+)"', page.get_data(as_text=True)) == [
        "static/plotly.min.js",
        "static/app.js",
    ]
    import plotly

    bundle = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert local.get("/static/plotly.min.js").data == bundle.read_bytes()


def _braid(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "braid", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # fmt: skip


def test_cli_serves_loopback_and_refuses_a_remote_bind_without_the_flag(trained) -> None:
    refused = _braid("dash", str(trained), "--host", "0.0.0.0")
    out, err = refused.communicate(timeout=60)
    assert refused.returncode == 2 and out == ""
    assert len(err.splitlines()) == 1 and "--allow-remote" in err
    for host, remote in (("127.0.0.1", False), ("0.0.0.0", True)):
        extra = ["--allow-remote"] if remote else []
        proc = _braid("dash", str(trained), "--host", host, "--port", "0", *extra)
        try:
            lines = [proc.stderr.readline() for _ in range(2 if remote else 1)]
            assert lines[-1].startswith("braid dash: "), lines
            assert ("without authentication" in lines[0]) == remote
            port = int(re.search(r":(\d+)/", lines[-1]).group(1))
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=30) as r:
                assert [x["id"] for x in json.load(r)["runs"]] == ["b", "a"]
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_a_port_out_of_range_or_in_use_is_one_line(trained) -> None:
    """The socket is bound before werkzeug sees it: its own exit (two lines, code 1) and the
    wrap-around of a port above 65535 never reach the user."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        in_use = str(taken.getsockname()[1])
        for port, want in (
            ("99999", "--port 99999: expected 0..65535"),
            ("-1", "--port -1: expected 0..65535"),
            (in_use, f"cannot listen on 127.0.0.1:{in_use}: "),
        ):
            proc = _braid("dash", str(trained), "--port", port)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 2 and out == "", err
            assert err.count("\n") == 1 and err.startswith("error: ") and want in err, err
    finally:
        taken.close()


def test_cli_without_the_extras_says_how_to_install_them(tmp_path) -> None:
    code = "import sys; sys.modules['flask'] = None; from braid.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, "dash", str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "pip install braid[dash]" in proc.stderr
    assert "flask" in proc.stderr
