"""benchmarks/trace_exposed.py: exposed communication of a Chrome trace, by exchange range,
against hand-computed overlaps of a small synthetic trace; and the script's command line."""

import json

from tests.bench_import import benchmark_module

tx = benchmark_module("trace_exposed")


def _dev(ts, dur, stream, cat="kernel", name="k"):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def _range(ts, dur, name):
    return {"ph": "X", "cat": "gpu_user_annotation", "name": name, "ts": ts, "dur": dur}


def _trace():
    # Compute stream 7 (the most kernel time): busy [0, 100) and [150, 300) us.
    # Exchange stream 30, in microseconds:
    #   [90, 160) in moe1/dispatch_a2a: covered [90, 100) + [150, 160) -> 50 bare
    #   [300, 340) memcpy in moe1/combine_a2a_bwd (inside moe1/backward): 40 bare
    #   [200, 220) in no exchange range: fully covered -> 0 ("other")
    #   [400, 430) memset in moe3/dispatch_a2a nested in a wider moe3/combine_a2a: innermost
    events = [
        _dev(0, 100, 7),
        _dev(150, 150, 7),
        _dev(90, 70, 30),
        _dev(300, 40, 30, cat="gpu_memcpy"),
        _dev(200, 20, 30),
        _dev(400, 30, 30, cat="gpu_memset"),
        _range(80, 100, "moe1/dispatch_a2a"),
        _range(290, 200, "moe1/backward"),  # not an exchange range: never the attribution
        _range(295, 50, "moe1/combine_a2a_bwd"),
        _range(380, 100, "moe3/combine_a2a"),
        _range(395, 40, "moe3/dispatch_a2a"),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 999, "args": {}},
    ]
    return {"traceEvents": events}


def test_exposed_time_by_innermost_exchange_range():
    res = tx.exposed_by_range(_trace())
    assert res["compute_stream"] == 7
    assert res["exposed_ms"] == {
        "moe1/combine_a2a_bwd": 0.04,
        "moe1/dispatch_a2a": 0.05,
        "moe3/dispatch_a2a": 0.03,
        "other": 0.0,
    }
    assert res["total_ms"] == 0.12 and res["comm_ms"] == 0.16


def test_a_trace_without_device_events_reports_nothing():
    res = tx.exposed_by_range({"traceEvents": [_range(0, 10, "moe1/dispatch_a2a")]})
    assert res == {"compute_stream": None, "exposed_ms": {}, "total_ms": 0.0, "comm_ms": 0.0}


def test_command_line_prints_the_table_and_json(tmp_path, capsys):
    path = tmp_path / "t.json"
    path.write_text(json.dumps(_trace()))
    assert tx.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "moe1/dispatch_a2a" in out and "0.120 ms exposed" in out
    assert tx.main([str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_ms"] == 0.12
    assert tx.main([str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
