"""The device gate (train/step.py) applies exactly the steps the host gate applies, with the
same weights, moments and step counts after a non-finite step (skipped, or stopping the run),
and the trainer's device-gated loop matches its host-gated loop on the CPU (fused AdamW runs
there too): same losses, same skip count, the same one-line error naming the bad step and its
first non-finite gradient, and no checkpoint at or after that step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import braid.train.trainer as trainer
from braid.checkpoint import paths
from braid.config import load_config
from braid.errors import BraidError
from braid.parallel.clip import clip_grad_norm
from braid.train.step import DeviceGate, supports_device_gate
from tiny_run import prepare_words


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _grads(model, step, bad_step, bad_param):
    g = torch.Generator().manual_seed(step)
    for i, p in enumerate(model.parameters()):
        p.grad = torch.randn(p.shape, generator=g)
        if step == bad_step and i == bad_param:
            p.grad[0] = float("nan")


@pytest.mark.parametrize("skip", [True, False])
def test_device_gate_applies_exactly_the_steps_the_host_gate_applies(skip):
    bad_step, bad_param = 3, 2
    ref, dev = _model(), _model()
    opt_r = torch.optim.AdamW(ref.parameters(), lr=0.1, fused=True)
    opt_d = torch.optim.AdamW(dev.parameters(), lr=0.1, fused=True)
    assert supports_device_gate(opt_d)
    gate = DeviceGate(torch.device("cpu"), skip_nonfinite=skip)
    stopped = False
    for step in range(1, 6):
        _grads(ref, step, bad_step, bad_param)
        _grads(dev, step, bad_step, bad_param)
        loss = torch.tensor(1.0 / step)
        # Reference: read on the host, step or skip (or stop for good).
        norm_r = clip_grad_norm(ref, 1.0)
        if not stopped and torch.isfinite(norm_r):
            opt_r.step()
        elif not skip:
            stopped = True
        opt_r.zero_grad()
        sums = []
        norm_d = clip_grad_norm(dev, 1.0, sums_out=sums)
        names = [n for n, _ in dev.named_parameters()]
        applied = gate.step(opt_d, step, loss, norm_d, torch.stack(sums), names)
        assert bool(applied) == (step != bad_step and not (stopped and not skip))
        opt_d.zero_grad()
    for a, b in zip(ref.parameters(), dev.parameters(), strict=True):
        assert torch.equal(a, b)
        sa, sb = opt_r.state[a], opt_d.state[b]
        assert torch.equal(sa["step"], sb["step"]) and torch.equal(sa["exp_avg"], sb["exp_avg"])
    view = gate.read()
    assert view.bad_step == bad_step and not view.bad_loss
    assert gate.culprit(view) == names[bad_param] == "2.weight"
    assert view.skipped == (1 if skip else 3)
    assert view.loss == pytest.approx(1.0 / (5 if skip else 2))


def test_device_gate_names_a_nonfinite_loss():
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=0.1, fused=True)
    gate = DeviceGate(torch.device("cpu"), skip_nonfinite=True, loss=7.0)
    _grads(m, 1, -1, -1)
    gate.step(opt, 1, torch.tensor(float("inf")), clip_grad_norm(m, 0.0))
    view = gate.read()
    assert view.bad_step == 1 and view.bad_loss and view.loss == 7.0 and view.skipped == 1
    assert all(int(s["step"]) == 0 for s in opt.state.values())


TINY = [
    "--model.vocab_size=300",
    "--model.dim=32",
    "--model.n_heads=4",
    "--model.n_layers=2",
    "--model.ffn_hidden=64",
    "--moe.expert_hidden=32",
    "--moe.num_experts=4",
    "--moe.bias_balance=true",
    "--train.batch_size=4",
    "--train.seq_len=16",
    "--train.steps=6",
    "--train.val_batches=1",
    "--train.progress=false",
    "--train.log_every=5",
    "--checkpoint.every=2",
    "--checkpoint.keep_last=5",
]
BAD = 4


@pytest.fixture(scope="module")
def overrides(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    words = "a step that never waits for the host is masked on the device".split()
    data = prepare_words(root, words, seed=3, count=6000)
    return TINY + [f"--data.path={data}", f"--run.dir={root / 'runs'}"]


def _train(monkeypatch, overrides, name, *, device_gate, poison=0, extra=(), reads=None):
    real_opt, real_loss, calls = trainer.build_optimizer, trainer.loss_fn, [0]
    reads = [] if reads is None else reads

    def fused(model, cfg, device):  # fused AdamW on the CPU: it takes the device-side mask
        groups = [
            {k: g[k] for k in ("params", "weight_decay")}
            for g in real_opt(model, cfg, device).param_groups
        ]
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)

    def poisoned(*args, **kwargs):
        loss, parts = real_loss(*args, **kwargs)
        calls[0] += 1
        return (loss * float("nan") if calls[0] == poison else loss), parts

    monkeypatch.setattr(trainer, "build_optimizer", fused)
    monkeypatch.setattr(trainer, "loss_fn", poisoned)
    monkeypatch.setattr(trainer, "supports_device_gate", lambda opt: device_gate)

    class Counted(DeviceGate):
        def read(self):
            reads.append(self)
            return super().read()

    monkeypatch.setattr(trainer, "DeviceGate", Counted)
    cfg = load_config(None, [*overrides, f"--run.name={name}", *extra])
    return trainer.train(cfg)


def test_device_gated_loop_matches_host_gated_loop_with_a_skipped_step(monkeypatch, overrides):
    kw = {"poison": BAD, "extra": ["--train.skip_nonfinite=true"]}
    host_reads, dev_reads = [], []
    host = _train(monkeypatch, overrides, "host", device_gate=False, reads=host_reads, **kw)
    dev = _train(monkeypatch, overrides, "device", device_gate=True, reads=dev_reads, **kw)
    assert not host_reads and len(dev_reads) == 4  # checkpoints at 2 and 4, logs at 5 and 6
    assert host["skipped_steps"] == dev["skipped_steps"] == 1
    assert dev["final_train_loss"] == host["final_train_loss"]
    assert dev["final_val_loss"] == host["final_val_loss"]


def test_device_gated_nan_stops_naming_the_step_with_no_later_checkpoint(monkeypatch, overrides):
    with pytest.raises(BraidError) as e:
        _train(monkeypatch, overrides, "stop", device_gate=True, poison=BAD)
    msg = str(e.value)
    assert msg.startswith(f"non-finite gradient norm at step {BAD} (first bad gradient: ")
    assert "unknown" not in msg
    run_dir = Path(overrides[-1].split("=", 1)[1]) / "stop"
    assert [s for s, _ in paths.complete_checkpoints(run_dir)] == [2]
