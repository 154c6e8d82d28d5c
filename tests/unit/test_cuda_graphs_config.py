"""train.cuda_graphs is refused in one line wherever a graph could not replay the step: no
compile, the CPU, expert parallelism (host-read split sizes), gradient accumulation, capacity
dropping, the overlap engine; and at build time on any device but one GPU alone."""

from __future__ import annotations

import pytest
import torch

from braid.config import load_config
from braid.errors import ConfigError
from braid.parallel.mesh import ParallelContext
from braid.train.model_setup import build_model

ON = ["--train.cuda_graphs=true", "--train.compile=true"]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--train.compile=false"], "needs train.compile=true"),
        (["--train.device=cpu"], "needs a GPU"),
        (["--parallel.ep=2"], "needs parallel.ep=1"),
        (["--moe.capacity_factor=1.25"], "needs dropless routing"),
        (["--train.grad_accum=2"], "needs train.grad_accum=1"),
        (["--overlap.chunks=2"], "needs overlap.chunks=1"),
        (["--exchange.algorithm=simulated"], "cannot replay exchange.algorithm=simulated"),
        (["--overlap.split_dw=true"], 'overlap.split_dw="off"'),
        (["--overlap.split_dw=all"], 'overlap.split_dw="off"'),
    ],
)
def test_cuda_graphs_refused_in_one_line(extra, says):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ON + extra)
    msg = str(e.value)
    assert msg.startswith("config train.cuda_graphs=True: ") and says in msg
    assert "\n" not in msg


def test_cuda_graphs_accepted_where_it_can_work():
    cfg = load_config("tiny", ON)
    assert cfg.train.cuda_graphs and cfg.train.compile


def test_cuda_graphs_refused_when_the_model_lands_on_the_cpu():
    cfg = load_config("tiny", ON)
    ctx = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="needs one GPU alone \\(this run: device cpu\\)"):
        build_model(cfg, ctx)
