"""Every bad input a user can give, as a table: each one is a single `error: ...` line on stderr
with exit code 2 and no traceback (or the documented behaviour, in the tests after the table).

The module trains one tiny run (4 steps, two checkpoints) and exports it; each row copies what
it damages, so the rows are independent. `braid` runs in this process (`braid.cli.main`), which
keeps the table fast; the tests that need a process of their own (a planted module beside an
export, two writers at once) start one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from braid.checkpoint import paths
from braid.checkpoint.integrity import hash_files
from braid.cli import main
from braid.config import fingerprint_of
from braid.metrics.experiments import ExperimentsDB
from tiny_run import TINY_MODEL, write_words

TINY = [
    *TINY_MODEL,
    "--train.batch_size=4",
    "--train.seq_len=32",
    "--train.steps=4",
    "--train.val_batches=1",
    "--train.progress=false",
    "--checkpoint.every=2",
    "--train.log_every=1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """{root, data, runs, run, export, overrides}: one trained run and its export."""
    root = tmp_path_factory.mktemp("bad")
    words = "every expert takes its share of the tokens and sends them home again".split()
    write_words(root / "text.txt", words, seed=5, count=6000)
    assert (
        main(
            [
                "prep",
                str(root / "text.txt"),
                "--out",
                str(root / "data"),
                "--vocab-size",
                "300",
                "--val-fraction",
                "0.1",
            ]
        )
        == 0
    )
    overrides = TINY + [f"--data.path={root / 'data'}", f"--run.dir={root / 'runs'}"]
    assert main(["train", *overrides, "--run.name=base"]) == 0
    run = root / "runs" / "base"
    assert main(["export", "--run", str(run), "--out", str(root / "export")]) == 0
    return {
        "root": root,
        "data": root / "data",
        "runs": root / "runs",
        "run": run,
        "export": root / "export",
        "overrides": overrides,
    }


def run(argv: list[str]) -> int:
    """`braid ARGV` in this process; its exit code (argparse exits through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def one_error_line(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err  # the last line
    assert "Traceback" not in err
    return errors[0]


# -- what each row damages (a copy of the run, export or data) ----------------------------------


def copy_run(w, tmp: Path) -> Path:
    runs = tmp / "runs"
    shutil.copytree(w["run"], runs / "base")
    (runs / "base" / ".lock").unlink(missing_ok=True)
    return runs / "base"


def copy_export(w, tmp: Path) -> Path:
    return Path(shutil.copytree(w["export"], tmp / "export"))


def flip(path: Path, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def newest(run: Path) -> Path:
    return paths.latest(run)


def edit_meta(ckpt: Path, refingerprint: bool) -> None:
    meta = ckpt / paths.META_FILE
    body = json.loads(meta.read_text())
    body["config"]["model"]["n_layers"] = 1
    if refingerprint:  # a deliberate edit that keeps the file self-consistent
        body["fingerprint"] = fingerprint_of(body["config"])
    meta.write_text(json.dumps(body))


def nan_export(w, tmp: Path) -> Path:
    out = copy_export(w, tmp)
    sd = load_file(out / "model.safetensors")
    name = next(k for k, v in sd.items() if v.is_floating_point())
    sd[name] = torch.full_like(sd[name], float("nan"))
    save_file(sd, out / "model.safetensors")
    body = json.loads((out / "config.json").read_text())
    body["hashes"] = hash_files(out, body["hashes"])  # consistent files, NaN weights
    (out / "config.json").write_text(json.dumps(body))
    return out


def stale_manifest(w, tmp: Path) -> Path:
    data = Path(shutil.copytree(w["data"], tmp / "data"))
    man = json.loads((data / "manifest.json").read_text())
    man["max_token_id"] = 5
    for split in man["splits"].values():
        split["max_token_id"] = 5
    (data / "manifest.json").write_text(json.dumps(man))
    return data


def gen(path, *extra):
    return ["generate", "--run", str(path), "--prompt", "every expert", "--cpu", *extra]


def train_args(w, tmp, *extra, name="x"):
    return ["train", *w["overrides"], f"--run.dir={tmp / 'runs'}", f"--run.name={name}", *extra]


# (id, argv builder(w, tmp) -> list[str], regex the one line must match)
ROWS = [
    ("unknown-key", lambda w, t: ["info", "--model.dimm=3"], r"unknown key"),
    ("bad-type", lambda w, t: ["info", "--model.dim=abc"], r"model.dim='abc': expected int"),
    ("bad-override", lambda w, t: ["info", "--model.dim"], r"unrecognized arguments"),
    (
        "mistyped-option",
        lambda w, t: ["generate", "--run", "x", "--prompt", "p", "--max_new_tokens=5"],
        r"unrecognized arguments: --max_new_tokens=5 \(did you mean --max-new-tokens\?\)",
    ),
    (
        "override-to-generate",
        lambda w, t: ["generate", "--run", "x", "--prompt", "p", "--train.steps=5"],
        r"config overrides \(--train.steps=...\) are for train and info, not generate",
    ),
    ("knobs-bad-override", lambda w, t: ["info", "--knobs", "--train.lr=abc"], r"train.lr='abc'"),
    (
        "plugin-not-a-compressor",
        lambda w, t: ["info", "--exchange.compressor=json:JSONDecoder"],
        r"compressor 'json:JSONDecoder' is not a subclass of .*Compressor",
    ),
    ("no-command", lambda w, t: [], r"give a command: train, info, prep"),
    (
        "report-missing-dir",
        lambda w, t: ["report", str(t / "nope")],
        r"nope is not a directory: give a run directory",
    ),
    ("config-is-a-dir", lambda w, t: ["info", str(t)], r"is a directory: give a .toml file"),
    (
        "stop-at-past-steps",
        lambda w, t: ["info", "--train.steps=2", "--train.stop_at=5"],
        r"train.stop_at=5: must be <= train.steps=2",
    ),
    ("info-ep-zero", lambda w, t: ["info", "--ep", "0"], r"argument --ep: 0 must be >= 1"),
    ("inf-float", lambda w, t: ["info", "--train.lr=inf"], r"train.lr=inf: expected a finite"),
    (
        "nan-float",
        lambda w, t: ["info", "--model.rope_theta=nan"],
        r"model.rope_theta=nan: expected a finite number",
    ),
    (
        "run-dir-is-a-file",
        lambda w, t: ["train", *TINY, f"--run.dir={_a_file(t)}"],
        r"cannot create the corpus directory .*afile.*: Not a directory",
    ),
    (
        "run-name-escapes",
        lambda w, t: train_args(w, t, name="../../tmp/evil"),
        r"run.name='../../tmp/evil': must be one path component",
    ),
    (
        "run-name-absolute",
        lambda w, t: train_args(w, t, name="/an/absolute/path"),
        r"run.name='/an/absolute/path'",
    ),
    (
        "config-not-utf8",
        lambda w, t: ["info", _write(t / "c.toml", b"[model]\ndim = \xff\n")],
        r"not UTF-8",
    ),
    ("config-bad-toml", lambda w, t: ["info", _write(t / "c.toml", b"[model\n")], r"invalid TOML"),
    ("config-missing", lambda w, t: ["info", str(t / "none.toml")], r"not found"),
    (
        "unknown-exchange",
        lambda w, t: ["info", "--exchange.algorithm=nope"],
        r"unknown exchange 'nope'",
    ),
    (
        "plugin-not-importable",
        lambda w, t: ["info", "--exchange.algorithm=nomod_x:Y"],
        r"cannot import exchange 'nomod_x:Y'",
    ),
    (
        "argparse-bad-int",
        lambda w, t: gen(w["run"], "--max-new-tokens", "abc"),
        r"invalid int value",
    ),
    ("top-p-zero", lambda w, t: gen(w["run"], "--top-p", "0"), r"--top-p 0.0: must be in"),
    ("top-p-above-one", lambda w, t: gen(w["run"], "--top-p", "1.5"), r"--top-p 1.5"),
    (
        "max-new-negative",
        lambda w, t: gen(w["run"], "--max-new-tokens", "-5"),
        r"--max-new-tokens -5: must be >= 1",
    ),
    (
        "max-new-beyond-context",
        lambda w, t: gen(w["run"], "--max-new-tokens", "10000"),
        r"exceed the model's context of 256 tokens",
    ),
    (
        "temperature-negative",
        lambda w, t: gen(w["run"], "--temperature", "-1"),
        r"--temperature -1.0: must be",
    ),
    ("top-k-negative", lambda w, t: gen(w["run"], "--top-k", "-1"), r"--top-k -1"),
    (
        "empty-prompt",
        lambda w, t: ["generate", "--run", str(w["run"]), "--prompt", ""],
        r"encodes to no tokens",
    ),
    ("generate-missing-run", lambda w, t: gen(t / "nope"), r"does not exist"),
    ("nan-weights", lambda w, t: gen(nan_export(w, t)), r"holds NaN or infinite values"),
    (
        "export-bit-flip",
        lambda w, t: gen(_damage(copy_export(w, t), "model.safetensors")),
        r"model.safetensors does not match its blake2b-128 checksum",
    ),
    (
        "export-config-edited",
        lambda w, t: gen(_edit_export(copy_export(w, t))),
        r"config does not match its fingerprint",
    ),
    (
        "export-config-not-utf8",
        lambda w, t: gen(_garble(copy_export(w, t) / "config.json")),
        r"not UTF-8",
    ),
    (
        "meta-edited",
        lambda w, t: gen(_edit_meta(copy_run(w, t), False)),
        r"config does not match its fingerprint",
    ),
    (
        "meta-edited-consistently",
        lambda w, t: gen(_edit_meta(copy_run(w, t), True)),
        r"holds \d+ model tensors this model lacks",
    ),
    ("meta-not-utf8", lambda w, t: gen(_garble_meta(copy_run(w, t))), r"not UTF-8"),
    (
        "distcp-bit-flip",
        lambda w, t: gen(_flip_distcp(copy_run(w, t))),
        r"distcp does not match its blake2b-128 checksum: .* on disk; give an intact one, "
        r"e\.g\. --run .*step_00000002$",
    ),
    (  # another run's damaged checkpoint: the advice names that run's older checkpoint
        "resume-damaged-other-run",
        lambda w, t: train_args(
            w,
            t,
            f"--checkpoint.resume={_flip_distcp(copy_run(w, t))}",
            "--checkpoint.allow_safe_changes=true",
            name="fork2",
        ),
        r"to go on from an older checkpoint, fork it under a new name: braid train \.\.\. "
        r"--run.name=fork2-fork --checkpoint.resume=.*base/checkpoints/step_00000002",
    ),
    (
        "resume-damaged-explicit",
        lambda w, t: train_args(
            w,
            t,
            f"--checkpoint.resume={_flip_distcp(copy_run(w, t))}",
            "--checkpoint.allow_safe_changes=true",
            name="base",
        ),
        r"does not match its blake2b-128 checksum: .* on disk; to go on from an older checkpoint, "
        r"fork it under a new name: braid train \.\.\. "
        r"--run.name=base-fork --checkpoint.resume=.*step_00000002",
    ),
    (
        "rank-file-not-utf8",
        lambda w, t: train_args(
            w,
            t,
            f"--checkpoint.resume={_garble_rank(copy_run(w, t))}",
            "--checkpoint.allow_safe_changes=true",
            name="base",
        ),
        r"rank_00000.json",
    ),
    (
        "export-out-not-empty",
        lambda w, t: ["export", "--run", str(w["run"]), "--out", str(_nonempty(t))],
        r"non-empty directory",
    ),
    ("runs-missing-root", lambda w, t: ["runs", f"--run.dir={t / 'none'}"], r"no runs recorded"),
    ("report-missing-run", lambda w, t: ["report", str(t / "none")], r"none"),
    ("prep-no-inputs", lambda w, t: ["prep", "--out", str(t / "o")], r"needs input files"),
    (
        "stale-manifest",
        lambda w, t: train_args(w, t, f"--data.path={stale_manifest(w, t)}"),
        r"exceeds the manifest's max_token_id=5",
    ),
    (
        "metrics-db-corrupt-on-resume",
        lambda w, t: train_args(
            w,
            t,
            "--train.steps=6",
            "--checkpoint.allow_safe_changes=true",
            name=_corrupt_metrics(copy_run(w, t)),
        ),
        r"metrics store .*rank_0.duckdb cannot be written",
    ),
]


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _damage(out: Path, name: str) -> Path:
    flip(out / name)
    return out


def _edit_export(out: Path) -> Path:
    body = json.loads((out / "config.json").read_text())
    body["config"]["model"]["n_layers"] = 1
    (out / "config.json").write_text(json.dumps(body))
    return out


def _garble(path: Path) -> Path:
    path.write_bytes(b"\xff\xfe" + path.read_bytes())
    return path.parent


def _edit_meta(run: Path, refingerprint: bool) -> Path:
    edit_meta(newest(run), refingerprint)
    return run


def _garble_meta(run: Path) -> Path:
    _garble(newest(run) / paths.META_FILE)
    return run


def _flip_distcp(run: Path) -> Path:
    ckpt = newest(run)
    flip(next(ckpt.glob("*.distcp")))
    return ckpt


def _garble_rank(run: Path) -> Path:
    ckpt = newest(run)
    f = ckpt / "rank_00000.json"
    f.write_bytes(b"\xff" + f.read_bytes()[1:])
    return ckpt


def _a_file(tmp: Path) -> Path:
    (tmp / "afile").write_text("not a directory")
    return tmp / "afile"


def _nonempty(tmp: Path) -> Path:
    (tmp / "busy").mkdir()
    (tmp / "busy" / "notes.txt").write_text("keep me")
    return tmp / "busy"


def _corrupt_metrics(run: Path) -> str:
    (run / "metrics" / "rank_0.duckdb").write_bytes(b"this is not a duckdb file" * 100)
    return run.name


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_with_exit_code_2(world, tmp_path, capsys, row):
    _, argv, pattern = row
    args = argv(world, tmp_path)
    capsys.readouterr()
    line = one_error_line(capsys, run(args))
    assert __import__("re").search(pattern, line), line


# -- documented behaviour (not errors) ----------------------------------------------------------


def test_val_batches_zero_means_no_validation_and_null_in_the_result(world, tmp_path, capsys):
    assert main(train_args(world, tmp_path, "--train.val_batches=0")) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["initial_val_loss"] is None and result["final_val_loss"] is None
    assert result["final_train_loss"] > 0


def test_corrupt_metrics_with_on_error_continue_trains_and_is_marked_degraded(
    world, tmp_path, capsys
):
    name = _corrupt_metrics(copy_run(world, tmp_path))
    code = main(
        train_args(
            world,
            tmp_path,
            "--train.steps=6",
            "--metrics.on_error=continue",
            "--checkpoint.allow_safe_changes=true",
            name=name,
        )
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["steps"] == 6 and "cannot be written" in result["degraded"]
    run = ExperimentsDB(tmp_path / "runs").get_run(name)
    assert run["status"] == "finished" and run["error"].startswith("degraded: ")


def test_a_second_writer_is_refused_naming_the_first(world, tmp_path, capsys, monkeypatch):
    from braid.train import trainer
    from braid.train.runlock import RunLock

    (tmp_path / "runs" / "x").mkdir(parents=True)
    loaded = []
    real_load = trainer.load_data
    monkeypatch.setattr(trainer, "load_data", lambda *a: loaded.append(1) or real_load(*a))
    with RunLock(tmp_path / "runs" / "x"):  # this process is the first writer
        line = one_error_line(capsys, main(train_args(world, tmp_path)))
    assert f"in use by pid {os.getpid()} on {socket.gethostname()}" in line
    assert not loaded  # refused before its data (and model) were built
    assert not (tmp_path / "runs" / "x" / "config.toml").exists()  # nothing of it was written
    assert main(train_args(world, tmp_path, "--train.steps=2")) == 0  # released: it may run


def test_a_refused_run_leaves_an_existing_run_as_it_was_and_a_new_one_not_at_all(
    world, tmp_path, capsys
):
    """The config and tokenizer are written only once the resume is accepted: a refusal (here
    a config the checkpoint was not written with) changes none of the run's files, and a new
    run refused before it began leaves no directory behind."""
    run = copy_run(world, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert {"config.toml", "config.json", "tokenizer.json"} <= set(before)
    argv = train_args(world, tmp_path, "--model.n_layers=3", name="base")
    line = one_error_line(capsys, main(argv))
    assert "written with another config" in line and "under another run.name" in line, line
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == before
    missing = tmp_path / "no" / "ckpt"
    one_error_line(capsys, main(train_args(world, tmp_path, f"--checkpoint.resume={missing}")))
    assert not (tmp_path / "runs" / "x").exists()


def test_two_concurrent_trainings_of_one_run_one_is_refused(world, tmp_path):
    args = [
        sys.executable,
        "-m",
        "braid",
        *train_args(world, tmp_path, "--train.steps=40", name="same"),
    ]
    procs = [
        subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 2)
    assert "is in use by pid" in refused.strip().splitlines()[-1]
    from braid.metrics import read_metrics

    losses = read_metrics(tmp_path / "runs" / "same")["train/loss"]
    assert [s for s, _ in losses] == list(range(1, 41))  # one writer's rows, not interleaved


def test_full_disk_at_a_checkpoint_keeps_the_previous_one_and_records_the_error(
    world, tmp_path, capsys, monkeypatch
):
    from braid.checkpoint import manager

    real, calls = manager.save_tensors, []

    def full_after_first(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(manager, "save_tensors", full_after_first)
    line = one_error_line(capsys, main(train_args(world, tmp_path)))
    assert "No space left on device" in line and "MiB free there" in line
    assert "the previous checkpoint is intact" in line
    run = tmp_path / "runs" / "x"
    assert [s for s, _ in paths.complete_checkpoints(run)] == [2]
    row = ExperimentsDB(tmp_path / "runs").get_run("x")
    assert row["status"] == "failed" and "No space left" in row["error"]


@pytest.mark.parametrize("failure", ["disk_full", "interrupted"])
def test_a_failure_inside_the_tensor_writer_is_one_line_or_a_stop(
    world, tmp_path, capsys, monkeypatch, failure
):
    """DCP wraps a writer's failure in CheckpointException, a BaseException: a full disk there
    is still the one line above, and a stop signal during the save still stops the run as
    killed, not as a traceback."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    real, calls = FileSystemWriter.write_data, []

    def fail_after_first(self, *a, **k):
        calls.append(1)
        if len(calls) > 1:
            if failure == "interrupted":
                raise KeyboardInterrupt
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(FileSystemWriter, "write_data", fail_after_first)
    code = main(train_args(world, tmp_path))
    run = tmp_path / "runs" / "x"
    assert [s for s, _ in paths.complete_checkpoints(run)] == [2]
    row = ExperimentsDB(tmp_path / "runs").get_run("x")
    if failure == "disk_full":
        line = one_error_line(capsys, code)
        assert "No space left on device" in line and "the previous checkpoint is intact" in line
        assert row["status"] == "failed" and "\n" not in row["error"]
    else:
        assert code == 130 and "Traceback" not in capsys.readouterr().err
        assert row["status"] == "killed"


def test_read_only_storage_is_one_line(world, tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "o"))

    monkeypatch.setattr(Path, "mkdir", refuse)
    for argv in (
        train_args(world, tmp_path),
        ["prep", str(world["root"] / "text.txt"), "--out", str(tmp_path / "o")],
        ["report", str(world["run"])],
    ):
        line = one_error_line(capsys, main(argv))
        assert "Read-only file system" in line, line


def test_runs_reader_needs_no_write_access_and_changes_nothing(world, capsys):
    db = world["runs"] / "experiments.db"
    before = db.read_bytes()
    os.chmod(db, 0o444)
    try:
        assert main(["runs", f"--run.dir={world['runs']}"]) == 0
    finally:
        os.chmod(db, 0o644)
    assert "base" in capsys.readouterr().out
    assert db.read_bytes() == before


def test_debug_works_after_the_subcommand(capsys):
    with pytest.raises(Exception, match="must be between 1 and moe.num_experts"):
        main(["info", "--debug", "--moe.top_k=99"])


def test_a_module_planted_beside_an_export_is_never_imported(world, tmp_path):
    out = copy_export(world, tmp_path)
    marker = tmp_path / "imported"
    (out / "evilmod.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nclass X:\n    pass\n"
    )
    body = json.loads((out / "config.json").read_text())
    body["config"]["exchange"]["algorithm"] = "evilmod:X"
    body["config"]["exchange"]["compressor"] = "evilmod:X"
    body["fingerprint"] = fingerprint_of(body["config"])  # a carefully made file
    (out / "config.json").write_text(json.dumps(body))
    # One process builds the simulated exchange for training; a saved config naming it with a
    # plug-in compressor must not reach the compressor's lookup either.
    sim = Path(shutil.copytree(out, tmp_path / "export_sim"))
    body["config"]["exchange"]["algorithm"] = "simulated"
    body["fingerprint"] = fingerprint_of(body["config"])
    (sim / "config.json").write_text(json.dumps(body))
    run = copy_run(world, tmp_path)  # the same plant beside a run whose meta.json names it
    shutil.copy(out / "evilmod.py", run / "evilmod.py")
    meta = newest(run) / paths.META_FILE
    body = json.loads(meta.read_text())
    body["config"]["exchange"]["algorithm"] = "evilmod:X"
    body["fingerprint"] = fingerprint_of(body["config"])
    meta.write_text(json.dumps(body))
    gen_here = ["generate", "--run", ".", "--prompt", "every", "--cpu", "--max-new-tokens", "3"]
    for cwd, argv in (
        (out, gen_here),
        (sim, gen_here),
        (run, gen_here),
        (run, ["export", "--run", ".", "--out", str(tmp_path / "again")]),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "braid", *argv],
            cwd=cwd,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "evilmod:X" in proc.stderr and "not imported" in proc.stderr
    assert not marker.exists()


def test_exporting_a_model_directory_writes_it_again_after_its_checks(world, tmp_path, capsys):
    """`braid export --run` takes a model directory (an export, or an import) as well: the same
    tensors, config and tokenizer come out; a damaged one is refused and nothing is written."""
    from safetensors.torch import load_file

    again = tmp_path / "again"
    assert main(["export", "--run", str(world["export"]), "--out", str(again)]) == 0
    a, b = load_file(world["export"] / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "tokenizer.json").read_bytes() == (
        world["export"] / "tokenizer.json"
    ).read_bytes()
    mask = os.umask(0)
    os.umask(mask)
    for p in again.iterdir():  # readable as the umask allows (safetensors alone writes 0600)
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p
    old, new = (json.loads((d / "config.json").read_text()) for d in (world["export"], again))
    assert (new["config"], new["fingerprint"], new["step"]) == (
        old["config"],
        old["fingerprint"],
        old["step"],
    )
    damaged = copy_export(world, tmp_path)
    flip(damaged / "model.safetensors")
    line = one_error_line(
        capsys, main(["export", "--run", str(damaged), "--out", str(tmp_path / "x")])
    )
    assert "checksum" in line and not (tmp_path / "x").exists()


def test_a_folder_named_like_a_builtin_config_does_not_hide_it(tmp_path, monkeypatch):
    from braid.config import CONFIG_DIR, resolve_config_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    assert resolve_config_path("tiny") == CONFIG_DIR / "tiny.toml"


def test_an_unwritable_summary_marks_the_run_failed_with_one_line(
    world, tmp_path, capsys, monkeypatch
):
    from braid.train import trainer

    real = trainer.write_json_atomic

    def refuse_summary(path, obj):
        if path.name == "summary.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, obj)

    monkeypatch.setattr(trainer, "write_json_atomic", refuse_summary)
    line = one_error_line(capsys, main(train_args(world, tmp_path)))
    assert "summary.json" in line and "Permission denied" in line
    row = ExperimentsDB(tmp_path / "runs").get_run("x")
    assert row["status"] == "failed" and "summary.json" in row["error"]


def test_a_metrics_write_failing_at_the_last_flush_marks_the_run_degraded(
    world, tmp_path, capsys, monkeypatch
):
    """The rows of the last flush fail after the loop's last check: the run still finishes
    (its checkpoint is written), but says so and its registry row is marked degraded."""
    from braid.metrics import store

    real = store.MetricsWriter.close

    def close_then_fail(self):
        real(self)
        self._sink.error = self._sink.error or "IOException: the disk went away"

    monkeypatch.setattr(store.MetricsWriter, "close", close_then_fail)
    assert main(train_args(world, tmp_path)) == 0
    assert "warning: metrics store" in capsys.readouterr().err
    row = ExperimentsDB(tmp_path / "runs").get_run("x")
    assert row["status"] == "finished" and "degraded" in row["error"]
    assert "the disk went away" in row["error"]


def _metrics_fail_after_save(monkeypatch, step: int) -> None:
    """The metrics writer's sink records a failed write right after the checkpoint of `step`
    is saved, as a disk that went away during the save would leave it."""
    from braid.checkpoint import manager
    from braid.metrics import store

    writers, real_init, real_save = [], store.MetricsWriter.__init__, manager.Checkpointer.save

    def init(self, *a, **k):
        real_init(self, *a, **k)
        writers.append(self)

    def save(self, model, opt, loader, st):
        out = real_save(self, model, opt, loader, st)
        if st.step == step:
            writers[-1]._sink.error = "IOException: the disk went away"
        return out

    monkeypatch.setattr(store.MetricsWriter, "__init__", init)
    monkeypatch.setattr(manager.Checkpointer, "save", save)


def test_a_metrics_write_failing_mid_run_stops_at_the_next_step_with_a_checkpoint(
    world, tmp_path, capsys, monkeypatch
):
    """on_error=stop: a write that fails during the run (noticed after the step-2 save) stops
    the run after step 3, the next step, with a checkpoint of it; steps 4.. never run."""
    _metrics_fail_after_save(monkeypatch, 2)
    line = one_error_line(capsys, main(train_args(world, tmp_path)))
    assert "the disk went away" in line and "stopped at step 3 with a checkpoint" in line
    assert [s for s, _ in paths.complete_checkpoints(tmp_path / "runs" / "x")] == [2, 3]


@pytest.mark.parametrize("on_error", ["stop", "continue"])
def test_the_last_flush_failing_is_reported_in_the_result(
    world, tmp_path, capsys, monkeypatch, on_error
):
    """A write that fails after the loop's last check (here: noticed during the final save):
    with on_error=stop the run fails in one line after its final checkpoint; with continue the
    result and summary.json say degraded."""
    _metrics_fail_after_save(monkeypatch, 4)  # the final checkpoint: the last flush's write
    code = main(train_args(world, tmp_path, f"--metrics.on_error={on_error}"))
    run = tmp_path / "runs" / "x"
    assert 4 in [s for s, _ in paths.complete_checkpoints(run)]
    if on_error == "stop":
        line = one_error_line(capsys, code)
        assert "the disk went away" in line and "wrote its final checkpoint" in line
    else:
        assert code == 0
        assert "the disk went away" in json.loads((run / "summary.json").read_text())["degraded"]
