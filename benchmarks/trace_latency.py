"""Where the `latency` scenario's time goes: trio scheduling rounds per message, counted with an Instrument.

    python -m benchmarks.trace_latency [--side ours|baseline] [--messages 5000] [--keys 1000] [--gc]

Runs one side of `latency` (benchmarks/_bench_run.py, its own pacing: half the side's measured maximum rate,
a burst every 1 ms) under a trio Instrument, and prints for the paced messages: the scheduling rounds (one
io wait, then one batch of runnable tasks) between the publish and the handler start, the task steps and
their time per message, tasks spawned, rounds with a garbage collection, and the rounds of the median, the
99th percentile and the slowest message (which tasks ran, steps over 50 us). The instrument slows every
step a little: the counts are what matter; absolute times are inflated and, on a busy machine, noisy.

The instrument keeps a record of every round and step, and those records alone set off a garbage collection
every 100-150 messages (the collector runs when tracked allocations outnumber deallocations by 700), which
the scenario itself never does. So the collector is off while it traces. `--gc` runs the side without the
instrument and counts the collections in the paced part, and how many of the slowest 1% had one while they
were in flight; it keeps its records in arrays of floats (nothing the collector tracks).
"""

from __future__ import annotations

import argparse
import array
import bisect
import collections
import contextlib
import gc
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio

from benchmarks import _bench_run


def _short(name: str) -> str:
    if name.startswith("keyedbus-worker-"):
        return "worker"
    if name.startswith("keyedbus-subscription-"):
        return "subscription"
    return name.rsplit(".", 1)[-1]  # the publisher is the bench's main task, `_run`


@contextlib.contextmanager
def _gc_watch(on_start: Callable[[int], None]) -> Any:
    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            on_start(info["generation"])

    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)


class _Round:
    __slots__ = ("gcs", "io_wait", "spawned", "started", "steps")

    def __init__(self, started: float, io_wait: float) -> None:
        self.started = started
        self.io_wait = io_wait
        self.steps: list[tuple[str, float]] = []  # (task, seconds) in run order
        self.spawned = 0
        self.gcs: list[int] = []  # generations collected


class _Rounds(trio.abc.Instrument):
    """Records trio's scheduling rounds and the task steps in each."""

    def __init__(self) -> None:
        self.rounds = [_Round(time.perf_counter(), 0.0)]
        self._wait_from = 0.0
        self._step_from = 0.0
        self._task = ""

    @property
    def current(self) -> int:
        return len(self.rounds) - 1

    def before_io_wait(self, timeout: float) -> None:
        self._wait_from = time.perf_counter()

    def after_io_wait(self, timeout: float) -> None:
        now = time.perf_counter()
        self.rounds.append(_Round(now, now - self._wait_from))

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.rounds[-1].spawned += 1

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._task = _short(task.name)
        self._step_from = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        self.rounds[-1].steps.append((self._task, time.perf_counter() - self._step_from))

    def collected(self, generation: int) -> None:
        self.rounds[-1].gcs.append(generation)


async def _run(side: str, params: dict[str, Any]) -> None:
    instrument = _Rounds()
    sent: dict[float, int] = {}  # stamp -> round of the publish
    handled: dict[float, tuple[int, float]] = {}  # stamp -> round and time of the handler start
    original = _bench_run._latency

    async def traced(p: dict[str, Any], publish: Any, setup: Callable[[Any], Any]) -> dict[str, Any]:
        @contextlib.asynccontextmanager
        async def traced_setup(on_message: Any) -> AsyncIterator[Any]:
            async def on(stamp: float) -> None:
                handled[stamp] = (instrument.current, time.perf_counter())
                await on_message(stamp)

            async with setup(on) as send:

                async def traced_send(key: str, stamp: float) -> None:
                    sent[stamp] = instrument.current
                    await send(key, stamp)

                yield traced_send

        return await original(p, publish, traced_setup)

    _bench_run._latency = traced
    trio.lowlevel.add_instrument(instrument)
    was_enabled = gc.isenabled()
    gc.disable()  # the records above would cause collections of their own (see the module docstring)
    try:
        with _gc_watch(instrument.collected):
            result = await getattr(_bench_run, f"{side}_latency")(params)
    finally:
        if was_enabled:
            gc.enable()
        trio.lowlevel.remove_instrument(instrument)
        _bench_run._latency = original
    print(
        f"{side}: p99 {result['value']:.3f} ms, p50 {result['p50_ms']:.3f} ms at {result['rate']:.0f} msgs/s"
    )
    stamps = sorted(sent)[params["probe"] :]  # the paced part only
    # (latency, rounds from publish to handler start, round of the publish, round of the handler start)
    rows = sorted((handled[s][1] - s, handled[s][0] - sent[s], sent[s], handled[s][0]) for s in stamps)
    _summary(instrument.rounds, rows)


