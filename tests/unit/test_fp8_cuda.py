"""CUDA fp8 GEMMs (torch._scaled_grouped_mm / torch._scaled_mm, fused compiled quantisers)
against the CPU emulation of the same recipe. Needs an SM90+ GPU:

    PYTHONPATH=src python -m pytest -q -m gpu tests/unit/test_fp8_cuda.py

Bounds: the quantisers agree bit for bit (power-of-two scales leave one rounding, the cast);
the GEMMs differ by bf16 output rounding and fast accumulation only: |cuda - emulated| <=
2^-7 |y| + 2^-7 max|y| elementwise (fast accumulation keeps partial sums in fp22-ish precision
on Hopper; measured errors are far below the bound)."""

import pytest
import torch

from braid.moe.experts import GroupedExperts
from braid.ops import fp8
from braid.ops.fp8_gemm import fp8_grouped_linear, fp8_linear
from braid.ops.fp8_stats import Fp8Stats
from braid.ops.grouped_gemm import counts_to_offsets

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
        reason="needs an SM90+ GPU",
    ),
]
COUNTS = [0, 37, 5, 200, 1, 0, 64, 13]  # ragged, with empty experts


def close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    assert got is not None and want is not None, f"{what}: a gradient is missing"
    got, want = got.float().cpu(), want.float().cpu()
    bound = 2.0**-7 * want.abs() + 2.0**-7 * want.abs().max()
    worst = ((got - want).abs() - bound).max().item()
    rel = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
    assert worst <= 0, f"{what}: exceeds the bound by {worst} (max error / max |want| = {rel:.2e})"


def test_compiled_quantisers_equal_eager_bitwise():
    x = torch.randn(333, 512, dtype=torch.bfloat16) * torch.logspace(-4, 4, 512).bfloat16()
    x[7] = 0
    for fn in (fp8.quantize, fp8.quantize_cols, fp8.quantize_blocks):
        qc, sc = fn(x.cuda())
        qe, se = fn(x)
        assert torch.equal(sc.cpu(), se), fn.__name__
        assert torch.equal(qc.cpu().view(torch.uint8), qe.view(torch.uint8)), fn.__name__


@pytest.mark.parametrize("D, F, dw8", [(256, 512, False), (512, 128, False), (256, 512, True)])
def test_grouped_linear_cuda_equals_emulation(D, F, dw8):
    g = torch.Generator().manual_seed(0)
    R = sum(COUNTS)
    x = torch.randn(R, D, generator=g).bfloat16()
    w = torch.randn(len(COUNTS), D, F, generator=g) * 0.05
    gy = torch.randn(R, F, generator=g).bfloat16()
    outs = {}
    for dev in ("cpu", "cuda"):
        xd = x.to(dev, copy=True).requires_grad_()  # a fresh leaf per device
        wd = w.to(dev, copy=True).requires_grad_()
        offs = counts_to_offsets(torch.tensor(COUNTS, device=dev))
        y = fp8_grouped_linear(xd, wd, offs, fp8_wgrad=dw8)
        y.backward(gy.to(dev))
        outs[dev] = (y, xd.grad, wd.grad)
    for what, got, want in zip(("y", "dx", "dw"), outs["cuda"], outs["cpu"], strict=True):
        close(got, want, what)


@pytest.mark.parametrize("dw8", [False, True])
def test_dense_linear_cuda_equals_emulation(dw8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 96, 256, generator=g).bfloat16()
    w = torch.randn(384, 256, generator=g) * 0.05
    gy = torch.randn(4, 96, 384, generator=g).bfloat16()
    outs = {}
    for dev in ("cpu", "cuda"):
        xd = x.to(dev, copy=True).requires_grad_()  # a fresh leaf per device
        wd = w.to(dev, copy=True).requires_grad_()
        y = fp8_linear(xd, wd, fp8_wgrad=dw8)
        y.backward(gy.to(dev))
        outs[dev] = (y, xd.grad, wd.grad)
    for what, got, want in zip(("y", "dx", "dw"), outs["cuda"], outs["cpu"], strict=True):
        close(got, want, what)


