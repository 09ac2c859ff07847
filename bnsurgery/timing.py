"""Wall-clock timing: the one helper behind every latency and ratio the package and its
benchmarks report.

Contenders are timed *interleaved*: each round runs every call once, in turn, so that a busy
period on a shared machine slows all of them alike instead of skewing their ratio. Each call
gets its median and quartiles over the rounds; a ratio is only ever taken between medians of the
same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from bnsurgery.results import JsonResult

__all__ = ["Timing", "interleaved_timings", "time_call"]


@dataclass(frozen=True)
class Timing(JsonResult):
    """Median and spread, in seconds, of one call's timed runs.

    Attributes:
        median: Median seconds per call.
        quartiles: First and third quartile (inclusive method): how much the runs moved.
        samples: How many timed runs the figures come from.
    """

    median: float
    quartiles: tuple[float, float]
    samples: int

    @property
    def spread_ms(self) -> tuple[float, float]:
        """The quartiles in milliseconds."""
        return (1e3 * self.quartiles[0], 1e3 * self.quartiles[1])

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        """Summarise timed runs (one run gives a zero-width spread)."""
        if not seconds:
            raise ValueError("Timing.of: no timed runs (seconds=[]), expected at least one.\n"
                             "Hint: time with rounds >= 1.")
        if len(seconds) == 1:
            return cls(seconds[0], (seconds[0], seconds[0]), 1)
        first, _, third = statistics.quantiles(seconds, n=4, method="inclusive")
        return cls(statistics.median(seconds), (first, third), len(seconds))


def interleaved_timings(
    calls: Mapping[str, Callable[[], Any]],
    *,
    rounds: int,
    warmup: int = 1,
    rotate: bool = False,
    burst: int = 1,
    settle: int = 0,
    before: Callable[[], Any] | None = None,
    after: Callable[[], Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time every call ``rounds`` times, one call of each per round, after ``warmup`` rounds.

    Args:
        calls: Name -> a call without arguments (a forward pass, a session run).
        rounds: Timed rounds (at least one is run); each gives ``burst`` samples per call.
        warmup: Untimed rounds first (first-call costs: allocation, compilation, caches).
        rotate: Start each round with the next call, so no call always runs right after the
            same neighbour.
        burst: Timed runs of a call in a row, each one a sample, before the next call's turn.
        settle: Untimed runs of a call at the start of each of its turns: they absorb what
            interleaving itself costs (an allocator adapting to the previous call's memory
            pattern), which belongs to neither call.
        before: Run before the clock starts for each call (a device synchronisation, a
            barrier), untimed.
        after: Run right after each call, before the clock stops (a device synchronisation, so
            that asynchronous work is inside the measurement).
        clock: Seconds now; :func:`time.perf_counter` unless a test substitutes its own.

    Returns:
        Name -> its :class:`Timing`, in the order of ``calls``.
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for index in range(max(1, rounds)):
        shift = index % len(names) if rotate and names else 0
        for name in names[shift:] + names[:shift]:
            for _ in range(settle):
                calls[name]()
            for _ in range(max(1, burst)):
                if before is not None:
                    before()
                start = clock()
                calls[name]()
                if after is not None:
                    after()
                seconds[name].append(clock() - start)
    return {name: Timing.of(seconds[name]) for name in names}


def time_call(function: Callable[[], Any], repeats: int = 1, *,
              clock: Callable[[], float] = time.perf_counter) -> tuple[Any, Timing]:
    """Run ``function`` ``repeats`` times (at least once), no warm-up: its last result and its
    timing (the first run is counted, as a user's first call would be)."""
    last: list[Any] = [None]  # one slot: earlier outputs are not kept alive
    timing = interleaved_timings({"call": lambda: last.__setitem__(0, function())}, rounds=repeats,
                                 warmup=0, clock=clock)["call"]
    return last[0], timing