def _summary(rounds: list[_Round], rows: list[tuple[float, int, int, int]]) -> None:
    count = len(rows)
    spans = collections.Counter(r[1] for r in rows)
    print(f"rounds from publish to handler start (count of messages): {sorted(spans.items())}")
    paced = [rounds[i] for i in range(min(r[2] for r in rows), max(r[3] for r in rows) + 1)]
    busy = sorted(sum(t for _, t in r.steps) for r in paced if r.steps)
    own: dict[str, float] = collections.defaultdict(float)
    steps: collections.Counter[str] = collections.Counter()
    for r in paced:
        for name, took in r.steps:
            own[name] += took
            steps[name] += 1
    outside = (paced[-1].started - paced[0].started - sum(own.values())) / len(paced)
    print(
        f"paced part: {len(paced)} rounds for {count} messages; time in steps per non-empty round p50 "
        f"{statistics.median(busy) * 1e6:.1f} us, p99 {busy[int(len(busy) * 0.99)] * 1e6:.1f} us; "
        f"outside steps (run loop, io wait, instrument) {outside * 1e6:.1f} us per round"
    )
    print(f"task steps per message: { {k: round(v / count, 2) for k, v in steps.most_common(6)} }")
    print(f"step time per message (us): { {k: round(v / count * 1e6, 1) for k, v in sorted(own.items())} }")
    gcs = [g for r in paced for g in r.gcs]
    print(
        f"tasks spawned per message {sum(r.spawned for r in paced) / count:.3f}; garbage collections "
        f"{len(gcs)} (generation 2: {gcs.count(2)})"
    )
    # What the slowest 1% had in their rounds: a garbage collection, a step over 200 us (on a busy machine
    # mostly the process preempted), more than 3 messages handled in a round (a backlog), or none of these.
    causes: collections.Counter[str] = collections.Counter()
    for _, _, first, last in rows[int(count * 0.99) :]:
        between = rounds[first : last + 1]
        if any(r.gcs for r in between):
            causes["garbage collection"] += 1
        elif any(t > 200e-6 for r in between for _, t in r.steps):
            causes["a step over 200 us"] += 1
        elif any(sum(name == "worker" for name, _ in r.steps) > 3 for r in between):
            causes["a round handling over 3 messages"] += 1
        else:
            causes["none of these"] += 1
    print(f"slowest 1% ({count - int(count * 0.99)} messages), in their rounds: {dict(causes)}")
    for label, row in (("p50", rows[count // 2]), ("p99", rows[int(count * 0.99)]), ("max", rows[-1])):
        latency, span, first, last = row
        print(f"{label} message: {latency * 1e3:.3f} ms, {span} round(s) after its publish:")
        for i in range(first, last + 1):
            r = rounds[i]
            length = rounds[i + 1].started - r.started if i + 1 < len(rounds) else 0.0
            names = collections.Counter(name for name, _ in r.steps)
            slow = [(name, round(t * 1e6)) for name, t in r.steps if t > 50e-6]
            print(
                f"  round +{i - first}: {length * 1e6:8.1f} us (io wait before it {r.io_wait * 1e6:.1f}); "
                f"steps {dict(names)}; spawned {r.spawned}; gc {r.gcs}; steps over 50 us {slow[:6]}"
            )


async def _gc_run(side: str, params: dict[str, Any]) -> None:
    """Run one side uninstrumented; count the collections of the paced part and the slow messages they hit."""
    probe, total = params["probe"], params["probe"] + params["messages"]
    stamps = array.array("d", bytes(8 * total))  # publish stamp of the n-th message handled
    starts = array.array("d", bytes(8 * total))  # when its handler started
    gc_from, gc_to = array.array("d"), array.array("d")  # each collection's start and end
    handled = 0
    at: dict[str, list[int]] = {}  # collections per generation at the paced part's start and end

    def callback(phase: str, info: dict[str, int]) -> None:
        (gc_from if phase == "start" else gc_to).append(time.perf_counter())

    original = _bench_run._latency

    async def counted(p: dict[str, Any], publish: Any, setup: Callable[[Any], Any]) -> dict[str, Any]:
        @contextlib.asynccontextmanager
        async def counted_setup(on_message: Any) -> AsyncIterator[Any]:
            async def on(stamp: float) -> None:
                nonlocal handled
                stamps[handled], starts[handled] = stamp, time.perf_counter()
                handled += 1
                if handled in (probe, total):
                    at["start" if handled == probe else "end"] = [g["collections"] for g in gc.get_stats()]
                await on_message(stamp)

            async with setup(on) as send:
                yield send

        return await original(p, publish, counted_setup)

    _bench_run._latency = counted
    gc.callbacks.append(callback)
    try:
        result = await getattr(_bench_run, f"{side}_latency")(params)
    finally:
        gc.callbacks.remove(callback)
        _bench_run._latency = original
    count = total - probe
    per_generation = [end - start for start, end in zip(at["start"], at["end"], strict=True)]
    rows = sorted(range(probe, total), key=lambda i: starts[i] - stamps[i])
    slowest = rows[int(count * 0.99) :]

    def hit(i: int) -> bool:  # a collection ran between its publish and its handler start
        j = bisect.bisect_right(gc_from, starts[i]) - 1
        return j >= 0 and j < len(gc_to) and gc_to[j] >= stamps[i]

    print(
        f"{side}: p99 {result['value']:.3f} ms, p50 {result['p50_ms']:.3f} ms "
        f"at {result['rate']:.0f} msgs/s; "
        f"paced part ({count} messages): collections of generation 0/1/2 {per_generation}; of the slowest 1% "
        f"({len(slowest)}), {sum(hit(i) for i in slowest)} had a collection in flight"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", default="ours", choices=("ours", "baseline"))
    parser.add_argument("--messages", type=int, default=5_000)
    parser.add_argument("--keys", type=int, default=1_000)
    parser.add_argument("--probe", type=int, default=5_000)
    parser.add_argument("--gc", action="store_true", help="count garbage collections, without the instrument")
    args = parser.parse_args()
    params = {"messages": args.messages, "keys": args.keys, "probe": args.probe}
    trio.run(_gc_run if args.gc else _run, args.side, params)


if __name__ == "__main__":
    main()
