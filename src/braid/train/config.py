"""The `[train]` section: optimisation, schedule, precision and logging cadence."""

from __future__ import annotations

import re
from dataclasses import dataclass

from braid.knobs import check, knob, one_of

_SKIP_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]]+")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = knob(300, "Optimizer steps to train for.")
    stop_at: int = knob(
        0, "Stop this invocation at this step (with a checkpoint) and resume later; 0 = steps."
    )
    seed: int = knob(1337, "Seed for init, data order and every RNG stream.")
    batch_size: int = knob(16, "Global batch in sequences per optimizer step (all ranks).")
    grad_accum: int = knob(1, "Micro-steps per optimizer step; batch_size is split over them.")
    seq_len: int = knob(128, "Tokens per training sequence (<= model.max_seq_len).")
    lr: float = knob(3e-3, "Peak learning rate.")
    min_lr_ratio: float = knob(0.1, "Cosine decays to lr * min_lr_ratio.")
    warmup: int = knob(30, "Linear warmup steps.")
    weight_decay: float = knob(
        0.1, "AdamW weight decay on matrices (not norms, biases, embeddings)."
    )
    beta1: float = knob(0.9, "AdamW beta1.")
    beta2: float = knob(0.95, "AdamW beta2.")
    grad_clip: float = knob(1.0, "Clip the global gradient norm to this (0 disables).")
    dtype: str = knob("auto", "Compute dtype: auto (bf16 on GPU, fp32 on CPU), bf16 or fp32.")
    device: str = knob("auto", "auto, cpu or cuda.")
    precision: str = knob(
        "bf16",
        "GEMM precision: bf16 (the compute dtype) or fp8 (e4m3 rowwise-scaled expert and dense "
        "GEMMs, dispatch sent as fp8; emulated in fp32 off CUDA; see docs/fp8.md).",
    )
    fp8_wgrad: str = knob(
        "bf16",
        "precision=fp8: weight-gradient GEMMs (experts and linears) in bf16, from the saved fp8 "
        "activations, or in fp8 (scales per feature over the tokens; see docs/fp8.md).",
    )
    fp8_skip: list[str] = knob(
        ["router", "tok_emb", "output"],
        "precision=fp8: modules kept in the compute dtype, by name or glob, matched against each "
        "module path and its parts (experts, shared, attn, ffn, blocks.0.attn.wq, ...).",
    )
    cast_weights_once: bool = knob(
        False,
        "bf16 compute: cast the weights to bf16 once per optimizer step, not in every "
        "micro-step's forward (autocast's results; one process; with `grad_accum = 1` the "
        "routed experts read their copy and keep fp32 grads; docs/peers.md).",
    )
    compile: bool = knob(False, "Wrap each transformer block in torch.compile.")
    cuda_graphs: bool = knob(
        False, "Replay each compiled block as CUDA graphs (compile mode reduce-overhead; one GPU)."
    )
    log_every: int = knob(10, "Log train metrics every n steps.")
    val_every: int = knob(50, "Run validation every n steps (and at start and end).")
    val_batches: int = knob(4, "Batches of batch_size sequences per validation.")
    skip_nonfinite: bool = knob(False, "Skip steps with NaN/inf loss or grads instead of stopping.")
    progress: bool = knob(True, "Show a progress bar on a terminal.")

    def validate(self) -> None:
        for key in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "val_every"):
            check(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "must be > 0")
        check(self.stop_at >= 0, "train.stop_at", self.stop_at, "must be >= 0")
        check(self.val_batches >= 0, "train.val_batches", self.val_batches, "must be >= 0")
        check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "in [0, 1]")
        check(self.warmup >= 0, "train.warmup", self.warmup, "must be >= 0")
        check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        check(0 <= self.beta1 < 1, "train.beta1", self.beta1, "must be in [0, 1)")
        check(0 <= self.beta2 < 1, "train.beta2", self.beta2, "must be in [0, 1)")
        check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0")
        check(
            self.batch_size % self.grad_accum == 0,
            "train.grad_accum",
            self.grad_accum,
            f"must divide train.batch_size={self.batch_size}",
        )
        one_of("train.dtype", self.dtype, ("auto", "bf16", "fp32"))
        one_of("train.device", self.device, ("auto", "cpu", "cuda"))
        one_of("train.precision", self.precision, ("bf16", "fp8"))
        one_of("train.fp8_wgrad", self.fp8_wgrad, ("bf16", "fp8"))
        for pat in self.fp8_skip:
            check(
                isinstance(pat, str) and bool(_SKIP_PATTERN.fullmatch(pat)),
                "train.fp8_skip",
                pat,
                "entries are module names or globs ([A-Za-z0-9_.*?])",
            )
