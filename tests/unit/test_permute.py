"""The gather-only permutations equal index_select / index_add with autograd (values and grads)."""

import torch

from braid.ops.permute import (
    combine_tokens,
    expand_tokens,
    inverse_permutation,
    permute_rows,
    regroup_index,
)


def _routing(N=37, K=3, E=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    topk = torch.stack([torch.randperm(E, generator=g)[:K].sort().values for _ in range(N)])
    order = torch.sort(topk.flatten(), stable=True).indices
    return topk, order, order // K, inverse_permutation(order).view(N, K)


def test_inverse_permutation_inverts():
    perm = torch.randperm(101, generator=torch.Generator().manual_seed(1))
    inv = inverse_permutation(perm)
    assert torch.equal(perm[inv], torch.arange(101)) and torch.equal(inv[perm], torch.arange(101))


def test_permute_rows_matches_index_select_and_its_grad():
    x = torch.randn(50, 7, dtype=torch.float64, requires_grad=True)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(2))
    w = torch.randn(50, 7, dtype=torch.float64)
    (permute_rows(x, perm, inverse_permutation(perm)) * w).sum().backward()
    got = x.grad.clone()
    x.grad = None
    (x.index_select(0, perm) * w).sum().backward()
    assert torch.equal(got, x.grad)


def test_expand_and_combine_match_the_scatter_reference():
    N, K, D = 37, 3, 6
    topk, order, token, pos = _routing(N, K)
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    gates = torch.rand(N, K, dtype=torch.float64, requires_grad=True)
    expert_w = torch.randn(N * K, D, dtype=torch.float64)  # stands in for the experts
    dy = torch.randn(N, D, dtype=torch.float64)

    def reference():
        x_MD = x.index_select(0, token)
        y_MD = x_MD.tanh() * expert_w
        w_M = gates.flatten().index_select(0, order)
        return torch.zeros(N, D, dtype=x.dtype).index_add(0, token, y_MD * w_M[:, None])

    def gathered():
        y_MD = expand_tokens(x, token, pos).tanh() * expert_w
        return combine_tokens(y_MD, gates, pos, order)

    results = []
    for fn in (reference, gathered):
        x.grad = gates.grad = None
        out = fn()
        out.backward(dy)
        results.append((out.detach(), x.grad.clone(), gates.grad.clone()))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_combine_of_no_tokens_is_empty():
    pos = torch.zeros(0, 2, dtype=torch.long)
    out = combine_tokens(
        torch.zeros(0, 4), torch.zeros(0, 2), pos, torch.zeros(0, dtype=torch.long)
    )
    assert out.shape == (0, 4)


def test_regroup_index_groups_received_rows_by_local_expert():
    # recv[w, e] rows arrived from rank w for local expert e, in [rank][expert] blocks.
    recv = torch.tensor([[2, 0, 3], [1, 4, 0]])
    rows = [(w, e) for w in range(2) for e in range(3) for _ in range(int(recv[w, e]))]
    want = sorted(range(len(rows)), key=lambda i: (rows[i][1], rows[i][0], i))
    assert regroup_index(recv, len(rows)).tolist() == want


def _expand_cast_case(fused):
    """expand_tokens gathering an fp32 x straight into bf16 against autograd of
    `x.index_select(0, token).to(bf16)` (its backward: cast to fp32, then index_add)."""
    N, K, D = 29, 3, 16
    _, _, token, pos = _routing(N, K)
    x = torch.randn(N, D, requires_grad=True)
    dy = torch.randn(N * K, D).to(torch.bfloat16)
    want = x.index_select(0, token).to(torch.bfloat16)
    want.backward(dy)
    want_grad, x.grad = x.grad, None
    got = expand_tokens(x, token, pos, torch.bfloat16, fused=fused)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    got.backward(dy)
    assert x.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-6, atol=1e-6)


def test_expand_tokens_casts_as_it_gathers_and_sums_copies_in_fp32():
    _expand_cast_case(fused=False)


def test_expand_tokens_fused_gather_cast_kernel_matches_reference():
    _expand_cast_case(fused=True)  # the compiled one-pass kernel CUDA uses by default


def test_fused_combine_matches_reference_within_one_rounding():
    """The compiled combine CUDA uses by default against the reference Function (fp32: equal
    to 1e-6; bf16: within one rounding and never further from an fp64 truth)."""
    for dtype in (torch.float32, torch.bfloat16):
        N, K, D = 31, 3, 16
        _, order, _, pos = _routing(N, K)
        g = torch.Generator().manual_seed(5)
        y0 = torch.randn(N * K, D, generator=g).to(dtype)
        gates0 = torch.rand(N, K, generator=g).to(dtype)
        dy = torch.randn(N, D, generator=g).to(dtype)
        runs = []
        for fused, cast in ((False, dtype), (True, dtype), (False, torch.float64)):
            y = y0.to(cast).clone().requires_grad_(True)
            gates = gates0.to(cast).clone().requires_grad_(True)
            out = combine_tokens(y, gates, pos, order, fused=fused)
            out.backward(dy.to(cast))
            runs.append((out.detach(), y.grad, gates.grad))
        for ref, got, truth in zip(*runs, strict=True):
            assert got.dtype == dtype
            if dtype == torch.float32:
                torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
                continue
            torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=2e-2)
            err = (got.double() - truth).abs().sum()
            assert err <= (ref.double() - truth).abs().sum() * 1.001


def test_combine_operator_registration_and_math():
    """`braid::combine` (what torch.compile sees on CUDA): fake shapes, autograd and schema
    pass torch's operator checks; values and grads are the reference math's."""
    from braid.ops.permute import combine_backward_math, combine_forward_math, combine_op

    g = torch.Generator().manual_seed(7)
    N, K, D = 11, 3, 8
    order = torch.randperm(N * K, generator=g)
    pos = inverse_permutation(order).view(N, K)
    y = torch.randn(N * K, D, generator=g, requires_grad=True)
    gates = torch.rand(N, K, generator=g, requires_grad=True)
    torch.library.opcheck(combine_op, (y, gates, pos, order))
    out = combine_op(y, gates, pos, order)
    gy = torch.randn(N, D, generator=g)
    out.backward(gy)
    torch.testing.assert_close(out, combine_forward_math(y.detach(), gates.detach(), pos))
    dy, dgates = combine_backward_math(y.detach(), gates.detach(), pos, order, gy)
    torch.testing.assert_close(y.grad, dy)
    torch.testing.assert_close(gates.grad, dgates)
    compiled = torch.compile(combine_op, backend="aot_eager", dynamic=True)
    torch.testing.assert_close(compiled(y.detach(), gates.detach(), pos, order), out.detach())
