"""train.cast_weights_once: the micro-steps of an optimizer step run on bf16 copies of the
weights cast once (`braid.train.weight_cast`); losses, gradients and updated weights equal the
per-forward autocast path's bit for bit, and a tiny training run's losses equal too."""

from __future__ import annotations

import contextlib
import copy
import gc

import pytest
import torch
from tests.bench_import import benchmark_module

from braid.config import load_config
from braid.errors import BraidError
from braid.model.transformer import Transformer
from braid.parallel.mesh import ParallelContext
from braid.train.model_setup import build_model
from braid.train.optim import build_optimizer
from braid.train.trainer import loss_fn
from braid.train.weight_cast import StepCast, compute_weights, step_cast
from tiny_run import TINY_MODEL, prepare_words, train_logged

BF16 = torch.bfloat16
MODEL = [*TINY_MODEL, "--moe.num_shared_experts=1", "--moe.first_k_dense=1", "--train.dtype=bf16"]


def _model(extra: list[str] = ()) -> tuple[Transformer, object]:
    cfg = load_config(None, [*MODEL, *extra])
    ctx = ParallelContext(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    return build_model(cfg, ctx), cfg


def _batches(cfg, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, cfg.model.vocab_size, (2, 17), generator=g) for _ in range(n)]


def _step(model, cfg, opt, batches, cast: StepCast | None) -> list[float]:
    """One optimizer step over `batches` (grad accumulation), as the trainer runs it."""
    amp = torch.autocast("cpu", dtype=BF16)
    losses = []
    with cast.swapped() if cast is not None else contextlib.nullcontext():
        for x in batches:
            loss, _ = loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)
            (loss / len(batches)).backward()
            if cast is not None:
                cast.collect()
            losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("feed", [False, True], ids=["swapped", "experts_fed"])
def test_steps_on_weights_cast_once_equal_the_autocast_path_bit_for_bit(feed):
    ref, cfg = _model()
    got = copy.deepcopy(ref)
    cast = StepCast(got, feed_experts=feed)
    assert len(cast.fed) == (2 if feed else 0)  # one MoE block: its w13 and w2
    assert cast.params and all(p.dtype == torch.float32 for p in cast.params)
    opts = [build_optimizer(m, cfg.train, torch.device("cpu")) for m in (ref, got)]
    batches = _batches(cfg, 6)
    for k in range(3):  # three optimizer steps of two micro-steps each
        mb = batches[2 * k : 2 * k + 2]
        want = _step(ref, cfg, opts[0], mb, None)
        seen = _step(got, cfg, opts[1], mb, cast)
        assert seen == want, k
        for (name, a), b in zip(ref.named_parameters(), got.parameters(), strict=True):
            assert b.dtype == a.dtype == torch.float32, name  # fp32 again outside the swap
            assert (a.grad is None) == (b.grad is None), name
            if a.grad is not None:
                assert b.grad.dtype == torch.float32 and torch.equal(a.grad, b.grad), name
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for (name, a), b in zip(ref.named_parameters(), got.parameters(), strict=True):
            assert torch.equal(a, b), name


def test_inside_the_swap_the_weights_are_the_step_s_bf16_cast():
    model, _ = _model()
    cast = StepCast(model)
    w = cast.params[0]
    fp32 = w.detach().clone()
    with cast.swapped():
        assert w.dtype == BF16 and torch.equal(w.detach(), fp32.to(BF16))
        with pytest.raises(RuntimeError, match="re-entrant"):
            with cast.swapped():
                pass
    assert w.dtype == torch.float32 and torch.equal(w.detach(), fp32)
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step: the next swap casts the new values
    with cast.swapped():
        assert torch.equal(w.detach(), (fp32 + 1.0).to(BF16))
        with torch.no_grad():
            w.zero_()  # inside the swap, a refresh casts again from the fp32 weight
        cast.refresh()
        assert torch.equal(w.detach(), (fp32 + 1.0).to(BF16))


def _cast_names(model) -> set[str]:
    picked = {id(p) for p in compute_weights(model)}
    return {n for n, p in model.named_parameters() if id(p) in picked}


