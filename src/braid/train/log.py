"""What the trainer reports: console lines, a progress bar, the metrics store and the run registry.

Host syncs happen only at log steps (the interval's router statistics are summed on the device
in between). Rank 0 prints and keeps the experiments registry; every rank writes its own
metrics file, handed to the disk every metrics.flush_every logged steps or metrics.flush_seconds
(whichever is first), at `flush()` (the trainer calls it before each checkpoint) and at
`close()` (the end, an error, a stop). `check_logging(cfg)` runs before anything is written.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from braid.config import Config
from braid.errors import BraidError
from braid.parallel.mesh import ParallelContext

# Dense bf16 peak per GPU for MFU (vendor datasheets, without sparsity).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


def check_logging(cfg: Config) -> None:
    """Raise BraidError now if a configured logging dependency is missing, so that the run
    fails before it creates its directory or registry row (not half-way through setting up)."""
    if cfg.metrics.tensorboard:
        from braid.metrics.store import require_tensorboard

        require_tensorboard()


class Throughput:
    """Tokens per second of a run: total tokens over total time of its log intervals, leaving
    out the first interval (start-up: compilation, allocator warm-up) once there are others."""

    def __init__(self) -> None:
        self.first: tuple[int, float] | None = None
        self.tokens, self.seconds = 0, 0.0  # every interval after the first

    def add(self, tokens: int, seconds: float) -> float:
        """Record one interval; returns its own rate."""
        if self.first is None:
            self.first = (tokens, seconds)
        else:
            self.tokens += tokens
            self.seconds += seconds
        return tokens / max(seconds, 1e-9)

    def tokens_per_s(self) -> float:
        if self.seconds > 0:
            return self.tokens / self.seconds
        tokens, seconds = self.first or (0, 0.0)  # one interval only (or none)
        return tokens / max(seconds, 1e-9)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class TrainLogger:
    def __init__(
        self, cfg: Config, ctx: ParallelContext, run_id: str, run_dir: Path, flops_per_token: float
    ):
        from braid.metrics.experiments import ExperimentsDB, git_revision
        from braid.metrics.store import MetricsWriter

        self.cfg, self.ctx, self.run_id = cfg, ctx, run_id
        self.flops_per_token, self.peak = flops_per_token, peak_flops(ctx.device)
        self.writer = MetricsWriter(
            run_dir,
            ctx.rank,
            flush_every=cfg.metrics.flush_every,
            flush_seconds=cfg.metrics.flush_seconds,
            tensorboard=cfg.metrics.tensorboard and ctx.is_main,
        )
        self.degraded: str | None = None  # metrics.on_error=continue and a write failed
        err = None
        try:
            self.writer.probe()  # a corrupt or unwritable metrics file fails here, not later
        except BraidError as e:
            if cfg.metrics.on_error == "stop":
                err = e
            else:
                self._degrade(str(e))
        from braid.parallel.distributed import raise_on_any

        raise_on_any(err, ctx)
        self.db = None
        if ctx.is_main:
            self.db = ExperimentsDB(Path(cfg.run.dir))
            self.db.start(
                run_id,
                name=cfg.run.name or run_id,
                run_dir=str(run_dir),
                config=cfg.to_dict(),
                fingerprint=cfg.fingerprint(),
                world_size=ctx.world,
                git_rev=git_revision(Path.cwd()),
            )
        self.throughput = Throughput()
        self._sums: dict[str, torch.Tensor] = {}
        self._loads: dict[int, torch.Tensor] = {}
        self._n = 0
        self.bar = None
        if ctx.is_main and cfg.train.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.train.steps, desc="train", dynamic_ncols=True, leave=False)

    def _print(self, line: str) -> None:
        if not self.ctx.is_main:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def micro_stats(self, parts: list[dict]) -> None:
        for p in parts:
            for k in ("aux", "z", "mtp"):
                if k in p:
                    self._sums[k] = self._sums.get(k, 0) + p[k]
            for layer, s in p["moe"].items():
                self._loads[layer] = self._loads.get(layer, 0) + s.counts_E
                self._sums["dropped"] = self._sums.get("dropped", 0) + s.num_dropped
            self._n += 1

    def train(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        skipped: int,
        tokens: int,
        seconds: float,
    ) -> None:
        """Log step `step`, the end of an interval of `tokens` global tokens in `seconds`."""
        tps = self.throughput.add(tokens, seconds)
        sums = self._global_sums()  # host sync at log steps only
        values = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": tps,
            "train/aux_loss": sums.get("aux", 0.0),
            "train/z_loss": sums.get("z", 0.0),
            "train/skipped_steps": skipped,
            "train/dropped_per_micro": sums.get("dropped", 0.0),
        }
        if "mtp" in sums:  # mean cross-entropy over the MTP depths (unweighted)
            values["train/mtp_loss"] = sums["mtp"]
        mfu = self._mfu(tps)
        if mfu is not None:
            values["train/mfu"] = mfu
        balance = []
        for layer, counts in sorted(self._loads.items()):
            frac = (counts / counts.sum().clamp(min=1)).tolist()
            if self.cfg.metrics.expert_load:
                self.writer.log_expert_load(step, layer, frac)
            balance.append(max(frac) * len(frac))
        if balance:
            values["train/load_max_over_mean"] = max(balance)
        self.writer.log(step, values)
        self.writer.end_step()
        self._sums, self._loads, self._n = {}, {}, 0
        if self.db is not None:
            self.db.heartbeat(self.run_id, step=step, last_loss=loss)
        line = (
            f"step {step:>6}/{self.cfg.train.steps} | loss {loss:.4f} | "
            f"aux {values['train/aux_loss']:.3f} | z {values['train/z_loss']:.3f} | "
            f"lr {lr:.2e} | gnorm {grad_norm:.3f} | {tps:,.0f} tok/s"
        )
        if "mtp" in sums:
            line += f" | mtp {sums['mtp']:.4f}"
        if mfu is not None:
            line += f" | mfu {100 * mfu:.1f}%"
        if balance:
            line += f" | load max/mean {max(balance):.2f}"
        self._print(line)

    def _global_sums(self) -> dict[str, float]:
        """Per-micro-batch means of the router statistics over the whole global batch, so the
        logged numbers do not depend on the layout: aux, z and mtp averaged over ranks (each a
        mean over its rank's equal share of tokens), dropped copies summed over ranks."""
        keys = [k for k in ("aux", "z", "mtp", "dropped") if k in self._sums]
        if not keys:
            return {}
        v = torch.stack([torch.as_tensor(self._sums[k]).float() for k in keys])
        if self.ctx.distributed:
            from braid.parallel.distributed import all_reduce_mean

            v = all_reduce_mean(v, self.ctx)
            v[[i for i, k in enumerate(keys) if k == "dropped"]] *= self.ctx.world
        n = max(self._n, 1)
        return {k: x / n for k, x in zip(keys, v.tolist(), strict=True)}

    def val(self, step: int, loss: float | None) -> None:
        if loss is None:  # train.val_batches = 0: no validation
            return
        self.writer.log(step, {"val/loss": loss})
        self.writer.end_step()
        self._print(f"step {step:>6}/{self.cfg.train.steps} | val loss {loss:.4f}")

    def progress(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def _mfu(self, tps: float) -> float | None:
        if self.peak is None:
            return None
        return tps * self.flops_per_token / (self.peak * self.ctx.world)

    def mean_tokens_per_s(self) -> float:
        return self.throughput.tokens_per_s()

    def flush(self) -> None:
        """Every metric logged so far on disk (before a checkpoint, so that a resumed run never
        lacks the rows of the steps it does not redo)."""
        self.writer.flush()

    def write_failed(self) -> str | None:
        """The metrics write error that must stop the run (metrics.on_error=stop), else None;
        with on_error=continue the run is marked degraded instead."""
        error = self.writer.error
        if error is None or self.degraded is not None:
            return None
        message = f"metrics store {self.writer.path} cannot be written ({error})"
        if self.cfg.metrics.on_error == "continue":
            self._degrade(message)
            return None
        return message

    def _degrade(self, message: str) -> None:
        self.degraded = message
        print(
            f"warning: {message}; training goes on without metrics (metrics.on_error=continue)",
            file=sys.stderr,
            flush=True,
        )

    def mfu(self) -> float | None:
        m = self._mfu(self.mean_tokens_per_s())
        return None if m is None else round(m, 4)

    def close(
        self,
        status: str,
        step: int | None = None,
        last_loss: float | None = None,
        error: str | None = None,
    ) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.writer.close()  # the last rows: a failure here is reported, not lost silently
        late = self.writer.error if status == "finished" else None  # a failed run says why
        if late is not None and self.degraded is None:
            self.degraded = (
                f"metrics store {self.writer.path} cannot be written ({late}): rows after its "
                "last good write are lost"
            )
            print(f"warning: {self.degraded}", file=sys.stderr, flush=True)
        if error is None and self.degraded is not None:
            error = f"degraded: {self.degraded}"
        if self.db is not None:
            self.db.finish(self.run_id, status, step=step, last_loss=last_loss, error=error)
            self.db = None
