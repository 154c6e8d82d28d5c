"""One spawn of 4 gloo ranks runs the rank-side checks of every test module in this directory.

Start-up costs seconds per spawn on a small CI machine, so the test modules do not spawn
themselves: each exposes `rank_checks(rank, world, run_dir)`, `run_all` calls them in order on
every rank, and the session fixture `four_ranks` (conftest.py) hands the results to the tests.
"""

from __future__ import annotations

WORLD = 4


def run_all(rank: int, world: int, run_dir: str) -> dict:
    import test_fp8_ep
    import test_moe_layer_ep
    import test_train_ep

    return {
        "layer": test_moe_layer_ep.rank_checks(rank, world, run_dir),
        "train": test_train_ep.rank_checks(rank, world, run_dir),
        "fp8": test_fp8_ep.rank_checks(rank, world, run_dir),
    }
