"""memory:// under a light load: each message of a short burst is handled as it is published, not batched."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import trio
import trio.testing

import keyedbus
from keyedbus._backends._base import Delivery

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


class _Recorder:
    """An Inbox that keeps what it is given, unsettled."""

    def __init__(self) -> None:
        self.got: list[Delivery] = []

    async def deliver(self, batch: Sequence[Delivery], *, checked: bool = False) -> None:
        self.got.extend(batch)
        await trio.lowlevel.checkpoint()

    def dropped(self, count: int, why: str) -> None:
        raise AssertionError("a persistent topic drops nothing")

    def forget_deferred(self, keys: Callable[[str], bool], *, lost: bool = False) -> None:
        raise AssertionError("memory:// has no partitions to move")

    def key_of(self, message: keyedbus.Message) -> str | None:
        return message.key


async def test_a_stored_messages_deliveries_settle_only_their_own_reading() -> None:
    """memory:// hands a stored message's log entry out as the first delivery of the group that takes it
    first; every other delivery of it (another group's, a redelivery after a hand-back) is an object of its
    own, so the handed-back copy's late ack settles nothing, and each group settles its own."""
    from keyedbus._backends.memory import MemoryBackend

    config = keyedbus.TopicConfig()
    async with trio.open_nursery() as nursery:
        backend = MemoryBackend(nursery, buffer_size=10)
        a = _Recorder()
        sub_a = await backend.subscribe("orders", config, "a", a)
        await backend.publish_keyed("orders", config, b"1", "k", "id-1", -1)
        await trio.testing.wait_all_tasks_blocked()
        b = _Recorder()  # subscribes later: starts at the oldest message kept, the one a has not settled
        await backend.subscribe("orders", config, "b", b)
        await trio.testing.wait_all_tasks_blocked()
        [first_a], [first_b] = a.got, b.got
        assert first_a is not first_b
        assert (first_a.message.attempt, first_b.message.attempt) == (1, 1)
        assert first_a.message.data == first_b.message.data == b"1"

        await sub_a.stop()  # a hands it back unsettled: a's next subscriber gets it again
        await sub_a.detach()
        again = _Recorder()
        await backend.subscribe("orders", config, "a", again)
        await trio.testing.wait_all_tasks_blocked()
        [redelivered] = again.got
        assert redelivered is not first_a
        assert (redelivered.message.attempt, redelivered.message.key) == (2, "k")

        first_b.ack()
        first_a.ack()  # the handed-back copy: stale, settles nothing
        assert not backend.settled()
        redelivered.ack()
        assert backend.settled()
        nursery.cancel_scope.cancel()
