"""memory:// under a light load: each message of a short burst is handled as it is published, not batched."""

from __future__ import annotations

import pytest
import trio
import trio.testing

import keyedbus

from .conftest import all_tasks

EPHEMERAL = keyedbus.TopicConfig(persistence="ephemeral")


async def publish_counting_behind(config: keyedbus.TopicConfig, count: int, keys: int) -> list[int]:
    """Publish `count` messages on a fresh bus; for each publish, how many published were not yet handled.

    Also checks that every message was handled once the bus is idle.
    """
    handled: list[int] = []

    async def handler(msg: keyedbus.Message) -> None:
        handled.append(int(msg.data))

    async with keyedbus.open_bus() as bus:
        await bus.configure_topic("paced", config)
        await bus.subscribe("paced", handler)
        behind = []
        for i in range(count):
            await bus.publish("paced", str(i).encode(), key=f"key-{i % keys}")
            behind.append(i + 1 - len(handled))
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(handled) == list(range(count))
    return behind


@pytest.mark.parametrize("config", [keyedbus.TopicConfig(), EPHEMERAL], ids=["persistent", "ephemeral"])
async def test_a_short_burst_is_handled_as_it_is_published(config: keyedbus.TopicConfig) -> None:
    behind = await publish_counting_behind(config, 50, keys=50)
    # publish -> subscription task -> worker: two hops, each one scheduling round (a task woken in one
    # round runs in the next), one publish per round. A publisher that ran ahead by several publishes
    # before yielding would make every message of the burst wait for later ones.
    assert max(behind) <= 3, behind


@pytest.mark.parametrize("config", [keyedbus.TopicConfig(), EPHEMERAL], ids=["persistent", "ephemeral"])
async def test_a_publisher_that_keeps_publishing_is_batched_by_two_before_a_flood(
    config: keyedbus.TopicConfig,
) -> None:
    behind = await publish_counting_behind(config, 3000, keys=1000)
    # The first 256 publishes of a run go one per round; then two per round (a message waits for one
    # later publish at most) until 1,024: a paced publisher that fell behind its schedule catches up
    # without its messages waiting behind ever bigger batches. Only a longer flood is batched more, for
    # throughput (up to 16 publishes per yield, so up to three batches in flight).
    assert max(behind[:256]) <= 3, behind[:256]
    assert max(behind[256:1024]) <= 6, behind[256:1024]
    assert max(behind[2000:]) >= 16, behind[2000:]


@pytest.mark.parametrize("config", [keyedbus.TopicConfig(), EPHEMERAL], ids=["persistent", "ephemeral"])
async def test_a_quiet_subscription_keeps_no_task(config: keyedbus.TopicConfig) -> None:
    async with keyedbus.open_bus(pool=keyedbus.PoolConfig(workers=4)) as bus:
        await bus.configure_topic("quiet", config)
        await bus.subscribe("quiet", noop)
        await trio.testing.wait_all_tasks_blocked()
        idle = all_tasks()
        for i in range(100):
            await bus.publish("quiet", b"x", key=f"key-{i}")
        await trio.testing.wait_all_tasks_blocked()
        # Its subscription task ran while there was something to take, then exited (flat cost).
        assert bus.statistics().handled == 100
        assert all_tasks() == idle


async def noop(msg: keyedbus.Message) -> None:
    pass


def test_the_delivery_paths_message_is_the_message_its_fields_say() -> None:
    """make_message (the delivery path's cheaper constructor) sets every field of Message, and only them."""
    import attrs

    from keyedbus._messages import make_message

    fields = {f.name: f"value of {f.name}" for f in attrs.fields(keyedbus.Message)}
    made = make_message(**fields)  # type: ignore[arg-type]
    assert made == keyedbus.Message(**fields)  # type: ignore[arg-type]
    assert attrs.asdict(made, recurse=False) == fields
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        made.topic = "changed"  # type: ignore[misc]


async def test_the_key_only_publish_counts_the_wire_size_exactly_as_wire_size_does() -> None:
    """The common publish (bytes and a key) knows its size without counting: the same limit holds."""
    from keyedbus._messages import KEY_HEADER, new_message_id, wire_size

    key = "order-17"
    limit = 1000
    # The payload that makes the message exactly `limit` bytes on the wire (the id's length is fixed).
    fits = limit - wire_size(b"", {KEY_HEADER: key}, new_message_id())
    async with keyedbus.open_bus(max_payload=limit) as bus:
        await bus.publish("sized", b"x" * fits, key=key)
        with pytest.raises(keyedbus.MessageTooLargeError):
            await bus.publish("sized", b"x" * (fits + 1), key=key)
        # The general path (headers given) counts with wire_size: the same bound.
        await bus.publish("sized", b"x" * fits, key=key, headers={})
        with pytest.raises(keyedbus.MessageTooLargeError):
            await bus.publish("sized", b"x" * (fits + 1), key=key, headers={})
