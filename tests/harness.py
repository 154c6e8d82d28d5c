"""Run a function on N spawned gloo ranks (or NCCL ranks, one GPU each) and collect what each
returns.

Each worker: OMP_NUM_THREADS=1, torch.set_num_threads(1), a `file://` rendezvous in a fresh
temporary directory (no port races), a short process-group timeout. Start-up costs seconds per
spawn, so tests should run many checks inside one `run_ranks` call. A worker's exception is
re-raised in the parent with the rank and the worker's traceback.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The sizes of the small models of the multi-rank tests (width 32, experts of 16, sequences of
# 16 tokens), without their depth and experts.
SMALL_SIZES = [
    "--model.dim=32",
    "--model.n_heads=2",
    "--model.vocab_size=128",
    "--model.ffn_hidden=64",
    "--model.max_seq_len=32",
    "--train.seq_len=16",
    "--moe.expert_hidden=16",
]
# A small MoE model for multi-rank tests (3 layers, 8 experts of 16, one shared expert); tests
# add their own [train]/[parallel]/[exchange] overrides.
SMALL_MODEL = [
    *SMALL_SIZES,
    "--model.n_layers=3",
    "--moe.num_experts=8",
    "--moe.num_shared_experts=1",
]


def _worker(
    rank: int, world: int, init_file: str, fn: Callable, args: tuple, queue, backend: str
) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        if backend == "nccl":  # one GPU per rank
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        result = fn(rank, world, *args)
        # By value: a queue would share tensors through files that vanish when this process
        # exits, racing the parent's read (FileNotFoundError in multiprocessing.connection).
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable, world: int, *args: Any, timeout: float = 300, backend: str = "gloo"
) -> list[Any]:
    """fn(rank, world, *args) on `world` gloo ranks (or nccl: rank r on GPU r); returns the
    results in rank order. `fn` must be a module-level function (it is pickled for spawn)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(r, world, init_file, fn, args, queue, backend))
            for r in range(world)
        ]
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        for p in procs:
            p.start()
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
        results: dict[int, Any] = {}
        errors = []
        for _ in range(world):
            rank, status, payload = queue.get(timeout=timeout)
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        if errors:
            raise AssertionError("\n".join(errors))
        return [results[r] for r in range(world)]
