"""`torchrun -m braid train` under expert parallelism logs what one process logs.

The whole CLI path (launcher, mesh, FSDP2, the nccl exchange on gloo, the metrics store) for
the same global batch: per-step train loss, and the router statistics that the logger reduces
over the world (aux, z and MTP losses, load balance), against a single-process run.
"""

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tiny_run import TINY_MODEL, prepare_words, read_until_step

TINY = [
    *TINY_MODEL,
    "--moe.first_k_dense=0",
    "--train.batch_size=4",
    "--train.seq_len=32",
    "--train.steps=4",
    "--train.warmup=1",
    "--train.val_batches=1",
    "--train.val_every=100",
    "--train.log_every=1",
    "--train.progress=false",
    "--checkpoint.every=0",
    "--model.mtp_depth=1",
]
LOGGED = (
    "train/loss",
    "train/aux_loss",
    "train/z_loss",
    "train/load_max_over_mean",
    "train/mtp_loss",
)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("torchrun")
    words = "a router sends every token to two experts and brings it home again".split()
    prepare_words(root, words, seed=1, count=6000, files=1)
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
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "braid",
    ]
    two = _train(torchrun, data, "ep2", ["--parallel.ep=2"])
    for key in LOGGED:
        assert sorted(two[key]) == sorted(one[key]) == [1, 2, 3, 4], key
        for step, want in one[key].items():
            assert abs(two[key][step] - want) <= 1e-5 * max(abs(want), 1e-3), (key, step)


def _workers(pid: int) -> dict[int, int]:
    """{rank: pid} of the torchrun agent's worker processes (read from /proc)."""
    found = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        rank = [e for e in env if e.startswith(b"RANK=")]
        if rank:
            found[int(rank[0][5:])] = int(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(data):
    from braid.checkpoint import paths
    from braid.metrics.experiments import ExperimentsDB

    runs = data / "term"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "braid",
        "train",
        *TINY,
        "--train.steps=5000",
        "--run.name=term",
        f"--data.path={data / 'data'}",
        f"--run.dir={runs}",
        "--parallel.ep=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        read_until_step(proc, 3, 5000)
        os.kill(_workers(proc.pid)[1], signal.SIGTERM)  # rank 1 only: rank 0 must follow
        _, err = proc.communicate(timeout=120)  # a rank left waiting would hang here
    finally:
        with contextlib.suppress(ProcessLookupError):  # the agent and any worker left behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    (step,) = [s for s, _ in paths.complete_checkpoints(runs / "term")]
    assert 3 <= step < 5000
    run = ExperimentsDB(runs).get_run("term")
    assert run["status"] == "killed" and run["step"] == step, (run, err[-2000:])


def test_a_corpus_error_of_rank_0_is_the_same_one_line_on_every_rank(tmp_path):
    """Rank 0 prepares the built-in corpus; its refusal reaches the other rank as the same line
    instead of a broken collective."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "braid", "train", *TINY, "--parallel.ep=2", f"--run.dir={tmp_path / 'runs'}"]
    cmd += [f"--data.tokenizer={tmp_path / 'missing.json'}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # The two ranks write at the same moment: their lines may meet on one line of the log.
    said = [m for m in proc.stderr.split("error: ")[1:] if m.startswith("data.tokenizer=")]
    said = [m.split(" to train a BPE")[0] for m in said]
    assert len(said) == 2 and said[0] == said[1], proc.stderr[-3000:]
    assert "gloo" not in proc.stderr and "Connection closed" not in proc.stderr


def test_a_run_another_job_holds_is_refused_on_every_rank_before_its_data(tmp_path):
    """Rank 0 probes the run's lock before the data and model are built; its refusal reaches
    the other rank as the same line (no rank left waiting in a collective), and no corpus was
    prepared."""
    from braid.train.runlock import RunLock

    run = tmp_path / "runs" / "held"
    run.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "braid", "train", *TINY, "--parallel.ep=2", f"--run.dir={tmp_path / 'runs'}"]
    cmd += ["--run.name=held"]
    with RunLock(run):  # this test process is the other job
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    said = [m for m in proc.stderr.split("error: ")[1:] if m.startswith("run directory")]
    said = [m.split(": wait for")[0] for m in said]
    assert len(said) == 2 and said[0] == said[1], proc.stderr[-3000:]
    assert f"in use by pid {os.getpid()}" in said[0]
    assert not (tmp_path / "runs" / "data").exists()  # refused before the corpus was made
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
