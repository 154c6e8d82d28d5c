"""`overlap.split_dw = "all"` in one process: the knob's modes, aliases and refusals; the
attention / dense-FFN dW of the blocks above each MoE layer deferred into that layer's queue
with the gradients of overlap off; and that dW really running inside an exchange window (the
simulated exchange keeps each movement in flight for real host time).

Model: 6 blocks, MoE layers 1, 3 and 4 (shared expert, q/k/v biases), so block 0 is dense with
no MoE below it, block 1 is the lowest MoE layer, block 2 is dense between MoE layers, block 3
is MoE directly above another MoE layer, and block 5 is dense on top. Deferred: blocks 2 and 3
into moe1, block 4 into moe3, block 5 into moe4 (block 3's attention: its own MoE layer runs
its backward before it, so the window below is moe1's); with an untied head, the head into moe4
(the top MoE layer), also with an MTP module. Also with chunks=2, activation checkpointing (the
blocks' forward recomputed in backward) and MLA attention.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from braid.config import load_config, to_toml
from braid.errors import BraidError, ConfigError
from braid.overlap.config import OverlapConfig
from braid.overlap.dense import DeferredLinear
from braid.overlap.session import OverlapSession
from braid.parallel.mesh import ParallelContext
from braid.train.model_setup import build_model

CPU = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
MODEL = [
    "--model.dim=32",
    "--model.n_layers=6",
    "--model.n_heads=2",
    "--model.vocab_size=128",
    "--model.ffn_hidden=64",
    "--model.max_seq_len=32",
    "--model.qkv_bias=true",
    "--train.seq_len=16",
    "--train.device=cpu",
    "--moe.layers=[1,3,4]",
    "--moe.expert_hidden=16",
    "--moe.num_experts=4",
    "--moe.num_shared_experts=1",
]
DEFERRED = {2: 1, 3: 1, 4: 3, 5: 4}  # block -> the MoE layer whose windows take its dW
TOL = 1e-6


# -- the knob ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode"),
    [("off", "off"), ("experts", "experts"), ("all", "all"), ("false", "off"), ("true", "experts")],
)
def test_split_dw_modes_and_bool_aliases(text, mode):
    cfg = load_config(None, [f"--overlap.split_dw={text}"])
    assert cfg.overlap.split_dw == mode
    assert cfg.overlap.defers_dw == (mode != "off")
    assert f'split_dw = "{mode}"' in to_toml(cfg)  # a config holds the name, not the alias
    given = {"off": False, "experts": True}.get(mode, mode)  # the bool alias, or the name
    assert OverlapConfig(split_dw=given).split_dw == mode


def test_default_is_off():
    assert OverlapConfig().split_dw == "off" and not OverlapConfig().defers_dw


@pytest.mark.parametrize("text", ["maybe", "on", "1", '"true"', "[1]", "ALL"])
def test_split_dw_refuses_anything_else_in_one_line(text):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"--overlap.split_dw={text}"])
    msg = str(e.value)
    assert msg.startswith("config overlap.split_dw=") and "\n" not in msg
    assert all(f'"{m}"' in msg for m in ("off", "experts", "all")), msg


def test_validate_refuses_a_bad_mode_given_in_code():
    with pytest.raises(ConfigError, match=r"split_dw='some'.*\"off\", \"experts\", \"all\""):
        OverlapConfig(split_dw="some").validate()


def test_resume_reads_a_saved_bool_as_its_mode():
    from braid.checkpoint.compat import check_resume_config
    from braid.config import Config
    from braid.errors import BraidError

    saved = Config().to_dict()
    saved["overlap"]["split_dw"] = False  # written by a braid whose knob was a bool
    assert check_resume_config(saved, Config(), "ckpt") == []
    saved["overlap"]["split_dw"] = True
    with pytest.raises(BraidError, match="overlap.split_dw 'experts' -> 'off'"):
        check_resume_config(saved, Config(), "ckpt")


# -- gradients ---------------------------------------------------------------------------------


def _train_grads(overrides: list[str], micro: int = 2, ctx: ParallelContext = CPU):
    """Gradients of `micro` micro-batches (accumulated) and the session, from fixed weights
    (fp32: no autocast)."""
    cfg = load_config(None, MODEL + overrides)
    torch.manual_seed(0)
    model = build_model(cfg, ctx)
    lines: list[str] = []
    session = OverlapSession.install(
        model,
        cfg.overlap,
        device=ctx.device,
        tokens_per_rank=32,
        dtype=torch.float32,
        log=lines.append,
    )
    data = torch.randint(0, 128, (micro, 2, 17), generator=torch.Generator().manual_seed(1))
    for x in data.to(ctx.device):
        out = model(x[:, :-1])
        mtp = sum(m.square().mean() for m in out.mtp_logits)  # 0 without MTP modules
        (out.logits.square().mean() + mtp + 0.1 * out.aux_loss).backward()
    leftover = session.flush()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return model, session, grads, leftover, lines


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    err = float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30))
    return err if math.isfinite(err) else math.inf  # NaN never passes


@pytest.fixture(scope="module")
def reference():
    return _train_grads([])[2]


MLA = [
    "--model.qkv_bias=false",  # a GQA option
    "--model.attention=mla",
    "--model.q_lora_rank=16",
    "--model.kv_lora_rank=16",
    "--model.qk_rope_head_dim=8",
    "--model.qk_nope_head_dim=8",
    "--model.v_head_dim=8",
]


def test_all_defers_mla_projections_with_the_gradients_of_overlap_off():
    ref = _train_grads(MLA)[2]
    model, session, grads, leftover, _ = _train_grads(MLA + ["--overlap.split_dw=all"])
    deferred = {n for n, m in model.named_modules() if isinstance(m, DeferredLinear)}
    expect = {
        f"blocks.{b}.attn.{w}" for b in DEFERRED for w in ("wq_a", "wq_b", "wkv_a", "wkv_b", "wo")
    }
    expect |= {f"blocks.{b}.ffn.{w}" for b in (2, 5) for w in ("w13", "w2")}
    assert deferred == expect and leftover == 0
    assert max(_rel(g, ref[n]) for n, g in grads.items()) < TOL


@pytest.mark.parametrize(("chunks", "recompute"), [(1, False), (2, False), (2, True)])
def test_all_defers_the_blocks_above_each_moe_layer_with_the_gradients_of_overlap_off(
    reference, chunks, recompute
):
    model, session, grads, leftover, lines = _train_grads(
        [
            "--overlap.split_dw=all",
            f"--overlap.chunks={chunks}",
            f"--parallel.activation_checkpoint={'true' if recompute else 'false'}",
        ]
    )
    assert leftover == 0  # the flush points at the MoE inputs ran everything
    assert all(len(lo.queue) == 0 and len(lo.dense) == 0 for lo in session.layers.values())
    assert lines == [
        "overlap split_dw=all: attention/dense dW of blocks 2,3 -> moe1; "
        "block 4 -> moe3; block 5 -> moe4"
    ]
    deferred = {n for n, m in model.named_modules() if isinstance(m, DeferredLinear)}
    expect = {f"blocks.{b}.attn.{w}" for b in DEFERRED for w in ("wq", "wkv", "wo")}
    expect |= {f"blocks.{b}.ffn.{w}" for b in (2, 5) for w in ("w13", "w2")}
    assert deferred == expect
    # Every deferred linear's dW went through the queue of its MoE layer: 2 micro-steps.
    per_block = {b: 5 if b in (2, 5) else 3 for b in DEFERRED}
    for moe, lo in session.layers.items():
        tasks = sum(n for b, n in per_block.items() if DEFERRED[b] == moe)
        assert lo.dense.num_run == 2 * tasks, (moe, lo.dense.num_run)
    assert grads.keys() == reference.keys()
    errs = {n: _rel(g, reference[n]) for n, g in grads.items()}
    assert max(errs.values()) < TOL, sorted(errs.items(), key=lambda kv: -kv[1])[:5]


UNTIED = ["--model.tie_embeddings=false"]


def test_all_defers_an_untied_head_into_the_top_moe_layer_with_the_gradients_of_overlap_off():
    ref = _train_grads(UNTIED)[2]
    model, session, grads, leftover, lines = _train_grads(UNTIED + ["--overlap.split_dw=all"])
    assert type(model.output) is DeferredLinear and leftover == 0
    assert lines == [
        "overlap split_dw=all: attention/dense dW of blocks 2,3 -> moe1; "
        "block 4 -> moe3; block 5 and the head -> moe4"
    ]
    # moe4's queue: block 5 (5 linears) and the head, two micro-steps.
    assert session.layers[4].dense.num_run == 2 * (5 + 1)
    errs = {n: _rel(g, ref[n]) for n, g in grads.items()}
    assert errs["output.weight"] < TOL and max(errs.values()) < TOL, max(errs, key=errs.get)
    # A head called by the MTP modules too (their backward also comes first): every call's dW.
    mtp = ["--model.mtp_depth=1", "--model.n_layers=5", "--moe.layers=[1,3,4]"]
    ref = _train_grads(UNTIED + mtp)[2]
    model, session, grads, leftover, _ = _train_grads(UNTIED + mtp + ["--overlap.split_dw=all"])
    assert type(model.output) is DeferredLinear and leftover == 0
    assert max(_rel(g, ref[n]) for n, g in grads.items()) < TOL


def test_a_tied_head_is_not_deferred(reference):
    model, _, grads, _, lines = _train_grads(["--overlap.split_dw=all"])
    assert model.output is None and "head" not in lines[0]
    assert _rel(grads["tok_emb.weight"], reference["tok_emb.weight"]) < TOL


def test_experts_mode_equals_true_and_defers_no_dense_linear(reference):
    model, session, grads, _, lines = _train_grads(["--overlap.split_dw=experts"])
    assert not any(isinstance(m, DeferredLinear) for m in model.modules()) and lines == []
    assert all(lo.split_dw and lo.dense.num_run == 0 for lo in session.layers.values())
    assert max(_rel(g, reference[n]) for n, g in grads.items()) < TOL


def test_reinstalling_without_all_restores_plain_linears():
    cfg = load_config(None, MODEL + ["--overlap.split_dw=all"])
    model = build_model(cfg, CPU)
    kw = dict(device=CPU.device, tokens_per_rank=32, dtype=torch.float32, log=lambda s: None)
    OverlapSession.install(model, cfg.overlap, **kw)
    assert any(isinstance(m, DeferredLinear) for m in model.modules())
    OverlapSession.install(model, OverlapConfig(split_dw="experts"), **kw)
    assert not any(isinstance(m, DeferredLinear) for m in model.modules())
    assert all(type(m).__name__ != "DeferredLinear" for m in model.modules())


def test_an_fsdp_head_keeps_its_fsdp_class_through_defer_and_restore():
    # FSDP2 makes a unit's class `FSDP<cls>` (FSDPModule first); deferring keeps FSDPModule and
    # the original class where FSDP2 looks for it, and restoring brings the very class back.
    from torch.distributed.fsdp import FSDPModule

    from braid.overlap.dense import HEAD, defer_dense, restore_dense

    cfg = load_config(None, MODEL + UNTIED + ["--overlap.split_dw=all"])
    model = build_model(cfg, CPU)
    fsdp_linear = type("FSDPLinear", (FSDPModule, torch.nn.Linear), {})
    model.output.__class__ = fsdp_linear  # as fully_shard does (no process group needed)
    kw = dict(device=CPU.device, tokens_per_rank=32, dtype=torch.float32, log=lambda s: None)
    session = OverlapSession.install(model, cfg.overlap, **kw)
    head = model.output
    assert isinstance(head, FSDPModule) and isinstance(head, DeferredLinear)
    assert type(head).__mro__[type(head)._orig_cls_mro_index] is DeferredLinear
    assert defer_dense(model, session.layers)[HEAD] == 4  # a second install: same result
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        copy.deepcopy(head)
    restore_dense(model)
    assert type(head) is fsdp_linear and "wgrad_sink" not in head.__dict__
    # A unit wrapped after the install (FSDP2's own class over DeferredLinear): refused clearly.
    defer_dense(model, session.layers)
    head.__class__ = type("FSDPDeferredLinear", (FSDPModule, DeferredLinear), {})
    with pytest.raises(BraidError, match="install the overlap engine after parallelizing"):
        restore_dense(model)


# -- inside an exchange window -----------------------------------------------------------------


def _drained(overrides: list[str]) -> dict[int, tuple[int, int]]:
    _, session, _, _, _ = _train_grads(["--overlap.split_dw=all", *overrides], micro=1)
    return {i: (lo.dense.num_run, lo.dense.num_drained) for i, lo in session.layers.items()}


def test_attention_dw_runs_inside_the_exchange_windows_of_the_moe_layer_below():
    # Every movement of the simulated exchange is in flight for 30 ms of host time: the
    # deferred GEMMs (microseconds each) run while `done()` is False, not at the flush point.
    slow = _drained(["--exchange.algorithm=simulated", "--exchange.simulate_latency_us=30000"])
    for moe, (ran, drained) in slow.items():
        assert ran > 0 and drained == ran, (moe, ran, drained)
    # The same count with the local exchange (complete at issue): nothing is in flight, so
    # every deferred dW waits for the flush point, and the check above would fail.
    local = _drained([])
    for moe, (ran, drained) in local.items():
        assert ran > 0 and drained == 0, (moe, ran, drained)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_all_on_cuda_matches_off_and_runs_every_dense_dw_beside_an_exchange():
    # On CUDA the host runs ahead of the GPU: when the pipeline drains, the simulated movement
    # (a sleep kernel on the exchange stream, 2 ms) is still running, so every deferred dW is
    # enqueued inside a window. fp32 (no autocast): CUDA's atomic index_add differs ~1e-7.
    gpu = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cuda", 0))
    sim = ["--train.device=cuda", "--exchange.algorithm=simulated"]
    sim += ["--exchange.simulate_latency_us=2000"]
    ref = _train_grads(sim, ctx=gpu)[2]
    _, session, grads, leftover, _ = _train_grads(sim + ["--overlap.split_dw=all"], ctx=gpu)
    assert leftover == 0
    assert max(_rel(g, ref[n]) for n, g in grads.items()) < 1e-5
    for moe, lo in session.layers.items():
        assert lo.dense.num_run > 0 and lo.dense.num_drained == lo.dense.num_run, moe
