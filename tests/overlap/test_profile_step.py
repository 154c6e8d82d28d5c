"""overlap_sim's `--profile` arithmetic (benchmarks/overlap_modes.py): which profiler events
count as the device's work, and the union of their intervals (busy time)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bench_import import benchmark_module


@pytest.fixture(scope="module")
def modes():
    return benchmark_module("overlap_modes")


def event(start, end, device="CUDA", annotation=False):
    return SimpleNamespace(
        time_range=SimpleNamespace(start=start, end=end),
        device_type=getattr(torch.autograd.DeviceType, device),
        is_user_annotation=annotation,
    )


def test_device_spans_keep_kernels_and_drop_host_ops_and_annotation_ranges(modes):
    events = [
        event(50, 60),
        event(0, 10),
        event(0, 100, annotation=True),  # a record_function range on the device: not work
        event(5, 95, device="CPU"),  # a host op
    ]
    assert modes.device_spans(events) == [(0, 10), (50, 60)]


def test_union_merges_overlapping_streams_and_keeps_gaps(modes):
    assert modes.union_us([]) == 0.0
    assert modes.union_us([(0, 10), (5, 20), (30, 40), (35, 36)]) == 30.0  # [0,20] + [30,40]
    assert modes.union_us([(0, 10), (10, 20)]) == 20.0


def test_profile_step_on_cpu_times_the_host_and_records_no_device_work(modes):
    calls = []
    p = modes.profile_step(lambda: calls.append(torch.ones(64).sum()), torch.device("cpu"))
    assert len(calls) == 1 and p["wall_ms"] >= p["host_ms"] > 0
    assert p["kernel_ms"] == p["busy_ms"] == p["idle_ms"] == p["kernels"] == 0
