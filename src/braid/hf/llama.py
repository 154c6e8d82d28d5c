"""The Llama-style MoE decoder most HF MoE architectures share (Mixtral, Qwen2/3-MoE, OLMoE).

Per layer: input_layernorm -> self_attn (q/k/v/o projections, optional q/k biases and q/k
RMSNorm, half-split RoPE) -> post_attention_layernorm -> an MoE (softmax top-k router, SwiGLU
experts, an optional shared expert) or a dense SwiGLU MLP. An architecture file subclasses
`LlamaStyleMoE` and sets the names and options that differ; this file holds the config reading
and the key map they share, so each architecture states only its differences.
"""

from __future__ import annotations

from typing import Any

from braid.config import Config
from braid.hf.base import (
    Adapter,
    HFConfig,
    Spec,
    fused_kv,
    fused_mlp,
    knob,
    needs,
    refuse_braid,
    rope_rows,
    same,
    stacked_experts,
)
from braid.hf.rope import read_rope, write_rope


def read_window(
    hf: HFConfig, n_layers: int, max_len: int, per_layer: bool | None
) -> dict[str, Any]:
    """Sliding-window knobs. transformers' window of w lets a query see itself and the w-1
    tokens before it, as Braid's model.window does. `per_layer`: the architecture chooses the
    windowed layers by `layer_types` (Qwen2-MoE); otherwise every layer is windowed (Mixtral)."""
    window = hf.integer("sliding_window", None)
    use = hf.get("use_sliding_window", window is not None)  # null: off, as transformers reads it
    if use is not None and not isinstance(use, bool):
        hf.refuse("use_sliding_window", use, "expected true or false")
    types = hf.get("layer_types") or []
    if any(t not in ("full_attention", "sliding_attention") for t in types):
        hf.refuse("layer_types", types, "braid knows full_attention and sliding_attention")
    if not (use and window and window < max_len):
        return {}  # no window, or one that cannot cut anything off: full attention
    if per_layer is None:
        hf.refuse("sliding_window", window, "braid imports full causal attention only here")
    if per_layer and not types:
        hf.refuse(
            "use_sliding_window",
            use,
            "without layer_types braid cannot tell which layers transformers windows",
        )
    layers = [i for i, t in enumerate(types) if t == "sliding_attention"] if per_layer else []
    if per_layer and not layers:
        return {}
    needs("model", "window", "sliding-window attention", hf.model_type)
    out: dict[str, Any] = {"window": window}
    if layers and len(layers) < n_layers:
        out["window_layers"] = layers
    return out


def check_braid(cfg: Config, arch: str, wanted: dict[tuple[str, str], Any]) -> None:
    """Refuse a Braid config whose knobs differ from what `arch` computes (absent knobs pass)."""
    for (section, key), value in wanted.items():
        have = knob(cfg, section, key, value)
        if have != value:
            refuse_braid(f"{section}.{key}", have, arch, f"{arch} computes {value!r}")


