"""The trainer's checkpointer: save and resume everything a run needs to continue bit for bit.

A checkpoint (`<run_dir>/checkpoints/step_XXXXXXXX/`, see braid.checkpoint.paths) holds:
  .metadata, __<rank>_0.distcp   model and optimizer tensors through DCP (braid.checkpoint.
                                 storage): sharded as trained (FSDP2/EP DTensors or plain),
                                 loadable under any (dp, ep) layout
  rank_XXXXX.json                per rank: its RNG streams (python, numpy, torch, CUDA) and its
                                 data-loader cursor, as JSON (braid.checkpoint.state)
  meta.json                      step, TrainState, optimizer hyper-parameters, config and
                                 fingerprint, file sizes; written last (braid.checkpoint.meta)

Save (collective), in order:
  1. every rank captures its RNG streams before anything else runs;
  2. rank 0 makes an empty `.tmp-step_X`; barrier;
  3. DCP writes every rank's tensor shards and `.metadata` (fsynced);
  4. every rank writes its rank file atomically; barrier;
  5. rank 0 writes meta.json, renames `.tmp-step_X` to `step_X` (replacing an older save of the
     same step), then prunes to keep_last + multiples of keep_every; barrier.
A crash (even SIGKILL) before the rename leaves only a `.tmp-` directory, which resume ignores
and the next save deletes, so the previous checkpoint stays the newest complete one.

Resume: find the checkpoint (`checkpoint.resume`), refuse a config with another fingerprint
unless the differences are allowed (braid.checkpoint.compat), refuse when this run directory
already holds newer checkpoints (two histories would mix), then load tensors, TrainState, RNG
streams and the loader cursor. Rank r reads rank file r; under another world size it reads
r mod the saved world (the loader cursor is global, so data order is exact; RNG streams are not
rank-for-rank the same, which matters only to code that draws from them).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from braid.checkpoint import paths, rng
from braid.checkpoint.compat import check_resume_config
from braid.checkpoint.integrity import DamagedFile, hash_files, my_part
from braid.checkpoint.meta import build_meta, file_sizes, read_meta, verify_checkpoint
from braid.checkpoint.state import fsync_dir, read_json, write_json_durable
from braid.checkpoint.storage import load_tensors, save_error, save_tensors
from braid.config import Config
from braid.errors import BraidError, describe_os_error
from braid.parallel.mesh import ParallelContext


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.json"


class Checkpointer:
    """Saves into and resumes from `<run_dir>/checkpoints`; every method is collective."""

    def __init__(self, run_dir: Path, cfg: Config, ctx: ParallelContext):
        self.run_dir, self.cfg, self.ctx = Path(run_dir), cfg, ctx

    # ---- save ------------------------------------------------------------------------------

    def save(
        self, model: torch.nn.Module, opt: torch.optim.Optimizer, loader: Any, state: Any
    ) -> Path:
        """Write a complete checkpoint of `state.step`; returns its directory."""
        ctx, ck = self.ctx, self.cfg.checkpoint
        streams = rng.capture(ctx.device)  # 1. first: nothing below may draw before this
        tmp = paths.tmp_path(self.run_dir, state.step)
        err = None  # every file step below ends with all ranks agreeing on its error, if any
        if ctx.is_main:  # 2.
            shutil.rmtree(tmp, ignore_errors=True)
            err = _file_step(lambda: tmp.mkdir(parents=True), tmp)
        self._agree(err)
        tensors: dict[str, Any] = {"model": get_model_state_dict(model)}
        groups = None
        if opt.state:  # an optimizer that never stepped has no state to save (see resume)
            osd = get_optimizer_state_dict(model, opt)
            tensors["optim"], groups = osd["state"], osd["param_groups"]
        try:
            save_tensors(tensors, tmp, ctx.distributed, self._group())  # 3.
        except CheckpointException as e:  # DCP's, a BaseException: every rank gets it
            if _interrupted(e):
                raise KeyboardInterrupt from None  # a stop signal during the save
            raise save_error(e, tmp) from None
        except Exception as e:  # a full disk, permissions: the previous checkpoint stays
            raise save_error(e, tmp) from None
        own = {"rank": ctx.rank, "rng": streams, "loader": loader.state_dict()}
        self._agree(_file_step(lambda: write_json_durable(tmp / rank_file(ctx.rank), own), tmp))
        mine: dict[str, Any] = {}

        def measure() -> None:  # every rank hashes its share of the files, rank 0 collects
            mine["sizes"] = file_sizes(tmp)
            mine["hashes"] = hash_files(tmp, my_part(mine["sizes"], ctx.rank, ctx.world))

        self._agree(_file_step(measure, tmp))
        sizes, hashes = mine["sizes"], self._merge(mine["hashes"])
        final = paths.final_path(self.run_dir, state.step)
        err = None
        if ctx.is_main:  # 5.
            meta = build_meta(
                step=state.step,
                world=ctx.world,
                ep=ctx.ep,
                cfg=self.cfg,
                train_state=state,
                optim_groups=groups,
                files=sizes,
                hashes=hashes,
            )

            def install() -> None:
                write_json_durable(tmp / paths.META_FILE, meta, indent=1)
                _install(tmp, final)

            err = _file_step(install, tmp)
            if err is None:  # installed: a clean-up that fails is a warning, not a failed save
                try:
                    paths.prune(self.run_dir, ck.keep_last, ck.keep_every)
                except OSError as e:
                    why = describe_os_error(e, e.filename or self.run_dir, "prune checkpoints in")
                    print(f"warning: {why}", file=sys.stderr, flush=True)
        self._agree(err)
        return final

    # ---- resume ----------------------------------------------------------------------------

    def resume(
        self, model: torch.nn.Module, opt: torch.optim.Optimizer, loader: Any, state: Any
    ) -> None:
        """Restore model, optimizer, `state`, RNG streams and loader from the checkpoint that
        `checkpoint.resume` names; leave everything as it is when there is none."""
        ctx = self.ctx
        set_aside = 0
        while True:
            src, meta, start, own, err = self._open_source()
            if not (isinstance(err, DamagedFile) and self.cfg.checkpoint.resume == "auto"):
                break
            self._set_aside(src, err)  # then try the next newest intact checkpoint
            set_aside += 1
        if isinstance(err, DamagedFile):  # named explicitly: say how to go on from another
            err = BraidError(f"{err.finding()}; {self._fork_advice(src)}")
        elif src is None and set_aside and err is None:  # never restart from 0 unasked
            err = BraidError(
                f"{self.run_dir} has no intact checkpoint left (damaged ones were "
                f"set aside as {paths.CORRUPT_PREFIX}step_*): start this run afresh "
                "with checkpoint.resume=none"
            )
        self._agree(err)  # every rank raises the same error, so none waits in a collective
        if src is None:
            return
        _load_model_and_optim(model, opt, src, meta, ctx.distributed, self._group())
        err = None
        try:
            _restore_rank_state(own, loader, ctx.device)
        except BraidError as e:
            err = e
        self._agree(err)
        names = {f.name for f in dataclasses.fields(state)}
        for key, value in meta["train_state"].items():
            if key in names:
                setattr(state, key, value)
        if ctx.is_main:
            print(f"resumed from {src} at step {state.step}", file=sys.stderr, flush=True)

    def _open_source(self) -> tuple[Path | None, dict, int, Path | None, BraidError | None]:
        """(checkpoint, its meta, its step, this rank's file, the error every rank agrees on)
        for `checkpoint.resume`; all files checked against their hashes, split over ranks."""
        ctx = self.ctx
        found: tuple[Path | None, str | None] = (None, None)
        if ctx.is_main:  # one rank looks, so all ranks agree on the checkpoint
            try:
                if self.cfg.checkpoint.resume == "auto":  # this run's own checkpoints
                    for back in paths.restore_replaced(self.run_dir):  # a save cut off mid-way
                        note = f"restored {back} (a later save of its step did not finish)"
                        print(note, file=sys.stderr, flush=True)
                found = (paths.resolve_resume(self.cfg.checkpoint.resume, self.run_dir), None)
            except BraidError as e:
                found = (None, str(e))
            except OSError as e:  # the rename back failed: every rank hears of it
                found = (None, describe_os_error(e, e.filename or self.run_dir, "restore"))
        src, why = self._broadcast(found)
        if why is not None:
            return None, {}, 0, None, BraidError(why)
        meta: dict = {}
        start, own, err = 0, None, None
        try:
            if src is not None:
                meta = read_meta(src)
                verify_checkpoint(src, meta, ctx.rank, ctx.world)
        except BraidError as e:
            err = e
        err = self._first_error(err)
        if err is not None:
            return src, meta, start, own, err
        try:
            if src is not None:
                accepted = check_resume_config(meta["config"], self.cfg, src)
                start = meta["step"]
                if accepted and ctx.is_main:
                    print(f"resuming with changed keys: {', '.join(accepted)}", file=sys.stderr)
                own = _rank_file_for(src, ctx.rank, meta)
            self._refuse_newer(start)
        except BraidError as e:
            err = e
        return src, meta, start, own, err

    def _set_aside(self, src: Path, err: BraidError) -> None:
        """Rename a damaged checkpoint to `.corrupt-step_X` (kept for inspection, never
        resumed or pruned) and say so; every rank waits for the rename."""
        if self.ctx.is_main:
            aside = src.with_name(f"{paths.CORRUPT_PREFIX}{src.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(src, aside)
            print(
                f"checkpoint {src} is damaged ({err}); moved it to {aside.name} and resuming "
                "from the newest intact checkpoint",
                file=sys.stderr,
                flush=True,
            )
        self._barrier()

    def _fork_advice(self, src: Path | None) -> str:
        # The other checkpoints of the run `src` belongs to (another run's, when named by path).
        mine = src is None or src.parent.name != paths.CKPT_DIR
        run = self.run_dir if mine else paths.run_of(src)
        older = [p for s, p in paths.complete_checkpoints(run) if src is None or p != src]
        new = f"{self.run_dir.name}-fork"
        if older:
            return (
                f"to go on from an older checkpoint, fork it under a new name: braid train "
                f"... --run.name={new} --checkpoint.resume={older[-1]}"
            )
        return (
            "no other checkpoint of this run is complete: start fresh under a new name, "
            f"braid train ... --run.name={new}"
        )

    def _refuse_newer(self, start: int) -> None:
        newer = [s for s, _ in paths.complete_checkpoints(self.run_dir) if s > start]
        if newer:
            how = "starting fresh" if start == 0 else f"resuming at step {start}"
            raise BraidError(
                f"{self.run_dir} already holds checkpoints up to step {newer[-1]}, and "
                f"{how} there would mix two histories: set another run.name, resume with "
                f"checkpoint.resume=auto, or delete {self.run_dir / paths.CKPT_DIR}"
            )

    # ---- collectives (no-ops in one process) -----------------------------------------------

    def _group(self) -> Any:
        """The process group of all ranks (None in one process)."""
        if not self.ctx.distributed:
            return None
        from braid.parallel.distributed import world_group

        return world_group(self.ctx)

    def _barrier(self) -> None:
        if self.ctx.distributed:
            torch.distributed.barrier(group=self._group())

    def _broadcast(self, obj: Any) -> Any:
        from braid.parallel.distributed import broadcast_object

        return broadcast_object(obj, self.ctx)

    def _merge(self, part: dict[str, str]) -> dict[str, str]:
        """The union of every rank's dict (in one process, `part` itself)."""
        if not self.ctx.distributed:
            return part
        box: list[Any] = [None] * self.ctx.world
        torch.distributed.all_gather_object(box, part, group=self._group())
        return {k: v for d in box for k, v in d.items()}

    def _first_error(self, err: BraidError | None) -> BraidError | None:
        """The first failing rank's error, on every rank (keeps DamagedFile's class)."""
        from braid.parallel.distributed import first_error

        return first_error(err, self.ctx)

    def _agree(self, err: BraidError | None) -> None:
        """Raise on every rank if any rank failed a check (first failing rank's message)."""
        from braid.parallel.distributed import raise_on_any

        raise_on_any(err, self.ctx)


def _file_step(step: Any, tmp: Path) -> BraidError | None:
    """Run one file step of a save; an OSError becomes the one-line error every rank raises."""
    try:
        step()
    except OSError as e:
        where = e.filename or tmp
        return BraidError(
            f"{describe_os_error(e, where, 'write the checkpoint')}; the previous checkpoint "
            "is intact"
        )
    return None


def _interrupted(e: BaseException) -> bool:
    """DCP wrapped a KeyboardInterrupt (a stop signal) of some rank into its exception."""
    failures = getattr(e, "failures", None) or {}  # {rank: (exception, traceback)}
    return any(isinstance(exc, KeyboardInterrupt) for exc, _ in failures.values())


def _install(tmp: Path, final: Path) -> None:
    """Rename a finished `.tmp-step_X` to `step_X`, moving an existing `step_X` aside first."""
    old = final.with_name(f".old-{final.name}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _rank_file_for(src: Path, rank: int, meta: dict) -> Path:
    """This rank's file; under another world size, the file of rank `rank % saved_world`."""
    return Path(src) / rank_file(rank % max(1, meta["world"]))


def _load_model_and_optim(model, opt, src: Path, meta: dict, distributed: bool, group: Any) -> None:
    model_sd = get_model_state_dict(model)
    tree: dict[str, Any] = {"model": model_sd}
    saved_groups = meta["optim_groups"]
    osd = None
    if saved_groups is not None:
        osd = get_optimizer_state_dict(model, opt)  # creates the state tensors to load into
        _check_groups(osd["param_groups"], saved_groups, src)
        tree["optim"] = osd["state"]
    load_tensors(tree, src, distributed, group)
    set_model_state_dict(model, model_sd)
    if osd is not None:
        osd["param_groups"] = saved_groups
        set_optimizer_state_dict(model, opt, osd)


def _check_groups(current: list[dict], saved: list[dict], src: Path) -> None:
    cur = [list(g["params"]) for g in current]
    old = [list(g.get("params", [])) if isinstance(g, dict) else None for g in saved]
    if cur != old:
        raise BraidError(
            f"checkpoint {src} has optimizer groups over other parameters than "
            "this model's: it was written for another model config"
        )


def _restore_rank_state(file: Path, loader: Any, device: torch.device) -> None:
    data = read_json(file, "checkpoint rank state")
    try:
        rng.restore(data["rng"], device)
        loader.load_state_dict(data["loader"])
    except BraidError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        raise BraidError(
            f"checkpoint rank state {file} is corrupt ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'}); resume "
            "from another checkpoint"
        ) from None
