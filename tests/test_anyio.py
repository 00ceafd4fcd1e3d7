"""anyio code on anyio's trio backend uses keyedbus unchanged: task groups, cancel scopes, fail_after.
The conformance essentials (order per key, retries, dead letter, drain) run here through anyio's API."""

from __future__ import annotations

import subprocess
import sys

import anyio
import anyio.lowlevel

import keyedbus

FAST_RETRY = keyedbus.RetryPolicy(max_attempts=3, initial_backoff=0.01, jitter=0.0)


def test_order_retries_dead_letter_and_drain_under_anyio_on_trio() -> None:
    seen: dict[str, list[int]] = {}
    attempts: dict[int, int] = {}
    dead: list[keyedbus.Message] = []
    dead_arrived = anyio.Event()

    async def on_order(msg: keyedbus.Message) -> None:
        assert msg.key is not None
        n = int(msg.data)
        attempts[n] = msg.attempt
        if n == 7 and msg.attempt < 2:
            raise RuntimeError("transient")  # retried, holding its key's order
        if n == 13:
            raise ValueError("poison")  # dead-lettered after 3 attempts
        await anyio.lowlevel.checkpoint()
        seen.setdefault(msg.key, []).append(n)

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)
        dead_arrived.set()

    async def publish_key(bus: keyedbus.Bus, key: str, numbers: list[int]) -> None:
        for n in numbers:
            with anyio.fail_after(10):  # anyio's cancel scopes around bus calls
                await bus.publish("orders", str(n).encode(), key=key)

    async def main() -> None:
        async with keyedbus.open_bus(retry=FAST_RETRY) as bus:
            await bus.subscribe("orders", on_order)
            await bus.subscribe("orders.dead-letter", on_dead)
            async with anyio.create_task_group() as tg:  # one publishing task per key
                for k in range(4):
                    tg.start_soon(publish_key, bus, f"k{k}", list(range(k, 40, 4)))
            with anyio.move_on_after(0.01):  # a cancelled scope in the block leaves the bus alone
                await anyio.sleep_forever()
            with anyio.fail_after(10):
                await dead_arrived.wait()
        # Leaving the block drained: everything but the poison message was handled.

    anyio.run(main, backend="trio")
    assert seen == {f"k{k}": [n for n in range(k, 40, 4) if n != 13] for k in range(4)}
    assert attempts[7] == 2
    assert attempts[13] == 3
    assert [(m.key, m.data) for m in dead] == [("k1", b"13")]
    assert dead[0].headers["Keyedbus-Error"] == "ValueError: poison"


def test_an_anyio_cancel_scope_around_the_bus_cancels_it() -> None:
    started = []

    async def slow(msg: keyedbus.Message) -> None:
        started.append(msg.data)
        await anyio.sleep_forever()

    async def main() -> None:
        with anyio.move_on_after(0.5) as scope:
            async with keyedbus.open_bus() as bus:
                await bus.subscribe("orders", slow)
                await bus.publish("orders", b"x", key="k")
                await anyio.sleep_forever()
        assert scope.cancelled_caught

    anyio.run(main, backend="trio")
    assert started == [b"x"]


ON_ASYNCIO = """
import anyio, keyedbus

async def main() -> None:
    async with keyedbus.open_bus():
        pass

try:
    anyio.run(main, backend="asyncio")
except keyedbus.UnsupportedEventLoopError as exc:
    assert isinstance(exc, keyedbus.KeyedBusError)
    print(exc)
"""


def test_anyio_on_asyncio_gets_a_named_error_saying_what_to_use() -> None:
    # A fresh interpreter: this test process has imported trio-asyncio, which re-routes asyncio.
    done = subprocess.run([sys.executable, "-c", ON_ASYNCIO], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "keyedbus.open_bus runs on trio, and this code is not running under trio (asyncio, or anyio's "
        'asyncio backend?): start it with trio.run(main) or anyio.run(main, backend="trio"); from asyncio '
        "or sync code (a notebook, a script, a WSGI app) use keyedbus.blocking.open_bus(url)\n"
    )