class LlamaStyleMoE(Adapter):
    # config.json names of the routed-expert count (the first is written on export; transformers
    # 5 saves Qwen3-MoE's as num_local_experts, the released checkpoints say num_experts)
    experts_keys: tuple[str, ...] = ("num_experts",)
    expert_hidden_key = "moe_intermediate_size"
    moe_prefix = "mlp"  # module name of the MoE block in a layer
    expert_names = ("gate_proj", "up_proj", "down_proj")
    qk_norm = "none"  # "none" | "head" (per head, Qwen3) | "full" (whole projection, OLMoE)
    has_qkv_bias = False
    sparse_layers = False  # decoder_sparse_step / mlp_only_layers choose the MoE layers
    renorm_key: str | None = "norm_topk_prob"  # None: always renormalised (Mixtral)
    shared_key: str | None = None  # config.json name of the shared expert's hidden size
    # How sliding windows are read: None refuses them, False windows every layer (Mixtral),
    # True takes the windowed layers from layer_types (Qwen2-MoE).
    window_per_layer: bool | None = None

    # ---- config: HF -> Braid -----------------------------------------------------------------

    def braid_sections(self, hf: HFConfig) -> dict[str, dict[str, Any]]:
        dim, heads = hf.integer("hidden_size"), hf.integer("num_attention_heads")
        n_layers = hf.integer("num_hidden_layers")
        kv = hf.integer("num_key_value_heads", None) or heads
        max_len = hf.integer("max_position_embeddings")
        hf.expect("hidden_act", ("silu",), "silu")
        model: dict[str, Any] = {
            "vocab_size": hf.integer("vocab_size"),
            "dim": dim,
            "n_layers": n_layers,
            "n_heads": heads,
            "n_kv_heads": kv,
            "ffn_hidden": hf.integer("intermediate_size"),
            "max_seq_len": max_len,
            "norm_eps": hf.number("rms_norm_eps", 1e-6),
            "tie_embeddings": hf.flag("tie_word_embeddings", False),
            **read_rope(hf, softmax_mscale=False),
        }
        head_dim = hf.integer("head_dim", None)
        if head_dim not in (None, dim // heads) or dim % heads:
            needs("model", "head_dim", "a head size other than dim/heads", self.model_type)
            model["head_dim"] = head_dim
        if self.qk_norm != "none":
            needs("model", "qk_norm", "RMSNorm on q and k", self.model_type)
            model["qk_norm"] = self.qk_norm
        self.read_attention_bias(hf, model)
        model.update(read_window(hf, n_layers, max_len, self.window_per_layer))
        if hf.get("mlp_bias", False):
            hf.refuse("mlp_bias", True, "braid's SwiGLU layers have no biases")
        if (hf.number("router_jitter_noise", 0.0) or 0.0) != 0.0:
            hf.refuse(
                "router_jitter_noise",
                hf.get("router_jitter_noise"),
                "braid has no router jitter; set it to 0.0",
            )
        if hf.get("clip_qkv") is not None:
            hf.refuse("clip_qkv", hf.get("clip_qkv"), "braid does not clip q/k/v")
        return {"model": model, "moe": self.read_moe(hf, n_layers)}

    def read_attention_bias(self, hf: HFConfig, model: dict[str, Any]) -> None:
        if hf.get("attention_bias", False):
            hf.refuse("attention_bias", True, "braid has no bias on the output projection")
        if self.has_qkv_bias and hf.get("qkv_bias", True):
            needs("model", "qkv_bias", "biases on q, k and v", self.model_type)
            model["qkv_bias"] = True

    def read_moe(self, hf: HFConfig, n_layers: int) -> dict[str, Any]:
        E = next((hf.get(k) for k in self.experts_keys if hf.get(k) is not None), None)
        if E is None:
            hf.require(self.experts_keys[0])
        moe: dict[str, Any] = {
            "num_experts": E,
            "top_k": hf.integer("num_experts_per_tok"),
            "expert_hidden": hf.integer(self.expert_hidden_key),
            "layers": self.moe_layers(hf, n_layers),
            "score_func": "softmax",
            "renormalize": hf.flag(self.renorm_key, False) if self.renorm_key else True,
            "capacity_factor": 0.0,
            "bias_balance": False,
            "aux_loss_coef": (hf.number("router_aux_loss_coef", 0.01) or 0.0),
        }
        if self.shared_key:
            needs("moe", "shared_gate", "the gated shared expert", self.model_type)
            moe.update(
                num_shared_experts=1,
                shared_hidden=hf.integer(self.shared_key),
                shared_gate=True,
            )
        return moe

    def moe_layers(self, hf: HFConfig, n_layers: int) -> list[int]:
        if not self.sparse_layers:
            return list(range(n_layers))
        step = hf.integer("decoder_sparse_step", 1) or 1
        dense = set(hf.get("mlp_only_layers") or [])
        return [i for i in range(n_layers) if i not in dense and (i + 1) % step == 0]

    # ---- config: Braid -> HF -----------------------------------------------------------------

    def hf_config(self, cfg: Config) -> dict[str, Any]:
        m, moe, arch = cfg.model, cfg.moe, self.architecture
        wanted = {
            ("model", "attention"): "gqa",
            ("model", "qk_norm"): self.qk_norm,
            ("model", "rope_fraction"): 1.0,
            ("model", "mtp_depth"): 0,
            ("model", "qkv_bias"): self.has_qkv_bias,
            ("moe", "score_func"): "softmax",
            ("moe", "capacity_factor"): 0.0,
            ("moe", "n_groups"): 1,
            ("moe", "routed_scaling"): 1.0,
            ("moe", "num_shared_experts"): 1 if self.shared_key else 0,
            ("moe", "shared_gate"): bool(self.shared_key),
        }
        if not self.renorm_key:
            wanted["moe", "renormalize"] = True
        check_braid(cfg, arch, wanted)
        if moe.num_experts == 0:
            refuse_braid("moe.num_experts", 0, arch, "a dense model is no MoE architecture")
        out_window = self.write_window(cfg)
        layers = moe.moe_layer_ids(m.n_layers)
        if not self.sparse_layers and layers != list(range(m.n_layers)):
            refuse_braid("moe.layers", layers, arch, f"{arch} has an MoE in every layer")
        head_dim = knob(cfg, "model", "attn_head_dim", m.dim // m.n_heads)
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": m.vocab_size,
            "hidden_size": m.dim,
            "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.kv_heads,
            "head_dim": head_dim,
            "intermediate_size": m.ffn_hidden,
            "max_position_embeddings": m.max_seq_len,
            "rms_norm_eps": m.norm_eps,
            "tie_word_embeddings": m.tie_embeddings,
            "hidden_act": "silu",
            "rope_theta": m.rope_theta,
            "rope_parameters": write_rope(cfg, arch, softmax_mscale=False),
            self.experts_keys[0]: moe.num_experts,
            "num_experts_per_tok": moe.top_k,
            self.expert_hidden_key: moe.expert_hidden,
            "router_aux_loss_coef": moe.aux_loss_coef,
            "attention_bias": False,
            **out_window,
            "use_cache": True,
        }
        if self.renorm_key:
            out[self.renorm_key] = moe.renormalize
        if self.sparse_layers:
            out["decoder_sparse_step"] = 1
            out["mlp_only_layers"] = [i for i in range(m.n_layers) if i not in layers]
        if self.shared_key:
            out[self.shared_key] = moe.shared_hidden or moe.expert_hidden
        if self.has_qkv_bias:
            out["qkv_bias"] = True
        return out

    def write_window(self, cfg: Config) -> dict[str, Any]:
        m, arch = cfg.model, self.architecture
        window = knob(cfg, "model", "window", 0)
        if not window:
            return {"sliding_window": None}
        layers = [i for i in range(m.n_layers) if m.window_for(i)]
        if self.window_per_layer is None or (
            not self.window_per_layer and len(layers) < m.n_layers
        ):
            refuse_braid(
                "model.window",
                window,
                arch,
                "windows on some layers only"
                if self.window_per_layer is not None
                else "no sliding window",
            )
        if not self.window_per_layer:
            return {"sliding_window": window}
        types = [
            "sliding_attention" if i in layers else "full_attention" for i in range(m.n_layers)
        ]
        return {
            "sliding_window": window,
            "use_sliding_window": True,
            "layer_types": types,
            "max_window_layers": m.n_layers,
        }

    # ---- tensors -----------------------------------------------------------------------------

    def specs(self, cfg: Config) -> list[Spec]:
        m, moe = cfg.model, cfg.moe
        H, K = m.n_heads, m.kv_heads
        Dh = knob(cfg, "model", "attn_head_dim", m.dim // m.n_heads)
        out = [same("tok_emb.weight", "model.embed_tokens.weight")]
        moe_layers = set(moe.moe_layer_ids(m.n_layers))
        for i in range(m.n_layers):
            b, h = f"blocks.{i}", f"model.layers.{i}"
            a, ha = f"{b}.attn", f"{h}.self_attn"
            out += [
                same(f"{b}.attn_norm.weight", f"{h}.input_layernorm.weight"),
                same(f"{b}.ffn_norm.weight", f"{h}.post_attention_layernorm.weight"),
                rope_rows(f"{a}.wq.weight", f"{ha}.q_proj.weight", H, Dh, Dh),
                fused_kv(
                    f"{a}.wkv.weight", f"{ha}.k_proj.weight", f"{ha}.v_proj.weight", K, Dh, Dh
                ),
                same(f"{a}.wo.weight", f"{ha}.o_proj.weight"),
            ]
            if knob(cfg, "model", "qkv_bias", False):
                out += [
                    rope_rows(f"{a}.wq.bias", f"{ha}.q_proj.bias", H, Dh, Dh),
                    fused_kv(f"{a}.wkv.bias", f"{ha}.k_proj.bias", f"{ha}.v_proj.bias", K, Dh, Dh),
                ]
            qk_norm = knob(cfg, "model", "qk_norm", "none")
            if qk_norm != "none":
                # The norm weights follow the rows they scale: per head ("head": one head's
                # Dh) or over the whole projection ("full": every head's rows).
                hq, hk = (1, 1) if qk_norm == "head" else (H, K)
                out += [
                    rope_rows(f"{a}.q_norm.weight", f"{ha}.q_norm.weight", hq, Dh, Dh),
                    rope_rows(f"{a}.k_norm.weight", f"{ha}.k_norm.weight", hk, Dh, Dh),
                ]
            if i in moe_layers:
                out += self.moe_specs(cfg, f"{b}.ffn", f"{h}.{self.moe_prefix}")
            else:
                out += fused_mlp(
                    f"{b}.ffn",
                    f"{h}.mlp.gate_proj.weight",
                    f"{h}.mlp.up_proj.weight",
                    f"{h}.mlp.down_proj.weight",
                )
        out.append(same("norm.weight", "model.norm.weight"))
        if not m.tie_embeddings:
            out.append(same("output.weight", "lm_head.weight"))
        return out

    def moe_specs(self, cfg: Config, b: str, h: str) -> list[Spec]:
        g, u, d = self.expert_names
        E = cfg.moe.num_experts
        out = [
            same(f"{b}.router.weight", f"{h}.gate.weight"),
            *stacked_experts(
                f"{b}.experts",
                E,
                f"{h}.experts.{{e}}.{g}.weight",
                f"{h}.experts.{{e}}.{u}.weight",
                f"{h}.experts.{{e}}.{d}.weight",
            ),
        ]
        if self.shared_key:
            out += fused_mlp(
                f"{b}.shared",
                f"{h}.shared_expert.gate_proj.weight",
                f"{h}.shared_expert.up_proj.weight",
                f"{h}.shared_expert.down_proj.weight",
            )
            out.append(same(f"{b}.shared_gate.weight", f"{h}.shared_expert_gate.weight"))
        return out

    def zero_tensors(self, cfg: Config) -> dict[str, str]:
        """Braid tensors with no slot here: {name: why}; zero on import, refused if non-zero
        on export (the aux-loss-free routing bias: these routers have none)."""
        return {
            f"blocks.{i}.ffn.router.expert_bias": "the architecture's router has no bias"
            for i in cfg.moe.moe_layer_ids(cfg.model.n_layers)
        }
