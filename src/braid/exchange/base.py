"""The exchange contract: how routed rows travel between the ranks of an expert-parallel group.

An exchange is an autograd-free primitive. The MoE dispatcher (`braid.moe.dispatcher`) holds the
only autograd glue around it. Every data movement returns a `Handle` (`wait`, `done`,
`elapsed_ms`; below); the caller decides when to `wait()`, so the overlap scheduler can fill the
time in between with other work, polling `done()`. `braid.exchange.handles` has ready-made
handles for torch.distributed Works and CUDA events.

Contract (checked by the conformance tests for every registered exchange):
- `size`/`rank`: the expert-parallel group; rank r owns experts [r*E/size, (r+1)*E/size). A
  one-process exchange has size 1 and still gets every movement (the local exchange returns
  `Done`, the simulated one takes a real exchange's time).
- `exchange_counts(send_counts_WL)`: send_counts_WL[w, l] rows go from this rank to local expert
  l of rank w; returns recv_counts_WL[w, l], the rows rank w sends to this rank's expert l.
- `move(x_RD, send_splits, recv_splits)`: rows are ordered by destination rank; rank w gets
  the next send_splits[w] rows; the result holds recv_splits[w] rows from each rank w in rank
  order. Exact (no compression); gradients always travel this way (straight-through).
- `dispatch` (tokens to experts) and `combine` (outputs back to their tokens' home ranks) are the
  same movement as `move` in the forward pass; an exchange may compress either payload.
- `move_into(x_RD, send, recv, out)` / `combine_into(...)`: the same movements, their rows
  received into `out` (contiguous, [sum(recv), ...]), whose handle's `wait()` returns `out`
  (the pipeline's chunks of experts receive into slices of one buffer, with no concatenation
  after). The defaults move, then copy into `out` at `wait()`; an exchange that can receive in
  place (`nccl`, `simulated`) overrides `move_into`, and `combine_into` follows it unless the
  exchange overrides `combine`. Callers go through `receive_into`, which copies for an
  exchange without them (duck-typed).
- `all_reduce_sum(t)`: sum over every rank that holds a distinct part of the global batch
  (the whole world, not just the EP group), used for router statistics.
- sharing: ONE exchange object serves every MoE layer of a model (`braid.parallel.expert`), and
  several movements may be in flight at once (the overlap pipeline issues the next chunk's
  before waiting), in the same order on every rank: keep a movement's state in its handle, or
  order the reuse of anything shared between movements (as `symmetric` does with its buffer).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class Handle(ABC):
    """One movement in flight. The whole interface the overlap engine uses (`braid.overlap`):

    - `wait()`: returns the received rows, once the movement has completed; on CUDA it may
      instead order the caller's current stream after the movement (as `Work.wait()` does for
      NCCL), so the host need not block. Called exactly once per handle.
    - `done()`: a non-blocking poll, True once the movement has completed. The engine runs
      deferred weight gradients while it is False (`WgradQueue.drain`); a handle that is never
      False gets nothing overlapped, whatever its exchange does underneath.
    - `elapsed_ms()`: the movement's own duration (issue to completion) as the exchange measured
      it, read after `wait()` and a device synchronize; None when the exchange does not know it
      (the engine's report then uses issue to the end of `wait()`, an upper bound).
    """

    @abstractmethod
    def wait(self) -> Tensor: ...

    @abstractmethod
    def done(self) -> bool: ...

    def elapsed_ms(self) -> float | None:
        return None


class Done(Handle):
    """A handle for a movement that already completed (local exchange, empty payload)."""

    def __init__(self, out: Tensor):
        self._out = out

    def wait(self) -> Tensor:
        return self._out

    def done(self) -> bool:
        return True

    def elapsed_ms(self) -> float | None:
        return 0.0


class Into(Handle):
    """`inner`'s rows copied into `out` when waited (the default `move_into`)."""

    def __init__(self, inner: Handle, out: Tensor):
        self.inner, self.out = inner, out

    def done(self) -> bool:
        return self.inner.done()

    def elapsed_ms(self) -> float | None:
        return self.inner.elapsed_ms()

    def wait(self) -> Tensor:
        rows = self.inner.wait()
        if rows.data_ptr() != self.out.data_ptr() or rows.shape != self.out.shape:
            self.out.copy_(rows)
        return self.out


def receive_into(
    exchange, op: str, x_RD: Tensor, send_splits: list[int], recv_splits: list[int], out: Tensor
) -> Handle:
    """`exchange.<op>_into(...)` (op: "move" or "combine"); an exchange without it (duck-typed,
    not an `Exchange`) moves as `op`, its rows copied into `out` when waited. Every caller
    that receives into a buffer goes through here: the dispatcher and the wrappers (`auto`,
    compression), whose inner exchange may be duck-typed."""
    into = getattr(exchange, f"{op}_into", None)
    if into is None:
        return Into(getattr(exchange, op)(x_RD, send_splits, recv_splits), out)
    return into(x_RD, send_splits, recv_splits, out)


class Exchange(ABC):
    size: int = 1
    rank: int = 0

    @abstractmethod
    def exchange_counts(self, send_counts_WL: Tensor) -> Tensor: ...

    @abstractmethod
    def move(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle: ...

    def dispatch(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        return self.move(x_RD, send_splits, recv_splits)

    def combine(self, y_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        return self.move(y_RD, send_splits, recv_splits)

    def move_into(
        self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int], out: Tensor
    ) -> Handle:
        """`move`, its rows received into `out` (the contract above); by default a copy."""
        return Into(self.move(x_RD, send_splits, recv_splits), out)

    def combine_into(
        self, y_RD: Tensor, send_splits: list[int], recv_splits: list[int], out: Tensor
    ) -> Handle:
        """`combine` into `out`: `move_into` where `combine` is the plain `move`."""
        if type(self).combine is Exchange.combine:
            return self.move_into(y_RD, send_splits, recv_splits, out)
        return Into(self.combine(y_RD, send_splits, recv_splits), out)

    @abstractmethod
    def all_reduce_sum(self, t: Tensor) -> Tensor: ...

    @property
    def traffic_ranks(self) -> int:
        """Ranks one movement's traffic is spread over (what a cost model calls W): `size`,
        except for an exchange that imitates more (`simulated`)."""
        return self.size

    def enable_timing(self) -> None:  # noqa: B027 (optional hook, a no-op by default)
        """Make handles' `elapsed_ms()` measure (the overlap report asks; may cost a little)."""


class LocalExchange(Exchange):
    """One process owns every expert: nothing moves. The default seam of a single-device model."""

    def exchange_counts(self, send_counts_WL: Tensor) -> Tensor:
        return send_counts_WL

    def move(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        return Done(x_RD)

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        return t
