"""The shared timing helper, on a fake clock: every call's duration is known exactly, so the
medians, quartiles and the round-robin order are checked against values computed by hand."""

from __future__ import annotations

import json
import statistics

import pytest

from bnsurgery.timing import Timing, interleaved_timings, time_call


class FakeClock:
    """A clock that only moves when a call says how long it took."""

    def __init__(self) -> None:
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def call(self, name: str, durations: list[float]):
        def run() -> None:
            self.log.append(name)
            self.now += durations.pop(0)
        return run


def test_medians_and_quartiles_come_from_the_timed_rounds_only():
    clock = FakeClock()
    fast = [100.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the warm-up's 100 s must not count
    slow = [100.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    timings = interleaved_timings({"fast": clock.call("fast", fast),
                                   "slow": clock.call("slow", slow)},
                                  rounds=5, warmup=1, clock=clock)
    assert timings["fast"].median == 3.0 and timings["slow"].median == 30.0
    assert timings["fast"].quartiles == (2.0, 4.0)
    assert timings["slow"].quartiles == tuple(
        statistics.quantiles([10.0, 20.0, 30.0, 40.0, 50.0], n=4, method="inclusive")[::2])
    assert timings["fast"].samples == 5
    assert clock.log == ["fast", "slow"] * 6  # one of each per round, warm-up included
    assert timings["slow"].spread_ms == (20e3, 40e3)


def test_rotation_and_hooks():
    clock = FakeClock()
    calls = {name: clock.call(name, [1.0] * 3) for name in "abc"}
    events: list[str] = []
    timings = interleaved_timings(calls, rounds=3, warmup=0, rotate=True, clock=clock,
                                  before=lambda: events.append("before"),
                                  after=lambda: events.append("after"))
    assert clock.log == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert events == ["before", "after"] * 9
    assert all(t.median == 1.0 for t in timings.values())


def test_burst_and_settle():
    clock = FakeClock()
    # Per turn: one untimed settling run (10 s, never counted), then two timed runs.
    a = clock.call("a", [10.0, 1.0, 2.0, 10.0, 3.0, 4.0])
    b = clock.call("b", [10.0, 5.0, 5.0, 10.0, 5.0, 5.0])
    timings = interleaved_timings({"a": a, "b": b}, rounds=2, warmup=0, burst=2, settle=1,
                                  clock=clock)
    assert clock.log == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert timings["a"].samples == 4 and timings["a"].median == 2.5
    assert timings["b"].median == 5.0 and timings["b"].quartiles == (5.0, 5.0)


def test_the_after_hook_is_inside_the_measurement():
    clock = FakeClock()

    def synchronise() -> None:
        clock.now += 0.5  # waiting for queued work counts towards the call

    timing = interleaved_timings({"x": clock.call("x", [1.0, 1.0])}, rounds=2, warmup=0,
                                 after=synchronise, clock=clock)["x"]
    assert timing.median == 1.5


def test_time_call_returns_the_last_result():
    clock = FakeClock()
    values = iter([1, 2, 3])
    durations = [2.0, 4.0, 9.0]

    def function() -> int:
        clock.now += durations.pop(0)
        return next(values)

    result, timing = time_call(function, 3, clock=clock)
    assert result == 3 and timing.median == 4.0 and timing.samples == 3
    result, timing = time_call(lambda: "once", 0)  # at least one run
    assert result == "once" and timing.samples == 1 and timing.quartiles == (timing.median,) * 2


def test_timing_json_round_trip_and_empty_input():
    timing = Timing.of([0.5, 1.0, 2.0])
    document = json.loads(json.dumps(timing.to_dict()))
    assert document == {"median": 1.0, "quartiles": [0.75, 1.5], "samples": 3}
    assert Timing(document["median"], tuple(document["quartiles"]), document["samples"]) == timing
    with pytest.raises(ValueError, match=r"no timed runs"):
        Timing.of([])
