"""`simulated`: the local exchange that takes the time of a real one (one process, one GPU).

Job: measure overlap where there is one GPU. Rows move exactly as with the local exchange (the
result of a movement IS its input, so outputs are bitwise the local exchange's), but each
movement occupies a communication stream for as long as an all-to-all of the same payload would
take on `exchange.simulate_ranks` ranks:

  t(bytes) = max(latency, bytes / bw(bytes))      bytes = the payload this rank sends (algbw)

bw is `exchange.simulate_gbps` when set, else interpolated (log-log in the message size, held
at the ends) from `NVLINK_H200X4`: all_to_all_single measured on 4x H200 over NVLink (about
113 GB/s per rank at 8 MiB, 409 GB/s at 256 MiB; latency floor `exchange.simulate_latency_us`,
about 40 us). Movements run one after another on the stream, as they would on a link.

On CUDA a movement, on the exchange's own stream (made by `braid.overlap.streams.new_stream`,
ordered after the caller's stream as NCCL's is): (1) copies the (W-1)/W of the payload that
would leave the rank into a scratch buffer, so HBM traffic contends with the compute beside it
as the real send and receive would; (2) spins a one-block kernel for the rest of t
(`braid.ops.spin`: on the GPU's nanosecond timer, so SM clock changes do not stretch it).
`wait()` orders the caller's stream after it (`EventHandle`). The copy bandwidth is measured
once, at the first movement. A movement issued onto idle streams (the caller's has run
everything before it, the link is free) starts at once, and when its copy is shorter than the
host's launch of the spin kernel the stream idles in between: that launch is learned from
such movements once finished (the first 16 idle issues, then one in 8, mark their copy's end
with an event; no waiting; `LaunchGap`, a median) and what a movement's copy does not hide of
it is taken off its spin, so small movements keep their modelled time. Issued behind queued
work (the host ahead), a movement is enqueued whole before its stream gets there: nothing is
taken off (queued work shorter than the issue leaves part of a gap, uncorrected).
On CPU nothing is copied: a movement is complete at its deadline (`done()` polls the host
clock, `wait()` sleeps until it), so the engine's drain and report work as on a real link.
`exchange_counts` and `all_reduce_sum` cost one latency each (serial, as their blocking
collectives are); their values are the local exchange's. The dispatcher's plans call
`exchange_counts` and read the splits on the host here, as with the ranks it stands in for
(`traffic_ranks`), so every mode pays the host sync that a real group's dispatch pays.

Not modelled (docs/exchange.md): NVLink/NIC contention between ranks, NCCL's own SM use
(the sleep kernel takes one block of one warp, NCCL takes several thread blocks), rank skew and
stragglers, and uneven splits (only the payload size matters).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque

import torch
from torch import Tensor

from braid.errors import BraidError
from braid.exchange.base import Exchange, Handle
from braid.exchange.config import ExchangeConfig
from braid.exchange.handles import EventHandle
from braid.ops.spin import spin
from braid.overlap.streams import new_stream

MAX_GAP_MS = 0.1  # the largest launch time a movement's spin is shortened by
MIN_SPIN_MS = 2e-3  # a spin is never shortened below this: a sample's gap stays measurable
SAMPLE_FIRST, SAMPLE_EVERY = 16, 8  # idle issues that mark their copy's end: the first, then 1 in 8
# Payload bytes per rank -> algbw GB/s, all_to_all_single on 4x H200 (NVLink, NCCL 2.28.9).
NVLINK_H200X4 = ((8 * 2**20, 113.0), (256 * 2**20, 409.0))


def simulated_ms(nbytes: int, cfg: ExchangeConfig) -> float:
    """Model time in ms of one all-to-all whose payload is `nbytes` per rank."""
    latency = cfg.simulate_latency_us / 1e3
    if nbytes <= 0:
        return latency
    gbps = cfg.simulate_gbps or interpolate_gbps(nbytes, NVLINK_H200X4)
    return max(latency, nbytes / (gbps * 1e9) * 1e3)


def interpolate_gbps(nbytes: float, table: tuple[tuple[int, float], ...]) -> float:
    """Bandwidth at `nbytes`, log-log between the table's points, held beyond its ends."""
    if nbytes <= table[0][0]:
        return table[0][1]
    for (b0, g0), (b1, g1) in zip(table, table[1:], strict=False):
        if nbytes <= b1:
            f = math.log(nbytes / b0) / math.log(b1 / b0)
            return math.exp(math.log(g0) + f * math.log(g1 / g0))
    return table[-1][1]


