"""fp8 quantisation (braid.ops.fp8) against a naive per-row reference written here, and the
numerics counters (braid.ops.fp8_stats)."""

import math

import pytest
import torch

from braid.ops import fp8
from braid.ops.fp8_stats import Fp8Stats


def naive_row(row: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One row: scale = the smallest power of two >= max|x| / 448 (1 for a zero row), codes
    by a plain fp32 division and cast (exact: dividing by a power of two)."""
    amax = float(row.abs().max())
    if amax == 0:
        s = 1.0
    else:
        r = torch.tensor(amax, dtype=torch.float32).item() / 448.0  # as fp32 would hold amax
        r = float(torch.tensor(r, dtype=torch.float32))
        m, e = math.frexp(r)  # r = m * 2^e, m in [0.5, 1)
        s = 2.0 ** (e - 1) if m == 0.5 else 2.0**e
    return (row.float() / s).to(torch.float8_e4m3fn), s


def hard_rows(dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 256, generator=g)
    x[1] *= 1e-5  # small row
    x[2] *= 3e4  # large row
    x[3] = 0.0  # zero row
    x[4, 0] = 1e4  # one outlier: the rest falls into e4m3's subnormal range
    x[5] = 448.0 * 2.0**-3  # an exact power-of-two boundary
    x[6, :128] *= 1e-5  # two very different halves (blockwise helps)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rowwise_quantize_equals_naive_bitwise(dtype):
    x = hard_rows(dtype)
    q, s = fp8.quantize(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (9, 1) and s.dtype == torch.float32
    for r in range(x.shape[0]):
        q_ref, s_ref = naive_row(x[r])
        assert s[r, 0].item() == s_ref, r
        assert torch.equal(q[r].view(torch.uint8), q_ref.view(torch.uint8)), r
    # absmax lands in (224, 448] for every nonzero row: at most one bit of headroom
    ratio = x.float().abs().amax(1) / s[:, 0]
    nz = x.float().abs().amax(1) > 0
    assert ((ratio[nz] > 224) & (ratio[nz] <= 448)).all()


def test_roundtrip_within_stated_bound_and_tight():
    x = hard_rows()
    q, s = fp8.quantize(x)
    err = (fp8.dequantize(q, s) - x).abs()
    b = fp8.bound(x, s)
    assert (err <= b).all()
    assert (err > 0.5 * b).any()  # the bound is not vacuous: some element comes close to it
    # quantising the dequantised rows again is the identity (what quantise-once relies on)
    q2, s2 = fp8.quantize(fp8.dequantize(q, s, torch.bfloat16))
    assert torch.equal(s2, s) and torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


def test_columnwise_equals_rowwise_of_the_transpose():
    w = torch.randn(3, 40, 24) * torch.logspace(-3, 3, 24)
    q, s = fp8.quantize_cols(w)
    q_ref, s_ref = fp8.quantize(w.transpose(1, 2).contiguous())
    assert q.shape == (3, 24, 40) and q.is_contiguous() and s.shape == (3, 24, 1)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_blockwise_scales_each_tile_alone():
    x = hard_rows()
    q, s = fp8.quantize_blocks(x)
    assert s.shape == (9, 2)
    for r in range(9):
        for b in range(2):
            q_ref, s_ref = naive_row(x[r, b * 128 : (b + 1) * 128])
            assert s[r, b].item() == s_ref
            assert torch.equal(
                q[r, b * 128 : (b + 1) * 128].view(torch.uint8), q_ref.view(torch.uint8)
            )
    # row 6 has a tiny half: tiles keep it far more accurate than one scale per row
    row_err = (fp8.dequantize(*fp8.quantize(x[6:7])) - x[6:7]).abs()[0, :128].max()
    deq = (q[6].float().view(2, 128) * s[6, :, None]).flatten()
    assert (deq - x[6]).abs()[:128].max() < row_err / 5


def test_pow2_ceil_is_exact():
    r = torch.tensor([1.0, 1.5, 2.0, 3.0e-20, 7.9e30, 0.75, 2.0**-126 * 3])
    want = torch.tensor([2.0 ** math.ceil(math.log2(v)) for v in r.tolist()])
    assert torch.equal(fp8.pow2_ceil(r), want)


def test_stats_count_amax_and_underflow_only_while_active():
    st = Fp8Stats()
    x = hard_rows()[4:5]  # an outlier pushes the small values below e4m3's subnormals
    q, _ = fp8.quantize(x)
    st.record("a", x, q)
    assert st.read() == {}  # inactive: nothing kept
    st.active = True
    st.record("a", x, q)
    st.record("a", x * 2, fp8.quantize(x * 2)[0])
    out = st.read()
    flushed = ((q.float() == 0) & (x != 0)).sum().item()
    assert flushed > 0
    assert out["fp8/a/amax"] == pytest.approx(2e4)
    assert out["fp8/a/underflow"] == pytest.approx(2 * flushed / (2 * x.numel()))
    assert st.read() == {}  # reading resets
    st.record("a", x * 2, fp8.quantize(x * 2)[0])  # the larger first: amax is the running max
    st.record("a", x, q)
    assert st.read()["fp8/a/amax"] == pytest.approx(2e4)


def test_triton_quantisers_only_on_gpus_with_e4m3_casts(monkeypatch):
    from braid.ops import fp8_triton

    for cap, hip, want in [((9, 0), None, True), ((8, 9), None, True), ((8, 0), None, False),
                           ((9, 4), "6.2", False)]:  # fmt: skip
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None, c=cap: c)
        monkeypatch.setattr(torch.version, "hip", hip)
        fp8_triton.fp8_casts.cache_clear()
        assert fp8_triton.fp8_casts(0) is want, (cap, hip)
    fp8_triton.fp8_casts.cache_clear()
    assert not fp8_triton.available(torch.ones(3))  # CPU tensors never
