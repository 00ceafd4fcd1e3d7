"""1,000,000 messages over 1,000,000 distinct keys on memory://: peak memory, and that the pool frees it all.

    python benchmarks/million_keys.py [--messages 1000000]

Prints the peak RSS, the time taken, and, once everything is handled, the pool's statistics (no lane, nothing
queued or parked) and the number of objects the garbage collector tracks before and after the run (the
per-key lanes and their messages must be gone, not cached). Not a timed test: a figure for the record.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time

import trio

import keyedbus


def _rss_mb() -> float:
    """The process's peak resident set size, in MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


async def run(messages: int) -> None:
    handled = 0
    done = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        nonlocal handled
        handled += 1
        if handled == messages:
            done.set()

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("million", handler)
        gc.collect()
        objects_before = len(gc.get_objects())
        rss_before = _current_rss_mb()
        start = time.perf_counter()
        for i in range(messages):
            await bus.publish("million", b"x", key=f"key-{i}")
        await done.wait()
        elapsed = time.perf_counter() - start
        await bus.wait_idle()
        stats = bus.statistics()
        gc.collect()
        objects_after = len(gc.get_objects())
        rate = messages / elapsed
        print(f"messages {messages:,} over {messages:,} keys in {elapsed:.1f} s ({rate:,.0f} msgs/s)")
        print(f"RSS before {rss_before:.1f} MiB, peak {_rss_mb():.1f} MiB, now {_current_rss_mb():.1f} MiB")
        print(
            f"after: handled={stats.handled:,} lanes={stats.lanes} queued={stats.queued} "
            f"parked_keys={stats.parked_keys} in_flight={stats.in_flight} lag={stats.lag}"
        )
        print(f"gc objects before {objects_before:,}, after {objects_after:,}")
        assert (stats.lanes, stats.queued, stats.parked_keys) == (0, 0, 0)
        assert objects_after - objects_before < 10_000, "per-key state was not freed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    args = parser.parse_args()
    trio.run(run, args.messages)


if __name__ == "__main__":
    main()
