"""`torchrun -m braid train` under expert parallelism logs what one process logs.

The whole CLI path (launcher, mesh, FSDP2, the nccl exchange on gloo, the metrics store) for
the same global batch: per-step train loss, and the router statistics that the logger reduces
over the world (aux and z losses, load balance), against a single-process run.
"""

import os
import random
import subprocess
import sys

import duckdb
import pytest

TINY = ["--model.vocab_size=300", "--model.dim=64", "--model.n_heads=4", "--model.n_layers=2",
        "--model.ffn_hidden=128", "--moe.expert_hidden=64", "--moe.first_k_dense=0",
        "--train.batch_size=4", "--train.seq_len=32", "--train.steps=4", "--train.warmup=1",
        "--train.val_batches=1", "--train.val_every=100", "--train.log_every=1",
        "--train.progress=false", "--checkpoint.every=0"]
LOGGED = ("train/loss", "train/aux_loss", "train/z_loss", "train/load_max_over_mean")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from braid.data.prep import prepare

    root = tmp_path_factory.mktemp("torchrun")
    rnd = random.Random(1)
    words = "a router sends every token to two experts and brings it home again".split()
    (root / "text").mkdir()
    (root / "text" / "t.txt").write_text(" ".join(rnd.choice(words) for _ in range(6000)))
    prepare([root / "text"], root / "data", vocab_size=300, val_fraction=0.1, progress=False)
    return root


def _metrics(run_root) -> dict[str, dict[int, float]]:
    (run_dir,) = [p for p in run_root.iterdir() if p.is_dir()]
    con = duckdb.connect(str(run_dir / "metrics" / "rank_0.duckdb"), read_only=True)
    rows = con.execute("SELECT name, step, value FROM metrics").fetchall()
    con.close()
    out: dict[str, dict[int, float]] = {}
    for name, step, value in rows:
        out.setdefault(name, {})[step] = value
    return out


def _train(launcher: list[str], data, name: str, extra: list[str]) -> dict:
    runs = data / name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = launcher + ["train", *TINY, f"--data.path={data / 'data'}", f"--run.dir={runs}", *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _metrics(runs)


def test_torchrun_ep2_logs_the_single_process_losses_and_router_stats(data):
    one = _train([sys.executable, "-m", "braid"], data, "one", [])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node=2", "-m", "braid"]
    two = _train(torchrun, data, "ep2", ["--parallel.ep=2"])
    for key in LOGGED:
        assert sorted(two[key]) == sorted(one[key]) == [1, 2, 3, 4], key
        for step, want in one[key].items():
            assert abs(two[key][step] - want) <= 1e-5 * max(abs(want), 1e-3), (key, step)
