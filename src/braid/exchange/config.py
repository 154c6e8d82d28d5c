"""The `[exchange]` section: how routed tokens travel between expert-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob


@dataclass(frozen=True, kw_only=True)
class ExchangeConfig:
    algorithm: str = knob(
        "nccl",
        "Exchange when parallel.ep > 1: nccl, hierarchical, symmetric, auto, or pkg.mod:Cls; "
        "simulated (one process): the local exchange taking a real one's time.",
    )
    compressor: str = knob(
        "none", "Dispatch payload compressor: none, bf16, int8, fp8, or pkg.mod:Cls."
    )
    compress_combine: bool = knob(False, "Also compress the combine payload (expert outputs).")
    scale_block: int = knob(
        128, "fp8: elements per scale, as DeepSeek-V3's 1x128 tiles; 0 = one scale per row."
    )
    node_size: int = knob(0, "Ranks per node for the hierarchical exchange; 0 = local world size.")
    hierarchical_chunks: int = knob(
        2, "hierarchical: pieces each inter-node step is cut into, to overlap the two link kinds."
    )
    symmetric_capacity: int = knob(
        0, "symmetric: receive-buffer rows per rank; 0 = size on first use and grow on demand."
    )
    symmetric_headroom: float = knob(
        2.0, "symmetric, capacity 0: buffers get this multiple of the rows a step needs."
    )
    simulate_ranks: int = knob(
        4,
        "simulated: ranks whose all-to-all is imitated ((W-1)/W of each payload leaves; "
        "chunks of experts divide E/W, as on that group).",
    )
    simulate_gbps: float = knob(
        0.0, "simulated: bandwidth per rank in GB/s; 0 = interpolate the measured 4x H200 table."
    )
    simulate_latency_us: float = knob(
        40.0, "simulated: time floor of one movement, and the cost of a count exchange (us)."
    )
    high_priority: bool = knob(
        False,
        "CUDA: run the exchange on a high-priority stream (NCCL: the expert-parallel groups' "
        "internal streams; simulated, symmetric: their own), whose kernels start before "
        "queued compute kernels as SMs free up.",
    )
    auto_candidates: list[str] = knob(
        ["nccl", "hierarchical", "symmetric"], "algorithm=auto: exchanges timed at start-up."
    )

    def validate(self, *, imports: bool = True) -> None:
        """`imports=False`: the config is data (from a checkpoint or a model directory), so
        dotted plug-in paths are not imported (see braid.exchange.validate_names)."""
        from braid.exchange import validate_names

        check(self.node_size >= 0, "exchange.node_size", self.node_size, "must be >= 0")
        check(self.scale_block >= 0, "exchange.scale_block", self.scale_block, "must be >= 0")
        check(
            self.hierarchical_chunks >= 1,
            "exchange.hierarchical_chunks",
            self.hierarchical_chunks,
            "must be >= 1",
        )
        check(
            self.symmetric_capacity >= 0,
            "exchange.symmetric_capacity",
            self.symmetric_capacity,
            "must be >= 0 (0 sizes the buffers on first use)",
        )
        check(
            self.symmetric_headroom >= 1.0,
            "exchange.symmetric_headroom",
            self.symmetric_headroom,
            "must be >= 1.0",
        )
        check(
            len(self.auto_candidates) > 0 and "auto" not in self.auto_candidates,
            "exchange.auto_candidates",
            self.auto_candidates,
            "must name at least one exchange other than auto",
        )
        check(self.simulate_ranks >= 1, "exchange.simulate_ranks", self.simulate_ranks, ">= 1")
        check(self.simulate_gbps >= 0, "exchange.simulate_gbps", self.simulate_gbps, "must be >= 0")
        check(
            self.simulate_latency_us >= 0,
            "exchange.simulate_latency_us",
            self.simulate_latency_us,
            "must be >= 0",
        )
        validate_names(self, imports=imports)
