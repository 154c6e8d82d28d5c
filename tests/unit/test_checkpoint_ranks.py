"""Checkpoints across ranks: two gloo ranks with FSDP2-sharded (DTensor) weights save and resume
exactly, each rank gets its own RNG streams back, and one process loads the full tensors."""

import random

import numpy as np
import torch

from braid.checkpoint import paths
from braid.checkpoint.manager import Checkpointer
from braid.config import Config
from braid.parallel.mesh import ParallelContext
from braid.train.trainer import TrainState
from harness import run_ranks
from loader_cursor import Cursor


def _build(ctx: ParallelContext):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    if ctx.distributed:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            fully_shard(layer, mesh=ctx.world_mesh)
        fully_shard(model, mesh=ctx.world_mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, opt, cursor, state) -> float:
    x = torch.randn(4, 8) * (1 + random.random() + float(np.random.rand()))
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    cursor.pos += 1
    state.step += 1
    return loss.item()


def _full(model) -> dict[str, np.ndarray]:
    """Full weights as numpy (torch tensors would travel through shared memory, which is gone
    once the worker exits)."""
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().numpy().copy()
        for k, v in model.state_dict().items()
    }


def _save_then_resume(rank: int, world: int, run_dir: str):
    from braid.parallel.distributed import init_distributed

    ctx = init_distributed(Config())  # joins the harness's gloo group: mesh (dp=2, ep=1)
    model, opt = _build(ctx)
    random.seed(100 + rank), np.random.seed(100 + rank), torch.manual_seed(100 + rank)
    cursor, state = Cursor(), TrainState()
    for _ in range(2):
        _step(model, opt, cursor, state)
    Checkpointer(run_dir, Config(), ctx).save(model, opt, cursor, state)
    saved = _full(model)
    after = [_step(model, opt, cursor, state) for _ in range(2)]

    random.seed(7), np.random.seed(7), torch.manual_seed(7)  # resume must undo these
    model2, opt2 = _build(ctx)
    cursor2, state2 = Cursor(), TrainState()
    Checkpointer(run_dir, Config(), ctx).resume(model2, opt2, cursor2, state2)
    again = [_step(model2, opt2, cursor2, state2) for _ in range(2)]
    return {"saved": saved, "after": after, "again": again, "pos": cursor2.pos}


def test_two_rank_fsdp_checkpoint_resumes_exactly_and_loads_in_one_process(tmp_path):
    out = run_ranks(_save_then_resume, 2, str(tmp_path))
    for r in out:
        assert r["again"] == r["after"] and r["pos"] == 4  # exact, per rank
    assert out[0]["after"] != out[1]["after"]  # each rank drew from its own streams
    ckpt = paths.latest(tmp_path)
    assert sorted(p.name for p in ckpt.iterdir() if p.suffix == ".json") == [
        "meta.json",
        "rank_00000.json",
        "rank_00001.json",
    ]

    ctx = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    model, opt = _build(ctx)  # another layout: one process, plain tensors
    state = TrainState()
    Checkpointer(tmp_path, Config(), ctx).resume(model, opt, Cursor(), state)
    assert state.step == 2
    for name, full in out[0]["saved"].items():
        assert np.array_equal(model.state_dict()[name].numpy(), full), name


def _rank0_install_fails(rank: int, world: int, run_dir: str):
    import errno

    from braid.checkpoint import manager
    from braid.errors import BraidError
    from braid.parallel.distributed import init_distributed

    ctx = init_distributed(Config())
    model, opt = _build(ctx)
    cursor, state = Cursor(), TrainState()
    _step(model, opt, cursor, state)
    if rank == 0:  # only rank 0 writes meta.json and renames: its failure alone

        def refuse(tmp, final):
            raise PermissionError(errno.EACCES, "Permission denied", str(final))

        manager._install = refuse
    try:
        Checkpointer(run_dir, Config(), ctx).save(model, opt, cursor, state)
    except BraidError as e:
        return str(e)
    return None


def test_a_file_step_only_rank_0_takes_fails_as_one_error_on_every_rank(tmp_path):
    """Rank 0 alone writes meta.json and installs the checkpoint; when that fails the other
    rank raises the same one line instead of waiting in a barrier for it."""
    out = run_ranks(_rank0_install_fails, 2, str(tmp_path))
    assert out[0] == out[1] and out[0] is not None and "\n" not in out[0]
    assert "cannot write the checkpoint" in out[0] and "Permission denied" in out[0]
    assert "the previous checkpoint is intact" in out[0] and paths.latest(tmp_path) is None
