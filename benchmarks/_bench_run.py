"""One benchmark measurement, in its own process: `_bench_run.py SCENARIO ours|baseline PARAMS_JSON [URL]`.

Prints one JSON object whose "value" is the figure (see bench.py for the units). The raw-asyncio NATS
baselines never import trio_asyncio; the keyedbus side imports it only when a nats:// URL is opened.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import inspect
import json
import logging
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal


def _keys(count: int) -> list[str]:
    return [f"order-{i}" for i in range(count)]


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


_profiler: Any = None


def _profile(on: bool) -> None:
    """Profile only the timed section, when hotspots.py asks (KEYEDBUS_BENCH_PROFILE names the output)."""
    global _profiler
    path = os.environ.get("KEYEDBUS_BENCH_PROFILE")
    if not path:
        return
    if on:
        import cProfile

        _profiler = cProfile.Profile()
        _profiler.enable()
    else:
        _profiler.disable()
        _profiler.dump_stats(path)


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
        _profile(True)
        for i in range(p["messages"]):
            await bus.publish("bench", b"x", key=keys[i % len(keys)])
        await done.wait()
        elapsed = time.perf_counter() - start
        _profile(False)
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
    topic = f"bench.core{p.get('tag', '')}{p['rep']}"
    handler, done = await _counting(p["messages"])
    config = keyedbus.TopicConfig(persistence="ephemeral")
    async with keyedbus.open_bus(url, default_topic=config) as bus:
        await bus.subscribe(topic, handler)
        start = time.perf_counter()
        _profile(True)
        for i in range(p["messages"]):
            await bus.publish(topic, b"x", key=keys[i % len(keys)])
        with trio.move_on_after(120):
            await done.wait()
        elapsed = time.perf_counter() - start
        _profile(False)
        stats = bus.statistics()
    return {"value": stats.handled / elapsed, "dropped": stats.dropped}


async def ours_jetstream(p: dict[str, Any], url: str) -> dict[str, Any]:
    import trio

    import keyedbus

    keys = _keys(p["keys"])
    topic = f"bench.js{p.get('tag', '')}{p['rep']}.ours"
    handler, done = await _counting(p["messages"])
    async with keyedbus.open_bus(url) as bus:

        async def publisher(first: int) -> None:
            for i in range(first, p["messages"], 64):
                await bus.publish(topic, b"x", key=keys[i % len(keys)])

        async with trio.open_nursery() as nursery:  # stored first, not timed
            for first in range(64):
                nursery.start_soon(publisher, first)
        start = time.perf_counter()
        _profile(True)
        await bus.subscribe(topic, handler)
        await done.wait()
        elapsed = time.perf_counter() - start
        _profile(False)
    return {"value": p["messages"] / elapsed}


async def _io_messages(p: dict[str, Any]) -> list[tuple[str, float]]:
    rng = random.Random(p["rep"])
    keys = _keys(p["keys"])
    return [(keys[i % len(keys)], rng.uniform(0, 0.005)) for i in range(p["messages"])]


def _io_floor(messages: list[tuple[str, float]]) -> float:
    """The wall time the order alone imposes: the largest sum of one key's sleeps (keys run one at a time).

    Next to it, each side reports `cpu_s`, its process CPU time over the timed section: where that is
    close to the wall time, the side is CPU-bound and the floor does not bind (benchmarks/README.md).
    """
    total: dict[str, float] = {}
    for key, delay in messages:
        total[key] = total.get(key, 0.0) + delay
    return max(total.values())


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
        cpu = time.process_time()
        for key, delay in messages:
            await bus.publish("bench", repr(delay).encode(), key=key)
        await done.wait()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu
    return {"value": elapsed, "cpu_s": cpu, "floor_s": _io_floor(messages)}


async def baseline_io_bound(p: dict[str, Any]) -> dict[str, Any]:
    import trio

    messages = await _io_messages(p)
    start = time.perf_counter()
    cpu = time.process_time()
    if p["keys"] == 1:
        for _, delay in messages:  # one key: the best possible is one after another
            await trio.sleep(delay)
        return {
            "value": time.perf_counter() - start,
            "cpu_s": time.process_time() - cpu,
            "floor_s": _io_floor(messages),
            "baseline": "sequential",
        }
    slots = trio.Semaphore(256)

    async def run(delay: float) -> None:
        async with slots:
            await trio.sleep(delay)

    async with trio.open_nursery() as nursery:
        for _, delay in messages:
            await slots.acquire()  # bounded by the worker count, as the pool is
            slots.release()
            nursery.start_soon(run, delay)
    return {
        "value": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
        "floor_s": _io_floor(messages),
        "baseline": "unordered, 256 at once",
    }


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
    probe = p.get("probe", 5_000)

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


def baseline_nats_core(p: dict[str, Any], url: str) -> dict[str, Any]:
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


def baseline_jetstream(p: dict[str, Any], url: str) -> dict[str, Any]:
    import asyncio

    import nats

    async def main() -> dict[str, Any]:
        keys = _keys(p["keys"])
        topic = f"bench.js{p.get('tag', '')}{p['rep']}.raw"
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(name=f"RAW{p.get('tag', '')}{p['rep']}", subjects=[topic])
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


# -- latency on NATS: keyedbus at half its own maximum rate, raw nats-py at that same rate -------------------


async def ours_latency_nats(p: dict[str, Any], url: str) -> dict[str, Any]:
    from contextlib import asynccontextmanager

    import keyedbus

    persistence: Literal["persistent", "ephemeral"] = (
        "persistent" if p["backend"] == "jetstream" else "ephemeral"
    )
    topic = f"bench.lat.{p['backend']}{p['rep']}.ours"

    @asynccontextmanager
    async def setup(on_message: Any) -> Any:
        async def handler(msg: keyedbus.Message) -> None:
            await on_message(float(msg.data))

        config = keyedbus.TopicConfig(persistence=persistence)
        async with keyedbus.open_bus(url, default_topic=config) as bus:
            await bus.subscribe(topic, handler)

            async def send(key: str, stamp: float) -> None:
                await bus.publish(topic, repr(stamp).encode(), key=key)

            yield send

    return await _latency(p, None, setup)


def baseline_latency_nats(p: dict[str, Any], url: str) -> dict[str, Any]:
    """Raw nats-py on plain asyncio, paced at the rate ours measured (handed over as p["rate"])."""
    import asyncio

    import nats

    async def main() -> dict[str, Any]:
        keys = _keys(p["keys"])
        topic = f"bench.lat.{p['backend']}{p['rep']}.raw"
        latencies: list[float] = []
        probe, total = p["probe"], p["messages"]
        probe_done, done = asyncio.Event(), asyncio.Event()

        def on_message(data: bytes) -> None:
            latencies.append(time.perf_counter() - float(data))
            if len(latencies) == probe:
                probe_done.set()
            if len(latencies) == probe + total:
                done.set()

        nc = await nats.connect(url)
        consumer: asyncio.Task[None] | None = None
        if p["backend"] == "jetstream":
            js = nc.jetstream()
            await js.add_stream(name=f"RAWLAT{p['rep']}", subjects=[topic])
            psub = await js.pull_subscribe(topic, durable="raw")

            async def consume() -> None:
                while True:
                    try:
                        msgs = await psub.fetch(256, timeout=1)
                    except nats.errors.TimeoutError:
                        continue
                    for msg in msgs:
                        on_message(msg.data)
                        await msg.ack()

            consumer = asyncio.create_task(consume())

            async def send(key: str, stamp: float) -> None:
                await js.publish(topic, repr(stamp).encode(), headers={"X-Aggregate-ID": key})

        else:

            async def cb(msg: Any) -> None:
                on_message(msg.data)

            await nc.subscribe(topic, cb=cb)
            await nc.flush()

            async def send(key: str, stamp: float) -> None:
                await nc.publish(topic, repr(stamp).encode(), headers={"X-Aggregate-ID": key})

        for i in range(probe):  # warms up as ours does; the rate is ours'
            await send(keys[i % len(keys)], time.perf_counter())
        await asyncio.wait_for(probe_done.wait(), 120)
        rate = float(p["rate"])
        burst = max(1, int(rate / 1000))
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(total):
            if i % burst == 0:
                await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
            await send(keys[i % len(keys)], time.perf_counter())
        await asyncio.wait_for(done.wait(), 120)
        if consumer is not None:
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
        await nc.close()
        measured = sorted(latencies[probe:])
        return {
            "value": measured[int(len(measured) * 0.99)] * 1000,
            "p50_ms": measured[len(measured) // 2] * 1000,
            "rate": rate,
        }

    return asyncio.run(main())


# -- peers: FastStream (asyncio; installed only in the bench session) ----------------------------------------

ours_peer_nats_core = ours_nats_core
ours_peer_jetstream = ours_jetstream


def _faststream_core(p: dict[str, Any], url: str, max_workers: int | None) -> dict[str, Any]:
    """The plainest FastStream code: a NatsBroker, one subscriber, broker.publish with the key header."""
    import asyncio

    faststream: Any = importlib.import_module("faststream.nats")

    async def main() -> dict[str, Any]:
        keys = _keys(p["keys"])
        topic = f"bench.fscore{p['rep']}.w{max_workers or 1}"
        broker = faststream.NatsBroker(url, logger=None)
        done = asyncio.Event()
        count = 0
        options: dict[str, Any] = {"max_workers": max_workers} if max_workers else {}

        async def handle(body: bytes) -> None:
            nonlocal count
            count += 1
            if count == p["messages"]:
                done.set()

        broker.subscriber(topic, **options)(handle)  # as @broker.subscriber(...) would

        await broker.start()
        start = time.perf_counter()
        for i in range(p["messages"]):
            await broker.publish(b"x", topic, headers={"X-Aggregate-ID": keys[i % len(keys)]})
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - start
        await broker.stop()
        return {"value": count / elapsed, "handled": count}

    return asyncio.run(main())


def faststream_peer_nats_core(p: dict[str, Any], url: str) -> dict[str, Any]:
    return _faststream_core(p, url, None)


def faststream_max_workers_peer_nats_core(p: dict[str, Any], url: str) -> dict[str, Any]:
    return _faststream_core(p, url, 256)  # as many as keyedbus's workers; drops key order


def _faststream_jetstream(p: dict[str, Any], url: str, max_workers: int | None) -> dict[str, Any]:
    """FastStream's pull subscriber (batches of 256, as the raw baseline fetches); acks after the handler."""
    import asyncio

    import nats

    faststream: Any = importlib.import_module("faststream.nats")

    async def main() -> dict[str, Any]:
        keys = _keys(p["keys"])
        stream = f"FS{p['rep']}W{max_workers or 1}"
        topic = f"bench.fsjs{p['rep']}.w{max_workers or 1}"
        nc = await nats.connect(url)  # stored first, not timed
        js = nc.jetstream()
        await js.add_stream(name=stream, subjects=[topic])
        for i in range(p["messages"]):
            await js.publish_async(topic, b"x", headers={"X-Aggregate-ID": keys[i % len(keys)]})
        await js.publish_async_completed()
        await nc.close()

        broker = faststream.NatsBroker(url, logger=None)
        done = asyncio.Event()
        count = 0
        options: dict[str, Any] = {"max_workers": max_workers} if max_workers else {}

        async def handle(body: bytes) -> None:
            nonlocal count
            count += 1
            if count == p["messages"]:
                done.set()

        broker.subscriber(
            topic,
            stream=faststream.JStream(stream, declare=False),
            durable="fs",
            pull_sub=faststream.PullSub(batch_size=256),
            **options,
        )(handle)

        start = time.perf_counter()
        await broker.start()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), 300)
        elapsed = time.perf_counter() - start
        await broker.stop()
        return {"value": count / elapsed, "handled": count}

    return asyncio.run(main())