def test_the_cast_weights_are_the_linears_and_experts_not_embeddings_norms_or_router():
    names = _cast_names(_model(["--model.tie_embeddings=false"])[0])
    assert "blocks.1.ffn.experts.w13" in names and "blocks.1.ffn.experts.w2" in names
    assert "blocks.0.attn.wq.weight" in names and "output.weight" in names
    assert "blocks.1.ffn.shared.w13.weight" in names
    assert not any("norm" in n or "tok_emb" in n or "router" in n for n in names), names
    tied = _cast_names(_model(["--model.tie_embeddings=true"])[0])  # the head is the embedding
    assert "blocks.0.attn.wq.weight" in tied and not any("emb" in n for n in tied), tied
    fp8 = _cast_names(_model(["--train.precision=fp8"])[0])
    assert fp8 == set(), fp8  # fp8 modules quantise from the fp32 weights
    assert _cast_names(_model(["--train.precision=fp8", '--train.fp8_skip=["attn"]'])[0])


def test_the_experts_are_fed_their_copies_only_with_one_micro_step():
    """One micro-step: the kernel's fp32 dW becomes the grad (4 bytes a weight, not 8); with
    accumulation a swapped bf16 dW added into the fp32 grad (12 bytes) beats an fp32 one (16)."""
    model, _ = _model()
    assert sorted(step_cast(model, True, BF16, 1, micro_steps=1).fed) != []
    assert step_cast(model, True, BF16, 1, micro_steps=2).fed == {}
    assert StepCast(model).fed == {}


def test_cast_weights_once_refuses_where_it_cannot_apply():
    model, _ = _model()
    assert step_cast(model, False, BF16, 1) is None
    with pytest.raises(BraidError, match="one process"):
        step_cast(model, True, BF16, 2)
    with pytest.raises(BraidError, match="bf16 compute dtype"):
        step_cast(model, True, torch.float32, 1)


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--train.compile=true"],
        ["--overlap.chunks=2", "--overlap.split_dw=true", "--overlap.chunk_by=experts"],
        ["--overlap.chunks=2", "--overlap.chunk_by=tokens", "--overlap.chunk_dw=per_chunk"],
        ["--train.grad_accum=1", "--train.compile=true"],
        ["--train.grad_accum=1", "--overlap.chunks=2", "--overlap.chunk_by=tokens"],
        [
            "--train.grad_accum=1",
            "--overlap.chunks=2",
            "--overlap.split_dw=true",
            "--overlap.chunk_by=experts",
        ],
    ],
    ids=[
        "eager",
        "compile",
        "overlap",
        "overlap_tokens",
        "fed_compile",
        "fed_overlap_tokens",
        "fed_overlap_experts",
    ],
)
def test_a_tiny_run_with_weights_cast_once_logs_the_same_losses(tmp_path, extra, monkeypatch):
    """Through the trainer (grad accumulation, validation, the optimizer): eager, with
    train.compile (the blocks compiled once, for the bf16 weights they always see), and with
    the overlap engine (chunks of experts write their dW rows, the shared experts' deferred dW
    flushed inside the swap; chunks of tokens), and with one micro-step per optimizer step,
    where the experts are fed their copies instead of swapped (compiled, chunks of tokens)."""
    words = "every token is routed to two experts and back again".split()
    data = prepare_words(tmp_path, words, seed=0, count=3000)
    base = [
        *MODEL,
        "--train.batch_size=8",
        "--train.grad_accum=2",
        "--train.seq_len=32",
        "--train.steps=6",
        "--train.log_every=2",
        "--train.val_every=3",
        "--train.val_batches=1",
        "--train.progress=false",
        "--checkpoint.every=100",
        f"--data.path={data}",
        f"--run.dir={tmp_path / 'runs'}",
        *extra,
    ]
    ref, ref_res = train_logged([*base, "--run.name=ref"])
    made = []
    init = StepCast.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(StepCast, "__init__", spy)
    got, got_res = train_logged([*base, "--run.name=once", "--train.cast_weights_once=true"])
    assert got == ref and sorted(ref) == [2, 4, 6]
    assert got_res["final_val_loss"] == ref_res["final_val_loss"]
    fed = "--train.grad_accum=1" in extra  # the experts fed their copies only then
    assert len(made) == 1 and len(made[0].fed) == (2 if fed else 0)


