"""The `[moe]` section: which layers are MoE, routing, balancing, capacity and expert shapes."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob, one_of


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    num_experts: int = knob(8, "Routed experts per MoE layer (0 makes every layer dense).")
    top_k: int = knob(2, "Experts each token is sent to.")
    expert_hidden: int = knob(192, "Hidden size of each routed expert's SwiGLU FFN.")
    layers: list[int] = knob([], "Explicit MoE layer indices; empty means first_k_dense/every.")
    first_k_dense: int = knob(1, "With layers empty: the first k layers stay dense.")
    every: int = knob(1, "With layers empty: after first_k_dense, every n-th layer is MoE.")
    score_func: str = knob("softmax", "Router scores: softmax (Switch/GShard) or sigmoid (DSV3).")
    renormalize: bool = knob(True, "Renormalise the top-k gates to sum to one.")
    n_groups: int = knob(
        1, "Expert groups for group-limited top-k (DeepSeek-V3); must divide num_experts; 1 = off."
    )
    topk_groups: int = knob(
        1, "With n_groups > 1: the best groups (sum of their top-2 scores) a token may use."
    )
    routed_scaling: float = knob(
        1.0, "Multiplies the routed gates after renormalisation (DeepSeek-V3: 2.5)."
    )
    aux_loss_coef: float = knob(0.01, "Switch/GShard load-balancing loss weight (0 disables).")
    z_loss_coef: float = knob(0.001, "Router z-loss weight (ST-MoE; 0 disables).")
    bias_balance: bool = knob(False, "Aux-loss-free balancing: per-expert routing bias (DSV3).")
    bias_update_rate: float = knob(0.001, "Step size of the bias update, bias += rate*sign(err).")
    capacity_factor: float = knob(
        0.0, "Expert capacity as a multiple of the even share; 0 is dropless (no drops)."
    )
    num_shared_experts: int = knob(0, "Always-on shared experts added to every token.")
    shared_hidden: int = knob(0, "Hidden size of each shared expert; 0 means expert_hidden.")
    shared_gate: bool = knob(
        False, "Scale the shared experts' output by sigmoid(x . w), w of size dim (Qwen2-MoE)."
    )
    expert_impl: str = knob(
        "grouped", "Expert GEMMs: grouped (grouped_mm; fp32 on CUDA uses the loop) or loop."
    )

    def moe_layer_ids(self, n_layers: int) -> list[int]:
        """Indices of the MoE layers among n_layers blocks."""
        if self.num_experts == 0:
            return []
        if self.layers:
            return sorted(self.layers)
        first = self.first_k_dense
        return [i for i in range(first, n_layers) if (i - first) % self.every == 0]

    def validate(self, n_layers: int) -> None:
        check(self.num_experts >= 0, "moe.num_experts", self.num_experts, "must be >= 0")
        if self.num_experts == 0:
            return
        check(
            1 <= self.top_k <= self.num_experts,
            "moe.top_k",
            self.top_k,
            f"must be between 1 and moe.num_experts={self.num_experts}",
        )
        check(self.expert_hidden > 0, "moe.expert_hidden", self.expert_hidden, "must be > 0")
        for i in self.layers:
            bound = f"indices must be in [0, {n_layers})"
            check(0 <= i < n_layers, "moe.layers", self.layers, bound)
        unique = len(set(self.layers)) == len(self.layers)
        check(unique, "moe.layers", self.layers, "has duplicates")
        check(self.first_k_dense >= 0, "moe.first_k_dense", self.first_k_dense, "must be >= 0")
        check(self.every >= 1, "moe.every", self.every, "must be >= 1")
        one_of("moe.score_func", self.score_func, ("softmax", "sigmoid"))
        one_of("moe.expert_impl", self.expert_impl, ("grouped", "loop"))
        check(self.aux_loss_coef >= 0, "moe.aux_loss_coef", self.aux_loss_coef, "must be >= 0")
        check(self.z_loss_coef >= 0, "moe.z_loss_coef", self.z_loss_coef, "must be >= 0")
        check(self.bias_update_rate >= 0, "moe.bias_update_rate", self.bias_update_rate, ">= 0")
        check(
            self.capacity_factor == 0 or self.capacity_factor >= 1.0 / self.num_experts,
            "moe.capacity_factor",
            self.capacity_factor,
            "must be 0 (dropless) or a positive multiple of the even share",
        )
        shared = self.num_shared_experts
        check(shared >= 0, "moe.num_shared_experts", shared, ">= 0")
        check(self.shared_hidden >= 0, "moe.shared_hidden", self.shared_hidden, "must be >= 0")
        E, G = self.num_experts, self.n_groups
        check(G >= 1 and E % G == 0, "moe.n_groups", G, f"must divide moe.num_experts={E}")
        check(
            1 <= self.topk_groups <= G,
            "moe.topk_groups",
            self.topk_groups,
            f"must be between 1 and moe.n_groups={G}",
        )
        check(
            self.topk_groups * (E // G) >= self.top_k,
            "moe.topk_groups",
            self.topk_groups,
            f"must leave at least moe.top_k={self.top_k} experts eligible "
            f"(topk_groups * num_experts / n_groups >= top_k)",
        )
        check(self.routed_scaling > 0, "moe.routed_scaling", self.routed_scaling, "must be > 0")
        check(
            not self.shared_gate or self.num_shared_experts > 0,
            "moe.shared_gate",
            self.shared_gate,
            "needs moe.num_shared_experts > 0",
        )