def faststream_peer_jetstream(p: dict[str, Any], url: str) -> dict[str, Any]:
    return _faststream_jetstream(p, url, None)


def faststream_max_workers_peer_jetstream(p: dict[str, Any], url: str) -> dict[str, Any]:
    return _faststream_jetstream(p, url, 256)


# -- scale-out: one group, 2 member processes against 1, P partitions (needs TopicConfig.partitions) ---------


async def _scaleout_store(p: dict[str, Any], url: str, topic: str) -> dict[str, Any]:
    import trio

    import keyedbus

    keys = _keys(p["keys"])
    config = keyedbus.TopicConfig(partitions=p["partitions"])  # type: ignore[call-arg,unused-ignore]
    async with keyedbus.open_bus(url) as bus:
        await bus.configure_topic(topic, config)

        async def publisher(first: int) -> None:
            for i in range(first, p["messages"], 64):
                await bus.publish(topic, b"x", key=keys[i % len(keys)])

        async with trio.open_nursery() as nursery:
            for first in range(64):
                nursery.start_soon(publisher, first)
    return {}


async def member_scaleout(p: dict[str, Any], url: str) -> dict[str, Any]:
    """One member process: ready, then on "go" (stdin) subscribe to the group; prints its handled count."""
    import trio

    import keyedbus

    count = 0
    delay = p["handler_ms"] / 1000

    async def handler(_: keyedbus.Message) -> None:
        nonlocal count
        if delay:
            await trio.sleep(delay)
        count += 1

    config = keyedbus.TopicConfig(partitions=p["partitions"])  # type: ignore[call-arg,unused-ignore]
    pool = keyedbus.PoolConfig(workers=p["workers"])
    async with keyedbus.open_bus(url, pool=pool, drain_timeout=1) as bus:
        await bus.configure_topic(p["topic"], config)
        print("ready", flush=True)
        await trio.to_thread.run_sync(sys.stdin.readline)
        cpu_start = time.process_time()
        await bus.subscribe(p["topic"], handler, group=p["group"])
        async with trio.open_nursery() as nursery:

            async def report() -> None:
                shown = 0
                parts: tuple[int, ...] | None = None
                while True:
                    if count != shown:
                        shown = count
                        print(shown, flush=True)
                    now = bus.statistics().partitions.get((p["topic"], p["group"]), ())
                    if now != parts:
                        parts = now
                        print("parts", *now, flush=True)
                    await trio.sleep(0.01)

            nursery.start_soon(report)
            await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)  # EOF: stop
            nursery.cancel_scope.cancel()
        # CPU seconds of this process from "go" to the end of the run (the parent closes stdin then).
        print("cpu", time.process_time() - cpu_start, flush=True)
    return {"value": count}


