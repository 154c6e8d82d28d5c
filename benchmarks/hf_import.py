"""How fast does `braid import` read a large Hugging Face checkpoint, and with how much memory?

Generates a random bf16 checkpoint in Qwen3-30B-A3B's shapes (hidden 2048, 32 heads of 128,
4 kv heads, qk-norm, 128 experts of 768, top-8, vocab 151936) with fewer layers (8 layers make
~11 GB), saved in shards like transformers saves it (per-expert tensors, an index). The shards
are fsynced and dropped from the page cache (posix_fadvise DONTNEED on these files only), so
the import reads them from disk. Then `python -m braid import` runs as a child process and is
timed; its peak resident memory is the child's ru_maxrss. Read throughput is checkpoint bytes
over the import's wall time (reading, converting and writing the Braid model together).
The checkpoint and the imported model are deleted afterwards; the JSON result records command,
CPU model, date and versions.

    PYTHONPATH=src python benchmarks/hf_import.py --layers 8 \\
        --out benchmarks/results/hf_import_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, write_result  # noqa: E402

QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B config.json, layers aside
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "hidden_act": "silu",
    "sliding_window": None,
    "use_sliding_window": False,
    "max_window_layers": 48,
    "torch_dtype": "bfloat16",
}


def layer_tensors(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    D, H, K, Dh = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], 128
    F, E = cfg["moe_intermediate_size"], cfg["num_experts"]
    p = f"model.layers.{i}"
    shapes = {
        f"{p}.input_layernorm.weight": (D,),
        f"{p}.post_attention_layernorm.weight": (D,),
        f"{p}.self_attn.q_proj.weight": (H * Dh, D),
        f"{p}.self_attn.k_proj.weight": (K * Dh, D),
        f"{p}.self_attn.v_proj.weight": (K * Dh, D),
        f"{p}.self_attn.o_proj.weight": (D, H * Dh),
        f"{p}.self_attn.q_norm.weight": (Dh,),
        f"{p}.self_attn.k_norm.weight": (Dh,),
        f"{p}.mlp.gate.weight": (E, D),
    }
    for e in range(E):
        shapes[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (F, D)
        shapes[f"{p}.mlp.experts.{e}.up_proj.weight"] = (F, D)
        shapes[f"{p}.mlp.experts.{e}.down_proj.weight"] = (D, F)
    return shapes


def make_checkpoint(root: Path, layers: int, shard_bytes: int) -> int:
    """Write the random checkpoint shard by shard (never more than one shard in memory)."""
    from braid.data.tokenizer import train_bpe

    cfg = dict(QWEN3_30B_A3B, num_hidden_layers=layers)
    gen = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], cfg["hidden_size"])}
    for i in range(layers):
        shapes.update(layer_tensors(cfg, i))
    shapes["model.norm.weight"] = (cfg["hidden_size"],)
    shapes["lm_head.weight"] = (cfg["vocab_size"], cfg["hidden_size"])
    groups: list[list[str]] = [[]]
    size = 0
    for k, s in shapes.items():
        n = 2 * torch.Size(s).numel()
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    weight_map, total = {}, 0
    for j, keys in enumerate(groups, start=1):
        name = f"model-{j:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for k in keys:
            t = torch.empty(shapes[k], dtype=torch.bfloat16)
            t.normal_(0.0, 0.02, generator=gen) if len(shapes[k]) > 1 else t.fill_(1.0)
            tensors[k] = t
        save_file(tensors, root / name, metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(keys, name))
        del tensors
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (root / "config.json").write_text(json.dumps(cfg))
    words = "a mixture of experts routes each token to the best of many experts".split()
    train_bpe([" ".join(words)] * 200, 1000).save(str(root / "tokenizer.json"))
    for p in root.iterdir():  # to disk, then out of the page cache: the import reads the disk
        fd = os.open(p, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    return total


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shard-gb", type=float, default=4.0)
    ap.add_argument("--dir", default=None, help="where to build the checkpoint (default: tmp)")
    ap.add_argument("--out", default="benchmarks/results/hf_import_cpu.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hf_import_bench_", dir=args.dir))
    try:
        hf, braid_dir = work / "hf", work / "braid"
        hf.mkdir()
        t = time.perf_counter()
        total = make_checkpoint(hf, args.layers, int(args.shard_gb * 1e9))
        gen_s = time.perf_counter() - t
        print(f"checkpoint: {total / 1e9:.2f} GB in {gen_s:.0f} s", flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        load_before = os.getloadavg()[0]  # a shared machine slows everything: say how busy
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "braid", "import", str(hf), "--out", str(braid_dir)],
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"braid import failed: {proc.stderr.strip()}")
        peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
        out_bytes = sum(p.stat().st_size for p in braid_dir.iterdir())
        shards = json.loads((hf / "model.safetensors.index.json").read_text())["weight_map"]
        result = {
            **environment(),
            "cpu": cpu_model(),
            "cpu_count": os.cpu_count(),
            "checkpoint": {
                "shapes": "Qwen3-30B-A3B",
                "layers": args.layers,
                "dtype": "bf16",
                "bytes": total,
                "shards": len(set(shards.values())),
                "tensors": len(shards),
                "page_cache": "dropped (fadvise)",
            },
            "import_wall_s": round(wall, 2),
            "read_gb_per_s": round(total / 1e9 / wall, 3),
            "peak_rss_gb": round(peak_kb * 1024 / 1e9, 3),
            "peak_rss_fraction_of_checkpoint": round(peak_kb * 1024 / total, 4),
            "output_bytes": out_bytes,
            "generate_s": round(gen_s, 1),
            "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
        }
        write_result(args.out, result)
        print(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
