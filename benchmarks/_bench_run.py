"""One benchmark measurement, in its own process: `_bench_run.py SCENARIO ours|baseline PARAMS_JSON [URL]`.

Prints one JSON object whose "value" is the figure (see bench.py for the units). The raw-asyncio NATS
baselines never import trio_asyncio; the keyedbus side imports it only when a nats:// URL is opened.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any


def _keys(count: int) -> list[str]:
    return [f"order-{i}" for i in range(count)]


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


# -- trio sides ---------------------------------------------------------------------------------------------


def _trio(main: Callable[..., Awaitable[dict[str, Any]]], *args: Any) -> dict[str, Any]:
    import trio

    result: dict[str, Any] = trio.run(main, *args)
    return result


async def _counting(total: int) -> tuple[Callable[[Any], Awaitable[None]], Any]:
    import trio

    done = trio.Event()
    count = 0

    async def handler(_: Any) -> None:
        nonlocal count
        count += 1
        if count == total:
            done.set()

    return handler, done


async def ours_pool_memory(p: dict[str, Any]) -> dict[str, Any]:
    import keyedbus

    keys = _keys(p["keys"])
    handler, done = await _counting(p["messages"])
    async with keyedbus.open_bus() as bus:
        await bus.subscribe("bench", handler)
        start = time.perf_counter()
        for i in range(p["messages"]):
            await bus.publish("bench", b"x", key=keys[i % len(keys)])
        await done.wait()
        elapsed = time.perf_counter() - start
    return {"value": p["messages"] / elapsed}


async def baseline_pool_memory(p: dict[str, Any]) -> dict[str, Any]:
    import trio

    keys = _keys(p["keys"])
    handler, done = await _counting(p["messages"])
    channels = [trio.open_memory_channel[tuple[str, bytes]](1000) for _ in range(256)]

    async def worker(receive: trio.MemoryReceiveChannel[tuple[str, bytes]]) -> None:
        async for item in receive:
            await handler(item)

    async with trio.open_nursery() as nursery:
        for _, receive in channels:
            nursery.start_soon(worker, receive)
        start = time.perf_counter()
        for i in range(p["messages"]):
            key = keys[i % len(keys)]
            await channels[hash(key) % 256][0].send((key, b"x"))
        await done.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    return {"value": p["messages"] / elapsed}


async def ours_nats_core(p: dict[str, Any], url: str) -> dict[str, Any]:
    import trio

    import keyedbus

    keys = _keys(p["keys"])
    topic = f"bench.core{p['rep']}"
    handler, done = await _counting(p["messages"])
    config = keyedbus.TopicConfig(persistence="ephemeral")
    async with keyedbus.open_bus(url, default_topic=config) as bus:
        await bus.subscribe(topic, handler)
        start = time.perf_counter()
        for i in range(p["messages"]):
            await bus.publish(topic, b"x", key=keys[i % len(keys)])
        with trio.move_on_after(120):
            await done.wait()
        elapsed = time.perf_counter() - start
        stats = bus.statistics()
    return {"value": stats.handled / elapsed, "dropped": stats.dropped}


async def ours_jetstream(p: dict[str, Any], url: str) -> dict[str, Any]:
    import trio

    import keyedbus

    keys = _keys(p["keys"])
    topic = f"bench.js{p['rep']}.ours"
    handler, done = await _counting(p["messages"])
    async with keyedbus.open_bus(url) as bus:

        async def publisher(first: int) -> None:
            for i in range(first, p["messages"], 64):
                await bus.publish(topic, b"x", key=keys[i % len(keys)])

        async with trio.open_nursery() as nursery:  # stored first, not timed
            for first in range(64):
                nursery.start_soon(publisher, first)
        start = time.perf_counter()
        await bus.subscribe(topic, handler)
        await done.wait()
        elapsed = time.perf_counter() - start
    return {"value": p["messages"] / elapsed}


async def _io_messages(p: dict[str, Any]) -> list[tuple[str, float]]:
    rng = random.Random(p["rep"])
    keys = _keys(p["keys"])
    return [(keys[i % len(keys)], rng.uniform(0, 0.005)) for i in range(p["messages"])]


async def ours_io_bound(p: dict[str, Any]) -> dict[str, Any]:
    import trio

    import keyedbus

    messages = await _io_messages(p)
    done = trio.Event()
    count = 0

    async def handler(msg: keyedbus.Message) -> None:
        nonlocal count
        await trio.sleep(float(msg.data))
        count += 1
        if count == len(messages):
            done.set()

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("bench", handler)
        start = time.perf_counter()
        for key, delay in messages:
            await bus.publish("bench", repr(delay).encode(), key=key)
        await done.wait()
        elapsed = time.perf_counter() - start
    return {"value": elapsed}


async def baseline_io_bound(p: dict[str, Any]) -> dict[str, Any]:
    import trio

    messages = await _io_messages(p)
    start = time.perf_counter()
    if p["keys"] == 1:
        for _, delay in messages:  # one key: the best possible is one after another
            await trio.sleep(delay)
        return {"value": time.perf_counter() - start, "baseline": "sequential"}
    slots = trio.Semaphore(256)

    async def run(delay: float) -> None:
        async with slots:
            await trio.sleep(delay)

    async with trio.open_nursery() as nursery:
        for _, delay in messages:
            await slots.acquire()  # bounded by the worker count, as the pool is
            slots.release()
            nursery.start_soon(run, delay)
    return {"value": time.perf_counter() - start, "baseline": "unordered, 256 at once"}


async def _poison_run(p: dict[str, Any], with_poison: bool) -> dict[str, Any]:
    import trio

    import keyedbus

    keys = _keys(p["keys"])
    healthy = p["messages"]
    done = trio.Event()
    count = 0

    async def handler(msg: keyedbus.Message) -> None:
        nonlocal count
        if msg.key == "poison":
            raise RuntimeError("poison")
        count += 1
        if count == healthy:
            done.set()

    async with keyedbus.open_bus(drain_timeout=0) as bus:
        await bus.subscribe("bench", handler)
        start = time.perf_counter()
        for i in range(healthy):
            if with_poison and i % 100 == 0:  # 1% of the traffic is the poison key's
                await bus.publish("bench", b"p", key="poison")
            await bus.publish("bench", b"x", key=keys[i % len(keys)])
        await done.wait()
        elapsed = time.perf_counter() - start
        stats = bus.statistics()
    return {"value": healthy / elapsed, "parked_keys": stats.parked_keys}


async def ours_poison_isolation(p: dict[str, Any]) -> dict[str, Any]:
    return await _poison_run(p, with_poison=True)


async def baseline_poison_isolation(p: dict[str, Any]) -> dict[str, Any]:
    return await _poison_run(p, with_poison=False)


async def _topics_run(topics: int) -> dict[str, Any]:
    import trio

    import keyedbus

    handler, done = await _counting(topics)
    async with keyedbus.open_bus() as bus:
        for t in range(topics):
            await bus.subscribe(f"bench.t{t}", handler)
        for t in range(topics):
            await bus.publish(f"bench.t{t}", b"x", key="k")
        await done.wait()
        gc.collect()
        tasks = _count_tasks(trio.lowlevel.current_root_task())
        rss = _rss_mb()
    return {"value": rss, "tasks": tasks, "topics": topics}


def _count_tasks(task: Any) -> int:
    return 1 + sum(_count_tasks(child) for nursery in task.child_nurseries for child in nursery.child_tasks)


async def ours_topics_memory(p: dict[str, Any]) -> dict[str, Any]:
    return await _topics_run(p["topics"])


async def baseline_topics_memory(p: dict[str, Any]) -> dict[str, Any]:
    return await _topics_run(1)


async def _latency(p: dict[str, Any], publish: Any, setup: Any) -> dict[str, Any]:
    import trio

    keys = _keys(p["keys"])
    latencies: list[float] = []
    total = p["messages"]
    done = trio.Event()
    probe_done = trio.Event()
    probe = 5_000

    async def on_message(stamp: float) -> None:
        latencies.append(time.perf_counter() - stamp)
        if len(latencies) == probe:
            probe_done.set()
        if len(latencies) == probe + total:
            done.set()

    async with setup(on_message) as send:
        start = time.perf_counter()
        for i in range(probe):  # as fast as it goes: the side's own max rate
            await send(keys[i % len(keys)], time.perf_counter())
        await probe_done.wait()
        rate = probe / (time.perf_counter() - start) / 2
        burst = max(1, int(rate / 1000))
        start = trio.current_time()
        for i in range(total):
            if i % burst == 0:
                await trio.sleep_until(start + i / rate)
            await send(keys[i % len(keys)], time.perf_counter())
        await done.wait()
    measured = sorted(latencies[probe:])
    return {
        "value": measured[int(len(measured) * 0.99)] * 1000,
        "p50_ms": measured[len(measured) // 2] * 1000,
        "rate": rate,
    }


async def ours_latency(p: dict[str, Any]) -> dict[str, Any]:
    from contextlib import asynccontextmanager

    import keyedbus

    @asynccontextmanager
    async def setup(on_message: Any) -> Any:
        async def handler(msg: keyedbus.Message) -> None:
            await on_message(float(msg.data))

        async with keyedbus.open_bus() as bus:
            await bus.subscribe("bench", handler)

            async def send(key: str, stamp: float) -> None:
                await bus.publish("bench", repr(stamp).encode(), key=key)

            yield send

    return await _latency(p, None, setup)


async def baseline_latency(p: dict[str, Any]) -> dict[str, Any]:
    from contextlib import asynccontextmanager

    import trio

    @asynccontextmanager
    async def setup(on_message: Any) -> Any:
        channels = [trio.open_memory_channel[tuple[str, bytes]](1000) for _ in range(256)]

        async def worker(receive: trio.MemoryReceiveChannel[tuple[str, bytes]]) -> None:
            async for _, data in receive:
                await on_message(float(data))

        async with trio.open_nursery() as nursery:
            for _, receive in channels:
                nursery.start_soon(worker, receive)

            async def send(key: str, stamp: float) -> None:
                await channels[hash(key) % 256][0].send((key, repr(stamp).encode()))

            yield send
            nursery.cancel_scope.cancel()

    return await _latency(p, None, setup)


# -- plain asyncio NATS baselines (this process never imports trio_asyncio) ---------------------------------


def _asyncio_nats_core(p: dict[str, Any], url: str) -> dict[str, Any]:
    import asyncio

    import nats

    async def main() -> dict[str, Any]:
        keys = _keys(p["keys"])
        topic = f"bench.rawcore{p['rep']}"
        nc = await nats.connect(url)
        done = asyncio.Event()
        count = 0

        async def cb(_: Any) -> None:
            nonlocal count
            count += 1
            if count == p["messages"]:
                done.set()

        await nc.subscribe(topic, cb=cb)
        await nc.flush()
        start = time.perf_counter()
        for i in range(p["messages"]):
            await nc.publish(topic, b"x", headers={"X-Aggregate-ID": keys[i % len(keys)]})
        await nc.flush()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), 120)
        elapsed = time.perf_counter() - start
        await nc.close()
        return {"value": count / elapsed}

    return asyncio.run(main())


def _asyncio_jetstream(p: dict[str, Any], url: str) -> dict[str, Any]:
    import asyncio

    import nats

    async def main() -> dict[str, Any]:
        keys = _keys(p["keys"])
        topic = f"bench.js{p['rep']}.raw"
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name=f"RAW{p['rep']}", subjects=[topic])
        for i in range(p["messages"]):  # stored first, not timed
            await js.publish_async(topic, b"x", headers={"X-Aggregate-ID": keys[i % len(keys)]})
        await js.publish_async_completed()
        start = time.perf_counter()
        psub = await js.pull_subscribe(topic, durable="raw")
        count = 0
        while count < p["messages"]:
            try:
                msgs = await psub.fetch(256, timeout=5)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                await msg.ack()
                count += 1
        elapsed = time.perf_counter() - start
        await nc.close()
        return {"value": count / elapsed}

    return asyncio.run(main())


def main() -> None:
    scenario, side, params_text = sys.argv[1:4]
    url = sys.argv[4] if len(sys.argv) > 4 else None
    params: dict[str, Any] = json.loads(params_text)
    logging.getLogger("keyedbus").setLevel(logging.CRITICAL)  # retry warnings would time the log handler
    if side == "baseline" and scenario == "nats_core":
        assert url is not None
        result = _asyncio_nats_core(params, url)
    elif side == "baseline" and scenario == "jetstream":
        assert url is not None
        result = _asyncio_jetstream(params, url)
    else:
        function = globals()[f"{side}_{scenario}"]
        args = (params, url) if scenario in ("nats_core", "jetstream") else (params,)
        result = _trio(function, *args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
