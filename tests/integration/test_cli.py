"""The `braid` command end to end, as a user runs it: prep, train, generate, export, runs and
report as subprocesses on a tiny model, plus SIGTERM, a closed stdout and a missing optional
dependency. The module trains once (6 steps) and the other tests read that run.
(The exported weights themselves are checked against the run in test_export.py.)"""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from braid.checkpoint import paths
from braid.config import load_config
from braid.errors import BraidError
from braid.metrics import read_metrics
from braid.metrics.experiments import ExperimentsDB
from tiny_run import TINY_MODEL, read_until_step, write_words

TINY = [
    *TINY_MODEL,
    "--train.batch_size=4",
    "--train.seq_len=32",
    "--train.steps=6",
    "--train.warmup=2",
    "--train.val_batches=1",
    "--train.val_every=3",
    "--train.log_every=1",
]
RESULT_KEYS = {
    "run_id",
    "run_dir",
    "steps",
    "initial_val_loss",
    "final_val_loss",
    "final_train_loss",
    "tokens_per_s",
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def braid(*args: str, **kwargs) -> subprocess.CompletedProcess:
    kwargs = {"capture_output": True, "text": True, "timeout": 120, "env": ENV, **kwargs}
    return subprocess.run([sys.executable, "-m", "braid", *args], **kwargs)


def strict_json(line: str):
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """{root, overrides, prep, train, result, run_dir}: one `braid prep` and one `braid train`."""
    root = tmp_path_factory.mktemp("cli")
    words = "the king sends every token to two experts and the experts send it home".split()
    write_words(root / "text", words, seed=3, count=5000, files=2)
    prep = braid(
        "prep",
        str(root / "text"),
        "--out",
        str(root / "data"),
        "--vocab-size",
        "300",
        "--val-fraction",
        "0.1",
    )
    assert prep.returncode == 0, prep.stderr[-2000:]
    overrides = TINY + [f"--data.path={root / 'data'}", f"--run.dir={root / 'runs'}"]
    train = braid("train", *overrides, "--run.name=cli")
    assert train.returncode == 0, train.stderr[-3000:]
    result = strict_json(train.stdout.strip().splitlines()[-1])
    return {
        "root": root,
        "overrides": overrides,
        "prep": prep,
        "train": train,
        "result": result,
        "run_dir": Path(result["run_dir"]),
    }


def test_prep_on_a_pipe_prints_one_line_and_draws_no_progress_bars(cli):
    prep = cli["prep"]
    assert prep.stderr == ""  # no tqdm carriage returns when stderr is not a terminal
    (line,) = prep.stdout.splitlines()
    assert line.startswith(f"prepared {cli['root'] / 'data'}: {{'train': ")


def test_train_prints_the_result_as_its_last_stdout_line(cli):
    result, run_dir = cli["result"], cli["run_dir"]
    assert RESULT_KEYS <= set(result)
    assert result["run_id"] == "cli" and run_dir == cli["root"] / "runs" / "cli"
    assert result["steps"] == 6 and result["tokens_per_s"] > 0
    for key in ("initial_val_loss", "final_val_loss", "final_train_loss"):
        assert isinstance(result[key], float) and 0 < result[key] < 10, key
    assert result["final_val_loss"] < result["initial_val_loss"]  # it learned something
    assert strict_json((run_dir / "summary.json").read_text()) == {
        k: v for k, v in result.items() if k != "rank"
    }
    assert [s for s, _ in paths.complete_checkpoints(run_dir)] == [6]  # the final save
    assert "Traceback" not in cli["train"].stderr
    assert cli["train"].stderr.splitlines()[0] == f"run cli: {run_dir}"  # said at the start


def test_generate_prints_a_continuation_of_the_prompt(cli):
    gen = braid(
        "generate",
        "--run",
        str(cli["run_dir"]),
        "--prompt",
        "the king",
        "--cpu",
        "--max-new-tokens",
        "12",
    )
    assert gen.returncode == 0, gen.stderr
    text = gen.stdout.rstrip("\n")
    assert text.startswith("the king") and len(text) > len("the king") and "\n" not in text[:8]


def test_export_writes_weights_config_and_tokenizer(cli, tmp_path):
    out = tmp_path / "exported"
    exported = braid("export", "--run", str(cli["run_dir"]), "--out", str(out))
    assert exported.returncode == 0, exported.stderr
    assert exported.stdout.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    exported_cfg = json.loads((out / "config.json").read_text())
    assert exported_cfg["step"] == 6 and exported_cfg["config"]["model"]["dim"] == 64


def test_runs_lists_the_run_as_finished_with_its_last_loss(cli):
    runs = braid("runs", "--dir", str(cli["root"] / "runs"))
    assert runs.returncode == 0, runs.stderr
    header, *rows = runs.stdout.splitlines()
    assert header.split()[:5] == ["id", "name", "status", "step", "last"]
    (row,) = [r.split() for r in rows if r.startswith("cli ")]
    assert row[:5] == ["cli", "cli", "finished", "6", f"{cli['result']['final_train_loss']:.4f}"]


def test_report_writes_html_whose_plots_exist(cli):
    run_dir = cli["run_dir"]
    report = braid("report", str(run_dir))
    assert report.returncode == 0, report.stderr
    page = Path(report.stdout.strip())
    assert page == run_dir / "report.html"
    pngs = re.findall(r'src="([^"]+\.png)"', page.read_text())
    assert {"report/loss.png", "report/expert_load.png"} <= set(pngs)
    assert all((run_dir / p).stat().st_size > 1000 for p in pngs)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_stops_with_a_checkpoint_marks_the_run_killed(cli, signum):
    # checkpoint.every=0: the stop writes its checkpoint anyway; it is the run's only one
    name, what = ("term", "SIGTERM") if signum == signal.SIGTERM else ("int", "Ctrl-C")
    args = [*cli["overrides"], "--train.steps=5000", "--checkpoint.every=0", f"--run.name={name}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "braid", "train", *args],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        read_until_step(proc, 3, 5000)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # a no-op once it has exited
    assert proc.returncode == 128 + signum, err[-2000:]  # 143 for SIGTERM, 130 for Ctrl-C
    assert out == "" and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(
        rf"stopped by {what} at step (\d+)/5000 with a checkpoint; "
        rf"resume with --run\.name={name}",
        last,
    )
    assert m, last
    step = int(m.group(1))
    run_dir = cli["root"] / "runs" / name
    assert 3 <= step < 5000
    assert [s for s, _ in paths.complete_checkpoints(run_dir)] == [step]
    run = ExperimentsDB(cli["root"] / "runs").get_run(name)
    assert run["status"] == "killed" and run["step"] == step
    assert [s for s, _ in read_metrics(run_dir)["train/loss"]] == list(range(1, step + 1))


def test_closed_stdout_ends_quietly(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before braid writes a byte, as with `| head -0`
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "braid", "info", "--knobs"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
            timeout=60,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored"
    assert proc.returncode == 141  # 128 + SIGPIPE, as a process killed by the signal


def test_missing_tensorboard_fails_before_the_run_directory_exists(cli, tmp_path, monkeypatch):
    from braid.train.trainer import train

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    runs = tmp_path / "runs"
    cfg = load_config(None, [*cli["overrides"], f"--run.dir={runs}", "--metrics.tensorboard=true"])
    with pytest.raises(BraidError, match="pip install tensorboard"):
        train(cfg)
    assert not runs.exists()  # no run directory, no registry
