"""DeepSeek-V3 (DeepseekV3ForCausalLM): MLA attention, `first_k_dense_replace` dense layers then
MoE layers with sigmoid scores, group-limited top-k (n_group / topk_group, a group scored by the
sum of its two best biased scores), the aux-free routing bias `e_score_correction_bias` (Braid's
router.expert_bias, used for the choice only: moe.bias_balance), gates renormalised per
`norm_topk_prob` then multiplied by `routed_scaling_factor`, and `n_shared_experts` always-on
shared experts. Sources of truth: transformers' models/deepseek_v3/modeling_deepseek_v3.py,
and DeepSeek's released checkpoints for what transformers lacks:
  * MTP modules (`num_nextn_predict_layers`) are stored as extra layers model.layers.{N+k}
    (N = num_hidden_layers) with enorm, hnorm, eh_proj, shared_head.norm and copies of the
    embedding and the output head; transformers skips them, Braid keeps them (model.mtp_depth).
    Their eh_proj acts on [enorm(emb); hnorm(h)] (vLLM's deepseek_mtp.py), Braid's MTP on
    [hnorm(h); enorm(emb)], so the two column halves swap at the boundary;
  * fp8 checkpoints (quantization_config fp8, e4m3, 128x128 blocks) carry `weight_scale_inv`
    per block; the importer dequantizes them (weight * scale_inv, blockwise) into bf16.
RoPE: `rope_interleave` (the default) means q/k rope rows are already in Braid's interleaved
pair order; otherwise the rope part of each head is permuted as for Llama-style models.
transformers' q_a/kv_a norms use eps 1e-6 whatever rms_norm_eps says, Braid uses model.norm_eps
for every norm, so another rms_norm_eps is refused.
"""

from __future__ import annotations

from typing import Any

import torch

from braid.config import Config
from braid.hf.base import (
    Adapter,
    HFConfig,
    HFRefusal,
    Spec,
    fused_mlp,
    needs,
    refuse_braid,
    rope_rows,
    same,
    stacked_experts,
)
from braid.hf.llama import check_braid
from braid.hf.rope import read_rope, write_rope

LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3RMSNorm default, used for q_a and kv_a norms


