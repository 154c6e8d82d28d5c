"""Layouts that cannot work are refused up front, in one line that names the value and the fix.

No processes are spawned: the checks run where the world size is known (`check_layout`, called
by init_distributed before any rendezvous), in `init_parallel` (no torchrun) and in config
validation; `braid info` applies the same rules to the layout named on its command line.
"""

from __future__ import annotations

import pytest

from braid.config import load_config
from braid.errors import BraidError, ConfigError
from braid.info import memory_per_gpu
from braid.parallel.distributed import init_parallel
from braid.parallel.mesh import check_layout, expert_shard_dim


@pytest.mark.parametrize(
    ("overrides", "world", "match"),
    [
        (["--parallel.ep=4"], 6, r"parallel\.ep=4: must divide the world size 6 .* 1, 2, 3, 6"),
        (["--train.batch_size=10"], 4, r"train\.batch_size=10: must be divisible by .* 4\*1"),
        (["--train.batch_size=8", "--train.grad_accum=4"], 4, r"batch_size=8: .* = 4\*4"),
        (["--parallel.ep=2", "--moe.num_experts=0"], 2, r"parallel\.ep=2: needs routed experts"),
    ],
)
def test_bad_layout_is_refused_with_the_fix(overrides, world, match):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=match) as e:
        check_layout(cfg, world)
    assert "\n" not in str(e.value)


def test_good_layout_passes():
    check_layout(load_config(None, ["--parallel.ep=4", "--train.batch_size=16"]), 8)


def test_ep_not_dividing_experts_is_a_config_error():
    with pytest.raises(ConfigError, match=r"parallel\.ep=3: must divide moe\.num_experts=8"):
        load_config(None, ["--parallel.ep=3"])


def test_ep_without_torchrun_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(BraidError, match=r"torchrun --nproc_per_node=2"):
        init_parallel(load_config(None, ["--parallel.ep=2"]))


def test_info_refuses_a_bad_layout():
    cfg = load_config(None, [])
    with pytest.raises(BraidError, match=r"--ep=3 must divide moe\.num_experts=8"):
        memory_per_gpu(cfg, world=6, ep=3)
    with pytest.raises(BraidError, match=r"--world=6 --ep=4"):
        memory_per_gpu(cfg, world=6, ep=4)


def test_experts_shard_on_dim1_only_when_dim0_would_be_uneven():
    assert expert_shard_dim(num_local=4, dim1=64, dp=2) == 0
    assert expert_shard_dim(num_local=1, dim1=64, dp=8) == 1  # one expert, spread over 8 ranks
    assert expert_shard_dim(num_local=3, dim1=30, dp=4) == 0  # neither even: FSDP pads dim 0


def test_info_memory_shrinks_with_world_and_grows_with_replicate():
    cfg = load_config("medium", [])
    one = memory_per_gpu(cfg, world=8, ep=8)
    assert memory_per_gpu(cfg, world=64, ep=8).states < one.states
    assert memory_per_gpu(cfg, world=8, ep=8, dense="replicate").states > one.states
