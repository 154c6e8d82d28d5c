"""Fixtures for the dashboard tests: a run root trained by `braid train` (two short runs that
differ in the learning rate, the second with the overlap report on), and this folder on
sys.path for dash_runs.py and dash_browser.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from dash_runs import ENV, train_command  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A run root with finished runs `a` (30 steps) and `b` (30 steps, lr 1e-3, overlap report)."""
    root = tmp_path_factory.mktemp("dash") / "runs"
    for name, extra in (("a", []), ("b", ["--train.lr=1e-3", "--overlap.report=true"])):
        cmd = train_command(root, name, 30, *extra)
        proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return root