class DeepseekV3(Adapter):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"

    def __init__(self) -> None:
        self.interleaved = True  # rope_interleave of the checkpoint being read
        self.fp8_block: tuple[int, int] | None = None

    # ---- config: HF -> Braid -----------------------------------------------------------------

    def braid_sections(self, hf: HFConfig) -> dict[str, dict[str, Any]]:
        mt = self.model_type
        for key, feature in (("attention", "MLA"), ("mtp_depth", "MTP")):
            needs("model", key, feature, mt)
        for key in ("n_groups", "routed_scaling"):
            needs("moe", key, "group-limited routing", mt)
        heads, n_layers = (
            hf.integer("num_attention_heads"),
            hf.integer("num_hidden_layers"),
        )
        if (hf.integer("num_key_value_heads", None) or heads) != heads:
            hf.refuse(
                "num_key_value_heads",
                hf.get("num_key_value_heads"),
                "MLA expands the latent to every query head",
            )
        eps = hf.number("rms_norm_eps", 1e-6)
        if eps != LATENT_NORM_EPS:
            hf.refuse(
                "rms_norm_eps",
                eps,
                "transformers' latent norms use 1e-6 whatever it "
                "says and braid uses one eps; only 1e-06 is exact",
            )
        hf.expect("hidden_act", ("silu",), "silu")
        hf.expect("attention_bias", (False,), False)
        hf.expect("scoring_func", ("sigmoid",), "sigmoid")
        hf.expect("topk_method", ("noaux_tc",), "noaux_tc")
        hf.expect("moe_layer_freq", (1,), 1)
        for harmless in ("ep_size", "aux_loss_alpha", "seq_aux", "num_nextn_predict_layers"):
            hf.get(harmless)
        self.interleaved = hf.flag("rope_interleave", True)
        self._read_quantization(hf)
        q_rank = hf.integer("q_lora_rank", None) or 0
        nope, rope = hf.integer("qk_nope_head_dim"), hf.integer("qk_rope_head_dim")
        for derived, value in (("qk_head_dim", nope + rope), ("head_dim", rope)):
            if hf.get(derived, value) != value:
                hf.refuse(derived, hf.get(derived), f"expected {value} from the other sizes")
        first_dense = hf.integer("first_k_dense_replace", 0) or 0
        shared = hf.integer("n_shared_experts", None) or 0
        if shared < 1:
            hf.refuse(
                "n_shared_experts",
                shared,
                "braid maps DeepSeek-V3's shared experts; "
                "without one the layer has zero-size weights",
            )
        mtp = sum(1 for d in range(64) if f"model.layers.{n_layers + d}.eh_proj.weight" in hf.keys)
        model = {
            "vocab_size": hf.integer("vocab_size"),
            "dim": hf.integer("hidden_size"),
            "n_layers": n_layers,
            "n_heads": heads,
            "n_kv_heads": 0,
            "ffn_hidden": hf.integer("intermediate_size"),
            "max_seq_len": hf.integer("max_position_embeddings"),
            "norm_eps": eps,
            "tie_embeddings": hf.flag("tie_word_embeddings", False),
            "attention": "mla",
            "q_lora_rank": q_rank,
            "kv_lora_rank": hf.integer("kv_lora_rank"),
            "qk_rope_head_dim": rope,
            "qk_nope_head_dim": nope,
            "v_head_dim": hf.integer("v_head_dim"),
            "mtp_depth": mtp,
            **read_rope(hf, softmax_mscale=True),
        }
        if mtp and model["tie_embeddings"]:
            hf.refuse("tie_word_embeddings", True, "braid's MTP shares an untied head")
        moe = {
            "num_experts": hf.integer("n_routed_experts"),
            "top_k": hf.integer("num_experts_per_tok"),
            "expert_hidden": hf.integer("moe_intermediate_size"),
            "layers": list(range(first_dense, n_layers)),
            "score_func": "sigmoid",
            "renormalize": hf.flag("norm_topk_prob", True),
            "bias_balance": True,
            "n_groups": (hf.integer("n_group", None) or 1),
            "topk_groups": (hf.integer("topk_group", None) or 1),
            "routed_scaling": hf.number("routed_scaling_factor", 1.0),
            "num_shared_experts": shared,
            "shared_hidden": 0,
            "capacity_factor": 0.0,
            "aux_loss_coef": float(hf.raw.get("aux_loss_alpha", 0.0001) or 0.0),
        }
        return {"model": model, "moe": moe}

    def _read_quantization(self, hf: HFConfig) -> None:
        q = hf.get("quantization_config")
        if q is None:
            return
        if not isinstance(q, dict):
            hf.refuse("quantization_config", q, "expected an object")
        want = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
        for key, value in q.items():
            if key == "weight_block_size" and isinstance(value, list) and len(value) == 2:
                self.fp8_block = (int(value[0]), int(value[1]))
            elif want.get(key) != value:
                hf.refuse(
                    f"quantization_config.{key}",
                    value,
                    "braid dequantizes DeepSeek's fp8 e4m3 block-scaled weights only",
                )
        if self.fp8_block is None:
            hf.refuse("quantization_config.weight_block_size", None, "fp8 needs the block size")

    # ---- config: Braid -> HF -----------------------------------------------------------------

    def hf_config(self, cfg: Config) -> dict[str, Any]:
        m, moe, arch = cfg.model, cfg.moe, self.architecture
        check_braid(
            cfg,
            arch,
            {
                ("model", "attention"): "mla",
                ("model", "window"): 0,
                ("moe", "score_func"): "sigmoid",
                ("moe", "capacity_factor"): 0.0,
                ("moe", "shared_gate"): False,
            },
        )
        if m.norm_eps != LATENT_NORM_EPS:
            refuse_braid("model.norm_eps", m.norm_eps, arch, "its latent norms use 1e-06")
        if moe.num_shared_experts < 1 or moe.shared_hidden not in (0, moe.expert_hidden):
            refuse_braid(
                "moe.num_shared_experts",
                moe.num_shared_experts,
                arch,
                "it has n_shared_experts >= 1 shared experts of moe_intermediate_size each",
            )
        layers = moe.moe_layer_ids(m.n_layers)
        first = m.n_layers - len(layers)
        if moe.num_experts == 0 or layers != list(range(first, m.n_layers)):
            refuse_braid(
                "moe.layers",
                layers,
                arch,
                "its MoE layers are all layers after the first first_k_dense_replace",
            )
        if m.mtp_depth and m.tie_embeddings:
            refuse_braid("model.tie_embeddings", True, arch, "its MTP heads are untied copies")
        return {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": m.vocab_size,
            "hidden_size": m.dim,
            "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.n_heads,
            "intermediate_size": m.ffn_hidden,
            "moe_intermediate_size": moe.expert_hidden,
            "n_routed_experts": moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            "n_shared_experts": moe.num_shared_experts,
            "n_group": moe.n_groups,
            "topk_group": moe.topk_groups,
            "routed_scaling_factor": moe.routed_scaling,
            "norm_topk_prob": moe.renormalize,
            "first_k_dense_replace": first,
            "q_lora_rank": m.q_lora_rank or None,
            "kv_lora_rank": m.kv_lora_rank,
            "qk_rope_head_dim": m.qk_rope_head_dim,
            "qk_nope_head_dim": m.qk_nope_head_dim,
            "v_head_dim": m.v_head_dim,
            "max_position_embeddings": m.max_seq_len,
            "rms_norm_eps": m.norm_eps,
            "tie_word_embeddings": m.tie_embeddings,
            "hidden_act": "silu",
            "rope_interleave": True,
            "rope_parameters": write_rope(cfg, arch, True),
            "attention_bias": False,
            "num_nextn_predict_layers": m.mtp_depth,
            "use_cache": True,
        }

    # ---- tensors -----------------------------------------------------------------------------

    def specs(self, cfg: Config) -> list[Spec]:
        m = cfg.model
        head = not m.tie_embeddings
        mtp_layers = [m.n_layers + d for d in range(m.mtp_depth)]
        # The MTP layers hold copies of the embedding and the head; Braid shares the originals.
        emb = (
            "model.embed_tokens.weight",
            *(f"model.layers.{i}.embed_tokens.weight" for i in mtp_layers),
        )
        out = [_shared_copy("tok_emb.weight", emb)]
        moe_layers = set(cfg.moe.moe_layer_ids(m.n_layers))
        for i in range(m.n_layers):
            out += self._layer(cfg, f"blocks.{i}", f"model.layers.{i}", i in moe_layers)
        for d, i in enumerate(mtp_layers):
            b, h = f"mtp.{d}", f"model.layers.{i}"
            out += [
                same(f"{b}.hnorm.weight", f"{h}.hnorm.weight"),
                same(f"{b}.enorm.weight", f"{h}.enorm.weight"),
                _swap_halves(f"{b}.eh_proj.weight", f"{h}.eh_proj.weight"),
                same(f"{b}.norm.weight", f"{h}.shared_head.norm.weight"),
                *self._layer(cfg, f"{b}.block", h, m.n_layers - 1 in moe_layers),
            ]
        out.append(same("norm.weight", "model.norm.weight"))
        if head:
            out.append(
                _shared_copy(
                    "output.weight",
                    (
                        "lm_head.weight",
                        *(f"model.layers.{i}.shared_head.head.weight" for i in mtp_layers),
                    ),
                )
            )
        return out

    def _layer(self, cfg: Config, b: str, h: str, is_moe: bool) -> list[Spec]:
        m = cfg.model
        H, nope, rope = m.n_heads, m.qk_nope_head_dim, m.qk_rope_head_dim
        a, ha = f"{b}.attn", f"{h}.self_attn"
        rot = None if self.interleaved else rope  # rope rows to permute, if any

        def rows(braid: str, hf: str, heads: int, size: int, start: int) -> Spec:
            return same(braid, hf) if rot is None else rope_rows(braid, hf, heads, size, rot, start)

        out = [
            same(f"{b}.attn_norm.weight", f"{h}.input_layernorm.weight"),
            same(f"{b}.ffn_norm.weight", f"{h}.post_attention_layernorm.weight"),
            same(f"{a}.wo.weight", f"{ha}.o_proj.weight"),
            rows(
                f"{a}.wkv_a.weight",
                f"{ha}.kv_a_proj_with_mqa.weight",
                1,
                m.kv_lora_rank + rope,
                m.kv_lora_rank,
            ),
            same(f"{a}.kv_norm.weight", f"{ha}.kv_a_layernorm.weight"),
            same(f"{a}.wkv_b.weight", f"{ha}.kv_b_proj.weight"),
        ]
        if m.q_lora_rank:
            out += [
                same(f"{a}.wq_a.weight", f"{ha}.q_a_proj.weight"),
                same(f"{a}.q_norm.weight", f"{ha}.q_a_layernorm.weight"),
                rows(f"{a}.wq_b.weight", f"{ha}.q_b_proj.weight", H, nope + rope, nope),
            ]
        else:
            out.append(rows(f"{a}.wq.weight", f"{ha}.q_proj.weight", H, nope + rope, nope))
        if not is_moe:
            return out + fused_mlp(
                f"{b}.ffn",
                f"{h}.mlp.gate_proj.weight",
                f"{h}.mlp.up_proj.weight",
                f"{h}.mlp.down_proj.weight",
            )
        f, hm = f"{b}.ffn", f"{h}.mlp"
        return out + [
            same(f"{f}.router.weight", f"{hm}.gate.weight"),
            same(f"{f}.router.expert_bias", f"{hm}.gate.e_score_correction_bias"),
            *stacked_experts(
                f"{f}.experts",
                cfg.moe.num_experts,
                f"{hm}.experts.{{e}}.gate_proj.weight",
                f"{hm}.experts.{{e}}.up_proj.weight",
                f"{hm}.experts.{{e}}.down_proj.weight",
            ),
            *fused_mlp(
                f"{f}.shared",
                f"{hm}.shared_experts.gate_proj.weight",
                f"{hm}.shared_experts.up_proj.weight",
                f"{hm}.shared_experts.down_proj.weight",
            ),
        ]

    def zero_tensors(self, cfg: Config) -> dict[str, str]:
        return {}

    def ignored(self, key: str, cfg: Config) -> bool:
        return super().ignored(key, cfg) or (
            self.fp8_block is not None and key.endswith("_scale_inv")
        )


def _shared_copy(braid: str, hf: tuple[str, ...]) -> Spec:
    """One Braid tensor stored in several HF places (the MTP layers' copies): they must agree."""

    def to_braid(ts: list[torch.Tensor]) -> torch.Tensor:
        for key, t in zip(hf[1:], ts[1:], strict=True):
            if not torch.equal(t, ts[0]):
                raise HFRefusal(
                    f"{key} differs from {hf[0]}: braid's MTP modules share the "
                    "main model's embedding and head"
                )
        return ts[0]

    return Spec(braid, hf, to_braid, lambda t: [t] + [t.clone() for _ in hf[1:]])


def _swap_halves(braid: str, hf: str) -> Spec:
    """eh_proj [D, 2D]: HF's columns act on [emb; h], Braid's on [h; emb]."""

    def swap(t: torch.Tensor) -> torch.Tensor:
        return torch.cat(t.chunk(2, dim=1)[::-1], dim=1).contiguous()

    return Spec(braid, (hf,), lambda ts: swap(ts[0]), lambda t: [swap(t)])
