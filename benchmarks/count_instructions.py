"""Instructions a message on memory://, counted with callgrind: repeatable whatever the machine's load.

    python -m benchmarks.count_instructions [--side ours|baseline] [--burst 20] [--small 2000] [--large 12000]

Runs the side twice under ``valgrind --tool=callgrind`` (the whole process) and prints (large - small) /
(large - small messages): start-up and imports cancel out. The shape is the `latency` scenario's paced part
without its clock: bursts of `--burst` publishes over 1,000 keys, then a wait until every one was handled, so
a burst of 20 goes one message per scheduling round as when paced; `--burst 2000` is a flood (pool_memory's
shape). The baseline is the scenario's: one memory channel per worker, 256 workers. Needs valgrind.
Callgrind runs the process ~50x slower, so `new_message_id` starts a new millisecond at nearly every
message (~2k instructions more a message than in a real run).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from typing import Any

import trio

KEYS = [f"key-{i}" for i in range(1_000)]


async def _ours(messages: int, burst: int) -> None:
    import keyedbus

    handled = 0
    target = 0
    done = trio.Event()

    async def handler(msg: keyedbus.Message) -> None:
        nonlocal handled
        float(msg.data)
        handled += 1
        if handled == target:
            done.set()

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("bench", handler)
        for start in range(0, messages, burst):
            target, done = start + burst, trio.Event()
            for i in range(start, start + burst):
                await bus.publish("bench", b"1733000000.123456", key=KEYS[i % len(KEYS)])
            await done.wait()


async def _baseline(messages: int, burst: int) -> None:
    handled = 0
    target = 0
    done = trio.Event()
    channels = [trio.open_memory_channel[tuple[str, bytes]](1000) for _ in range(256)]

    async def worker(receive: trio.MemoryReceiveChannel[tuple[str, bytes]]) -> None:
        nonlocal handled
        async for _, data in receive:
            float(data)
            handled += 1
            if handled == target:
                done.set()

    async with trio.open_nursery() as nursery:
        for _, receive in channels:
            nursery.start_soon(worker, receive)
        for start in range(0, messages, burst):
            target, done = start + burst, trio.Event()
            for i in range(start, start + burst):
                key = KEYS[i % len(KEYS)]
                await channels[hash(key) % 256][0].send((key, b"1733000000.123456"))
            await done.wait()
        nursery.cancel_scope.cancel()


def _count(side: str, messages: int, burst: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={os.path.join(tmp, 'callgrind.out')}",
            sys.executable,
            "-m",
            "benchmarks.count_instructions",
            "--run",
            side,
            str(messages),
            str(burst),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise SystemExit(f"no instruction count in callgrind's output:\n{done.stderr}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=("ours", "baseline"), default="ours")
    parser.add_argument("--burst", type=int, default=20)
    parser.add_argument("--small", type=int, default=2_000)
    parser.add_argument("--large", type=int, default=12_000)
    parser.add_argument("--run", nargs=3, help=argparse.SUPPRESS)  # side messages burst: one run, uncounted
    args = parser.parse_args()
    if args.run:
        side, messages, burst = args.run[0], int(args.run[1]), int(args.run[2])
        run: Any = _ours if side == "ours" else _baseline
        trio.run(run, messages, min(burst, messages))
        return
    small = _count(args.side, args.small, args.burst)
    large = _count(args.side, args.large, args.burst)
    per = (large - small) / (args.large - args.small)
    print(f"{args.side}, bursts of {args.burst}: {per:,.0f} instructions a message ({small:,} / {large:,})")


if __name__ == "__main__":
    main()
