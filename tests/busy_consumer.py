"""A busy JetStream consumer process for the SIGINT test: publishes and handles as fast as it can.

    python tests/busy_consumer.py URL TOPIC

Prints "busy" once it has handled 50 messages; then it goes on until interrupted.
"""

from __future__ import annotations

import signal
import sys

import trio

import keyedbus


async def main(url: str, topic: str) -> None:
    handled = 0

    async def handler(msg: keyedbus.Message) -> None:
        nonlocal handled
        await trio.sleep(0.001)
        handled += 1
        if handled == 50:
            print("busy", flush=True)

    async with keyedbus.open_bus(url, drain_timeout=30) as bus:
        await bus.subscribe(topic, handler)
        i = 0
        while True:
            await bus.publish(topic, b"x", key=f"k{i % 50}")
            i += 1


if __name__ == "__main__":
    # Ctrl-C as a terminal gives it, even when the test run was started in the background by a shell
    # without job control (its children inherit SIGINT ignored, and trio then leaves it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    trio.run(main, sys.argv[1], sys.argv[2])
