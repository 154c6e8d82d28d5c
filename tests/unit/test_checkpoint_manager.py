"""Checkpointer on a small module: exact continuation, keep policy, crash leftovers, the
fingerprint rule, refusal to mix histories, and damaged files."""

import json
import random

import numpy as np
import pytest
import torch

from braid.checkpoint import paths
from braid.checkpoint.compat import check_resume_config
from braid.checkpoint.manager import Checkpointer
from braid.config import Config
from braid.errors import BraidError
from braid.parallel.mesh import ParallelContext
from braid.train.trainer import TrainState
from loader_cursor import Cursor

CTX = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def make():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2), Cursor(), TrainState()


def step(m, opt, cur, st):
    """One step that draws from every RNG stream, so a bad restore changes the loss."""
    loss = m(torch.randn(4, 8)).pow(2).mean() * (1 + random.random() + np.random.rand())
    loss.backward()
    opt.step()
    opt.zero_grad()
    cur.pos += 1
    st.step += 1
    st.tokens_seen += 32
    return loss.item()


def cfg_with(**sections):
    return Config().replace(**sections)


def test_resume_continues_bitwise(tmp_path):
    m, opt, cur, st = make()
    for _ in range(3):
        step(m, opt, cur, st)
    Checkpointer(tmp_path, Config(), CTX).save(m, opt, cur, st)
    ref = [step(m, opt, cur, st) for _ in range(3)]

    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # resume must undo these
    m2, opt2, cur2, st2 = make()
    Checkpointer(tmp_path, Config(), CTX).resume(m2, opt2, cur2, st2)
    assert (st2.step, st2.tokens_seen, cur2.pos) == (3, 96, 3)
    assert [step(m2, opt2, cur2, st2) for _ in range(3)] == ref


def test_keep_last_plus_multiples_and_crash_leftovers_are_pruned(tmp_path):
    assert paths.to_delete([1, 2, 3, 4, 5, 6], keep_last=2, keep_every=3) == [1, 2, 4]
    cfg = cfg_with(checkpoint={"keep_last": 2, "keep_every": 3})
    m, opt, cur, st = make()
    ck = Checkpointer(tmp_path, cfg, CTX)
    crashed = paths.tmp_path(tmp_path, 7)
    for _ in range(6):
        step(m, opt, cur, st)
        ck.save(m, opt, cur, st)
        if st.step == 4:  # a save killed mid-write at a later step: not complete, ignored
            crashed.mkdir()
            (crashed / "__0_0.distcp").write_bytes(b"partial")
            assert paths.latest(tmp_path) == paths.final_path(tmp_path, 4)
    assert [s for s, _ in paths.complete_checkpoints(tmp_path)] == [3, 5, 6]
    assert not crashed.exists()


def test_saving_the_same_step_again_replaces_it(tmp_path):
    m, opt, cur, st = make()
    step(m, opt, cur, st)
    ck = Checkpointer(tmp_path, Config(), CTX)
    ck.save(m, opt, cur, st)
    st.tokens_seen = 12345
    ck.save(m, opt, cur, st)
    m2, opt2, cur2, st2 = make()
    ck.resume(m2, opt2, cur2, st2)
    assert st2.tokens_seen == 12345
    assert sorted(p.name for p in (tmp_path / paths.CKPT_DIR).iterdir()) == ["step_00000001"]


def test_fingerprint_rule():
    saved = Config().to_dict()
    where = "ckpt"
    # keys that only say where output goes or when to stop are always accepted
    always = cfg_with(
        train={"stop_at": 3, "progress": False}, checkpoint={"resume": "none"}, run={"name": "fork"}
    )
    assert check_resume_config(saved, always, where) == []
    safe = cfg_with(train={"steps": 999}, parallel={"ep": 2}, metrics={"flush_every": 1})
    with pytest.raises(BraidError, match="allow_safe_changes=true") as e:
        check_resume_config(saved, safe, where)
    assert "train.steps 300 -> 999" in str(e.value) and "parallel.ep 1 -> 2" in str(e.value)
    flagged = cfg_with(
        train={"steps": 999}, parallel={"ep": 2}, checkpoint={"allow_safe_changes": True}
    )
    assert check_resume_config(saved, flagged, where) == ["parallel.ep", "train.steps"]
    kernel = cfg_with(model={"sdpa_backend": "cudnn"}, checkpoint={"allow_safe_changes": True})
    assert check_resume_config(saved, kernel, where) == ["model.sdpa_backend"]
    older = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "beta2"}}
    assert check_resume_config(older, Config(), where) == []  # a knob added since, at default
    with pytest.raises(BraidError, match=r"train.beta2 '<absent>' -> 0.9;"):
        check_resume_config(older, cfg_with(train={"beta2": 0.9}), where)
    unsafe = cfg_with(train={"lr": 1e-4, "steps": 999}, checkpoint={"allow_safe_changes": True})
    with pytest.raises(BraidError, match=r"train.lr 0.003 -> 0.0001; these change the model"):
        check_resume_config(saved, unsafe, where)