class _Deadline(Handle):
    """CPU: a movement that completes at a host-clock deadline."""

    def __init__(self, out: Tensor, deadline: float, ms: float):
        self.out, self.deadline, self.ms = out, deadline, ms

    def done(self) -> bool:
        return time.perf_counter() >= self.deadline

    def wait(self) -> Tensor:
        left = self.deadline - time.perf_counter()
        if left > 2e-3:
            time.sleep(left - 1e-3)  # the OS may oversleep by a millisecond: spin the rest
        while time.perf_counter() < self.deadline:
            pass
        return self.out

    def elapsed_ms(self) -> float | None:
        return self.ms


class LaunchGap:
    """The time from a movement's start to its spin's start when the movement is issued onto
    idle streams (the caller's stream has run everything before it and the link is free): the
    copy's launch and run, then the wait for the host to launch the spin. Learned from
    sampled movements (`observe`), as the median of the last `keep` samples, each capped at
    `MAX_GAP_MS`, and used only once `need` samples are in: one outlier (the first movement
    after calibration, a spin held behind busy kernels) moves it little."""

    def __init__(self, keep: int = 9, need: int = 3):
        self.samples: deque[float] = deque(maxlen=keep)
        self.need = need
        self.ms = 0.0  # the estimate: the samples' median once `need` are in

    def observe(self, gap_ms: float, copy_elapsed_ms: float) -> None:
        """One sample: the idle time between the copy's end and the spin's start, and the time
        from the movement's start to the copy's end. Without a gap the copy hid the launch:
        nothing is learned."""
        if gap_ms > 2e-3:
            self.samples.append(min(gap_ms + copy_elapsed_ms, MAX_GAP_MS))
            if len(self.samples) >= self.need:
                self.ms = statistics.median(self.samples)

    def shorten(self, copy_ms: float) -> float:
        """What an idle issue's spin is shortened by: the launch its own copy does not hide."""
        return max(self.ms - copy_ms, 0.0)


