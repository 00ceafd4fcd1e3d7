"""open_bus and Bus on memory://: argument errors, lifecycle, retry timing, limits, statistics."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import trio
import trio.testing

import keyedbus
import keyedbus._statistics
from keyedbus._pool import KeyedWorkerPool, fnv1a_32
from keyedbus.testing import wait_until_handled

from .conftest import all_tasks

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup


async def noop(msg: keyedbus.Message) -> None:
    pass


# -- routing ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "expected"), [("", 0x811C9DC5), ("a", 0xE40C292C), ("foobar", 0xBF9CF968)])
def test_fnv1a_32_known_vectors(key: str, expected: int) -> None:
    assert fnv1a_32(key) == expected


def test_a_key_always_maps_to_the_same_worker() -> None:
    pool = KeyedWorkerPool(keyedbus.PoolConfig(workers=256), keyedbus._statistics.Counters())
    assert pool.worker_for("order-123") == fnv1a_32("order-123") % 256
    assert len({pool.worker_for(f"order-{i}") for i in range(10_000)}) == 256


# -- bad arguments ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic", ["", "a..b", ".a", "a.", "orders.*", "orders.>", "with space", "ä", "x" * 256, "a/b"]
)
async def test_invalid_topics_are_refused_naming_the_rule(topic: str, autojump_clock: object) -> None:
    async with keyedbus.open_bus() as bus:
        with pytest.raises(keyedbus.InvalidTopicError, match=r"dot-separated tokens of letters, digits"):
            await bus.publish(topic, b"x")
        with pytest.raises(keyedbus.InvalidTopicError, match=r"dot-separated tokens of letters, digits"):
            await bus.subscribe(topic, noop)


async def test_handlers_must_be_async_callables(autojump_clock: object) -> None:
    def sync_handler(msg: keyedbus.Message) -> None:
        pass

    class AsyncCallable:
        async def __call__(self, msg: keyedbus.Message) -> None:
            pass

    async with keyedbus.open_bus() as bus:
        with pytest.raises(
            keyedbus.InvalidHandlerError,
            match=r"^handler .*sync_handler is not async: define it with 'async def'",
        ):
            await bus.subscribe("orders", sync_handler)  # type: ignore[arg-type]
        with pytest.raises(keyedbus.InvalidHandlerError, match=r"^handler must be an async function"):
            await bus.subscribe("orders", "not callable")  # type: ignore[arg-type]
        sub = await bus.subscribe("orders", AsyncCallable())
        assert sub.topic == "orders"
        assert sub.group is None


async def test_subscribing_twice_to_the_same_topic_and_group_raises(autojump_clock: object) -> None:
    async with keyedbus.open_bus() as bus:
        await bus.subscribe("orders", noop, group="g")
        with pytest.raises(
            keyedbus.DuplicateSubscriptionError,
            match=r"^this bus already subscribes to topic 'orders' in group 'g'",
        ):
            await bus.subscribe("orders", noop, group="g")
        await bus.subscribe("orders", noop, group="h")
        sub = await bus.subscribe("orders", noop)
        await sub.unsubscribe()
        await bus.subscribe("orders", noop)  # free again after unsubscribe


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"data": "text"}, keyedbus.ArgumentTypeError, r"^data must be bytes, got str: encode it first"),
        ({"data": 5}, keyedbus.ArgumentTypeError, r"^data must be bytes, got int$"),
        ({"key": ""}, keyedbus.InvalidKeyError, r"^key '' empty; use 1\.\.256 characters"),
        ({"key": "a b"}, keyedbus.InvalidKeyError, r"^key 'a b' has a space"),
        ({"key": 7}, keyedbus.ArgumentTypeError, r"^key must be a str or None, got int 7$"),
        ({"headers": {"a:b": "x"}}, keyedbus.InvalidHeaderError, r"^header name 'a:b' is not allowed"),
        ({"headers": {"a": "x\ny"}}, keyedbus.InvalidHeaderError, r"^header 'a' has a line break"),
        ({"headers": {"a": 1}}, keyedbus.ArgumentTypeError, r"^headers must map str to str"),
        ({"headers": ["a"]}, keyedbus.ArgumentTypeError, r"^headers must be a Mapping"),
        (
            {"headers": {"X-Aggregate-ID": "k1"}, "key": "k2"},
            keyedbus.InvalidHeaderError,
            r"contradicts key=",
        ),
        ({"message_id": ""}, keyedbus.ArgumentTypeError, r"^message_id must be a non-empty str"),
    ],
)
async def test_bad_publish_arguments(
    kwargs: dict[str, Any], error: type[Exception], message: str, autojump_clock: object
) -> None:
    args: dict[str, Any] = {"data": b"x", **kwargs}
    data = args.pop("data")
    async with keyedbus.open_bus() as bus:
        with pytest.raises(error, match=message) as info:
            await bus.publish("orders", data, **args)
        assert isinstance(info.value, keyedbus.KeyedBusError)
        assert isinstance(info.value, (TypeError, ValueError))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"group": "a.b"}, keyedbus.InvalidTopicError),
        ({"group": 3}, keyedbus.ArgumentTypeError),
        ({"retry": 3}, keyedbus.ArgumentTypeError),
        ({"dead_letter": "x y"}, keyedbus.InvalidTopicError),
        ({"dead_letter": "orders"}, keyedbus.InvalidTopicError),
        ({"key": "k"}, keyedbus.ArgumentTypeError),
    ],
)
async def test_bad_subscribe_arguments(
    kwargs: dict[str, Any], error: type[Exception], autojump_clock: object
) -> None:
    async with keyedbus.open_bus() as bus:
        with pytest.raises(error):
            await bus.subscribe("orders", noop, **kwargs)


async def test_publish_envelope_takes_an_envelope(autojump_clock: object) -> None:
    async with keyedbus.open_bus() as bus:
        with pytest.raises(keyedbus.ArgumentTypeError, match=r"^publish_envelope takes a keyedbus\.Envelope"):
            await bus.publish_envelope("orders", {"aggregate_id": "k"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "kwargs", "error", "message"),
    [
        ("http://x", {}, keyedbus.InvalidConfigError, r"^unsupported bus URL scheme 'http'"),
        ("memory://somewhere", {}, keyedbus.InvalidConfigError, r"^the embedded broker takes no address"),
        (5, {}, keyedbus.ArgumentTypeError, r"^url must be a str"),
        ("memory://", {"pool": 3}, keyedbus.ArgumentTypeError, r"^pool must be a keyedbus\.PoolConfig"),
        ("memory://", {"retry": None}, keyedbus.ArgumentTypeError, r"^retry must be a keyedbus\.RetryPolicy"),
        ("memory://", {"drain_timeout": -1}, keyedbus.InvalidConfigError, r"^drain_timeout must be"),
    ],
)
async def test_bad_open_bus_arguments(
    url: Any, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        async with keyedbus.open_bus(url, **kwargs):
            pass  # pragma: no cover


# -- lifecycle --------------------------------------------------------------------------------------------


async def test_an_exception_in_the_block_propagates_as_itself(autojump_clock: object) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom) as info:  # noqa: PT012 - the raise must happen inside the bus block
        async with keyedbus.open_bus() as bus:
            await bus.subscribe("orders", noop)
            raise Boom("in the block")
    assert not isinstance(info.value, BaseExceptionGroup)
    assert str(info.value) == "in the block"


async def test_no_task_outlives_the_block(autojump_clock: object) -> None:
    before = all_tasks()
    async with keyedbus.open_bus(pool=keyedbus.PoolConfig(workers=8)) as bus:
        await bus.subscribe("orders", noop)
        await bus.publish("orders", b"x", key="k")
        assert all_tasks() > before + 8
    assert all_tasks() == before


async def test_the_bus_refuses_use_after_close(autojump_clock: object) -> None:
    async with keyedbus.open_bus() as bus:
        pass
    with pytest.raises(keyedbus.BusClosedError, match=r"^the bus for memory:// is closed"):
        await bus.publish("orders", b"x")
    with pytest.raises(keyedbus.BusClosedError):
        await bus.subscribe("orders", noop)


async def test_drain_timeout_bounds_the_exit(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    async def stuck(msg: keyedbus.Message) -> None:
        await trio.sleep_forever()

    start = trio.current_time()
    async with keyedbus.open_bus(drain_timeout=2.0) as bus:
        await bus.subscribe("orders", stuck)
        await bus.publish("orders", b"x", key="k")
    assert trio.current_time() - start == pytest.approx(2.0)
    assert "drain_timeout (2.0 s) passed with 1 message(s) unfinished" in caplog.text


# -- retries and timeouts: exact virtual times ------------------------------------------------------------


async def test_retry_times_follow_the_policy_exactly(autojump_clock: object) -> None:
    retry = keyedbus.RetryPolicy(
        max_attempts=4, initial_backoff=0.1, multiplier=2.0, max_backoff=0.3, jitter=0
    )
    starts: list[tuple[float, int]] = []

    async def handler(msg: keyedbus.Message) -> None:
        starts.append((trio.current_time(), msg.attempt))
        await trio.sleep(1.0)
        raise RuntimeError("always")

    async with keyedbus.open_bus(retry=retry) as bus:
        await bus.subscribe("orders", handler)
        t0 = trio.current_time()
        await bus.publish("orders", b"x", key="k")
    # Each wait starts when the previous attempt ended (1 s of handler time each).
    assert [(round(t - t0, 6), a) for t, a in starts] == [(0.0, 1), (1.1, 2), (2.3, 3), (3.6, 4)]
    stats = bus.statistics()
    assert (stats.retried, stats.dead_lettered, stats.handled) == (3, 1, 0)


async def test_handler_timeout_cancels_and_counts_as_a_failed_attempt(autojump_clock: object) -> None:
    retry = keyedbus.RetryPolicy(max_attempts=2, initial_backoff=0.5, jitter=0)
    starts: list[float] = []
    dead: list[keyedbus.Message] = []

    async def slow(msg: keyedbus.Message) -> None:
        starts.append(trio.current_time())
        await trio.sleep(10)

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)

    pool = keyedbus.PoolConfig(handler_timeout=2.0)
    async with keyedbus.open_bus(pool=pool, retry=retry) as bus:
        await bus.subscribe("orders", slow)
        await bus.subscribe("orders.dead-letter", on_dead)
        t0 = trio.current_time()
        await bus.publish("orders", b"x", key="k")
    assert [round(t - t0, 6) for t in starts] == [0.0, 2.5]
    assert dead[0].headers["Keyedbus-Error"].startswith("HandlerTimeoutError: handler ran longer than 2.0 s")


async def test_a_message_attempt_is_visible_to_the_handler(autojump_clock: object) -> None:
    attempts: list[int] = []

    async def handler(msg: keyedbus.Message) -> None:
        attempts.append(msg.attempt)
        if msg.attempt < 3:
            raise RuntimeError("not yet")

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("orders", handler)
        await bus.publish("orders", b"x", key="k")
    assert attempts == [1, 2, 3]


# -- broker limits --------------------------------------------------------------------------------------


async def test_a_retried_publish_with_the_same_message_id_is_stored_once(autojump_clock: object) -> None:
    seen: list[bytes] = []

    async def handler(msg: keyedbus.Message) -> None:
        seen.append(msg.data)

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("orders", handler)
        await bus.publish("orders", b"a", key="k", message_id="m-1")
        await bus.publish("orders", b"a", key="k", message_id="m-1")
        env = keyedbus.Envelope(aggregate_id="k", event_type="T", event_version=1)
        await bus.publish_envelope("orders", env)
        await bus.publish_envelope("orders", env)
    assert len(seen) == 2


async def test_ephemeral_overflow_is_counted_and_logged(
    autojump_clock: object, caplog: pytest.LogCaptureFixture
) -> None:
    release = trio.Event()
    handled = 0

    async def handler(msg: keyedbus.Message) -> None:
        nonlocal handled
        await release.wait()
        handled += 1

    pool = keyedbus.PoolConfig(workers=1, queue_size=2, wait_timeout=0.5)
    async with keyedbus.open_bus(pool=pool) as bus:
        await bus.configure_topic("ticks", keyedbus.TopicConfig(persistence="ephemeral"))
        await bus.subscribe("ticks", handler)
        for i in range(20):
            await bus.publish("ticks", str(i).encode(), key="k")
        await trio.sleep(1)
        release.set()
    stats = bus.statistics()
    assert stats.dropped > 0
    assert stats.dropped + handled == 20
    assert "dropped 1 message(s) of ephemeral topic ticks" in caplog.text


async def test_persistence_cannot_change_once_in_use(autojump_clock: object) -> None:
    async with keyedbus.open_bus() as bus:
        await bus.publish("orders", b"x")
        with pytest.raises(keyedbus.TopicConfigConflictError, match=r"^topic 'orders' is already persistent"):
            await bus.configure_topic("orders", keyedbus.TopicConfig(persistence="ephemeral"))


async def test_statistics_is_a_frozen_snapshot(autojump_clock: object) -> None:
    async with keyedbus.open_bus(pool=keyedbus.PoolConfig(workers=4)) as bus:
        stats = bus.statistics()
    assert stats.workers == 4
    assert stats.worker_queue_depths == (0, 0, 0, 0)
    assert stats.connected is True
    with pytest.raises(AttributeError):
        stats.handled = 3  # type: ignore[misc]


async def test_key_function_orders_foreign_messages(autojump_clock: object) -> None:
    seen: list[tuple[str | None, bytes]] = []

    async def handler(msg: keyedbus.Message) -> None:
        seen.append((msg.key, msg.data))

    async with keyedbus.open_bus() as bus:
        await bus.subscribe("orders", handler, key=lambda m: m.headers.get("Order"))
        await bus.publish("orders", b"1", headers={"Order": "o-1"})
    assert seen == [(None, b"1")]  # the Message keeps its wire key; ordering used the computed one


def test_importing_keyedbus_does_not_import_asyncio_bridges() -> None:
    import subprocess
    import sys

    code = "import sys, keyedbus; print(sorted(m for m in ('trio_asyncio', 'nats') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


async def test_handlers_that_never_checkpoint_do_not_starve_other_tasks(autojump_clock: object) -> None:
    probe_turns = 0
    seen: list[int] = []

    async def no_checkpoint(_: keyedbus.Message) -> None:
        seen.append(probe_turns)  # a handler that never awaits anything

    async def probe() -> None:
        nonlocal probe_turns
        while True:
            await trio.lowlevel.checkpoint()
            probe_turns += 1

    async with keyedbus.open_bus(pool=keyedbus.PoolConfig(workers=1)) as bus, trio.open_nursery() as nursery:
        await bus.subscribe("orders", no_checkpoint)
        nursery.start_soon(probe)
        for i in range(500):  # no checkpoint in between: 500 keys ready at once for the one executor
            bus.publish_nowait("orders", b"x", key=f"k{i}")
        await wait_until_handled(bus)
        nursery.cancel_scope.cancel()
    assert len(seen) == 500
    assert seen[-1] > seen[0]  # the probe ran while the executor worked through them


async def test_only_ids_the_publisher_chose_are_kept_for_deduplication(autojump_clock: object) -> None:
    # A generated id cannot repeat; keeping each for the 120 s window would hold millions under load.
    async with keyedbus.open_bus() as bus:
        for i in range(1000):
            await bus.publish("orders", b"x", key=f"k{i}")
        await bus.publish("orders", b"x", key="k", message_id="chosen-1")
        await bus.publish("orders", b"x", key="k", message_id="chosen-1")  # a retry: stored once
        topic = bus._backend._topics["orders"]  # type: ignore[attr-defined]
        assert list(topic.recent_ids) == ["chosen-1"]
        assert topic.next_seq == 1002
