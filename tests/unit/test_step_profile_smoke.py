"""benchmarks/step_profile.py: kernel names sort into the kinds its table sums, and the script
runs a tiny eager step on CPU (its operator table names the step's matmuls)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.bench_import import benchmark_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "name, kind",
    [
        ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT", "gemm"),
        ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<...>>", "gemm"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"),
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", "compiled"),
        ("triton_poi_fused__scaled_dot_product_flash_attention_transpose_0", "compiled"),
        ("triton_poi_fused__unsafe_view_mm_0", "compiled"),
        ("triton_tem_fused_mm_0", "gemm"),
        ("_swiglu_rows_kernel", "braid_triton"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add>",
            "elementwise",
        ),
        ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>", "reduce"),
        ("Memcpy DtoD (Device -> Device)", "copy"),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<...>", "copy"),
        ("_some_future_op", "other"),
        ("ncclDevKernel_AllReduce_Sum_f32", "communication"),
    ],
)
def test_kernel_kinds(name, kind):
    assert benchmark_module("step_profile").kind_of(name) == kind


def test_step_profile_runs_on_cpu(tmp_path):
    out = tmp_path / "p.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "step_profile.py"), "--config", "tiny",
           "--batch", "1", "--seq", "32", "--eager", "--iters", "1", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["config"] == "tiny" and not r["compile"] and r["step_median_ms"] > 0
    assert r["env"]["command"] and r["env"]["date"]
    assert any(row["op"] == "aten::mm" and row["calls"] > 0 for row in r["top_ops_self_kernel_ms"])
