"""The shared spawn of this directory (see spawn.py): run once per session, on first use."""

from __future__ import annotations

import pytest
from spawn import WORLD, run_all

from harness import run_ranks


@pytest.fixture(scope="session")
def four_ranks(tmp_path_factory) -> tuple[list[dict], str]:
    """(results of every rank, the run directory the ranks wrote checkpoints into)."""
    run_dir = str(tmp_path_factory.mktemp("ep_run"))
    return run_ranks(run_all, WORLD, run_dir), run_dir
