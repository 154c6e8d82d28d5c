"""The `[model]` section: shape of the decoder-only transformer (the MoE part is `[moe]`)."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    vocab_size: int = knob(2048, "Vocabulary size; must be >= the tokenizer's vocabulary.")
    dim: int = knob(192, "Hidden size of the residual stream.")
    n_layers: int = knob(4, "Number of transformer blocks.")
    n_heads: int = knob(6, "Attention query heads; must divide dim.")
    n_kv_heads: int = knob(0, "Key/value heads for GQA; 0 means n_heads (plain MHA).")
    ffn_hidden: int = knob(384, "Hidden size of the dense SwiGLU FFN in non-MoE layers.")
    max_seq_len: int = knob(256, "Longest context the model is built for (RoPE table size).")
    rope_theta: float = knob(10000.0, "RoPE base frequency.")
    norm_eps: float = knob(1e-5, "RMSNorm epsilon.")
    tie_embeddings: bool = knob(True, "Share the input embedding and output projection weights.")
    init_std: float = knob(0.02, "Std of the normal init; output projections are scaled by depth.")
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
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def validate(self) -> None:
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            check(getattr(self, key) > 0, f"model.{key}", getattr(self, key), "must be > 0")
        check(self.n_kv_heads >= 0, "model.n_kv_heads", self.n_kv_heads, "must be >= 0")
        check(
            self.dim % self.n_heads == 0,
            "model.n_heads",
            self.n_heads,
            f"must divide model.dim={self.dim}",
        )
        check(
            self.n_heads % self.kv_heads == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            f"must divide model.n_heads={self.n_heads}",
        )
        check(self.head_dim % 2 == 0, "model.n_heads", self.n_heads, "dim/n_heads must be even")
        check(self.norm_eps > 0, "model.norm_eps", self.norm_eps, "must be > 0")
        check(self.init_std > 0, "model.init_std", self.init_std, "must be > 0")
        check(self.mtp_depth >= 0, "model.mtp_depth", self.mtp_depth, "must be >= 0")
        check(self.mtp_loss_weight >= 0, "model.mtp_loss_weight", self.mtp_loss_weight, ">= 0")