class SimulatedExchange(Exchange):
    size, rank = 1, 0

    def __init__(self, ep_group=None, world_group=None, cfg: ExchangeConfig | None = None):
        if ep_group is not None or world_group is not None:
            raise BraidError(
                "exchange.algorithm=simulated runs in one process (it stands in for "
                "exchange.simulate_ranks ranks); launch without torchrun, or use nccl"
            )
        self.cfg = cfg if cfg is not None else ExchangeConfig(algorithm="simulated")
        self.ranks = self.cfg.simulate_ranks
        self._busy_until = 0.0  # CPU: the link is free again at this host time
        self._stream = None
        self._ready = None
        self._scratch: Tensor | None = None
        self._copy_bytes_per_ms = 0.0
        self._spins: deque[tuple] = deque()  # (start, after-copy, end, spun, marking ms) of samples
        self._idle_issues = 0
        self._last_end = None  # the latest movement's end event
        self.launch = LaunchGap()

    @property
    def traffic_ranks(self) -> int:
        return self.ranks

    def exchange_counts(self, send_counts_WL: Tensor) -> Tensor:
        self._pause(send_counts_WL)
        return send_counts_WL

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        self._pause(t)
        return t

    def move(self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int]) -> Handle:
        return self._move(x_RD, None)

    def move_into(
        self, x_RD: Tensor, send_splits: list[int], recv_splits: list[int], out: Tensor
    ) -> Handle:
        """The rows copied into `out` on the exchange's stream, as the movement's device copy
        (every byte, where `move` copies the bytes that would leave the rank to scratch)."""
        return self._move(x_RD, out)

    def _move(self, x_RD: Tensor, out: Tensor | None) -> Handle:
        nbytes = x_RD.numel() * x_RD.element_size()
        ms = simulated_ms(nbytes, self.cfg)
        if not x_RD.is_cuda:
            start = max(time.perf_counter(), self._busy_until)
            self._busy_until = start + ms / 1e3
            if out is not None:
                out.copy_(x_RD)
            return _Deadline(x_RD if out is None else out, self._busy_until, ms)
        return self._move_cuda(x_RD, nbytes, ms, out)

    def _pause(self, t: Tensor) -> None:
        """One latency, serial on the caller's stream (a small blocking collective)."""
        ms = self.cfg.simulate_latency_us / 1e3
        if t.is_cuda:
            spin(ms, t.device)
        elif ms > 0:
            time.sleep(ms / 1e3)

    def _move_cuda(self, x_RD: Tensor, nbytes: int, ms: float, out: Tensor | None) -> Handle:
        self._calibrate(x_RD.device)
        self._learn_gap()
        # Received in place, every byte lands in `out`; else the bytes that would leave the rank.
        cross = nbytes if out is not None else nbytes * (self.ranks - 1) // self.ranks
        x = x_RD.contiguous()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        stream, caller = self._stream, torch.cuda.current_stream(x.device)
        # Issued onto idle streams (the caller's has run everything, the link is free), the
        # movement starts at once and its spin only once the host has launched it: that launch
        # is learned and taken off the spin. Issued behind queued work that outlasts the host's
        # issue (the host ahead, as it mostly is), the movement is enqueued whole before its
        # stream gets there: nothing is taken off (queued work shorter than the issue leaves
        # part of the gap, not corrected).
        idle = caller.query() and (self._last_end is None or self._last_end.query())
        self._ready.record(caller)  # one reused event orders the exchange's stream after the
        stream.wait_event(self._ready)  # caller's (`wait_stream` makes a new one every call)
        copy_ms = cross / self._copy_bytes_per_ms
        rest = 0.0  # the spin: the model's time after the copy, less an idle issue's launch,
        if ms > copy_ms:  # never below MIN_SPIN_MS (a sample's gap stays measurable) nor the model
            launch = self.launch.shorten(copy_ms) if idle else 0.0
            rest = max(ms - copy_ms - launch, min(MIN_SPIN_MS, ms - copy_ms))
        sample = False
        if idle:
            self._idle_issues += 1
            n = self._idle_issues
            sample = rest > 0 and (n <= SAMPLE_FIRST or n % SAMPLE_EVERY == 0)
        with torch.cuda.stream(stream):
            # The copy's operands are made before `start` is recorded: on idle streams the
            # movement starts at `start`, and the host's work before the copy's launch would
            # be idle time inside it.
            src, dst = x, out
            if out is None and cross:
                if self._scratch is None or self._scratch.numel() < cross:
                    # Allocated on the exchange's stream: a replaced buffer's memory is reused
                    # only behind this stream's earlier copies into it.
                    self._scratch = None
                    self._scratch = torch.empty(cross, dtype=torch.uint8, device=x.device)
                src, dst = x.view(-1).view(torch.uint8)[:cross], self._scratch[:cross]
            mid = torch.cuda.Event(enable_timing=True) if sample else None
            start.record(stream)
            if dst is not None:
                dst.copy_(src)
            if mid is not None:  # marks the copy's end; the host time it takes is not launch
                t0 = time.perf_counter()
                mid.record(stream)
                marking_ms = 1e3 * (time.perf_counter() - t0)
            spin(rest)  # on the current device: the stream's
            end.record(stream)
        self._last_end = end
        if sample:
            self._spins.append((start, mid, end, rest, marking_ms))
        x.record_stream(stream)  # read on the exchange's stream
        if out is not None:
            out.record_stream(stream)  # written there
        return EventHandle(start, end, x_RD if out is None else out)

    def _learn_gap(self) -> None:
        """Feed `self.launch` from finished sampled movements, without waiting: the idle gap
        between the copy's end and the spin's start (what the movement took beyond the copy
        and the spin, less the host time of marking the copy's end, which unsampled movements
        do not spend) and the time up to the copy's end. A copy slowed by the compute beside
        it is not a gap: that contention stays in the movement's time, as in a real one's."""
        while self._spins and self._spins[0][2].query():
            start, mid, end, spun, marking_ms = self._spins.popleft()
            self.launch.observe(mid.elapsed_time(end) - spun - marking_ms, start.elapsed_time(mid))

    def _calibrate(self, device: torch.device) -> None:
        """Once: the exchange's stream and the device copy bandwidth on this GPU."""
        if self._copy_bytes_per_ms:
            return
        self._stream = new_stream(device, self.cfg.high_priority)
        self._ready = torch.cuda.Event()  # orders the stream after the caller's (no timing)
        spin(1e-3, device)  # compiles the spin kernel now, not inside a timed movement
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = 64 * 2**20
        src = torch.empty(n, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        a.record()
        for _ in range(5):
            dst.copy_(src)
        b.record()
        b.synchronize()
        self._copy_bytes_per_ms = 5 * n / a.elapsed_time(b)
