"""Quickstart: several aggregates on the embedded broker, per-key order and concurrency across keys.

Run it with:  python examples/quickstart.py
"""

from __future__ import annotations

import random

import trio

import keyedbus

ORDERS = [f"order-{n}" for n in range(1, 6)]
STEPS = ["OrderPlaced", "OrderPaid", "OrderPacked", "OrderShipped"]


async def main() -> None:
    history: dict[str, list[str]] = {order: [] for order in ORDERS}
    running = 0
    peak = 0

    async def on_order(event: keyedbus.Envelope) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await trio.sleep(random.uniform(0.01, 0.05))  # pretend to do I/O
        history[event.aggregate_id].append(event.event_type)
        running -= 1

    start = trio.current_time()
    async with keyedbus.open_bus() as bus:  # memory:// by default
        await bus.subscribe_envelope("orders", on_order)
        for version, step in enumerate(STEPS, start=1):
            for order in ORDERS:
                event = keyedbus.Envelope(
                    aggregate_id=order, event_type=step, event_version=version, payload={"step": step}
                )
                await bus.publish_envelope("orders", event)
    # Leaving the block drained the bus: every event above has been handled.
    elapsed = trio.current_time() - start

    for order, steps in history.items():
        print(f"{order}: {' -> '.join(steps)}")
    in_order = all(steps == STEPS for steps in history.values())
    print(f"each order saw its events in publish order: {in_order}")
    print(
        f"up to {peak} orders were handled at the same time; "
        f"{len(ORDERS) * len(STEPS)} events in {elapsed:.2f} s"
    )
    print(bus.statistics().handled, "handled")
    if not in_order:
        raise SystemExit("per-key order was broken")


if __name__ == "__main__":
    trio.run(main)
