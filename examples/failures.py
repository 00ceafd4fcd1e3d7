"""Failure handling: retries with backoff that keep a key's order, a poison message, its dead letter.

Run it with:  python examples/failures.py
"""

from __future__ import annotations

import trio

import keyedbus


async def main() -> None:
    attempts: dict[bytes, int] = {}
    handled: list[str] = []
    dead: list[keyedbus.Message] = []

    async def charge(msg: keyedbus.Message) -> None:
        attempts[msg.data] = msg.attempt
        if msg.data == b"flaky" and msg.attempt < 3:
            raise ConnectionError("payment gateway timed out")  # succeeds on the third attempt
        if msg.data == b"poison":
            raise ValueError("card number is not valid")  # fails every attempt
        handled.append(f"{msg.key}:{msg.data.decode()}")

    async def on_dead_letter(msg: keyedbus.Message) -> None:
        dead.append(msg)

    retry = keyedbus.RetryPolicy(max_attempts=3, initial_backoff=0.05, max_backoff=0.2)
    async with keyedbus.open_bus(retry=retry) as bus:
        await bus.subscribe("payments", charge)
        await bus.subscribe("payments.dead-letter", on_dead_letter)
        # order-1's second message waits for its flaky first one; order-2 flows meanwhile.
        await bus.publish("payments", b"flaky", key="order-1")
        await bus.publish("payments", b"after-flaky", key="order-1")
        await bus.publish("payments", b"poison", key="order-2")
        await bus.publish("payments", b"after-poison", key="order-2")
        await bus.publish("payments", b"fine", key="order-3")

    print("handled, in order per key:", handled)
    print("attempts:", {k.decode(): v for k, v in attempts.items()})
    for letter in dead:
        print(
            f"dead letter for {letter.key}: {letter.data!r} after {letter.headers['Keyedbus-Attempts']} "
            f"attempts: {letter.headers['Keyedbus-Error']}"
        )
    stats = bus.statistics()
    print(f"handled={stats.handled} retried={stats.retried} dead_lettered={stats.dead_lettered}")


if __name__ == "__main__":
    trio.run(main)