def test_the_step_benchmark_runs_its_micro_steps_on_the_cast_copies():
    make_step = benchmark_module("model_step").make_step
    sets = ("train.dtype=bf16", "train.cast_weights_once=true")
    step, _ = make_step("tiny", 1, 16, False, False, sets)
    w = step.cast.params[0]
    for _ in range(2):
        step()
        assert w.dtype == BF16 and w.grad is None
    step.cast.refresh()
    del step
    gc.collect()
    assert w.dtype == torch.float32  # the swap ends with the step


def test_a_run_that_cannot_cast_once_fails_before_writing_anything(tmp_path):
    from braid.train.trainer import train

    cfg = load_config(None, [*TINY_MODEL, "--train.cast_weights_once=true",
                             f"--run.dir={tmp_path / 'runs'}"])  # fmt: skip
    with pytest.raises(BraidError, match="bf16 compute dtype, not torch.float32"):
        train(cfg)  # train.dtype=auto on the CPU: fp32
    assert not (tmp_path / "runs").exists()


def test_bf16_grads_move_to_fp32_as_backward_accumulates_them():
    """No bf16 gradient outlives its backward (a post-accumulate hook takes each one); the
    routed experts' weights are never swapped, their dW lands in their fp32 grads directly."""
    model, cfg = _model()
    cast = StepCast(model, feed_experts=True)
    amp = torch.autocast("cpu", dtype=BF16)
    (x,) = _batches(cfg, 1)
    swapped = [p for i, p in enumerate(cast.params) if i not in cast.fed]
    fed = [p for i, p in enumerate(cast.params) if i in cast.fed]
    assert swapped and len(fed) == 2  # one MoE block: its w13 and w2
    with cast.swapped():
        loss, _ = loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)
        loss.backward()
        assert all(p.grad is None for p in swapped)  # taken before collect()
        held = [g for i, g in enumerate(cast._grads) if i not in cast.fed]
        assert all(g is not None and g.dtype == torch.float32 for g in held)
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in fed)
    assert all(p.grad.dtype == torch.float32 for p in cast.params)


def test_drop_grads_forgets_the_fed_experts_grads_too():
    model, cfg = _model()
    cast = StepCast(model, feed_experts=True)
    amp = torch.autocast("cpu", dtype=BF16)
    (x,) = _batches(cfg, 1)
    with cast.swapped():
        loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)[0].backward()
        cast.collect()
        cast.drop_grads()
        assert all(cast.params[i].grad is None for i in cast.fed)
    assert all(p.grad is None for p in cast.params)


def test_the_experts_gemms_read_the_step_s_copy_not_a_fresh_cast():
    model, cfg = _model()
    cast = StepCast(model, feed_experts=True)
    experts = next(m for m in model.modules() if hasattr(m, "w13_compute"))
    amp = torch.autocast("cpu", dtype=BF16)
    (x,) = _batches(cfg, 1)

    def loss() -> float:
        with torch.no_grad():
            return float(loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)[0])

    with cast.swapped():
        assert experts.w13_compute.dtype == BF16
        assert torch.equal(experts.w13_compute, experts.w13.detach().to(BF16))
        before = loss()
        with torch.no_grad():
            experts.w13.mul_(3.0)  # the fp32 weight moves; the step's copy does not
        assert loss() == before
        cast.refresh()
        assert loss() != before
    assert experts.w13_compute is None and experts.w2_compute is None


def test_an_exception_inside_the_swap_leaves_fp32_weights_and_grads():
    model, cfg = _model()
    cast = StepCast(model)
    before = [p.detach().clone() for p in cast.params]
    amp = torch.autocast("cpu", dtype=BF16)
    (x,) = _batches(cfg, 1)
    with pytest.raises(KeyboardInterrupt):
        with cast.swapped():
            loss, _ = loss_fn(model, x[:, :-1], x[:, 1:], cfg, amp)
            loss.backward()
            raise KeyboardInterrupt
    for p, b in zip(cast.params, before, strict=True):
        assert p.dtype == torch.float32 and torch.equal(p.detach(), b)
        assert p.grad is not None and p.grad.dtype == torch.float32
    with cast.swapped():  # usable again
        assert cast.params[0].dtype == BF16