def test_fp8_experts_compile_and_stay_within_the_fp8_bound():
    """Compiled fp8 experts against eager ones and both against fp32. They are not bitwise
    equal: eager rounds the SwiGLU output to bf16 before its e4m3 cast, the compiler fuses
    SwiGLU into the quantiser and casts from fp32, so a few percent of the elements (bf16
    values on an e4m3 rounding tie) land one e4m3 step apart. Stated bounds, norm-wise: each
    within 10% of fp32 (two fp8 GEMMs per direction, as on the CPU), each other within 3%."""
    torch.manual_seed(2)
    ex = GroupedExperts(8, 256, 128).cuda()
    ex.w13.data.normal_(0, 0.05)
    ex.w2.data.normal_(0, 0.05)
    counts = torch.tensor(COUNTS, device="cuda")
    x = torch.randn(sum(COUNTS), 256, device="cuda")
    res = {}
    for mode in ("fp32", "eager", "compiled"):
        ex.fp8_stats = None if mode == "fp32" else Fp8Stats()
        xi = x.clone().requires_grad_()
        ex.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode != "fp32"):
            fwd = torch.compile(ex) if mode == "compiled" else ex
            y = fwd(xi, counts)
        y.float().square().sum().backward()
        res[mode] = [t.float() for t in (y, xi.grad, ex.w13.grad, ex.w2.grad)]
    names = ("y", "dx", "dw13", "dw2")
    pairs = (("eager", "fp32", 0.1), ("compiled", "fp32", 0.1), ("compiled", "eager", 0.03))
    for a, b, bound in pairs:
        for what, got, want in zip(names, res[a], res[b], strict=True):
            rel = ((got - want).norm() / want.norm()).item()
            assert rel < bound, f"{what}: {a} vs {b}: {rel:.3e} >= {bound}"


def _codes_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.equal(a.view(torch.uint8).cpu(), b.view(torch.uint8).cpu()), what


def _dirty() -> None:
    """Leave 0xFF bytes in the blocks the caching allocator hands out next, in its large pool
    (one 256 MiB block) and its small one (blocks of 1 MiB and less: scales, small codes), so
    an output element a kernel fails to write cannot pass as a zero or an earlier result."""
    torch.cuda.empty_cache()
    big = torch.full((256 << 20,), 255, dtype=torch.uint8, device="cuda")
    small = [torch.full((1 << 20,), 255, dtype=torch.uint8, device="cuda") for _ in range(32)]
    del big, small


@pytest.mark.parametrize("tile_rows", [128, 16])
def test_triton_quantisers_equal_the_reference_bitwise(monkeypatch, tile_rows):
    """Every Triton quantiser against `braid.ops.fp8`'s reference, bit for bit: rows read in
    one step and in several (wider than ONE_STEP_MAX), groups split over several programs
    and, with 16-row tiles, several tiles per program."""
    from braid.ops import fp8_triton, swiglu_triton
    from braid.ops.fp8_gemm import padded_groups

    monkeypatch.setattr(fp8_triton, "GROUP_ROWS", tile_rows)
    wide = fp8_triton.ONE_STEP_MAX + 700  # several steps per row
    g = torch.Generator().manual_seed(3)
    for D in (1500, wide):
        x = (torch.randn(300, D, generator=g) * torch.logspace(-4, 4, D)).bfloat16().cuda()
        x[7] = 0
        _dirty()
        q, s = fp8_triton.quantize_rows(x)
        qr, sr = fp8.quantize_ref(x)
        assert torch.equal(s, sr), D
        _codes_equal(q, qr, f"rows {D}")
    x = x[:, :1500].contiguous()
    w = torch.randn(4, 96, 1100, generator=g).cuda()  # fp32 master weights, leading dims
    q, s = fp8_triton.quantize_rows(w.view(-1, 1100))
    qr, sr = fp8.quantize_ref(w.view(-1, 1100))
    assert torch.equal(s, sr)
    _codes_equal(q, qr, "fp32 rows")
    for F in (1100, 9000, wide):  # one step per row (two sizes), and several
        h = (torch.randn(300, 2 * F, generator=g) * 3).bfloat16().cuda()
        _dirty()
        q, s = fp8_triton.swiglu_quantize(h)
        qr, sr = fp8.quantize_ref(swiglu_triton.forward(h))
        assert torch.equal(s, sr)
        _codes_equal(q, qr, f"swiglu {F}")
        dy = torch.randn(300, F, generator=g).bfloat16().cuda()
        _dirty()
        dh, q, s = fp8_triton.swiglu_backward_quantize(h, dy)
        dhr = swiglu_triton.backward(h, dy)
        assert torch.equal(dh, dhr)
        qr, sr = fp8.quantize_ref(dhr)
        assert torch.equal(s, sr)
        _codes_equal(q, qr, f"swiglu backward {F}")
    assert torch.equal(fp8_triton.dequantize_rows(qr, sr, torch.bfloat16),
                       fp8.dequantize(qr, sr, torch.bfloat16))  # fmt: skip
    counts = torch.tensor([0, 37, 5, 200, 1, 0, 64, 13, 0], device="cuda")  # empty at both ends
    R = int(counts.sum())
    offs = counts_to_offsets(counts)
    gid, dest, pend, width = padded_groups(offs, R)
    xg = torch.cat([x, x])[:R, :200].contiguous()  # R = 320 rows
    # split_rows=16: a group's rows span several programs (their amaxes meet atomically)
    for srow, split in [(None, 1024), ("codes", 1024), (None, 16), ("codes", 16)]:
        xin, sin = (xg, None) if srow is None else fp8.quantize_ref(xg)
        ref_in = xg if srow is None else fp8.dequantize(xin, sin, torch.bfloat16)
        _dirty()
        q, s = fp8_triton.quantize_groups(xin, offs, pend, width, sin, split_rows=split)
        qr, sr = fp8.quantize_groups_ref(ref_in, gid, dest, 9, width)
        assert torch.equal(s, sr), (srow, split)
        _codes_equal(q, qr, f"groups from {srow or 'bf16'}, split {split}")  # and the zeros
    w = torch.randn(3, 200, 1100, generator=g).cuda() * torch.logspace(-3, 3, 1100).cuda()
    w[1, :, 5] = 0  # a zero column keeps scale 1
    for split in (1024, 64):
        _dirty()
        q, s = fp8_triton.quantize_cols(w, split_rows=split)
        qr, sr = fp8.quantize_cols_ref(w)
        assert torch.equal(s, sr), split
        _codes_equal(q, qr, f"columns, split {split}")