@pytest.mark.parametrize(
    "section,key,value",
    [("model", "dim", 64), ("model", "n_layers", 3), ("moe", "top_k", 1), ("train", "seed", 7)],
)
def test_model_moe_and_seed_changes_are_refused_even_with_allow_safe_changes(section, key, value):
    saved = Config().to_dict()
    cfg = cfg_with(**{section: {key: value}}, checkpoint={"allow_safe_changes": True})
    with pytest.raises(BraidError, match=rf"{section}.{key} .* -> {value}; these change the model"):
        check_resume_config(saved, cfg, "ckpt")


def test_resume_restores_the_optimizer_hyper_parameters(tmp_path):
    m, opt, cur, st = make()
    step(m, opt, cur, st)
    opt.param_groups[0]["lr"] = 0.123
    Checkpointer(tmp_path, Config(), CTX).save(m, opt, cur, st)
    m2, opt2, cur2, st2 = make()
    Checkpointer(tmp_path, Config(), CTX).resume(m2, opt2, cur2, st2)
    assert opt2.param_groups[0]["lr"] == 0.123


def test_resume_refuses_another_config_before_touching_the_model(tmp_path):
    m, opt, cur, st = make()
    step(m, opt, cur, st)
    Checkpointer(tmp_path, Config(), CTX).save(m, opt, cur, st)
    m2, opt2, cur2, st2 = make()
    before = [p.clone() for p in m2.parameters()]
    with pytest.raises(BraidError, match="model.dim 192 -> 64"):
        Checkpointer(tmp_path, cfg_with(model={"dim": 64}), CTX).resume(m2, opt2, cur2, st2)
    assert all(torch.equal(a, b) for a, b in zip(before, m2.parameters(), strict=True))
    assert st2.step == 0


def test_histories_never_mix(tmp_path):
    m, opt, cur, st = make()
    ck = Checkpointer(tmp_path / "a", Config(), CTX)
    for _ in range(2):
        step(m, opt, cur, st)
        ck.save(m, opt, cur, st)
    fresh = make()
    with pytest.raises(BraidError, match="up to step 2, and starting fresh there would mix"):
        Checkpointer(tmp_path / "a", cfg_with(checkpoint={"resume": "none"}), CTX).resume(*fresh)
    older = str(paths.final_path(tmp_path / "a", 1))
    with pytest.raises(BraidError, match="resuming at step 1 there would mix"):
        Checkpointer(tmp_path / "a", cfg_with(checkpoint={"resume": older}), CTX).resume(*fresh)
    # forking an older checkpoint into a new run directory is fine
    Checkpointer(tmp_path / "b", cfg_with(checkpoint={"resume": older}), CTX).resume(*fresh)
    assert fresh[3].step == 1


def test_resume_paths(tmp_path):
    m, opt, cur, st = make()
    step(m, opt, cur, st)
    Checkpointer(tmp_path / "run", Config(), CTX).save(m, opt, cur, st)
    assert paths.resolve_resume(str(tmp_path / "run"), tmp_path) == paths.final_path(
        tmp_path / "run", 1
    )
    assert paths.resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(BraidError, match="does not exist"):
        paths.resolve_resume(str(tmp_path / "typo"), tmp_path)
    partial = paths.final_path(tmp_path / "run", 9)
    partial.mkdir()
    with pytest.raises(BraidError, match="incomplete checkpoint"):
        paths.resolve_resume(str(partial), tmp_path)


