"""Compressor unit tests (no ranks): round-trip error within each compressor's stated bound,
wire sizes, the registry, straight-through gradients, and the clean `symmetric` refusal."""

from __future__ import annotations

import pytest
import torch

from braid.errors import BraidError, ConfigError
from braid.exchange.compress import COMPRESSORS, get_compressor, straight_through
from braid.exchange.config import ExchangeConfig

CASES = [
    ("none", ExchangeConfig()),
    ("bf16", ExchangeConfig()),
    ("int8", ExchangeConfig()),
    ("fp8", ExchangeConfig(scale_block=128)),
    ("fp8", ExchangeConfig(scale_block=0)),
    ("fp8", ExchangeConfig(scale_block=7)),
]


def _hard_rows(dim: int) -> torch.Tensor:
    """Rows spanning 12 decades, an all-zero row, a one-hot row, int8 rounding ties, subnormals."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, dim, generator=g) * torch.logspace(-6, 6, 40)[:, None]
    x[3] = 0
    x[4] = 0
    x[4, dim // 2] = -3.0
    x[5] = torch.arange(dim) * 0.5 - dim / 4  # many exact halves of the int8 step
    x[6] = torch.randn(dim, generator=g) * 1e-3
    x[6, 0] = 1e3  # fp8 subnormal range for the rest of the row/block
    return x


@pytest.mark.parametrize("name, cfg", CASES, ids=lambda c: getattr(c, "scale_block", c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 100, 256])
def test_roundtrip_error_within_stated_bound(name, cfg, dtype, dim):
    c = get_compressor(name)(cfg)
    x = _hard_rows(dim).to(dtype)
    p = c.encode(x)
    assert p.shape[0] == x.shape[0] and p.dtype in (torch.float32, torch.bfloat16, torch.uint8)
    y = c.decode(p, dim, dtype)
    assert y.dtype == dtype and y.shape == x.shape
    err = (y.float() - x.float()).abs()
    assert bool((err <= c.bound(x) * (1 + 1e-6)).all()), float((err - c.bound(x)).max())
    assert torch.equal(y[3], x[3])  # zero rows stay exactly zero


def test_stated_relative_bounds_hold_on_gaussian_rows():
    """The headline numbers of docs/exchange.md on N(0,1) rows of width 2048 (fp32)."""
    x = torch.randn(256, 2048, generator=torch.Generator().manual_seed(1))
    amax = x.abs().amax(1, keepdim=True)
    int8 = get_compressor("int8")()
    assert bool(((int8.roundtrip(x) - x).abs() <= amax / 254 * (1 + 1e-6)).all())
    fp8 = get_compressor("fp8")(ExchangeConfig(scale_block=128))
    rel = (fp8.roundtrip(x) - x).norm() / x.norm()
    assert rel < 2.0**-4
    bf16 = get_compressor("bf16")()
    assert bool(((bf16.roundtrip(x) - x).abs() <= x.abs() * 2.0**-8).all())


def test_wire_bytes_shrink_as_documented():
    D = 2048
    assert get_compressor("none")().wire_bytes(D, torch.bfloat16) == 2 * D
    assert get_compressor("bf16")().wire_bytes(D, torch.float32) == 2 * D
    assert get_compressor("bf16")().wire_bytes(D, torch.bfloat16) == 2 * D
    assert get_compressor("int8")().wire_bytes(D, torch.bfloat16) == D + 4
    assert get_compressor("fp8")(ExchangeConfig(scale_block=128)).wire_bytes(D, torch.bfloat16) == (
        D + 4 * D // 128
    )
    assert get_compressor("fp8")(ExchangeConfig(scale_block=0)).wire_bytes(D, torch.float32) == (
        D + 4
    )


def test_empty_payload_round_trips():
    for name, cfg in CASES:
        c = get_compressor(name)(cfg)
        x = torch.empty(0, 64)
        assert c.decode(c.encode(x), 64, x.dtype).shape == (0, 64)


def test_straight_through_gradient_is_identity():
    x = torch.randn(8, 64, requires_grad=True)
    g = torch.randn(8, 64)
    y = straight_through(x, get_compressor("fp8")())
    assert not torch.equal(y, x)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_registry_lists_builtins_and_resolves_dotted_plugin():
    assert {"none", "bf16", "int8", "fp8"} <= set(COMPRESSORS.names())
    cls = get_compressor("braid_plugin_example:Fp16Compressor")
    x = torch.randn(4, 32)
    assert torch.allclose(cls().roundtrip(x), x, rtol=2**-11, atol=0)
    with pytest.raises(BraidError, match="expected one of bf16, fp8, int8, none"):
        get_compressor("fp9")


def test_config_rejects_unknown_names_with_one_line():
    from braid.config import load_config

    for override, key in (
        ("--exchange.compressor=fp9", "exchange.compressor"),
        ("--exchange.algorithm=carrier_pigeon", "exchange.algorithm"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config(None, [override])
        assert e.value.key == key and "\n" not in str(e.value)
    cfg = load_config(
        None,
        [
            "--exchange.algorithm=braid_plugin_example:P2PExchange",
            "--exchange.compressor=braid_plugin_example:Fp16Compressor",
        ],
    )
    assert cfg.exchange.algorithm.endswith("P2PExchange")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal off CUDA")
def test_symmetric_refused_cleanly_off_cuda():
    from braid.exchange import get_exchange

    with pytest.raises(BraidError) as e:
        get_exchange("symmetric")(None, None, ExchangeConfig(algorithm="symmetric"))
    assert str(e.value) == (
        "exchange.algorithm=symmetric needs CUDA GPUs with symmetric memory; "
        "use nccl or hierarchical"
    )


def test_builders_import_only_plugins_the_users_config_imported(tmp_path, monkeypatch):
    """Braid's builders look plug-ins up without importing: a config that is data (validated
    with imports=False) cannot make them import a module; the user's own config can."""
    import sys

    from braid.config import load_config
    from braid.exchange import get_exchange

    marker = tmp_path / "imported"
    (tmp_path / "braid_unvetted_plugin.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from braid.exchange.compress import NoCompressor\n"
        "class C(NoCompressor):\n    name = 'unvetted'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "braid_unvetted_plugin:C"
    data = ExchangeConfig(algorithm="simulated", compressor=name)
    data.validate(imports=False)  # as config_from_data does
    with pytest.raises(BraidError, match="not imported") as e:
        get_exchange("simulated", allow_import=False)(None, None, data)
    assert "\n" not in str(e.value) and name in str(e.value)
    assert not marker.exists() and "braid_unvetted_plugin" not in sys.modules
    cfg = load_config(None, ["--exchange.algorithm=simulated", f"--exchange.compressor={name}"])
    assert marker.exists()  # the user's config imported it, once
    ex = get_exchange("simulated", allow_import=False)(None, None, cfg.exchange)
    assert type(ex.compressor).__name__ == "C"
    monkeypatch.delitem(sys.modules, "braid_unvetted_plugin")


def test_a_plugin_module_that_raises_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "braid_plugin_that_raises.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BraidError) as e:
        get_compressor("braid_plugin_that_raises:C")
    assert str(e.value) == (
        "cannot import compressor 'braid_plugin_that_raises:C': RuntimeError: boom"
    )


@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("combine", [False, True])
def test_compressed_movements_return_rows_of_the_payload_dtype(name, combine):
    """A compressing exchange's dispatch (and combine, with compress_combine) returns the
    decoded rows in the payload's own dtype (bf16 rows come back bf16, not fp32), exactly the
    compressor's round trip; the uncompressed combine returns the rows themselves."""
    from braid.exchange.base import LocalExchange
    from braid.exchange.compress import with_compressor

    cfg = ExchangeConfig(compressor=name, scale_block=16, compress_combine=combine)
    ex = with_compressor(LocalExchange(), cfg)
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    splits = [x.shape[0]]
    want = ex.compressor.roundtrip(x)
    assert want.dtype == torch.bfloat16
    for op, compressed in ((ex.dispatch, True), (ex.combine, combine)):
        got = op(x, splits, splits).wait()
        assert got.dtype == torch.bfloat16, op.__name__
        assert torch.equal(got, want if compressed else x), op.__name__