def _scaleout(p: dict[str, Any], url: str, members: int) -> dict[str, Any]:
    import subprocess
    import threading

    topic = f"bench.scale.{p['tag']}{p['rep']}.m{members}"
    _trio(_scaleout_store, p, url, topic)  # stored first, not timed
    # A group of its own per run: membership records of the last run's members expire only after seconds.
    params = json.dumps({**p, "topic": topic, "group": f"bench-{p['tag']}{p['rep']}m{members}"})
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "scaleout", "member", params, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(members)
    ]
    counts = [0] * members
    cpu = [0.0] * members
    parts: list[set[int]] = [set() for _ in range(members)]
    finished = threading.Event()
    end = [0.0]
    settled: list[tuple[float, int]] = []  # (when, handled by then): the group's partitions were shared out

    def follow(index: int, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("parts"):
                parts[index] = {int(n) for n in line.split()[1:]}
                whole = set(range(p["partitions"])) == set().union(*parts)
                if not settled and whole and all(parts) and sum(map(len, parts)) == p["partitions"]:
                    settled.append((time.perf_counter(), sum(counts)))
            elif line.startswith("cpu"):
                cpu[index] = float(line.split()[1])
            elif line.strip().isdigit():
                counts[index] = int(line)
                if sum(counts) >= p["messages"] and not finished.is_set():
                    end[0] = time.perf_counter()
                    finished.set()

    readers = [threading.Thread(target=follow, args=(i, proc), daemon=True) for i, proc in enumerate(procs)]
    try:
        for proc in procs:  # every member connected and configured before the clock starts
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a scale-out member did not start")
        for reader in readers:
            reader.start()
        start = time.perf_counter()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        if not finished.wait(600):
            raise RuntimeError(f"scale-out: only {sum(counts)} of {p['messages']} handled in 600 s")
    finally:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.close()
        for proc in procs:
            proc.wait(60)
        for reader in readers:  # each ends at its member's end of output, after the member's "cpu" line
            if reader.ident is not None:
                reader.join(10)
    # Steady state: from the moment every member read its share of the partitions (joining, pinning and
    # reading back what an earlier reader may owe take seconds; that start-up is reported separately).
    cold = p["messages"] / (end[0] - start)
    if settled and p["messages"] - settled[0][1] >= p["messages"] // 4:
        when, done_by_then = settled[0]
        value, steady = (p["messages"] - done_by_then) / (end[0] - when), True
    else:
        value, steady = cold, False
    return {
        "value": value,
        "steady": steady,
        "cold_start_rate": cold,
        "settled_after_s": settled[0][0] - start if settled else None,
        "per_member": counts,
        # The members' CPU time per message from "go" to the end, start-up included (nats-server's not).
        "member_cpu_us_per_msg": sum(cpu) / p["messages"] * 1e6,
    }


def ours_scaleout(p: dict[str, Any], url: str) -> dict[str, Any]:
    return _scaleout(p, url, 2)


def baseline_scaleout(p: dict[str, Any], url: str) -> dict[str, Any]:
    return _scaleout(p, url, 1)


# -- memory per queued message and per idle subscription (tracemalloc, bytes) -----------------------------


def _traced() -> int:
    import tracemalloc

    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def ours_memory_per_message(p: dict[str, Any]) -> dict[str, Any]:
    """Bytes held per message published to memory:// and queued (every handler busy) until handled."""
    import tracemalloc

    import trio
    import trio.testing

    import keyedbus

    keys = _keys(p["keys"])
    release = trio.Event()

    async def handler(_: keyedbus.Message) -> None:
        await release.wait()

    tracemalloc.start()
    async with keyedbus.open_bus() as bus:
        await bus.subscribe("bench", handler)
        await bus.publish("bench", b"x", key="warm-up")  # first-use allocations are not per message
        await trio.testing.wait_all_tasks_blocked()
        before = _traced()
        for i in range(p["messages"]):
            await bus.publish("bench", b"x", key=keys[i % len(keys)])
        await trio.testing.wait_all_tasks_blocked()
        after = _traced()
        queued = bus.statistics().queued
        release.set()
    tracemalloc.stop()
    return {"value": (after - before) / p["messages"], "queued": queued}


async def baseline_memory_per_message(p: dict[str, Any]) -> dict[str, Any]:
    """The same messages queued in the raw trio fan-out (256 channels, 256 busy workers)."""
    import tracemalloc

    import trio
    import trio.testing

    keys = _keys(p["keys"])
    release = trio.Event()
    tracemalloc.start()
    channels = [trio.open_memory_channel[tuple[str, bytes]](1000) for _ in range(256)]

    async def worker(receive: trio.MemoryReceiveChannel[tuple[str, bytes]]) -> None:
        async for _ in receive:
            await release.wait()

    async with trio.open_nursery() as nursery:
        for _, receive in channels:
            nursery.start_soon(worker, receive)
        await trio.testing.wait_all_tasks_blocked()
        before = _traced()
        for i in range(p["messages"]):
            key = keys[i % len(keys)]
            await channels[hash(key) % 256][0].send((key, b"x"))
        await trio.testing.wait_all_tasks_blocked()
        after = _traced()
        release.set()
        nursery.cancel_scope.cancel()
    tracemalloc.stop()
    return {"value": (after - before) / p["messages"]}


async def ours_memory_per_subscription(p: dict[str, Any]) -> dict[str, Any]:
    """Bytes per idle memory:// subscription (its own topic, nothing published)."""
    import tracemalloc

    import trio.testing

    import keyedbus

    async def handler(_: keyedbus.Message) -> None:
        pass

    tracemalloc.start()
    async with keyedbus.open_bus() as bus:
        await bus.subscribe("bench.warm-up", handler)
        await trio.testing.wait_all_tasks_blocked()
        before = _traced()
        for t in range(p["topics"]):
            await bus.subscribe(f"bench.t{t}", handler)
        await trio.testing.wait_all_tasks_blocked()
        after = _traced()
    tracemalloc.stop()
    return {"value": (after - before) / p["topics"]}


async def baseline_memory_per_subscription(p: dict[str, Any]) -> dict[str, Any]:
    """A plain trio subscription: a memory channel and a task waiting on it."""
    import tracemalloc

    import trio
    import trio.testing

    async def reader(receive: trio.MemoryReceiveChannel[bytes]) -> None:
        async for _ in receive:
            pass

    tracemalloc.start()
    senders = []
    async with trio.open_nursery() as nursery:
        await trio.testing.wait_all_tasks_blocked()
        before = _traced()
        for _ in range(p["topics"]):
            send, receive = trio.open_memory_channel[bytes](1000)
            senders.append(send)
            nursery.start_soon(reader, receive)
        await trio.testing.wait_all_tasks_blocked()
        after = _traced()
        nursery.cancel_scope.cancel()
    tracemalloc.stop()
    return {"value": (after - before) / p["topics"]}


def main() -> None:
    scenario, side, params_text = sys.argv[1:4]
    url = sys.argv[4] if len(sys.argv) > 4 else None
    params: dict[str, Any] = json.loads(params_text)
    logging.getLogger("keyedbus").setLevel(logging.CRITICAL)  # retry warnings would time the log handler
    function = globals()[f"{side}_{scenario}"]
    args = (params,) if url is None else (params, url)
    # async functions run under trio (keyedbus, raw trio); plain ones run asyncio themselves, in a process
    # that never imports trio_asyncio.
    result = _trio(function, *args) if inspect.iscoroutinefunction(function) else function(*args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