@pytest.mark.parametrize(
    "damage",
    [
        "truncate_rank",
        "truncate_meta",
        "garble_rank",
        "flip_tensor_bytes",
        "edit_meta_config",
        "meta_lists_outside",
        "meta_hashes_outside",
    ],
)
def test_damaged_checkpoint_is_one_line_and_auto_falls_back_to_the_newest_intact(
    tmp_path, damage, capsys
):
    m, opt, cur, st = make()
    ck = Checkpointer(tmp_path, Config(), CTX)
    step(m, opt, cur, st)
    older = ck.save(m, opt, cur, st)
    at_older = {k: v.clone() for k, v in m.state_dict().items()}
    step(m, opt, cur, st)
    where = ck.save(m, opt, cur, st)
    rank_file, meta = where / "rank_00000.json", where / paths.META_FILE
    if damage == "truncate_rank":
        rank_file.write_bytes(rank_file.read_bytes()[:-10])
        match = "has .* bytes, expected"
    elif damage == "truncate_meta":
        meta.write_text(meta.read_text()[:40])
        match = "checkpoint metadata .* is corrupt"
    elif damage == "garble_rank":  # same size, other bytes
        text = rank_file.read_text().replace('"python"', '"pythoX"')
        rank_file.write_text(text)
        match = "rank_00000.json does not match its blake2b-128 checksum"
    elif damage == "flip_tensor_bytes":  # 64 flipped bytes inside a tensor payload
        shard = next(where.glob("*.distcp"))
        data = bytearray(shard.read_bytes())
        for i in range(len(data) // 2, len(data) // 2 + 64):
            data[i] ^= 0xFF
        shard.write_bytes(bytes(data))
        match = "distcp does not match its blake2b-128 checksum"
    elif damage == "meta_lists_outside":  # a listed file outside the checkpoint directory
        body = json.loads(meta.read_text())
        outside = f"../{older.name}/rank_00000.json"
        body["files"][outside] = (older / "rank_00000.json").stat().st_size
        body["hashes"][outside] = body["hashes"]["rank_00000.json"]
        meta.write_text(json.dumps(body))
        match = "lists '../.*', outside the checkpoint"
    elif damage == "meta_hashes_outside":  # a hashed name outside (an older format's check)
        body = json.loads(meta.read_text())
        body["format"] = "braid-checkpoint/1"  # whose hashes need not match its files
        body["hashes"]["../../elsewhere"] = "0" * 32
        meta.write_text(json.dumps(body))
        match = "lists '../../elsewhere', outside the checkpoint"
    else:  # a model shape edited in meta.json
        body = json.loads(meta.read_text())
        body["config"]["model"]["n_layers"] = 2
        meta.write_text(json.dumps(body))
        match = "config does not match its fingerprint"
    explicit = Config().replace(checkpoint={"resume": str(where)})
    with pytest.raises(BraidError, match=match) as e:
        Checkpointer(tmp_path, explicit, CTX).resume(*make())
    assert "\n" not in str(e.value)
    assert f"--checkpoint.resume={older}" in str(e.value)  # advice that works: fork the older
    m2, opt2, cur2, st2 = make()
    ck.resume(m2, opt2, cur2, st2)  # auto: the damaged one is set aside, the older one used
    assert st2.step == 1 and (where.parent / f".corrupt-{where.name}").is_dir()
    assert "is damaged" in capsys.readouterr().err
    assert all(torch.equal(at_older[k], v) for k, v in m2.state_dict().items())


def test_auto_with_no_intact_checkpoint_left_refuses_instead_of_restarting(tmp_path):
    m, opt, cur, st = make()
    step(m, opt, cur, st)
    where = Checkpointer(tmp_path, Config(), CTX).save(m, opt, cur, st)
    (where / "rank_00000.json").write_text("{}")
    with pytest.raises(BraidError, match="no intact checkpoint left") as e:
        Checkpointer(tmp_path, Config(), CTX).resume(*make())
    assert "\n" not in str(e.value)


def test_optimizer_without_state_round_trips(tmp_path):
    """A save before any applied step (e.g. all skipped) must not invent optimizer state."""
    m, opt, cur, st = make()
    st.step, st.skipped_steps = 1, 1
    Checkpointer(tmp_path, Config(), CTX).save(m, opt, cur, st)
    assert not opt.state
    m2, opt2, cur2, st2 = make()
    Checkpointer(tmp_path, Config(), CTX).resume(m2, opt2, cur2, st2)
    assert not opt2.state and st2.skipped_steps == 1


def test_a_save_cut_off_between_its_two_renames_loses_no_checkpoint(tmp_path, capsys):
    """A new save of step X moves the old step_X aside (.old-step_X) before renaming the new
    one in; a process killed between the two leaves .old and .tmp only. Resume puts the old
    one back and uses it; the next prune does not delete it."""
    m, opt, cur, st = make()
    ck = Checkpointer(tmp_path, Config(), CTX)
    step(m, opt, cur, st)
    where = ck.save(m, opt, cur, st)
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    where.rename(where.with_name(f".old-{where.name}"))
    (where.parent / f".tmp-{where.name}").mkdir()  # the new save, not renamed in
    m2, opt2, cur2, st2 = make()
    Checkpointer(tmp_path, Config(), CTX).resume(m2, opt2, cur2, st2)
    assert st2.step == 1 and where.is_dir() and "restored" in capsys.readouterr().err
    assert all(torch.equal(saved[k], v) for k, v in m2.state_dict().items())
    paths.prune(tmp_path, keep_last=1, keep_every=0)
    assert paths.latest(tmp_path) == where
