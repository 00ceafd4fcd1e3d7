"""Fault run on memory://: N messages over K keys, a share of handler attempts fail at random.

Prints published, handled, dead-lettered, lost and out-of-order counts, checked from what the handlers saw
(not from the bus's own counters). Exit status 1 if anything is lost or out of order.

    python benchmarks/fault_run_memory.py [--messages 100000] [--keys 1000] [--failure-rate 0.1]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time

import trio

import keyedbus


async def run(messages: int, keys: int, failure_rate: float, seed: int) -> int:
    rng = random.Random(seed)
    expected_next = [0] * keys  # next sequence number each key must see succeed
    out_of_order = 0
    handled = 0
    given_up: set[tuple[int, int]] = set()  # failed their last attempt: the key may move on
    dead: set[tuple[int, int]] = set()  # arrived on the dead-letter topic

    async def handler(msg: keyedbus.Message) -> None:
        nonlocal out_of_order, handled
        key, seq = (int(x) for x in msg.data.split(b":"))
        while (key, expected_next[key]) in given_up:  # dead-lettered predecessors are finished too
            expected_next[key] += 1
        if seq != expected_next[key]:
            out_of_order += 1
        if rng.random() < failure_rate:
            if msg.attempt == retry.max_attempts:
                given_up.add((key, seq))
            raise RuntimeError("injected failure")
        await trio.lowlevel.checkpoint()
        expected_next[key] = seq + 1
        handled += 1

    async def on_dead(msg: keyedbus.Message) -> None:
        key, seq = (int(x) for x in msg.data.split(b":"))
        dead.add((key, seq))

    retry = keyedbus.RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.1)
    start = time.perf_counter()
    async with keyedbus.open_bus(retry=retry, drain_timeout=600) as bus:
        await bus.subscribe("orders", handler)
        await bus.subscribe("orders.dead-letter", on_dead)
        seqs = [0] * keys
        for _ in range(messages):
            key = rng.randrange(keys)
            await bus.publish("orders", f"{key}:{seqs[key]}".encode(), key=f"key-{key}")
            seqs[key] += 1
    elapsed = time.perf_counter() - start
    stats = bus.statistics()
    lost = messages - handled - len(dead)
    if dead != given_up:
        print(f"dead letters do not match the messages that failed their last attempt: {dead ^ given_up}")
        return 1
    print(f"published={messages} keys={keys} failure_rate={failure_rate} seconds={elapsed:.1f}")
    print(
        f"handled={handled} dead_lettered={len(dead)} lost={lost} out_of_order={out_of_order} "
        f"retried={stats.retried} (bus counters: handled={stats.handled} dead_lettered={stats.dead_lettered})"
    )
    return 1 if lost or out_of_order else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--failure-rate", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("keyedbus").setLevel(logging.CRITICAL)  # 10,000 retry warnings are not news here
    sys.exit(trio.run(run, args.messages, args.keys, args.failure_rate, args.seed))


if __name__ == "__main__":
    main()