@pytest.mark.parametrize("dw8", [False, True])
def test_fused_experts_equal_the_unfused_composition_bitwise(dw8):
    from braid.ops.fp8_experts import fp8_swiglu_experts
    from braid.ops.swiglu import swiglu

    g = torch.Generator().manual_seed(4)
    R, D, F = sum(COUNTS), 256, 384
    x = torch.randn(R, D, generator=g).bfloat16().cuda()
    w13 = (torch.randn(8, D, 2 * F, generator=g) * 0.05).cuda()
    w2 = (torch.randn(8, F, D, generator=g) * 0.05).cuda()
    gy = torch.randn(R, D, generator=g).bfloat16().cuda()
    offs = counts_to_offsets(torch.tensor(COUNTS, device="cuda"))

    def composition(x, w13, w2, offs, **kw):
        h = fp8_grouped_linear(x, w13, offs, **kw)
        return fp8_grouped_linear(swiglu(h), w2, offs, **kw)

    res = []
    for fn in (fp8_swiglu_experts, composition):
        xs, a, b = (t.clone().requires_grad_() for t in (x, w13, w2))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(xs, a, b, offs, fp8_wgrad=dw8)
        y.backward(gy)
        res.append((y, xs.grad, a.grad, b.grad))
    for what, got, want in zip(("y", "dx", "dw13", "dw2"), *res, strict=True):
        assert torch.equal(got, want), what


@pytest.mark.parametrize("dw8", [False, True])
def test_compiled_fp8_linear_operator_equals_eager_bitwise(monkeypatch, dw8):
    """`Fp8Linear` under torch.compile (Inductor, fullgraph: the `braid::fp8_linear` operator,
    no graph break) against the eager Function: the same kernels, so the same bits for y, dx and
    dW. Inductor skips the bias's rounding to bf16 before the add unless told to emulate eager's
    casts. The bias is added outside the operator, so its grad is Inductor's own reduction: the
    sum of the bf16 output grads, kept in fp32 where eager rounds it to bf16 first (as for any
    `nn.Linear` under autocast): equal within that one rounding."""
    from braid.model.fp8_linear import Fp8Linear

    monkeypatch.setattr(torch._inductor.config, "emulate_precision_casts", True)
    torch._dynamo.reset()
    torch.manual_seed(5)
    lin = Fp8Linear(512, 384, bias=True).cuda()
    lin.fp8_wgrad = dw8
    x = torch.randn(4, 96, 512, device="cuda")
    res = []
    for fn in (lin, torch.compile(lin, fullgraph=True)):
        xi = x.clone().requires_grad_()
        lin.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(xi)
        y.float().square().sum().backward()
        res.append((y, xi.grad, lin.weight.grad, lin.bias.grad))
    for what, got, want in zip(("y", "dx", "dw", "db"), *res, strict=True):
        assert got.abs().sum() > 0, what
        if what == "db":  # eager's bf16 rounding of the sum (8 bits of mantissa)
            torch.testing.assert_close(got, want, rtol=2**-8, atol=0.0)
            assert torch.equal(got, got.bfloat16().float()), "eager db is the bf16 sum"
        else:
            assert torch.equal(got, want), what
