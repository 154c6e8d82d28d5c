"""The `[model]` section: shape of the decoder-only transformer (the MoE part is `[moe]`)."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob, one_of

SDPA_BACKENDS = ("torch", "cudnn", "flash", "efficient")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = knob(2048, "Vocabulary size; must be >= the tokenizer's vocabulary.")
    dim: int = knob(192, "Hidden size of the residual stream.")
    n_layers: int = knob(4, "Number of transformer blocks.")
    n_heads: int = knob(6, "Attention query heads; must divide dim when head_dim is 0.")
    n_kv_heads: int = knob(0, "Key/value heads for GQA; 0 means n_heads (plain MHA).")
    ffn_hidden: int = knob(384, "Hidden size of the dense SwiGLU FFN in non-MoE layers.")
    max_seq_len: int = knob(256, "Longest context the model is built for (RoPE table size).")
    rope_theta: float = knob(10000.0, "RoPE base frequency.")
    norm_eps: float = knob(1e-5, "RMSNorm epsilon.")
    tie_embeddings: bool = knob(True, "Share the input embedding and output projection weights.")
    residual: str = knob(
        "fp32",
        "Dtype of the residual stream under bf16 autocast: fp32 (the embedding's; norms and adds "
        "in fp32) or compute (autocast's bf16, as FSDP's bf16 parameters give; half the norms' "
        "and adds' memory traffic).",
    )
    init_std: float = knob(0.02, "Std of the normal init; output projections are scaled by depth.")
    # Attention options (docs/architectures.md, "Attention"); the defaults are the plain block.
    attention: str = knob("gqa", "Attention kind: gqa (grouped-query) or mla (multi-head latent).")
    sdpa_backend: str = knob(
        "torch",
        "Kernel of full causal attention on CUDA: torch (PyTorch's own order), cudnn, flash or "
        "efficient (tried first, PyTorch's others after it where it cannot run the shapes).",
    )
    head_dim: int = knob(0, "GQA head size; 0 means dim // n_heads (Qwen3 sets it apart).")
    qk_norm: str = knob(
        "none", "RMSNorm on q and k: none, head (per head, Qwen3) or full (whole width, OLMoE)."
    )
    qkv_bias: bool = knob(False, "Biases on the q, k and v projections (Qwen2); wo has none.")
    rope_fraction: float = knob(1.0, "Fraction of each GQA head's dims that RoPE rotates.")
    rope_scaling: str = knob("none", "RoPE context extension: none or yarn.")
    rope_factor: float = knob(1.0, "YaRN: context extension factor s.")
    rope_original_max_seq_len: int = knob(0, "YaRN: context length the model was trained at.")
    rope_beta_fast: float = knob(32.0, "YaRN: rotations above which dims keep their frequency.")
    rope_beta_slow: float = knob(1.0, "YaRN: rotations below which dims are fully interpolated.")
    rope_mscale: float = knob(1.0, "YaRN: cos/sin scale factor 0.1*mscale*ln(s)+1 (DeepSeek).")
    rope_mscale_all_dim: float = knob(
        0.0, "YaRN: if > 0, softmax scale times (0.1*m*ln(s)+1)^2 and cos/sin divided by it."
    )
    window: int = knob(
        0,
        "Sliding-window size in tokens (a query sees itself and window-1 "
        "before it); 0 means full causal attention.",
    )
    window_layers: list[int] = knob(
        [], "Layers that use the window; empty means all (or window_every)."
    )
    window_every: int = knob(
        0, "If > 0, every window_every-th layer keeps full attention and the others use the window."
    )
    q_lora_rank: int = knob(0, "MLA: rank of the q down-projection; 0 means a direct wq.")
    kv_lora_rank: int = knob(512, "MLA: rank of the compressed (cached) kv latent.")
    qk_rope_head_dim: int = knob(64, "MLA: decoupled RoPE key/query size, key shared by heads.")
    qk_nope_head_dim: int = knob(128, "MLA: per-head q/k size without RoPE.")
    v_head_dim: int = knob(128, "MLA: per-head value size.")
    mtp_depth: int = knob(
        0, "Multi-token prediction modules (DeepSeek-V3): module k predicts token t+k+1."
    )
    mtp_loss_weight: float = knob(
        0.3, "Weight of the MTP loss, mean cross-entropy over the mtp_depth modules (lambda)."
    )

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        """GQA head size: `head_dim`, or dim // n_heads when that is 0."""
        return self.head_dim or self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        """How many dims of each q/k head RoPE rotates (the leading ones)."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(round(self.rope_fraction * self.attn_head_dim))

    def window_for(self, layer: int) -> int:
        """The sliding window of `layer` (0 = full causal attention)."""
        if self.window == 0:
            return 0
        if self.window_layers:
            return self.window if layer in self.window_layers else 0
        if self.window_every > 0 and (layer + 1) % self.window_every == 0:
            return 0
        return self.window

    def validate(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            check(getattr(self, key) > 0, f"model.{key}", getattr(self, key), "must be > 0")
        check(self.n_kv_heads >= 0, "model.n_kv_heads", self.n_kv_heads, "must be >= 0")
        check(self.head_dim >= 0, "model.head_dim", self.head_dim, "must be >= 0")
        check(
            self.n_heads % self.kv_heads == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            f"must divide model.n_heads={self.n_heads}",
        )
        if self.attention == "gqa":
            check(
                self.head_dim > 0 or self.dim % self.n_heads == 0,
                "model.n_heads",
                self.n_heads,
                f"must divide model.dim={self.dim} (or set model.head_dim)",
            )
            key, value = (
                ("model.head_dim", self.head_dim)
                if self.head_dim
                else ("model.n_heads", self.n_heads)
            )
            check(self.attn_head_dim % 2 == 0, key, value, "the head size must be even")
        check(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "must be > 0")
        check(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")
        check(self.mtp_depth >= 0, "model.mtp_depth", self.mtp_depth, "must be >= 0")
        check(self.mtp_loss_weight >= 0, "model.mtp_loss_weight", self.mtp_loss_weight, ">= 0")
        self._validate_attention()

    def _validate_attention(self) -> None:
        one_of("model.attention", self.attention, ("gqa", "mla"))
        one_of("model.residual", self.residual, ("fp32", "compute"))
        one_of("model.sdpa_backend", self.sdpa_backend, SDPA_BACKENDS)
        one_of("model.qk_norm", self.qk_norm, ("none", "head", "full"))
        one_of("model.rope_scaling", self.rope_scaling, ("none", "yarn"))
        check(
            0.0 < self.rope_fraction <= 1.0,
            "model.rope_fraction",
            self.rope_fraction,
            "must be in (0, 1]",
        )
        if self.attention == "gqa":
            rot = self.rope_fraction * self.attn_head_dim
            check(
                abs(rot - round(rot)) < 1e-3 and round(rot) % 2 == 0 and round(rot) > 0,
                "model.rope_fraction",
                self.rope_fraction,
                f"rope_fraction * head_dim ({self.attn_head_dim}) must be a positive even integer",
            )
        if self.rope_scaling == "yarn":
            check(self.rope_factor >= 1.0, "model.rope_factor", self.rope_factor, "must be >= 1")
            check(
                self.rope_original_max_seq_len > 0,
                "model.rope_original_max_seq_len",
                self.rope_original_max_seq_len,
                "must be > 0 with rope_scaling = yarn",
            )
            check(
                self.rope_beta_fast > self.rope_beta_slow > 0,
                "model.rope_beta_fast",
                self.rope_beta_fast,
                f"must be > rope_beta_slow={self.rope_beta_slow} > 0",
            )
        check(self.window >= 0, "model.window", self.window, "must be >= 0")
        check(self.window_every >= 0, "model.window_every", self.window_every, "must be >= 0")
        check(
            not (self.window_layers and self.window_every),
            "model.window_every",
            self.window_every,
            "set either model.window_layers or model.window_every, not both",
        )
        for i in self.window_layers:
            check(
                0 <= i < self.n_layers,
                "model.window_layers",
                self.window_layers,
                f"layer ids must be in [0, {self.n_layers})",
            )
        if self.attention == "mla":
            for key in ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
                check(getattr(self, key) > 0, f"model.{key}", getattr(self, key), "must be > 0")
            check(self.q_lora_rank >= 0, "model.q_lora_rank", self.q_lora_rank, "must be >= 0")
            check(
                self.qk_rope_head_dim % 2 == 0,
                "model.qk_rope_head_dim",
                self.qk_rope_head_dim,
                "must be even",
            )
            check(
                self.qk_norm == "none" and not self.qkv_bias,
                "model.qk_norm",
                self.qk_norm,
                "qk_norm and qkv_bias are GQA options; MLA has its own q_norm/kv_norm",
            )
            check(
                self.rope_fraction == 1.0 and self.head_dim == 0,
                "model.rope_fraction",
                self.rope_fraction,
                "rope_fraction and head_dim are GQA options; MLA uses "
                "qk_rope_head_dim/qk_nope_head_dim",
            )
