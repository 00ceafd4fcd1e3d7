"""The bad-input catalogue: each bad input gets a named KeyedBusError (or a dead letter with the reason),
nothing is lost, and the bus keeps serving other keys."""

from __future__ import annotations

from typing import Any

import pytest
import trio

import keyedbus
from keyedbus.testing import wait_until_handled

from .test_envelope import _invalid, raw_bytes


async def noop(_: keyedbus.Message) -> None:
    await trio.lowlevel.checkpoint()


@pytest.mark.parametrize(
    ("topic", "error"),
    [
        ("", keyedbus.InvalidTopicError),
        ("a" * 256, keyedbus.InvalidTopicError),
        ("orders.*", keyedbus.InvalidTopicError),
        ("orders.>", keyedbus.InvalidTopicError),
        ("orders..paid", keyedbus.InvalidTopicError),
        ("orders paid", keyedbus.InvalidTopicError),
        (b"orders", keyedbus.ArgumentTypeError),
        (None, keyedbus.ArgumentTypeError),
    ],
)
async def test_bad_topics_are_refused_by_every_call(
    topic: Any, error: type[Exception], autojump_clock: object
) -> None:
    env = keyedbus.Envelope(aggregate_id="k", event_type="T", event_version=1)
    async with keyedbus.open_bus() as bus:
        calls = [
            bus.publish(topic, b"x"),
            bus.publish_envelope(topic, env),
            bus.subscribe(topic, noop),
            bus.configure_topic(topic, keyedbus.TopicConfig()),
        ]
        for call in calls:
            with pytest.raises(error):
                await call
        with pytest.raises(error):
            bus.publish_nowait(topic, b"x")


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: keyedbus.TopicConfig(ack_wait=0), keyedbus.InvalidConfigError),
        (lambda: keyedbus.TopicConfig(persistence="durable"), keyedbus.InvalidConfigError),  # type: ignore[arg-type]
        (lambda: keyedbus.TopicConfig(max_msgs=0), keyedbus.InvalidConfigError),
        (lambda: keyedbus.PoolConfig(workers=0), keyedbus.InvalidConfigError),
        (lambda: keyedbus.PoolConfig(queue_size="many"), keyedbus.ArgumentTypeError),  # type: ignore[arg-type]
        (lambda: keyedbus.RetryPolicy(max_attempts=0), keyedbus.InvalidConfigError),
        (lambda: keyedbus.RetryPolicy(initial_backoff=float("nan")), keyedbus.InvalidConfigError),
    ],
)
def test_bad_configs_are_refused_on_construction(make: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        make()
    assert isinstance(info.value, keyedbus.KeyedBusError)


async def test_oversized_keys_and_sync_handlers_are_refused(autojump_clock: object) -> None:
    def sync_handler(_: keyedbus.Message) -> None:
        pass

    async with keyedbus.open_bus() as bus:
        with pytest.raises(keyedbus.InvalidKeyError, match="too long"):
            await bus.publish("orders", b"x", key="k" * 257)
        with pytest.raises(keyedbus.InvalidHandlerError, match="not async"):
            await bus.subscribe("orders", sync_handler)  # type: ignore[arg-type]
        with pytest.raises(keyedbus.InvalidEnvelopeError):
            keyedbus.Envelope(aggregate_id="k" * 257, event_type="T", event_version=1)


async def test_subscribing_to_its_own_topic_inside_a_handler_dead_letters_that_message_only(
    autojump_clock: object,
) -> None:
    handled: list[str] = []
    dead: list[keyedbus.Message] = []
    retry = keyedbus.RetryPolicy(max_attempts=2, initial_backoff=1, jitter=0)

    async with keyedbus.open_bus(retry=retry) as bus:

        async def handler(msg: keyedbus.Message) -> None:
            if msg.key == "evil":
                await bus.subscribe("orders", noop)  # already subscribed: refused
            handled.append(f"{msg.key}:{msg.data.decode()}")

        async def on_dead(msg: keyedbus.Message) -> None:
            dead.append(msg)

        await bus.subscribe("orders", handler)
        await bus.subscribe("orders.dead-letter", on_dead)
        await bus.publish("orders", b"1", key="evil")
        await bus.publish("orders", b"2", key="evil")
        for i in range(5):
            await bus.publish("orders", str(i).encode(), key="good")
        await wait_until_handled(bus)
    assert handled == [f"good:{i}" for i in range(5)]
    assert [m.data for m in dead] == [b"1", b"2"]
    assert all("DuplicateSubscriptionError" in m.headers["Keyedbus-Error"] for m in dead)


async def test_every_invalid_envelope_on_the_wire_is_dead_lettered_with_its_reason(
    autojump_clock: object,
) -> None:
    samples = _invalid()
    got: list[str] = []
    dead: list[keyedbus.Message] = []

    async def on_event(env: keyedbus.Envelope) -> None:
        got.append(env.aggregate_id)

    async def on_dead(msg: keyedbus.Message) -> None:
        dead.append(msg)

    async with keyedbus.open_bus() as bus:
        await bus.subscribe_envelope("orders", on_event)
        await bus.subscribe("orders.dead-letter", on_dead)
        for i, sample in enumerate(samples):
            await bus.publish("orders", raw_bytes(sample), key="shared")
            await bus.publish_envelope(
                "orders", keyedbus.Envelope(aggregate_id="shared", event_type="Fine", event_version=i + 1)
            )
    assert got == ["shared"] * len(samples)  # every good one between the bad ones was handled
    assert len(dead) == len(samples)
    for sample, letter in zip(samples, dead, strict=True):
        assert sample["reason"] in letter.headers["Keyedbus-Error"]
        assert letter.data == raw_bytes(sample)
