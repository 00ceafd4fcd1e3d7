"""An anyio application using keyedbus unchanged: run on anyio's trio backend, with anyio task groups,
events and cancel scopes around bus calls.

Run it with:  python examples/anyio_app.py
"""

from __future__ import annotations

import anyio

import keyedbus


async def main() -> None:
    shipped: dict[str, list[str]] = {}
    all_done = anyio.Event()

    async def on_order(event: keyedbus.Envelope) -> None:
        await anyio.sleep(0.001)  # pretend to do I/O: anyio's calls work inside handlers
        shipped.setdefault(event.aggregate_id, []).append(event.event_type)
        if sum(map(len, shipped.values())) == 9:
            all_done.set()

    async def one_order(bus: keyedbus.Bus, order: str) -> None:
        for step in ("OrderPlaced", "OrderPaid", "OrderShipped"):
            with anyio.fail_after(5):  # anyio's cancel scopes work around bus calls
                await bus.publish_envelope(
                    "orders",
                    keyedbus.Envelope(aggregate_id=order, event_type=step, event_version=1, payload={}),
                )

    async with keyedbus.open_bus() as bus:
        await bus.subscribe_envelope("orders", on_order)
        async with anyio.create_task_group() as tg:  # each order published by its own task
            for n in range(1, 4):
                tg.start_soon(one_order, bus, f"order-{n}")
        with anyio.fail_after(5):
            await all_done.wait()
        print(bus.statistics())
    for order, steps in sorted(shipped.items()):
        print(order, "->", ", ".join(steps))  # each order's steps in publish order


if __name__ == "__main__":
    anyio.run(main, backend="trio")  # the trio backend: keyedbus runs on trio
