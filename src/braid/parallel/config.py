"""The `[parallel]` section: expert-parallel size and how dense weights are distributed."""

from __future__ import annotations

from dataclasses import dataclass

from braid.knobs import check, knob, one_of


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    ep: int = knob(1, "Expert-parallel size; dp = world_size / ep replicas of each expert.")
    dense: str = knob("fsdp", "Dense weights: fsdp (fully_shard over all ranks) or replicate.")
    activation_checkpoint: bool = knob(False, "Recompute each block's activations in backward.")
    param_dtype: str = knob(
        "fp32",
        "FSDP compute weights: fp32, or bf16 (gathered in bf16, fp32 master weights, grads "
        "and Adam state kept sharded, grads reduced in fp32; torchrun only).",
    )

    timeout_min: float = knob(
        10.0,
        "torchrun: minutes a collective of the whole job (the default process group: "
        "checkpoints, data preparation, each step's gate) waits for the slowest rank before "
        "the job fails; raise it where one rank alone does long work (a large corpus, a "
        "checkpoint of a huge model on slow storage). The ep/dp groups keep torch's default.",
    )

    def validate(self) -> None:
        check(self.ep >= 1, "parallel.ep", self.ep, "must be >= 1")
        check(self.timeout_min > 0, "parallel.timeout_min", self.timeout_min, "must be > 0")
        one_of("parallel.dense", self.dense, ("fsdp", "replicate"))
        one_of("parallel.param_dtype", self.param_dtype, ("fp32", "bf16"))
