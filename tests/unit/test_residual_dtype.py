"""model.residual: the residual stream in fp32 (the embedding's dtype) or, with "compute", in
autocast's bf16, as FSDP's bf16 parameters give it. Without autocast the knob changes nothing;
under autocast the blocks (and the MTP module) see bf16, and losses and gradients stay within
bf16 rounding of the fp32 stream's."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from braid.checkpoint.compat import is_safe
from braid.config import load_config
from braid.errors import BraidError
from braid.model.layers import RMSNorm
from braid.parallel.mesh import ParallelContext
from braid.train.model_setup import build_model
from tiny_run import TINY_MODEL, prepare_words, train_logged

BF16 = torch.bfloat16
MODEL = [*TINY_MODEL, "--moe.num_shared_experts=1", "--moe.first_k_dense=1", "--model.mtp_depth=1"]


def _run(residual: str, amp: bool, seed: int = 0):
    """(loss, grads by name, dtypes the main blocks saw, the MTP block's) of one forward +
    backward."""
    cfg = load_config(None, [*MODEL, f"--model.residual={residual}"])
    torch.manual_seed(seed)
    ctx = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    model = build_model(cfg, ctx)
    seen: list[torch.dtype] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    mtp: list[torch.dtype] = []
    model.mtp[0].block.register_forward_pre_hook(lambda mod, args: mtp.append(args[0].dtype))
    x = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    ctx_amp = torch.autocast("cpu", dtype=BF16) if amp else torch.autocast("cpu", enabled=False)
    with ctx_amp:
        out = model(x[:, :-1])
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
    loss = loss + sum(F.cross_entropy(lg.float().flatten(0, 1), x[:, 1 + k :].flatten())
                      for k, lg in enumerate(out.mtp_logits, start=1))  # fmt: skip
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads, (seen, mtp)


def test_under_autocast_the_blocks_and_the_mtp_module_see_a_bf16_stream():
    _, _, (seen, mtp) = _run("compute", amp=True)
    assert len(seen) == 2 and set(seen) == {BF16}  # both blocks
    assert mtp == [BF16]
    _, _, (seen, mtp) = _run("fp32", amp=True)
    assert len(seen) == 2 and set(seen) == {torch.float32}
    assert mtp == [BF16]  # the MTP block's stream is its input projection's dtype either way


def test_without_autocast_the_knob_changes_nothing():
    loss_a, grads_a, (seen, mtp) = _run("compute", amp=False)
    loss_b, grads_b, _ = _run("fp32", amp=False)
    assert set(seen) == set(mtp) == {torch.float32}
    assert loss_a == loss_b and grads_a.keys() == grads_b.keys()
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


def test_a_bf16_stream_stays_within_bf16_rounding_of_the_fp32_stream():
    """Measured here: the loss 2e-5 apart (relative), each grad at most 1.2% (relative norm of
    the difference), the size of the gap between autocast and no autocast itself."""
    loss_c, grads_c, _ = _run("compute", amp=True)
    loss_f, grads_f, _ = _run("fp32", amp=True)
    assert loss_c != loss_f  # the stream really is rounded
    assert abs(loss_c - loss_f) < 2e-4 * abs(loss_f)
    assert grads_c.keys() == grads_f.keys()
    for name, g in grads_f.items():
        assert (grads_c[name] - g).norm() <= 0.05 * g.norm(), name


def test_stream_norms_meet_a_bf16_input_with_their_weight_in_bf16_and_no_warning():
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 64, dtype=BF16)
    with warnings.catch_warnings():  # unflagged: the mixed-dtype call, as before
        warnings.simplefilter("ignore")
        assert torch.equal(norm(x), F.rms_norm(x, (64,), norm.weight, norm.eps))
    norm.weight_to_input = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the unfused mixed-dtype path warns
        y = norm(x)
    assert y.dtype == BF16
    assert torch.equal(y, F.rms_norm(x, (64,), norm.weight.to(BF16), norm.eps))
    x32 = x.float()
    assert torch.equal(norm(x32), F.rms_norm(x32, (64,), norm.weight, norm.eps))


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_only_the_stream_s_norms_are_flagged(attention):
    """qk_norm and MLA's latent norms keep their fp32 weights: only the norms reading the stream
    (and the MTP module's embedding norm) change with the knob."""
    extra = ["--model.qk_norm=head"] if attention == "gqa" else ["--model.attention=mla"]
    for residual in ("fp32", "compute"):
        cfg = load_config(None, [*MODEL, *extra, f"--model.residual={residual}"])
        ctx = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
        model = build_model(cfg, ctx)
        flagged = {n for n, m in model.named_modules() if getattr(m, "weight_to_input", False)}
        norms = {n for n, m in model.named_modules() if isinstance(m, RMSNorm)}
        stream = {n for n in norms if n.rsplit(".", 1)[-1] in ("attn_norm", "ffn_norm", "hnorm",
                                                              "enorm")} | {"norm"}  # fmt: skip
        stream |= {n for n in norms if n.startswith("mtp.") and n.count(".") == 2
                   and n.endswith(".norm")}  # fmt: skip
        assert flagged == (stream if residual == "compute" else set())
        assert len(norms - stream) >= 3  # the attention's own norms stay unflagged


def test_the_knob_is_checked_and_safe_to_change_on_resume():
    with pytest.raises(BraidError, match="model.residual"):
        load_config(None, ["--model.residual=bf16"])
    assert is_safe("model.residual")


def test_a_tiny_bf16_run_with_a_bf16_stream_learns_like_the_fp32_stream(tmp_path):
    """Through the trainer (bf16 autocast, validation, the optimizer): both runs learn, and
    the bf16 stream's losses stay within 0.2% of the fp32 stream's (measured: 0.035% at most)."""
    words = "every token is routed to two experts and back again".split()
    data = prepare_words(tmp_path, words, seed=0, count=3000)
    base = [
        *MODEL,
        "--train.dtype=bf16",
        "--train.batch_size=8",
        "--train.seq_len=32",
        "--train.steps=8",
        "--train.log_every=2",
        "--train.val_every=4",
        "--train.val_batches=1",
        "--train.progress=false",
        "--checkpoint.every=100",
        f"--data.path={data}",
        f"--run.dir={tmp_path / 'runs'}",
    ]
    ref, ref_res = train_logged([*base, "--run.name=fp32"])
    got, got_res = train_logged([*base, "--run.name=bf16", "--model.residual=compute"])
    assert sorted(got) == sorted(ref) == [2, 4, 6, 8]
    assert ref[8] < ref[2] - 0.3 and got[8] < got[2] - 0.3  # both learn
    assert got != ref  # rounded differently
    for step, loss in ref.items():
        assert abs(got[step] - loss) < 2e-3 * loss, step
    assert (
        abs(got_res["final_val_loss"] - ref_res["final_val_loss"])
        < 2e-3 * ref_res["final_val_loss"]
    )


def test_fp8_linears_and_experts_take_the_bf16_stream():
    """train.precision = "fp8" (CPU emulation) quantizes a bf16 input as it does an fp32 one
    (measured: losses 1e-4 apart, relative)."""
    losses = {}
    for residual in ("fp32", "compute"):
        cfg = load_config(
            None,
            [*MODEL, f"--model.residual={residual}", "--train.precision=fp8", "--train.dtype=bf16"],
        )
        torch.manual_seed(0)
        ctx = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
        model = build_model(cfg, ctx)
        x = torch.randint(
            0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1)
        )
        with torch.autocast("cpu", dtype=BF16):
            out = model(x[:, :-1])
        loss = F.cross_entropy(out.logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[residual] = float(loss.detach())
    assert losses["compute"] != losses["fp32"]
    assert abs(losses["compute"] - losses["fp32"]) < 1e-3 * losses["fp32"]
