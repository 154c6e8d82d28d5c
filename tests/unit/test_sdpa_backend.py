"""`model.sdpa_backend`: the order of SDPA backends for full causal attention
(braid.model.attend.sdpa_order / causal_sdpa). CPU: the order chosen per setting and device,
the config check, and that the model's attention takes the setting. GPU (`-m gpu`): every
setting against the math backend, forward and backward, eager and compiled:

    PYTHONPATH=src python -m pytest -q -m gpu tests/unit/test_sdpa_backend.py
"""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from braid.errors import ConfigError
from braid.model import attend as attend_mod
from braid.model.attend import causal_sdpa, sdpa_order
from braid.model.attention import Attention
from braid.model.config import SDPA_BACKENDS, ModelConfig
from braid.model.mla import MLA
from braid.model.rope import rope_table

ALL = {SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
       SDPBackend.MATH}  # fmt: skip


def test_cpu_and_torch_keep_pytorchs_order():
    for b in SDPA_BACKENDS:
        assert sdpa_order(b, torch.device("cpu")) is None
    assert sdpa_order("torch", torch.device("cuda")) is None


@pytest.mark.parametrize("name, first", [("cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("flash", SDPBackend.FLASH_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION)])  # fmt: skip
def test_named_backend_first_then_the_others(name, first):
    order = sdpa_order(name, torch.device("cuda"))
    assert order[0] == first and set(order) == ALL and len(order) == len(ALL)


def test_bad_backend_is_a_one_line_error():
    with pytest.raises(ConfigError, match="model.sdpa_backend.*'fa3'"):
        ModelConfig(sdpa_backend="fa3").validate()


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_attention_modules_pass_the_setting(monkeypatch, kind):
    seen = []
    real = attend_mod.causal_sdpa

    def spy(q, k, v, scale, backend="torch"):
        seen.append(backend)
        return real(q, k, v, scale, backend)

    monkeypatch.setattr(attend_mod, "causal_sdpa", spy)
    cfg = ModelConfig(dim=64, n_heads=4, attention=kind, sdpa_backend="flash", kv_lora_rank=16,
                      qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)  # fmt: skip
    mod = (MLA if kind == "mla" else Attention)(cfg)
    mod(torch.randn(2, 5, 64), rope_table(cfg, 5))
    assert seen == ["flash"]


def test_cpu_result_is_the_plain_call():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for b in SDPA_BACKENDS:
        torch.testing.assert_close(causal_sdpa(q, k, v, None, b), want, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("backend", SDPA_BACKENDS)
@pytest.mark.parametrize("heads, kv", [(8, 8), (8, 2)])
def test_every_backend_matches_math_on_gpu(backend, heads, kv):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = lambda h: (2, h, 1024, 128)  # noqa: E731
    q = torch.randn(shape(heads), device="cuda", generator=g).bfloat16().requires_grad_()
    k = torch.randn(shape(kv), device="cuda", generator=g).bfloat16().requires_grad_()
    v = torch.randn(shape(kv), device="cuda", generator=g).bfloat16().requires_grad_()
    do = torch.randn(shape(heads), device="cuda", generator=g).bfloat16()

    def run(fn):
        q.grad = k.grad = v.grad = None
        o = fn(q, k, v)
        o.backward(do)
        return [o.float(), q.grad.float(), k.grad.float(), v.grad.float()]

    with sdpa_kernel([SDPBackend.MATH]):
        want = run(lambda a, b, c: F.scaled_dot_product_attention(
            a.float(), b.float(), c.float(), is_causal=True, enable_gqa=heads != kv))  # fmt: skip
    eager = run(lambda a, b, c: causal_sdpa(a, b, c, None, backend))
    compiled_fn = torch.compile(lambda a, b, c: causal_sdpa(a, b, c, None, backend))
    compiled = run(compiled_fn)
    for got in (eager, compiled):
        for a, b in zip(got, want, strict=True):
            assert ((a - b).abs().max() / b.abs().max()).item() < 2e-2


def test_benchmark_smoke_runs_on_cpu(tmp_path):
    """benchmarks/sdpa_backends.py's `--smoke` (CPU, the math backend only), so the script the
    GPU run uses does not rot."""
    import json

    from bench_import import benchmark_module

    out = tmp_path / "r.json"
    benchmark_module("sdpa_backends").main(["--smoke", "--out", str(out)])
    r = json.loads(out.read_text())
    row = r["kernels"]["smoke"]["MATH"]
    assert row["median_ms"] > 0 and row["rel_err_vs_first"] == [0.0] * 4
    assert r["steps"] == {} and "date" in r and "command" in r
